//! memtrace: an eBPF memory-leak detector.
//!
//! `tracer` loads the BPF programs (memtrace-ebpf) and reads their maps; `process` and
//! `elf` read what the kernel and the target's files say; `placement` decides where each
//! probe sits; `symbolize` and `report` turn addresses into stacks users can read; `top`
//! and `launch` make the `memtrace top` command.
pub mod agent;
pub mod budget;
pub mod calibrate;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod container;
pub mod detect;
pub mod elf;
pub mod escalate;
pub mod features;
pub mod growth;
pub mod http;
pub mod hybrid;
pub mod k8s;
pub mod launch;
pub mod lifecycle;
pub mod mapped;
pub mod metrics;
pub mod perf_uprobe;
pub mod placement;
pub mod pods;
pub mod policy;
pub mod preflight;
pub mod process;
pub mod profile;
pub mod python;
pub mod report;
pub mod sweep;
pub mod symbolize;
pub mod top;
pub mod tracer;
pub mod watch;
