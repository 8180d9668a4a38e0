//! memtrace's BPF programs: uprobes and uretprobes on the allocator's entry points.
//!
//! Each entry probe records what the call asks for in the thread's `THREADS` slot and walks
//! the user stack; the one shared return probe (`alloc_exit`) turns the result into a live
//! block in `ALLOCS`/`MMAPS` and adds it to the running totals in `USAGE` (per cgroup,
//! process and stack) and `PROCESS_TOTALS` (per cgroup and process, exact). `free` and
//! `munmap` need no return probe: they remove the block and subtract it at entry.
//!
//! A thread already inside an allocator (glibc's malloc calling mmap, reallocarray calling
//! realloc, aliases) only bumps its depth: only the outermost call is counted.
//! Userspace reads the maps on an interval; nothing is streamed per event.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no compare-and-swap, so `AtomicU64::fetch_add` is not
// offered, but LLVM lowers this intrinsic to BPF's atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys and values are passed by reference on purpose: copies cost BPF stack (512 B).
#![allow(clippy::needless_borrows_for_generic_args)]

mod python;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use memtrace_common::{
    AllocInfo, AllocKey, AllocKind, COUNT_SCALE, Counter, FREED, MAX_STACK_DEPTH,
    MUNMAP_MAX_PAGES_BACK, MUNMAP_MAX_REGIONS, NESTED_MAX_NS, NO_STACK, ProcessKey, ProcessTotals,
    StackFrames, ThreadState, Usage, UsageKey, capacity,
};

/// Each byte is sampled with probability 1/SAMPLE_BYTES (1 = exact); set at load time.
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 1;
/// The target's page size; set at load time.
#[unsafe(no_mangle)]
static PAGE_SIZE: u64 = 4096;
/// 1: count only processes in `TRACED` (the probes are shared node-wide); set at load time.
#[unsafe(no_mangle)]
static FILTER_PROCESSES: u64 = 0;

#[map]
static TRACED: HashMap<u32, u32> = HashMap::with_max_entries(capacity::TRACED, 0);

#[map]
static THREADS: LruHashMap<u64, ThreadState> = LruHashMap::with_max_entries(capacity::THREADS, 0);
// Not preallocated: a traced process may hold millions of blocks or a handful.
#[map]
static ALLOCS: HashMap<AllocKey, AllocInfo> =
    HashMap::with_max_entries(capacity::ALLOCS, BPF_F_NO_PREALLOC);
#[map]
static MMAPS: HashMap<AllocKey, AllocInfo> =
    HashMap::with_max_entries(capacity::MMAPS, BPF_F_NO_PREALLOC);
#[map]
static USAGE: HashMap<UsageKey, Usage> =
    HashMap::with_max_entries(capacity::USAGE, BPF_F_NO_PREALLOC);
// Per CPU: updated on every call, with plain adds instead of atomics.
#[map]
static PROCESS_TOTALS: PerCpuHashMap<ProcessKey, ProcessTotals> =
    PerCpuHashMap::with_max_entries(capacity::PROCESS_TOTALS, 0);
#[map]
static FREED_ENTRIES: PerCpuArray<i64> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SWEEP_EPOCH: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static STACKS: HashMap<u64, StackFrames> = HashMap::with_max_entries(capacity::STACKS, 0);
#[map]
static STACK_SCRATCH: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);
/// Per CPU, stack ids known to be in `STACKS` (slot `id % STACKS_SEEN_SLOTS`): a hit skips
/// the hash lookup. Safe because nothing ever removes a stack from `STACKS`.
#[map]
static STACKS_SEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(STACKS_SEEN_SLOTS, 0);
const STACKS_SEEN_SLOTS: u32 = 256;
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

mod lifecycle;

const MAP_ANONYMOUS: u64 = 0x20;
const MAX_ERRNO: u64 = 4095;

#[inline(always)]
fn sample_bytes() -> u64 {
    // SAFETY: a read-only global rewritten by the loader; volatile keeps the compiler
    // from folding the default value in.
    unsafe { core::ptr::read_volatile(&SAMPLE_BYTES) }
}

#[inline(always)]
fn page_size() -> u64 {
    // SAFETY: as above.
    let page = unsafe { core::ptr::read_volatile(&PAGE_SIZE) };
    // Never zero: a division by zero would be a panic, which the verifier rejects.
    if page == 0 { 4096 } else { page }
}

/// CLOCK_MONOTONIC in ns, read once per allocator call (~50 ns here). The coarse clock
/// would be cheaper, but the kernel does not offer it to tracing programs (not NMI-safe).
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether the calling process is one memtrace traces.
#[inline(always)]
fn is_traced(tgid: u32) -> bool {
    // SAFETY: a read-only global rewritten by the loader.
    let filter = unsafe { core::ptr::read_volatile(&FILTER_PROCESSES) };
    if filter == 0 || TRACED.get_ptr(&tgid).is_some() {
        return true;
    }
    // What shared probes cost bystanders, made visible (`memtrace_untraced_probe_hits_total`).
    count(Counter::UntracedHit);
    false
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn add(field: &mut u64, delta: u64) {
    // SAFETY: `field` points into a map value shared between CPUs; atomic add (XADD).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, delta) };
}

#[inline(always)]
fn add_signed(field: &mut i64, delta: i64) {
    add(
        unsafe { &mut *(field as *mut i64 as *mut u64) },
        delta as u64,
    );
}

/// Looks `key` up in `map` (any hash map type), inserting a zeroed value first if it is
/// missing; counts `full` when it cannot. Yields `Option<*mut V>`.
macro_rules! get_or_init {
    ($map:expr, $key:expr, $full:expr) => {{
        match $map.get_ptr_mut($key) {
            Some(value) => Some(value),
            None => {
                // EEXIST means another CPU inserted it first: the lookup below finds it.
                let _ = $map.insert(
                    $key,
                    &Default::default(),
                    aya_ebpf::bindings::BPF_NOEXIST as u64,
                );
                let value = $map.get_ptr_mut($key);
                if value.is_none() {
                    count($full);
                }
                value
            }
        }
    }};
}

/// Adds to a per-CPU counter: no other CPU writes it, and programs do not preempt each
/// other on one CPU.
#[inline(always)]
fn add_local(field: &mut u64, delta: u64) {
    *field = field.wrapping_add(delta);
}

#[inline(always)]
fn add_local_signed(field: &mut i64, delta: i64) {
    *field = field.wrapping_add(delta);
}

/// The exact totals of `info`'s process, on this CPU.
#[inline(always)]
fn process_totals(cgroup_id: u64, tgid: u32) -> Option<&'static mut ProcessTotals> {
    let key = ProcessKey {
        cgroup_id,
        tgid,
        _pad: 0,
    };
    let totals = get_or_init!(PROCESS_TOTALS, &key, Counter::ProcessTotalsFull)?;
    // SAFETY: a valid per-CPU map value pointer, written only from this CPU.
    Some(unsafe { &mut *totals })
}

/// Decides whether an allocation of `size` bytes is sampled, and what it then stands for:
/// (estimated bytes, estimated count in 1/COUNT_SCALE). Unsampled is (0, 0).
/// A block of `size` < N bytes is kept with probability size/N and then stands for N
/// bytes and N/size blocks, which keeps both estimates unbiased; larger blocks are exact.
#[inline(always)]
fn sample(size: u64) -> (u64, u64) {
    let rate = sample_bytes();
    if rate <= 1 || size >= rate {
        return (size, COUNT_SCALE);
    }
    // SAFETY: helper without preconditions.
    let draw = unsafe { bpf_get_prandom_u32() } as u64 % rate;
    if draw < size && size > 0 {
        (rate, COUNT_SCALE * rate / size)
    } else {
        (0, 0)
    }
}

/// Walks the user stack at an allocator's probe (see [`walk_stack_from`]) and returns its id.
///
/// At the probe no push has run yet (userspace places probes so), so `[sp]` is the return
/// address into the allocator's caller and `fp` is still the caller's frame pointer.
#[inline(always)]
fn walk_stack(sp: u64, fp: u64) -> u64 {
    // SAFETY: reading user memory through the helper, which checks the address.
    let Ok(caller) = (unsafe { bpf_probe_read_user(sp as *const u64) }) else {
        count(Counter::ReadFailed);
        return NO_STACK;
    };
    walk_stack_from(caller, fp)
}

/// Walks the user stack by frame pointers and stores it in `STACKS`; returns its id.
///
/// `first` is the innermost frame (the allocator's caller, or the instruction that faulted),
/// then each `[fp + 8]` up the chain. (The kernel's own walker,
/// `bpf_get_stackid`, starts from the caller's saved frame and so misses the caller, and
/// costs ~0.85 µs per call here even for one frame.) Code built without frame pointers
/// ends the chain early, as it does for the kernel's walker.
#[inline(always)]
fn walk_stack_from(caller: u64, fp: u64) -> u64 {
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        return NO_STACK;
    };
    // SAFETY: this CPU's scratch slot; programs do not preempt each other on one CPU.
    let frames = unsafe { &mut *scratch };
    let mut hash = mix(0x9e37_79b9_7f4a_7c15, caller);
    frames.ips[0] = caller;
    let mut len = 1;
    let mut fp = fp;
    for i in 1..MAX_STACK_DEPTH {
        if fp == 0 || !fp.is_multiple_of(8) {
            break;
        }
        // SAFETY: as above; a bad frame pointer just fails the read.
        let Ok([next, ret]) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else {
            break;
        };
        if ret == 0 {
            break;
        }
        if let Some(slot) = frames.ips.get_mut(i) {
            *slot = ret;
        }
        hash = mix(hash, ret);
        len = i + 1;
        // Frames live at rising addresses: anything else is not a frame chain.
        if next <= fp {
            break;
        }
        fp = next;
    }
    frames.len = len as u32;
    // A Python process: its interpreter frames are part of the stack.
    let hash = python::extend_stack(hash);
    let id = if hash == NO_STACK { 1 } else { hash };
    let seen = STACKS_SEEN.get_ptr_mut((id % STACKS_SEEN_SLOTS as u64) as u32);
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    if let Some(seen) = seen
        && unsafe { *seen } == id
    {
        return id;
    }
    if STACKS.get_ptr(&id).is_none()
        && STACKS.insert(&id, frames, BPF_NOEXIST as u64).is_err()
        && STACKS.get_ptr(&id).is_none()
    {
        count(Counter::StackWalkFailed); // STACKS is full
        return NO_STACK;
    }
    if let Some(seen) = seen {
        // SAFETY: as above.
        unsafe { *seen = id };
    }
    id
}

/// One step of the stack hash (a multiply-xorshift over 64-bit words).
#[inline(always)]
fn mix(hash: u64, word: u64) -> u64 {
    let h = (hash ^ word).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 32)
}

/// An outermost allocator call being entered: its state, and the thread's slot if it has
/// one already (slots stay between calls: updating one in place is cheaper than an insert
/// and a delete per call).
struct Entry {
    state: ThreadState,
    slot: Option<*mut ThreadState>,
}

/// Whether a call entering at `sp`, `now` runs inside the call recorded in `state`. At
/// the same `sp` counts: a tail call (reallocarray jumping to realloc) does not push.
#[inline(always)]
fn is_nested(state: &ThreadState, sp: u64, now: u64) -> bool {
    state.depth > 0 && sp <= state.sp && now.wrapping_sub(state.entered_ns) < NESTED_MAX_NS
}

/// Common entry of every allocating function. Returns `None` when the call is nested.
#[inline(always)]
fn enter(ctx: &ProbeContext, kind: AllocKind, size: u64) -> Option<Entry> {
    let id = bpf_get_current_pid_tgid();
    if !is_traced((id >> 32) as u32) {
        return None;
    }
    // SAFETY: reading the saved registers of the probed task.
    let sp = unsafe { (*ctx.regs).rsp };
    let now = now_ns();
    let slot = THREADS.get_ptr_mut(id);
    if let Some(slot) = slot {
        // SAFETY: only this thread touches its slot.
        let state = unsafe { &mut *slot };
        if is_nested(state, sp, now) {
            // Inside another allocator call on this thread: count it there, not here.
            state.depth += 1;
            return None;
        }
    }
    let (weight_bytes, weight_count) = sample(size);
    let usage = UsageKey {
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (id >> 32) as u32,
        _pad: 0,
        // The stack is walked only for sampled blocks: it is the dearest part of a probe.
        // SAFETY: reading the saved registers of the probed task.
        stack_id: if weight_bytes > 0 {
            walk_stack(sp, unsafe { (*ctx.regs).rbp })
        } else {
            NO_STACK
        },
    };
    let state = ThreadState {
        depth: 1,
        kind: kind as u32,
        sp,
        entered_ns: now,
        pending: AllocInfo {
            size,
            weight_bytes,
            weight_count,
            timestamp_ns: 0,
            usage,
        },
        ..ThreadState::default()
    };
    Some(Entry { state, slot })
}

#[inline(always)]
fn save(entry: &Entry) {
    match entry.slot {
        // SAFETY: only this thread touches its slot.
        Some(slot) => unsafe {
            let state = &entry.state;
            if state.kind == AllocKind::Plain as u32 || state.kind == AllocKind::Mmap as u32 {
                // Most calls: the return reads no more than this, so write no more.
                (*slot).depth = state.depth;
                (*slot).kind = state.kind;
                (*slot).sp = state.sp;
                (*slot).entered_ns = state.entered_ns;
                (*slot).pending = state.pending;
            } else {
                *slot = *state;
            }
        },
        None => {
            if THREADS
                .insert(bpf_get_current_pid_tgid(), &entry.state, BPF_ANY as u64)
                .is_err()
            {
                count(Counter::ThreadsFull);
            }
        }
    }
}

#[inline(always)]
fn enter_plain(ctx: &ProbeContext, kind: AllocKind, size: u64) {
    if let Some(entry) = enter(ctx, kind, size) {
        save(&entry);
    }
}

/// Whether `info`'s exact size is carried by its stack's `USAGE` entry, so that the
/// process totals are the sum of its stacks and `PROCESS_TOTALS` is not touched: exact
/// mode, and the block is in a stack (see [`usage_of`]). Saves a map update per call.
#[inline(always)]
fn totals_in_usage(info: &AllocInfo) -> bool {
    info.weight_bytes != 0 && sample_bytes() <= 1
}

/// The `USAGE` entry a new block is to be added to, or `None` when it is not sampled or
/// `USAGE` is full; then its weights are zeroed, so that its free does not look for it.
#[inline(always)]
fn usage_of(info: &mut AllocInfo) -> Option<&'static mut Usage> {
    let usage = if info.weight_bytes == 0 {
        None
    } else {
        get_or_init!(USAGE, &info.usage, Counter::UsageFull)
    };
    match usage {
        // SAFETY: a valid map value pointer, only changed with atomic adds.
        Some(usage) => Some(unsafe { &mut *usage }),
        None => {
            info.weight_bytes = 0;
            info.weight_count = 0;
            None
        }
    }
}

/// Adds a new live block to the totals; `usage` is its entry from [`usage_of`].
#[inline(always)]
fn account_alloc(info: &AllocInfo, usage: Option<&mut Usage>) {
    if !totals_in_usage(info)
        && let Some(totals) = process_totals(info.usage.cgroup_id, info.usage.tgid)
    {
        add_local(&mut totals.allocated_bytes, info.size);
        add_local(&mut totals.allocations, 1);
        add_local_signed(&mut totals.outstanding_bytes, info.size as i64);
        add_local_signed(&mut totals.outstanding_count, 1);
    }
    if let Some(usage) = usage {
        add(&mut usage.allocated_bytes, info.weight_bytes);
        add(&mut usage.allocated_count, info.weight_count);
        add_signed(&mut usage.outstanding_bytes, info.weight_bytes as i64);
        add_signed(&mut usage.outstanding_count, info.weight_count as i64);
        add_live(usage, info, 1);
    }
}

/// Subtracts `bytes` of a live block from the totals. `pieces_left` is how many blocks
/// remain of it: 0 for a free, 1 or 2 when munmap cuts a mapping's edge or middle.
#[inline(always)]
fn account_free(info: &AllocInfo, bytes: u64, pieces_left: i64) {
    if !totals_in_usage(info)
        && let Some(totals) = process_totals(info.usage.cgroup_id, info.usage.tgid)
    {
        add_local(&mut totals.freed_bytes, bytes);
        add_local_signed(&mut totals.outstanding_bytes, -(bytes as i64));
        add_local_signed(&mut totals.outstanding_count, pieces_left - 1);
    }
    if info.weight_bytes == 0 {
        return;
    }
    if let Some(usage) = USAGE.get_ptr_mut(&info.usage) {
        let weight = scaled_weight(info, bytes);
        // SAFETY: as above.
        let usage = unsafe { &mut *usage };
        add(&mut usage.freed_bytes, weight);
        add_signed(&mut usage.outstanding_bytes, -(weight as i64));
        add_signed(
            &mut usage.outstanding_count,
            (pieces_left - 1) * info.weight_count as i64,
        );
        add_live(usage, info, pieces_left - 1);
    }
}

/// Adds `blocks` (negative to remove) live blocks allocated at `info`'s time to the
/// mean-age accumulators of its stack.
#[inline(always)]
fn add_live(usage: &mut Usage, info: &AllocInfo, blocks: i64) {
    let ms = (info.timestamp_ns / 1_000_000) as i64;
    add_signed(as_signed(&mut usage.live_blocks), blocks);
    add_signed(as_signed(&mut usage.live_time_ms_sum), blocks * ms);
}

#[inline(always)]
fn as_signed(field: &mut u64) -> &mut i64 {
    // SAFETY: same size and alignment; two's complement wrapping is what we want.
    unsafe { &mut *(field as *mut u64 as *mut i64) }
}

/// A free of an address memtrace never saw allocated: counted, never ignored.
#[inline(always)]
fn unmatched_free(tgid: u32) {
    count(Counter::UnmatchedFree);
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if let Some(totals) = process_totals(cgroup_id, tgid) {
        add_local(&mut totals.unmatched_frees, 1);
    }
}

/// Records a new live block at `addr`.
#[inline(always)]
fn record(map: &HashMap<AllocKey, AllocInfo>, addr: u64, info: &AllocInfo, full: Counter) {
    let mut info = *info;
    let usage = usage_of(&mut info);
    let info = &info;
    let key = AllocKey {
        tgid: info.usage.tgid,
        _pad: 0,
        addr,
    };
    // Most blocks land where one was freed before: its entry is reused in place.
    if !(overwrite(map, &key, info)
        || map.insert(&key, info, BPF_NOEXIST as u64).is_ok()
        || overwrite(map, &key, info))
    {
        count(full);
        return;
    }
    account_alloc(info, usage);
}

/// Puts `info` in `key`'s existing entry, if there is one: a freed entry, or a block
/// whose free was missed (a full map earlier, an untraced path), retired first so the
/// totals stay consistent.
#[inline(always)]
fn overwrite(map: &HashMap<AllocKey, AllocInfo>, key: &AllocKey, info: &AllocInfo) -> bool {
    let Some(slot) = map.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid map value pointer; copied out before it is overwritten. Only the
    // thread that got this address from the allocator writes its entry now.
    let old = unsafe { *slot };
    if old.size == FREED {
        count_freed_entries(-1);
    } else {
        account_free(&old, old.size, 0);
    }
    unsafe { *slot = *info };
    true
}

#[inline(always)]
fn count_freed_entries(delta: i64) {
    if let Some(slot) = FREED_ENTRIES.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, and BPF programs do not preempt each other on one CPU.
        unsafe { *slot += delta };
    }
}

/// Takes the live block at `addr` out of `ALLOCS` (marking its entry [`FREED`] for the
/// next block at that address) and returns it.
#[inline(always)]
fn take(tgid: u32, addr: u64) -> Option<AllocInfo> {
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr,
    };
    let slot = ALLOCS.get_ptr_mut(&key)?;
    // SAFETY: a valid map value pointer, copied out before it is marked. The block is
    // being freed by this thread: nobody else writes its entry now.
    let info = unsafe { *slot };
    if info.size == FREED {
        return None;
    }
    let epoch = SWEEP_EPOCH.get(0).copied().unwrap_or(0);
    unsafe {
        (*slot).size = FREED;
        (*slot).timestamp_ns = epoch;
    }
    count_freed_entries(1);
    Some(info)
}

/// Whether this thread is inside an allocator call (free or munmap called by malloc).
#[inline(always)]
fn inside_allocator(id: u64, sp: u64) -> bool {
    let Some(state) = THREADS.get_ptr(id) else {
        return false;
    };
    // SAFETY: the slot is only written by this thread.
    let state = unsafe { &*state };
    // The clock is read only when a call is in flight (rarely, for a free).
    // SAFETY: helper without preconditions.
    state.depth > 0 && is_nested(state, sp, now_ns())
}

/// `a * b` unless it overflows. `checked_mul` (and LLVM's rewrite of a division check)
/// needs a 128-bit multiply that BPF lacks, so multiply in 32-bit halves.
#[inline(always)]
fn mul(a: u64, b: u64) -> Option<u64> {
    let (small, large) = if a <= b { (a, b) } else { (b, a) };
    if small >> 32 != 0 {
        return None; // Both factors are at least 2^32.
    }
    let high = small * (large >> 32);
    if high >> 32 != 0 {
        return None;
    }
    let low = small * (large & 0xffff_ffff);
    let product = low.wrapping_add(high << 32);
    if product < low { None } else { Some(product) }
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter_plain(&ctx, AllocKind::Plain, size);
    0
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    let count: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    // An overflowing calloc fails; record it as a zero-size call so the return is matched.
    enter_plain(&ctx, AllocKind::Plain, mul(count, size).unwrap_or(0));
    0
}

/// aligned_alloc(alignment, size) and memalign(alignment, size), often one function.
#[uprobe]
pub fn aligned_alloc_enter(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter_plain(&ctx, AllocKind::Plain, size);
    0
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter_plain(&ctx, AllocKind::Plain, size);
    0
}

/// pvalloc rounds the request up to whole pages: that is what it allocates.
#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    let page = page_size();
    let rounded = if size == 0 {
        page
    } else {
        size.div_ceil(page) * page
    };
    enter_plain(&ctx, AllocKind::Plain, rounded);
    0
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    let out_ptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    if let Some(mut entry) = enter(&ctx, AllocKind::PosixMemalign, size) {
        entry.state.out_ptr = out_ptr;
        save(&entry);
    }
    0
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter_realloc(&ctx, ptr, Some(size));
    0
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(0).unwrap_or(0);
    let count: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter_realloc(&ctx, ptr, mul(count, size));
    0
}

/// realloc(NULL, n) is malloc(n); realloc(p, 0) frees p; otherwise the old block is taken
/// out at entry (so another thread reusing its address cannot be confused with it) and put
/// back if the call fails. `size` is `None` for a request that overflows (it fails).
#[inline(always)]
fn enter_realloc(ctx: &ProbeContext, ptr: u64, size: Option<u64>) {
    let Some(mut entry) = enter(ctx, AllocKind::Realloc, size.unwrap_or(0)) else {
        return;
    };
    let state = &mut entry.state;
    if ptr != 0 {
        let tgid = state.pending.usage.tgid;
        match take(tgid, ptr) {
            Some(old) => {
                account_free(&old, old.size, 0);
                state.old_addr = ptr;
                state.old = old;
                state.has_old = 1;
            }
            None => unmatched_free(tgid),
        }
        state.restore_on_failure = (size != Some(0)) as u32;
    }
    save(&entry);
}

#[uprobe]
pub fn mmap_enter(ctx: ProbeContext) -> u32 {
    let len: u64 = ctx.arg(1).unwrap_or(0);
    let flags: u64 = ctx.arg(3).unwrap_or(0);
    let page = page_size();
    // File mappings are not heap: the entry still counts depth, so mark them zero-size.
    let size = if flags & MAP_ANONYMOUS != 0 {
        len.div_ceil(page) * page
    } else {
        0
    };
    enter_plain(&ctx, AllocKind::Mmap, size);
    0
}

/// The return of every allocating function.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(slot) = THREADS.get_ptr_mut(id) else {
        return 0; // The call began before the probe was attached.
    };
    // SAFETY: only this thread touches its slot.
    let state = unsafe { &mut *slot };
    match state.depth {
        0 => return 0, // No call in flight: it began before the probe was attached.
        1 => state.depth = 0,
        _ => {
            state.depth -= 1;
            return 0;
        }
    }
    // Read in place: the slot stays this thread's until its next call.
    let state = &*state;
    let ret: u64 = ctx.ret();

    // The block's time is its call's entry: one clock read per call.
    let mut info = state.pending;
    info.timestamp_ns = state.entered_ns;
    match state.kind {
        k if k == AllocKind::PosixMemalign as u32 => {
            if ret != 0 {
                return 0;
            }
            // SAFETY: reading user memory through the helper, which checks the address.
            match unsafe { bpf_probe_read_user(state.out_ptr as *const u64) } {
                Ok(addr) if addr != 0 => record(&ALLOCS, addr, &info, Counter::AllocsFull),
                Ok(_) => {}
                Err(_) => count(Counter::ReadFailed),
            }
        }
        k if k == AllocKind::Mmap as u32 => {
            if info.size > 0 && ret < u64::MAX - MAX_ERRNO {
                record(&MMAPS, ret, &info, Counter::MmapsFull);
            }
        }
        k if k == AllocKind::Realloc as u32 => {
            if ret != 0 {
                record(&ALLOCS, ret, &info, Counter::AllocsFull);
            } else if state.has_old != 0 && state.restore_on_failure != 0 {
                // Failed: the old block is still live where it was.
                let old = state.old;
                unfree(&old);
                let key = AllocKey {
                    tgid: old.usage.tgid,
                    _pad: 0,
                    addr: state.old_addr,
                };
                if !(overwrite_freed(&key, &old)
                    || ALLOCS.insert(&key, &old, BPF_ANY as u64).is_ok())
                {
                    count(Counter::AllocsFull);
                }
            }
        }
        _ => {
            if ret != 0 {
                record(&ALLOCS, ret, &info, Counter::AllocsFull);
            }
        }
    }
    0
}

/// Puts `info` back into `key`'s entry if it is still marked freed (a realloc that failed
/// restores its old block).
#[inline(always)]
fn overwrite_freed(key: &AllocKey, info: &AllocInfo) -> bool {
    let Some(slot) = ALLOCS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid map value pointer; this thread owns the block at this address.
    if unsafe { (*slot).size } != FREED {
        return false;
    }
    count_freed_entries(-1);
    unsafe { *slot = *info };
    true
}

/// Undoes `account_free` of a whole block (a realloc that failed).
#[inline(always)]
fn unfree(info: &AllocInfo) {
    if !totals_in_usage(info)
        && let Some(totals) = process_totals(info.usage.cgroup_id, info.usage.tgid)
    {
        add_local(&mut totals.freed_bytes, info.size.wrapping_neg());
        add_local_signed(&mut totals.outstanding_bytes, info.size as i64);
        add_local_signed(&mut totals.outstanding_count, 1);
    }
    if info.weight_bytes == 0 {
        return;
    }
    if let Some(usage) = USAGE.get_ptr_mut(&info.usage) {
        // SAFETY: as above.
        let usage = unsafe { &mut *usage };
        add(
            &mut usage.freed_bytes,
            (info.weight_bytes as i64).wrapping_neg() as u64,
        );
        add_signed(&mut usage.outstanding_bytes, info.weight_bytes as i64);
        add_signed(&mut usage.outstanding_count, info.weight_count as i64);
        add_live(usage, info, 1);
    }
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(0).unwrap_or(0);
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if ptr == 0 || !is_traced(tgid) {
        return 0;
    }
    // Look the block up first: a live block is freed whatever the thread is inside (no
    // allocator frees a caller's block through `free` but realloc(p, 0), which took it out
    // already), so only a miss needs the per-thread check.
    match take(tgid, ptr) {
        Some(info) => account_free(&info, info.size, 0),
        None if !inside_allocator(id, unsafe { (*ctx.regs).rsp }) => unmatched_free(tgid),
        None => {}
    }
    0
}

/// munmap may cut any page range out of any mapping. Mappings are keyed by their start,
/// so: find the mapping the range starts in (one starting exactly there, or at most
/// `MUNMAP_MAX_PAGES_BACK` pages before), cut the range out of it (the head stays at its
/// start, the tail is re-inserted at the range's end), and go on into mappings that start
/// exactly where the previous one ended. Addresses nobody tracked are not counted:
/// programs unmap file mappings and libraries too.
#[uprobe]
pub fn munmap_enter(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    let len: u64 = ctx.arg(1).unwrap_or(0);
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if len == 0 || !is_traced(tgid) || inside_allocator(id, unsafe { (*ctx.regs).rsp }) {
        return 0;
    }
    let page = page_size();
    let end = addr.saturating_add(len.div_ceil(page) * page);
    let Some(mut found) = find_mapping_around(tgid, addr) else {
        return 0;
    };
    let mut cursor = addr;
    for _ in 0..MUNMAP_MAX_REGIONS {
        let (start, info) = found;
        let region_end = start + info.size;
        let cut_end = if end < region_end { end } else { region_end };
        let _ = MMAPS.remove(&AllocKey {
            tgid,
            _pad: 0,
            addr: start,
        });
        let head = cursor - start;
        let tail = region_end - cut_end;
        account_free(
            &info,
            cut_end - cursor,
            (head > 0) as i64 + (tail > 0) as i64,
        );
        if head > 0 {
            insert_mapping(tgid, start, &piece(&info, head));
        }
        if tail > 0 {
            insert_mapping(tgid, cut_end, &piece(&info, tail));
        }
        cursor = cut_end;
        if cursor >= end {
            return 0;
        }
        let Some(info) = MMAPS.get_ptr(&AllocKey {
            tgid,
            _pad: 0,
            addr: cursor,
        }) else {
            return 0; // The rest of the range is not ours.
        };
        // SAFETY: copied out of the map.
        found = (cursor, unsafe { *info });
    }
    count(Counter::MunmapUnresolved);
    0
}

/// Estimated bytes that `bytes` of a sampled block stand for (overflow-free `w·b/s`).
#[inline(always)]
fn scaled_weight(info: &AllocInfo, bytes: u64) -> u64 {
    if info.size == 0 || bytes >= info.size {
        return info.weight_bytes;
    }
    info.weight_bytes / info.size * bytes + info.weight_bytes % info.size * bytes / info.size
}

/// What remains of a mapping after a cut: `size` bytes carrying their share of the estimate.
#[inline(always)]
fn piece(info: &AllocInfo, size: u64) -> AllocInfo {
    AllocInfo {
        size,
        weight_bytes: scaled_weight(info, size),
        ..*info
    }
}

#[inline(always)]
fn insert_mapping(tgid: u32, start: u64, info: &AllocInfo) {
    if MMAPS
        .insert(
            &AllocKey {
                tgid,
                _pad: 0,
                addr: start,
            },
            info,
            BPF_ANY as u64,
        )
        .is_err()
    {
        count(Counter::MmapsFull);
    }
}

/// The tracked mapping containing `addr`: one starting exactly there, or one starting up to
/// `MUNMAP_MAX_PAGES_BACK` pages before it.
#[inline(always)]
fn find_mapping_around(tgid: u32, addr: u64) -> Option<(u64, AllocInfo)> {
    let page = page_size();
    for back in 0..=MUNMAP_MAX_PAGES_BACK as u64 {
        let start = addr.checked_sub(back * page)?;
        if let Some(info) = MMAPS.get_ptr(&AllocKey {
            tgid,
            _pad: 0,
            addr: start,
        }) {
            // SAFETY: copied out of the map.
            let info = unsafe { *info };
            // The nearest mapping below may end before `addr`: then nothing tracked is cut.
            return (start + info.size > addr).then_some((start, info));
        }
    }
    None
}

/// The cost floor for benchmarks: a probe that does nothing, at the same spots.
#[uprobe]
pub fn noop_enter(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn noop_exit(_ctx: RetProbeContext) -> u32 {
    0
}

mod growth;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
