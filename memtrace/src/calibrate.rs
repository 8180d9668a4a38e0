//! What one traced allocator call costs on this machine: memtrace's probes are attached
//! to memtrace's own process for a moment, and the same `malloc`s and `free`s are timed
//! with and without them. The CPU budget turns probe hits into CPU time with these
//! figures (`memtrace calibrate` prints them; the agent measures them at start).
//!
//! memtrace allocates with mimalloc, so only the calls made here reach libc's allocator.
use std::{hint::black_box, time::Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    process::own_libc,
    tracer::{Tracer, TracerOptions},
};

/// Calls timed per measurement, and measurements per mode (the fastest one counts).
const CALLS: usize = 20_000;
const ROUNDS: usize = 3;
/// Block size of the timed calls: a small, tcache-served size, as most calls are.
const BLOCK: usize = 64;

/// The extra cost of one traced call, in ns (traced minus untraced).
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct TrapCost {
    pub alloc_ns: f64,
    pub free_ns: f64,
}

impl TrapCost {
    /// A conservative stand-in when calibration cannot run (the figures measured on the
    /// project's reference machine, rounded up).
    pub const FALLBACK: TrapCost = TrapCost {
        alloc_ns: 3000.0,
        free_ns: 1500.0,
    };

    /// CPU time in ns that `allocations` and `frees` traced calls cost.
    pub fn cost_ns(&self, allocations: u64, frees: u64) -> f64 {
        allocations as f64 * self.alloc_ns + frees as f64 * self.free_ns
    }
}

/// Untraced and traced per-call times, in ns.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Calibration {
    pub untraced_alloc_ns: f64,
    pub untraced_free_ns: f64,
    pub traced_alloc_ns: f64,
    pub traced_free_ns: f64,
    pub cost: TrapCost,
}

/// Measures the cost of memtrace's exact-tier probes on this process's libc.
pub fn measure() -> Result<Calibration> {
    let libc = own_libc()?;
    let (untraced_alloc_ns, untraced_free_ns) = time_calls();
    // Attached from another thread while this one makes no call, so no call is caught
    // between its entry and return probes.
    let tracer = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Tracer> {
                let mut tracer = Tracer::load(&TracerOptions::default())?;
                tracer.attach_libc(std::process::id(), &libc)?;
                Ok(tracer)
            })
            .join()
            .expect("the attaching thread does not panic")
    })
    .context("attaching memtrace's probes to itself to calibrate")?;
    let (traced_alloc_ns, traced_free_ns) = time_calls();
    drop(tracer);
    Ok(Calibration {
        untraced_alloc_ns,
        untraced_free_ns,
        traced_alloc_ns,
        traced_free_ns,
        cost: TrapCost {
            alloc_ns: (traced_alloc_ns - untraced_alloc_ns).max(0.0),
            free_ns: (traced_free_ns - untraced_free_ns).max(0.0),
        },
    })
}

/// The fastest of `ROUNDS` timings of `CALLS` mallocs, then of their frees, per call.
fn time_calls() -> (f64, f64) {
    let mut blocks: Vec<*mut libc::c_void> = Vec::with_capacity(CALLS);
    let (mut alloc, mut free) = (f64::MAX, f64::MAX);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for _ in 0..CALLS {
            // SAFETY: malloc with any size is sound; every block is freed below.
            blocks.push(unsafe { libc::malloc(black_box(BLOCK)) });
        }
        alloc = alloc.min(started.elapsed().as_nanos() as f64 / CALLS as f64);
        let started = Instant::now();
        for block in blocks.drain(..) {
            // SAFETY: each block came from malloc above and is freed once.
            unsafe { libc::free(black_box(block)) };
        }
        free = free.min(started.elapsed().as_nanos() as f64 / CALLS as f64);
    }
    (alloc, free)
}

/// `memtrace calibrate`: prints the figures.
pub fn run(json: bool) -> Result<std::process::ExitCode> {
    crate::preflight::check(std::path::Path::new("/sys"))?;
    let calibration = measure()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&calibration)?);
    } else {
        println!("per call       untraced    traced   cost of the probes");
        println!(
            "malloc      {:>8.3} µs {:>7.3} µs {:>8.3} µs",
            calibration.untraced_alloc_ns / 1000.0,
            calibration.traced_alloc_ns / 1000.0,
            calibration.cost.alloc_ns / 1000.0
        );
        println!(
            "free        {:>8.3} µs {:>7.3} µs {:>8.3} µs",
            calibration.untraced_free_ns / 1000.0,
            calibration.traced_free_ns / 1000.0,
            calibration.cost.free_ns / 1000.0
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_weighs_allocations_and_frees() {
        let cost = TrapCost {
            alloc_ns: 2000.0,
            free_ns: 1000.0,
        };
        assert_eq!(cost.cost_ns(3, 2), 8000.0);
    }
}
