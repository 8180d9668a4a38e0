//! Helpers for the `memtrace agent` tests: cgroups created (and removed) by the test under
//! the cgroup v2 mount, fixtures started inside them, a running agent with its HTTP
//! endpoints, and a parser for the Prometheus text format.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::util::*;

/// The suspicion at or over which a stack counts as a leak (the agent's default, also
/// passed explicitly).
pub const THRESHOLD: f64 = 0.8;

/// How often conditions on the agent's endpoints are polled.
pub const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------
// cgroups

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_else(|e| panic!("reading /proc/self/mountinfo: {e}"));
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    mounts.sort_by_key(|m| {
        (
            m != Path::new("/sys/fs/cgroup"),
            m != Path::new("/sys/fs/cgroup/unified"),
        )
    });
    mounts
        .into_iter()
        .next()
        .expect("no cgroup2 file system in /proc/self/mountinfo: the agent tests need cgroup v2")
}

/// One cgroup a test created.
#[derive(Clone, Debug)]
pub struct Cgroup {
    /// Its directory.
    pub dir: PathBuf,
    /// Its path relative to the mount with a leading `/`: the agent's `container` label.
    pub label: String,
}

/// `<mount>/memtrace-e2e-<pid>-<tag>/` and the cgroups under it. Dropping it (also during
/// a panic) kills whatever is still in them (only processes this test started can be
/// there) and removes them. Declare it before the processes it holds, so that they are
/// dropped (killed and reaped) first.
pub struct TestCgroups {
    root: Cgroup,
    children: Vec<Cgroup>,
}

impl TestCgroups {
    pub fn new(tag: &str) -> TestCgroups {
        let mount = cgroup2_mount();
        remove_stale_cgroups(&mount);
        let name = format!("memtrace-e2e-{}-{tag}", std::process::id());
        let dir = mount.join(&name);
        if dir.exists() {
            remove_cgroup(&dir);
        }
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        TestCgroups {
            root: Cgroup {
                dir,
                label: format!("/{name}"),
            },
            children: Vec::new(),
        }
    }

    /// The parent cgroup's path relative to the mount, without a leading `/` (for patterns).
    pub fn root_pattern(&self) -> String {
        self.root.label.trim_start_matches('/').to_owned()
    }

    /// Creates the (empty) cgroup `<root>/<name>`.
    pub fn create(&mut self, name: &str) -> Cgroup {
        let dir = self.root.dir.join(name);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        let cgroup = Cgroup {
            dir,
            label: format!("{}/{name}", self.root.label),
        };
        self.children.push(cgroup.clone());
        cgroup
    }

    /// Creates `<root>/<path>` unless it exists (its parent must), tracked for removal.
    pub fn create_all(&mut self, path: &str) -> Cgroup {
        if self.root.dir.join(path).exists() {
            return Cgroup {
                dir: self.root.dir.join(path),
                label: format!("{}/{path}", self.root.label),
            };
        }
        self.create(path)
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        for child in self.children.iter().rev() {
            remove_cgroup(&child.dir);
        }
        remove_cgroup(&self.root.dir);
    }
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Removes a test cgroup (and test cgroups under it): SIGKILLs the processes still in it,
/// by pid (only processes a test started are in a test cgroup), and retries rmdir for a
/// bounded time. Never panics (it runs in Drop); complains on stderr instead.
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                if Instant::now() >= deadline {
                    eprintln!(
                        "warning: cannot remove test cgroup {}: {e} (processes: {:?})",
                        dir.display(),
                        cgroup_pids(dir)
                    );
                    return;
                }
            }
        }
        for pid in cgroup_pids(dir) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes test cgroups left behind by earlier test processes that are gone.
fn remove_stale_cgroups(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("memtrace-e2e-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_cgroup(&entry.path());
        }
    }
}

/// The cgroup v2 path of a process (the `0::` line of /proc/PID/cgroup).
pub fn cgroup_of(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

/// Starts `program args...` inside `cgroup` (a shell moves itself into the cgroup, then
/// execs the program: it never runs outside), and waits for its line starting with `ready`.
pub fn start_program_in_cgroup<S: AsRef<OsStr>>(
    cgroup: &Cgroup,
    label: &str,
    program: impl AsRef<OsStr>,
    args: &[S],
) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(cgroup.dir.join("cgroup.procs"))
        .arg(program)
        .args(args);
    let proc = Proc::spawn(format!("{label} in {}", cgroup.label), cmd);
    proc.wait_for_line(Stream::Stdout, "`ready` line", WAIT_TIMEOUT, |l| {
        l.starts_with("ready")
    });
    proc
}

/// Starts fixture `name` with `args` inside `cgroup` and waits for its `ready` line.
pub fn start_in_cgroup(cgroup: &Cgroup, name: &str, args: &[&str]) -> Proc {
    start_program_in_cgroup(cgroup, &format!("{name} {args:?}"), fixture(name), args)
}

/// Starts `fixtures/shapes.c` with `args` inside `cgroup` and waits for its `ready` line.
/// The fixture then waits for SIGUSR1 before allocating anything.
pub fn start_shape(cgroup: &Cgroup, args: &[&str]) -> Proc {
    let proc = start_in_cgroup(cgroup, "shapes", args);
    assert_eq!(
        cgroup_of(proc.pid()).as_deref(),
        Some(cgroup.label.as_str()),
        "fixture pid {} is not in its cgroup",
        proc.pid()
    );
    proc
}

// ---------------------------------------------------------------------------
// The agent

/// A free TCP port on 127.0.0.1 (bound and released: another process could take it
/// before the agent binds it; unlikely enough here).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
        .port()
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Percent-encodes a query-string value.
pub fn url_encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A running `memtrace agent`, killed (whole process group) when dropped.
pub struct Agent {
    pub proc: Proc,
    pub addr: SocketAddr,
}

/// Every environment variable the agent reads its flags from.
const AGENT_ENV: &[&str] = &[
    "MEMTRACE_PID",
    "MEMTRACE_CGROUP",
    "MEMTRACE_INTERVAL",
    "MEMTRACE_WINDOW",
    "MEMTRACE_MAX_POINTS",
    "MEMTRACE_MAX_STACKS",
    "MEMTRACE_TOP_K",
    "MEMTRACE_THRESHOLD",
    "MEMTRACE_LISTEN",
    "MEMTRACE_SAMPLE_BYTES",
    "MEMTRACE_MAX_ALLOCATIONS",
    "MEMTRACE_MAX_STACK_TRACES",
    "MEMTRACE_KUBECONFIG",
    "MEMTRACE_NODE_NAME",
    "MEMTRACE_KUBE_TIMEOUT",
    "MEMTRACE_NAMESPACE",
    "MEMTRACE_EXCLUDE_NAMESPACE",
    "MEMTRACE_POD_SELECTOR",
    "MEMTRACE_TRACE_DEFAULT",
    "NODE_NAME",
    "KUBERNETES_SERVICE_HOST",
    "MEMTRACE_MAX_OVERHEAD",
    "MEMTRACE_BUDGET_RETRY",
    "MEMTRACE_PROBES",
    "MEMTRACE_ESCALATE_FOR",
    "MEMTRACE_FAULT_SAMPLE",
    "MEMTRACE_PYTHON",
];

impl Agent {
    /// `memtrace agent ARGS --listen 127.0.0.1:<free port>`; waits until it listens.
    pub fn start(args: &[&str]) -> Agent {
        let addr = free_addr();
        let mut cmd = memtrace_command(["agent"]);
        cmd.args(args).arg("--listen").arg(addr.to_string());
        Agent::spawn(cmd, &[], addr)
    }

    /// Runs `cmd` (a memtrace agent command) with a clean MEMTRACE_* environment plus
    /// `env`, and waits until it says it listens on `addr`.
    pub fn spawn(mut cmd: Command, env: &[(&str, &str)], addr: SocketAddr) -> Agent {
        for name in AGENT_ENV {
            cmd.env_remove(name);
        }
        cmd.env("MEMTRACE_LOG", "info");
        // The CPU budget would detach the busy fixtures other tests watch: only the
        // budget's own test turns it on (a flag wins over the environment).
        cmd.env("MEMTRACE_MAX_OVERHEAD", "0");
        // Likewise, the tests of the exact tier want its probes from the start; the
        // escalation test asks for `--probes escalate`.
        cmd.env("MEMTRACE_PROBES", "always");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let label = format!(
            "memtrace {:?} env {env:?}",
            cmd.get_args().collect::<Vec<_>>()
        );
        let proc = Proc::spawn(label, cmd);
        let line = proc.wait_for_line(
            Stream::Stderr,
            "`agent listening on` line",
            WAIT_TIMEOUT,
            |l| l.contains("agent listening on"),
        );
        assert!(
            line.trim_end().ends_with(&format!("http://{addr}")),
            "the agent listens elsewhere than asked ({addr}): {line:?}"
        );
        Agent { proc, addr }
    }

    /// What the agent printed so far (for failure messages).
    pub fn stderr(&self) -> String {
        let text = self.proc.stderr_so_far();
        // Keep the end: that is where the trouble usually is.
        let chars: Vec<char> = text.chars().collect();
        if chars.len() > 6000 {
            let tail: String = chars[chars.len() - 6000..].iter().collect();
            format!("...\n{tail}")
        } else {
            text
        }
    }

    /// `GET path`, panicking (with the agent's stderr) if the request fails.
    pub fn get(&self, path: &str) -> HttpResponse {
        http_get(self.addr, path)
            .unwrap_or_else(|e| panic!("{e}\n--- agent stderr ---\n{}", self.stderr()))
    }

    /// `GET /metrics`, parsed.
    pub fn scrape(&self) -> Scrape {
        let response = self.get("/metrics");
        assert_eq!(
            response.status,
            200,
            "GET /metrics: {}\n--- agent stderr ---\n{}",
            response.text(),
            self.stderr()
        );
        Scrape::parse(&response.text())
    }

    /// `GET /api/v1/suspects`, parsed.
    pub fn suspects(&self) -> Vec<Suspect> {
        let response = self.get("/api/v1/suspects");
        assert_eq!(
            response.status,
            200,
            "GET /api/v1/suspects: {}\n--- agent stderr ---\n{}",
            response.text(),
            self.stderr()
        );
        serde_json::from_slice(&response.body).unwrap_or_else(|e| {
            panic!(
                "/api/v1/suspects is not a JSON list of suspects: {e}\n{}",
                response.text()
            )
        })
    }

    /// Polls `/readyz` until it answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match http_get(self.addr, "/readyz") {
                Ok(r) if r.status == 200 => return,
                Ok(r) => {
                    assert_eq!(
                        r.status,
                        503,
                        "/readyz before ready: expected 503, got {}: {}",
                        r.status,
                        r.text()
                    );
                    last = format!("{} {}", r.status, r.text().trim());
                }
                Err(e) => last = e,
            }
            std::thread::sleep(POLL);
        }
        panic!(
            "/readyz did not answer 200 within {WAIT_TIMEOUT:?} (last: {last})\n--- agent stderr ---\n{}",
            self.stderr()
        );
    }

    /// Polls `/metrics` until `check` returns `Some`, at most `timeout`; panics with the
    /// last scrape and the agent's stderr otherwise.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Scrape) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let scrape = self.scrape();
            if let Some(found) = check(&scrape) {
                return found;
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent: no {what} within {timeout:?}\n--- last /metrics (memtrace_* only) ---\n{}\n--- agent stderr ---\n{}",
                    scrape.memtrace_lines(),
                    self.stderr()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `memtrace_traced_processes` is `n`.
    pub fn wait_traced(&self, n: i64, timeout: Duration) {
        self.wait_for(&format!("memtrace_traced_processes == {n}"), timeout, |s| {
            (s.value("memtrace_traced_processes", &[]) == Some(n as f64)).then_some(())
        });
    }

    /// Waits until the container's `memtrace_outstanding_bytes` is at least `bytes`;
    /// returns it.
    pub fn wait_outstanding(&self, container: &str, bytes: u64, timeout: Duration) -> f64 {
        self.wait_for(
            &format!("memtrace_outstanding_bytes{{container={container:?}}} >= {bytes}"),
            timeout,
            |s| {
                s.value("memtrace_outstanding_bytes", &[("container", container)])
                    .filter(|v| *v >= bytes as f64)
            },
        )
    }
}

// ---------------------------------------------------------------------------
// /api/v1/suspects

#[derive(Debug, Clone, Deserialize)]
pub struct Suspect {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub stack_id: String,
    pub site: String,
    pub score: f64,
    pub growth_bytes_per_second: f64,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub mean_age_seconds: Option<f64>,
    pub frames: Vec<Frame>,
}

/// Whether a `site` label (`function (file.c:line)`) names `function`.
pub fn site_is(site: &str, function: &str) -> bool {
    site.strip_prefix(function)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
}

// ---------------------------------------------------------------------------
// The Prometheus text format

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }

    fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name && labels.iter().all(|(k, v)| self.label(k) == *v)
    }
}

/// One parsed `/metrics` response.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text exposition format; panics on a line it cannot read.
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                parse_sample(l).unwrap_or_else(|e| {
                    panic!("/metrics: cannot parse line {l:?}: {e}\n--- /metrics ---\n{text}")
                })
            })
            .collect();
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// The samples of metric `name` whose labels include `labels`.
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.matches(name, labels))
    }

    /// The value of the one sample of `name` with `labels`; None when there is none;
    /// panics when there are several.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self.series(name, labels).collect();
        assert!(
            found.len() <= 1,
            "{name} with {labels:?}: {} series, expected at most one: {found:?}",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    /// The `memtrace_*` lines (for failure messages).
    pub fn memtrace_lines(&self) -> String {
        self.text
            .lines()
            .filter(|l| l.starts_with("memtrace_"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The lines with a `container` label equal to `container`.
    pub fn lines_of_container(&self, container: &str) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.labels.get("container").is_some_and(|c| c == container))
            .collect()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let line = line.trim();
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            // Skip separators.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some(&(i, c)) = chars.peek() else {
                return Err("unterminated label set".into());
            };
            if c == '}' {
                rest = &after[i + 1..];
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key:?} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    None => return Err(format!("unterminated value of label {key:?}")),
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        other => return Err(format!("bad escape {other:?} in label {key:?}")),
                    },
                    Some(c) => value.push(c),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        }
    }
    let value_text = rest.split_whitespace().next().ok_or("no value")?;
    let value: f64 = value_text
        .parse()
        .map_err(|_| format!("bad value {value_text:?}"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

#[test]
fn parses_the_text_format() {
    let scrape = Scrape::parse(
        "# HELP x y\n# TYPE x gauge\n\
         memtrace_leak_suspicion{container=\"/a/b\",namespace=\"\",pod=\"\",site=\"leak (a.c:3)\",stack_id=\"00ff\"} 0.95\n\
         memtrace_traced_processes 2\n\
         weird{a=\"q\\\"uote\\\\ and, comma}\"} +Inf\n",
    );
    assert_eq!(scrape.samples.len(), 3);
    assert_eq!(
        scrape.value("memtrace_leak_suspicion", &[("container", "/a/b")]),
        Some(0.95)
    );
    assert_eq!(scrape.samples[0].label("site"), "leak (a.c:3)");
    assert_eq!(scrape.value("memtrace_traced_processes", &[]), Some(2.0));
    assert_eq!(scrape.samples[2].label("a"), "q\"uote\\ and, comma}");
    assert!(scrape.samples[2].value.is_infinite());
    assert!(site_is("leak (a.c:3)", "leak"));
    assert!(!site_is("leaky (a.c:3)", "leak"));
    assert_eq!(url_encode("/a b/c"), "%2Fa%20b%2Fc");
}
