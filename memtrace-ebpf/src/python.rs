//! CPython support: the Python frames of an allocating thread, the object allocator's own
//! entry points (exact mode), its pool refills (growth mode), and garbage collections.
//!
//! A process userspace recognised as CPython 3.11–3.13 has a [`PyConfig`] in `PY_PROCS`:
//! where `_PyRuntime` is and the offsets of its version. At each walked stack the thread
//! state holding the GIL (the allocating thread must hold it to call the object allocator;
//! checked against the thread id, with a bounded scan of the thread list as fallback) gives
//! the innermost `_PyInterpreterFrame`, and the `previous` chain the rest. Each frame yields
//! (code object, instruction offset); userspace reads names and line tables itself, from
//! the process, once per code object. Everything is bounded: [`MAX_PY_DEPTH`] frames,
//! [`MAX_THREADS_SCANNED`] thread states, one read per frame into a per-CPU scratch.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use memtrace_common::{
    AllocKind, ProcessKey, UsageKey, capacity,
    python::{
        FRAME_READ_BYTES, GC_BUCKETS, GC_FIRST_BUCKET_NS, GC_GENERATIONS, GcCall, GcKey, GcStats,
        MAX_PY_DEPTH, MAX_THREADS_SCANNED, MAX_TSTATE_HOPS, NO_FIELD, PyConfig, PyCounter, PyFrame,
        PyStack,
    },
};

use crate::{
    account_alloc, account_free, enter, enter_plain, enter_realloc, inside_allocator, is_traced,
    mix, save, take, unmatched_free, usage_of,
};

#[map]
static PY_PROCS: HashMap<u32, PyConfig> = HashMap::with_max_entries(capacity::TRACED, 0);
/// 1 while `PY_PROCS` is not empty (an array lookup is nearly free; a hash lookup is not).
#[map]
static PY_ANY: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static PY_STACKS: HashMap<u64, PyStack> =
    HashMap::with_max_entries(capacity::STACKS, BPF_F_NO_PREALLOC);
#[map]
static PY_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
#[map]
static PY_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PyCounter::COUNT, 0);
#[map]
static PY_GC_CALLS: LruHashMap<u64, GcCall> = LruHashMap::with_max_entries(capacity::THREADS, 0);
#[map]
static PY_GC: HashMap<GcKey, GcStats> = HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);
#[map]
static PY_POOL_DEBT: LruHashMap<u64, UsageKey> =
    LruHashMap::with_max_entries(capacity::TRACED * 4, 0);
#[map]
static PY_LIVE: PerCpuHashMap<ProcessKey, i64> =
    PerCpuHashMap::with_max_entries(capacity::PROCESS_TOTALS, 0);

/// Per-CPU working space: the stack being built, and one frame's bytes.
#[repr(C)]
pub struct Scratch {
    stack: PyStack,
    /// 8-byte words so that fields at 8-aligned offsets are read without shifts.
    frame: [u64; 16],
}

// One frame's read fits the scratch.
const _: () = assert!(FRAME_READ_BYTES <= 16 * 8);

#[inline(always)]
fn count(counter: PyCounter) {
    if let Some(slot) = PY_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}

/// Reads the pointer at `address` in the current process.
#[inline(always)]
fn read_u64(address: u64) -> Option<u64> {
    // SAFETY: the helper checks the address.
    match unsafe { aya_ebpf::helpers::bpf_probe_read_user(address as *const u64) } {
        Ok(value) => Some(value),
        Err(_) => {
            count(PyCounter::ReadFailed);
            None
        }
    }
}

/// The word at byte `offset` of a frame read into `frame` (offsets are 8-aligned, < 64;
/// userspace checks).
#[inline(always)]
fn word(frame: &[u64; 16], offset: u32) -> u64 {
    frame[(offset as usize >> 3) & 7]
}

/// The byte at `offset` of a frame read into `frame`; 0 for [`NO_FIELD`].
#[inline(always)]
fn byte(frame: &[u64; 16], offset: u32) -> u32 {
    if offset == NO_FIELD {
        return 0;
    }
    ((frame[(offset as usize >> 3) & 15] >> ((offset & 7) * 8)) & 0xff) as u32
}

/// The thread state of the calling thread: the GIL holder if it is this thread, else the
/// one in the main interpreter's thread list whose native id is this thread's.
#[inline(always)]
fn thread_state(config: &PyConfig, tid: u32) -> Option<u64> {
    let mut pointer = config.runtime;
    for i in 0..MAX_TSTATE_HOPS {
        if i as u32 >= config.tstate_hop_count {
            break;
        }
        pointer = read_u64(pointer + config.tstate_hops[i] as u64)?;
        if pointer == 0 {
            break;
        }
    }
    if pointer != 0 && read_u64(pointer + config.native_thread_id as u64)? as u32 == tid {
        return Some(pointer);
    }
    // `last_holder` is not cleared when the GIL is released: a caller without the GIL
    // would see another thread's frames.
    let interp = read_u64(config.runtime + config.interp_main as u64)?;
    let mut tstate = read_u64(interp + config.threads_head as u64)?;
    for _ in 0..MAX_THREADS_SCANNED {
        if tstate == 0 {
            break;
        }
        if read_u64(tstate + config.native_thread_id as u64)? as u32 == tid {
            return Some(tstate);
        }
        tstate = read_u64(tstate + config.thread_next as u64)?;
    }
    None
}

/// Mixes the calling thread's Python frames into the stack hash `hash` and stores them in
/// `PY_STACKS` under the resulting id. Processes without Python, and threads with no
/// Python frame running, keep `hash`.
#[inline(always)]
pub fn extend_stack(hash: u64) -> u64 {
    if PY_ANY.get(0).is_none_or(|any| *any == 0) {
        return hash;
    }
    let id = bpf_get_current_pid_tgid();
    let Some(config) = PY_PROCS.get_ptr(&((id >> 32) as u32)) else {
        return hash;
    };
    // SAFETY: a map value; userspace writes it only before the process is traced.
    let config = unsafe { &*config };
    let Some(scratch) = PY_SCRATCH.get_ptr_mut(0) else {
        return hash;
    };
    // SAFETY: this CPU's scratch slot; programs do not preempt each other on one CPU.
    let scratch = unsafe { &mut *scratch };
    let Some(tstate) = thread_state(config, id as u32) else {
        count(PyCounter::ThreadNotFound);
        return hash;
    };
    let mut frame = tstate;
    for i in 0..2 {
        if i as u32 >= config.frame_hop_count || frame == 0 {
            break;
        }
        let Some(next) = read_u64(frame + config.frame_hops[i] as u64) else {
            return hash;
        };
        frame = next;
    }
    if frame == 0 {
        return hash; // no Python frame running: a C-only allocation
    }
    let stack = &mut scratch.stack;
    stack.truncated = 0;
    let mut len: usize = 0;
    let mut hash = hash;
    // Every frame takes a slot, shims included, and nothing but the end of the chain
    // branches: userspace interprets owners and entry marks. (Branching per frame here
    // multiplied the states the verifier explores past its limit.)
    for i in 0..MAX_PY_DEPTH {
        // SAFETY: the helper checks the source; the destination is this CPU's scratch.
        let failed = unsafe {
            bpf_probe_read_user(
                scratch.frame.as_mut_ptr().cast(),
                FRAME_READ_BYTES as u32,
                frame as *const _,
            )
        } != 0;
        if failed {
            count(PyCounter::ReadFailed);
            break;
        }
        let code = word(&scratch.frame, config.frame_code);
        let instr = word(&scratch.frame, config.frame_instr);
        let owner = byte(&scratch.frame, config.frame_owner);
        let is_entry = byte(&scratch.frame, config.frame_is_entry);
        let instr_offset = instr.wrapping_sub(code) as i32;
        if let Some(slot) = stack.frames.get_mut(i) {
            *slot = PyFrame {
                code,
                instr_offset,
                flags: owner | is_entry << 8,
            };
        }
        hash = mix(hash, code ^ ((instr_offset as u32 as u64) << 32));
        len = i + 1;
        frame = word(&scratch.frame, config.frame_previous);
        if frame == 0 {
            break;
        }
    }
    if frame != 0 && len == MAX_PY_DEPTH {
        stack.truncated = 1;
        count(PyCounter::Truncated);
    }
    if len == 0 {
        return hash;
    }
    stack.len = len as u32;
    let id = if hash == 0 { 1 } else { hash };
    if PY_STACKS.get_ptr(&id).is_none()
        && PY_STACKS.insert(&id, stack, BPF_NOEXIST as u64).is_err()
        && PY_STACKS.get_ptr(&id).is_none()
    {
        count(PyCounter::StacksFull);
    }
    id
}

/// Adds `delta` live blocks of the object allocator to the calling process.
#[inline(always)]
fn add_live_objects(tgid: u32, delta: i64) {
    let key = ProcessKey {
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid,
        _pad: 0,
    };
    match PY_LIVE.get_ptr_mut(&key) {
        // SAFETY: this CPU's value.
        Some(live) => unsafe { *live += delta },
        None => {
            let _ = PY_LIVE.insert(&key, &delta, BPF_ANY as u64);
        }
    }
}

#[inline(always)]
fn traced_tgid() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    is_traced(tgid).then_some(tgid)
}

// Exact mode: pymalloc's entry points. They take the allocator context first, so every
// argument is one register later than libc's. A large request goes on to libc's malloc
// inside them: the per-thread depth guard counts it once, here.

#[uprobe]
pub fn py_malloc_enter(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(1).unwrap_or(0);
    if let Some(tgid) = traced_tgid()
        && let Some(entry) = enter(&ctx, AllocKind::Plain, size)
    {
        save(&entry);
        add_live_objects(tgid, 1);
    }
    0
}

#[uprobe]
pub fn py_calloc_enter(ctx: ProbeContext) -> u32 {
    let count: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    if let Some(tgid) = traced_tgid()
        && let Some(entry) = enter(&ctx, AllocKind::Plain, crate::mul(count, size).unwrap_or(0))
    {
        save(&entry);
        add_live_objects(tgid, 1);
    }
    0
}

#[uprobe]
pub fn py_realloc_enter(ctx: ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    if ptr == 0
        && let Some(tgid) = traced_tgid()
    {
        add_live_objects(tgid, 1);
    }
    enter_realloc(&ctx, ptr, Some(size));
    0
}

/// `_PyObject_Free(ctx, p)`: removes the block, then marks the thread as inside the
/// allocator until `alloc_exit` (attached to its return), so the libc `free` it makes for a
/// large block is not counted a second time (as an unmatched free).
#[uprobe]
pub fn py_free_enter(ctx: ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(1).unwrap_or(0);
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // SAFETY: reading the saved registers of the probed task.
    let sp = unsafe { (*ctx.regs).rsp };
    if ptr == 0 || !is_traced(tgid) || inside_allocator(id, sp) {
        return 0;
    }
    match take(tgid, ptr) {
        Some(info) => {
            account_free(&info, info.size, 0);
            add_live_objects(tgid, -1);
        }
        None => unmatched_free(tgid),
    }
    guard_until_return(&ctx);
    0
}

/// Enters the depth guard without recording anything: an mmap-kind call of size 0 makes
/// `alloc_exit` record nothing at the return, and nested allocator calls are ignored.
#[inline(always)]
fn guard_until_return(ctx: &ProbeContext) {
    enter_plain(ctx, AllocKind::Mmap, 0);
}

/// Growth mode: pymalloc needs a pool for a size class (`allocate_from_new_pool`).
///
/// pymalloc's footprint grows only when it carves a fresh pool (or maps an arena), so
/// only that counts, as one pool of growth; the arena's `mmap` runs inside the guard and
/// is not counted again. A refill that reuses a free pool of its own class is churn.
/// One that takes a free pool another class just emptied leaves that class a pool short:
/// when it next carves a fresh pool, the growth is charged to the stack that took its
/// pool (`PY_POOL_DEBT`), not to the one that happens to refill. Without this, a leak that
/// takes the pools churn keeps emptying would be blamed on the churn.
#[uprobe]
pub fn py_pool_refill_enter(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(config) = PY_PROCS.get_ptr(&tgid) else {
        return 0;
    };
    // SAFETY: a map value.
    let config = unsafe { &*config };
    let state: u64 = ctx.arg(0).unwrap_or(0);
    let class: u64 = if config.pool_size_arg == 0 {
        state
    } else {
        ctx.arg(1).unwrap_or(0)
    } & 0xffff_ffff;
    let usable_at = if config.usable_arenas != 0 {
        config.usable_arenas
    } else {
        state.wrapping_add(config.usable_arenas_in_state as u64)
    };
    // None: a reuse within the class (or unreadable); Some(None): a fresh pool;
    // Some(Some(c)): a free pool taken from class c.
    let refill: Option<Option<u32>> = match read_u64(usable_at) {
        Some(0) => Some(None), // a new arena
        None => None,
        Some(arena) => match read_u64(arena + config.arena_freepools as u64) {
            Some(0) => Some(None),
            None => None,
            Some(pool) => match read_u32(pool + config.pool_szidx as u64) {
                Some(previous) if previous as u64 != class => Some(Some(previous)),
                _ => None,
            },
        },
    };
    let size = if refill.is_some() {
        config.pool_bytes
    } else {
        0
    };
    let Some(mut entry) = enter(&ctx, AllocKind::Mmap, size) else {
        return 0;
    };
    match refill {
        Some(None) => {
            count(PyCounter::PoolRefills);
            let mut info = entry.state.pending;
            let key = (tgid as u64) << 32 | class;
            if let Some(taker) = PY_POOL_DEBT.get_ptr(&key) {
                // SAFETY: copied out before the remove.
                info.usage = unsafe { *taker };
                let _ = PY_POOL_DEBT.remove(&key);
            }
            // SAFETY: helper without preconditions.
            info.timestamp_ns = unsafe { bpf_ktime_get_ns() };
            let usage = usage_of(&mut info);
            account_alloc(&info, usage);
        }
        Some(Some(victim)) => {
            let key = (tgid as u64) << 32 | victim as u64;
            let _ = PY_POOL_DEBT.insert(&key, &entry.state.pending.usage, BPF_ANY as u64);
        }
        None => {}
    }
    // Only the guard stays: `alloc_exit` records nothing for a zero-size mmap kind.
    entry.state.pending.size = 0;
    save(&entry);
    0
}

#[inline(always)]
fn read_u32(address: u64) -> Option<u32> {
    // SAFETY: the helper checks the address.
    match unsafe { aya_ebpf::helpers::bpf_probe_read_user(address as *const u32) } {
        Ok(value) => Some(value),
        Err(_) => {
            count(PyCounter::ReadFailed);
            None
        }
    }
}

/// The collector's entry (`gc_collect_main(tstate, generation, ...)`).
#[uprobe]
pub fn py_gc_enter(ctx: ProbeContext) -> u32 {
    let generation: u64 = ctx.arg(1).unwrap_or(0);
    if traced_tgid().is_none() {
        return 0;
    }
    let call = GcCall {
        // SAFETY: helper without preconditions.
        started_ns: unsafe { bpf_ktime_get_ns() },
        generation: generation as u32,
        _pad: 0,
    };
    let _ = PY_GC_CALLS.insert(&bpf_get_current_pid_tgid(), &call, BPF_ANY as u64);
    0
}

#[uretprobe]
pub fn py_gc_exit(_ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(call) = PY_GC_CALLS.get_ptr(&id) else {
        return 0;
    };
    // SAFETY: copied out before the remove.
    let call = unsafe { *call };
    let _ = PY_GC_CALLS.remove(&id);
    // SAFETY: helper without preconditions.
    let duration = unsafe { bpf_ktime_get_ns() }.wrapping_sub(call.started_ns);
    let key = GcKey {
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (id >> 32) as u32,
        generation: call.generation.min(GC_GENERATIONS - 1),
    };
    if PY_GC.get_ptr(&key).is_none() {
        let _ = PY_GC.insert(&key, &GcStats::default(), BPF_NOEXIST as u64);
    }
    let Some(stats) = PY_GC.get_ptr_mut(&key) else {
        return 0;
    };
    // SAFETY: a map value; collections of one process are serialized by the GIL.
    let stats = unsafe { &mut *stats };
    stats.count += 1;
    stats.duration_ns_sum += duration;
    for i in 0..GC_BUCKETS {
        if duration < GC_FIRST_BUCKET_NS << i {
            stats.buckets[i] += 1;
            break;
        }
    }
    0
}
