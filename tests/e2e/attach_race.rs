//! Attaching to a process whose threads allocate in a hot loop: no thread may end up
//! untraced. (An entry probe firing before its return probe exists, or a return without
//! its entry, once left a thread's slot claiming a call in flight, and every later call
//! on that thread looked nested: nothing was counted.)

use crate::util::*;

const THREADS: u64 = 3;
const LEAKS: u64 = 50;
const SIZE: u64 = 1000;

#[test]
fn attach_to_busy_threads() {
    let _serial = serial();
    require_root();
    for round in 0..3 {
        let mut cmd = std::process::Command::new(fixture("busy"));
        cmd.args([THREADS.to_string(), LEAKS.to_string(), SIZE.to_string()]);
        let mut target = Proc::spawn(format!("busy round {round}"), cmd);
        target.wait_for_line(Stream::Stdout, "`ready` line", WAIT_TIMEOUT, |l| {
            l.starts_with("ready")
        });
        // Attach while every thread churns through malloc and free.
        let memtrace = attach_memtrace(target.pid());
        target.signal(libc::SIGUSR1);
        let done = target.wait(WAIT_TIMEOUT);
        assert!(
            done.status.success(),
            "busy fixture failed\n{}",
            done.describe()
        );
        let report = finish_memtrace(memtrace);
        assert_site(
            &report,
            Expect {
                function: "leak_after_attach",
                outstanding_bytes: THREADS * LEAKS * SIZE,
                outstanding_allocations: THREADS * LEAKS,
                allocated_bytes: THREADS * LEAKS * SIZE,
            },
        );
    }
}
