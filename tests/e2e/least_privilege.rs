//! The smallest capability set the agent runs with, measured on this kernel: CAP_SYS_ADMIN
//! (BPF and uprobe perf events) and CAP_SYS_PTRACE (other users' maps and files through
//! /proc/PID/root). With exactly these, as root, the agent traces a process of another
//! user; without either, it stops at once with a line naming the missing one. And the
//! reason CAP_BPF + CAP_PERFMON do not replace CAP_SYS_ADMIN: the kernel itself refuses
//! their uprobe perf events (checked with bare perf events, without memtrace).

use std::process::Command;

use crate::agent_util::*;
use crate::util::*;

const MINIMAL: [&str; 2] = ["sys_admin", "sys_ptrace"];

fn bounding_set(caps: &[&str]) -> String {
    let added: Vec<String> = caps.iter().map(|c| format!(",+{c}")).collect();
    format!("--bounding-set=-all{}", added.concat())
}

/// `memtrace agent ...` under setpriv with exactly `caps` (as root, so they are effective).
fn agent_command(caps: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([&bounding_set(caps), "--inh-caps=-all", "--"])
        .arg(memtrace_bin())
        .arg("agent")
        .args(args);
    cmd
}

#[test]
fn least_privilege_agent() {
    let _serial = serial();
    require_root();
    // A process of another user, as in a container.
    let mut target = Command::new("setpriv");
    target
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(fixture("shapes"))
        .args(["fixed", "20", "1000"]);
    let target = Proc::spawn("shapes fixed as nobody", target);
    target.wait_for_line(Stream::Stdout, "`ready` line", WAIT_TIMEOUT, |l| {
        l.starts_with("ready")
    });
    let pid = target.pid().to_string();

    let addr = free_addr();
    let args = [
        "--pid",
        &pid,
        "--interval",
        "500ms",
        "--listen",
        &addr.to_string(),
    ];
    let agent = Agent::spawn(agent_command(&MINIMAL, &args), &[], addr);
    agent.wait_traced(1, WAIT_TIMEOUT);
    target.signal(libc::SIGUSR1);
    agent.wait_for("20 x 1000 B outstanding", WAIT_TIMEOUT, |s| {
        s.series("memtrace_outstanding_bytes", &[])
            .any(|sample| sample.value >= 20_000.0)
            .then_some(())
    });
    drop(agent);

    for missing in MINIMAL {
        let caps: Vec<&str> = MINIMAL.iter().copied().filter(|c| *c != missing).collect();
        let mut cmd = agent_command(&caps, &args);
        cmd.env_remove("MEMTRACE_PID");
        let finished = Proc::spawn(format!("agent without {missing}"), cmd).wait(RUN_TIMEOUT);
        let name = format!("CAP_{}", missing.to_uppercase());
        assert!(
            !finished.status.success() && finished.stderr.contains(&format!("lacks {name}")),
            "without {name} the agent must stop, naming it\n{}",
            finished.describe()
        );
        assert_eq!(
            finished
                .stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count(),
            1,
            "one line, not a backtrace\n{}",
            finished.describe()
        );
    }
    drop(target);
}

/// What the kernel allows without CAP_SYS_ADMIN: a bare perf uprobe on this process's own
/// libc (a private copy, so that nobody else's probes show), with CAP_BPF, CAP_PERFMON and
/// CAP_SYS_PTRACE, fails with EACCES; with CAP_SYS_ADMIN alone it works.
#[test]
fn least_privilege_uprobes_need_sys_admin_here() {
    let _serial = serial();
    require_root();
    let dir = std::env::temp_dir().join(format!("memtrace-e2e-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let libc = dir.join("libc.so.6");
    std::fs::copy("/lib/x86_64-linux-gnu/libc.so.6", &libc).unwrap();
    let elf = memtrace_check_probes(&libc);
    let run = |caps: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args([&bounding_set(caps), "--inh-caps=-all", "--"])
            .arg(fixture("placement"))
            .arg(&libc)
            .args(&elf)
            .env("LD_LIBRARY_PATH", &dir);
        Proc::spawn(format!("placement with {caps:?}"), cmd).wait(RUN_TIMEOUT)
    };
    let without = run(&["bpf", "perfmon", "sys_ptrace"]);
    let with = run(&["sys_admin"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        without.status.code() == Some(2) && without.stderr.contains("Permission denied"),
        "a uprobe perf event opened without CAP_SYS_ADMIN: the preflight could ask for less \
         on this kernel\n{}",
        without.describe()
    );
    assert!(
        with.status.success() && with.stdout.contains("uprobes_page no"),
        "{}",
        with.describe()
    );
}

/// `SYMBOL@OFFSET` of memtrace's emulated probe spots in `libc` (`memtrace check`).
fn memtrace_check_probes(libc: &std::path::Path) -> Vec<String> {
    let out = Command::new(memtrace_bin())
        .args(["check", "--format", "json", "--libc"])
        .arg(libc)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("memtrace check: {e}: {out:?}"));
    report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["emulated"] == true)
        .map(|p| {
            format!(
                "{}@{}",
                p["symbol"].as_str().unwrap(),
                p["function_offset"].as_u64().unwrap() + p["probe_offset"].as_u64().unwrap()
            )
        })
        .collect()
}

/// The HTTP listener binds exactly where `--listen` says (here loopback only: no socket
/// on the wildcard address), and serves reads only.
#[test]
fn least_privilege_listener_binds_where_told() {
    let _serial = serial();
    require_root();
    let agent = Agent::start(&["--interval", "1s"]);
    let port = format!("{:04X}", agent.addr.port());
    let tcp = std::fs::read_to_string(format!("/proc/{}/net/tcp", agent.proc.pid())).unwrap();
    // "sl local_address rem_address st ...": LISTEN is state 0A.
    let listening: Vec<&str> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(3) == Some(&"0A")).then(|| fields[1])
        })
        .filter(|local| local.ends_with(&format!(":{port}")))
        .collect();
    assert_eq!(
        listening,
        [format!("0100007F:{port}")],
        "the agent must listen on 127.0.0.1 only\n{tcp}"
    );
    let tcp6 =
        std::fs::read_to_string(format!("/proc/{}/net/tcp6", agent.proc.pid())).unwrap_or_default();
    assert!(
        !tcp6.lines().any(|l| l
            .split_whitespace()
            .nth(1)
            .is_some_and(|a| a.ends_with(&format!(":{port}")))),
        "the agent also listens on IPv6\n{tcp6}"
    );
    drop(agent);
}
