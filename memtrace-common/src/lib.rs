//! The contract between memtrace's BPF programs and its userspace: map names, map value
//! layouts, counter slots and load-time globals. Nothing else lives here.
//!
//! Every type is `#[repr(C)]`, `Copy`, and has explicit padding, so both sides agree on
//! the layout byte for byte. `aya::Pod` is implemented only with the `user` feature, so the
//! BPF side never depends on `aya`.
#![no_std]

pub mod python;

/// Names of the maps in the BPF object, as userspace looks them up.
pub mod maps {
    /// Per-thread state between an allocator's entry and its return (LRU: slots of
    /// exited threads age out).
    pub const THREADS: &str = "THREADS";
    /// Live heap blocks: [`crate::AllocKey`] → [`crate::AllocInfo`].
    pub const ALLOCS: &str = "ALLOCS";
    /// Live anonymous mappings made by the program itself: same layout as `ALLOCS`.
    pub const MMAPS: &str = "MMAPS";
    /// Running totals per (cgroup, process, stack): [`crate::UsageKey`] → [`crate::Usage`].
    pub const USAGE: &str = "USAGE";
    /// Exact totals per (cgroup, process): [`crate::ProcessKey`] → [`crate::ProcessTotals`],
    /// per CPU (sum them). In exact mode (`SAMPLE_BYTES` 1) it holds only the blocks that are
    /// in no `USAGE` entry (zero-size, or `USAGE` full): add the process's `USAGE` entries.
    pub const PROCESS_TOTALS: &str = "PROCESS_TOTALS";
    /// User stacks walked by memtrace itself: stack id → [`crate::StackFrames`].
    pub const STACKS: &str = "STACKS";
    /// Per-CPU scratch where a stack is built before it is stored.
    pub const STACK_SCRATCH: &str = "STACK_SCRATCH";
    /// Per-CPU event counters, indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Processes to count when `FILTER_PROCESSES` is set: tgid → 1.
    pub const TRACED: &str = "TRACED";
    /// Per-CPU `i64`: `ALLOCS` entries marked [`crate::FREED`] minus those reused (sum
    /// over CPUs: how many there are, less what userspace swept).
    pub const FREED_ENTRIES: &str = "FREED_ENTRIES";
    /// One `u64`: the sweep epoch userspace advances; a freed entry records it.
    pub const SWEEP_EPOCH: &str = "SWEEP_EPOCH";
    /// Always-on tier: containers whose page faults are counted, cgroup id → 1.
    pub const WATCHED_CGROUPS: &str = "WATCHED_CGROUPS";
    /// Always-on tier: processes whose page faults are counted, tgid → 1.
    pub const WATCHED_PROCESSES: &str = "WATCHED_PROCESSES";
    /// Always-on tier: pages populated per (cgroup, process, stack):
    /// [`crate::UsageKey`] → [`crate::FaultGrowth`].
    pub const FAULTS: &str = "FAULTS";
}

/// Names of the BPF programs userspace attaches by name (besides the allocator probes).
pub mod programs {
    /// The always-on tier's BTF tracepoint program.
    pub const PAGE_FAULT_USER: &str = "page_fault_user";
}

/// Names of the read-only globals userspace sets before loading.
pub mod globals {
    /// `u64`: each byte is sampled with probability 1/SAMPLE_BYTES; 1 = exact.
    pub const SAMPLE_BYTES: &str = "SAMPLE_BYTES";
    /// `u64`: the target's page size (pvalloc rounds to it, mmap lengths round to it).
    pub const PAGE_SIZE: &str = "PAGE_SIZE";
    /// `u64`: 1 = count only processes in `TRACED` (probes shared node-wide).
    pub const FILTER_PROCESSES: &str = "FILTER_PROCESSES";
    /// `u64`: the always-on tier walks every FAULT_SAMPLE-th populating page fault per CPU.
    pub const FAULT_SAMPLE: &str = "FAULT_SAMPLE";
}

/// Default capacities; userspace resizes every map at load time from its flags.
pub mod capacity {
    pub const THREADS: u32 = 16_384;
    pub const ALLOCS: u32 = 1 << 20;
    pub const MMAPS: u32 = 65_536;
    pub const USAGE: u32 = 65_536;
    pub const PROCESS_TOTALS: u32 = 16_384;
    pub const STACKS: u32 = 16_384;
    pub const TRACED: u32 = 16_384;
    pub const WATCHED_CGROUPS: u32 = 4_096;
    pub const FAULTS: u32 = 65_536;
}

/// How far back (in pages) `munmap` looks for the start of a mapping it cuts into.
/// A cut deeper than this into one mapping is counted as [`Counter::MunmapUnresolved`].
pub const MUNMAP_MAX_PAGES_BACK: u32 = 1024;
/// How many adjacent tracked mappings one `munmap` call may cover.
pub const MUNMAP_MAX_REGIONS: u32 = 8;

/// A call entering within this long after an allocator call on the same thread, deeper
/// on its stack, is nested in it. No allocator call lasts a second.
pub const NESTED_MAX_NS: u64 = 1_000_000_000;

/// `size` of an `ALLOCS` entry whose block was freed. A free marks its entry instead of
/// deleting it, and the next block at the same address (malloc hands freed addresses out
/// again first) overwrites it in place: two hash-map updates per pair fewer. Its
/// `timestamp_ns` then holds the sweep epoch of the free; userspace deletes entries left
/// freed for a whole epoch.
pub const FREED: u64 = u64::MAX;

/// `stack_id` of an allocation whose stack was not walked (sampled out or walk failed).
pub const NO_STACK: u64 = 0;

/// Frames kept per stack, the allocator's caller included.
pub const MAX_STACK_DEPTH: usize = 64;

/// Allocation counts are kept in thousandths so that sampled estimates (1/p per sample)
/// stay integers; with exact tracing every allocation weighs exactly `COUNT_SCALE`.
pub const COUNT_SCALE: u64 = 1000;

/// Slots of the `COUNTERS` per-CPU array. Numbers are part of the contract: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `ALLOCS` was full: a block went untracked (its free will look unmatched).
    AllocsFull = 0,
    /// `USAGE` was full: a block is in the totals but in no stack.
    UsageFull = 1,
    /// A stack could not be stored (`STACKS` full) or its first frame not read.
    StackWalkFailed = 2,
    /// `THREADS` was full: an allocator call went untraced.
    ThreadsFull = 3,
    /// `MMAPS` was full: a mapping went untracked.
    MmapsFull = 4,
    /// A `munmap` cut into a mapping whose start was out of reach, or spanned too many.
    MunmapUnresolved = 5,
    /// `PROCESS_TOTALS` was full.
    ProcessTotalsFull = 6,
    /// `free`/`realloc` of an address never seen allocated (not a drop: counted for users).
    UnmatchedFree = 7,
    /// A user-memory read failed (posix_memalign's out-pointer, the return address).
    ReadFailed = 8,
    /// `FAULTS` was full: a page fault of the always-on tier went unattributed.
    FaultsFull = 9,
    /// A shared probe fired in a process memtrace does not trace (it maps a probed file):
    /// the BPF program returned at once, but that process paid the trap.
    UntracedHit = 10,
}

impl Counter {
    pub const COUNT: u32 = 11;
    /// Every counter, in slot order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::AllocsFull,
        Counter::UsageFull,
        Counter::StackWalkFailed,
        Counter::ThreadsFull,
        Counter::MmapsFull,
        Counter::MunmapUnresolved,
        Counter::ProcessTotalsFull,
        Counter::UnmatchedFree,
        Counter::ReadFailed,
        Counter::FaultsFull,
        Counter::UntracedHit,
    ];

    /// The label userspace reports this counter under.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::AllocsFull => "allocs_map_full",
            Counter::UsageFull => "usage_map_full",
            Counter::StackWalkFailed => "stack_walk_failed",
            Counter::ThreadsFull => "threads_map_full",
            Counter::MmapsFull => "mmaps_map_full",
            Counter::MunmapUnresolved => "munmap_unresolved",
            Counter::ProcessTotalsFull => "process_totals_map_full",
            Counter::UnmatchedFree => "unmatched_free",
            Counter::ReadFailed => "user_read_failed",
            Counter::FaultsFull => "faults_map_full",
            Counter::UntracedHit => "untraced_probe_hit",
        }
    }

    /// Whether this counter means memtrace lost information (a drop), as opposed to an
    /// event in the target worth reporting (an unmatched free).
    pub const fn is_drop(self) -> bool {
        !matches!(self, Counter::UnmatchedFree | Counter::UntracedHit)
    }
}

/// Which allocator entry point a thread is inside; selects what the return probe does.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    /// malloc, calloc, valloc, pvalloc, aligned_alloc, memalign: the result is the block.
    Plain = 0,
    /// realloc and reallocarray: the result replaces the block stashed at entry.
    Realloc = 1,
    /// posix_memalign: returns 0 on success; the block is written through `out_ptr`.
    PosixMemalign = 2,
    /// mmap: `MAP_FAILED` is failure; only anonymous mappings are recorded.
    Mmap = 3,
}

/// A live block or mapping: the process and the address, never the address alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// What the usage of one stack is aggregated under.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UsageKey {
    /// cgroup v2 id of the allocating task at allocation time.
    pub cgroup_id: u64,
    pub tgid: u32,
    pub _pad: u32,
    /// Key in `STACKS` (a hash of the frames), or [`NO_STACK`].
    pub stack_id: u64,
}

/// A user stack: return addresses, innermost first, starting at the allocator's caller.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackFrames {
    /// How many of `ips` are frames.
    pub len: u32,
    pub _pad: u32,
    pub ips: [u64; MAX_STACK_DEPTH],
}

impl Default for StackFrames {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            ips: [0; MAX_STACK_DEPTH],
        }
    }
}

/// One live block (or mapping).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocInfo {
    /// Requested size in bytes (exact).
    pub size: u64,
    /// Estimated bytes this block stands for in `USAGE`; 0 when it was not sampled.
    pub weight_bytes: u64,
    /// Estimated allocations this block stands for, in 1/[`COUNT_SCALE`] units.
    pub weight_count: u64,
    /// `bpf_ktime_get_ns` at the allocator call's entry.
    pub timestamp_ns: u64,
    pub usage: UsageKey,
}

/// Running totals of one (cgroup, process, stack). Estimates when sampling.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Live bytes (signed: a partial free of a sampled mapping can round below zero).
    pub outstanding_bytes: i64,
    /// Live allocations, in 1/[`COUNT_SCALE`] units.
    pub outstanding_count: i64,
    pub allocated_bytes: u64,
    /// Allocations made, in 1/[`COUNT_SCALE`] units.
    pub allocated_count: u64,
    pub freed_bytes: u64,
    /// Live sampled blocks of this stack (not scaled), and the sum of their allocation
    /// times in ms: together the mean age of what stays live, in O(1). It keeps growing
    /// for a leak (old blocks stay) and stays flat for churn.
    pub live_blocks: u64,
    pub live_time_ms_sum: u64,
}

/// Memory growth of one (cgroup, process, stack) seen by the always-on tier: pages the
/// stack populated by touching them (estimates when `FAULT_SAMPLE` > 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultGrowth {
    pub bytes: u64,
    pub faults: u64,
}

/// Exact totals are kept per cgroup and process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// Exact totals of one process, whatever the sampling rate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessTotals {
    pub allocated_bytes: u64,
    pub freed_bytes: u64,
    pub outstanding_bytes: i64,
    pub outstanding_count: i64,
    pub allocations: u64,
    pub unmatched_frees: u64,
}

/// Per-thread state from an allocator's entry to its return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadState {
    /// Nesting depth of allocator calls in flight on this thread (0: none); only the
    /// outermost call is recorded. The slot stays in the (LRU) map between calls.
    pub depth: u32,
    /// An [`AllocKind`] as `u32`.
    pub kind: u32,
    /// Stack pointer and time at the outermost entry: a call is nested only if it runs
    /// deeper on the stack, soon after. A slot left behind by a call that never returned
    /// (a thread killed inside malloc, a probe attached mid-call) is not mistaken for an
    /// enclosing call.
    pub sp: u64,
    pub entered_ns: u64,
    /// The new block as seen at entry (size, weights, stack); `timestamp_ns` is set from
    /// `entered_ns` at return.
    pub pending: AllocInfo,
    /// posix_memalign: where the block pointer will be written.
    pub out_ptr: u64,
    /// realloc: the old block, removed from `ALLOCS` at entry, restored if realloc fails.
    pub old_addr: u64,
    pub old: AllocInfo,
    /// realloc: 1 if `old` holds a block to restore on failure.
    pub has_old: u32,
    /// realloc: 1 if a failure leaves the old block live (size > 0).
    pub restore_on_failure: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] with explicit padding and only integer fields.
    unsafe impl aya::Pod for AllocKey {}
    unsafe impl aya::Pod for UsageKey {}
    unsafe impl aya::Pod for AllocInfo {}
    unsafe impl aya::Pod for Usage {}
    unsafe impl aya::Pod for ProcessKey {}
    unsafe impl aya::Pod for ProcessTotals {}
    unsafe impl aya::Pod for ThreadState {}
    unsafe impl aya::Pod for StackFrames {}
    unsafe impl aya::Pod for FaultGrowth {}
}

// Layouts are part of the contract: catch accidental changes (and implicit padding).
const _: () = {
    assert!(core::mem::size_of::<AllocKey>() == 16);
    assert!(core::mem::size_of::<UsageKey>() == 24);
    assert!(core::mem::size_of::<StackFrames>() == 8 + 8 * MAX_STACK_DEPTH);
    assert!(core::mem::size_of::<AllocInfo>() == 56);
    assert!(core::mem::size_of::<Usage>() == 56);
    assert!(core::mem::size_of::<ProcessKey>() == 16);
    assert!(core::mem::size_of::<ProcessTotals>() == 48);
    assert!(core::mem::size_of::<ThreadState>() == 8 + 16 + 56 + 8 + 8 + 56 + 8);
};

/// Process lifecycle events: `exec` and `fork` in a watched cgroup (or by a traced
/// process) and `exit` of a traced process, from BTF tracepoints through a ring buffer. They are rare
/// (not per allocation): they wake the agent's discovery, which attaches to new processes
/// and frees the map entries of gone ones at once instead of at the next interval.
pub mod lifecycle {
    /// Ring buffer of [`crate::LifecycleEvent`]s.
    pub const EVENTS: &str = "LIFECYCLE_EVENTS";
    /// cgroup id → 1: an exec in this cgroup or any cgroup below it is reported.
    pub const CGROUPS: &str = "LIFECYCLE_CGROUPS";
    /// Per-CPU count of events lost because the ring buffer was full (slot 0).
    pub const DROPS: &str = "LIFECYCLE_DROPS";
    /// Program on `sched_process_exec`.
    pub const EXEC_PROGRAM: &str = "lifecycle_exec";
    /// Program on `sched_process_exit`.
    pub const EXIT_PROGRAM: &str = "lifecycle_exit";
    /// Program on `task_newtask` (new processes, not threads).
    pub const FORK_PROGRAM: &str = "lifecycle_fork";
    pub const EXEC_TRACEPOINT: &str = "sched_process_exec";
    pub const EXIT_TRACEPOINT: &str = "sched_process_exit";
    pub const FORK_TRACEPOINT: &str = "task_newtask";
    /// Ring buffer size (a power of two, a multiple of the page size): 4096 events.
    pub const RING_BYTES: u32 = 64 * 1024;
    pub const MAX_WATCHED_CGROUPS: u32 = 1024;
    /// cgroup levels checked against `LIFECYCLE_CGROUPS` (the root is level 0).
    pub const MAX_CGROUP_LEVEL: i32 = 16;
    /// [`crate::LifecycleEvent::kind`]: a process called exec.
    pub const EXEC: u32 = 1;
    /// [`crate::LifecycleEvent::kind`]: a traced process exited.
    pub const EXIT: u32 = 2;
    /// [`crate::LifecycleEvent::kind`]: a process forked a child (without exec) in a
    /// watched cgroup; `tgid` is the parent's.
    pub const FORK: u32 = 3;
}

/// One lifecycle event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// [`lifecycle::EXEC`] or [`lifecycle::EXIT`].
    pub kind: u32,
    pub tgid: u32,
    pub cgroup_id: u64,
    /// When it happened (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
    pub time_ns: u64,
}

const _: () = assert!(core::mem::size_of::<LifecycleEvent>() == 24);
