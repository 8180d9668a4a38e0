//! What the running kernel offers memtrace, found out once at start-up, exported as
//! `memtrace_feature_available{feature}` and shown by `memtrace check`.
//!
//! Required features (uprobes, BTF) are enforced by `preflight`; the others only narrow what
//! memtrace can do, and each missing one is said once, in one line, instead of failing.
use std::path::Path;

use aya::{Btf, maps::MapType, sys::is_map_supported};
use aya_obj::btf::BtfKind;

/// The BTF tracepoints the always-on tier listens to (no trap per allocation).
pub const BTF_TRACEPOINTS: [&str; 3] = ["page_fault_user", "rss_stat", "sched_process_exec"];

/// One kernel feature and whether this machine has it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Feature {
    /// Stable name: the `feature` label of `memtrace_feature_available`.
    pub name: String,
    pub available: bool,
    /// Why it is (not) available, and what memtrace loses without it.
    pub detail: String,
    /// memtrace refuses to run without it.
    pub required: bool,
}

impl Feature {
    fn new(name: impl Into<String>, required: bool, found: Result<String, String>) -> Self {
        let (available, detail) = match found {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        Self {
            name: name.into(),
            available,
            detail,
            required,
        }
    }
}

/// Every feature memtrace cares about, looked up under `sysfs` (`/sys` on a real system)
/// and by asking the kernel (feature probes load tiny programs and maps: needs CAP_BPF).
pub fn detect(sysfs: &Path) -> Vec<Feature> {
    let uprobe_pmu = sysfs.join("bus/event_source/devices/uprobe");
    let btf_path = sysfs.join("kernel/btf/vmlinux");
    let mut features = vec![
        Feature::new(
            "uprobes",
            true,
            if uprobe_pmu.exists() {
                Ok(format!("{} exists", uprobe_pmu.display()))
            } else {
                Err(format!(
                    "{} is missing (CONFIG_UPROBE_EVENTS): no allocator probes",
                    uprobe_pmu.display()
                ))
            },
        ),
        Feature::new(
            "btf",
            true,
            if btf_path.exists() {
                Ok(format!("{} exists", btf_path.display()))
            } else {
                Err(format!(
                    "{} is missing (CONFIG_DEBUG_INFO_BTF)",
                    btf_path.display()
                ))
            },
        ),
        Feature::new(
            "bpf_ringbuf",
            false,
            match is_map_supported(MapType::RingBuf) {
                Ok(true) => Ok("BPF_MAP_TYPE_RINGBUF loads".into()),
                Ok(false) => Err("BPF_MAP_TYPE_RINGBUF is not supported (Linux < 5.8)".into()),
                Err(e) => Err(format!("probing BPF_MAP_TYPE_RINGBUF failed: {e}")),
            },
        ),
    ];
    let btf = if btf_path.exists() {
        Btf::parse_file(&btf_path, aya::Endianness::default()).map_err(|e| e.to_string())
    } else {
        Err("no kernel BTF".to_owned())
    };
    for tracepoint in BTF_TRACEPOINTS {
        features.push(Feature::new(
            format!("tracepoint_{tracepoint}"),
            false,
            btf_tracepoint(btf.as_ref(), tracepoint),
        ));
    }
    features
}

/// A BTF tracepoint is usable when the kernel's BTF has its `btf_trace_<name>` typedef
/// (what a `tp_btf` program attaches by) and the kernel loads a program for it. aya's own
/// probe for tracing programs asks for fentry, which kernels without fentry trampolines
/// refuse even though they take `tp_btf` programs: so load one.
fn btf_tracepoint(btf: Result<&Btf, &String>, name: &str) -> Result<String, String> {
    let btf = btf.map_err(|e| format!("{name}: {e}"))?;
    let typedef = format!("btf_trace_{name}");
    let id = btf
        .id_by_type_name_kind(&typedef, BtfKind::Typedef)
        .map_err(|_| format!("this kernel has no {typedef} in its BTF"))?;
    load_tp_btf(id).map_err(|e| format!("a tp_btf program on {name} does not load: {e}"))?;
    Ok(format!(
        "a tp_btf program loads on {typedef} (BTF type {id})"
    ))
}

/// The head of the kernel's `bpf_attr` for `BPF_PROG_LOAD`, up to `attach_btf_id` (Linux
/// 5.5); the kernel reads only the `size` bytes it is given.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

/// Loads `r0 = 0; exit` as a `tp_btf` program on the tracepoint whose typedef is
/// `attach_btf_id`, and closes it.
fn load_tp_btf(attach_btf_id: u32) -> std::io::Result<()> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_TRACING: u32 = 26;
    const BPF_TRACE_RAW_TP: u32 = 23;
    // mov64 r0, 0 (opcode 0xb7); exit (0x95): both with zero registers and immediates.
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_TRACE_RAW_TP,
        attach_btf_id,
        ..Default::default()
    };
    // SAFETY: `attr` and what it points to outlive the call; the size is the struct's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a file descriptor we own.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// Says once, in one line each, what a missing optional feature costs.
pub fn log_missing(features: &[Feature]) {
    for feature in features.iter().filter(|f| !f.available && !f.required) {
        log::warn!(
            "kernel feature {} unavailable: {}",
            feature.name,
            feature.detail
        );
    }
}

/// Sets `memtrace_feature_available{feature}` for each feature.
pub fn export(features: &[Feature], gauge: &prometheus::IntGaugeVec) {
    for feature in features {
        gauge
            .with_label_values(&[feature.name.as_str()])
            .set(i64::from(feature.available));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_has_what_memtrace_needs() {
        let features = detect(Path::new("/sys"));
        let names: Vec<&str> = features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "uprobes",
                "btf",
                "bpf_ringbuf",
                "tracepoint_page_fault_user",
                "tracepoint_rss_stat",
                "tracepoint_sched_process_exec"
            ]
        );
        // The test machines run 6.18: everything is there.
        for feature in &features {
            assert!(feature.available, "{feature:?}");
        }
    }

    #[test]
    fn a_sysfs_without_uprobes_or_btf_says_so() {
        let root = std::env::temp_dir().join(format!("memtrace-features-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let features = detect(&root);
        std::fs::remove_dir_all(&root).unwrap();
        let by_name = |name: &str| features.iter().find(|f| f.name == name).unwrap();
        assert!(!by_name("uprobes").available);
        assert!(by_name("uprobes").detail.contains("CONFIG_UPROBE_EVENTS"));
        assert!(!by_name("btf").available);
        let rss = by_name("tracepoint_rss_stat");
        assert!(
            !rss.available && rss.detail.contains("no kernel BTF"),
            "{rss:?}"
        );
    }

    #[test]
    fn an_unknown_tracepoint_is_unavailable() {
        let btf = Btf::from_sys_fs().unwrap();
        let found = btf_tracepoint(Ok(&btf), "no_such_tracepoint_here");
        assert!(
            found
                .unwrap_err()
                .contains("btf_trace_no_such_tracepoint_here")
        );
    }
}
