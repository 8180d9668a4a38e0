//! Process lifecycle events for the agent's discovery: an `exec` or a `fork` in a watched
//! cgroup (or by a traced process) and the `exit` of a traced process, from BTF tracepoints (no
//! tracefs needed), sent through a ring buffer. Rare events only: nothing here runs per
//! allocation.
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns,
    },
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use memtrace_common::{LifecycleEvent, lifecycle};

use crate::TRACED;

#[map]
static LIFECYCLE_EVENTS: RingBuf = RingBuf::with_byte_size(lifecycle::RING_BYTES, 0);
#[map]
static LIFECYCLE_CGROUPS: HashMap<u64, u32> =
    HashMap::with_max_entries(lifecycle::MAX_WATCHED_CGROUPS, 0);
#[map]
static LIFECYCLE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Whether the current task's cgroup, or one of its ancestors, is watched.
#[inline(always)]
fn in_watched_cgroup() -> bool {
    for level in 0..=lifecycle::MAX_CGROUP_LEVEL {
        // SAFETY: BPF helper without memory arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            // Past the task's own level.
            return false;
        }
        if LIFECYCLE_CGROUPS.get_ptr(&id).is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn send(kind: u32, tgid: u32) {
    let event = LifecycleEvent {
        kind,
        tgid,
        // SAFETY: BPF helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // SAFETY: BPF helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
    };
    if LIFECYCLE_EVENTS
        .output::<LifecycleEvent>(&event, 0)
        .is_err()
        && let Some(drops) = LIFECYCLE_DROPS.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, and BPF programs do not preempt each other on one CPU.
        unsafe { *drops += 1 };
    }
}

/// After a successful exec (the task already runs the new image).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn lifecycle_exec(_ctx: BtfTracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TRACED.get_ptr(&tgid).is_some() || in_watched_cgroup() {
        send(lifecycle::EXEC, tgid);
    }
    0
}

/// When a task exits; reported for the thread-group leader of a traced process only.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn lifecycle_exit(_ctx: BtfTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tgid == pid && TRACED.get_ptr(&tgid).is_some() {
        send(lifecycle::EXIT, tgid);
    }
    0
}

/// `clone(2)` flag of a new thread (not a new process).
const CLONE_THREAD: u64 = 0x0001_0000;

/// A new task; reported when it is a process (not a thread) whose parent, the current
/// task, is traced or in a watched cgroup (the child starts in its parent's cgroup).
#[btf_tracepoint(function = "task_newtask")]
pub fn lifecycle_fork(ctx: BtfTracePointContext) -> u32 {
    // task_newtask(struct task_struct *task, unsigned long clone_flags)
    let clone_flags: u64 = ctx.arg(1);
    if clone_flags & CLONE_THREAD != 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TRACED.get_ptr(&tgid).is_some() || in_watched_cgroup() {
        send(lifecycle::FORK, tgid);
    }
    0
}
