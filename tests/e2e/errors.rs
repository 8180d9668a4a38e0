//! Test 9: error cases: one line on stderr naming the problem, a non-zero
//! exit status, and no report on stdout.

use std::path::Path;
use std::process::Command;

use crate::util::*;

fn assert_error(finished: &Finished, needle: &str) {
    assert!(
        !finished.status.success(),
        "memtrace succeeded; expected an error mentioning {needle:?}\n{}",
        finished.describe()
    );
    let lines: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr\n{}",
        finished.describe()
    );
    // A lowercase needle matches in any case ("No such process" is how
    // strerror spells ESRCH); others (CAP_SYS_ADMIN) must appear as written.
    assert!(
        lines[0].contains(needle) || lines[0].to_lowercase().contains(needle),
        "the error does not mention {needle:?}\n{}",
        finished.describe()
    );
    assert!(
        finished.stdout.trim().is_empty(),
        "memtrace printed on stdout although it failed\n{}",
        finished.describe()
    );
}

/// A pid no process has right now (searched down from pid_max).
fn unused_pid() -> i32 {
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("reading /proc/sys/kernel/pid_max")
        .trim()
        .parse()
        .expect("parsing pid_max");
    (2..pid_max)
        .rev()
        .find(|pid| {
            // SAFETY: kill with signal 0 only checks for existence.
            let rc = unsafe { libc::kill(*pid, 0) };
            rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        })
        .expect("some pid is free")
}

#[test]
fn error_no_such_pid() {
    let _serial = serial();
    require_root();
    let pid = unused_pid().to_string();
    let finished = run_memtrace(["top", "--format", "json", "--pid", &pid, "--duration", "5"]);
    assert_error(&finished, "no such process");
}

#[test]
fn error_no_allocator() {
    let _serial = serial();
    require_root();
    let finished = run_top(&[], &nolibc_fixture(), &[]);
    assert_error(&finished, "no allocator of its own");
}

#[test]
fn error_not_root() {
    let _serial = serial();
    require_root();
    let setpriv = Path::new("/usr/bin/setpriv");
    assert!(
        setpriv.exists(),
        "{} is missing (Debian: util-linux)",
        setpriv.display()
    );
    let target = fixture("baseline");
    let mut cmd = Command::new(setpriv);
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(memtrace_bin())
    .args(["top", "--format", "json", "--"])
    .arg(&target);
    let finished = Proc::spawn("memtrace as nobody", cmd).wait(RUN_TIMEOUT);
    assert_error(&finished, "lacks CAP_SYS_ADMIN");
}
