//! Prompt discovery: the BPF programs of `memtrace-ebpf/src/lifecycle.rs` report an exec or
//! a fork in a watched cgroup (or by a traced process) and the exit of a traced process
//! through a ring buffer; a thread here collects them and wakes the agent, whose discovery then
//! attaches to the new process, re-attaches one that exec'd (its old heap is gone), or
//! frees the map entries of one that exited, without waiting for the next interval. The
//! periodic /proc and cgroup rescan stays: it catches what events cannot (events lost to a
//! full ring buffer, a `--pid` process's children are never wanted anyway).
use std::{
    collections::{HashMap, HashSet},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    Btf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use memtrace_common::{LifecycleEvent, lifecycle};
use prometheus::{IntCounterVec, Opts, Registry};

use crate::tracer::Tracer;

/// Events kept between two discoveries at most; beyond, the rescan finds the rest.
const MAX_PENDING: usize = 65_536;

/// What discovery learns from the events since it last looked.
#[derive(Debug, Default)]
pub struct Pending {
    /// Processes that called exec (new ones, or traced ones running a new image), with
    /// when they last did (CLOCK_MONOTONIC ns).
    pub execs: HashMap<u32, u64>,
    /// Traced processes that exited.
    pub exits: HashSet<u32>,
}

pub struct Lifecycle {
    watched: BpfHashMap<MapData, u64, u32>,
    watched_ids: HashSet<u64>,
    drops: PerCpuArray<MapData, u64>,
    pending: Arc<Mutex<Pending>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Lifecycle {
    /// Attaches the exec and exit programs and starts reading their events; `wake` is
    /// called (from the reader thread) after each batch.
    pub fn start(
        tracer: &mut Tracer,
        registry: &Registry,
        wake: Box<dyn Fn() + Send>,
    ) -> Result<Self> {
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let ebpf = tracer.ebpf_mut();
        for (program, tracepoint) in [
            (lifecycle::EXEC_PROGRAM, lifecycle::EXEC_TRACEPOINT),
            (lifecycle::EXIT_PROGRAM, lifecycle::EXIT_TRACEPOINT),
            (lifecycle::FORK_PROGRAM, lifecycle::FORK_TRACEPOINT),
        ] {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(program)
                .with_context(|| format!("the BPF object has no program {program}"))?
                .try_into()?;
            program
                .load(tracepoint, &btf)
                .with_context(|| format!("loading the {tracepoint} program"))?;
            program
                .attach()
                .with_context(|| format!("attaching to the {tracepoint} tracepoint"))?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the BPF object has no map {name}"))
        };
        let ring = RingBuf::try_from(take(lifecycle::EVENTS)?)?;
        let watched = BpfHashMap::try_from(take(lifecycle::CGROUPS)?)?;
        let drops = PerCpuArray::try_from(take(lifecycle::DROPS)?)?;
        let counted = IntCounterVec::new(
            Opts::new(
                "memtrace_process_events_total",
                "Process exec, fork and exit events from the kernel that woke discovery.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(counted.clone()))?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("memtrace-events".into())
            .spawn({
                let (pending, stop) = (pending.clone(), stop.clone());
                move || read_events(ring, &pending, &stop, &counted, wake)
            })?;
        Ok(Self {
            watched,
            watched_ids: HashSet::new(),
            drops,
            pending,
            stop,
            thread: Some(thread),
        })
    }

    /// Makes exactly `ids` (and the cgroups below them) the watched cgroups.
    pub fn watch(&mut self, ids: &HashSet<u64>) {
        for gone in self.watched_ids.difference(ids) {
            let _ = self.watched.remove(gone);
        }
        for new in ids.difference(&self.watched_ids.clone()) {
            if let Err(e) = self.watched.insert(*new, 1, 0) {
                log::warn!("watching cgroup id {new} for execs: {e}");
            }
        }
        self.watched_ids = ids.clone();
    }

    /// The events since the last call.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Events lost because the ring buffer was full (a total since start).
    pub fn dropped(&self) -> u64 {
        self.drops
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

fn read_events(
    mut ring: RingBuf<MapData>,
    pending: &Mutex<Pending>,
    stop: &AtomicBool,
    counted: &IntCounterVec,
    wake: Box<dyn Fn() + Send>,
) {
    let fd = ring.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the timeout bounds how long a stop takes.
        let ready =
            unsafe { libc::poll(&mut poll, 1, Duration::from_millis(200).as_millis() as i32) };
        if ready <= 0 {
            continue;
        }
        let mut any = false;
        {
            let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(item) = ring.next() {
                if item.len() < size_of::<LifecycleEvent>() {
                    continue;
                }
                // SAFETY: the kernel wrote a LifecycleEvent (size checked); unaligned read.
                let event: LifecycleEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                any = true;
                match event.kind {
                    lifecycle::EXEC => {
                        counted.with_label_values(&["exec"]).inc();
                        if pending.execs.len() < MAX_PENDING {
                            pending.execs.insert(event.tgid, event.time_ns);
                        }
                    }
                    lifecycle::EXIT => {
                        counted.with_label_values(&["exit"]).inc();
                        if pending.exits.len() < MAX_PENDING {
                            pending.exits.insert(event.tgid);
                        }
                    }
                    // The child is found by the cgroup scan the wake-up starts.
                    lifecycle::FORK => counted.with_label_values(&["fork"]).inc(),
                    _ => {}
                }
            }
        }
        if any {
            wake();
        }
    }
}
