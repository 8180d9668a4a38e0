//! The CPU budget of the exact tier: a traced process pays a trap per allocator call, so
//! the agent estimates what the probes cost each process (calls counted in BPF × the
//! per-call cost from [`crate::calibrate`]) against the CPU time the process used, and
//! lets go of a process that goes over `--max-overhead`.
use std::collections::HashMap;

use crate::calibrate::TrapCost;

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
