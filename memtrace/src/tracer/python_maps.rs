//! The Python side of the tracer: per-process interpreter configuration, probes on the
//! interpreter, and reading the Python maps back.
use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::Path,
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::uprobe::UProbeScope,
};
use memtrace_common::{
    ProcessKey,
    python::{GcKey, GcStats, PyConfig, PyCounter, PyFrame, PyStack, maps},
};

use super::{AttachedProbe, Owner, Tracer};
use crate::{placement, process::FileId, python::PythonProbe};

/// Interpreter probes shared node-wide per interpreter file (the agent's way, as for libc),
/// and the traced processes using each set.
#[derive(Default)]
pub(super) struct SharedProbes {
    users: HashMap<FileId, HashSet<u32>>,
    files: HashMap<u32, FileId>,
}

/// Garbage-collector and object statistics of the traced processes.
#[derive(Clone, Debug, Default)]
pub struct PythonStats {
    pub gc: Vec<(GcKey, GcStats)>,
    /// Live blocks of the object allocator per process (exact mode).
    pub live_objects: Vec<(ProcessKey, i64)>,
    /// Summed over CPUs, indexed by [`PyCounter`].
    pub counters: [u64; PyCounter::COUNT as usize],
}

impl Tracer {
    /// Tells the BPF side where process `pid`'s interpreter keeps its frames.
    pub fn set_python(&mut self, pid: u32, config: &PyConfig) -> Result<()> {
        let mut procs: BpfHashMap<&mut MapData, u32, PyConfig> =
            BpfHashMap::try_from(self.map_mut(maps::PY_PROCS)?)?;
        procs
            .insert(pid, config, 0)
            .with_context(|| format!("adding pid {pid} to PY_PROCS"))?;
        self.set_python_any(true)
    }

    /// Tells the BPF side whether any process has Python frames to read.
    fn set_python_any(&mut self, any: bool) -> Result<()> {
        let mut flag: aya::maps::Array<&mut MapData, u32> =
            aya::maps::Array::try_from(self.map_mut(maps::PY_ANY)?)?;
        flag.set(0, u32::from(any), 0)?;
        Ok(())
    }

    /// Attaches `probes` to the interpreter file `path`, firing only in process `pid`.
    pub fn attach_python(
        &mut self,
        pid: u32,
        path: &Path,
        probes: &[PythonProbe],
    ) -> Result<Vec<AttachedProbe>> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
        self.attach_python_probes(path, scope, Owner::Process(pid), probes)
    }

    fn attach_python_probes(
        &mut self,
        path: &Path,
        scope: UProbeScope,
        owner: Owner,
        probes: &[PythonProbe],
    ) -> Result<Vec<AttachedProbe>> {
        let mut attached = Vec::new();
        for probe in probes {
            let placed = placement::place(&probe.code);
            let offset = probe.file_offset + placed.offset;
            // The return first, as for libc: an entry without its return would leave
            // the thread claiming a call in flight.
            if let Some(exit) = probe.exit {
                self.attach_program(exit, offset, path, scope, owner)
                    .with_context(|| format!("attaching {exit} to {}", probe.symbol))?;
            }
            self.attach_program(probe.entry, offset, path, scope, owner)
                .with_context(|| format!("attaching {} to {}", probe.entry, probe.symbol))?;
            log::debug!("{}: probe at +{}", probe.symbol, placed.offset);
            attached.push(AttachedProbe {
                symbol: probe.symbol,
                offset: placed.offset,
                emulated: placed.emulated,
            });
        }
        Ok(attached)
    }

    /// Like [`Tracer::attach_python`], but the probes are shared by every traced process
    /// that maps the same interpreter `file`: the first attaches them, node-wide, the BPF
    /// programs ignore processes not in `TRACED` (needs `filter_processes`), and the last
    /// user's [`Tracer::untrace`] detaches them.
    pub fn attach_python_shared(
        &mut self,
        pid: u32,
        path: &Path,
        file: FileId,
        probes: &[PythonProbe],
    ) -> Result<Vec<AttachedProbe>> {
        let first = !self.python_shared.users.contains_key(&file);
        let attached = if first {
            match self.attach_python_probes(
                path,
                UProbeScope::AllProcesses,
                Owner::File(file),
                probes,
            ) {
                Ok(attached) => attached,
                Err(e) => {
                    self.detach_owner(Owner::File(file));
                    return Err(e);
                }
            }
        } else {
            Vec::new()
        };
        self.python_shared
            .users
            .entry(file)
            .or_default()
            .insert(pid);
        self.python_shared.files.insert(pid, file);
        Ok(attached)
    }

    /// Drops `pid` from the users of its shared interpreter probes; the last one detaches
    /// them.
    pub(super) fn untrace_python(&mut self, pid: u32) {
        let Some(file) = self.python_shared.files.remove(&pid) else {
            return;
        };
        let users = self.python_shared.users.entry(file).or_default();
        users.remove(&pid);
        if users.is_empty() {
            self.python_shared.users.remove(&file);
            self.detach_owner(Owner::File(file));
        }
    }

    /// The Python frames stored with stack `stack_id` (empty for none).
    pub(crate) fn python_frames(&mut self, stack_id: u64) -> Vec<PyFrame> {
        if let Some(frames) = self.python_cache.get(&stack_id) {
            return frames.clone();
        }
        let Ok(map) = self.map(maps::PY_STACKS) else {
            return Vec::new();
        };
        let Ok(stacks) = BpfHashMap::<&MapData, u64, PyStack>::try_from(map) else {
            return Vec::new();
        };
        let frames = match stacks.get(&stack_id, 0) {
            Ok(stack) => stack.frames[..(stack.len as usize).min(stack.frames.len())].to_vec(),
            Err(_) => Vec::new(),
        };
        self.python_cache.insert(stack_id, frames.clone());
        frames
    }

    /// GC statistics, live objects and Python counters of processes in `tgids`.
    pub fn python_stats(&self, tgids: &HashSet<u32>) -> Result<PythonStats> {
        let mut stats = PythonStats::default();
        let gc: BpfHashMap<&MapData, GcKey, GcStats> =
            BpfHashMap::try_from(self.map(maps::PY_GC)?)?;
        for item in gc.iter() {
            let (key, value) = item.context("reading PY_GC")?;
            if tgids.contains(&key.tgid) {
                stats.gc.push((key, value));
            }
        }
        let live: PerCpuHashMap<&MapData, ProcessKey, i64> =
            PerCpuHashMap::try_from(self.map(maps::PY_LIVE)?)?;
        for item in live.iter() {
            let (key, per_cpu) = item.context("reading PY_LIVE")?;
            if tgids.contains(&key.tgid) {
                stats.live_objects.push((key, per_cpu.iter().sum()));
            }
        }
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(maps::PY_COUNTERS)?)?;
        for counter in PyCounter::ALL {
            let per_cpu = counters.get(&(counter as u32), 0)?;
            stats.counters[counter as usize] = per_cpu.iter().sum();
        }
        Ok(stats)
    }

    /// Deletes the Python state of process `tgid` (after it exited).
    pub(crate) fn forget_python(&mut self, tgids: &std::collections::HashSet<u32>) -> Result<()> {
        let mut procs: BpfHashMap<&mut MapData, u32, PyConfig> =
            BpfHashMap::try_from(self.map_mut(maps::PY_PROCS)?)?;
        for tgid in tgids {
            let _ = procs.remove(tgid);
        }
        let any = procs.keys().next().is_some();
        if !any {
            self.set_python_any(false)?;
        }
        let mut gc: BpfHashMap<&mut MapData, GcKey, GcStats> =
            BpfHashMap::try_from(self.map_mut(maps::PY_GC)?)?;
        let doomed: Vec<GcKey> = gc
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| tgids.contains(&k.tgid))
            .collect();
        for key in doomed {
            let _ = gc.remove(&key);
        }
        let mut live: PerCpuHashMap<&mut MapData, ProcessKey, i64> =
            PerCpuHashMap::try_from(self.map_mut(maps::PY_LIVE)?)?;
        let doomed: Vec<ProcessKey> = live
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| tgids.contains(&k.tgid))
            .collect();
        for key in doomed {
            let _ = live.remove(&key);
        }
        Ok(())
    }
}
