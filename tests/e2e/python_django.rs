//! A real Django app (from PyPI, in a virtualenv the test makes) served by wsgiref, with
//! a view that leaks into a module-level cache and one that does not, driven by a bounded
//! load loop; and a worker-style loop (no HTTP) whose leaking task is found the same way.
use crate::{python_util::*, util::*};

const KIB: u64 = 1024;

fn runs(stack: &StackEntry, function: &str) -> bool {
    stack
        .frames
        .iter()
        .any(|f| f.function.as_deref() == Some(function))
}

/// Outstanding bytes of every stack that runs `function`.
fn outstanding_running(report: &Report, function: &str) -> u64 {
    report
        .stacks
        .iter()
        .filter(|s| runs(s, function))
        .map(|s| s.outstanding_bytes)
        .sum()
}

#[test]
fn python_django_leaking_view() {
    let _serial = serial();
    require_root();
    let server = DjangoServer::start();
    let leak_line = server.leak_line;
    let memtrace = attach_python(server.proc.pid(), &["--python", "exact"]);
    for i in 0..1500 {
        server.get(if i % 2 == 0 { "/leak" } else { "/fine" });
    }
    let report = stop_python_trace(memtrace);
    drop(server);
    let stacks = describe_stacks(&report, 6);

    let top = report.stacks.first().expect("no stacks");
    assert!(
        top.frames
            .iter()
            .any(|f| is_python_frame(f, "leaky_view", "django_app.py", leak_line)),
        "the top stack is not leaky_view (django_app.py:{leak_line})\n{stacks}"
    );
    // Below the view: Django's request handling, as Python frames.
    assert!(
        top.frames
            .iter()
            .any(|f| f.file.as_deref().is_some_and(|p| p.contains("/django/"))),
        "no Django frame under the view\n{stacks}"
    );
    let fine = outstanding_running(&report, "fine_view");
    assert!(
        fine < 16 * KIB && fine * 20 < top.outstanding_bytes,
        "fine_view holds {fine} bytes\n{stacks}"
    );
}

#[test]
fn python_worker_leaking_task() {
    let _serial = serial();
    require_root();
    let python = pyenv_python("3.12");
    let worker = python_fixture("python_worker.py");
    let leak_line = marked_line(&worker, "LEAK");
    let run = trace_python(&python, &worker, &["30000"], &["--python", "growth"]);
    let report = &run.report;
    let stacks = describe_stacks(report, 5);
    let top = report.stacks.first().expect("no stacks");
    assert!(
        top.frames.iter().any(|f| is_python_frame(
            f,
            "remember_result",
            "python_worker.py",
            leak_line
        )),
        "the top growth site is not remember_result (python_worker.py:{leak_line})\n{stacks}"
    );
    assert!(
        runs(top, "run_task") && runs(top, "work"),
        "the worker's loop is not under the task\n{stacks}"
    );
    let resize = outstanding_running(report, "resize_image");
    assert!(
        resize * 10 < top.outstanding_bytes,
        "resize_image, which keeps nothing, holds {resize} bytes\n{stacks}"
    );
}

/// The agent on the Django app under a steady, bounded load: the leaking view becomes a
/// suspect with its Python line as site; the non-leaking view never does.
#[test]
fn python_agent_django_suspects() {
    use crate::agent_util::{Agent, THRESHOLD};
    use std::time::{Duration, Instant};

    let _serial = serial();
    require_root();
    let server = DjangoServer::start();
    let pid = server.proc.pid().to_string();
    let agent = Agent::start(&[
        "--pid",
        &pid,
        "--interval",
        "500ms",
        "--window",
        "15s",
        "--threshold",
        &THRESHOLD.to_string(),
        "--python",
        "exact",
    ]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    wait_cpython_line(&agent.proc);

    let site = format!("leaky_view (django_app.py:{})", server.leak_line);
    let started = Instant::now();
    let mut next_check = started;
    let mut leak_found: Option<Duration> = None;
    // Bounded: at most 45 s of load, and at least 20 s so that the other view has had its
    // chance to look like a leak.
    while started.elapsed() < Duration::from_secs(45)
        && !(leak_found.is_some() && started.elapsed() >= Duration::from_secs(20))
    {
        server.get("/leak");
        server.get("/fine");
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= next_check {
            next_check += Duration::from_millis(500);
            for suspect in agent.suspects() {
                assert!(
                    !suspect
                        .frames
                        .iter()
                        .any(|f| f.function.as_deref() == Some("fine_view")),
                    "fine_view became a suspect at {:?}: {suspect:?}",
                    started.elapsed()
                );
                if suspect.site == site && leak_found.is_none() {
                    leak_found = Some(started.elapsed());
                }
            }
        }
    }
    let found = leak_found.unwrap_or_else(|| {
        panic!(
            "no suspect with site {site:?} within 45 s; suspects: {:?}\n--- agent stderr ---\n{}",
            agent.suspects().iter().map(|s| &s.site).collect::<Vec<_>>(),
            agent.stderr()
        )
    });
    eprintln!("leaky_view became a suspect after {found:?}");
    drop(server);
}
