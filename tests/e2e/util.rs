//! Helpers shared by the end-to-end tests: locate the memtrace binary,
//! compile the C fixtures, run processes with bounded waits (killing them on
//! timeout or panic), and parse memtrace's JSON report.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Upper bound for one memtrace run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for any other wait (a fixture getting ready, memtrace
/// attaching, a fixture exiting after its signal).
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// `--duration` passed in `--pid` mode; the traced fixtures exit well before.
pub const PID_MODE_DURATION_SECS: u64 = 30;
/// Allowance, on top of what a do-nothing program leaves outstanding
/// (see [`baseline`]), for the C runtime's own small allocations.
pub const RUNTIME_SLACK_BYTES: u64 = 16 * 1024;
pub const RUNTIME_SLACK_ALLOCATIONS: u64 = 16;

pub const PAGE: u64 = 4096;

// ---------------------------------------------------------------------------
// Serialisation of the tests

/// The tests load eBPF programs and measure whole-process totals; run them one
/// at a time even when the harness uses several threads.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the memtrace end-to-end tests load eBPF programs and must run as root (euid is {euid})"
    );
}

// ---------------------------------------------------------------------------
// Locating the binary and the fixtures

/// The memtrace binary: `$MEMTRACE_BIN`, else `<workspace>/target/debug/memtrace`.
pub fn memtrace_bin() -> PathBuf {
    let path = match std::env::var_os("MEMTRACE_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests crate has a parent directory")
            .join("target/debug/memtrace"),
    };
    assert!(
        path.is_file(),
        "memtrace binary not found at {} (set MEMTRACE_BIN, or build memtrace first)",
        path.display()
    );
    path
}

fn fixture_src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every dynamically linked fixture, compiled once per test run.
const FIXTURES: &[&str] = &[
    "baseline",
    "exact",
    "realloc",
    "munmap",
    "nested",
    "threads",
    "waiter",
    "sampling",
    "shapes",
    "busy",
    "churn",
    "forker",
    "pages",
    "uprobe_page",
    "placement",
];

struct FixtureDir {
    dir: PathBuf,
}

/// Directory the fixtures are compiled into: a fresh directory under cargo's
/// per-target temporary directory, named after this process so that later
/// runs can remove it. World-readable so that the fixture can also be run by
/// an unprivileged user (the not-root error test).
fn fixture_dir() -> &'static FixtureDir {
    static DIR: OnceLock<FixtureDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memtrace-e2e");
        std::fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        remove_stale_fixture_dirs(&parent);
        let dir = tempfile::Builder::new()
            .prefix(&format!("fixtures-{}-", std::process::id()))
            .tempdir_in(&parent)
            .unwrap_or_else(|e| {
                panic!(
                    "creating a temporary directory in {}: {e}",
                    parent.display()
                )
            })
            .keep();
        for d in [&parent, &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", d.display()));
        }
        for name in FIXTURES {
            compile(name, &dir.join(name), &[]);
        }
        FixtureDir { dir }
    })
}

/// Removes fixture directories left by earlier test processes that are gone.
fn remove_stale_fixture_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("fixtures-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn compile(name: &str, out: &Path, extra_flags: &[&str]) {
    let src = fixture_src_dir().join(format!("{name}.c"));
    let output = Command::new("cc")
        .args(extra_flags)
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(out)
        .arg(&src)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running cc for {}: {e}", src.display()));
    assert!(
        output.status.success(),
        "compiling {} failed ({}):\n{}",
        src.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Path of a compiled (dynamically linked) fixture.
pub fn fixture(name: &str) -> PathBuf {
    assert!(FIXTURES.contains(&name), "unknown fixture {name}");
    fixture_dir().dir.join(name)
}

/// `fixtures/static.c` built with `cc -static`.
pub fn static_fixture() -> PathBuf {
    static_build("static")
}

/// `fixtures/<name>.c` built with `cc -static` (once per test run), as `<name>-static`:
/// a program with its own copy of the C library's allocator.
pub fn static_build(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    built
        .entry(name.to_owned())
        .or_insert_with(|| {
            let libc_a = Path::new("/usr/lib/x86_64-linux-gnu/libc.a");
            assert!(
                libc_a.exists(),
                "{} is missing: static linking needs the static C library \
                 (Debian: `apt-get install libc6-dev`)",
                libc_a.display()
            );
            let out = fixture_dir().dir.join(format!("{name}-static"));
            compile(name, &out, &["-static"]);
            out
        })
        .clone()
}

/// `fixtures/nolibc.c` built with `-static -nostdlib`: a program with no allocator at all.
pub fn nolibc_fixture() -> PathBuf {
    static NOLIBC: OnceLock<PathBuf> = OnceLock::new();
    NOLIBC
        .get_or_init(|| {
            let out = fixture_dir().dir.join("nolibc");
            compile(
                "nolibc",
                &out,
                &[
                    "-static",
                    "-nostdlib",
                    "-ffreestanding",
                    "-fno-stack-protector",
                ],
            );
            out
        })
        .clone()
}

// ---------------------------------------------------------------------------
// Running processes with bounded waits

/// Which output stream of a [`Proc`].
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A spawned process in its own process group. Its stdout and stderr are read
/// by background threads (kept in full and also passed on line by line).
/// Dropping it (also during a panic) kills the whole process group with
/// SIGKILL and reaps the process.
pub struct Proc {
    label: String,
    child: Child,
    reaped: Option<ExitStatus>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stdout_lines: Receiver<String>,
    stderr_lines: Receiver<String>,
    readers: Vec<JoinHandle<()>>,
}

/// What a finished process left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn describe(&self) -> String {
        format!(
            "exit status: {}\n--- stderr ---\n{}\n--- stdout ({} bytes) ---\n{}",
            describe_status(self.status),
            self.stderr.trim_end(),
            self.stdout.len(),
            truncate(&self.stdout, 4000)
        )
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
    lines: mpsc::Sender<String>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    buf.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&line);
                    let _ = lines.send(String::from_utf8_lossy(&line).into_owned());
                }
            }
        }
    })
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr captured.
    pub fn spawn(label: impl Into<String>, mut cmd: Command) -> Proc {
        let label = label.into();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {label} ({cmd:?}): {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (out_tx, stdout_lines) = mpsc::channel();
        let (err_tx, stderr_lines) = mpsc::channel();
        let readers = vec![
            spawn_reader(
                child.stdout.take().expect("piped stdout"),
                stdout.clone(),
                out_tx,
            ),
            spawn_reader(
                child.stderr.take().expect("piped stderr"),
                stderr.clone(),
                err_tx,
            ),
        ];
        Proc {
            label,
            child,
            reaped: None,
            stdout,
            stderr,
            stdout_lines,
            stderr_lines,
            readers,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Waits (at most `timeout`) for a line on `stream` that satisfies `pred`
    /// and returns it; panics on timeout or if the stream ends first.
    pub fn wait_for_line(
        &self,
        stream: Stream,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let rx = match stream {
            Stream::Stdout => &self.stdout_lines,
            Stream::Stderr => &self.stderr_lines,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no {what} on {stream:?} within {timeout:?}\n--- stderr so far ---\n{}\n--- stdout so far ---\n{}",
                    self.label,
                    self.stderr_so_far(),
                    truncate(&self.stdout_so_far(), 4000)
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: {stream:?} closed before {what} (process exited?)\n--- stderr ---\n{}\n--- stdout ---\n{}",
                    self.label,
                    self.stderr_so_far(),
                    truncate(&self.stdout_so_far(), 4000)
                ),
            }
        }
    }

    /// Sends `sig` to the process (not its group).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}) for {}: {}",
            self.pid(),
            self.label,
            std::io::Error::last_os_error()
        );
    }

    /// Waits at most `timeout` for the process to exit and for its output to
    /// be read to the end. On timeout the process group is killed and the
    /// test panics with whatever output there was.
    pub fn wait(&mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        while !self.has_exited() {
            if Instant::now() >= deadline {
                self.kill_group();
                let status = self.child.wait();
                self.reaped = status.as_ref().ok().copied();
                panic!(
                    "{}: still running after {timeout:?}; killed it\n--- stderr ---\n{}\n--- stdout ---\n{}",
                    self.label,
                    self.stderr_so_far(),
                    truncate(&self.stdout_so_far(), 4000)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The process is a zombie: its pid, and so its process group id, is
        // still reserved. Kill anything left in the group (a target memtrace
        // started and did not wait for would keep the pipes open), then reap.
        self.kill_group();
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("{}: waiting: {e}", self.label));
        self.reaped = Some(status);
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Finished {
            status,
            stdout: self.stdout_so_far(),
            stderr: self.stderr_so_far(),
        }
    }

    /// Whether the process has exited, without reaping it (waitid WNOWAIT).
    fn has_exited(&self) -> bool {
        // SAFETY: waitid writes only into `info`, which is zero-initialised.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                self.pid() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            assert_eq!(
                rc,
                0,
                "{}: waitid: {}",
                self.label,
                std::io::Error::last_os_error()
            );
            info.si_pid() != 0
        }
    }

    fn kill_group(&self) {
        // SAFETY: kill has no memory-safety preconditions. The group id is the
        // child's pid (process_group(0)); this is only called while the child
        // is unreaped, so its pid (and the group id) cannot have been reused.
        unsafe {
            libc::kill(-self.pid(), libc::SIGKILL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            self.kill_group();
            let _ = self.child.wait();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Running memtrace

pub fn memtrace_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(memtrace_bin());
    cmd.args(args);
    cmd
}

/// Runs memtrace with `args` to completion (bounded by [`RUN_TIMEOUT`]).
pub fn run_memtrace<I, S>(args: I) -> Finished
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let cmd = memtrace_command(args);
    let label = format!("memtrace {:?}", cmd.get_args().collect::<Vec<_>>());
    Proc::spawn(label, cmd).wait(RUN_TIMEOUT)
}

/// Runs `memtrace top --format json [options] -- <program> [program_args]` to completion.
pub fn run_top(options: &[&str], program: &Path, program_args: &[&str]) -> Finished {
    let mut args: Vec<&OsStr> = ["top", "--format", "json"]
        .iter()
        .chain(options)
        .chain(&["--"])
        .map(OsStr::new)
        .collect();
    args.push(program.as_os_str());
    args.extend(program_args.iter().map(OsStr::new));
    run_memtrace(args)
}

/// [`run_top`] on `program`: checks that it succeeded and returns the parsed report.
pub fn trace_program(program: &Path, options: &[&str], program_args: &[&str]) -> Report {
    let finished = run_top(options, program, program_args);
    assert!(
        finished.status.success(),
        "memtrace top {options:?} -- {} {program_args:?} failed\n{}",
        program.display(),
        finished.describe()
    );
    let report = parse_report(&finished);
    report.check_shape();
    report
}

/// `memtrace top --format json [options] -- <fixture> [fixture_args]`: checks
/// that it succeeded and returns the parsed report.
pub fn trace_fixture(name: &str, options: &[&str], fixture_args: &[&str]) -> Report {
    let report = trace_program(&fixture(name), options, fixture_args);
    assert!(
        report.target.command.contains(name),
        "target.command {:?} does not name the fixture {name}",
        report.target.command
    );
    report
}

pub fn parse_report(finished: &Finished) -> Report {
    serde_json::from_str(finished.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "memtrace's stdout is not one JSON report: {e}\n{}",
            finished.describe()
        )
    })
}

/// What a program that allocates nothing itself leaves in memtrace's totals:
/// the C runtime's own allocations. Measured once per test run.
pub fn baseline() -> &'static Totals {
    static BASELINE: OnceLock<Totals> = OnceLock::new();
    BASELINE.get_or_init(|| {
        let report = trace_fixture("baseline", &[], &[]);
        let t = report.totals;
        assert!(
            t.outstanding_bytes <= 1024 * 1024,
            "a program that allocates nothing shows {} outstanding bytes: not a small baseline\n{}",
            t.outstanding_bytes,
            "(see the baseline fixture)"
        );
        t
    })
}

/// Largest outstanding byte count a fixture may show beyond its own leaks.
pub fn slack_bytes() -> u64 {
    baseline().outstanding_bytes + RUNTIME_SLACK_BYTES
}

pub fn slack_allocations() -> u64 {
    baseline().outstanding_allocations + RUNTIME_SLACK_ALLOCATIONS
}

/// Starts a fixture (for `--pid` mode) and waits until it printed its
/// `ready` line.
pub fn start_waiter(label: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(fixture("waiter"));
    cmd.args(args);
    let proc = Proc::spawn(label, cmd);
    proc.wait_for_line(Stream::Stdout, "`ready` line", WAIT_TIMEOUT, |l| {
        l.starts_with("ready")
    });
    proc
}

/// Starts `memtrace top --format json --pid PID --duration ...` and waits
/// until it says (on stderr) that its probes are attached.
pub fn attach_memtrace(pid: i32) -> Proc {
    let duration = PID_MODE_DURATION_SECS.to_string();
    let pid_s = pid.to_string();
    let args = [
        "top",
        "--format",
        "json",
        "--pid",
        &pid_s,
        "--duration",
        &duration,
    ];
    let proc = Proc::spawn(format!("memtrace {args:?}"), memtrace_command(args));
    proc.wait_for_line(
        Stream::Stderr,
        "line containing `attached`",
        WAIT_TIMEOUT,
        |l| l.contains("attached"),
    );
    proc
}

/// Waits (bounded) for memtrace to finish, which it must do successfully.
pub fn wait_memtrace_ok(memtrace: &mut Proc) -> Finished {
    let finished = memtrace.wait(RUN_TIMEOUT);
    assert!(
        finished.status.success(),
        "memtrace failed\n{}",
        finished.describe()
    );
    finished
}

/// Waits for an attached memtrace to finish and returns its parsed report.
pub fn finish_memtrace(mut memtrace: Proc) -> Report {
    let report = parse_report(&wait_memtrace_ok(&mut memtrace));
    report.check_shape();
    report
}

// ---------------------------------------------------------------------------
// The report

#[derive(Debug, Clone, Deserialize)]
pub struct Report {
    pub target: Target,
    pub duration_secs: f64,
    pub sample_bytes: u64,
    pub totals: Totals,
    pub stacks: Vec<StackEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Target {
    pub pid: i64,
    pub command: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Totals {
    pub allocated_bytes: u64,
    pub freed_bytes: u64,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub dropped_events: u64,
    pub unmatched_frees: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StackEntry {
    pub stack_id: String,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub allocated_bytes: u64,
    pub frames: Vec<Frame>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Frame {
    pub function: Option<String>,
    // Not asserted on: lenient about how unknown values are spelled.
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u64>,
    pub address: Option<String>,
}

/// Sums over all stacks whose innermost frame is one function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Site {
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub allocated_bytes: u64,
    /// How many stacks were summed.
    pub stacks: usize,
}

impl StackEntry {
    pub fn leaf_function(&self) -> Option<&str> {
        self.frames.first().and_then(|f| f.function.as_deref())
    }
}

impl Report {
    /// Checks what every report must satisfy.
    pub fn check_shape(&self) {
        assert!(self.target.pid > 0, "target.pid is {}", self.target.pid);
        assert!(
            self.duration_secs >= 0.0,
            "duration_secs is {}",
            self.duration_secs
        );
        assert!(
            self.sample_bytes >= 1,
            "sample_bytes is {}",
            self.sample_bytes
        );
        for pair in self.stacks.windows(2) {
            assert!(
                pair[0].outstanding_bytes >= pair[1].outstanding_bytes,
                "stacks are not sorted by outstanding bytes, largest first: {} before {}\n{}",
                pair[0].outstanding_bytes,
                pair[1].outstanding_bytes,
                self.summary()
            );
        }
        for s in &self.stacks {
            assert!(
                !s.frames.is_empty(),
                "stack {} has no frames\n{}",
                s.stack_id,
                self.summary()
            );
        }
    }

    /// All stacks whose innermost frame (the allocator's caller) is `function`, summed.
    pub fn site(&self, function: &str) -> Site {
        let mut site = Site::default();
        for s in self
            .stacks
            .iter()
            .filter(|s| s.leaf_function() == Some(function))
        {
            site.outstanding_bytes += s.outstanding_bytes;
            site.outstanding_allocations += s.outstanding_allocations;
            site.allocated_bytes += s.allocated_bytes;
            site.stacks += 1;
        }
        site
    }

    /// A readable digest for assertion messages.
    pub fn summary(&self) -> String {
        let t = &self.totals;
        let mut out = format!(
            "report: pid {} command {:?} sample_bytes {} duration {}s\n\
             totals: allocated {} freed {} outstanding {} in {} allocations, dropped_events {}, unmatched_frees {}\n\
             stacks ({}), outstanding / allocations / allocated, innermost frames first:\n",
            self.target.pid,
            self.target.command,
            self.sample_bytes,
            self.duration_secs,
            t.allocated_bytes,
            t.freed_bytes,
            t.outstanding_bytes,
            t.outstanding_allocations,
            t.dropped_events,
            t.unmatched_frees,
            self.stacks.len()
        );
        for s in self.stacks.iter().take(60) {
            let frames: Vec<String> = s
                .frames
                .iter()
                .take(4)
                .map(|f| match &f.function {
                    Some(name) => match (&f.file, f.line) {
                        (Some(file), Some(line)) => {
                            let file = file.rsplit('/').next().unwrap_or(file);
                            format!("{name} ({file}:{line})")
                        }
                        _ => name.clone(),
                    },
                    None => format!(
                        "?{}@{}",
                        f.address.as_deref().unwrap_or("?"),
                        f.module.as_deref().unwrap_or("?")
                    ),
                })
                .collect();
            let _ = writeln!(
                out,
                "  {:>10} / {:>6} / {:>10}  {}",
                s.outstanding_bytes,
                s.outstanding_allocations,
                s.allocated_bytes,
                frames.join(" <- ")
            );
        }
        if self.stacks.len() > 60 {
            let _ = writeln!(out, "  ... {} more", self.stacks.len() - 60);
        }
        out
    }

    /// Outstanding bytes per innermost function, for stacks outside `known`.
    pub fn outstanding_elsewhere(&self, known: &[&str]) -> BTreeMap<String, u64> {
        let mut map = BTreeMap::new();
        for s in &self.stacks {
            let leaf = s.leaf_function().unwrap_or("<unknown>");
            if !known.contains(&leaf) && s.outstanding_bytes > 0 {
                *map.entry(leaf.to_string()).or_insert(0) += s.outstanding_bytes;
            }
        }
        map
    }
}

/// Expected numbers for one site.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub function: &'static str,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub allocated_bytes: u64,
}

/// Asserts a site's exact numbers (all of them, so a site that never showed
/// up fails).
pub fn assert_site(report: &Report, e: Expect) {
    let site = report.site(e.function);
    assert!(
        site.stacks > 0,
        "no stack has {} as its innermost frame (the allocator's caller)\n{}",
        e.function,
        report.summary()
    );
    assert_eq!(
        (
            site.outstanding_bytes,
            site.outstanding_allocations,
            site.allocated_bytes
        ),
        (
            e.outstanding_bytes,
            e.outstanding_allocations,
            e.allocated_bytes
        ),
        "{}: (outstanding bytes, outstanding allocations, allocated bytes) differ from the fixture's\n{}",
        e.function,
        report.summary()
    );
}

/// Asserts that nothing is outstanding at `function` (absent counts as 0).
pub fn assert_nothing_outstanding(report: &Report, function: &str) {
    let site = report.site(function);
    assert_eq!(
        (site.outstanding_bytes, site.outstanding_allocations),
        (0, 0),
        "{function}: expected nothing outstanding\n{}",
        report.summary()
    );
}

// ---------------------------------------------------------------------------
// A minimal blocking HTTP client (for the agent's and Prometheus's endpoints)

/// Upper bound for one HTTP request (connect, send, read the whole response).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A response read to the end.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked (not decompressed).
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` on `addr` over HTTP/1.1 with `Connection: close`; handles chunked and
/// length-delimited bodies. Errors (connection refused, timeout, malformed response) are
/// returned, not panicked on, so that callers can poll a server that is still starting.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<HttpResponse, String> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HTTP_TIMEOUT)))
        .map_err(|e| format!("setting timeouts: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: memtrace-e2e\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending GET {path} to {addr}: {e}"))?;
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "GET {path} from {addr}: no complete response within {HTTP_TIMEOUT:?}"
            ));
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "reading the response to GET {path} from {addr}: {e}"
                ));
            }
        }
    }
    parse_http_response(&raw).map_err(|e| format!("GET {path} from {addr}: {e}"))
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
    let head =
        std::str::from_utf8(&raw[..head_end]).map_err(|e| format!("headers not UTF-8: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[head_end + 4..];
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let body = if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        dechunk(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad content-length {len:?}"))?;
        if rest.len() < len {
            return Err(format!(
                "body has {} bytes, content-length says {len}",
                rest.len()
            ));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size line")?;
        let size_text =
            std::str::from_utf8(&data[..line_end]).map_err(|_| "chunk size not UTF-8")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
