//! The agent's Prometheus metrics. Names and labels are part of memtrace's interface
//! (dashboards and alert rules depend on them): change them only with a migration note.
use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Labels of everything per container.
pub const CONTAINER_LABELS: [&str; 3] = ["namespace", "pod", "container"];
/// Labels of per-stack suspicion series.
pub const STACK_LABELS: [&str; 5] = ["namespace", "pod", "container", "stack_id", "site"];

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ContainerLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl ContainerLabels {
    pub fn values(&self) -> [&str; 3] {
        [&self.namespace, &self.pod, &self.container]
    }

    pub fn with_stack<'a>(&'a self, stack_id: &'a str, site: &'a str) -> [&'a str; 5] {
        [&self.namespace, &self.pod, &self.container, stack_id, site]
    }
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub outstanding_bytes: IntGaugeVec,
    pub allocated_bytes: IntCounterVec,
    pub freed_bytes: IntCounterVec,
    pub leak_suspicion: GaugeVec,
    pub leak_growth: GaugeVec,
    pub leak_suspects: IntGaugeVec,
    pub leak_events: IntCounterVec,
    pub dropped_events: IntCounterVec,
    pub map_entries: IntGaugeVec,
    pub traced_processes: IntGauge,
    pub attached_probes: IntGauge,
    pub attach_errors: IntCounter,
    pub untraced_probe_hits: IntCounter,
    pub evicted_stacks: IntCounter,
    pub tick_seconds: Gauge,
    pub overhead_ratio: GaugeVec,
    pub budget_detaches: IntCounterVec,
    pub probe_cost_seconds: GaugeVec,
    pub anon_memory_bytes: IntGaugeVec,
    pub populated_bytes: IntCounterVec,
    pub escalated: IntGaugeVec,
    pub escalations: IntCounterVec,
    pub feature_available: IntGaugeVec,
    pub matching_cgroups: IntGauge,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
                let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let float_vec = |name: &str, help: &str| -> prometheus::Result<GaugeVec> {
            let metric = GaugeVec::new(Opts::new(name, help), &STACK_LABELS)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let metrics = Self {
            outstanding_bytes: gauge_vec(
                "memtrace_outstanding_bytes",
                "Bytes allocated and not yet freed by the traced processes of a container (exact).",
                &CONTAINER_LABELS,
            )?,
            allocated_bytes: counter_vec(
                "memtrace_allocated_bytes_total",
                "Bytes allocated by the traced processes of a container.",
                &CONTAINER_LABELS,
            )?,
            freed_bytes: counter_vec(
                "memtrace_freed_bytes_total",
                "Bytes freed by the traced processes of a container.",
                &CONTAINER_LABELS,
            )?,
            leak_suspicion: float_vec(
                "memtrace_leak_suspicion",
                "How strongly a stack's outstanding bytes look like a leak, 0 to 1 (top-K stacks per container).",
            )?,
            leak_growth: float_vec(
                "memtrace_leak_growth_bytes_per_second",
                "Robust (Theil-Sen) growth rate of a stack's outstanding bytes over the window.",
            )?,
            leak_suspects: gauge_vec(
                "memtrace_leak_suspects",
                "Stacks of a container whose suspicion is over the threshold.",
                &CONTAINER_LABELS,
            )?,
            leak_events: counter_vec(
                "memtrace_leak_events_total",
                "Times a stack of a container newly crossed the suspicion threshold.",
                &CONTAINER_LABELS,
            )?,
            dropped_events: counter_vec(
                "memtrace_dropped_events_total",
                "Allocation events memtrace could not account for, by reason.",
                &["reason"],
            )?,
            map_entries: gauge_vec(
                "memtrace_bpf_map_entries",
                "Entries in memtrace's BPF maps.",
                &["map"],
            )?,
            traced_processes: IntGauge::new(
                "memtrace_traced_processes",
                "Processes with probes attached.",
            )?,
            attached_probes: IntGauge::new(
                "memtrace_attached_probes",
                "Uprobes and uretprobes attached.",
            )?,
            attach_errors: IntCounter::new(
                "memtrace_attach_errors_total",
                "Failed attempts to attach to a process (retried every interval).",
            )?,
            untraced_probe_hits: IntCounter::new(
                "memtrace_untraced_probe_hits_total",
                "Allocator probe hits in processes memtrace does not trace: probes shared by \
                 the processes of one libc file (--probes always) also trap in the file's other \
                 users, a trap each (two for calls with a return probe).",
            )?,
            evicted_stacks: IntCounter::new(
                "memtrace_evicted_stacks_total",
                "Stack series dropped because a container had more than --max-stacks.",
            )?,
            tick_seconds: Gauge::new(
                "memtrace_tick_duration_seconds",
                "Time the last interval's work took.",
            )?,
            overhead_ratio: {
                let metric = GaugeVec::new(
                    Opts::new(
                        "memtrace_overhead_ratio",
                        "Estimated CPU the allocator probes cost a container's most taxed traced process, as a fraction of its own CPU.",
                    ),
                    &CONTAINER_LABELS,
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            budget_detaches: counter_vec(
                "memtrace_budget_detaches_total",
                "Processes detached because their probes cost more than --max-overhead.",
                &CONTAINER_LABELS,
            )?,
            probe_cost_seconds: {
                let metric = GaugeVec::new(
                    Opts::new(
                        "memtrace_probe_cost_seconds",
                        "Calibrated CPU cost of one traced allocator call, by call.",
                    ),
                    &["call"],
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            anon_memory_bytes: gauge_vec(
                "memtrace_anon_memory_bytes",
                "Anonymous resident memory of a watched container's processes (always-on tier).",
                &CONTAINER_LABELS,
            )?,
            populated_bytes: counter_vec(
                "memtrace_populated_bytes_total",
                "Bytes of the pages a watched container's processes populated by touching new memory (always-on tier).",
                &CONTAINER_LABELS,
            )?,
            escalated: gauge_vec(
                "memtrace_escalated",
                "1 while a container has allocator probes because its memory grows (--probes escalate).",
                &CONTAINER_LABELS,
            )?,
            escalations: counter_vec(
                "memtrace_escalations_total",
                "Windows of allocator probes a container got because its memory grew.",
                &CONTAINER_LABELS,
            )?,
            feature_available: gauge_vec(
                "memtrace_feature_available",
                "Whether the kernel offers a feature memtrace uses (1) or not (0); see `memtrace check`.",
                &["feature"],
            )?,
            matching_cgroups: IntGauge::new(
                "memtrace_matching_cgroups",
                "cgroups matching the --cgroup patterns at the last interval.",
            )?,
            registry,
        };
        for metric in [
            &metrics.traced_processes,
            &metrics.attached_probes,
            &metrics.matching_cgroups,
        ] {
            metrics.registry.register(Box::new(metric.clone()))?;
        }
        metrics
            .registry
            .register(Box::new(metrics.attach_errors.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.evicted_stacks.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.untraced_probe_hits.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.tick_seconds.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("memtrace_build_info", "memtrace's version, always 1."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics.registry.register(Box::new(build_info))?;
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    /// Removes the always-on tier's series of a container no longer watched.
    pub fn retire_watched(&self, labels: &ContainerLabels) {
        let values = labels.values();
        let _ = self.anon_memory_bytes.remove_label_values(&values);
        let _ = self.populated_bytes.remove_label_values(&values);
        let _ = self.escalated.remove_label_values(&values);
        let _ = self.escalations.remove_label_values(&values);
    }

    /// Forgets every series of a container that is gone.
    pub fn retire_container(&self, labels: &ContainerLabels) {
        let values = labels.values();
        let _ = self.outstanding_bytes.remove_label_values(&values);
        let _ = self.allocated_bytes.remove_label_values(&values);
        let _ = self.freed_bytes.remove_label_values(&values);
        let _ = self.leak_suspects.remove_label_values(&values);
        let _ = self.leak_events.remove_label_values(&values);
        let _ = self.overhead_ratio.remove_label_values(&values);
        // budget_detaches stays: a container whose processes were all detached for their
        // budget is exactly the one whose count must stay visible.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_fixed_names() {
        let metrics = Metrics::new().unwrap();
        let labels = ContainerLabels {
            container: "/a".into(),
            ..Default::default()
        };
        metrics
            .outstanding_bytes
            .with_label_values(&labels.values())
            .set(42);
        metrics
            .leak_suspicion
            .with_label_values(&labels.with_stack("00ff", "leak (a.c:1)"))
            .set(0.9);
        let text = metrics.render();
        assert!(
            text.contains(r#"memtrace_outstanding_bytes{container="/a",namespace="",pod=""} 42"#),
            "{text}"
        );
        assert!(text.contains("memtrace_leak_suspicion{"), "{text}");
        assert!(text.contains(r#"memtrace_build_info{version=""#), "{text}");
        metrics.retire_container(&labels);
        assert!(!metrics.render().contains("memtrace_outstanding_bytes{"));
    }
}
