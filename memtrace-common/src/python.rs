//! The contract for CPython support: where the interpreter keeps its thread state and
//! frames (per traced process), the Python frames stored next to a native stack, the
//! garbage-collector statistics, and the Python-specific counters.

/// Names of the Python maps in the BPF object.
pub mod maps {
    /// tgid → [`super::PyConfig`]: how to find this process's Python frames.
    pub const PY_PROCS: &str = "PY_PROCS";
    /// One `u32`: 1 while `PY_PROCS` has an entry, so that the stack walk of a node with no
    /// traced Python process skips its lookup.
    pub const PY_ANY: &str = "PY_ANY";
    /// Stack id (the same id as in `STACKS`) → [`super::PyStack`]: the Python frames that
    /// were running when that stack allocated.
    pub const PY_STACKS: &str = "PY_STACKS";
    /// Per-CPU scratch where Python frames are gathered before they are stored.
    pub const PY_SCRATCH: &str = "PY_SCRATCH";
    /// Per-CPU counters, indexed by [`super::PyCounter`].
    pub const PY_COUNTERS: &str = "PY_COUNTERS";
    /// Thread (pid_tgid) → [`super::GcCall`]: a collection in progress.
    pub const PY_GC_CALLS: &str = "PY_GC_CALLS";
    /// [`super::GcKey`] → [`super::GcStats`]: collections per process and generation.
    pub const PY_GC: &str = "PY_GC";
    /// (tgid << 32 | size class) → the [`crate::UsageKey`] of the stack that last took a
    /// free pool of that class: the class's next fresh pool is charged to it.
    pub const PY_POOL_DEBT: &str = "PY_POOL_DEBT";
    /// [`crate::ProcessKey`] → live blocks of the object allocator (`i64`, per CPU: sum
    /// them); only in exact mode, where every `_PyObject_*` call is seen.
    pub const PY_LIVE: &str = "PY_LIVE";
}

/// Python frames kept per stack (innermost first); deeper ones are cut and counted.
pub const MAX_PY_DEPTH: usize = 48;
/// Hops from `_PyRuntime` to the current thread state, at most.
pub const MAX_TSTATE_HOPS: usize = 4;
/// Thread states visited, at most, when the GIL holder is not the allocating thread.
pub const MAX_THREADS_SCANNED: u32 = 16;
/// Bytes of an interpreter frame read in one go: every field we use lies below.
pub const FRAME_READ_BYTES: usize = 72;
/// `offset` values in [`PyConfig`] that mean "this version has no such field".
pub const NO_FIELD: u32 = u32::MAX;
/// Bucket bounds of the collection-duration histogram: `GC_FIRST_BUCKET_NS << i`.
pub const GC_BUCKETS: usize = 16;
pub const GC_FIRST_BUCKET_NS: u64 = 10_000;
/// Generations counted separately (CPython has 3; anything else lands in the last slot).
pub const GC_GENERATIONS: u32 = 3;

/// How to walk one process's Python frames. Offsets are in bytes; a "hop" reads the
/// pointer at `current + hop` and continues from there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyConfig {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// Addresses of code objects that are not real code (3.13: `Py_None` on shim frames,
    /// `_Py_InitCleanup`); 0 = none.
    pub skip_code: [u64; 2],
    /// Bytes of growth one pool refill stands for (pymalloc's `POOL_SIZE`).
    pub pool_bytes: u64,
    /// Address of pymalloc's `usable_arenas` pointer (3.11), or 0: then it is at
    /// `usable_arenas_in_state` in the state `allocate_from_new_pool` takes (3.12+).
    pub usable_arenas: u64,
    /// From `_PyRuntime` to the thread state holding the GIL (3.11: `tstate_current`;
    /// 3.12+: the GIL's `last_holder`).
    pub tstate_hops: [u32; MAX_TSTATE_HOPS],
    pub tstate_hop_count: u32,
    /// `_PyRuntime` → main interpreter (a hop), its thread list head, a thread state's
    /// `next`: the fallback when the GIL holder is another thread.
    pub interp_main: u32,
    pub threads_head: u32,
    pub thread_next: u32,
    pub native_thread_id: u32,
    /// From the thread state to the innermost `_PyInterpreterFrame` (one or two hops).
    pub frame_hops: [u32; 2],
    pub frame_hop_count: u32,
    /// Fields of `_PyInterpreterFrame`.
    pub frame_code: u32,
    pub frame_previous: u32,
    pub frame_instr: u32,
    /// `owner` (a byte), and the value that marks a C-stack shim frame, or [`NO_FIELD`].
    pub frame_owner: u32,
    pub owner_cstack: u32,
    /// `is_entry` (a byte, 3.11), or [`NO_FIELD`].
    pub frame_is_entry: u32,
    pub usable_arenas_in_state: u32,
    /// `arena_object.freepools`: a refill that reuses a free pool is no growth.
    pub arena_freepools: u32,
    /// Which argument of `allocate_from_new_pool` is the size class (3.11: 0; 3.12+: 1),
    /// and `pool_header.szidx`, the class a free pool served last.
    pub pool_size_arg: u32,
    pub pool_szidx: u32,
}

/// One Python frame as seen in BPF: symbolized in userspace from the process's memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    /// Address of the code object.
    pub code: u64,
    /// The frame's instruction pointer minus `code`, in bytes (truncated to 32 bits).
    pub instr_offset: i32,
    /// The frame's `owner` byte (bits 0–7) and `is_entry` byte (bits 8–15; 3.11), raw:
    /// userspace tells shim frames and entries from C apart (no branch per frame in BPF).
    pub flags: u32,
}

/// The Python frames of one stack, innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyStack {
    pub len: u32,
    /// 1 when the chain was longer than [`MAX_PY_DEPTH`].
    pub truncated: u32,
    pub frames: [PyFrame; MAX_PY_DEPTH],
}

impl Default for PyStack {
    fn default() -> Self {
        Self {
            len: 0,
            truncated: 0,
            frames: [PyFrame::default(); MAX_PY_DEPTH],
        }
    }
}

/// Slots of `PY_COUNTERS`. Numbers are part of the contract: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PyCounter {
    /// A read of the interpreter's memory failed (a frame, the thread state).
    ReadFailed = 0,
    /// No thread state of the allocating thread was found.
    ThreadNotFound = 1,
    /// A chain was deeper than [`MAX_PY_DEPTH`]: outer frames were cut.
    Truncated = 2,
    /// `PY_STACKS` was full: a stack kept its native frames only.
    StacksFull = 3,
    /// A pool refill (growth mode) was counted.
    PoolRefills = 4,
}

impl PyCounter {
    pub const COUNT: u32 = 5;
    pub const ALL: [PyCounter; Self::COUNT as usize] = [
        PyCounter::ReadFailed,
        PyCounter::ThreadNotFound,
        PyCounter::Truncated,
        PyCounter::StacksFull,
        PyCounter::PoolRefills,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            PyCounter::ReadFailed => "python_read_failed",
            PyCounter::ThreadNotFound => "python_thread_not_found",
            PyCounter::Truncated => "python_stack_truncated",
            PyCounter::StacksFull => "python_stacks_map_full",
            PyCounter::PoolRefills => "python_pool_refills",
        }
    }
}

/// A collection being run by one thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GcCall {
    pub started_ns: u64,
    pub generation: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GcKey {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub generation: u32,
}

/// Collections of one (cgroup, process, generation); `buckets[i]` counts durations below
/// `GC_FIRST_BUCKET_NS << i` (not cumulative); longer ones are only in `count`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub count: u64,
    pub duration_ns_sum: u64,
    pub buckets: [u64; GC_BUCKETS],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)] with explicit padding and only integer fields.
    unsafe impl aya::Pod for PyConfig {}
    unsafe impl aya::Pod for PyFrame {}
    unsafe impl aya::Pod for PyStack {}
    unsafe impl aya::Pod for GcCall {}
    unsafe impl aya::Pod for GcKey {}
    unsafe impl aya::Pod for GcStats {}
}

const _: () = {
    assert!(core::mem::size_of::<PyConfig>() == 8 * 5 + 4 * 22);
    assert!(core::mem::size_of::<PyFrame>() == 16);
    assert!(core::mem::size_of::<PyStack>() == 8 + 16 * MAX_PY_DEPTH);
    assert!(core::mem::size_of::<GcCall>() == 16);
    assert!(core::mem::size_of::<GcKey>() == 16);
    assert!(core::mem::size_of::<GcStats>() == 16 + 8 * GC_BUCKETS);
};
