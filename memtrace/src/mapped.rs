//! The always-on tier's mapped memory, userspace side: anonymous `mmap`s of the watched
//! processes minus their `munmap`s, per call site (`memtrace-ebpf/src/mapped.rs`, a
//! `sys_exit` BTF tracepoint; no uprobe). glibc maps every block of 128 KiB and more on its
//! own, so these are a program's large allocations, outstanding, with their releases,
//! which page faults cannot see. Optional: a kernel that refuses the program loses this
//! view only.
//!
//! Numbers come out as a [`Snapshot`] in the exact tier's terms (a region is a block), so
//! reports, the detector, pprof and flame graphs take them unchanged.
use anyhow::{Context, Result};
use aya::{
    Btf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::BtfTracePoint,
};
use memtrace_common::{AllocInfo, AllocKey, Usage, UsageKey, maps, programs};

use crate::tracer::{Snapshot, Tracer, remove_keys};

/// The view's programs and the tracepoints they run on, `munmap`'s first: a region must
/// never be recorded without its removal running.
const PROGRAMS: [(&str, &str); 2] = [
    (programs::MAPPED_MMAP_LOCK, programs::MMAP_LOCK_TRACEPOINT),
    (
        programs::MAPPED_UNMAPPED_AREA,
        programs::UNMAPPED_AREA_TRACEPOINT,
    ),
];

impl Tracer {
    /// Loads and attaches the mapping programs, once. Fails with one line when the kernel
    /// has no BTF, lacks one of the tracepoints, or its verifier refuses a program (they
    /// need `bpf_task_pt_regs` and the `mmap_lock` tracepoints: Linux 5.15).
    pub fn enable_mapped(&mut self) -> Result<()> {
        if self.mapped_enabled() {
            return Ok(());
        }
        let btf = Btf::from_sys_fs().context("the mmap view needs kernel BTF")?;
        let mut attached = Vec::new();
        for (name, tracepoint) in PROGRAMS {
            let result = self.attach_tracepoint(name, tracepoint, &btf);
            match result {
                Ok(link) => attached.push((name, link)),
                Err(e) => {
                    // All or nothing: mappings without their removal would only grow.
                    for (name, link) in attached {
                        if let Ok(program) = self.btf_program(name) {
                            let _ = program.detach(link);
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.mapped_attached = true;
        Ok(())
    }

    fn btf_program(&mut self, name: &str) -> Result<&mut BtfTracePoint> {
        Ok(self
            .ebpf_mut()
            .program_mut(name)
            .with_context(|| format!("the BPF object has no program {name}"))?
            .try_into()?)
    }

    fn attach_tracepoint(
        &mut self,
        name: &str,
        tracepoint: &str,
        btf: &Btf,
    ) -> Result<aya::programs::tp_btf::BtfTracePointLinkId> {
        let program = self.btf_program(name)?;
        if program.fd().is_err() {
            program
                .load(tracepoint, btf)
                .with_context(|| format!("loading the mmap program on tracepoint {tracepoint}"))?;
        }
        program
            .attach()
            .with_context(|| format!("attaching to the {tracepoint} tracepoint"))
    }

    /// Whether the mapping program runs.
    pub fn mapped_enabled(&mut self) -> bool {
        self.mapped_attached
    }

    /// Frees the mapping view's entries of process `tgid` (gone).
    pub fn forget_mapped(&mut self, tgid: u32) -> Result<()> {
        let mut regions: BpfHashMap<&mut MapData, AllocKey, AllocInfo> =
            BpfHashMap::try_from(self.map_mut(maps::MAPPED_REGIONS)?)?;
        remove_keys(&mut regions, |k| k.tgid == tgid);
        let mut usage: BpfHashMap<&mut MapData, UsageKey, Usage> =
            BpfHashMap::try_from(self.map_mut(maps::MAPPED)?)?;
        remove_keys(&mut usage, |k| k.tgid == tgid);
        Ok(())
    }

    /// Mapped bytes per stack for processes `keep` accepts, as a [`Snapshot`]: each
    /// region is a block, outstanding until unmapped.
    pub fn mapped_snapshot(&mut self, keep: impl Fn(&UsageKey) -> bool) -> Result<Snapshot> {
        let usage: BpfHashMap<&MapData, UsageKey, Usage> =
            BpfHashMap::try_from(self.map(maps::MAPPED)?)?;
        let mut entries = Vec::new();
        for item in usage.iter() {
            let (key, value) = item.context("reading MAPPED")?;
            if keep(&key) {
                entries.push((key, value));
            }
        }
        self.usage_snapshot(entries)
    }
}

/// Starts the view in the agent, or says in one line why not; either way
/// `memtrace_feature_available{feature="mapped_view"}` says which.
pub fn enable_in_agent(tracer: &mut Tracer, metrics: &crate::metrics::Metrics) {
    let result = tracer.enable_mapped();
    if let Err(e) = &result {
        log::warn!("the always-on tier's mmap view is off: {e:#}");
    }
    metrics
        .feature_available
        .with_label_values(&["mapped_view"])
        .set(i64::from(result.is_ok()));
}

#[cfg(test)]
mod tests {
    use memtrace_common::{COUNT_SCALE, ProcessTotals, Usage};

    use crate::tracer::add_to_totals;

    #[test]
    fn totals_add_up_the_stacks() {
        let mut totals = ProcessTotals::default();
        let usage = Usage {
            outstanding_bytes: 2 << 18,
            outstanding_count: 2 * COUNT_SCALE as i64,
            allocated_bytes: 3 << 18,
            allocated_count: 3 * COUNT_SCALE,
            freed_bytes: 1 << 18,
            ..Usage::default()
        };
        add_to_totals(&mut totals, &usage);
        add_to_totals(&mut totals, &usage);
        assert_eq!(totals.outstanding_bytes, 4 << 18);
        assert_eq!(totals.outstanding_count, 4);
        assert_eq!(totals.allocations, 6);
        assert_eq!(totals.freed_bytes, 2 << 18);
    }
}
