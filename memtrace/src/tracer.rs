//! Loads memtrace's BPF object, attaches its probes to a process's allocator, and reads the
//! running totals back. The only module that talks to aya.
use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::Path,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use memtrace_common::{
    AllocInfo, AllocKey, COUNT_SCALE, Counter, FREED, NO_STACK, ProcessKey, ProcessTotals,
    StackFrames, ThreadState, Usage, UsageKey, capacity, globals, maps,
};

use crate::{elf::ElfFile, placement, process::FileId};

mod python_maps;
pub use python_maps::PythonStats;

/// The BPF object built by `build.rs` (see `cargo xtask build-ebpf`).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace.bpf.o"));

/// One allocator function and the programs that trace it.
struct ProbeSpec {
    symbol: &'static str,
    entry: &'static str,
    /// Whether `alloc_exit` must see its return.
    returns: bool,
    /// Tracing without it would give wrong numbers (a missing free leaks everything).
    required: bool,
}

const fn probe(
    symbol: &'static str,
    entry: &'static str,
    returns: bool,
    required: bool,
) -> ProbeSpec {
    ProbeSpec {
        symbol,
        entry,
        returns,
        required,
    }
}

/// libc's allocator, in the order probes are attached (aliases keep the first name).
const LIBC_PROBES: &[ProbeSpec] = &[
    probe("malloc", "malloc_enter", true, true),
    probe("calloc", "calloc_enter", true, true),
    probe("realloc", "realloc_enter", true, true),
    probe("free", "free_enter", false, true),
    probe("reallocarray", "reallocarray_enter", true, false),
    probe("posix_memalign", "posix_memalign_enter", true, false),
    probe("aligned_alloc", "aligned_alloc_enter", true, false),
    probe("memalign", "aligned_alloc_enter", true, false),
    probe("valloc", "valloc_enter", true, false),
    probe("pvalloc", "pvalloc_enter", true, false),
    probe("mmap", "mmap_enter", true, false),
    probe("munmap", "munmap_enter", false, false),
];
const EXIT_PROGRAM: &str = "alloc_exit";

/// Who a set of probes was attached for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Owner {
    /// Process-scoped probes of one process.
    Process(u32),
    /// Node-wide probes on one libc file, filtered in BPF by `TRACED`.
    File(FileId),
}

/// What to attach: memtrace's programs, or empty ones at the same spots (the cost floor
/// benchmarks compare against).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    Memtrace,
    Noop,
}

/// Sizes and sampling, fixed when the object is loaded.
#[derive(Clone, Debug)]
pub struct TracerOptions {
    /// 1 = exact; N = each byte sampled with probability 1/N.
    pub sample_bytes: u64,
    /// Capacity of the live-block map.
    pub max_allocations: u32,
    /// Capacity of the stack map (distinct stacks).
    pub max_stacks: u32,
    /// Count only processes in `TRACED` (needed by [`Tracer::trace_shared`]).
    pub filter_processes: bool,
    /// Always-on tier: walk every Nth populating page fault per CPU (1 = every one).
    pub fault_sample: u64,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            sample_bytes: 1,
            max_allocations: capacity::ALLOCS,
            max_stacks: capacity::STACKS,
            filter_processes: false,
            fault_sample: 1,
        }
    }
}

/// Where one allocator function got its probe.
#[derive(Clone, Debug)]
pub struct AttachedProbe {
    pub symbol: &'static str,
    pub offset: u64,
    pub emulated: bool,
}

/// The outcome of attaching to one libc.
#[derive(Clone, Debug, Default)]
pub struct AttachSummary {
    pub probes: Vec<AttachedProbe>,
    /// Symbols this libc does not have (optional ones only; a missing required one fails).
    pub missing: Vec<&'static str>,
    /// Symbols at the same address as one already probed.
    pub aliases: Vec<&'static str>,
}

/// Usage of one stack, as read from the maps.
#[derive(Clone, Debug)]
pub struct StackUsage {
    pub key: UsageKey,
    pub usage: Usage,
    /// Return addresses, innermost first, starting at the allocator's caller; empty when
    /// the stack was not walked.
    pub frames: Vec<u64>,
    /// The Python frames running at that stack, innermost first (CPython processes).
    pub python: Vec<memtrace_common::python::PyFrame>,
}

/// Everything memtrace knows at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub stacks: Vec<StackUsage>,
    pub totals: Vec<(ProcessKey, ProcessTotals)>,
    /// Summed over CPUs, indexed by [`Counter`].
    pub counters: [u64; Counter::COUNT as usize],
}

pub struct Tracer {
    ebpf: Ebpf,
    /// The loaded `SAMPLE_BYTES`: 1 means process totals are partly in `USAGE`.
    sample_bytes: u64,
    /// Capacity of `ALLOCS`.
    max_allocations: u32,
    /// Freed `ALLOCS` entries deleted from here (swept, or purged with their process).
    freed_deleted: i64,
    /// The sweep epoch last written to `SWEEP_EPOCH`.
    sweep_epoch: u64,
    /// Stack ids are hashes of their frames: an id always means the same stack.
    stack_cache: HashMap<u64, Vec<u64>>,
    python_cache: HashMap<u64, Vec<memtrace_common::python::PyFrame>>,
    python_shared: python_maps::SharedProbes,
    loaded: HashSet<&'static str>,
    /// Links per owner (a process, or a libc file shared by traced processes).
    links: HashMap<Owner, Vec<(&'static str, UProbeLinkId)>>,
    /// The traced processes using each shared set of probes.
    shared_users: HashMap<FileId, HashSet<u32>>,
    pid_files: HashMap<u32, FileId>,
    /// Shared sets whose last user went, and since when: detached by
    /// [`Tracer::detach_idle`], so that a process that comes right after (an exec, a
    /// restart) reuses them instead of re-attaching while the kernel still removes them
    /// (new probes on a file whose old ones are being removed missed events for a second
    /// or two here).
    idle_since: HashMap<FileId, std::time::Instant>,
    /// The always-on tier's mmap programs are attached (`crate::mapped`).
    pub(crate) mapped_attached: bool,
    /// The thread closing detached links, and its channel.
    detacher: Option<(
        std::sync::mpsc::Sender<UProbeLink>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.finish_detaching();
    }
}

impl Tracer {
    /// Loads the BPF object with `options`. Fails with a message naming the missing
    /// privilege when the kernel refuses.
    pub fn load(options: &TracerOptions) -> Result<Self> {
        if BPF_OBJECT.is_empty() {
            bail!("this memtrace was built without its BPF object (MEMTRACE_SKIP_EBPF=1)");
        }
        raise_memlock_limit();
        let page_size = page_size();
        let ebpf = EbpfLoader::new()
            .override_global(globals::SAMPLE_BYTES, &options.sample_bytes.max(1), true)
            .override_global(globals::PAGE_SIZE, &page_size, true)
            .override_global(
                globals::FILTER_PROCESSES,
                &u64::from(options.filter_processes),
                true,
            )
            .override_global(globals::FAULT_SAMPLE, &options.fault_sample.max(1), true)
            .map_max_entries(maps::ALLOCS, options.max_allocations)
            .map_max_entries(maps::STACKS, options.max_stacks)
            .map_max_entries(memtrace_common::python::maps::PY_STACKS, options.max_stacks)
            .load(BPF_OBJECT)
            .map_err(|e| explain_load_error(e.into()))?;
        Ok(Self {
            ebpf,
            sample_bytes: options.sample_bytes.max(1),
            max_allocations: options.max_allocations,
            freed_deleted: 0,
            sweep_epoch: 0,
            stack_cache: HashMap::new(),
            python_cache: HashMap::new(),
            python_shared: Default::default(),
            loaded: HashSet::new(),
            links: HashMap::new(),
            shared_users: HashMap::new(),
            pid_files: HashMap::new(),
            idle_since: HashMap::new(),
            mapped_attached: false,
            detacher: None,
        })
    }

    /// Attaches the allocator probes to `libc` (a path readable from here), firing only
    /// in process `pid` (all its threads).
    pub fn attach_libc(&mut self, pid: u32, libc: &Path) -> Result<AttachSummary> {
        self.attach_libc_programs(pid, libc, Programs::Memtrace)
    }

    /// [`Tracer::attach_libc`], choosing which programs run at each spot.
    pub fn attach_libc_programs(
        &mut self,
        pid: u32,
        libc: &Path,
        programs: Programs,
    ) -> Result<AttachSummary> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
        self.attach_probes(libc, scope, Owner::Process(pid), programs)
    }

    /// Traces `pid` through probes shared by every traced process that maps the same libc
    /// `file` (read through `libc`): the first such process attaches them, node-wide, and
    /// the BPF programs then ignore processes not in `TRACED`. Removing a uprobe costs the
    /// kernel ~0.1 s, so one set of probes per file, not per process, is what keeps
    /// following hundreds of processes (and stopping) fast. The price: untraced processes
    /// mapping that file take the trap too (and return at once). Needs a tracer loaded
    /// with [`TracerOptions::filter_processes`].
    pub fn trace_shared(&mut self, pid: u32, libc: &Path, file: FileId) -> Result<()> {
        let mut traced: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.map_mut(maps::TRACED)?)?;
        traced
            .insert(pid, 1, 0)
            .with_context(|| format!("adding pid {pid} to TRACED"))?;
        let first_user = !self.shared_users.contains_key(&file);
        if first_user
            && let Err(e) = self.attach_probes(
                libc,
                UProbeScope::AllProcesses,
                Owner::File(file),
                Programs::Memtrace,
            )
        {
            self.detach_owner(Owner::File(file));
            self.untrace_pid(pid);
            return Err(e);
        }
        self.shared_users.entry(file).or_default().insert(pid);
        self.pid_files.insert(pid, file);
        self.idle_since.remove(&file);
        Ok(())
    }

    /// Traces `pid` through probes of its own (process scope): the kernel puts the
    /// breakpoints in its memory only, so no other process traps on them, and what they
    /// cost is all in what the CPU budget sees. For a few processes at a time (escalated
    /// containers): each probe removed costs the kernel ~0.1 s.
    pub fn trace_process(&mut self, pid: u32, libc: &Path) -> Result<AttachSummary> {
        self.trace_pid(pid)?;
        self.attach_libc(pid, libc).inspect_err(|_| {
            self.detach_owner(Owner::Process(pid));
            self.untrace_pid(pid);
        })
    }

    /// Marks `pid` traced (`TRACED`) without any allocator probe of its own: what other
    /// probes (an interpreter's) need to count it.
    pub fn trace_pid(&mut self, pid: u32) -> Result<()> {
        let mut traced: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.map_mut(maps::TRACED)?)?;
        traced
            .insert(pid, 1, 0)
            .with_context(|| format!("adding pid {pid} to TRACED"))
    }

    /// Stops tracing `pid`, attached by either way: its own probes are detached; a shared
    /// set whose last user goes is left for [`Tracer::detach_idle`].
    pub fn untrace(&mut self, pid: u32) {
        self.untrace_python(pid);
        self.untrace_pid(pid);
        self.detach_owner(Owner::Process(pid));
        if let Some(file) = self.pid_files.remove(&pid) {
            let users = self.shared_users.entry(file).or_default();
            users.remove(&pid);
            if users.is_empty() {
                self.idle_since.insert(file, std::time::Instant::now());
            }
        }
    }

    /// Detaches the shared sets that have had no user for `grace` or longer.
    pub fn detach_idle(&mut self, grace: std::time::Duration) {
        let now = std::time::Instant::now();
        let idle: Vec<FileId> = self
            .idle_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= grace)
            .map(|(file, _)| *file)
            .collect();
        for file in idle {
            self.idle_since.remove(&file);
            self.shared_users.remove(&file);
            self.detach_owner(Owner::File(file));
        }
    }

    fn untrace_pid(&mut self, pid: u32) {
        if let Ok(map) = self.map_mut(maps::TRACED)
            && let Ok(mut traced) = BpfHashMap::<&mut MapData, u32, u32>::try_from(map)
        {
            let _ = traced.remove(&pid);
        }
    }

    fn attach_probes(
        &mut self,
        libc: &Path,
        scope: UProbeScope,
        owner: Owner,
        programs: Programs,
    ) -> Result<AttachSummary> {
        let elf = ElfFile::open(libc)?;
        let mut summary = AttachSummary::default();
        let mut probed_offsets = HashSet::new();
        for spec in LIBC_PROBES {
            let Some(function) = elf.function(spec.symbol) else {
                if spec.required {
                    bail!(
                        "{} has no `{}`: not a C library memtrace knows",
                        libc.display(),
                        spec.symbol
                    );
                }
                summary.missing.push(spec.symbol);
                continue;
            };
            if !probed_offsets.insert(function.file_offset) {
                summary.aliases.push(spec.symbol);
                continue;
            }
            let placed = placement::place(elf.code(function, 4096));
            log::debug!(
                "{}: probe at +{} ({})",
                spec.symbol,
                placed.offset,
                if placed.emulated {
                    "emulated"
                } else {
                    "no emulated instruction in its prologue: single-stepped, slower"
                }
            );
            let offset = function.file_offset + placed.offset;
            let (entry, exit) = match programs {
                Programs::Memtrace => (spec.entry, EXIT_PROGRAM),
                Programs::Noop => ("noop_enter", "noop_exit"),
            };
            // The return probe goes first: an entry without its return would leave the
            // thread's slot claiming a call in flight.
            if spec.returns {
                // Same spot as the entry probe: one breakpoint serves both.
                self.attach_program(exit, offset, libc, scope, owner)
                    .with_context(|| format!("attaching {exit} to {}", spec.symbol))?;
            }
            self.attach_program(entry, offset, libc, scope, owner)
                .with_context(|| format!("attaching {entry} to {}", spec.symbol))?;
            summary.probes.push(AttachedProbe {
                symbol: spec.symbol,
                offset: placed.offset,
                emulated: placed.emulated,
            });
        }
        Ok(summary)
    }

    /// Attaches one of memtrace's programs (and its return program, first) at `offset` of
    /// `target`, in process `pid` only. For calibration: the allocator probes' programs
    /// on stand-in functions.
    pub(crate) fn attach_at(
        &mut self,
        entry: &'static str,
        exit: Option<&'static str>,
        target: &Path,
        offset: u64,
        pid: u32,
    ) -> Result<()> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
        if let Some(exit) = exit {
            self.attach_program(exit, offset, target, scope, Owner::Process(pid))?;
        }
        self.attach_program(entry, offset, target, scope, Owner::Process(pid))
    }

    fn attach_program(
        &mut self,
        name: &'static str,
        offset: u64,
        target: &Path,
        scope: UProbeScope,
        owner: Owner,
    ) -> Result<()> {
        let program: &mut UProbe = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("the BPF object has no program {name}"))?
            .try_into()?;
        if self.loaded.insert(name) {
            program.load().map_err(|e| explain_load_error(e.into()))?;
            if let Ok(info) = program.info() {
                log::debug!(
                    "{name}: {:?} instructions verified",
                    info.verified_instruction_count()
                );
            }
        }
        let link = program.attach(UProbeAttachLocation::AbsoluteOffset(offset), target, scope)?;
        self.links.entry(owner).or_default().push((name, link));
        Ok(())
    }

    /// Detaches the probes of `owner` (none is an error: it may never have attached, or
    /// attached halfway).
    ///
    /// Removing a uprobe is slow in the kernel (80–240 ms per probe measured on 6.18, and
    /// serialized: closing links from many threads at once was no faster), so links are
    /// handed to a background thread and the caller goes on at once.
    /// [`Tracer::finish_detaching`] waits until all are closed.
    fn detach_owner(&mut self, owner: Owner) {
        for (name, link) in self.links.remove(&owner).unwrap_or_default() {
            let taken = self
                .ebpf
                .program_mut(name)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
                .map(|p| p.take_link(link));
            match taken {
                Some(Ok(link)) => {
                    if let Err(unsent) = self.detacher().send(link) {
                        drop(unsent.0); // the thread is gone: close it here
                    }
                }
                Some(Err(e)) => log::debug!("detaching {name} ({owner:?}): {e}"),
                None => {}
            }
        }
    }

    /// The channel to the thread that closes links, started on first use.
    fn detacher(&mut self) -> &std::sync::mpsc::Sender<UProbeLink> {
        &self.detacher.get_or_insert_with(spawn_detacher).0
    }

    /// Detaches everything and waits until the kernel has removed every probe.
    pub fn finish_detaching(&mut self) {
        for owner in self.links.keys().copied().collect::<Vec<_>>() {
            self.detach_owner(owner);
        }
        if let Some((sender, thread)) = self.detacher.take() {
            drop(sender);
            let _ = thread.join();
        }
    }

    /// Loads every program of the object (uprobes, and the BTF tracepoint programs on
    /// their tracepoints), so that the kernel's verifier checks each (`memtrace check`);
    /// the error of each that fails, by name.
    pub fn load_programs(&mut self) -> Vec<(String, Result<(), String>)> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"));
        let mut results = Vec::new();
        for (name, program) in self.ebpf.programs_mut() {
            let result = match program {
                aya::programs::Program::UProbe(uprobe) => {
                    uprobe.load().map_err(|e| verifier_tail(&format!("{e}")))
                }
                aya::programs::Program::BtfTracePoint(program) => {
                    match (btf_tracepoint_of(name), &btf) {
                        (Some(tracepoint), Ok(btf)) => program
                            .load(tracepoint, btf)
                            .map_err(|e| verifier_tail(&format!("{e}"))),
                        (None, _) => Err(format!("no tracepoint known for program {name}")),
                        (_, Err(e)) => Err(e.clone()),
                    }
                }
                other => Err(format!("not checked: {:?} programs", other.prog_type())),
            };
            results.push((name.to_owned(), result));
        }
        results.sort_by(|a, b| a.0.cmp(&b.0));
        results
    }

    /// How many probes (entry and return) are attached now.
    pub fn attached_probes(&self) -> usize {
        self.links.values().map(Vec::len).sum()
    }

    /// The allocation time (`bpf_ktime_get_ns`) of the oldest live block of each stack in
    /// `stacks`. Reads the whole live-block map (two syscalls per entry): call it rarely.
    pub fn oldest_live(&self, stacks: &HashSet<UsageKey>) -> Result<HashMap<UsageKey, u64>> {
        let allocs: BpfHashMap<&MapData, AllocKey, AllocInfo> =
            BpfHashMap::try_from(self.map(maps::ALLOCS)?)?;
        // By process and stack: the agent re-keys the cgroup of some processes (hybrid).
        let wanted: HashMap<(u32, u64), UsageKey> =
            stacks.iter().map(|k| ((k.tgid, k.stack_id), *k)).collect();
        let mut oldest: HashMap<UsageKey, u64> = HashMap::new();
        // Entries may vanish while we walk: skip what fails to read.
        for (_, info) in allocs.iter().filter_map(Result::ok) {
            let key = wanted.get(&(info.usage.tgid, info.usage.stack_id));
            if let Some(key) = key.filter(|_| info.size != FREED) {
                let time = oldest.entry(*key).or_insert(info.timestamp_ns);
                *time = (*time).min(info.timestamp_ns);
            }
        }
        Ok(oldest)
    }

    /// Deletes everything the maps hold about process `tgid` (after it exited).
    pub fn forget(&mut self, tgid: u32) -> Result<()> {
        self.forget_all(&HashSet::from([tgid]))
    }

    /// [`Tracer::forget`] for several processes at once: one pass over each map, however
    /// many processes exited (short-lived processes come and go by the hundred).
    pub fn forget_all(&mut self, tgids: &HashSet<u32>) -> Result<()> {
        let gone = |tgid: u32| tgids.contains(&tgid);
        fn purge<K: aya::Pod, V: aya::Pod>(
            map: &mut aya::maps::Map,
            belongs: impl Fn(&K) -> bool,
        ) -> Result<()> {
            let mut map: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map)?;
            let doomed: Vec<K> = map
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| belongs(k))
                .collect();
            for key in doomed {
                // Gone already (removed by a racing probe) is fine.
                let _ = map.remove(&key);
            }
            Ok(())
        }
        purge::<UsageKey, Usage>(self.map_mut(maps::USAGE)?, |k| gone(k.tgid))?;
        let mut totals: PerCpuHashMap<&mut MapData, ProcessKey, ProcessTotals> =
            PerCpuHashMap::try_from(self.map_mut(maps::PROCESS_TOTALS)?)?;
        let doomed: Vec<ProcessKey> = totals
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| gone(k.tgid))
            .collect();
        for key in doomed {
            let _ = totals.remove(&key);
        }
        self.purge_allocs(tgids)?;
        purge::<AllocKey, AllocInfo>(self.map_mut(maps::MMAPS)?, |k| gone(k.tgid))?;
        purge::<u64, ThreadState>(self.map_mut(maps::THREADS)?, |k| gone((k >> 32) as u32))?;
        self.forget_python(tgids)
    }

    /// Deletes the `ALLOCS` entries of `tgid`, noting how many were freed entries.
    fn purge_allocs(&mut self, tgids: &HashSet<u32>) -> Result<()> {
        let mut allocs: BpfHashMap<&mut MapData, AllocKey, AllocInfo> =
            BpfHashMap::try_from(self.map_mut(maps::ALLOCS)?)?;
        let doomed: Vec<AllocKey> = allocs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| tgids.contains(&k.tgid))
            .collect();
        let mut freed = 0;
        for key in doomed {
            if allocs.get(&key, 0).is_ok_and(|info| info.size == FREED) {
                freed += 1;
            }
            // Gone already (removed by a racing probe) is fine.
            let _ = allocs.remove(&key);
        }
        self.freed_deleted += freed;
        Ok(())
    }

    pub(crate) fn max_allocations(&self) -> u32 {
        self.max_allocations
    }

    pub(crate) fn freed_deleted(&self) -> i64 {
        self.freed_deleted
    }

    pub(crate) fn note_freed_deleted(&mut self, deleted: u64) {
        self.freed_deleted += deleted as i64;
    }

    pub(crate) fn advance_sweep_epoch(&mut self) -> u64 {
        self.sweep_epoch += 1;
        self.sweep_epoch
    }

    pub(crate) fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("the BPF object has no map {name}"))
    }

    /// Reads every map into a [`Snapshot`], keeping only processes in `tgids`.
    pub fn snapshot(&mut self, tgids: &HashSet<u32>) -> Result<Snapshot> {
        let mut snapshot = Snapshot::default();
        let usage: BpfHashMap<&MapData, UsageKey, Usage> =
            BpfHashMap::try_from(self.map(maps::USAGE)?)?;
        let mut entries = Vec::new();
        for item in usage.iter() {
            let (key, value) = item.context("reading USAGE")?;
            if tgids.contains(&key.tgid) {
                entries.push((key, value));
            }
        }
        for (key, value) in entries {
            let frames = self.frames(key.stack_id)?;
            snapshot.stacks.push(StackUsage {
                key,
                usage: value,
                frames,
                python: Vec::new(),
            });
        }

        for stack in &mut snapshot.stacks {
            if !stack.frames.is_empty() {
                stack.python = self.python_frames(stack.key.stack_id);
            }
        }

        let totals: PerCpuHashMap<&MapData, ProcessKey, ProcessTotals> =
            PerCpuHashMap::try_from(self.map(maps::PROCESS_TOTALS)?)?;
        let mut by_process: HashMap<ProcessKey, ProcessTotals> = HashMap::new();
        for item in totals.iter() {
            let (key, per_cpu) = item.context("reading PROCESS_TOTALS")?;
            if tgids.contains(&key.tgid) {
                by_process.insert(key, sum_totals(per_cpu.iter()));
            }
        }
        if self.sample_bytes <= 1 {
            // Exact mode: a block in a stack is counted there only (one map update less
            // per call in BPF), so a process's totals are its stacks plus the rest.
            for stack in &snapshot.stacks {
                let key = ProcessKey {
                    cgroup_id: stack.key.cgroup_id,
                    tgid: stack.key.tgid,
                    _pad: 0,
                };
                add_usage(by_process.entry(key).or_default(), &stack.usage);
            }
        }
        snapshot.totals = by_process.into_iter().collect();
        snapshot.counters = self.counters()?;
        Ok(snapshot)
    }

    /// The event counters, summed over CPUs, indexed by [`Counter`].
    pub(crate) fn counters(&self) -> Result<[u64; Counter::COUNT as usize]> {
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(maps::COUNTERS)?)?;
        let mut sums = [0; Counter::COUNT as usize];
        for counter in Counter::ALL {
            let per_cpu = counters.get(&(counter as u32), 0)?;
            sums[counter as usize] = per_cpu.iter().sum();
        }
        Ok(sums)
    }

    /// The frames of a stack id (empty for [`NO_STACK`] or an unreadable one), cached:
    /// an id always means the same stack.
    pub(crate) fn frames(&mut self, stack_id: u64) -> Result<Vec<u64>> {
        if stack_id == NO_STACK {
            return Ok(Vec::new());
        }
        if let Some(frames) = self.stack_cache.get(&stack_id) {
            return Ok(frames.clone());
        }
        let stacks: BpfHashMap<&MapData, u64, StackFrames> =
            BpfHashMap::try_from(self.map(maps::STACKS)?)?;
        let frames: Vec<u64> = match stacks.get(&stack_id, 0) {
            Ok(stack) => {
                let len = (stack.len as usize).min(stack.ips.len());
                stack.ips[..len].to_vec()
            }
            Err(e) => {
                log::debug!("stack {stack_id:#x} unreadable: {e}");
                Vec::new()
            }
        };
        self.stack_cache.insert(stack_id, frames.clone());
        Ok(frames)
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub(crate) fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .with_context(|| format!("the BPF object has no map {name}"))
    }

    /// Entries of the per-process maps, whoever they belong to: `TRACED`, and `USAGE` (a
    /// process's stacks, which carry its totals), so that entries left behind by gone
    /// processes show.
    pub fn process_entries(&self) -> Result<(usize, usize)> {
        let traced: BpfHashMap<&MapData, u32, u32> = BpfHashMap::try_from(self.map(maps::TRACED)?)?;
        let usage: BpfHashMap<&MapData, UsageKey, Usage> =
            BpfHashMap::try_from(self.map(maps::USAGE)?)?;
        Ok((traced.keys().count(), usage.keys().count()))
    }
}

/// Where each of libc's allocator functions gets its probe (what [`Tracer::attach_libc`]
/// would attach), without attaching anything.
pub fn probe_plan(libc: &Path) -> Result<Vec<PlannedProbe>> {
    let elf = ElfFile::open(libc)?;
    let mut plan: Vec<PlannedProbe> = Vec::new();
    for spec in LIBC_PROBES {
        let Some(function) = elf.function(spec.symbol) else {
            continue;
        };
        if plan
            .iter()
            .any(|p| p.function_offset == function.file_offset)
        {
            continue; // an alias
        }
        let placed = placement::place(elf.code(function, 4096));
        plan.push(PlannedProbe {
            symbol: spec.symbol,
            function_offset: function.file_offset,
            probe_offset: placed.offset,
            emulated: placed.emulated,
        });
    }
    Ok(plan)
}

/// One probe of [`probe_plan`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlannedProbe {
    pub symbol: &'static str,
    /// The function's offset in the file.
    pub function_offset: u64,
    /// The probe's offset from the function's start.
    pub probe_offset: u64,
    /// The kernel emulates the probed instruction (no out-of-line single step).
    pub emulated: bool,
}

/// The end of a verifier error, where the reason is (the whole log runs to pages).
fn verifier_tail(error: &str) -> String {
    const KEEP: usize = 2000;
    match error.char_indices().rev().nth(KEEP) {
        Some((cut, _)) => format!("...{}", &error[cut..]),
        None => error.to_owned(),
    }
}

/// Starts the thread that closes detached links, fed by the returned channel.
fn spawn_detacher() -> (
    std::sync::mpsc::Sender<UProbeLink>,
    std::thread::JoinHandle<()>,
) {
    let (sender, receiver) = std::sync::mpsc::channel::<UProbeLink>();
    let thread = std::thread::Builder::new()
        .name("memtrace-detach".into())
        .spawn(move || receiver.into_iter().for_each(drop))
        .expect("spawning the detach thread");
    (sender, thread)
}

/// Sums per-CPU totals (each CPU's values wrap independently; the sum is exact).
fn sum_totals<'a>(per_cpu: impl Iterator<Item = &'a ProcessTotals>) -> ProcessTotals {
    per_cpu.fold(ProcessTotals::default(), |sum, t| ProcessTotals {
        allocated_bytes: sum.allocated_bytes.wrapping_add(t.allocated_bytes),
        freed_bytes: sum.freed_bytes.wrapping_add(t.freed_bytes),
        outstanding_bytes: sum.outstanding_bytes.wrapping_add(t.outstanding_bytes),
        outstanding_count: sum.outstanding_count.wrapping_add(t.outstanding_count),
        allocations: sum.allocations.wrapping_add(t.allocations),
        unmatched_frees: sum.unmatched_frees.wrapping_add(t.unmatched_frees),
    })
}

/// The tracepoint each BTF tracepoint program of the object runs on.
fn btf_tracepoint_of(program: &str) -> Option<&'static str> {
    use memtrace_common::{lifecycle, programs};
    [
        (programs::PAGE_FAULT_USER, "page_fault_user"),
        (
            programs::MAPPED_UNMAPPED_AREA,
            programs::UNMAPPED_AREA_TRACEPOINT,
        ),
        (programs::MAPPED_MMAP_LOCK, programs::MMAP_LOCK_TRACEPOINT),
        (lifecycle::EXEC_PROGRAM, lifecycle::EXEC_TRACEPOINT),
        (lifecycle::EXIT_PROGRAM, lifecycle::EXIT_TRACEPOINT),
        (lifecycle::FORK_PROGRAM, lifecycle::FORK_TRACEPOINT),
    ]
    .into_iter()
    .find(|(name, _)| *name == program)
    .map(|(_, tracepoint)| tracepoint)
}

/// Adds one stack's exact usage (counts in 1/`COUNT_SCALE`) to its process's totals.
fn add_usage(totals: &mut ProcessTotals, usage: &Usage) {
    totals.allocated_bytes = totals.allocated_bytes.wrapping_add(usage.allocated_bytes);
    totals.allocations = totals
        .allocations
        .wrapping_add(usage.allocated_count / COUNT_SCALE);
    totals.freed_bytes = totals.freed_bytes.wrapping_add(usage.freed_bytes);
    totals.outstanding_bytes = totals
        .outstanding_bytes
        .wrapping_add(usage.outstanding_bytes);
    totals.outstanding_count = totals
        .outstanding_count
        .wrapping_add(usage.outstanding_count / COUNT_SCALE as i64);
}

/// Turns a permission failure into the one line a user needs.
fn explain_load_error(error: anyhow::Error) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("Operation not permitted")
        || text.contains("EPERM")
        || text.contains("os error 1)")
    {
        return error.context(
            "the kernel refused to load BPF programs: memtrace needs root, or CAP_SYS_ADMIN, \
             CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE",
        );
    }
    error
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the memory cgroup.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

/// Deletes every entry of `map` whose key `doomed` selects (keys listed first: a hash map
/// cannot be changed while it is walked).
pub(crate) fn remove_keys<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<&mut MapData, K, V>,
    doomed: impl Fn(&K) -> bool,
) {
    let keys: Vec<K> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| doomed(k))
        .collect();
    for key in keys {
        let _ = map.remove(&key);
    }
}

/// Adds one stack's usage (counts in 1/`COUNT_SCALE`) to its process's totals.
pub(crate) fn add_to_totals(totals: &mut ProcessTotals, usage: &Usage) {
    totals.allocated_bytes += usage.allocated_bytes;
    totals.allocations += usage.allocated_count / memtrace_common::COUNT_SCALE;
    totals.freed_bytes += usage.freed_bytes;
    totals.outstanding_bytes += usage.outstanding_bytes;
    totals.outstanding_count += usage.outstanding_count / memtrace_common::COUNT_SCALE as i64;
}

impl Tracer {
    /// A [`Snapshot`] of per-stack `entries` (the always-on tier's views): each stack with
    /// its frames, and per-process totals summed from them.
    pub(crate) fn usage_snapshot(&mut self, entries: Vec<(UsageKey, Usage)>) -> Result<Snapshot> {
        let mut snapshot = Snapshot {
            counters: self.counters()?,
            ..Snapshot::default()
        };
        let mut totals: HashMap<ProcessKey, ProcessTotals> = HashMap::new();
        for (key, usage) in entries {
            let process = ProcessKey {
                cgroup_id: key.cgroup_id,
                tgid: key.tgid,
                _pad: 0,
            };
            add_to_totals(totals.entry(process).or_default(), &usage);
            snapshot.stacks.push(StackUsage {
                key,
                usage,
                frames: self.frames(key.stack_id)?,
                // The Python frames that ran, for a process with Python frames configured.
                python: self.python_frames(key.stack_id),
            });
        }
        snapshot.totals = totals.into_iter().collect();
        Ok(snapshot)
    }
}
