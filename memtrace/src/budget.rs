//! The CPU budget of the exact tier: a traced process pays a trap per allocator call, so
//! the agent estimates what the probes cost each process (calls counted in BPF × the
//! per-call cost from [`crate::calibrate`]) against the CPU time the process used, and
//! lets go of a process that goes over `--max-overhead`.
use std::{
    collections::{HashMap, HashSet},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    agent::labels_of,
    calibrate::{self, Calibration, TrapCost},
    metrics::{ContainerLabels, Metrics},
    tracer::Snapshot,
};

/// A process's ratio is judged only once it has used this much CPU since the last
/// judgement: the kernel counts CPU time in ticks (10 ms), and a quiet process is never
/// judged on noise.
const MIN_CPU_NS: f64 = 200_000_000.0;

/// What the budget needs to know of one traced process at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Allocations counted so far (exact).
    pub allocations: u64,
    /// Live blocks now (allocations − frees, exact).
    pub outstanding: i64,
    /// CPU time used so far (user + system), in ns.
    pub cpu_ns: f64,
    /// Mean depth of its allocations' stacks (frames the probe walks).
    pub stack_depth: f64,
}

/// The outcome of one judgement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Not enough CPU used since the last judgement to say.
    Pending,
    /// The share of the process's CPU time its probes cost (0 to 1).
    Within(f64),
    Over(f64),
}

pub struct Budget {
    max_ratio: f64,
    cost: TrapCost,
    since: HashMap<u32, Usage>,
}

impl Budget {
    /// `max_percent`: the most a traced process may pay, in percent of its own CPU time.
    pub fn new(max_percent: f64, cost: TrapCost) -> Self {
        Self {
            max_ratio: max_percent / 100.0,
            cost,
            since: HashMap::new(),
        }
    }

    /// Judges process `pid` from its usage now.
    pub fn judge(&mut self, pid: u32, now: Usage) -> Verdict {
        let Some(&since) = self.since.get(&pid) else {
            self.since.insert(pid, now);
            return Verdict::Pending;
        };
        let cpu = now.cpu_ns - since.cpu_ns;
        if cpu < MIN_CPU_NS {
            return Verdict::Pending;
        }
        let allocations = now.allocations.saturating_sub(since.allocations);
        // Every allocation not still live was freed.
        let frees = (allocations as i64 - (now.outstanding - since.outstanding)).max(0) as u64;
        let cost = self.cost.cost_ns(allocations, frees, now.stack_depth);
        // The probes' time is part of the CPU time the kernel counted: the ratio is the
        // share of the process's CPU spent in them (an estimate: capped at all of it).
        let ratio = (cost / cpu).min(1.0);
        self.since.insert(pid, now);
        if ratio > self.max_ratio {
            Verdict::Over(ratio)
        } else {
            Verdict::Within(ratio)
        }
    }

    /// Forgets a process (detached or gone).
    pub fn forget(&mut self, pid: u32) {
        self.since.remove(&pid);
    }
}

/// The budget as the agent runs it: calibrated in the background at start (attaching and
/// detaching takes seconds; nobody is judged until the figures are in), then every traced
/// process judged each interval; those over it are let go for `retry`.
pub struct Enforcer {
    max_percent: f64,
    retry: Duration,
    /// The probes' calibrated cost, while it is being measured.
    calibration: Option<mpsc::Receiver<Result<Calibration>>>,
    /// Once calibrated (never with `--max-overhead 0`).
    budget: Option<Budget>,
    /// Processes detached for their budget, and when they may be traced again.
    detached: HashMap<u32, Instant>,
    /// Containers with a published `memtrace_overhead_ratio`, removed once no process of
    /// theirs has probes (a stale ratio would alert forever).
    published: HashMap<u64, ContainerLabels>,
}

impl Enforcer {
    /// `max_percent` 0 turns the budget off.
    pub fn start(max_percent: f64, sample_bytes: u64, retry: Duration) -> Self {
        let calibration = (max_percent > 0.0).then(|| {
            let (send, receive) = mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("memtrace-calibrate".into())
                .spawn({
                    let send = send.clone();
                    move || {
                        let _ = send.send(calibrate::measure(sample_bytes));
                    }
                });
            if let Err(e) = spawned {
                let _ = send.send(Err(anyhow::anyhow!("cannot start calibrating ({e})")));
            }
            receive
        });
        Self {
            max_percent,
            retry,
            calibration,
            budget: None,
            detached: HashMap::new(),
            published: HashMap::new(),
        }
    }

    /// Whether `pid` was detached for its budget and may not be traced yet.
    pub fn is_detached(&self, pid: u32) -> bool {
        self.detached.contains_key(&pid)
    }

    /// Lets detached processes be traced again once their time is up (or forgets them
    /// when no longer `wanted`).
    pub fn expire(&mut self, now: Instant, wanted: impl Fn(u32) -> bool) {
        self.detached
            .retain(|pid, until| now < *until && wanted(*pid));
    }

    /// Forgets a process that is gone.
    pub fn forget(&mut self, pid: u32) {
        if let Some(budget) = &mut self.budget {
            budget.forget(pid);
        }
    }

    /// Judges the `traced` processes (pid, cgroup id) from this interval's `snapshot`,
    /// publishes each container's worst ratio, and returns the processes over budget
    /// (counted, logged, and remembered as detached until `retry` has passed): the caller
    /// detaches them.
    pub fn judge(
        &mut self,
        snapshot: &Snapshot,
        traced: &[(u32, u64)],
        labels: &HashMap<u64, ContainerLabels>,
        metrics: &Metrics,
    ) -> Vec<u32> {
        self.receive_calibration(metrics);
        let Some(budget) = &mut self.budget else {
            return Vec::new();
        };
        let mut by_process: HashMap<u32, (u64, i64)> = HashMap::new();
        for (key, totals) in &snapshot.totals {
            let entry = by_process.entry(key.tgid).or_default();
            entry.0 += totals.allocations;
            entry.1 += totals.outstanding_count;
        }
        // Each process's mean stack depth, weighted by the allocations of each stack: the
        // probe walks every frame (Python frames too), and deep stacks cost more.
        let mut depths: HashMap<u32, (f64, f64)> = HashMap::new();
        for stack in &snapshot.stacks {
            let weight = stack.usage.allocated_count as f64;
            let entry = depths.entry(stack.key.tgid).or_default();
            entry.0 += weight * (stack.frames.len() + stack.python.len()) as f64;
            entry.1 += weight;
        }
        let mut worst: HashMap<u64, f64> = HashMap::new();
        let mut over = Vec::new();
        for &(pid, cgroup_id) in traced {
            let (allocations, outstanding) = by_process.get(&pid).copied().unwrap_or_default();
            let Some(cpu_ns) = cpu_ns(pid) else {
                continue; // Gone: the next discovery lets it go.
            };
            let stack_depth = depths
                .get(&pid)
                .filter(|(_, weight)| *weight > 0.0)
                .map_or(0.0, |(sum, weight)| sum / weight);
            let usage = Usage {
                allocations,
                outstanding,
                cpu_ns,
                stack_depth,
            };
            let ratio = match budget.judge(pid, usage) {
                Verdict::Pending => continue,
                Verdict::Within(ratio) => ratio,
                Verdict::Over(ratio) => {
                    over.push((pid, cgroup_id, ratio));
                    ratio
                }
            };
            let worst = worst.entry(cgroup_id).or_default();
            *worst = worst.max(ratio);
        }
        for (cgroup_id, ratio) in worst {
            let labels = labels_of(labels, cgroup_id);
            metrics
                .overhead_ratio
                .with_label_values(&labels.values())
                .set(ratio);
            self.published.insert(cgroup_id, labels);
        }
        let retry_at = Instant::now() + self.retry;
        let mut detach = Vec::new();
        for (pid, cgroup_id, ratio) in over {
            let labels = labels_of(labels, cgroup_id);
            log::warn!(
                "pid {pid} ({}): the probes cost ~{:.1}% of its CPU, over the budget of {}%: \
                 detached for {:?}",
                labels.container,
                ratio * 100.0,
                self.max_percent,
                self.retry
            );
            metrics
                .budget_detaches
                .with_label_values(&labels.values())
                .inc();
            budget.forget(pid);
            self.detached.insert(pid, retry_at);
            detach.push(pid);
        }
        detach
    }

    /// Removes the ratios of containers none of whose processes is `probed` any more.
    pub fn retire_ratios(&mut self, probed: &HashSet<u64>, metrics: &Metrics) {
        self.published.retain(|cgroup_id, labels| {
            let keep = probed.contains(cgroup_id);
            if !keep {
                let _ = metrics.overhead_ratio.remove_label_values(&labels.values());
            }
            keep
        });
    }

    /// Takes the calibration's figures once they are in (or the fallback if it failed).
    fn receive_calibration(&mut self, metrics: &Metrics) {
        let Some(receive) = &self.calibration else {
            return;
        };
        let Ok(measured) = receive.try_recv() else {
            return;
        };
        self.calibration = None;
        let cost = measured.map(|c| c.cost).unwrap_or_else(|e| {
            log::warn!(
                "calibrating the probes' cost failed ({e:#}); the CPU budget assumes {:?}",
                TrapCost::FALLBACK
            );
            TrapCost::FALLBACK
        });
        log::info!(
            "probe cost per call: malloc {:.2} µs (+{:.3} µs per stack frame), free {:.2} µs; \
             budget {}% of a process's CPU",
            cost.alloc_ns / 1000.0,
            cost.alloc_frame_ns / 1000.0,
            cost.free_ns / 1000.0,
            self.max_percent
        );
        for (call, ns) in [
            ("alloc", cost.alloc_ns),
            ("free", cost.free_ns),
            ("alloc_per_frame", cost.alloc_frame_ns),
        ] {
            metrics
                .probe_cost_seconds
                .with_label_values(&[call])
                .set(ns / 1e9);
        }
        self.budget = Some(Budget::new(self.max_percent, cost));
    }
}

/// CPU time used by process `pid` so far (user + system), in ns.
pub fn cpu_ns(pid: u32) -> Option<f64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    Some((stat.utime + stat.stime) as f64 / ticks * 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COST: TrapCost = TrapCost {
        alloc_ns: 2000.0,
        free_ns: 1000.0,
        alloc_frame_ns: 0.0,
    };

    fn usage(allocations: u64, outstanding: i64, cpu_s: f64) -> Usage {
        Usage {
            allocations,
            outstanding,
            cpu_ns: cpu_s * 1e9,
            stack_depth: 0.0,
        }
    }

    #[test]
    fn a_hot_allocator_goes_over_and_a_quiet_one_stays() {
        let mut budget = Budget::new(1.0, COST);
        assert_eq!(budget.judge(1, usage(0, 0, 0.0)), Verdict::Pending);
        // 100k pairs in 1 s of CPU: 0.3 s of it in probes.
        match budget.judge(1, usage(100_000, 0, 1.0)) {
            Verdict::Over(ratio) => assert!((ratio - 0.3).abs() < 1e-9, "{ratio}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(budget.judge(2, usage(0, 0, 0.0)), Verdict::Pending);
        // 10 leaks in 1 s: 20 µs of probes.
        match budget.judge(2, usage(10, 10, 1.0)) {
            Verdict::Within(ratio) => assert!(ratio < 0.001, "{ratio}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deep_stacks_cost_more() {
        let cost = TrapCost {
            alloc_frame_ns: 100.0,
            ..COST
        };
        let mut budget = Budget::new(100.0, cost);
        budget.judge(1, usage(0, 0, 0.0));
        // 10k leaks in 1 s of CPU, 30 frames deep: 10k x (2 µs + 3 µs).
        let deep = Usage {
            stack_depth: 30.0,
            ..usage(10_000, 10_000, 1.0)
        };
        match budget.judge(1, deep) {
            Verdict::Within(ratio) => assert!((ratio - 0.05).abs() < 1e-9, "{ratio}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn too_little_cpu_is_not_judged() {
        let mut budget = Budget::new(1.0, COST);
        budget.judge(1, usage(0, 0, 0.0));
        assert_eq!(budget.judge(1, usage(1000, 0, 0.05)), Verdict::Pending);
    }

    #[test]
    fn ratio_stays_finite_when_probes_take_all_the_cpu() {
        let mut budget = Budget::new(1.0, COST);
        budget.judge(1, usage(0, 0, 0.0));
        match budget.judge(1, usage(1_000_000, 0, 1.0)) {
            Verdict::Over(ratio) => assert_eq!(ratio, 1.0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(cpu_ns(std::process::id()).is_some());
    }
}
