//! `cargo xtask bench` (Django part): requests per second of the Django fixture
//! (`tests/fixtures/django_app.py`, pyenv's CPython 3.12 with Django from PyPI, served by
//! wsgiref) untraced and under `memtrace top --pid` in each `--python` mode. Table to
//! `target/bench-django.md`. Measured, never asserted.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Requests per measurement (alternating the leaking and the non-leaking view), and
/// measurements per mode (the median is reported).
const REQUESTS: usize = 1000;
const ROUNDS: usize = 5;
const MODES: &[Option<&str>] = &[
    None,
    Some("growth --no-libc"),
    Some("frames"),
    Some("growth"),
    Some("exact"),
];

pub fn run(root: &Path, target_dir: &Path) -> Result<()> {
    let Some(python) = pyenv_python("3.12") else {
        println!("xtask: no pyenv CPython 3.12: the Python benchmark is skipped");
        return Ok(());
    };
    let bench_dir = target_dir.join("bench-django");
    std::fs::create_dir_all(&bench_dir)?;
    let venv_python = django_venv(&python, &bench_dir)?;
    let memtrace = target_dir.join("release/memtrace");
    if !memtrace.is_file() {
        crate::run_cmd(crate::cargo(root).args(["build", "--release", "-p", "memtrace"]))?;
    }
    let app = root.join("tests/fixtures/django_app.py");

    let mut rows = Vec::new();
    for mode in MODES {
        let mut rates = Vec::new();
        for _ in 0..ROUNDS {
            rates.push(measure(&venv_python, &app, &bench_dir, &memtrace, *mode)?);
        }
        rates.sort_by(f64::total_cmp);
        rows.push((mode.unwrap_or("untraced"), rates[ROUNDS / 2]));
    }
    let untraced = rows[0].1;
    let mut table = String::new();
    writeln!(
        table,
        "| mode | requests/s (median of {ROUNDS}) | vs untraced |"
    )?;
    writeln!(table, "| --- | ---: | ---: |")?;
    for (mode, rate) in &rows {
        let label = if *mode == "untraced" {
            "untraced".to_string()
        } else {
            format!("`--python {mode}`")
        };
        writeln!(
            table,
            "| {label} | {rate:.0} | {:+.1}% |",
            (rate / untraced - 1.0) * 100.0
        )?;
    }
    let markdown = format!(
        "Django fixture (CPython 3.12, wsgiref, {REQUESTS} sequential requests alternating \
         a leaking and a non-leaking view; {}), untraced and under `memtrace top --pid`:\n\n{table}",
        crate::bench::machine()
    );
    println!("\n{markdown}");
    let report = target_dir.join("bench-django.md");
    std::fs::write(&report, markdown).with_context(|| format!("writing {}", report.display()))?;
    println!("xtask: table written to {}", report.display());
    Ok(())
}

fn pyenv_python(minor: &str) -> Option<PathBuf> {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| {
            let out = Command::new("pyenv").arg("root").output().ok()?;
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(minor))
                .is_some_and(|rest| rest.starts_with('.'))
        })
        .map(|e| e.path().join("bin").join(format!("python{minor}")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// A virtualenv with Django from PyPI, made once.
fn django_venv(python: &Path, dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let venv_python = venv.join("bin/python");
    let has_django = || {
        Command::new(&venv_python)
            .args(["-c", "import django"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_django() {
        crate::run_cmd(
            Command::new(python)
                .args(["-m", "venv", "--clear"])
                .arg(&venv),
        )?;
        crate::run_cmd(Command::new(&venv_python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "Django>=5,<6",
        ]))?;
    }
    Ok(venv_python)
}

/// Kills and reaps a child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Requests per second of one run: the app untraced (`mode` None) or traced.
fn measure(
    python: &Path,
    app: &Path,
    dir: &Path,
    memtrace: &Path,
    mode: Option<&str>,
) -> Result<f64> {
    let port_file = dir.join("port");
    let _ = std::fs::remove_file(&port_file);
    let server = Killed(
        Command::new(python)
            .arg(app)
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .context("starting the Django fixture")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let port: u16 = loop {
        if let Ok(text) = std::fs::read_to_string(&port_file) {
            break text.trim().parse()?;
        }
        if Instant::now() > deadline {
            bail!("the Django fixture wrote no port within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..50 {
        get(addr, "/fine")?;
    }
    let tracer = match mode {
        Some(mode) => Some(attach(memtrace, server.0.id(), mode)?),
        None => None,
    };
    let started = Instant::now();
    for i in 0..REQUESTS {
        get(addr, if i % 2 == 0 { "/leak" } else { "/fine" })?;
    }
    let rate = REQUESTS as f64 / started.elapsed().as_secs_f64();
    if let Some(mut tracer) = tracer {
        // SIGINT: memtrace detaches and reports (to /dev/null here).
        let _ = Command::new("kill")
            .args(["-INT", &tracer.0.id().to_string()])
            .status();
        let _ = tracer.0.wait();
    }
    drop(server);
    Ok(rate)
}

/// Starts `memtrace top --pid PID --python MODE` and waits until its interpreter probes
/// are on.
fn attach(memtrace: &Path, pid: u32, mode: &str) -> Result<Killed> {
    let mut child = Killed(
        Command::new(memtrace)
            .args(["top", "--format", "json", "--duration", "300", "--python"])
            .args(mode.split(' '))
            .args(["--pid", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting memtrace")?,
    );
    let stderr = child.0.stderr.take().context("memtrace's stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let found = line.contains("CPython");
            let _ = tx.send((found, line));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut said = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, _)) => return Ok(child),
            Ok((false, line)) => said.push(line),
            Err(_) => bail!(
                "memtrace did not attach to the interpreter within 30 s: {}",
                said.join("\n")
            ),
        }
    }
}

fn get(addr: SocketAddr, path: &str) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    if !response.starts_with(b"HTTP/1.0 200") && !response.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&response[..response.len().min(100)])
        );
    }
    Ok(())
}
