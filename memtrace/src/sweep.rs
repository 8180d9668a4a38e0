//! Freed `ALLOCS` entries: a `free` marks its block's entry [`FREED`] instead of deleting
//! it, and the next block the allocator hands out at that address reuses the entry in
//! place (most do: allocators hand freed addresses out again first). That saves a hash-map
//! insert and a delete per malloc+free pair, the dearest part of the exact tier's probes.
//! Entries of addresses that are not reused must still go: every interval userspace
//! advances the sweep epoch, and when freed entries reach an eighth of the map it deletes
//! those that stayed freed for a whole epoch.
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use memtrace_common::{AllocInfo, AllocKey, FREED, maps};

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

use crate::tracer::Tracer;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Freed entries deleted.
    pub deleted: u64,
    /// Entries that were reused for a live block between the scan and the delete: put
    /// back as they were.
    pub restored: u64,
}

impl Tracer {
    /// Freed entries in `ALLOCS` now (entries marked, less reused, less deleted here).
    pub fn freed_entries(&self) -> Result<i64> {
        let counts: PerCpuArray<&MapData, i64> =
            PerCpuArray::try_from(self.map(maps::FREED_ENTRIES)?)?;
        let marked: i64 = counts.get(&0, 0)?.iter().sum();
        Ok(marked - self.freed_deleted())
    }

    /// Advances the epoch and, when freed entries fill an eighth of `ALLOCS` (or
    /// `always`), deletes those freed before the previous epoch.
    pub fn sweep_freed(&mut self, always: bool) -> Result<Sweep> {
        let epoch = self.advance_sweep_epoch();
        {
            let mut current: Array<&mut MapData, u64> =
                Array::try_from(self.map_mut(maps::SWEEP_EPOCH)?)?;
            current.set(0, epoch, 0)?;
        }
        let capacity = i64::from(self.max_allocations());
        if !always && self.freed_entries()? < capacity / 8 {
            return Ok(Sweep::default());
        }
        let map = self.map_mut(maps::ALLOCS)?;
        let fd = match map {
            aya::maps::Map::HashMap(data) => data.fd().as_fd().as_raw_fd(),
            _ => anyhow::bail!("ALLOCS is not a hash map"),
        };
        let mut allocs: BpfHashMap<&mut MapData, AllocKey, AllocInfo> = BpfHashMap::try_from(map)?;
        // Freed at least one whole epoch ago: an address idle that long is not being
        // reused this very microsecond (and if it is, it is put back below).
        let stale: Vec<AllocKey> = allocs
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, info)| info.size == FREED && info.timestamp_ns + 1 < epoch)
            .map(|(key, _)| key)
            .collect();
        let mut sweep = Sweep::default();
        for key in stale {
            match lookup_and_delete(fd, &key) {
                Ok(Some(info)) if info.size == FREED => sweep.deleted += 1,
                Ok(Some(live)) => {
                    // Reused for a live block meanwhile: put it back, unless a newer
                    // block got there first.
                    let _ = allocs.insert(key, live, BPF_NOEXIST);
                    sweep.restored += 1;
                }
                Ok(None) => {} // Gone already (its process exited).
                Err(e) => return Err(e).context("deleting a freed ALLOCS entry"),
            }
        }
        self.note_freed_deleted(sweep.deleted);
        Ok(sweep)
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a hash map (Linux 5.14): the entry as it was when
/// deleted, atomically, or `None` if there was none. aya offers it for queues only.
fn lookup_and_delete(fd: i32, key: &AllocKey) -> Result<Option<AllocInfo>> {
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = AllocInfo::default();
    let attr = MapElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as *const AllocKey as u64,
        value: &mut value as *mut AllocInfo as u64,
        flags: 0,
    };
    // SAFETY: `attr` points at a key and a value buffer of the map's sizes, alive for
    // the call; the kernel reads `size_of::<MapElemAttr>()` bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as u32,
        )
    };
    if ret == 0 {
        return Ok(Some(value));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        e => Err(e.into()),
    }
}
