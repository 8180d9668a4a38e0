//! The always-on tier in the agent: every watched container is followed without any
//! allocator probe. Per container it keeps the anonymous memory of its processes (RssAnon)
//! as a series for the leak detector, which decides escalation, the pages its stacks
//! populated (page faults, see [`crate::growth`]), which say where it grows, and, where the
//! kernel allows it, its anonymous mappings outstanding per stack (see [`crate::mapped`]),
//! each stack judged by the same detector.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Instant,
};

use serde::Serialize;

use crate::{
    detect::{Assessment, DetectorConfig, Point, Series},
    hybrid,
    metrics::{ContainerLabels, Metrics},
    profile::ProfileSample,
    python::session::PythonTarget,
    report::{Frame, Resolver},
    symbolize::Symbolizer,
    tracer::Tracer,
};

/// What one interval of the always-on tier publishes.
#[derive(Default)]
pub struct Observed {
    /// Top growth sites per container.
    pub sites: Vec<GrowthSite>,
    /// Every growth stack per container (by container label), for pprof and flame graphs.
    pub profiles: BTreeMap<String, Vec<ProfileSample>>,
    /// Outstanding mapped bytes per stack and container, for pprof and flame graphs.
    pub mapped_profiles: BTreeMap<String, Vec<ProfileSample>>,
}

/// Mapped-memory stacks followed per container (the smallest new ones are not).
const MAPPED_STACKS_PER_CONTAINER: usize = 256;

/// Growth sites kept per container in the API.
const SITES_PER_CONTAINER: usize = 5;

/// One stack that populated new memory (`source` `page_faults`) or holds anonymous
/// mappings (`mapped`), as `/api/v1/growth` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct GrowthSite {
    #[serde(flatten)]
    pub labels: ContainerLabels,
    pub source: &'static str,
    pub stack_id: String,
    pub site: String,
    /// Bytes of the pages this stack populated since it was first seen (page faults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub populated_bytes: Option<u64>,
    /// Bytes this stack mapped and has not unmapped (mappings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped_bytes: Option<u64>,
    /// The leak detector's verdict on `mapped_bytes` over time (mappings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assessment: Option<SiteAssessment>,
    pub frames: Vec<Frame>,
}

/// The detector's view of one mapped-memory stack.
#[derive(Clone, Debug, Serialize)]
pub struct SiteAssessment {
    pub suspect: bool,
    pub score: f64,
    pub growth_bytes_per_second: f64,
    /// Mean age of its live mappings.
    pub mean_age_seconds: Option<f64>,
}

/// One stack's mapped bytes over time.
struct MappedStack {
    series: Series,
    assessment: Assessment,
    mean_age: Option<f64>,
    seen: bool,
}

struct Container {
    labels: ContainerLabels,
    /// Anonymous memory of its processes over time.
    series: Series,
    assessment: Assessment,
}

/// The watched containers (by cgroup id) and the processes in them.
pub struct Watch {
    detector: DetectorConfig,
    started: Instant,
    containers: HashMap<u64, Container>,
    /// Resolvers of the watched processes (their stacks must resolve while they live).
    processes: BTreeMap<u32, (u64, Resolver)>,
    /// Populated bytes counted so far per process (for the counter's increments).
    populated: HashMap<u32, u64>,
    /// Mapped-memory stacks per (container, stack id).
    mapped: HashMap<(u64, String), MappedStack>,
}

impl Watch {
    pub fn new(detector: DetectorConfig) -> Self {
        Self {
            detector,
            started: Instant::now(),
            containers: HashMap::new(),
            processes: BTreeMap::new(),
            populated: HashMap::new(),
            mapped: HashMap::new(),
        }
    }

    /// Sets up again the Python frames of the watched processes among `pids`, which the
    /// exact tier just let go of (an escalation window over, a budget detach): letting go
    /// deleted their Python configuration with the rest of their map entries, and their page
    /// faults would lose their Python frames.
    pub fn restore_python(&mut self, pids: &HashSet<u32>, tracer: &mut Tracer) {
        for pid in pids {
            if let Some((_, resolver)) = self.processes.get_mut(pid)
                && crate::process::exists(*pid)
            {
                PythonTarget::frames_only(tracer, resolver, *pid);
            }
        }
    }

    /// Follows `wanted` (pid → (cgroup id, labels)) for one interval: watches new
    /// containers' page faults, lets go of gone ones, and pushes each container's
    /// anonymous memory to its series. Returns what the API shows of it.
    pub fn observe(
        &mut self,
        wanted: &BTreeMap<u32, (u64, ContainerLabels)>,
        cgroup_dirs: &HashMap<u64, std::path::PathBuf>,
        tracer: &mut Tracer,
        symbolizer: &mut Symbolizer,
        metrics: &Metrics,
    ) -> Observed {
        // Processes: resolvers for new ones, map entries of gone ones freed.
        let gone: Vec<u32> = self
            .processes
            .keys()
            .filter(|pid| !wanted.contains_key(pid))
            .copied()
            .collect();
        for pid in gone {
            if let Some((id, _)) = self.processes.remove(&pid)
                && hybrid::is_v1_key(id)
            {
                tracer.unwatch_process(pid);
            }
            self.populated.remove(&pid);
            let _ = tracer.forget_python(&HashSet::from([pid]));
            if let Err(e) = tracer.forget_growth(pid) {
                log::warn!("freeing the map entries of pid {pid}: {e:#}");
            }
            if tracer.mapped_enabled()
                && let Err(e) = tracer.forget_mapped(pid)
            {
                log::warn!("freeing the mapping entries of pid {pid}: {e:#}");
            }
        }
        for (&pid, (cgroup_id, labels)) in wanted {
            self.processes.entry(pid).or_insert_with(|| {
                // A process of a v1-only container shares its v2 cgroup with others: its
                // page faults are counted per process.
                if hybrid::is_v1_key(*cgroup_id)
                    && let Err(e) = tracer.watch_process(pid)
                {
                    log::warn!("cannot watch pid {pid} ({}): {e:#}", labels.container);
                }
                let mut resolver = Resolver::new(pid);
                resolver.refresh_map();
                // A CPython process: its Python frames go into the stacks of its page
                // faults too (read in BPF at each walk; no probe on the interpreter).
                PythonTarget::frames_only(tracer, &mut resolver, pid);
                (*cgroup_id, resolver)
            });
        }

        // Containers: watched while a wanted process is in them. Their anonymous memory
        // is the cgroup's own count where its memory controller is on cgroup v2, else the
        // sum over its processes.
        let mut anon: HashMap<u64, u64> = cgroup_dirs
            .iter()
            .filter_map(|(id, dir)| Some((*id, cgroup_anon(dir)?)))
            .collect();
        let from_cgroup: HashSet<u64> = anon.keys().copied().collect();
        for (&pid, (cgroup_id, _)) in wanted {
            if !from_cgroup.contains(cgroup_id) {
                *anon.entry(*cgroup_id).or_default() += anon_rss(pid).unwrap_or(0);
            }
        }
        let dropped: Vec<u64> = self
            .containers
            .keys()
            .filter(|id| !anon.contains_key(id))
            .copied()
            .collect();
        for id in dropped {
            if let Some(container) = self.containers.remove(&id) {
                tracer.unwatch_cgroup(id);
                metrics.retire_watched(&container.labels);
                self.mapped.retain(|(cgroup_id, _), _| *cgroup_id != id);
            }
        }
        let t = self.started.elapsed().as_secs_f64();
        for (&pid, (cgroup_id, labels)) in wanted {
            if let Some(container) = self.containers.get_mut(cgroup_id) {
                // Relabelled (its pod became known): the series moves to the new labels.
                if container.labels != *labels {
                    metrics.retire_watched(&container.labels);
                    container.labels = labels.clone();
                }
                continue;
            }
            // A v1-only container's processes are watched one by one (above).
            let watching = if hybrid::is_v1_key(*cgroup_id) {
                Ok(())
            } else {
                tracer.watch_cgroup(*cgroup_id)
            };
            match watching {
                Ok(()) => {
                    log::info!("watching {} (pid {pid}) for growth", labels.container);
                    self.containers.insert(
                        *cgroup_id,
                        Container {
                            labels: labels.clone(),
                            series: Series::new(),
                            assessment: Assessment::default(),
                        },
                    );
                }
                Err(e) => log::warn!("cannot watch {}: {e:#}", labels.container),
            }
        }
        for (id, container) in &mut self.containers {
            let bytes = anon.get(id).copied().unwrap_or(0);
            container.series.push(
                Point {
                    t,
                    bytes: bytes as f64,
                    mean_age: None,
                },
                &self.detector,
            );
            container.assessment = container.series.assess(&self.detector);
            metrics
                .anon_memory_bytes
                .with_label_values(&container.labels.values())
                .set(bytes as i64);
        }
        let mut observed = self.growth_sites(tracer, symbolizer, metrics);
        if tracer.mapped_enabled() {
            self.mapped_sites(tracer, symbolizer, metrics, t, &mut observed);
        }
        observed
    }

    /// Whether container `id`'s memory grows the way a leak does.
    pub fn growing(&self, id: u64) -> bool {
        self.containers
            .get(&id)
            .is_some_and(|c| c.assessment.suspect)
    }

    pub fn labels(&self, id: u64) -> Option<&ContainerLabels> {
        self.containers.get(&id).map(|c| &c.labels)
    }

    pub fn container_ids(&self) -> Vec<u64> {
        self.containers.keys().copied().collect()
    }

    /// Reads the page-fault growth of the watched containers: counters, and the top
    /// stacks of each.
    fn growth_sites(
        &mut self,
        tracer: &mut Tracer,
        symbolizer: &mut Symbolizer,
        metrics: &Metrics,
    ) -> Observed {
        // Every entry, watched or not: those of processes no longer watched are let go below.
        let v1_keys = hybrid::v1_keys(self.processes.iter().map(|(pid, (id, _))| (pid, *id)));
        let snapshot = match tracer.growth_snapshot(|_| true) {
            Ok(mut snapshot) => {
                hybrid::rekey(&mut snapshot, &v1_keys);
                snapshot
            }
            Err(e) => {
                log::warn!("reading the always-on tier's maps: {e:#}");
                return Observed::default();
            }
        };
        for (_, resolver) in self.processes.values_mut() {
            resolver.learn(&snapshot.stacks, symbolizer);
        }
        let mut per_process: HashMap<(u32, u64), u64> = HashMap::new();
        let mut sites: HashMap<(u64, String), GrowthSite> = HashMap::new();
        for stack in &snapshot.stacks {
            let bytes = stack.usage.allocated_bytes;
            *per_process
                .entry((stack.key.tgid, stack.key.cgroup_id))
                .or_default() += bytes;
            let (Some(container), Some((_, resolver))) = (
                self.containers.get(&stack.key.cgroup_id),
                self.processes.get(&stack.key.tgid),
            ) else {
                continue;
            };
            let (stack_id, frames) = resolver.stack(stack, symbolizer);
            let site = sites
                .entry((stack.key.cgroup_id, stack_id.clone()))
                .or_insert_with(|| GrowthSite {
                    labels: container.labels.clone(),
                    source: "page_faults",
                    stack_id,
                    site: site_of(&frames),
                    populated_bytes: Some(0),
                    mapped_bytes: None,
                    assessment: None,
                    frames,
                });
            *site.populated_bytes.get_or_insert(0) += bytes;
        }
        metrics
            .map_entries
            .with_label_values(&["faults"])
            .set(snapshot.stacks.len() as i64);
        // Processes that came and went between two intervals (a watched cgroup's faults are
        // recorded whatever process takes them) were never watched one by one: their pages
        // are counted here, then their entries go, or churn would fill FAULTS.
        let mut passing = HashSet::new();
        for ((pid, cgroup_id), total) in per_process {
            let last = self.populated.entry(pid).or_default();
            let delta = total.saturating_sub(*last);
            *last = total;
            if let Some(container) = self.containers.get(&cgroup_id) {
                metrics
                    .populated_bytes
                    .with_label_values(&container.labels.values())
                    .inc_by(delta);
            }
            if !self.processes.contains_key(&pid) {
                passing.insert(pid);
            }
        }
        for pid in &passing {
            self.populated.remove(pid);
        }
        if let Err(e) = tracer.forget_growth_all(&passing) {
            log::warn!("freeing the always-on tier's entries of gone processes: {e:#}");
        }
        let mut profiles: BTreeMap<String, Vec<ProfileSample>> = BTreeMap::new();
        for site in sites.values() {
            profiles
                .entry(site.labels.container.clone())
                .or_default()
                .push(ProfileSample {
                    frames: site.frames.clone(),
                    bytes: site.populated_bytes.unwrap_or(0),
                    count: site.populated_bytes.unwrap_or(0) / crate::tracer::page_size(),
                });
        }
        let sites = top_sites(sites.into_values().collect(), |s| {
            s.populated_bytes.unwrap_or(0)
        });
        Observed {
            sites,
            profiles,
            mapped_profiles: BTreeMap::new(),
        }
    }

    /// Reads the mapped bytes of the watched containers' stacks, pushes each stack's
    /// outstanding bytes to its series, judges it, and adds the top stacks (suspects
    /// first) to what is published.
    fn mapped_sites(
        &mut self,
        tracer: &mut Tracer,
        symbolizer: &mut Symbolizer,
        metrics: &Metrics,
        t: f64,
        observed: &mut Observed,
    ) {
        let watched: HashSet<u64> = self.containers.keys().copied().collect();
        let snapshot = match tracer.mapped_snapshot(|key| watched.contains(&key.cgroup_id)) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                log::warn!("reading the mmap view's maps: {e:#}");
                return;
            }
        };
        for (_, resolver) in self.processes.values_mut() {
            resolver.learn(&snapshot.stacks, symbolizer);
        }
        // Stacks are merged per container across its processes.
        struct Sum {
            bytes: i64,
            count: i64,
            live: u64,
            live_ms: u64,
            frames: Vec<Frame>,
        }
        let mut sums: HashMap<(u64, String), Sum> = HashMap::new();
        for stack in &snapshot.stacks {
            let Some((_, resolver)) = self.processes.get(&stack.key.tgid) else {
                continue;
            };
            let (stack_id, frames) = resolver.stack(stack, symbolizer);
            let sum = sums
                .entry((stack.key.cgroup_id, stack_id))
                .or_insert_with(|| Sum {
                    bytes: 0,
                    count: 0,
                    live: 0,
                    live_ms: 0,
                    frames,
                });
            sum.bytes += stack.usage.outstanding_bytes;
            sum.count += stack.usage.outstanding_count;
            sum.live += stack.usage.live_blocks;
            sum.live_ms += stack.usage.live_time_ms_sum;
        }
        let now_ms = crate::agent::monotonic_ms();
        let mut per_container: HashMap<u64, (usize, i64)> = HashMap::new();
        for stack in self.mapped.values_mut() {
            stack.seen = false;
        }
        let mut sites = Vec::new();
        let mut keys: Vec<&(u64, String)> = sums.keys().collect();
        // The largest first, so that a full container keeps its largest stacks.
        keys.sort_by_key(|k| std::cmp::Reverse(sums[*k].bytes));
        for key in keys {
            let sum = &sums[key];
            let Some(container) = self.containers.get(&key.0) else {
                continue;
            };
            let (stacks, bytes) = per_container.entry(key.0).or_default();
            *bytes += sum.bytes.max(0);
            if !self.mapped.contains_key(key) && *stacks >= MAPPED_STACKS_PER_CONTAINER {
                continue;
            }
            *stacks += 1;
            let mean_age =
                (sum.live > 0).then(|| (now_ms - sum.live_ms as f64 / sum.live as f64) / 1000.0);
            let stack = self
                .mapped
                .entry(key.clone())
                .or_insert_with(|| MappedStack {
                    series: Series::new(),
                    assessment: Assessment::default(),
                    mean_age: None,
                    seen: true,
                });
            stack.seen = true;
            stack.mean_age = mean_age;
            stack.series.push(
                Point {
                    t,
                    bytes: sum.bytes.max(0) as f64,
                    mean_age,
                },
                &self.detector,
            );
            stack.assessment = stack.series.assess(&self.detector);
            sites.push(GrowthSite {
                labels: container.labels.clone(),
                source: "mapped",
                stack_id: key.1.clone(),
                site: site_of(&sum.frames),
                populated_bytes: None,
                mapped_bytes: Some(sum.bytes.max(0) as u64),
                assessment: Some(SiteAssessment {
                    suspect: stack.assessment.suspect,
                    score: stack.assessment.score,
                    growth_bytes_per_second: stack.assessment.growth_bytes_per_second,
                    mean_age_seconds: stack.mean_age,
                }),
                frames: sum.frames.clone(),
            });
        }
        // Stacks of gone processes: their series end.
        self.mapped.retain(|_, stack| stack.seen);
        for (id, container) in &self.containers {
            let bytes = per_container.get(id).map_or(0, |(_, bytes)| *bytes);
            metrics
                .mapped_bytes
                .with_label_values(&container.labels.values())
                .set(bytes);
        }
        for site in &sites {
            let bytes = site.mapped_bytes.unwrap_or(0);
            if bytes > 0 {
                observed
                    .mapped_profiles
                    .entry(site.labels.container.clone())
                    .or_default()
                    .push(ProfileSample {
                        frames: site.frames.clone(),
                        bytes,
                        count: 1,
                    });
            }
        }
        // Suspects first, then the largest.
        let suspect = |s: &GrowthSite| s.assessment.as_ref().is_some_and(|a| a.suspect);
        let mut sites = top_sites(sites, |s| {
            u64::from(suspect(s)) << 63 | s.mapped_bytes.unwrap_or(0)
        });
        observed.sites.append(&mut sites);
    }
}

fn site_of(frames: &[Frame]) -> String {
    frames
        .first()
        .map(Frame::site)
        .unwrap_or_else(|| "[no stack]".into())
}

/// The `SITES_PER_CONTAINER` sites of each container that rank highest by `rank`.
fn top_sites(mut sites: Vec<GrowthSite>, rank: impl Fn(&GrowthSite) -> u64) -> Vec<GrowthSite> {
    sites.sort_by(|a, b| rank(b).cmp(&rank(a)).then(a.stack_id.cmp(&b.stack_id)));
    let mut kept: HashMap<String, usize> = HashMap::new();
    sites.retain(|site| {
        let n = kept.entry(site.labels.container.clone()).or_default();
        *n += 1;
        *n <= SITES_PER_CONTAINER
    });
    sites
}

/// Anonymous memory of a cgroup v2 directory (`anon` in its `memory.stat`), when its memory
/// controller is enabled there.
fn cgroup_anon(dir: &std::path::Path) -> Option<u64> {
    // No directory: a v1-only container whose memory controller is not mounted.
    if !dir.is_absolute() {
        return None;
    }
    let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    parse_memory_stat_anon(&stat)
}

/// `anon` (cgroup v2), or `total_rss` (the v1 memory controller, for containers of hybrid
/// hosts: anonymous memory and swap cache, with descendants, as v2's `anon`).
fn parse_memory_stat_anon(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| {
            line.strip_prefix("anon ")
                .or_else(|| line.strip_prefix("total_rss "))
        })
        .and_then(|value| value.trim().parse().ok())
}

/// Anonymous resident memory of process `pid` in bytes (`RssAnon` of /proc/PID/status).
fn anon_rss(pid: u32) -> Option<u64> {
    let status = procfs::process::Process::new(pid as i32)
        .ok()?
        .status()
        .ok()?;
    status.rssanon.map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_anon_from_memory_stat() {
        let stat = "anon_thp 0\nanon 1234567\nfile 42\n";
        assert_eq!(parse_memory_stat_anon(stat), Some(1_234_567));
        assert_eq!(parse_memory_stat_anon("file 42\n"), None);
        assert_eq!(parse_memory_stat_anon("anon lots\n"), None);
        let v1 = "cache 4096\nrss 8192\nrss_huge 0\ntotal_cache 4096\ntotal_rss 12288\n";
        assert_eq!(parse_memory_stat_anon(v1), Some(12288));
    }

    #[test]
    fn own_anonymous_memory_is_readable() {
        assert!(anon_rss(std::process::id()).is_some_and(|bytes| bytes > 0));
    }
}
