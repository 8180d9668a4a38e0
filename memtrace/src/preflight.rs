//! Checks made before loading anything, so that a missing privilege or kernel feature is
//! reported in one line naming it, instead of as a raw errno from deep inside a load.
use std::path::Path;

use anyhow::{Result, bail};

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;

/// Capabilities memtrace cannot trace without, by name.
///
/// CAP_SYS_ADMIN: it covers CAP_BPF and CAP_PERFMON, and opening a uprobe perf event
/// needs it itself: with CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE but not CAP_SYS_ADMIN,
/// `perf_event_open` of a uprobe fails with EACCES (measured on 6.18, and by
/// `cargo xtask vm-test` on 5.10 to 7.x). With `for_agent`, also CAP_SYS_PTRACE: the
/// agent reads the maps and files of processes of any user (`/proc/PID/root`).
pub fn missing_capabilities(effective: u64, for_agent: bool) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN");
    }
    if for_agent && !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    missing
}

/// The effective capability set from a `/proc/PID/status` text.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Everything `memtrace top` needs from the kernel and its own privileges.
pub fn check(sysfs: &Path) -> Result<()> {
    check_privileges(false)?;
    check_kernel(sysfs)
}

/// Everything `memtrace agent` needs: what `top` needs, and CAP_SYS_PTRACE.
pub fn check_agent(sysfs: &Path) -> Result<()> {
    check_privileges(true)?;
    check_kernel(sysfs)
}

fn check_privileges(for_agent: bool) -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = effective_capabilities(&status).unwrap_or(0);
    let missing = missing_capabilities(effective, for_agent);
    if !missing.is_empty() {
        bail!(
            "memtrace needs root, or CAP_SYS_ADMIN (BPF programs and uprobe perf events: \
             CAP_BPF and CAP_PERFMON are not enough for uprobes){}; this process lacks {}",
            if for_agent {
                " and CAP_SYS_PTRACE (the maps and files of other users' processes)"
            } else {
                ""
            },
            missing.join(", ")
        );
    }
    Ok(())
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
        assert_eq!(missing_capabilities(0, false), vec!["CAP_SYS_ADMIN"]);
        assert_eq!(
            missing_capabilities(0, true),
            vec!["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]
        );
        // CAP_BPF and CAP_PERFMON do not replace CAP_SYS_ADMIN for uprobes.
        assert_eq!(
            missing_capabilities((1 << 39) | (1 << 38) | (1 << CAP_SYS_PTRACE), true),
            vec!["CAP_SYS_ADMIN"]
        );
        assert_eq!(
            missing_capabilities(1 << CAP_SYS_ADMIN, true),
            vec!["CAP_SYS_PTRACE"]
        );
        assert!(missing_capabilities(1 << CAP_SYS_ADMIN, false).is_empty());
        assert!(
            missing_capabilities((1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE), true).is_empty()
        );
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
