//! Helpers for the CPython tests: the interpreters (pyenv's 3.11, 3.12, 3.13 with a shared
//! libpython; Debian's static `python3.11`), and tracing a Python fixture by pid.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::Deserialize;

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
    cgroup: &crate::agent_util::Cgroup,
    python: &Path,
    fixture: &Path,
    args: &[&str],
) -> Proc {
    let name = fixture.file_name().unwrap_or_default().to_string_lossy();
    let mut argv = vec![fixture.as_os_str()];
    argv.extend(args.iter().map(std::ffi::OsStr::new));
    crate::agent_util::start_program_in_cgroup(cgroup, &format!("{name} {args:?}"), python, &argv)
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

/// Starts `python fixture args... --start-file F`, attaches `memtrace top --pid` with
/// `options`, lets the fixture run once memtrace says its interpreter probes are on,
/// waits for its `done`, and stops memtrace (SIGINT) while the fixture's memory is still
/// live.
pub fn trace_python(python: &Path, fixture: &Path, args: &[&str], options: &[&str]) -> PythonRun {
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start");
    let mut cmd = Command::new(python);
    cmd.arg(fixture).args(args).arg("--start-file").arg(&start);
    let target = Proc::spawn(format!("{} {}", python.display(), fixture.display()), cmd);
    target.wait_for_line(Stream::Stdout, "`ready`", WAIT_TIMEOUT, |l| {
        l.starts_with("ready")
    });

    let pid = target.pid().to_string();
    let mut memtrace_args = vec![
        "top",
        "--format",
        "json",
        "--pid",
        &pid,
        "--duration",
        "120",
    ];
    memtrace_args.extend(options);
    let mut memtrace = Proc::spawn(
        format!("memtrace {memtrace_args:?}"),
        memtrace_command(&memtrace_args),
    );
    memtrace.wait_for_line(Stream::Stderr, "the CPython line", WAIT_TIMEOUT, |l| {
        l.contains("CPython")
    });
    std::fs::write(&start, b"go").unwrap();
    let tracemalloc =
        target.wait_for_line(Stream::Stdout, "`done`", Duration::from_secs(90), |l| {
            l.starts_with("done") || l.starts_with('{')
        });
    let tracemalloc = if tracemalloc.starts_with('{') {
        target.wait_for_line(Stream::Stdout, "`done`", WAIT_TIMEOUT, |l| {
            l.starts_with("done")
        });
        Some(serde_json::from_str(&tracemalloc).unwrap())
    } else {
        None
    };
    memtrace.signal(libc::SIGINT);
    let finished = memtrace.wait(RUN_TIMEOUT);
    assert!(
        finished.status.success(),
        "memtrace failed\n{}",
        finished.describe()
    );
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
    memtrace.wait_for_line(Stream::Stderr, "the CPython line", WAIT_TIMEOUT, |l| {
        l.contains("CPython")
    });
    memtrace
}

/// Stops an attached memtrace with SIGINT and returns its report.
pub fn stop_python_trace(mut memtrace: Proc) -> Report {
    memtrace.signal(libc::SIGINT);
    let finished = memtrace.wait(RUN_TIMEOUT);
    assert!(
        finished.status.success(),
        "memtrace failed\n{}",
        finished.describe()
    );
    parse_report(&finished)
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
