//! The agent's leak detector on real processes in real cgroups (`fixtures/shapes.c`), one
//! shape per cgroup: leaks must raise `memtrace_leak_suspicion` of the leaking stack to
//! the threshold and list it in `/api/v1/suspects`; growth that stops, churn, and a
//! sawtooth must never do either.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::agent_util::*;
use crate::util::*;

const INTERVAL: &str = "500ms";
const WINDOW: &str = "15s";
/// Must-alarm shapes have this long (from the start of their allocations) to alarm.
const ALARM_DEADLINE: Duration = Duration::from_secs(45);
/// Every shape runs at least this long, however fast the alarms come: longer than the
/// window plus warmup's growth, so that the must-not-alarm shapes had every chance to
/// (wrongly) alarm.
const MIN_RUN: Duration = Duration::from_secs(25);
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

struct Shape {
    /// The fixture's mode, also the cgroup's name.
    mode: &'static str,
    /// The functions whose stacks leak (empty: must never alarm).
    leaks: &'static [&'static str],
}

const SHAPES: &[Shape] = &[
    Shape {
        mode: "steady",
        leaks: &["steady_leak"],
    },
    Shape {
        mode: "slow_under_churn",
        // slow_leak: its own stack beside churn_big's; mixed_alloc: a leak and a
        // varying live set in one stack.
        leaks: &["slow_leak", "mixed_alloc"],
    },
    Shape {
        mode: "late",
        leaks: &["late_leak"],
    },
    Shape {
        mode: "warmup",
        leaks: &[],
    },
    Shape {
        mode: "churn",
        leaks: &[],
    },
    Shape {
        mode: "sawtooth",
        leaks: &[],
    },
];

/// What was seen of one leaking stack.
#[derive(Default, Debug)]
struct LeakSeen {
    max_suspicion: Option<f64>,
    /// When suspicion first reached the threshold (since the fixtures started).
    alarmed_metric: Option<Duration>,
    /// When it first appeared in /api/v1/suspects.
    alarmed_suspects: Option<Duration>,
}

/// What was seen of a container that must not alarm.
#[derive(Default, Debug)]
struct CalmSeen {
    /// Highest suspicion of any of its stacks, with the site and when.
    max_suspicion: Option<(f64, String, Duration)>,
    /// First time one of its stacks was listed as a suspect.
    listed: Option<(String, f64, Duration)>,
}

#[test]
fn agent_detects_shapes() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("shapes");
    let groups: Vec<Cgroup> = SHAPES.iter().map(|s| cgroups.create(s.mode)).collect();
    let pattern = format!("{}/*", cgroups.root_pattern());
    let agent = Agent::start(&[
        "--cgroup",
        &pattern,
        "--interval",
        INTERVAL,
        "--window",
        WINDOW,
        "--threshold",
        &THRESHOLD.to_string(),
        "--top-k",
        "5",
    ]);
    agent.wait_ready();

    let fixtures: Vec<Proc> = SHAPES
        .iter()
        .zip(&groups)
        .map(|(shape, cg)| start_shape(cg, &[shape.mode]))
        .collect();
    agent.wait_traced(SHAPES.len() as i64, WAIT_TIMEOUT);
    for f in &fixtures {
        f.signal(libc::SIGUSR1);
    }
    let started = Instant::now();

    let mut leaks: BTreeMap<(&str, &str), LeakSeen> = BTreeMap::new();
    let mut calm: BTreeMap<&str, CalmSeen> = BTreeMap::new();
    for (shape, cg) in SHAPES.iter().zip(&groups) {
        for f in shape.leaks {
            leaks.insert((cg.label.as_str(), f), LeakSeen::default());
        }
        if shape.leaks.is_empty() {
            calm.insert(cg.label.as_str(), CalmSeen::default());
        }
    }

    let mut last_scrape;
    let mut last_suspects;
    loop {
        let now = started.elapsed();
        let scrape = agent.scrape();
        let suspects = agent.suspects();
        assert_eq!(
            scrape.value("memtrace_traced_processes", &[]),
            Some(SHAPES.len() as f64),
            "a fixture stopped being traced at {now:?}\n--- /metrics ---\n{}\n--- agent stderr ---\n{}",
            scrape.memtrace_lines(),
            agent.stderr()
        );
        for s in scrape.series("memtrace_leak_suspicion", &[]) {
            assert!(
                (0.0..=1.0).contains(&s.value),
                "suspicion outside [0, 1]: {s:?}"
            );
        }

        for ((container, function), seen) in leaks.iter_mut() {
            for s in scrape
                .series("memtrace_leak_suspicion", &[("container", container)])
                .filter(|s| site_is(s.label("site"), function))
            {
                seen.max_suspicion = Some(seen.max_suspicion.unwrap_or(0.0).max(s.value));
                if s.value >= THRESHOLD && seen.alarmed_metric.is_none() {
                    seen.alarmed_metric = Some(now);
                }
            }
            if seen.alarmed_suspects.is_none()
                && suspects
                    .iter()
                    .any(|s| s.container == *container && site_is(&s.site, function))
            {
                seen.alarmed_suspects = Some(now);
            }
        }
        for (container, seen) in calm.iter_mut() {
            for s in scrape.series("memtrace_leak_suspicion", &[("container", container)]) {
                if seen.max_suspicion.as_ref().is_none_or(|m| s.value > m.0) {
                    seen.max_suspicion = Some((s.value, s.label("site").to_owned(), now));
                }
            }
            if seen.listed.is_none()
                && let Some(s) = suspects.iter().find(|s| s.container == *container)
            {
                seen.listed = Some((s.site.clone(), s.score, now));
            }
        }

        last_scrape = scrape;
        last_suspects = suspects;
        let all_alarmed = leaks
            .values()
            .all(|s| s.alarmed_metric.is_some() && s.alarmed_suspects.is_some());
        if (all_alarmed && now >= MIN_RUN) || now >= ALARM_DEADLINE {
            break;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    let ran = started.elapsed();

    // The suspects still listed at the end: every must-alarm container with its site...
    let mut failures = Vec::new();
    for ((container, function), seen) in &leaks {
        if seen.alarmed_metric.is_none() {
            failures.push(format!(
                "{container}: memtrace_leak_suspicion of the {function} stack never reached {THRESHOLD} \
                 in {ran:?} (highest: {})",
                seen.max_suspicion
                    .map_or("no series with that site".to_owned(), |v| v.to_string())
            ));
        }
        if seen.alarmed_suspects.is_none() {
            failures.push(format!(
                "{container}: never listed in /api/v1/suspects with a site of {function} in {ran:?}"
            ));
        }
        if !last_suspects
            .iter()
            .any(|s| s.container == *container && site_is(&s.site, function))
            && seen.alarmed_suspects.is_some()
        {
            failures.push(format!(
                "{container}: the {function} stack left /api/v1/suspects although it still leaks"
            ));
        }
    }
    // ...and none of the others, ever.
    for (container, seen) in &calm {
        if let Some((value, site, at)) = &seen.max_suspicion
            && *value >= THRESHOLD
        {
            failures.push(format!(
                "{container} (must not alarm): memtrace_leak_suspicion {value} >= {THRESHOLD} \
                 for site {site:?} at {at:?}"
            ));
        }
        if let Some((site, score, at)) = &seen.listed {
            failures.push(format!(
                "{container} (must not alarm): listed in /api/v1/suspects at {at:?} (site {site:?}, score {score})"
            ));
        }
    }

    if !failures.is_empty() {
        let mut report = String::new();
        let _ = writeln!(report, "after {ran:?} of allocations:");
        for f in &failures {
            let _ = writeln!(report, "  - {f}");
        }
        let _ = writeln!(report, "seen (leaks): {leaks:#?}");
        let _ = writeln!(report, "seen (must not alarm): {calm:#?}");
        let _ = writeln!(report, "--- last suspicion series ---");
        for s in last_scrape.series("memtrace_leak_suspicion", &[]) {
            let growth = last_scrape
                .value(
                    "memtrace_leak_growth_bytes_per_second",
                    &[
                        ("container", s.label("container")),
                        ("stack_id", s.label("stack_id")),
                    ],
                )
                .unwrap_or(f64::NAN);
            let _ = writeln!(
                report,
                "  {:<40} {:<45} suspicion {:.3} growth {:.0} B/s",
                s.label("container"),
                s.label("site"),
                s.value,
                growth
            );
        }
        let _ = writeln!(report, "--- outstanding bytes ---");
        for s in last_scrape.series("memtrace_outstanding_bytes", &[]) {
            let _ = writeln!(report, "  {:<40} {}", s.label("container"), s.value);
        }
        let _ = writeln!(report, "--- last suspects ---");
        for s in &last_suspects {
            let _ = writeln!(
                report,
                "  {} {} score {:.3} growth {:.0} B/s outstanding {} in {} mean age {:?}",
                s.container,
                s.site,
                s.score,
                s.growth_bytes_per_second,
                s.outstanding_bytes,
                s.outstanding_allocations,
                s.mean_age_seconds
            );
        }
        let _ = writeln!(report, "--- agent stderr ---\n{}", agent.stderr());
        panic!("{report}");
    }

    // The per-container counts agree.
    for (shape, cg) in SHAPES.iter().zip(&groups) {
        let labels = [("container", cg.label.as_str())];
        let suspects = last_scrape.value("memtrace_leak_suspects", &labels);
        let events = last_scrape.value("memtrace_leak_events_total", &labels);
        if shape.leaks.is_empty() {
            assert!(
                suspects.unwrap_or(0.0) == 0.0 && events.unwrap_or(0.0) == 0.0,
                "{} (must not alarm): memtrace_leak_suspects {suspects:?}, memtrace_leak_events_total {events:?}",
                cg.label
            );
        } else {
            let n = shape.leaks.len() as f64;
            assert!(
                suspects.is_some_and(|v| v >= n) && events.is_some_and(|v| v >= n),
                "{} leaks from {:?}: memtrace_leak_suspects {suspects:?}, memtrace_leak_events_total {events:?}",
                cg.label,
                shape.leaks
            );
        }
    }
    // Growth estimates of the 2048 B / 20 ms leaks: about 100 KiB/s (a little less: the
    // fixture sleeps 20 ms between leaks, plus its own time).
    for (mode, function) in [("steady", "steady_leak"), ("late", "late_leak")] {
        let container = groups[SHAPES.iter().position(|s| s.mode == mode).unwrap()]
            .label
            .as_str();
        let growth: Vec<f64> = last_scrape
            .series(
                "memtrace_leak_growth_bytes_per_second",
                &[("container", container)],
            )
            .filter(|s| site_is(s.label("site"), function))
            .map(|s| s.value)
            .collect();
        assert!(
            growth.len() == 1 && (0.6 * 102400.0..=1.1 * 102400.0).contains(&growth[0]),
            "{container}: memtrace_leak_growth_bytes_per_second of {function} is {growth:?}, expected about 100 KiB/s"
        );
    }

    eprintln!("agent_detects_shapes: after {ran:?}\nleaks: {leaks:#?}\nmust not alarm: {calm:#?}");

    // The suspects' numbers are those of a leak: growing, positive, ageing.
    for s in last_suspects.iter() {
        assert!(
            s.growth_bytes_per_second > 0.0 && s.outstanding_bytes > 0 && s.score >= THRESHOLD,
            "a suspect that does not look like one: {s:?}"
        );
        assert!(
            s.frames
                .first()
                .and_then(|f| f.function.as_deref())
                .is_some_and(|f| site_is(&s.site, f)),
            "suspect's site {:?} is not its innermost frame {:?}",
            s.site,
            s.frames.first()
        );
        assert!(
            s.namespace.is_empty() && s.pod.is_empty(),
            "not in Kubernetes: {s:?}"
        );
        assert!(!s.stack_id.is_empty());
        assert!(
            s.mean_age_seconds
                .is_some_and(|age| age > 0.0 && age <= ran.as_secs_f64() + 1.0),
            "suspect's mean age {:?} not within (0, {ran:?}]: {s:?}",
            s.mean_age_seconds
        );
        assert!(
            s.outstanding_allocations > 0,
            "a suspect without live allocations: {s:?}"
        );
    }
    drop(fixtures);
    drop(agent);
}
