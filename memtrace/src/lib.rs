//! memtrace: an eBPF memory-leak detector.
//!
//! `tracer` loads the BPF programs (memtrace-ebpf) and reads their maps; `process` and
//! `elf` read what the kernel and the target's files say; `placement` decides where each
//! probe sits; `symbolize` and `report` turn addresses into stacks users can read; `top`
//! and `launch` make the `memtrace top` command.
pub mod agent;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod detect;
pub mod elf;
pub mod features;
pub mod http;
pub mod launch;
pub mod metrics;
pub mod placement;
pub mod preflight;
pub mod process;
pub mod profile;
pub mod report;
pub mod symbolize;
pub mod top;
pub mod tracer;
