//! The always-on tier's mapped memory: anonymous `mmap`s of watched processes, per user
//! stack, minus their `munmap`s, with no uprobe. glibc serves blocks of 128 KiB and more
//! (its mmap threshold) with a mapping of their own and returns them with `munmap`, so this
//! is outstanding large-block bytes per call site, releases included, which page faults
//! cannot see.
//!
//! Two narrow BTF tracepoints instead of `sys_enter`/`sys_exit` (a program there makes
//! every syscall of every process on the node take the kernel's slow path, ~150 ns each
//! here, watched or not):
//! - `vm_unmapped_area` fires when `mmap` (or a moving `mremap`) picks an address: the
//!   address is its argument, the length and flags are in the syscall's saved registers.
//! - `mmap_lock_acquire_returned` fires when a task takes an mm's lock; `munmap` takes it
//!   for writing before it unmaps, with the range in its saved registers.
//!
//! A region is kept in `MAPPED_REGIONS` from its `mmap` to its `munmap` and carries the
//! stack that mapped it; `MAPPED` holds the running totals per (cgroup, process, stack) in
//! the exact tier's [`Usage`] terms.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, pt_regs},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use memtrace_common::{
    AllocInfo, AllocKey, COUNT_SCALE, Counter, MAPPED_MAX_PAGES_BACK, MUNMAP_MAX_REGIONS, Usage,
    UsageKey, capacity,
};

use crate::{add, add_signed, as_signed, count, growth::is_watched, page_size, walk_stack_from};

/// Live anonymous regions of watched processes: (tgid, start) → region (size, stack, time).
#[map]
static MAPPED_REGIONS: HashMap<AllocKey, AllocInfo> =
    HashMap::with_max_entries(capacity::MMAPS, BPF_F_NO_PREALLOC);
/// Mapped bytes per (cgroup, process, stack): outstanding, mapped and unmapped totals.
#[map]
static MAPPED: HashMap<UsageKey, Usage> =
    HashMap::with_max_entries(capacity::USAGE, BPF_F_NO_PREALLOC);
/// Per CPU: the words of user stack the call-site scan looks at.
#[map]
static SCAN_SCRATCH: PerCpuArray<[u64; SCAN_WORDS]> = PerCpuArray::with_max_entries(1, 0);

const SYS_MMAP: u64 = 9;
const SYS_MUNMAP: u64 = 11;
const SYS_MREMAP: u64 = 25;
const MAP_FIXED: u64 = 0x10;
const MAP_ANONYMOUS: u64 = 0x20;
/// x86-64's PMD: anonymous mappings of a multiple of it are aligned to it (THP).
const PMD_SIZE: u64 = 2 << 20;
/// Words of user stack scanned for the call site, from the syscall's stack pointer: glibc's
/// malloc → sysmalloc → mmap path takes ~300 bytes here.
const SCAN_WORDS: usize = 64;
/// A saved frame pointer points at most this far above its own slot.
const MAX_FRAME_BYTES: u64 = 1 << 20;

/// The current task's saved user registers (the syscall's number and arguments).
#[inline(always)]
fn user_regs() -> Option<pt_regs> {
    // SAFETY: helpers on the current task; the registers are read through the helper.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        if regs.is_null() {
            return None;
        }
        bpf_probe_read_kernel(regs).ok()
    }
}

/// The watched task calling, as (cgroup id, tgid), or `None`.
#[inline(always)]
fn watched_caller() -> Option<(u64, u32)> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    is_watched(cgroup_id, tgid).then_some((cgroup_id, tgid))
}

/// `vm_unmapped_area(unsigned long addr, struct vm_unmapped_area_info *info)`: an address
/// was picked for a new mapping.
#[btf_tracepoint(function = "vm_unmapped_area")]
pub fn mapped_unmapped_area(ctx: BtfTracePointContext) -> u32 {
    let Some((cgroup_id, tgid)) = watched_caller() else {
        return 0;
    };
    let addr: u64 = ctx.arg(0);
    if addr & (page_size() - 1) != 0 {
        return 0; // -ENOMEM: no room.
    }
    let Some(regs) = user_regs() else {
        count(Counter::ReadFailed);
        return 0;
    };
    let page = page_size();
    match regs.orig_rax {
        SYS_MMAP => {
            // mmap(addr, length, prot, flags, fd, offset): rdi, rsi, rdx, r10, r8, r9.
            let (len, prot, flags) = (regs.rsi, regs.rdx, regs.r10);
            // PROT_NONE is address space reserved (glibc's arena heaps, guard areas), not
            // memory.
            if flags & MAP_ANONYMOUS == 0 || prot == 0 {
                return 0;
            }
            let size = len.div_ceil(page) * page;
            let info: *const u64 = ctx.arg(1);
            // `length` is the second field of vm_unmapped_area_info.
            // SAFETY: the tracepoint's own argument, read through the helper.
            let searched = unsafe { bpf_probe_read_kernel(info.wrapping_add(1)) }.unwrap_or(size);
            record(cgroup_id, tgid, placed(addr, size, searched), size, &regs);
        }
        SYS_MREMAP => {
            // mremap(old, old_len, new_len, flags, new): moving a tracked region. Like a
            // realloc in the exact tier, it is unmapped at its stack and mapped anew here.
            if unmap(tgid, regs.rdi, regs.rsi) {
                record(cgroup_id, tgid, addr, regs.rdx.div_ceil(page) * page, &regs);
            }
        }
        _ => {}
    }
    0
}

/// Where the mapping goes when the kernel searched `searched` bytes at `addr` for `size`:
/// an anonymous mapping of a multiple of 2 MiB is given 2 MiB more room to align it for
/// transparent huge pages, then put on the next 2 MiB boundary (the one above a search
/// result that is aligned already: the search runs top-down).
#[inline(always)]
fn placed(addr: u64, size: u64, searched: u64) -> u64 {
    if searched != size + PMD_SIZE {
        return addr;
    }
    let misaligned = addr.wrapping_neg() & (PMD_SIZE - 1);
    if misaligned == 0 {
        addr + PMD_SIZE
    } else {
        addr + misaligned
    }
}

/// `mmap_lock_acquire_returned(struct mm_struct *mm, bool write, bool success)`: `munmap`
/// (and `mmap` over a fixed address, `mremap`) take the lock for writing before changing
/// the map.
#[btf_tracepoint(function = "mmap_lock_acquire_returned")]
pub fn mapped_mmap_lock(ctx: BtfTracePointContext) -> u32 {
    let write: u64 = ctx.arg(1);
    let success: u64 = ctx.arg(2);
    if write & 0xff == 0 || success & 0xff == 0 {
        return 0;
    }
    let Some((_, tgid)) = watched_caller() else {
        return 0;
    };
    let Some(regs) = user_regs() else {
        count(Counter::ReadFailed);
        return 0;
    };
    match regs.orig_rax {
        SYS_MUNMAP => {
            unmap(tgid, regs.rdi, regs.rsi);
        }
        // A fixed mapping replaces whatever was there.
        SYS_MMAP if regs.r10 & MAP_FIXED != 0 => {
            unmap(tgid, regs.rdi, regs.rsi);
        }
        // mremap(old, old_len, new_len, ...) shrinking: in place, its tail goes (glibc's
        // realloc of a mapped block). A move is seen when it picks its new address.
        SYS_MREMAP => {
            let page = page_size();
            let (kept, old) = (
                regs.rdx.div_ceil(page) * page,
                regs.rsi.div_ceil(page) * page,
            );
            if kept > 0 && kept < old {
                unmap(tgid, regs.rdi + kept, old - kept);
            }
        }
        _ => {}
    }
    0
}

/// Records the region `[start, start + size)` at the stack that called the syscall.
#[inline(always)]
fn record(cgroup_id: u64, tgid: u32, start: u64, size: u64, regs: &pt_regs) {
    if size == 0 {
        return;
    }
    let info = AllocInfo {
        size,
        weight_bytes: size,
        weight_count: COUNT_SCALE,
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        usage: UsageKey {
            cgroup_id,
            tgid,
            _pad: 0,
            stack_id: call_site_stack(regs),
        },
    };
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr: start,
    };
    // A region still recorded at this start was unmapped unseen (the tracepoint attached
    // mid-call, or an exec): retire it first so the totals stay consistent.
    if let Some(old) = MAPPED_REGIONS.get_ptr(&key) {
        // SAFETY: copied out of the map.
        let old = unsafe { *old };
        account(&old, old.size, 0);
    }
    if MAPPED_REGIONS.insert(&key, &info, BPF_ANY as u64).is_err() {
        count(Counter::MappedFull);
        return;
    }
    let Some(usage) = get_or_init!(MAPPED, &info.usage, Counter::MappedFull) else {
        let _ = MAPPED_REGIONS.remove(&key);
        return;
    };
    // SAFETY: a valid map value pointer, only changed with atomic adds.
    let usage = unsafe { &mut *usage };
    add(&mut usage.allocated_bytes, size);
    add(&mut usage.allocated_count, COUNT_SCALE);
    add_signed(&mut usage.outstanding_bytes, size as i64);
    add_signed(&mut usage.outstanding_count, COUNT_SCALE as i64);
    add_live(usage, &info, 1);
}

/// Subtracts `bytes` unmapped from `region`, of which `pieces_left` regions remain (0 for a
/// whole region, 1 or 2 for a cut at its edge or in its middle).
#[inline(always)]
fn account(region: &AllocInfo, bytes: u64, pieces_left: i64) {
    let Some(usage) = MAPPED.get_ptr_mut(&region.usage) else {
        return;
    };
    // SAFETY: as above.
    let usage = unsafe { &mut *usage };
    add(&mut usage.freed_bytes, bytes);
    add_signed(&mut usage.outstanding_bytes, -(bytes as i64));
    add_signed(
        &mut usage.outstanding_count,
        (pieces_left - 1) * COUNT_SCALE as i64,
    );
    add_live(usage, region, pieces_left - 1);
}

#[inline(always)]
fn add_live(usage: &mut Usage, region: &AllocInfo, regions: i64) {
    let ms = (region.timestamp_ns / 1_000_000) as i64;
    add_signed(as_signed(&mut usage.live_blocks), regions);
    add_signed(as_signed(&mut usage.live_time_ms_sum), regions * ms);
}

/// Cuts `[addr, addr + len)` out of the tracked regions of `tgid`: the region it starts in
/// (one starting there, or up to `MAPPED_MAX_PAGES_BACK` pages before), then regions
/// starting exactly where the previous one ended. A head left before the cut keeps its
/// start; a tail after it is re-inserted at the cut's end. Returns whether anything tracked
/// was cut. Ranges nobody tracked (files, libraries, reservations) cost only the lookups.
#[inline(always)]
fn unmap(tgid: u32, addr: u64, len: u64) -> bool {
    if len == 0 {
        return false;
    }
    let page = page_size();
    let end = addr.saturating_add(len.div_ceil(page) * page);
    let Some(mut found) = region_around(tgid, addr) else {
        return false;
    };
    let mut cursor = addr;
    for _ in 0..MUNMAP_MAX_REGIONS {
        let (start, region) = found;
        let region_end = start + region.size;
        let cut_end = if end < region_end { end } else { region_end };
        let _ = MAPPED_REGIONS.remove(&AllocKey {
            tgid,
            _pad: 0,
            addr: start,
        });
        let head = cursor - start;
        let tail = region_end - cut_end;
        account(
            &region,
            cut_end - cursor,
            (head > 0) as i64 + (tail > 0) as i64,
        );
        if head > 0 {
            reinsert(tgid, start, &region, head);
        }
        if tail > 0 {
            reinsert(tgid, cut_end, &region, tail);
        }
        cursor = cut_end;
        if cursor >= end {
            return true;
        }
        let Some(next) = MAPPED_REGIONS.get_ptr(&AllocKey {
            tgid,
            _pad: 0,
            addr: cursor,
        }) else {
            return true; // The rest of the range is not ours.
        };
        // SAFETY: copied out of the map.
        found = (cursor, unsafe { *next });
    }
    count(Counter::MappedUnresolved);
    true
}

#[inline(always)]
fn reinsert(tgid: u32, start: u64, region: &AllocInfo, size: u64) {
    let piece = AllocInfo {
        size,
        weight_bytes: size,
        ..*region
    };
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr: start,
    };
    if MAPPED_REGIONS.insert(&key, &piece, BPF_ANY as u64).is_err() {
        count(Counter::MappedFull);
    }
}

/// The tracked region containing `addr`: one starting there, or up to
/// `MAPPED_MAX_PAGES_BACK` pages before it (a cut deeper into a region is not seen).
#[inline(always)]
fn region_around(tgid: u32, addr: u64) -> Option<(u64, AllocInfo)> {
    let page = page_size();
    for back in 0..=MAPPED_MAX_PAGES_BACK as u64 {
        let start = addr.checked_sub(back * page)?;
        if let Some(region) = MAPPED_REGIONS.get_ptr(&AllocKey {
            tgid,
            _pad: 0,
            addr: start,
        }) {
            // SAFETY: copied out of the map.
            let region = unsafe { *region };
            return (start + region.size > addr).then_some((start, region));
        }
    }
    None
}

/// The stack of the code that asked for the mapping, walked from the syscall.
///
/// The syscall runs inside libc (malloc → sysmalloc → mmap), built without frame pointers:
/// `rbp` holds data there, so the frame-pointer walk the page faults use would stop at
/// libc's `mmap`. Instead the user stack is scanned upwards from the syscall's `rsp` for
/// the first frame record of code with frame pointers (a word pointing a little above its
/// own slot, followed by a return address, and itself pointing at its caller's record):
/// that is the frame of the function that called into libc. Its caller's `call rel32` names the function's entry, which stands for the
/// function (one past it: frames are symbolized as return addresses, at address − 1); then
/// the frame-pointer chain from the record. The return address into the function itself
/// is not used even when it is on the stack: a uretprobe on the function it called (the
/// exact tier's on malloc) replaces it with its trampoline, and the same call site would
/// get two stacks. A caller that called through a register: the last return address seen
/// below the record. A word counts as a return address when the bytes before it are a call.
#[inline(always)]
fn call_site_stack(regs: &pt_regs) -> u64 {
    let (first, fp) = scan_call_site(regs.rsp).unwrap_or((regs.rip, 0));
    walk_stack_from(first, fp)
}

#[inline(always)]
fn scan_call_site(sp: u64) -> Option<(u64, u64)> {
    let scratch = SCAN_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; programs do not preempt each other on one CPU.
    let words = unsafe { &mut *scratch };
    // SAFETY: reading user memory through the helper, which checks the address.
    if unsafe { aya_ebpf::helpers::bpf_probe_read_user_buf(sp as *const u8, as_bytes(words)) }
        .is_err()
    {
        count(Counter::ReadFailed);
        return None;
    }
    let mut last_return = 0u64;
    let mut previous = 0u64;
    for i in 0..SCAN_WORDS {
        let word = words[i];
        let slot = sp + 8 * i as u64;
        let callee = called_from(word, sp);
        if callee != NOT_A_RETURN {
            // The word before it, pointing just above itself: a frame record.
            let record = slot.wrapping_sub(8);
            if i > 0
                && previous > record
                && previous - record < MAX_FRAME_BYTES
                && previous.is_multiple_of(8)
                && is_callers_frame(previous, word, sp)
            {
                let first = if callee == 0 { last_return } else { callee + 1 };
                return (first != 0).then_some((first, record));
            }
            last_return = word;
        }
        previous = word;
    }
    None
}

/// Whether `frame` is the frame record of the function `return_address` returns into: it
/// holds a return address too, and when that one follows a `call rel32`, the function it
/// called contains `return_address`. Stale words (a pointer to a local of a call that has
/// returned, next to its return address) look like a record; they fail this.
#[inline(always)]
fn is_callers_frame(frame: u64, return_address: u64, sp: u64) -> bool {
    // SAFETY: reading user memory through the helper, which checks the address.
    let Ok(callers_return) = (unsafe { bpf_probe_read_user((frame + 8) as *const u64) }) else {
        return false;
    };
    match called_from(callers_return, sp) {
        NOT_A_RETURN => false,
        0 => true, // Called through a register: its entry is unknown.
        entry => return_address.wrapping_sub(entry) < MAX_FUNCTION_BYTES,
    }
}

/// How far a return address may lie after its function's entry.
const MAX_FUNCTION_BYTES: u64 = 1 << 20;

#[inline(always)]
fn as_bytes(words: &mut [u64; SCAN_WORDS]) -> &mut [u8] {
    // SAFETY: a u64 array is valid as bytes.
    unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, SCAN_WORDS * 8) }
}

/// Whether `word` looks like a return address: a user address off the stack whose
/// preceding bytes end in a call (`call rel32`, or `call` through a register or memory:
/// opcode 0xff with reg field 2, 2, 3 or 6 bytes long). Returns the called function's
/// entry for a `call rel32`, 0 for another call, [`NOT_A_RETURN`] for no call. (A plain
/// `u64`: a BPF function returns one register.)
#[inline(always)]
fn called_from(word: u64, sp: u64) -> u64 {
    // Below the first pages (small integers) or above user space (kernel, -errno), or a
    // stack address: not code.
    if !(0x10000..0x0000_8000_0000_0000).contains(&word) || word.wrapping_sub(sp) < (8 << 20) {
        return NOT_A_RETURN;
    }
    // SAFETY: reading user memory through the helper, which checks the address.
    let Ok(b) = (unsafe { bpf_probe_read_user((word - 8) as *const [u8; 8]) }) else {
        return NOT_A_RETURN;
    };
    if b[3] == 0xe8 {
        let offset = i32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        return word.wrapping_add(offset as i64 as u64);
    }
    let call_via = |op: u8, modrm: u8| op == 0xff && (modrm >> 3) & 7 == 2;
    if call_via(b[6], b[7]) || call_via(b[5], b[6]) || call_via(b[2], b[3]) {
        0
    } else {
        NOT_A_RETURN
    }
}

/// [`called_from`]: the word is no return address.
const NOT_A_RETURN: u64 = u64::MAX;
