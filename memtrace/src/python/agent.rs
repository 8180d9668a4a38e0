//! The agent's Python metrics: garbage collections per generation and their durations
//! (a histogram whose buckets the BPF side fills), and live objects in exact mode.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use memtrace_common::python::{GC_BUCKETS, GC_FIRST_BUCKET_NS, GcStats, PyCounter};
use prometheus::{
    IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto,
};

use crate::{
    metrics::{CONTAINER_LABELS, ContainerLabels},
    tracer::PythonStats,
};

/// Collection durations per (container, generation), cumulative, in the BPF buckets.
#[derive(Clone, Default)]
struct Durations {
    count: u64,
    sum_ns: u64,
    buckets: [u64; GC_BUCKETS],
}

/// `memtrace_python_gc_duration_seconds`: a histogram exported from counts the BPF side
/// already bucketed (prometheus' own histogram only takes one observation at a time).
#[derive(Clone, Default)]
struct DurationHistogram {
    series: Arc<Mutex<BTreeMap<(ContainerLabels, u32), Durations>>>,
}

const DURATION_NAME: &str = "memtrace_python_gc_duration_seconds";
const DURATION_HELP: &str = "Time CPython's garbage collector took per collection, by generation.";

impl Collector for DurationHistogram {
    fn desc(&self) -> Vec<&Desc> {
        Vec::new() // unchecked collector: its series come and go with containers
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut family = proto::MetricFamily::default();
        family.set_name(DURATION_NAME.into());
        family.set_help(DURATION_HELP.into());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        let mut metrics = Vec::new();
        for ((labels, generation), d) in series.iter() {
            let mut histogram = proto::Histogram::default();
            histogram.set_sample_count(d.count);
            histogram.set_sample_sum(d.sum_ns as f64 / 1e9);
            let mut cumulative = 0;
            let mut buckets = Vec::new();
            for (i, n) in d.buckets.iter().enumerate() {
                cumulative += n;
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound((GC_FIRST_BUCKET_NS << i) as f64 / 1e9);
                bucket.set_cumulative_count(cumulative);
                buckets.push(bucket);
            }
            histogram.set_bucket(buckets);
            let mut metric = proto::Metric::default();
            let values = labels.values();
            let generation = generation.to_string();
            let pairs = CONTAINER_LABELS
                .iter()
                .zip(values)
                .map(|(name, value)| (*name, value))
                .chain([("generation", generation.as_str())])
                .map(|(name, value)| {
                    let mut pair = proto::LabelPair::default();
                    pair.set_name(name.into());
                    pair.set_value(value.into());
                    pair
                })
                .collect();
            metric.set_label(pairs);
            metric.set_histogram(histogram);
            metrics.push(metric);
        }
        if metrics.is_empty() {
            return Vec::new();
        }
        family.set_metric(metrics);
        vec![family]
    }
}

/// The Python metrics and what they were last time (BPF totals are per process and
/// cumulative: turned into counter increments here).
pub struct PythonMetrics {
    collections: IntCounterVec,
    live_objects: IntGaugeVec,
    durations: DurationHistogram,
    last: HashMap<(u64, u32, u32), GcStats>,
    last_counters: [u64; PyCounter::COUNT as usize],
}

impl PythonMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let mut gc_labels = CONTAINER_LABELS.to_vec();
        gc_labels.push("generation");
        let collections = IntCounterVec::new(
            Opts::new(
                "memtrace_python_gc_collections_total",
                "Collections of CPython's garbage collector, by generation.",
            ),
            &gc_labels,
        )?;
        let live_objects = IntGaugeVec::new(
            Opts::new(
                "memtrace_python_live_objects",
                "Live blocks of CPython's object allocator allocated since tracing began \
                 (with --python exact only).",
            ),
            &CONTAINER_LABELS,
        )?;
        let durations = DurationHistogram::default();
        registry.register(Box::new(collections.clone()))?;
        registry.register(Box::new(live_objects.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        Ok(Self {
            collections,
            live_objects,
            durations,
            last: HashMap::new(),
            last_counters: Default::default(),
        })
    }

    /// Publishes `stats`, read this interval; `labels_of` names a cgroup's container.
    /// Lost Python frames (failed reads, cut chains, a full map) go to `dropped`
    /// (`memtrace_dropped_events_total{reason}`).
    pub fn publish(
        &mut self,
        stats: &PythonStats,
        labels_of: impl Fn(u64) -> ContainerLabels,
        dropped: &IntCounterVec,
    ) {
        for counter in PyCounter::ALL
            .into_iter()
            .filter(|c| *c != PyCounter::PoolRefills)
        {
            let value = stats.counters[counter as usize];
            let last = &mut self.last_counters[counter as usize];
            dropped
                .with_label_values(&[counter.name()])
                .inc_by(value.saturating_sub(*last));
            *last = value;
        }
        let mut durations = self
            .durations
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (key, now) in &stats.gc {
            let labels = labels_of(key.cgroup_id);
            let before = self
                .last
                .insert((key.cgroup_id, key.tgid, key.generation), *now)
                .unwrap_or_default();
            let generation = key.generation.to_string();
            let values = labels.values();
            self.collections
                .with_label_values(&[values[0], values[1], values[2], &generation])
                .inc_by(now.count.saturating_sub(before.count));
            let series = durations.entry((labels, key.generation)).or_default();
            series.count += now.count.saturating_sub(before.count);
            series.sum_ns += now.duration_ns_sum.saturating_sub(before.duration_ns_sum);
            for (total, (n, b)) in series
                .buckets
                .iter_mut()
                .zip(now.buckets.iter().zip(before.buckets.iter()))
            {
                *total += n.saturating_sub(*b);
            }
        }
        let mut live: HashMap<ContainerLabels, i64> = HashMap::new();
        for (key, objects) in &stats.live_objects {
            *live.entry(labels_of(key.cgroup_id)).or_default() += objects;
        }
        for (labels, objects) in live {
            self.live_objects
                .with_label_values(&labels.values())
                .set(objects.max(0));
        }
    }

    /// Drops what is kept about process `tgid` (gone).
    pub fn forget(&mut self, tgid: u32) {
        self.last.retain(|(_, pid, _), _| *pid != tgid);
    }
}
