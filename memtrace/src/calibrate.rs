//! What one traced allocator call costs on this machine. memtrace's own allocator
//! programs (`malloc_enter` and the return probe, `free_enter`) are attached, for a
//! moment and to this process only, to two stand-in functions of memtrace's own binary
//! that start with a `push` as glibc's `malloc` and `free` (past its NULL check) do, and
//! the same calls are timed with and without them. The CPU budget turns probe hits into
//! CPU time with these figures (`memtrace calibrate` prints them; the agent measures them
//! at start).
//!
//! Not libc's own functions: another tracer's uprobes there (or the agent's own shared
//! ones) would already be paid in the untraced timing, and nobody else probes these.
//!
//! An allocation's cost grows with the depth of the stack the probe walks, so the stand-in
//! malloc is also called under [`DEEP`] frames of its own (with frame pointers, whatever
//! the compiler flags), and the difference gives the cost of each frame walked: the budget
//! charges each process for the depth of its own stacks.
use std::{arch::naked_asm, hint::black_box, time::Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    process::MemoryMap,
    tracer::{Tracer, TracerOptions},
};

/// Calls timed per measurement, and measurements per mode (the fastest one counts).
const CALLS: usize = 20_000;
const ROUNDS: usize = 5;
/// What the stand-in malloc adds to its argument to make a block address (never 0).
const FAKE_HEAP: usize = 0x1_0000;
/// Frames above the stand-in malloc in the deep measurement (the walk stops at 64).
pub const DEEP: usize = 32;

/// The extra cost of one traced call, in ns (traced minus untraced).
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct TrapCost {
    /// An allocation whose stack is a frame or two deep.
    pub alloc_ns: f64,
    pub free_ns: f64,
    /// What each further frame of an allocation's stack adds (the walk reads it).
    pub alloc_frame_ns: f64,
}

impl TrapCost {
    /// A conservative stand-in when calibration cannot run (the figures measured on the
    /// project's reference machine, rounded up).
    pub const FALLBACK: TrapCost = TrapCost {
        alloc_ns: 3000.0,
        free_ns: 1500.0,
        alloc_frame_ns: 60.0,
    };

    /// CPU time in ns that `allocations` and `frees` traced calls cost, the allocations'
    /// stacks being `depth` frames deep on average.
    pub fn cost_ns(&self, allocations: u64, frees: u64, depth: f64) -> f64 {
        allocations as f64 * (self.alloc_ns + self.alloc_frame_ns * depth)
            + frees as f64 * self.free_ns
    }
}

/// Untraced and traced per-call times, in ns.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Calibration {
    pub untraced_alloc_ns: f64,
    pub untraced_free_ns: f64,
    pub traced_alloc_ns: f64,
    pub traced_free_ns: f64,
    /// The same allocations made [`DEEP`] frames down.
    pub untraced_deep_alloc_ns: f64,
    pub traced_deep_alloc_ns: f64,
    pub cost: TrapCost,
}

/// A stand-in `malloc`: returns a distinct fake block per distinct argument. Starts with
/// `push`, an instruction the kernel emulates under a uprobe, like glibc's `malloc`.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn memtrace_calibration_malloc(token: usize) -> usize {
    naked_asm!(
        "push rbp",
        "mov rbp, rsp",
        "lea rax, [rdi + {heap}]",
        "pop rbp",
        "ret",
        heap = const FAKE_HEAP,
    )
}

/// A stand-in `free`, starting with `push` like glibc's `free` where memtrace probes it.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn memtrace_calibration_free(block: usize) {
    naked_asm!("push rbp", "mov rbp, rsp", "pop rbp", "ret")
}

/// Calls the stand-in malloc with `token` under `depth` frames of its own, each with a
/// frame pointer, as an application's stack would have them.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn memtrace_calibration_nest(depth: usize, token: usize) -> usize {
    naked_asm!(
        "push rbp",
        "mov rbp, rsp",
        "test rdi, rdi",
        "jz 2f",
        "dec rdi",
        "call {nest}",
        "pop rbp",
        "ret",
        "2:",
        "mov rdi, rsi",
        "call {malloc}",
        "pop rbp",
        "ret",
        nest = sym memtrace_calibration_nest,
        malloc = sym memtrace_calibration_malloc,
    )
}

/// Measures the cost of memtrace's exact-tier probes at `sample_bytes` (sampled-out
/// blocks skip the stack walk: cheaper).
pub fn measure(sample_bytes: u64) -> Result<Calibration> {
    let pid = std::process::id();
    let map = MemoryMap::read(pid)?;
    let locate = |address: usize| {
        map.to_file_offset(address as u64)
            .map(|(mapping, offset)| (mapping.path.clone(), offset))
            .context("memtrace's own code is not in its memory map")
    };
    let (binary, malloc_at) = locate(memtrace_calibration_malloc as *const () as usize)?;
    let (_, free_at) = locate(memtrace_calibration_free as *const () as usize)?;
    let (untraced_alloc_ns, untraced_free_ns) = time_calls(0);
    let (untraced_deep_alloc_ns, _) = time_calls(DEEP);
    // Attached from another thread while this one makes no call, so no call is caught
    // between its entry and return probes.
    let tracer = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Tracer> {
                let mut tracer = Tracer::load(&TracerOptions {
                    sample_bytes,
                    ..TracerOptions::default()
                })?;
                tracer.attach_at("malloc_enter", Some("alloc_exit"), &binary, malloc_at, pid)?;
                tracer.attach_at("free_enter", None, &binary, free_at, pid)?;
                Ok(tracer)
            })
            .join()
            .expect("the attaching thread does not panic")
    })
    .context("attaching memtrace's probes to its own stand-in allocator")?;
    let (traced_alloc_ns, traced_free_ns) = time_calls(0);
    let (traced_deep_alloc_ns, _) = time_calls(DEEP);
    drop(tracer);
    let alloc_ns = (traced_alloc_ns - untraced_alloc_ns).max(0.0);
    let deep_alloc_ns = (traced_deep_alloc_ns - untraced_deep_alloc_ns).max(0.0);
    Ok(Calibration {
        untraced_alloc_ns,
        untraced_free_ns,
        traced_alloc_ns,
        traced_free_ns,
        untraced_deep_alloc_ns,
        traced_deep_alloc_ns,
        cost: TrapCost {
            alloc_ns,
            free_ns: (traced_free_ns - untraced_free_ns).max(0.0),
            alloc_frame_ns: ((deep_alloc_ns - alloc_ns) / DEEP as f64).max(0.0),
        },
    })
}

/// The fastest of `ROUNDS` timings of `CALLS` stand-in mallocs (distinct blocks, all
/// live at once, as memtrace then keeps them) made `depth` frames down, then of their
/// frees, per call.
fn time_calls(depth: usize) -> (f64, f64) {
    let mut blocks: Vec<usize> = Vec::with_capacity(CALLS);
    let (mut alloc, mut free) = (f64::MAX, f64::MAX);
    for round in 0..ROUNDS {
        let started = Instant::now();
        for i in 0..CALLS {
            let token = black_box(round * CALLS + i);
            blocks.push(if depth == 0 {
                memtrace_calibration_malloc(token)
            } else {
                memtrace_calibration_nest(depth, token)
            });
        }
        alloc = alloc.min(started.elapsed().as_nanos() as f64 / CALLS as f64);
        let started = Instant::now();
        for block in blocks.drain(..) {
            memtrace_calibration_free(black_box(block));
        }
        free = free.min(started.elapsed().as_nanos() as f64 / CALLS as f64);
    }
    (alloc, free)
}

/// `memtrace calibrate`: prints the figures.
pub fn run(json: bool, sample_bytes: u64) -> Result<std::process::ExitCode> {
    crate::preflight::check(std::path::Path::new("/sys"))?;
    let calibration = measure(sample_bytes)?;
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
            "malloc {DEEP:>2}↓  {:>8.3} µs {:>7.3} µs {:>8.3} µs  ({:.3} µs per frame walked)",
            calibration.untraced_deep_alloc_ns / 1000.0,
            calibration.traced_deep_alloc_ns / 1000.0,
            (calibration.traced_deep_alloc_ns - calibration.untraced_deep_alloc_ns) / 1000.0,
            calibration.cost.alloc_frame_ns / 1000.0
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
            alloc_frame_ns: 50.0,
        };
        assert_eq!(cost.cost_ns(3, 2, 0.0), 8000.0);
        assert_eq!(cost.cost_ns(3, 2, 10.0), 8000.0 + 3.0 * 500.0);
    }

    #[test]
    fn the_nest_adds_frames_and_returns_the_block() {
        // Untraced, the nest is just calls: the block is the stand-in's, at any depth.
        assert_eq!(memtrace_calibration_nest(0, 5), 5 + FAKE_HEAP);
        assert_eq!(memtrace_calibration_nest(DEEP, 7), 7 + FAKE_HEAP);
    }
}
