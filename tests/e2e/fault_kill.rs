//! The agent is killed with SIGKILL: the kernel must drop every probe with the agent's
//! file descriptors, and a restarted agent picks the process up again.
//!
//! Whether a probe is left is seen from a fresh process calling malloc on the same libc
//! file: the agent's probes are shared per file (node-wide, filtered in BPF), so while
//! they are attached any process using that file takes the trap, and its first uretprobe
//! hit maps the `[uprobes]` area into it (a traced process keeps that area forever, so its
//! own maps cannot tell). Other test runs on this machine probe the system's libc; this
//! test runs its processes on a private copy of libc, a file only its agent probes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent_util::*;
use crate::util::*;

/// A directory holding a copy of this system's libc, removed on drop.
struct PrivateLibc {
    dir: PathBuf,
}

impl PrivateLibc {
    fn new() -> PrivateLibc {
        let dir = std::env::temp_dir().join(format!("memtrace-e2e-libc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        std::fs::copy(libc, dir.join("libc.so.6"))
            .unwrap_or_else(|e| panic!("copying {}: {e}", libc.display()));
        PrivateLibc { dir }
    }

    /// `program args` running on the private libc.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("LD_LIBRARY_PATH", &self.dir);
        cmd
    }

    /// Whether a fresh process on the private libc takes a uprobe trap.
    fn probed(&self) -> bool {
        let out = self
            .command(&fixture("uprobe_page"))
            .output()
            .expect("running uprobe_page");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "uprobe_page failed: {out:?}");
        text.trim() == "uprobes_page yes"
    }
}

impl Drop for PrivateLibc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn fault_agent_sigkill() {
    let _serial = serial();
    require_root();
    let libc = PrivateLibc::new();
    assert!(
        !libc.probed(),
        "a process on a fresh copy of libc already traps: a probe is left on it"
    );

    let mut cmd = libc.command(&fixture("shapes"));
    cmd.args(["fixed", "50", "1000"]);
    let target = Proc::spawn("shapes fixed on a private libc", cmd);
    target.wait_for_line(Stream::Stdout, "`ready` line", WAIT_TIMEOUT, |l| {
        l.starts_with("ready")
    });
    let pid = target.pid().to_string();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.contains(&*libc.dir.to_string_lossy()),
        "the target does not run on the private libc:\n{maps}"
    );

    let mut agent = Agent::start(&["--pid", &pid, "--interval", "500ms"]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    assert!(
        libc.probed(),
        "control: with the agent attached, a process on the same libc must trap\n{}",
        agent.stderr()
    );

    agent.proc.signal(libc::SIGKILL);
    let finished = agent.proc.wait(WAIT_TIMEOUT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&finished.status),
        Some(libc::SIGKILL)
    );
    // The kernel closes the dead agent's perf events as it exits; allow it a moment.
    let deadline = Instant::now() + WAIT_TIMEOUT;
    while libc.probed() {
        assert!(
            Instant::now() < deadline,
            "{WAIT_TIMEOUT:?} after SIGKILL of the agent, a process on its libc still traps: \
             a probe outlived the agent"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A new agent picks the same process up and sees what it does from then on.
    let agent = Agent::start(&["--pid", &pid, "--interval", "500ms"]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    target.signal(libc::SIGUSR1);
    target.wait_for_line(Stream::Stdout, "`done` line", WAIT_TIMEOUT, |l| {
        l.trim() == "done"
    });
    agent.wait_for("50 x 1000 B outstanding", WAIT_TIMEOUT, |s| {
        s.series("memtrace_outstanding_bytes", &[])
            .any(|sample| sample.value >= 50_000.0)
            .then_some(())
    });
    drop(agent);
    drop(target);
}
