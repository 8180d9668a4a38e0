//! `memtrace agent`: the long-lived node agent. Every interval it finds the processes to
//! trace (pids, and the processes of cgroups matching patterns), attaches to new ones,
//! lets go of gone ones, reads the maps, feeds one time series per (container, stack) to
//! the leak detector, and publishes metrics and suspects for the HTTP server.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, RwLock, mpsc},
    time::Instant,
};

use anyhow::{Context, Result};
use serde::Serialize;

use memtrace_common::UsageKey;

use crate::{
    cgroup::{self, Hierarchy, Patterns},
    cli::AgentArgs,
    detect::{Assessment, DetectorConfig, Point, Series},
    metrics::{ContainerLabels, Metrics},
    preflight, process,
    profile::ProfileSample,
    report::{self, Frame, Resolver},
    symbolize::Symbolizer,
    tracer::{Snapshot, Tracer, TracerOptions},
};

/// A suspect as `/api/v1/suspects` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Suspect {
    #[serde(flatten)]
    pub labels: ContainerLabels,
    pub stack_id: String,
    pub site: String,
    pub score: f64,
    pub growth_bytes_per_second: f64,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    /// Mean age of the stack's live allocations (memtrace keeps the mean in O(1) in BPF;
    /// for a leak it keeps growing).
    pub mean_age_seconds: Option<f64>,
    /// Age of the stack's oldest live allocation, from a scan of the live-block map made
    /// at most every minute while there are suspects (absent until the first scan).
    pub oldest_allocation_age_seconds: Option<f64>,
    pub frames: Vec<Frame>,
}

/// What the HTTP server reads; the agent replaces it every interval.
#[derive(Default)]
pub struct View {
    pub ready: bool,
    pub suspects: Vec<Suspect>,
    /// Outstanding memory per container (by container label), for pprof and flame graphs.
    pub profiles: BTreeMap<String, Vec<ProfileSample>>,
}

pub type SharedView = Arc<RwLock<View>>;

struct TracedProcess {
    resolver: Resolver,
    cgroup_id: u64,
    labels: ContainerLabels,
}

/// A process that could not be attached: retried with back-off.
struct Failure {
    retry_at: Instant,
    attempts: u32,
}

struct StackState {
    series: Series,
    assessment: Assessment,
    site: String,
    frames: Vec<Frame>,
    bytes: u64,
    count: u64,
    mean_age: Option<f64>,
    /// When its oldest live block was allocated (CLOCK_MONOTONIC ns), from the last scan.
    oldest_ns: Option<u64>,
    keys: Vec<UsageKey>,
    /// Whether its suspicion gauges are published (to remove them when it drops out).
    published: bool,
}

struct ContainerState {
    labels: ContainerLabels,
    stacks: HashMap<String, StackState>,
}

/// One interval's numbers of one (container, stack), summed over its processes.
#[derive(Default)]
struct StackSum {
    bytes: i64,
    count: i64,
    live_blocks: u64,
    live_time_ms_sum: u64,
    frames: Vec<Frame>,
    /// The BPF keys (process, stack, caller) merged into this stack.
    keys: Vec<UsageKey>,
}

pub struct Agent {
    args: AgentArgs,
    detector: DetectorConfig,
    tracer: Tracer,
    hierarchy: Option<Hierarchy>,
    patterns: Patterns,
    symbolizer: Symbolizer,
    processes: BTreeMap<u32, TracedProcess>,
    failures: HashMap<u32, Failure>,
    containers: HashMap<u64, ContainerState>,
    /// Last totals per (cgroup, process), to turn absolute BPF totals into counter deltas.
    last_totals: HashMap<(u64, u32), (u64, u64)>,
    last_counters: [u64; memtrace_common::Counter::COUNT as usize],
    metrics: Metrics,
    view: SharedView,
    started: Instant,
    next_oldest_scan: Option<Instant>,
    /// Said that no cgroup matches the patterns (said again after they match again).
    said_no_match: std::sync::atomic::AtomicBool,
}

/// How often, at most, the live-block map is scanned for the oldest block of suspects.
const OLDEST_SCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Agent {
    pub fn new(args: AgentArgs, metrics: Metrics, view: SharedView) -> Result<Self> {
        let tracer = Tracer::load(&TracerOptions {
            sample_bytes: args.sample_bytes,
            max_allocations: args.max_allocations,
            max_stacks: args.max_stack_traces,
            // Probes are shared by the traced processes of each libc file.
            filter_processes: true,
        })?;
        let patterns = Patterns::new(&args.cgroup)?;
        let hierarchy = match Hierarchy::find() {
            Ok(h) => Some(h),
            Err(e) if patterns.is_empty() => {
                log::warn!("{e:#}: container labels fall back to cgroup ids");
                None
            }
            Err(e) => return Err(e.context("--cgroup needs a cgroup v2 hierarchy")),
        };
        let detector = DetectorConfig {
            window: args.window,
            max_points: args.max_points,
            threshold: args.threshold,
        };
        Ok(Self {
            args,
            detector,
            tracer,
            hierarchy,
            patterns,
            symbolizer: Symbolizer::new(),
            processes: BTreeMap::new(),
            failures: HashMap::new(),
            containers: HashMap::new(),
            last_totals: HashMap::new(),
            last_counters: Default::default(),
            metrics,
            view,
            started: Instant::now(),
            next_oldest_scan: None,
            said_no_match: Default::default(),
        })
    }

    /// Runs until `stop` receives (or its sender is dropped), one tick per interval.
    pub fn run(&mut self, stop: mpsc::Receiver<()>) -> Result<()> {
        loop {
            let began = Instant::now();
            if let Err(e) = self.tick() {
                log::warn!("interval failed: {e:#}");
            }
            self.metrics.tick_seconds.set(began.elapsed().as_secs_f64());
            let wait = self.args.interval.saturating_sub(began.elapsed());
            match stop.recv_timeout(wait) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => break,
            }
        }
        self.tracer.finish_detaching();
        Ok(())
    }

    /// One interval: discover, read, detect, publish.
    pub fn tick(&mut self) -> Result<()> {
        self.discover();
        let tgids: HashSet<u32> = self.processes.keys().copied().collect();
        let snapshot = self.tracer.snapshot(&tgids)?;
        for traced in self.processes.values_mut() {
            traced
                .resolver
                .learn(&snapshot.stacks, &mut self.symbolizer);
        }
        let sums = self.sum_stacks(&snapshot);
        let labels = self.labels_by_cgroup();
        self.update_series(sums, &labels);
        self.publish(&snapshot, &labels);
        Ok(())
    }

    /// The processes that should be traced now, with their cgroup paths.
    fn wanted(&self) -> BTreeMap<u32, String> {
        let mut wanted = BTreeMap::new();
        for &pid in &self.args.pid {
            if process::exists(pid) {
                wanted.insert(pid, cgroup::of_process(pid).unwrap_or_default());
            }
        }
        if let Some(hierarchy) = &self.hierarchy
            && !self.patterns.is_empty()
        {
            let matching = hierarchy.matching(&self.patterns);
            self.metrics.matching_cgroups.set(matching.len() as i64);
            let none = matching.is_empty();
            if none
                != self
                    .said_no_match
                    .swap(none, std::sync::atomic::Ordering::Relaxed)
                && none
            {
                log::warn!(
                    "no cgroup under {} matches {:?}: nothing to trace there until one does",
                    hierarchy.dir("").display(),
                    self.patterns.sources
                );
            }
            for path in matching {
                // A process may leave (or the cgroup go) between the listing and the read.
                for pid in hierarchy.processes(&path).unwrap_or_default() {
                    wanted.insert(pid, path.clone());
                }
            }
        }
        // Never trace ourselves: our own allocations would feed our own maps.
        wanted.remove(&std::process::id());
        wanted
    }

    fn discover(&mut self) {
        let wanted = self.wanted();
        let gone: Vec<u32> = self
            .processes
            .keys()
            .copied()
            .filter(|pid| !wanted.contains_key(pid) || !process::exists(*pid))
            .collect();
        for pid in gone {
            self.processes.remove(&pid);
            self.tracer.untrace(pid);
            if let Err(e) = self.tracer.forget(pid) {
                log::warn!("freeing the map entries of pid {pid}: {e:#}");
            }
            self.last_totals.retain(|(_, tgid), _| *tgid != pid);
            log::info!("pid {pid} is gone: detached");
        }
        self.failures.retain(|pid, _| wanted.contains_key(pid));
        let now = Instant::now();
        for (pid, path) in wanted {
            if self.processes.contains_key(&pid)
                || self.failures.get(&pid).is_some_and(|f| now < f.retry_at)
            {
                continue;
            }
            match self.attach(pid, &path) {
                Ok(traced) => {
                    self.failures.remove(&pid);
                    log::info!("tracing pid {pid} ({})", traced.labels.container);
                    self.processes.insert(pid, traced);
                }
                Err(e) => {
                    self.tracer.untrace(pid);
                    self.metrics.attach_errors.inc();
                    let failure = self.failures.entry(pid).or_insert(Failure {
                        retry_at: now,
                        attempts: 0,
                    });
                    if failure.attempts == 0 {
                        log::warn!("cannot trace pid {pid}: {e:#} (will retry)");
                    }
                    failure.attempts += 1;
                    // Back off: 1, 2, 4 ... up to 64 intervals.
                    failure.retry_at = now + self.args.interval * (1 << failure.attempts.min(6));
                }
            }
        }
        self.metrics
            .traced_processes
            .set(self.processes.len() as i64);
        self.metrics
            .attached_probes
            .set(self.tracer.attached_probes() as i64);
    }

    fn attach(&mut self, pid: u32, cgroup_path: &str) -> Result<TracedProcess> {
        let libc = process::libc_of_running(pid)?;
        // Read the map before the first allocation we count can be made and freed.
        let mut resolver = Resolver::new(pid);
        resolver.refresh_map();
        let readable = process::in_root(pid, &libc.path)?;
        if !process::is_file(&readable, libc.file)
            .with_context(|| format!("reading {}", readable.display()))?
        {
            anyhow::bail!(
                "{} is not the libc pid {pid} maps (replaced since?): not attaching",
                readable.display()
            );
        }
        self.tracer.trace_shared(pid, &readable, libc.file)?;
        let cgroup_id = match &self.hierarchy {
            Some(h) => h
                .id(cgroup_path)
                .with_context(|| format!("cgroup of pid {pid}"))?,
            None => 0,
        };
        let labels = ContainerLabels {
            container: cgroup_path.to_owned(),
            ..Default::default()
        };
        Ok(TracedProcess {
            resolver,
            cgroup_id,
            labels,
        })
    }

    /// Labels per cgroup id, from the traced processes in each (read once per interval).
    fn labels_by_cgroup(&self) -> HashMap<u64, ContainerLabels> {
        self.processes
            .values()
            .map(|p| (p.cgroup_id, p.labels.clone()))
            .collect()
    }

    fn sum_stacks(&self, snapshot: &Snapshot) -> HashMap<(u64, String), StackSum> {
        let mut sums: HashMap<(u64, String), StackSum> = HashMap::new();
        for stack in &snapshot.stacks {
            let Some(traced) = self.processes.get(&stack.key.tgid) else {
                continue;
            };
            let (stack_id, frames) = traced.resolver.stack(stack, &self.symbolizer);
            let sum = sums.entry((stack.key.cgroup_id, stack_id)).or_default();
            sum.bytes += stack.usage.outstanding_bytes;
            sum.count += stack.usage.outstanding_count;
            sum.live_blocks += stack.usage.live_blocks;
            sum.live_time_ms_sum += stack.usage.live_time_ms_sum;
            sum.keys.push(stack.key);
            if sum.frames.is_empty() {
                sum.frames = frames;
            }
        }
        sums
    }

    fn update_series(
        &mut self,
        sums: HashMap<(u64, String), StackSum>,
        labels: &HashMap<u64, ContainerLabels>,
    ) {
        let t = self.started.elapsed().as_secs_f64();
        let now_ms = monotonic_ms();
        let mut seen: HashSet<(u64, String)> = HashSet::new();
        for ((cgroup_id, stack_id), sum) in sums {
            seen.insert((cgroup_id, stack_id.clone()));
            let container = self
                .containers
                .entry(cgroup_id)
                .or_insert_with(|| ContainerState {
                    labels: labels_of(labels, cgroup_id),
                    stacks: HashMap::new(),
                });
            let bytes = sum.bytes.max(0) as u64;
            if !container.stacks.contains_key(&stack_id)
                && !make_room(container, bytes, self.args.max_stacks, &self.metrics)
            {
                continue;
            }
            let mean_age = (sum.live_blocks > 0)
                .then(|| (now_ms - sum.live_time_ms_sum as f64 / sum.live_blocks as f64) / 1000.0);
            let state = container
                .stacks
                .entry(stack_id)
                .or_insert_with(|| StackState {
                    series: Series::new(),
                    assessment: Assessment::default(),
                    site: sum
                        .frames
                        .first()
                        .map(Frame::site)
                        .unwrap_or_else(|| "[no stack]".into()),
                    frames: sum.frames.clone(),
                    bytes: 0,
                    count: 0,
                    mean_age: None,
                    oldest_ns: None,
                    keys: Vec::new(),
                    published: false,
                });
            state.bytes = bytes;
            state.count = report::scaled_count(sum.count);
            state.mean_age = mean_age;
            state.keys = sum.keys;
            state.series.push(
                Point {
                    t,
                    bytes: bytes as f64,
                    mean_age,
                },
                &self.detector,
            );
        }
        // Stacks whose processes are gone: retire their series.
        for (cgroup_id, container) in &mut self.containers {
            container.stacks.retain(|stack_id, state| {
                let keep = seen.contains(&(*cgroup_id, stack_id.clone()));
                if !keep && state.published {
                    let values = container.labels.with_stack(stack_id, &state.site);
                    let _ = self.metrics.leak_suspicion.remove_label_values(&values);
                    let _ = self.metrics.leak_growth.remove_label_values(&values);
                }
                keep
            });
        }
        let metrics = &self.metrics;
        self.containers.retain(|_, container| {
            let keep = !container.stacks.is_empty();
            if !keep {
                metrics.retire_container(&container.labels);
            }
            keep
        });
    }

    fn publish(&mut self, snapshot: &Snapshot, labels: &HashMap<u64, ContainerLabels>) {
        let mut suspects = Vec::new();
        let mut profiles = BTreeMap::new();
        for container in self.containers.values_mut() {
            let labels = container.labels.clone();
            let mut suspect_count = 0;
            for state in container.stacks.values_mut() {
                let was_suspect = state.assessment.suspect;
                state.assessment = state.series.assess(&self.detector);
                if state.assessment.suspect {
                    suspect_count += 1;
                    if !was_suspect {
                        self.metrics
                            .leak_events
                            .with_label_values(&labels.values())
                            .inc();
                    }
                }
            }
            self.metrics
                .leak_suspects
                .with_label_values(&labels.values())
                .set(suspect_count);

            // Only the top-K stacks per container become labelled series.
            let mut ranked: Vec<(&String, &mut StackState)> = container.stacks.iter_mut().collect();
            ranked.sort_by(|a, b| {
                b.1.assessment
                    .score
                    .total_cmp(&a.1.assessment.score)
                    .then(b.1.bytes.cmp(&a.1.bytes))
                    .then(a.0.cmp(b.0))
            });
            for (rank, (stack_id, state)) in ranked.into_iter().enumerate() {
                let values = labels.with_stack(stack_id, &state.site);
                if rank < self.args.top_k {
                    self.metrics
                        .leak_suspicion
                        .with_label_values(&values)
                        .set(state.assessment.score);
                    self.metrics
                        .leak_growth
                        .with_label_values(&values)
                        .set(state.assessment.growth_bytes_per_second);
                    state.published = true;
                } else if state.published {
                    let _ = self.metrics.leak_suspicion.remove_label_values(&values);
                    let _ = self.metrics.leak_growth.remove_label_values(&values);
                    state.published = false;
                }
                if state.assessment.suspect {
                    suspects.push(Suspect {
                        labels: labels.clone(),
                        stack_id: stack_id.clone(),
                        site: state.site.clone(),
                        score: state.assessment.score,
                        growth_bytes_per_second: state.assessment.growth_bytes_per_second,
                        outstanding_bytes: state.bytes,
                        outstanding_allocations: state.count,
                        mean_age_seconds: state.mean_age,
                        oldest_allocation_age_seconds: state
                            .oldest_ns
                            .map(|ns| (monotonic_ms() - ns as f64 / 1e6).max(0.0) / 1000.0),
                        frames: state.frames.clone(),
                    });
                }
            }
            let samples: Vec<ProfileSample> = container
                .stacks
                .values()
                .filter(|s| s.bytes > 0)
                .map(|s| ProfileSample {
                    frames: s.frames.clone(),
                    bytes: s.bytes,
                    count: s.count,
                })
                .collect();
            profiles.insert(labels.container.clone(), samples);
        }
        self.scan_oldest();
        suspects.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(b.outstanding_bytes.cmp(&a.outstanding_bytes))
        });

        self.publish_totals(snapshot, labels);
        let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
        view.ready = true;
        view.suspects = suspects;
        view.profiles = profiles;
    }

    /// Finds the oldest live block of every suspect stack, at most every
    /// [`OLDEST_SCAN_EVERY`]: the scan reads the whole live-block map.
    fn scan_oldest(&mut self) {
        let now = Instant::now();
        if self.next_oldest_scan.is_some_and(|due| now < due) {
            return;
        }
        let wanted: HashSet<UsageKey> = self
            .containers
            .values()
            .flat_map(|c| c.stacks.values())
            .filter(|s| s.assessment.suspect)
            .flat_map(|s| s.keys.iter().copied())
            .collect();
        if wanted.is_empty() {
            return;
        }
        self.next_oldest_scan = Some(now + OLDEST_SCAN_EVERY.max(self.args.interval));
        let oldest = match self.tracer.oldest_live(&wanted) {
            Ok(oldest) => oldest,
            Err(e) => {
                log::warn!("scanning live allocations: {e:#}");
                return;
            }
        };
        for state in self
            .containers
            .values_mut()
            .flat_map(|c| c.stacks.values_mut())
        {
            if state.assessment.suspect {
                state.oldest_ns = state
                    .keys
                    .iter()
                    .filter_map(|k| oldest.get(k))
                    .min()
                    .copied();
            }
        }
    }

    fn publish_totals(&mut self, snapshot: &Snapshot, labels: &HashMap<u64, ContainerLabels>) {
        let mut outstanding: HashMap<u64, i64> = HashMap::new();
        for (key, totals) in &snapshot.totals {
            *outstanding.entry(key.cgroup_id).or_default() += totals.outstanding_bytes;
            let labels = labels_of(labels, key.cgroup_id);
            let last = self
                .last_totals
                .entry((key.cgroup_id, key.tgid))
                .or_default();
            let allocated = totals.allocated_bytes.saturating_sub(last.0);
            let freed = totals.freed_bytes.saturating_sub(last.1);
            *last = (totals.allocated_bytes, totals.freed_bytes);
            self.metrics
                .allocated_bytes
                .with_label_values(&labels.values())
                .inc_by(allocated);
            self.metrics
                .freed_bytes
                .with_label_values(&labels.values())
                .inc_by(freed);
        }
        for (cgroup_id, bytes) in outstanding {
            let labels = labels_of(labels, cgroup_id);
            self.metrics
                .outstanding_bytes
                .with_label_values(&labels.values())
                .set(bytes.max(0));
        }
        for counter in memtrace_common::Counter::ALL
            .into_iter()
            .filter(|c| c.is_drop())
        {
            let value = snapshot.counters[counter as usize];
            let delta = value.saturating_sub(self.last_counters[counter as usize]);
            self.last_counters[counter as usize] = value;
            self.metrics
                .dropped_events
                .with_label_values(&[counter.name()])
                .inc_by(delta);
        }
        let total = report::totals(snapshot, |_| true);
        self.metrics
            .map_entries
            .with_label_values(&["usage"])
            .set(snapshot.stacks.len() as i64);
        self.metrics
            .map_entries
            .with_label_values(&["allocs"])
            .set(total.outstanding_allocations as i64);
    }
}

/// The labels of a cgroup id, or a placeholder naming the id when no traced process is
/// in it any more (a process that moved cgroups).
fn labels_of(labels: &HashMap<u64, ContainerLabels>, cgroup_id: u64) -> ContainerLabels {
    labels
        .get(&cgroup_id)
        .cloned()
        .unwrap_or_else(|| ContainerLabels {
            container: format!("cgroup-id:{cgroup_id}"),
            ..Default::default()
        })
}

/// Makes room for a new stack of `bytes` in a full container by evicting the least
/// suspect, smallest one; returns false (and tracks nothing) when the newcomer would be
/// the least interesting itself.
fn make_room(
    container: &mut ContainerState,
    bytes: u64,
    max_stacks: usize,
    metrics: &Metrics,
) -> bool {
    if container.stacks.len() < max_stacks {
        return true;
    }
    let weakest = container
        .stacks
        .iter()
        .min_by(|a, b| {
            a.1.assessment
                .score
                .total_cmp(&b.1.assessment.score)
                .then(a.1.bytes.cmp(&b.1.bytes))
        })
        .map(|(id, s)| (id.clone(), s.assessment.score, s.bytes));
    let Some((id, score, weakest_bytes)) = weakest else {
        return false;
    };
    if score > 0.0 || weakest_bytes >= bytes {
        return false;
    }
    if let Some(state) = container.stacks.remove(&id)
        && state.published
    {
        let values = container.labels.with_stack(&id, &state.site);
        let _ = metrics.leak_suspicion.remove_label_values(&values);
        let _ = metrics.leak_growth.remove_label_values(&values);
    }
    metrics.evicted_stacks.inc();
    true
}

/// CLOCK_MONOTONIC in ms: the clock of `bpf_ktime_get_ns`.
fn monotonic_ms() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 * 1000.0 + now.tv_nsec as f64 / 1e6
}

/// `memtrace agent`: serve HTTP, trace, stop cleanly on SIGTERM/SIGINT.
pub fn run(args: AgentArgs) -> Result<std::process::ExitCode> {
    preflight::check_agent(std::path::Path::new("/sys"))?;
    let metrics = Metrics::new()?;
    let features = crate::features::detect(std::path::Path::new("/sys"));
    crate::features::log_missing(&features);
    crate::features::export(&features, &metrics.feature_available);
    let view: SharedView = Arc::default();
    let (stop_tx, stop_rx) = mpsc::channel();
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!(
        "memtrace: agent listening on http://{}",
        listener.local_addr()?
    );
    let server = crate::http::spawn(listener, metrics.clone(), view.clone(), stop_tx)?;
    let mut agent = Agent::new(args, metrics, view)?;
    agent.run(stop_rx)?;
    drop(agent); // detaches everything
    eprintln!("memtrace: agent stopped, probes detached");
    drop(server);
    Ok(std::process::ExitCode::SUCCESS)
}
