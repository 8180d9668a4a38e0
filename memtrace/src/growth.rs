//! The always-on tier, userspace side: memory growth attributed to user stacks from the
//! page faults that populate new pages (`page_fault_user`, see `memtrace-ebpf/src/growth.rs`),
//! with no probe on any allocator. It answers "which stacks touch new memory", at the cost
//! of one stack walk per first touch of a page, and decides where the allocator probes of
//! the exact tier are worth their trap per call.
//!
//! Its numbers come out as a [`Snapshot`] like the exact tier's, so reports, the detector,
//! pprof and flame graphs take them unchanged: a stack's "allocated" and "outstanding"
//! bytes are the bytes of the pages it populated (growth only: a page given back is not
//! attributable to the stack that touched it).
use anyhow::{Context, Result};
use aya::{
    Btf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::BtfTracePoint,
};
use memtrace_common::{COUNT_SCALE, FaultGrowth, Usage, UsageKey, maps, programs};

use crate::tracer::{Snapshot, Tracer, remove_keys};

impl Tracer {
    /// Loads and attaches the page-fault program, once. Fails with one line when the
    /// kernel has no BTF or no `page_fault_user` tracepoint.
    pub fn enable_growth(&mut self) -> Result<()> {
        let ebpf = self.ebpf_mut();
        let program: &mut BtfTracePoint = ebpf
            .program_mut(programs::PAGE_FAULT_USER)
            .context("the BPF object has no page-fault program")?
            .try_into()?;
        if program.fd().is_ok() {
            return Ok(()); // Loaded and attached already.
        }
        let btf = Btf::from_sys_fs().context(
            "the always-on tier needs kernel BTF (/sys/kernel/btf/vmlinux), which this kernel lacks",
        )?;
        program
            .load("page_fault_user", &btf)
            .context("loading the page-fault program (tracepoint page_fault_user)")?;
        program
            .attach()
            .context("attaching to the page_fault_user tracepoint")?;
        Ok(())
    }

    /// Counts the page faults of every process in cgroup `id` (a container).
    pub fn watch_cgroup(&mut self, id: u64) -> Result<()> {
        self.set_watched(maps::WATCHED_CGROUPS, id, true)
            .with_context(|| format!("watching cgroup {id} (too many containers?)"))
    }

    pub fn unwatch_cgroup(&mut self, id: u64) {
        let _ = self.set_watched(maps::WATCHED_CGROUPS, id, false);
    }

    /// Counts the page faults of process `tgid`, whatever its cgroup.
    pub fn watch_process(&mut self, tgid: u32) -> Result<()> {
        self.set_watched(maps::WATCHED_PROCESSES, tgid, true)
            .with_context(|| format!("watching pid {tgid}"))
    }

    pub fn unwatch_process(&mut self, tgid: u32) {
        let _ = self.set_watched(maps::WATCHED_PROCESSES, tgid, false);
    }

    /// Adds `key` to (or removes it from) one of the watched sets.
    fn set_watched<K: aya::Pod>(&mut self, map: &str, key: K, watched: bool) -> Result<()> {
        let mut set: BpfHashMap<&mut MapData, K, u32> = BpfHashMap::try_from(self.map_mut(map)?)?;
        if watched {
            set.insert(key, 1, 0)?;
        } else {
            set.remove(&key)?;
        }
        Ok(())
    }

    /// Frees the always-on tier's map entries of process `tgid` (gone).
    pub fn forget_growth(&mut self, tgid: u32) -> Result<()> {
        self.forget_growth_all(&std::collections::HashSet::from([tgid]))
    }

    /// [`Tracer::forget_growth`] for many processes, in one pass over the map.
    pub fn forget_growth_all(&mut self, tgids: &std::collections::HashSet<u32>) -> Result<()> {
        if tgids.is_empty() {
            return Ok(());
        }
        let mut faults: BpfHashMap<&mut MapData, UsageKey, FaultGrowth> =
            BpfHashMap::try_from(self.map_mut(maps::FAULTS)?)?;
        remove_keys(&mut faults, |k| tgids.contains(&k.tgid));
        Ok(())
    }

    /// The always-on tier's growth per stack for processes `keep` accepts, as a
    /// [`Snapshot`] (see the module's docs for what its numbers mean).
    pub fn growth_snapshot(&mut self, keep: impl Fn(&UsageKey) -> bool) -> Result<Snapshot> {
        let faults: BpfHashMap<&MapData, UsageKey, FaultGrowth> =
            BpfHashMap::try_from(self.map(maps::FAULTS)?)?;
        let mut entries = Vec::new();
        for item in faults.iter() {
            let (key, growth) = item.context("reading FAULTS")?;
            if keep(&key) {
                entries.push((key, growth));
            }
        }
        let entries = entries
            .into_iter()
            .map(|(key, growth)| (key, as_usage(&growth)))
            .collect();
        self.usage_snapshot(entries)
    }
}

/// Page-fault growth in the exact tier's terms: each populated page is a block that stays.
fn as_usage(growth: &FaultGrowth) -> Usage {
    let count = growth.faults.saturating_mul(COUNT_SCALE);
    Usage {
        outstanding_bytes: growth.bytes as i64,
        outstanding_count: count as i64,
        allocated_bytes: growth.bytes,
        allocated_count: count,
        ..Usage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_is_a_page_that_stays() {
        let usage = as_usage(&FaultGrowth {
            bytes: 3 * 4096,
            faults: 3,
        });
        assert_eq!(usage.outstanding_bytes, 3 * 4096);
        assert_eq!(usage.allocated_bytes, 3 * 4096);
        assert_eq!(usage.outstanding_count, 3 * COUNT_SCALE as i64);
        assert_eq!(usage.freed_bytes, 0);
    }
}
