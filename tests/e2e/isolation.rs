//! Test 8: `--pid` traces that process only, not another copy of the same
//! program doing similar work at the same time (`fixtures/waiter.c`).

use crate::util::*;

// The traced copy: no early blocks, leaks 11 x 1111.
const A_LATE: u64 = 11;
const A_SIZE: u64 = 1111;
// The other copy: frees 9 early blocks, leaks 37 x 3333.
const B_EARLY: u64 = 9;
const B_LATE: u64 = 37;
const B_SIZE: u64 = 3333;

#[test]
fn pid_isolation() {
    let _serial = serial();
    require_root();
    let slack = slack_bytes();

    let mut traced = start_waiter(
        "traced waiter",
        &["0", &A_LATE.to_string(), &A_SIZE.to_string()],
    );
    let mut other = start_waiter(
        "other waiter",
        &[
            &B_EARLY.to_string(),
            &B_LATE.to_string(),
            &B_SIZE.to_string(),
        ],
    );
    let memtrace = attach_memtrace(traced.pid());

    // The other copy does all its work while memtrace is attached...
    other.signal(libc::SIGUSR1);
    let done = other.wait(WAIT_TIMEOUT);
    assert!(
        done.status.success(),
        "other waiter failed\n{}",
        done.describe()
    );
    // ...then the traced one.
    traced.signal(libc::SIGUSR1);
    let done = traced.wait(WAIT_TIMEOUT);
    assert!(
        done.status.success(),
        "traced waiter failed\n{}",
        done.describe()
    );

    let report = finish_memtrace(memtrace);
    assert_eq!(
        report.target.pid,
        i64::from(traced.pid()),
        "target.pid\n{}",
        report.summary()
    );
    assert_site(
        &report,
        Expect {
            function: "late_leak",
            outstanding_bytes: A_LATE * A_SIZE,
            outstanding_allocations: A_LATE,
            allocated_bytes: A_LATE * A_SIZE,
        },
    );

    // The target exited long before --duration: memtrace must report then.
    assert!(
        report.duration_secs < PID_MODE_DURATION_SECS as f64,
        "memtrace reported after {} s, not when the target exited\n{}",
        report.duration_secs,
        report.summary()
    );
    let t = report.totals;
    let leaked = A_LATE * A_SIZE;
    assert!(
        t.outstanding_bytes >= leaked && t.outstanding_bytes <= leaked + slack,
        "totals.outstanding_bytes {} not within [{leaked}, {leaked} + {slack}]: the other process's \
         {} bytes leaked?\n{}",
        t.outstanding_bytes,
        B_LATE * B_SIZE,
        report.summary()
    );
    assert!(
        t.allocated_bytes <= leaked + slack,
        "totals.allocated_bytes {} > {leaked} + {slack}: the other process's allocations counted?\n{}",
        t.allocated_bytes,
        report.summary()
    );
    assert!(
        t.unmatched_frees < B_EARLY,
        "unmatched_frees {} >= {B_EARLY}: the other process's frees counted?\n{}",
        t.unmatched_frees,
        report.summary()
    );
}
