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
    budget::Enforcer,
    cgroup::{self, Hierarchy, Patterns},
    cli::{AgentArgs, ProbeMode},
    detect::{Assessment, DetectorConfig, Point, Series},
    escalate::{Candidate, Escalation},
    k8s,
    lifecycle::Lifecycle,
    metrics::{ContainerLabels, Metrics},
    pods::PodDiscovery,
    policy::Policy,
    preflight, process,
    profile::ProfileSample,
    python::{PythonMode, agent::PythonMetrics, session::PythonTarget},
    report::{self, Frame, Resolver},
    symbolize::Symbolizer,
    tracer::{Snapshot, Tracer, TracerOptions},
    watch::{GrowthSite, Watch},
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
    /// The always-on tier's top growth sites per container.
    pub growth: Vec<GrowthSite>,
    /// Pages populated per stack and container (by label), for pprof and flame graphs.
    pub growth_profiles: BTreeMap<String, Vec<ProfileSample>>,
    /// The always-on tier's outstanding mapped bytes per stack, per container.
    pub mapped_profiles: BTreeMap<String, Vec<ProfileSample>>,
}

pub type SharedView = Arc<RwLock<View>>;

struct TracedProcess {
    resolver: Resolver,
    cgroup_id: u64,
    cgroup_path: String,
    labels: ContainerLabels,
    /// When it was attached (CLOCK_MONOTONIC ns): an exec before that is already seen.
    attached_ns: u64,
    /// Whether it runs CPython (its interpreter is probed).
    python: bool,
    /// Traced by pymalloc's pool refills only, its allocator probes off for the budget.
    light: bool,
}

/// What wakes the agent between intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Detach everything and return.
    Stop,
    /// Processes or pods changed: look for processes to trace (and gone ones) now.
    Discover,
}

/// The least time between two discoveries woken by events: a burst of execs, exits or pod
/// updates costs one /proc and cgroup scan, not one each.
const MIN_DISCOVERY_GAP: std::time::Duration = std::time::Duration::from_millis(200);

/// A process that could not be attached: retried with back-off.
struct Failure {
    retry_at: Instant,
    attempts: u32,
    first: Instant,
    logged: bool,
}

/// A process found right at its exec has not mapped its libc yet (the dynamic loader does
/// that next): for a process that young, failures are retried quickly (100 ms, doubling)
/// before the back-off in intervals.
const QUICK_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
const QUICK_RETRIES: u32 = 4;
const QUICK_RETRY_AGE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the probes of a libc file stay attached after its last traced process went
/// (three intervals, within these bounds).
const IDLE_GRACE_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const IDLE_GRACE_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// How long discovery waits after an exec event, for the loader to map libc.
const EXEC_SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

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
    /// Pods of this node, when running with Kubernetes.
    pods: Option<PodDiscovery>,
    /// Exec and exit events from the kernel (absent if their programs cannot attach).
    lifecycle: Option<Lifecycle>,
    last_lifecycle_drops: u64,
    wake_tx: mpsc::Sender<Wake>,
    wake_rx: mpsc::Receiver<Wake>,
    /// The CPU budget of the traced processes.
    budget: Enforcer,
    /// The always-on tier (`None` when the kernel cannot run it).
    watch: Option<Watch>,
    escalation: Escalation,
    /// Whether probes follow escalation (`--probes escalate` and the always-on tier runs).
    escalating: bool,
    /// Containers watched but not escalated: their stacks keep what was learned.
    frozen: HashSet<u64>,
    python_metrics: PythonMetrics,
    /// Said that no cgroup matches the patterns (said again after they match again).
    said_no_match: std::sync::atomic::AtomicBool,
}

/// How often, at most, the live-block map is scanned for the oldest block of suspects.
const OLDEST_SCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Agent {
    pub fn new(args: AgentArgs, metrics: Metrics, view: SharedView) -> Result<Self> {
        let mut tracer = Tracer::load(&TracerOptions {
            sample_bytes: args.sample_bytes,
            max_allocations: args.max_allocations,
            max_stacks: args.max_stack_traces,
            // Probes are shared by the traced processes of each libc file.
            filter_processes: true,
            fault_sample: args.fault_sample,
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
        let (wake_tx, wake_rx) = mpsc::channel();
        let pods = start_pods(&args, &metrics, wake_tx.clone())?;
        let waker = wake_tx.clone();
        let notify = Box::new(move || {
            let _ = waker.send(Wake::Discover);
        });
        let lifecycle = match Lifecycle::start(&mut tracer, &metrics.registry, notify) {
            Ok(lifecycle) => Some(lifecycle),
            Err(e) => {
                log::warn!("{e:#}: new processes are found by the periodic rescan only");
                None
            }
        };
        let budget = Enforcer::start(args.max_overhead, args.sample_bytes, args.budget_retry);
        // With escalation the exact tier sees a container for --escalate-for at a time:
        // its stacks are judged over that much, or they could never cover the window.
        let exact_window = match args.probes {
            ProbeMode::Escalate => args.window.min(args.escalate_for),
            ProbeMode::Always => args.window,
        };
        let detector = DetectorConfig {
            window: exact_window,
            max_points: args.max_points,
            threshold: args.threshold,
        };
        let watch_detector = DetectorConfig {
            window: args.window,
            ..detector.clone()
        };
        let watch = match (tracer.enable_growth(), &hierarchy) {
            (Ok(()), Some(_)) => Some(Watch::new(watch_detector)),
            (Ok(()), None) => {
                log::warn!("the always-on tier needs a cgroup v2 hierarchy: it is off");
                None
            }
            (Err(e), _) => {
                log::warn!("the always-on tier is off: {e:#}");
                None
            }
        };
        if watch.is_some() {
            crate::mapped::enable_in_agent(&mut tracer, &metrics);
        }
        let escalating = args.probes == ProbeMode::Escalate && watch.is_some();
        if args.probes == ProbeMode::Escalate && !escalating {
            log::warn!(
                "--probes escalate needs the always-on tier: probes go on every traced process"
            );
        }
        let python_metrics = PythonMetrics::new(&metrics.registry)?;
        Ok(Self {
            python_metrics,
            escalation: Escalation::new(args.escalate_for),
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
            pods,
            lifecycle,
            last_lifecycle_drops: 0,
            wake_tx,
            wake_rx,
            budget,
            watch,
            escalating,
            frozen: HashSet::new(),
            said_no_match: Default::default(),
        })
    }

    /// A sender that wakes the agent (for events from other threads).
    pub fn waker(&self) -> mpsc::Sender<Wake> {
        self.wake_tx.clone()
    }

    /// Runs until `stop` receives (or its sender is dropped), one tick per interval, and
    /// a discovery between ticks whenever something wakes it.
    pub fn run(&mut self, stop: mpsc::Receiver<()>) -> Result<()> {
        let waker = self.waker();
        std::thread::Builder::new()
            .name("memtrace-stop".into())
            .spawn(move || {
                let _ = stop.recv();
                let _ = waker.send(Wake::Stop);
            })?;
        loop {
            let began = Instant::now();
            if let Err(e) = self.tick() {
                log::warn!("interval failed: {e:#}");
            }
            self.metrics.tick_seconds.set(began.elapsed().as_secs_f64());
            if !self.wait_until(began + self.args.interval) {
                break;
            }
        }
        self.tracer.finish_detaching();
        Ok(())
    }

    /// Waits until `due`, discovering whenever something wakes the agent (at most every
    /// [`MIN_DISCOVERY_GAP`]) and when a quick retry is due; false when told to stop.
    fn wait_until(&mut self, due: Instant) -> bool {
        let mut quiet_until = Instant::now();
        let mut pending = false;
        loop {
            let now = Instant::now();
            if now >= due {
                return true;
            }
            let retry = self
                .failures
                .values()
                .map(|f| f.retry_at.max(quiet_until))
                .min()
                .filter(|at| *at < due);
            let mut until = due;
            if pending {
                until = until.min(quiet_until);
            }
            if let Some(at) = retry {
                until = until.min(at);
            }
            match self
                .wake_rx
                .recv_timeout(until.saturating_duration_since(now))
            {
                Ok(Wake::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                Ok(Wake::Discover) => {
                    if !pending {
                        quiet_until = quiet_until.max(Instant::now() + EXEC_SETTLE);
                    }
                    pending = true;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            let retry_due = retry.is_some_and(|at| now >= at);
            if (pending || retry_due) && now >= quiet_until {
                pending = false;
                self.discover_between_ticks();
                quiet_until = Instant::now() + MIN_DISCOVERY_GAP;
            }
        }
    }

    /// Discovery woken by an event: like a tick's, but the always-on tier is not run (it
    /// samples once per interval), so escalation stays as the last tick left it.
    fn discover_between_ticks(&mut self) {
        let (mut wanted, watched) = self.wanted();
        if self.escalating
            && let Some(hierarchy) = &self.hierarchy
        {
            let mut ids: HashMap<String, Option<u64>> = HashMap::new();
            wanted.retain(|_, path| {
                let id = *ids
                    .entry(path.clone())
                    .or_insert_with(|| hierarchy.id(path).ok());
                id.is_some_and(|id| self.escalation.is_escalated(id))
            });
        }
        self.discover(wanted, &watched);
    }

    /// One interval: discover, read, detect, publish.
    pub fn tick(&mut self) -> Result<()> {
        let (wanted, watched) = self.wanted();
        let wanted = self.observe_growth(wanted);
        self.discover(wanted, &watched);
        if let Some(lifecycle) = &self.lifecycle {
            let drops = lifecycle.dropped();
            self.metrics
                .dropped_events
                .with_label_values(&["lifecycle_ring_full"])
                .inc_by(drops.saturating_sub(self.last_lifecycle_drops));
            self.last_lifecycle_drops = drops;
        }
        if let Ok((traced, totals)) = self.tracer.process_entries() {
            let entries = &self.metrics.map_entries;
            entries.with_label_values(&["traced"]).set(traced as i64);
            entries.with_label_values(&["usage_all"]).set(totals as i64);
        }
        let tgids: HashSet<u32> = self.processes.keys().copied().collect();
        match self.tracer.sweep_freed(false) {
            Ok(sweep) if sweep.deleted > 0 => {
                log::debug!("swept {} freed live-block entries", sweep.deleted)
            }
            Ok(_) => {}
            Err(e) => log::warn!("sweeping freed live-block entries: {e:#}"),
        }
        let mut snapshot = self.tracer.snapshot(&tgids)?;
        // Processes of v1-only containers (hybrid hosts): by container, not shared cgroup.
        let v1_keys =
            crate::hybrid::v1_keys(self.processes.iter().map(|(pid, p)| (pid, p.cgroup_id)));
        crate::hybrid::rekey(&mut snapshot, &v1_keys);
        for traced in self.processes.values_mut() {
            traced
                .resolver
                .learn(&snapshot.stacks, &mut self.symbolizer);
        }
        let sums = self.sum_stacks(&snapshot);
        let labels = self.labels_by_cgroup();
        let mut python = self.tracer.python_stats(&tgids)?;
        crate::hybrid::rekey_python(&mut python, &v1_keys);
        self.python_metrics.publish(
            &python,
            |cgroup_id| labels_of(&labels, cgroup_id),
            &self.metrics.dropped_events,
        );
        self.enforce_budget(&snapshot, &labels);
        self.update_series(sums, &labels);
        self.publish(&snapshot, &labels);
        Ok(())
    }

    /// The processes that should be traced now, with their cgroup paths; and the cgroups
    /// in (and below) which an exec must wake discovery.
    fn wanted(&self) -> (BTreeMap<u32, String>, Vec<String>) {
        let mut wanted = BTreeMap::new();
        let mut watched = Vec::new();
        for &pid in &self.args.pid {
            if process::exists(pid) {
                wanted.insert(pid, cgroup::of_process(pid).unwrap_or_default());
            }
        }
        if let (Some(pods), Some(hierarchy)) = (&self.pods, &self.hierarchy) {
            pods.wanted(hierarchy, &mut wanted);
            watched.extend(crate::pods::roots(&hierarchy.mount));
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
                watched.push(path.clone());
                // A process may leave (or the cgroup go) between the listing and the read.
                for pid in hierarchy.processes(&path).unwrap_or_default() {
                    wanted.insert(pid, path.clone());
                }
            }
        }
        // Never trace ourselves: our own allocations would feed our own maps.
        wanted.remove(&std::process::id());
        (wanted, watched)
    }

    /// Runs the always-on tier over every wanted process and moves escalation along;
    /// returns the processes that should have allocator probes now.
    fn observe_growth(&mut self, wanted: BTreeMap<u32, String>) -> BTreeMap<u32, String> {
        let (Some(watch), Some(hierarchy)) = (&mut self.watch, &self.hierarchy) else {
            return wanted;
        };
        let mut ids: HashMap<String, u64> = HashMap::new();
        let mut watched = BTreeMap::new();
        for (pid, path) in &wanted {
            let id = match ids.get(path) {
                Some(id) => *id,
                None => match hierarchy.id(path) {
                    Ok(id) => *ids.entry(path.clone()).or_insert(id),
                    Err(_) => continue, // The cgroup went away meanwhile.
                },
            };
            // On Kubernetes, the container's pod as the API knows it now.
            let labels = self
                .pods
                .as_ref()
                .and_then(|pods| pods.labels(path))
                .unwrap_or_else(|| ContainerLabels {
                    container: path.clone(),
                    ..Default::default()
                });
            watched.insert(*pid, (id, labels));
        }
        let dirs: HashMap<u64, std::path::PathBuf> = ids
            .iter()
            .map(|(path, id)| (*id, hierarchy.dir(path)))
            .collect();
        let observed = watch.observe(
            &watched,
            &dirs,
            &mut self.tracer,
            &mut self.symbolizer,
            &self.metrics,
        );
        {
            let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
            view.growth = observed.sites;
            view.growth_profiles = observed.profiles;
            view.mapped_profiles = observed.mapped_profiles;
        }
        if !self.escalating {
            return wanted;
        }
        let now = Instant::now();
        // Pods annotated `memtrace.io/escalate: "true"` ask for the probes, growing or not.
        let requested: HashSet<u64> = match &self.pods {
            Some(pods) => ids
                .iter()
                .filter(|(path, _)| pods.escalation_requested(path))
                .map(|(_, id)| *id)
                .collect(),
            None => HashSet::new(),
        };
        let candidates: Vec<Candidate> = watch
            .container_ids()
            .into_iter()
            .filter_map(|id| {
                Some(Candidate {
                    id,
                    labels: watch.labels(id)?,
                    growing: watch.growing(id),
                    requested: requested.contains(&id),
                })
            })
            .collect();
        self.frozen = self.escalation.advance(candidates, now, &self.metrics);
        wanted
            .into_iter()
            .filter(|(pid, _)| {
                watched
                    .get(pid)
                    .is_some_and(|(id, _)| self.escalation.is_escalated(*id))
            })
            .collect()
    }

    /// Attaches to the wanted processes that are not traced yet, lets go of gone ones, and
    /// watches `watched` cgroups (and below) for execs and forks.
    fn discover(&mut self, wanted: BTreeMap<u32, String>, watched: &[String]) {
        let events = self
            .lifecycle
            .as_ref()
            .map(Lifecycle::take)
            .unwrap_or_default();
        if let (Some(lifecycle), Some(hierarchy)) = (&mut self.lifecycle, &self.hierarchy) {
            let ids = watched
                .iter()
                .filter_map(|p| hierarchy.id(p).ok())
                .collect();
            lifecycle.watch(&ids);
        }
        // A traced process that exec'd runs a new image: its old heap is gone and its
        // libc may be another file; it is attached anew below.
        let gone: HashSet<u32> = self
            .processes
            .keys()
            .copied()
            .filter(|pid| {
                let exec_since_attach = events
                    .execs
                    .get(pid)
                    .is_some_and(|&at| at > self.processes[pid].attached_ns);
                // A process traced lightly for its budget gets every probe back (anew)
                // once its time is up.
                let budget_retry_due = self.processes[pid].light && !self.budget.is_detached(*pid);
                !wanted.contains_key(pid)
                    || exec_since_attach
                    || budget_retry_due
                    || !process::exists(*pid)
            })
            .collect();
        let now = Instant::now();
        self.budget.expire(now, |pid| wanted.contains_key(&pid));
        for &pid in &gone {
            self.budget.forget(pid);
            self.processes.remove(&pid);
            self.tracer.untrace(pid);
            log::info!("pid {pid}: detached");
        }
        if !gone.is_empty() {
            if let Err(e) = self.tracer.forget_all(&gone) {
                log::warn!("freeing the map entries of pids {gone:?}: {e:#}");
            }
            if let Some(watch) = &mut self.watch {
                watch.restore_python(&gone, &mut self.tracer);
            }
            self.last_totals.retain(|(_, tgid), _| !gone.contains(tgid));
            for pid in &gone {
                self.python_metrics.forget(*pid);
            }
        }
        self.failures.retain(|pid, _| wanted.contains_key(pid));
        for (pid, path) in wanted {
            if self.processes.contains_key(&pid)
                || self.budget.is_detached(pid)
                || self.failures.get(&pid).is_some_and(|f| now < f.retry_at)
            {
                continue;
            }
            match self.attach(pid, &path, false) {
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
                        first: now,
                        logged: false,
                    });
                    failure.attempts += 1;
                    let young = now.duration_since(failure.first) < QUICK_RETRY_AGE;
                    failure.retry_at = if young && failure.attempts <= QUICK_RETRIES {
                        now + QUICK_RETRY * (1 << (failure.attempts - 1))
                    } else {
                        // Logged once: when quick retries end (or at once when there were none).
                        if !failure.logged {
                            failure.logged = true;
                            log::warn!("cannot trace pid {pid}: {e:#} (will retry)");
                        }
                        // Back off: 1, 2, 4 ... up to 64 intervals.
                        now + self.args.interval * (1 << failure.attempts.min(6))
                    };
                }
            }
        }
        // Probes of a libc file nobody uses any more go after a grace period: a process
        // that comes back soon (an exec, a restart) reuses them.
        self.tracer
            .detach_idle((self.args.interval * 3).clamp(IDLE_GRACE_MIN, IDLE_GRACE_MAX));
        self.metrics
            .traced_processes
            .set(self.processes.len() as i64);
        self.metrics
            .attached_probes
            .set(self.tracer.attached_probes() as i64);
    }

    /// Attaches the probes to `pid`; `light`: only pymalloc's pool refills (a CPython
    /// process whose allocator probes went over its budget).
    fn attach(&mut self, pid: u32, cgroup_path: &str, light: bool) -> Result<TracedProcess> {
        if light {
            return self.attach_light(pid, cgroup_path);
        }
        let attached_ns = (monotonic_ms() * 1e6) as u64;
        let libc = process::allocator_of_running(pid)?;
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
        // Escalation probes a few containers at a time, each process on its own: shared
        // probes would also trap in every other process mapping the same file (replicas of
        // the same image share it), unseen by the budget. Tracing everything
        // (`--probes always`) shares one set per file: following hundreds of processes
        // must not cost a probe removal (~0.1 s in the kernel) per process.
        if self.escalating {
            self.tracer.trace_process(pid, &readable)?;
        } else {
            self.tracer.trace_shared(pid, &readable, libc.file)?;
        }
        // CPython: its frames in stacks, and its allocator probes of --python's mode.
        // Probes shared per interpreter file, like libc's, except in exact mode: untraced
        // processes mapping the same file would then trap on every object they allocate.
        // An escalated container's processes get exact mode where it works (live objects).
        let shared = self.args.python != PythonMode::Exact;
        let python = if self.escalating {
            PythonTarget::escalated(&mut self.tracer, &mut resolver, pid, self.args.python)
        } else {
            PythonTarget::running(
                &mut self.tracer,
                &mut resolver,
                pid,
                self.args.python,
                shared,
            )
        };
        self.traced_process(
            pid,
            cgroup_path,
            resolver,
            attached_ns,
            python.is_some(),
            false,
        )
    }

    /// A CPython process traced by pymalloc's pool refills only (Python growth mode, its
    /// own probes, none on libc): a trap per 16 KiB pool of new objects, where a
    /// Django-like process's allocator probes cost tens of percent of its CPU.
    fn attach_light(&mut self, pid: u32, cgroup_path: &str) -> Result<TracedProcess> {
        let attached_ns = (monotonic_ms() * 1e6) as u64;
        let mut resolver = Resolver::new(pid);
        resolver.refresh_map();
        self.tracer.trace_pid(pid)?;
        if PythonTarget::running(
            &mut self.tracer,
            &mut resolver,
            pid,
            PythonMode::Growth,
            false,
        )
        .is_none()
        {
            anyhow::bail!("pid {pid}: its interpreter's pool refills cannot be probed");
        }
        self.traced_process(pid, cgroup_path, resolver, attached_ns, true, true)
    }

    fn traced_process(
        &self,
        pid: u32,
        cgroup_path: &str,
        resolver: Resolver,
        attached_ns: u64,
        python: bool,
        light: bool,
    ) -> Result<TracedProcess> {
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
            cgroup_path: cgroup_path.to_owned(),
            labels,
            attached_ns,
            python,
            light,
        })
    }

    /// Judges every traced process against the CPU budget; detaches those over it.
    fn enforce_budget(&mut self, snapshot: &Snapshot, labels: &HashMap<u64, ContainerLabels>) {
        let traced: Vec<(u32, u64)> = self
            .processes
            .iter()
            .map(|(pid, p)| (*pid, p.cgroup_id))
            .collect();
        let over = self.budget.judge(snapshot, &traced, labels, &self.metrics);
        for pid in over {
            let Some(detached) = self.processes.remove(&pid) else {
                continue;
            };
            self.tracer.untrace(pid);
            if let Err(e) = self.tracer.forget(pid) {
                log::warn!("freeing the map entries of pid {pid}: {e:#}");
            }
            if let Some(watch) = &mut self.watch {
                watch.restore_python(&HashSet::from([pid]), &mut self.tracer);
            }
            self.last_totals.retain(|(_, tgid), _| *tgid != pid);
            // A CPython process keeps the cheapest probe that still names Python lines:
            // pymalloc's pool refills (unless that is what went over).
            let python_growth = matches!(self.args.python, PythonMode::Growth | PythonMode::Exact);
            if detached.python && !detached.light && python_growth {
                match self.attach(pid, &detached.cgroup_path, true) {
                    Ok(light) => {
                        log::info!(
                            "pid {pid} ({}): CPython: traced by pymalloc's pool refills only \
                             until its allocator probes come back",
                            detached.labels.container
                        );
                        self.processes.insert(pid, light);
                    }
                    Err(e) => {
                        self.tracer.untrace(pid);
                        log::warn!("pid {pid}: {e:#}");
                    }
                }
            }
        }
        self.metrics
            .traced_processes
            .set(self.processes.len() as i64);
        let probed: HashSet<u64> = self.processes.values().map(|p| p.cgroup_id).collect();
        self.budget.retire_ratios(&probed, &self.metrics);
    }

    /// Labels per cgroup id, from the traced processes in each (read once per interval):
    /// on Kubernetes, a container's pod as the API knows it now (so a container traced
    /// under its id is relabelled when its pod appears).
    fn labels_by_cgroup(&self) -> HashMap<u64, ContainerLabels> {
        let mut labels = HashMap::new();
        for p in self.processes.values() {
            labels.entry(p.cgroup_id).or_insert_with(|| {
                self.pods
                    .as_ref()
                    .and_then(|pods| pods.labels(&p.cgroup_path))
                    .unwrap_or_else(|| p.labels.clone())
            });
        }
        labels
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
        self.relabel(labels);
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
                    site: report::site(&sum.frames),
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
            let frozen = self.frozen.contains(cgroup_id);
            container.stacks.retain(|stack_id, state| {
                // A container between escalations keeps what its last window learned.
                let keep = frozen || seen.contains(&(*cgroup_id, stack_id.clone()));
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

    /// Moves containers whose labels changed (their pod became known) to the new labels,
    /// retiring the series under the old ones.
    fn relabel(&mut self, labels: &HashMap<u64, ContainerLabels>) {
        for (cgroup_id, container) in &mut self.containers {
            let Some(new) = labels.get(cgroup_id) else {
                continue;
            };
            if *new == container.labels {
                continue;
            }
            log::info!(
                "container {} is {}/{}/{}",
                container.labels.container,
                new.namespace,
                new.pod,
                new.container
            );
            self.metrics.retire_container(&container.labels);
            for (stack_id, state) in &mut container.stacks {
                if state.published {
                    let values = container.labels.with_stack(stack_id, &state.site);
                    let _ = self.metrics.leak_suspicion.remove_label_values(&values);
                    let _ = self.metrics.leak_growth.remove_label_values(&values);
                    state.published = false;
                }
            }
            container.labels = new.clone();
        }
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
        for counter in memtrace_common::Counter::ALL {
            let value = snapshot.counters[counter as usize];
            let delta = value.saturating_sub(self.last_counters[counter as usize]);
            self.last_counters[counter as usize] = value;
            match counter {
                memtrace_common::Counter::UntracedHit => {
                    self.metrics.untraced_probe_hits.inc_by(delta)
                }
                c if c.is_drop() => self
                    .metrics
                    .dropped_events
                    .with_label_values(&[c.name()])
                    .inc_by(delta),
                _ => {}
            }
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
        // Entries kept for reuse after a free (see `sweep`): they use map capacity too.
        if let Ok(freed) = self.tracer.freed_entries() {
            self.metrics
                .map_entries
                .with_label_values(&["allocs_freed"])
                .set(freed.max(0));
        }
    }
}

/// The labels of a cgroup id, or a placeholder naming the id when no traced process is
/// in it any more (a process that moved cgroups).
pub(crate) fn labels_of(labels: &HashMap<u64, ContainerLabels>, cgroup_id: u64) -> ContainerLabels {
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

/// Starts watching this node's pods when running with Kubernetes (`--kubeconfig`, or in a
/// pod); pod changes wake discovery.
fn start_pods(
    args: &AgentArgs,
    metrics: &Metrics,
    wake: mpsc::Sender<Wake>,
) -> Result<Option<PodDiscovery>> {
    let policy = Policy::new(
        &args.namespace,
        &args.exclude_namespace,
        args.pod_selector.as_deref(),
        args.trace_default,
    )?;
    let options = k8s::Options {
        kubeconfig: args.kubeconfig.clone(),
        node_name: args
            .node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok()),
        timeout: args.kube_timeout,
    };
    let notify = move || {
        let _ = wake.send(Wake::Discover);
    };
    PodDiscovery::start(&options, policy, &metrics.registry, Box::new(notify))
}

/// CLOCK_MONOTONIC in ms: the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ms() -> f64 {
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
