//! Helpers for the CPython tests: the interpreters (pyenv's 3.11, 3.12, 3.13 with a shared
//! libpython; Debian's static `python3.11`), and tracing a Python fixture by pid.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::Deserialize;

use crate::agent_util::{Cgroup, start_program_in_cgroup};
use crate::util::*;

/// pyenv's root: `$PYENV_ROOT`, else what `pyenv root` says, else `~/.pyenv`.
fn pyenv_root() -> PathBuf {
    if let Some(root) = std::env::var_os("PYENV_ROOT") {
        return root.into();
    }
    if let Ok(out) = Command::new("pyenv").arg("root").output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".pyenv")
}

/// pyenv's interpreter of version `minor` ("3.12"): `<root>/versions/3.12.*/bin/python3.12`.
pub fn pyenv_python(minor: &str) -> PathBuf {
    let versions = pyenv_root().join("versions");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&versions)
        .unwrap_or_else(|e| {
            panic!(
                "pyenv's {}: {e} (the tests need pyenv's CPython {minor})",
                versions.display()
            )
        })
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.strip_prefix(minor)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
        })
        .map(|p| p.join("bin").join(format!("python{minor}")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no pyenv CPython {minor} under {}", versions.display()))
}

pub fn python_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Starts `python fixture args...` inside `cgroup` and waits for its `ready` line.
pub fn start_python_in_cgroup(
    cgroup: &Cgroup,
    python: &Path,
    fixture: &Path,
    args: &[&str],
) -> Proc {
    let name = fixture.file_name().unwrap_or_default().to_string_lossy();
    let mut argv = vec![fixture.as_os_str()];
    argv.extend(args.iter().map(std::ffi::OsStr::new));
    start_program_in_cgroup(cgroup, &format!("{name} {args:?}"), python, &argv)
}

/// The line of `fixture` carrying the comment `# MARKER`.
pub fn marked_line(fixture: &Path, marker: &str) -> u64 {
    let text = std::fs::read_to_string(fixture).unwrap();
    let tag = format!("# {marker}");
    1 + text
        .lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .unwrap_or_else(|| panic!("{} has no line marked {tag}", fixture.display())) as u64
}

/// What the fixture itself says about its leak (tracemalloc's account).
#[derive(Debug, Deserialize)]
pub struct Tracemalloc {
    pub tracemalloc_leak_bytes: u64,
    pub leak_line: u64,
}

/// A traced run: memtrace's report, its raw JSON, and the fixture's own line.
pub struct PythonRun {
    pub report: Report,
    pub raw: serde_json::Value,
    pub tracemalloc: Option<Tracemalloc>,
    pub memtrace_stderr: String,
}

/// A Python fixture started with `--start-file`: it has printed `ready` and waits (at most
/// 60 s) for [`Self::go`] before it allocates, so that a tracer attached by pid meanwhile
/// sees all its work. Killed when dropped.
pub struct PythonFixture {
    pub proc: Proc,
    start: PathBuf,
    _dir: tempfile::TempDir,
}

impl PythonFixture {
    /// Starts `python fixture args... --start-file F` and waits for its `ready` line.
    pub fn start(python: &Path, fixture: &Path, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let start = dir.path().join("start");
        let mut cmd = Command::new(python);
        cmd.arg(fixture).args(args).arg("--start-file").arg(&start);
        let name = fixture.file_name().unwrap_or_default().to_string_lossy();
        let proc = Proc::spawn(format!("{name} {args:?}"), cmd);
        proc.wait_for_line(Stream::Stdout, "`ready`", WAIT_TIMEOUT, |l| {
            l.starts_with("ready")
        });
        Self {
            proc,
            start,
            _dir: dir,
        }
    }

    /// [`Self::start`] inside `cgroup`.
    pub fn start_in(cgroup: &Cgroup, python: &Path, fixture: &Path, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let start = dir.path().join("start");
        let start_arg = start.to_str().expect("a UTF-8 temporary path");
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(["--start-file", start_arg])
            .collect();
        let proc = start_python_in_cgroup(cgroup, python, fixture, &args);
        Self {
            proc,
            start,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Lets the fixture run.
    pub fn go(&self) {
        std::fs::write(&self.start, b"go").unwrap();
    }

    /// Waits for the fixture's `done` line (its memory is still live then); returns the
    /// tracemalloc line it printed before, if any.
    pub fn wait_done(&self) -> Option<Tracemalloc> {
        let line =
            self.proc
                .wait_for_line(Stream::Stdout, "`done`", Duration::from_secs(90), |l| {
                    l.starts_with("done") || l.starts_with('{')
                });
        if !line.starts_with('{') {
            return None;
        }
        self.proc
            .wait_for_line(Stream::Stdout, "`done`", WAIT_TIMEOUT, |l| {
                l.starts_with("done")
            });
        Some(serde_json::from_str(&line).unwrap())
    }
}

/// Waits (bounded) for the line in which memtrace (`top` or the agent, `proc`) says what it
/// did with a CPython process; returns it.
pub fn wait_cpython_line(proc: &Proc) -> String {
    proc.wait_for_line(Stream::Stderr, "the CPython line", WAIT_TIMEOUT, |l| {
        l.contains("CPython")
    })
}

/// Starts `python fixture args...`, attaches `memtrace top --pid` with `options`, lets
/// the fixture run once memtrace says its interpreter probes are on, waits for its
/// `done`, and stops memtrace (SIGINT) while the fixture's memory is still live.
pub fn trace_python(python: &Path, fixture: &Path, args: &[&str], options: &[&str]) -> PythonRun {
    let target = PythonFixture::start(python, fixture, args);
    let memtrace = attach_python(target.pid(), options);
    target.go();
    let tracemalloc = target.wait_done();
    let finished = stop_memtrace(memtrace);
    let report = parse_report(&finished);
    let raw: serde_json::Value = serde_json::from_str(finished.stdout.trim()).unwrap();
    drop(target);
    PythonRun {
        report,
        raw,
        tracemalloc,
        memtrace_stderr: finished.stderr,
    }
}

/// Whether `frame` is the Python frame `function` at `file_suffix:line`.
pub fn is_python_frame(frame: &Frame, function: &str, file_suffix: &str, line: u64) -> bool {
    frame.function.as_deref() == Some(function)
        && frame
            .file
            .as_deref()
            .is_some_and(|f| f.ends_with(file_suffix))
        && frame.line == Some(line)
}

/// The innermost Python frame of a stack (module `[python]`).
pub fn innermost_python(stack: &StackEntry) -> Option<&Frame> {
    stack
        .frames
        .iter()
        .find(|f| f.module.as_deref() == Some("[python]"))
}

/// Every stack's frames as `function (file:line)`, for failure messages.
pub fn describe_stacks(report: &Report, limit: usize) -> String {
    let mut out = String::new();
    for stack in report.stacks.iter().take(limit) {
        out.push_str(&format!("{} bytes:\n", stack.outstanding_bytes));
        for frame in stack.frames.iter().take(8) {
            out.push_str(&format!(
                "    {} ({}:{})\n",
                frame.function.as_deref().unwrap_or("?"),
                frame.file.as_deref().unwrap_or("?"),
                frame.line.unwrap_or(0)
            ));
        }
    }
    out
}

/// A virtualenv of pyenv's CPython 3.12 with Django from PyPI, made once and kept in the
/// test target directory (`pip install` takes a while; later runs reuse it).
pub fn django_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("django-venv-3.12");
            let python = venv.join("bin").join("python");
            let has_django = || {
                Command::new(&python)
                    .args(["-c", "import django"])
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !has_django() {
                let mut make = Command::new(pyenv_python("3.12"));
                make.args(["-m", "venv", "--clear"]).arg(&venv);
                let made = Proc::spawn("python3.12 -m venv", make).wait(Duration::from_secs(120));
                assert!(
                    made.status.success(),
                    "creating the venv\n{}",
                    made.describe()
                );
                let mut pip = Command::new(&python);
                pip.args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "Django>=5,<6",
                ]);
                let installed =
                    Proc::spawn("pip install Django", pip).wait(Duration::from_secs(300));
                assert!(
                    installed.status.success() && has_django(),
                    "pip install Django (from PyPI) failed\n{}",
                    installed.describe()
                );
            }
            python
        })
        .clone()
}

/// Attaches `memtrace top --pid` with `options` to a running Python process and waits
/// until memtrace says its interpreter probes are on.
pub fn attach_python(pid: i32, options: &[&str]) -> Proc {
    let pid = pid.to_string();
    let mut args = vec![
        "top",
        "--format",
        "json",
        "--pid",
        &pid,
        "--duration",
        "120",
    ];
    args.extend(options);
    let memtrace = Proc::spawn(format!("memtrace {args:?}"), memtrace_command(&args));
    wait_cpython_line(&memtrace);
    memtrace
}

/// Stops an attached memtrace with SIGINT; it must exit successfully.
fn stop_memtrace(mut memtrace: Proc) -> Finished {
    memtrace.signal(libc::SIGINT);
    wait_memtrace_ok(&mut memtrace)
}

/// Stops an attached memtrace with SIGINT and returns its report.
pub fn stop_python_trace(memtrace: Proc) -> Report {
    parse_report(&stop_memtrace(memtrace))
}

/// The Django fixture app (`fixtures/django_app.py`, in [`django_python`]'s virtualenv),
/// listening on loopback, both views warmed up (Django builds its URL resolver and caches
/// lazily). Killed when dropped.
pub struct DjangoServer {
    pub proc: Proc,
    pub addr: std::net::SocketAddr,
    /// The line of the leaking view (`# LEAK`).
    pub leak_line: u64,
    _dir: tempfile::TempDir,
}

impl DjangoServer {
    pub fn start() -> Self {
        let app = python_fixture("django_app.py");
        let leak_line = marked_line(&app, "LEAK");
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let mut cmd = Command::new(django_python());
        cmd.arg(&app).arg(&port_file);
        let proc = Proc::spawn("django_app.py", cmd);
        let port: u16 = wait_for_file(&port_file, WAIT_TIMEOUT)
            .trim()
            .parse()
            .unwrap();
        let server = Self {
            proc,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            leak_line,
            _dir: dir,
        };
        for path in ["/leak", "/fine"].repeat(20) {
            server.get(path);
        }
        server
    }

    /// `GET path`, which must answer 200.
    pub fn get(&self, path: &str) {
        let response = http_get(self.addr, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.proc.stderr_so_far()));
        assert_eq!(response.status, 200, "{path}: {}", response.text());
    }
}

/// Waits (bounded) until `path` exists and returns its contents.
pub fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
