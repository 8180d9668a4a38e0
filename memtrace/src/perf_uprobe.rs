//! A uprobe as a bare perf event: the kernel's trap at a file offset, counted by perf, with
//! no BPF program behind it. This is the floor every uprobe-based tracer pays per hit, and
//! what the overhead benchmark (`benches/overhead.rs`) measures memtrace against.
//!
//! The event comes from the `uprobe` PMU (`perf_event_open` with its dynamic type,
//! `config1` = the file's path, `config2` = the offset in it; the return-probe flag is the
//! `config` bit its sysfs `format/retprobe` names), the same path aya takes to attach its
//! programs. Scoped to the calling thread, the probe traps in every thread of this process
//! (the kernel filters uprobes by address space) and counts the calling thread's hits.
use std::{
    ffi::CString,
    fs::File,
    io::Read,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context, Result, bail};
use perf_event_open_sys::{bindings::perf_event_attr, perf_event_open};

/// Where the kernel describes the uprobe PMU.
const PMU_DIR: &str = "/sys/bus/event_source/devices/uprobe";

/// Entry or return probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Entry,
    Return,
}

/// One counting uprobe event; closing it (on drop) removes the probe.
pub struct PerfUprobe {
    file: File,
}

impl PerfUprobe {
    /// Opens (and enables) a uprobe at `offset` bytes into the file `path`, counting the
    /// hits of the calling thread.
    pub fn open(path: &Path, offset: u64, kind: ProbeKind) -> Result<Self> {
        let pmu_type = read_pmu_type(Path::new(PMU_DIR))?;
        let mut attr = perf_event_attr {
            type_: pmu_type,
            size: std::mem::size_of::<perf_event_attr>() as u32,
            ..Default::default()
        };
        if kind == ProbeKind::Return {
            attr.config = 1 << read_retprobe_bit(Path::new(PMU_DIR))?;
        }
        let c_path = CString::new(path.as_os_str().as_bytes())
            .with_context(|| format!("{} has a NUL byte", path.display()))?;
        attr.__bindgen_anon_3.config1 = c_path.as_ptr() as u64;
        attr.__bindgen_anon_4.config2 = offset;
        // SAFETY: `attr` is a fully initialised perf_event_attr whose size field is its own
        // size, and `c_path` outlives the call; pid 0 / cpu -1 is this thread on any CPU.
        let fd = unsafe {
            perf_event_open(
                &mut attr,
                0,
                -1,
                -1,
                perf_event_open_sys::bindings::PERF_FLAG_FD_CLOEXEC as _,
            )
        };
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            bail!(
                "perf_event_open of a {kind:?} uprobe at {}+{offset:#x}: {error}",
                path.display()
            );
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { file: fd.into() })
    }

    /// How many times the probe fired in the calling thread since it was opened.
    pub fn count(&self) -> Result<u64> {
        let mut value = [0u8; 8];
        (&self.file)
            .read_exact(&mut value)
            .context("reading a uprobe event's count")?;
        Ok(u64::from_ne_bytes(value))
    }
}

/// The uprobe PMU's dynamic perf type, from `<pmu_dir>/type`.
fn read_pmu_type(pmu_dir: &Path) -> Result<u32> {
    let path = pmu_dir.join("type");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (a kernel without CONFIG_UPROBE_EVENTS has no uprobe PMU)",
            path.display()
        )
    })?;
    text.trim()
        .parse()
        .with_context(|| format!("{} holds {:?}, not a number", path.display(), text.trim()))
}

/// The `config` bit that makes a uprobe event a return probe, from `<pmu_dir>/format/retprobe`.
fn read_retprobe_bit(pmu_dir: &Path) -> Result<u32> {
    let path = pmu_dir.join("format/retprobe");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_config_bit(&text).with_context(|| format!("in {}", path.display()))
}

/// Parses a one-bit PMU format field, `config:N`.
fn parse_config_bit(text: &str) -> Result<u32> {
    let text = text.trim();
    let Some(bit) = text.strip_prefix("config:") else {
        bail!("{text:?} is not a field of `config`");
    };
    let bit: u32 = bit
        .parse()
        .with_context(|| format!("{text:?} is not a single bit"))?;
    if bit >= 64 {
        bail!("{text:?}: bit {bit} is past config's 64 bits");
    }
    Ok(bit)
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;

    use super::*;
    use crate::{elf::ElfFile, process::own_libc};

    #[test]
    fn parses_one_config_bit() {
        assert_eq!(parse_config_bit("config:0\n").unwrap(), 0);
        assert_eq!(parse_config_bit("config:17").unwrap(), 17);
        assert!(parse_config_bit("config:32-63").is_err());
        assert!(parse_config_bit("config1:0").is_err());
        assert!(parse_config_bit("config:64").is_err());
        assert!(parse_config_bit("").is_err());
    }

    #[test]
    fn reads_the_pmu_files() {
        let dir = std::env::temp_dir().join(format!("memtrace-pmu-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("format")).unwrap();
        std::fs::write(dir.join("type"), "8\n").unwrap();
        std::fs::write(dir.join("format/retprobe"), "config:0\n").unwrap();
        let read = (read_pmu_type(&dir), read_retprobe_bit(&dir));
        std::fs::write(dir.join("type"), "uprobe\n").unwrap();
        let bad = read_pmu_type(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read.0.unwrap(), 8);
        assert_eq!(read.1.unwrap(), 0);
        assert!(bad.is_err());
    }

    /// Real probes on this process's own `malloc` count every call this thread makes.
    #[test]
    fn counts_this_threads_mallocs() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: opening uprobe events needs root");
            return;
        }
        const CALLS: u64 = 1000;
        let libc = own_libc().unwrap();
        let elf = ElfFile::open(&libc).unwrap();
        let malloc = elf.function("malloc").expect("libc has malloc");
        let entry = PerfUprobe::open(&libc, malloc.file_offset, ProbeKind::Entry).unwrap();
        let exit = PerfUprobe::open(&libc, malloc.file_offset, ProbeKind::Return).unwrap();
        let (entries, exits) = (entry.count().unwrap(), exit.count().unwrap());
        for size in 0..CALLS as usize {
            // SAFETY: a plain allocation, freed at once.
            unsafe { libc::free(libc::malloc(black_box(16 + size % 64))) };
        }
        let entries = entry.count().unwrap() - entries;
        let exits = exit.count().unwrap() - exits;
        assert!(
            entries >= CALLS,
            "{CALLS} mallocs, entry probe counted {entries}"
        );
        assert!(
            exits >= CALLS,
            "{CALLS} mallocs, return probe counted {exits}"
        );
    }
}
