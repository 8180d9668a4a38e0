//! End-to-end tests: run the real `memtrace` binary on small leaky C programs
//! (`fixtures/*.c`, compiled at test time) and check its JSON report.
//!
//! Needs root (eBPF), `cc`, and the memtrace binary (`$MEMTRACE_BIN`, else
//! `<workspace>/target/debug/memtrace`). Every memtrace run is bounded by
//! `util::RUN_TIMEOUT`; every process a test starts is killed when the test
//! ends, also when it panics. Tests take a global lock, so they run one at a
//! time whatever `--test-threads` says.

mod agent_util;
mod deploy_util;
mod pods_util;
mod prometheus;
mod python_util;
mod util;

mod agent_attach_errors;
mod agent_budget;
mod agent_env;
mod agent_escalate;
mod agent_follow;
mod agent_mapped;
mod agent_pprof;
mod agent_prometheus;
mod agent_shapes;
mod agent_signals;
mod attach_race;
mod deploy_capabilities;
mod deploy_dashboard;
mod deploy_manifests;
mod deploy_rules;
mod errors;
mod exact;
mod fault_churn;
mod fault_discovery;
mod fault_kill;
mod fault_maps;
mod growth;
mod isolation;
mod least_privilege;
mod mapped;
mod munmap;
mod nested;
mod pods_churn;
mod pods_escalate;
mod pods_faults;
mod pods_hybrid;
mod pods_labels;
mod pods_libc;
mod python_agent;
mod python_always_on;
mod python_budget;
mod python_django;
mod python_extension;
mod python_frames;
mod realloc;
mod sampling;
mod threads;
mod unmatched;
