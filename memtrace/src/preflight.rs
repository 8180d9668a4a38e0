//! Checks made before loading anything, so that a missing privilege or kernel feature is
//! reported in one line naming it, instead of as a raw errno from deep inside a load.
use std::path::Path;

use anyhow::{Result, bail};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Capabilities memtrace cannot trace without, by name. CAP_SYS_ADMIN covers CAP_BPF
/// and CAP_PERFMON, and opening a uprobe perf event needs it itself: with CAP_BPF,
/// CAP_PERFMON and CAP_SYS_PTRACE but not CAP_SYS_ADMIN, `perf_event_open` of a uprobe
/// fails with EACCES on 6.18 (measured; see deploy/kubernetes/overlays/capabilities).
pub fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing.push("CAP_SYS_ADMIN");
    missing
}

/// The effective capability set from a `/proc/PID/status` text.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Everything `memtrace top` needs from the kernel and its own privileges.
pub fn check(sysfs: &Path) -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = effective_capabilities(&status).unwrap_or(0);
    let missing = missing_capabilities(effective);
    if !missing.is_empty() {
        bail!(
            "memtrace needs root, or CAP_SYS_ADMIN with CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE \
             (uprobe perf events need CAP_SYS_ADMIN); this process lacks {}",
            missing.join(", ")
        );
    }
    check_kernel(sysfs)
}

/// Kernel features, looked up under `sysfs` (`/sys` on a real system).
pub fn check_kernel(sysfs: &Path) -> Result<()> {
    if !sysfs.join("bus/event_source/devices/uprobe").exists() {
        bail!(
            "this kernel has no uprobes ({} is missing): memtrace needs CONFIG_UPROBE_EVENTS",
            sysfs.join("bus/event_source/devices/uprobe").display()
        );
    }
    if !sysfs.join("kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF ({} is missing): memtrace needs CONFIG_DEBUG_INFO_BTF",
            sysfs.join("kernel/btf/vmlinux").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(
            missing_capabilities(0),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"]
        );
        assert_eq!(
            missing_capabilities(1 << CAP_BPF),
            vec!["CAP_PERFMON", "CAP_SYS_ADMIN"]
        );
        assert_eq!(
            missing_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON)),
            vec!["CAP_SYS_ADMIN"]
        );
        assert!(missing_capabilities(1 << CAP_SYS_ADMIN).is_empty());
    }

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
    }

    #[test]
    fn a_kernel_without_uprobes_or_btf_is_named() {
        let root = std::env::temp_dir().join(format!("memtrace-sysfs-{}", std::process::id()));
        let uprobe = root.join("bus/event_source/devices/uprobe");
        std::fs::create_dir_all(&root).unwrap();
        let err = check_kernel(&root).unwrap_err().to_string();
        assert!(err.contains("no uprobes"), "{err}");
        std::fs::create_dir_all(&uprobe).unwrap();
        let err = check_kernel(&root).unwrap_err().to_string();
        assert!(err.contains("no BTF"), "{err}");
        std::fs::create_dir_all(root.join("kernel/btf")).unwrap();
        std::fs::write(root.join("kernel/btf/vmlinux"), b"").unwrap();
        assert!(check_kernel(&root).is_ok());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_machine_passes() {
        check_kernel(Path::new("/sys")).unwrap();
    }
}
