//! Test 6: frees of blocks allocated before `--pid` attached are counted as
//! unmatched; what is allocated afterwards is exact (`fixtures/waiter.c`).

use crate::util::*;

const EARLY: u64 = 5;
const LATE: u64 = 6;
const LATE_SIZE: u64 = 1234;

#[test]
fn unmatched_free() {
    let _serial = serial();
    require_root();
    let slack = slack_bytes();

    let mut target = start_waiter(
        "waiter",
        &[
            &EARLY.to_string(),
            &LATE.to_string(),
            &LATE_SIZE.to_string(),
        ],
    );
    let memtrace = attach_memtrace(target.pid());
    // Probes are in place: let the fixture free its early blocks and leak.
    target.signal(libc::SIGUSR1);
    let done = target.wait(WAIT_TIMEOUT);
    assert!(
        done.status.success(),
        "waiter fixture failed\n{}",
        done.describe()
    );

    let report = finish_memtrace(memtrace);
    assert_eq!(
        report.target.pid,
        i64::from(target.pid()),
        "target.pid\n{}",
        report.summary()
    );

    // The target exited long before --duration: memtrace must report then.
    assert!(
        report.duration_secs < PID_MODE_DURATION_SECS as f64,
        "memtrace reported after {} s, not when the target exited\n{}",
        report.duration_secs,
        report.summary()
    );
    let t = report.totals;
    assert!(
        t.unmatched_frees >= EARLY,
        "the fixture freed {EARLY} blocks allocated before memtrace attached; unmatched_frees is {}\n{}",
        t.unmatched_frees,
        report.summary()
    );
    assert_site(
        &report,
        Expect {
            function: "late_leak",
            outstanding_bytes: LATE * LATE_SIZE,
            outstanding_allocations: LATE,
            allocated_bytes: LATE * LATE_SIZE,
        },
    );
    // memtrace never saw the early blocks allocated.
    let early = report.site("early_alloc");
    assert_eq!(
        early,
        Site::default(),
        "early_alloc ran before attaching\n{}",
        report.summary()
    );

    let leaked = LATE * LATE_SIZE;
    assert!(
        t.outstanding_bytes >= leaked && t.outstanding_bytes <= leaked + slack,
        "totals.outstanding_bytes {} not within [{leaked}, {leaked} + {slack}] \
         (unmatched frees must not make it negative or wrap)\n{}",
        t.outstanding_bytes,
        report.summary()
    );
}
