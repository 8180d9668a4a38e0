//! The always-on tier: memory growth attributed to user stacks without a trap per
//! allocation. The kernel already takes a page fault the first time a process touches a
//! page; `page_fault_user` (a BTF tracepoint, no tracefs needed) sees it with the user
//! registers, so the stack that touched new memory costs one stack walk per fault, and
//! nothing at all per `malloc`.
//!
//! Only not-present faults are counted (the page gets populated); protection faults
//! (copy-on-write, guard pages) are not growth. Every `FAULT_SAMPLE`th such fault per CPU
//! is walked and stands for `FAULT_SAMPLE` pages.
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, pt_regs},
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use memtrace_common::{Counter, FaultGrowth, UsageKey, capacity};

use crate::{add, count, page_size, walk_stack_from};

/// Count only every FAULT_SAMPLE-th populating fault per CPU (1 = every one); set at load.
#[unsafe(no_mangle)]
static FAULT_SAMPLE: u64 = 1;

/// Containers (cgroup v2 ids) whose faults are counted: id → 1.
#[map]
static WATCHED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(capacity::WATCHED_CGROUPS, 0);
/// Processes whose faults are counted whatever their cgroup: tgid → 1.
#[map]
static WATCHED_PROCESSES: HashMap<u32, u32> = HashMap::with_max_entries(capacity::TRACED, 0);
/// Pages populated per (cgroup, process, stack).
#[map]
static FAULTS: HashMap<UsageKey, FaultGrowth> =
    HashMap::with_max_entries(capacity::FAULTS, BPF_F_NO_PREALLOC);
/// Per CPU: faults left to skip before the next sampled one.
#[map]
static FAULT_COUNTDOWN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// x86 page-fault error code bit: set for a protection fault on a present page.
const PF_PROTECTION: u64 = 1;

#[inline(always)]
fn fault_sample() -> u64 {
    // SAFETY: a read-only global rewritten by the loader.
    let sample = unsafe { core::ptr::read_volatile(&FAULT_SAMPLE) };
    if sample == 0 { 1 } else { sample }
}

/// Whether the always-on tier follows this task: its container or its process is watched.
#[inline(always)]
pub(crate) fn is_watched(cgroup_id: u64, tgid: u32) -> bool {
    WATCHED_CGROUPS.get_ptr(&cgroup_id).is_some() || WATCHED_PROCESSES.get_ptr(&tgid).is_some()
}

/// `page_fault_user(unsigned long address, struct pt_regs *regs, unsigned long error_code)`.
#[btf_tracepoint(function = "page_fault_user")]
pub fn page_fault_user(ctx: BtfTracePointContext) -> u32 {
    let error_code: u64 = ctx.arg(2);
    if error_code & PF_PROTECTION != 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !is_watched(cgroup_id, tgid) {
        return 0;
    }
    let sample = fault_sample();
    if sample > 1 {
        let Some(left) = FAULT_COUNTDOWN.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
        let left = unsafe { &mut *left };
        if *left > 0 {
            *left -= 1;
            return 0;
        }
        *left = sample - 1;
    }
    let regs: *const pt_regs = ctx.arg(1);
    // SAFETY: the tracepoint's own pt_regs, read through the helper.
    let Ok(regs) = (unsafe { bpf_probe_read_kernel(regs) }) else {
        count(Counter::ReadFailed);
        return 0;
    };
    let key = UsageKey {
        cgroup_id,
        tgid,
        _pad: 0,
        // The faulting instruction first, then its callers by frame pointers.
        stack_id: walk_stack_from(regs.rip, regs.rbp),
    };
    // A failed walk (NO_STACK) still counts, as the process's unattributed growth.
    if let Some(growth) = get_or_init!(FAULTS, &key, Counter::FaultsFull) {
        // SAFETY: a valid map value pointer, only changed with atomic adds.
        let growth = unsafe { &mut *growth };
        add(&mut growth.bytes, sample * page_size());
        add(&mut growth.faults, sample);
    }
    0
}
