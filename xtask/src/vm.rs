//! `cargo xtask vm-test`: memtrace on other kernels, each booted under qemu.
//!
//! Debian's kernel packages are fetched with a private apt configuration (the system's
//! sources stay as they are) and cached with their extracted `vmlinuz`. Each kernel boots,
//! one at a time, under qemu's software emulation (this machine's `/dev/kvm` only runs PVM
//! guests) with a minimal initramfs: static busybox, the host's dynamic loader and
//! libraries, the memtrace binary and two C fixtures. The guest's `/init` runs the checks
//! and writes their outputs to a second serial port, which the host reads and judges:
//!
//! - `verifier`: every BPF program of memtrace's object loads (`memtrace check`);
//! - `exact`: `memtrace top --format json -- exact` gives exactly the numbers written at
//!   the top of `tests/fixtures/exact.c`;
//! - `placement`: bare entry uprobes at the spots memtrace picks fire without the kernel
//!   mapping its `[uprobes]` single-step page (`tests/fixtures/placement.c`), while probes
//!   at the functions' first instructions do map it (so the check can fail);
//! - `uprobes_without_sys_admin`: whether the kernel opens those bare uprobes for a
//!   process with CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE but not CAP_SYS_ADMIN
//!   (memtrace's preflight asks for CAP_SYS_ADMIN because it does not);
//! - the always-on tier's BTF tracepoints and the BPF ring buffer: available or not.
//!
//! See `../shared/kernel-matrix.md` for what was found to work on these machines.
use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cargo, compile_c, ensure_debian_packages, output, run_cmd};

/// A kernel of the matrix: the newest package whose name matches `package` (a prefix and
/// a suffix around a version) in `suite`.
struct Kernel {
    label: &'static str,
    suite: &'static str,
    prefix: &'static str,
    suffix: &'static str,
    /// Its package may vanish from the archive (an old release): skipped, not failed.
    optional: bool,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        label: "5.10",
        suite: "bullseye",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
        optional: true,
    },
    Kernel {
        label: "6.1",
        suite: "bookworm",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
        optional: false,
    },
    Kernel {
        label: "6.12",
        suite: "bookworm-security",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
        optional: false,
    },
    // Debian no longer carries 6.18 (the test machines' own kernel, where the whole test
    // suite runs); the newest backported kernel stands for "newer than production".
    Kernel {
        label: "newest",
        suite: "trixie-backports",
        prefix: "linux-binary-",
        suffix: "+deb13-amd64",
        optional: false,
    },
];

const SUITES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bullseye"),
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "trixie-backports"),
];

/// One guest's whole run (boot, checks, power-off) may take this long.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Starts a marker line on the guest's data port (its second serial port).
const MARK: &str = "@@@";

/// The verdict of one check on one kernel.
#[derive(Clone, Debug)]
enum Verdict {
    Pass,
    Fail(String),
    Available,
    Unavailable(String),
}

impl Verdict {
    fn cell(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "FAIL",
            Verdict::Available => "available",
            Verdict::Unavailable(_) => "unavailable",
        }
    }
}

const CHECKS: &[&str] = &[
    "boot",
    "verifier",
    "exact",
    "placement",
    "uprobes_without_sys_admin",
    "bpf_ringbuf",
    "tracepoint_page_fault_user",
    "tracepoint_rss_stat",
    "tracepoint_sched_process_exec",
    "lifecycle_events",
    "mapped_view",
];

/// Programs memtrace runs without when the kernel refuses them: exec/fork/exit events (the
/// agent then finds processes by its periodic rescan alone), and the always-on tier's mmap
/// view (5.10 lacks its `mmap_lock_acquire_returned` tracepoint; it needs
/// `bpf_task_pt_regs`, 5.15). Their verdicts are columns of their own, not `verifier`.
const OPTIONAL_GROUPS: &[(&str, &[&str])] = &[
    (
        "lifecycle_events",
        &["lifecycle_exec", "lifecycle_exit", "lifecycle_fork"],
    ),
    ("mapped_view", &["mapped_unmapped_area", "mapped_mmap_lock"]),
];

fn is_optional(program: &str) -> bool {
    OPTIONAL_GROUPS
        .iter()
        .any(|(_, programs)| programs.contains(&program))
}

pub fn run(root: &Path, only: &[String]) -> Result<()> {
    ensure_debian_packages(&[
        "qemu-system-x86",
        "busybox-static",
        "cpio",
        "binutils",
        "gcc",
    ])?;
    let cache = cache_dir()?;
    println!("xtask: vm-test cache in {}", cache.display());
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| only.is_empty() || only.iter().any(|o| o == k.label))
        .collect();
    if kernels.is_empty() {
        bail!("no kernel of the matrix is called {}", only.join(", "));
    }

    run_cmd(cargo(root).args(["build", "-p", "memtrace"]))?;
    let work = root.join("target/vm-test");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let guest = Guest::build(root, &work)?;

    let mut apt = Apt::new(&cache);
    let mut rows: Vec<(String, BTreeMap<&'static str, Verdict>)> = Vec::new();
    for kernel in kernels {
        let vmlinuz = match apt.vmlinuz(kernel) {
            Ok(vmlinuz) => vmlinuz,
            Err(e) if kernel.optional => {
                println!("xtask: skipping optional kernel {}: {e:#}", kernel.label);
                continue;
            }
            Err(e) => return Err(e.context(format!("getting kernel {}", kernel.label))),
        };
        let name = format!("{} ({})", kernel.label, vmlinuz.version);
        println!("xtask: booting {name} under qemu (software emulation)");
        let started = Instant::now();
        let verdicts = guest.boot_and_check(&vmlinuz.path, &work.join(kernel.label));
        println!("xtask: {name}: {:.0} s", started.elapsed().as_secs_f64());
        for (check, verdict) in &verdicts {
            if let Verdict::Fail(why) | Verdict::Unavailable(why) = verdict {
                println!("  {check}: {}: {why}", verdict.cell());
            }
        }
        rows.push((name, verdicts));
    }

    print_table(&rows);
    let failed: Vec<String> = rows
        .iter()
        .flat_map(|(kernel, verdicts)| {
            verdicts
                .iter()
                .filter(|(_, v)| matches!(v, Verdict::Fail(_)))
                .map(move |(check, _)| format!("{kernel}: {check}"))
        })
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed: {}", failed.join("; "));
    }
    Ok(())
}

fn print_table(rows: &[(String, BTreeMap<&'static str, Verdict>)]) {
    println!();
    println!("| kernel | {} |", CHECKS.join(" | "));
    println!("|---|{}", "---|".repeat(CHECKS.len()));
    for (kernel, verdicts) in rows {
        let cells: Vec<&str> = CHECKS
            .iter()
            .map(|c| verdicts.get(c).map_or("-", Verdict::cell))
            .collect();
        println!("| {kernel} | {} |", cells.join(" | "));
    }
}

/// `$MEMTRACE_VM_CACHE`, else `~/.cache/memtrace/vm`: outside the work tree, so that a
/// clean clone (CI) does not download the kernels again.
fn cache_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("MEMTRACE_VM_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .context("neither XDG_CACHE_HOME nor HOME is set")?;
            home.join("memtrace/vm")
        }
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A kernel image ready to boot.
struct Vmlinuz {
    path: PathBuf,
    version: String,
}

/// apt with its own sources, lists and cache under the vm cache directory.
struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    fn new(cache: &Path) -> Self {
        Self {
            dir: cache.join("apt"),
            updated: false,
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        // Files under root's home: apt's `_apt` download user could not write them.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
        for (option, dir) in [
            ("Dir::Etc::SourceList", self.dir.join("sources.list")),
            ("Dir::Etc::SourceParts", self.dir.join("sources.list.d")),
            ("Dir::State::Lists", self.dir.join("lists")),
            ("Dir::Cache", self.dir.join("cache")),
        ] {
            cmd.arg("-o").arg(format!("{option}={}", dir.display()));
        }
        cmd
    }

    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        for dir in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(self.dir.join(dir))?;
        }
        let sources: String = SUITES
            .iter()
            .map(|(uri, suite)| {
                format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main\n"
                )
            })
            .collect();
        std::fs::write(self.dir.join("sources.list"), sources)?;
        println!(
            "xtask: apt-get update (private lists for {} suites)",
            SUITES.len()
        );
        run_cmd(
            self.command("apt-get")
                .args(["-q", "update"])
                .stdout(Stdio::null()),
        )?;
        self.updated = true;
        Ok(())
    }

    /// The kernel's vmlinuz, from the cache or downloaded once.
    fn vmlinuz(&mut self, kernel: &Kernel) -> Result<Vmlinuz> {
        let dir = self
            .dir
            .parent()
            .expect("apt dir has a parent")
            .join(kernel.label);
        let (path, package) = (dir.join("vmlinuz"), dir.join("package"));
        if let (true, Ok(version)) = (path.exists(), std::fs::read_to_string(&package)) {
            return Ok(Vmlinuz {
                path,
                version: version.trim().to_owned(),
            });
        }
        self.update()?;
        let name = self.newest_package(kernel)?;
        println!("xtask: downloading {name}");
        let debs = dir.join("deb");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&debs)?;
        run_cmd(
            self.command("apt-get")
                .args(["-q", "download", &name])
                .current_dir(&debs)
                .stdout(Stdio::null()),
        )?;
        let deb = std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {name} left no .deb"))?;
        let extracted = dir.join("extracted");
        std::fs::create_dir_all(&extracted)?;
        run_cmd(Command::new("sh").arg("-c").arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards '*vmlinuz*'",
            deb.display(),
            extracted.display()
        )))?;
        let image = find_file(&extracted, &|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .with_context(|| format!("{name} holds no vmlinuz"))?;
        std::fs::rename(&image, &path)?;
        let _ = std::fs::remove_dir_all(&extracted);
        std::fs::write(&package, &name)?;
        Ok(Vmlinuz {
            path,
            version: name,
        })
    }

    /// The newest package of `kernel`'s naming in the lists (ABI numbers move: resolved
    /// when downloading, then cached).
    fn newest_package(&self, kernel: &Kernel) -> Result<String> {
        let listed = output(
            self.command("apt-cache")
                .args(["search", "--names-only"])
                .arg(format!("^{}", kernel.prefix.replace('.', "\\."))),
        )?;
        let candidates = listed
            .lines()
            .filter_map(|line| line.split(' ').next())
            .filter(|name| {
                name.strip_prefix(kernel.prefix)
                    .and_then(|rest| rest.strip_suffix(kernel.suffix))
                    .is_some_and(|version| {
                        !version.is_empty()
                            && version.chars().all(|c| c.is_ascii_digit() || c == '.')
                    })
            });
        candidates
            .max_by_key(|name| version_key(name))
            .map(str::to_owned)
            .with_context(|| {
                format!(
                    "no package {}<version>{} in {}",
                    kernel.prefix, kernel.suffix, kernel.suite
                )
            })
    }
}

/// The numbers in a package name, in order, for comparing versions.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn find_file(dir: &Path, matches: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()) {
        let path = entry.path();
        let kind = entry.file_type().ok()?;
        if kind.is_dir() {
            if let Some(found) = find_file(&path, matches) {
                return Some(found);
            }
        } else if kind.is_file() && matches(&path) {
            return Some(path);
        }
    }
    None
}

/// The initramfs every kernel boots, and what the host needs to judge the results.
struct Guest {
    initrd: PathBuf,
    /// (function, outstanding bytes, outstanding allocations) from `exact.c`'s header.
    leaks: Vec<(String, u64, u64)>,
}

impl Guest {
    fn build(root: &Path, work: &Path) -> Result<Self> {
        let tree = work.join("initramfs");
        for dir in ["bin", "fixtures", "proc", "sys", "dev", "tmp"] {
            std::fs::create_dir_all(tree.join(dir))?;
        }
        std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
            .context("copying /bin/busybox (Debian's busybox-static)")?;

        // The memtrace binary without its debug info (a tenth of the size).
        let memtrace = root.join("target/debug/memtrace");
        run_cmd(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(&memtrace)
                .arg(tree.join("memtrace")),
        )?;
        let fixtures = root.join("tests/fixtures");
        for name in ["exact", "placement"] {
            compile_c(
                &fixtures.join(format!("{name}.c")),
                &tree.join("fixtures").join(name),
            )?;
        }

        // Where memtrace puts each probe, on the libc the guest will run (the host's):
        // placement is a function of the libc's bytes; whether the kernel emulates the
        // instruction at each spot is what each guest checks.
        let check: serde_json::Value = serde_json::from_str(&output(
            Command::new(&memtrace).args(["check", "--format", "json"]),
        )?)
        .context("reading `memtrace check --format json`")?;
        let libc = check["libc"]
            .as_str()
            .context("`memtrace check` names no libc")?
            .to_owned();
        let probes = check["probes"]
            .as_array()
            .context("`memtrace check` lists no probes")?;
        let spot = |p: &serde_json::Value, with_placement: bool| -> Option<String> {
            let function = p["function_offset"].as_u64()?;
            let offset = p["probe_offset"].as_u64()?;
            Some(format!(
                "{}@{}",
                p["symbol"].as_str()?,
                function + if with_placement { offset } else { 0 }
            ))
        };
        // The spots memtrace says are emulated must map no page; the starts of functions
        // whose probe memtrace moved off the first instruction must (it is stepped).
        let placed: Vec<String> = probes
            .iter()
            .filter(|p| p["emulated"].as_bool() == Some(true))
            .filter_map(|p| spot(p, true))
            .collect();
        let moved: Vec<String> = probes
            .iter()
            .filter(|p| p["probe_offset"].as_u64().is_some_and(|o| o > 0))
            .filter_map(|p| spot(p, false))
            .collect();
        if placed.is_empty() {
            bail!("memtrace places no probe on an emulated instruction of {libc}");
        }

        let mut libraries = vec![PathBuf::from(&libc)];
        // util-linux's, not busybox's (which has no --bounding-set).
        std::fs::copy("/usr/bin/setpriv", tree.join("fixtures/setpriv"))
            .context("copying /usr/bin/setpriv (Debian's util-linux)")?;
        for binary in [
            tree.join("fixtures/setpriv"),
            tree.join("memtrace"),
            tree.join("fixtures/exact"),
            tree.join("fixtures/placement"),
        ] {
            libraries.extend(shared_libraries(&binary)?);
        }
        for library in &libraries {
            copy_with_links(library, &tree)?;
        }

        let script = init_script(&libc, &placed, &moved);
        let init = tree.join("init");
        std::fs::write(&init, script)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;

        let initrd = work.join("initrd.cpio");
        run_cmd(Command::new("sh").arg("-c").arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            tree.display(),
            initrd.display()
        )))?;
        Ok(Self {
            initrd,
            leaks: expected_leaks(&std::fs::read_to_string(fixtures.join("exact.c"))?),
        })
    }

    /// Boots `vmlinuz` with the initramfs and judges what its checks wrote.
    fn boot_and_check(&self, vmlinuz: &Path, dir: &Path) -> BTreeMap<&'static str, Verdict> {
        let mut verdicts = BTreeMap::new();
        let sections = match boot(vmlinuz, &self.initrd, dir) {
            Ok(sections) => sections,
            Err(e) => {
                for check in CHECKS {
                    verdicts.insert(*check, Verdict::Fail(format!("{e:#}")));
                }
                return verdicts;
            }
        };
        verdicts.insert("boot", Verdict::Pass);
        let check = sections.get("check");
        let report: Option<serde_json::Value> =
            check.and_then(|s| serde_json::from_str(s.stdout.trim()).ok());
        verdicts.insert("verifier", verifier_verdict(check, report.as_ref()));
        for (column, programs) in OPTIONAL_GROUPS {
            verdicts.insert(column, optional_verdict(report.as_ref(), programs));
        }
        for feature in CHECKS
            .iter()
            .filter(|c| c.starts_with("tracepoint_") || **c == "bpf_ringbuf")
        {
            verdicts.insert(feature, feature_verdict(report.as_ref(), feature));
        }
        verdicts.insert("exact", self.exact_verdict(sections.get("exact")));
        verdicts.insert(
            "placement",
            placement_verdict(sections.get("placement"), sections.get("control")),
        );
        verdicts.insert(
            "uprobes_without_sys_admin",
            match sections.get("perfmon") {
                Some(s) if s.status == 0 => Verdict::Available,
                Some(s) if s.stderr.contains("Permission denied") => {
                    Verdict::Unavailable("perf_event_open of a uprobe: EACCES".into())
                }
                Some(s) => {
                    Verdict::Fail(format!("exit {}: {}", s.status, last_lines(&s.stderr, 3)))
                }
                None => Verdict::Fail("the guest did not run it".into()),
            },
        );
        verdicts
    }

    fn exact_verdict(&self, section: Option<&Section>) -> Verdict {
        let Some(section) = section else {
            return Verdict::Fail("the guest did not run it".into());
        };
        let report: serde_json::Value = match serde_json::from_str(section.stdout.trim()) {
            Ok(report) if section.status == 0 => report,
            _ => {
                return Verdict::Fail(format!(
                    "memtrace top exited {}: {}",
                    section.status,
                    last_lines(&section.stderr, 5)
                ));
            }
        };
        let mut wrong = Vec::new();
        for (function, bytes, count) in &self.leaks {
            let (mut got_bytes, mut got_count) = (0, 0);
            for stack in report["stacks"].as_array().into_iter().flatten() {
                if stack["frames"][0]["function"].as_str() == Some(function) {
                    got_bytes += stack["outstanding_bytes"].as_u64().unwrap_or(0);
                    got_count += stack["outstanding_allocations"].as_u64().unwrap_or(0);
                }
            }
            if (got_bytes, got_count) != (*bytes, *count) {
                wrong.push(format!(
                    "{function}: {got_bytes} bytes in {got_count} blocks, expected {bytes} in {count}"
                ));
            }
        }
        if wrong.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail(wrong.join("; "))
        }
    }
}

fn verifier_verdict(check: Option<&Section>, report: Option<&serde_json::Value>) -> Verdict {
    let Some(report) = report else {
        return Verdict::Fail(format!(
            "`memtrace check` gave no report: {}",
            check.map_or("not run".into(), |s| last_lines(&s.stderr, 5))
        ));
    };
    let programs = report["programs"].as_array().cloned().unwrap_or_default();
    let failed = refused(&programs, |name| !is_optional(name));
    if programs.is_empty() {
        Verdict::Fail("no program checked".into())
    } else if failed.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Fail(failed.join("; "))
    }
}

/// Whether a group of optional programs passes this kernel's verifier.
fn optional_verdict(report: Option<&serde_json::Value>, optional: &[&str]) -> Verdict {
    let Some(programs) = report.and_then(|r| r["programs"].as_array()) else {
        return Verdict::Fail("`memtrace check` gave no program verdicts".into());
    };
    let refused = refused(programs, |name| optional.contains(&name));
    if refused.is_empty() {
        Verdict::Available
    } else {
        Verdict::Unavailable(format!("verifier refused {}", refused.join("; ")))
    }
}

/// `name: error` of each program of `memtrace check`'s report that `pick` selects by name
/// and the verifier refused.
fn refused(programs: &[serde_json::Value], pick: impl Fn(&str) -> bool) -> Vec<String> {
    programs
        .iter()
        .filter(|p| pick(p["name"].as_str().unwrap_or("")))
        .filter(|p| p["loaded"].as_bool() != Some(true))
        .map(|p| {
            format!(
                "{}: {}",
                p["name"].as_str().unwrap_or("?"),
                last_lines(p["error"].as_str().unwrap_or(""), 3)
            )
        })
        .collect()
}

fn feature_verdict(report: Option<&serde_json::Value>, name: &str) -> Verdict {
    let feature = report.and_then(|r| {
        r["features"]
            .as_array()?
            .iter()
            .find(|f| f["name"].as_str() == Some(name))
            .cloned()
    });
    match feature {
        None => Verdict::Fail("`memtrace check` does not report it".into()),
        Some(f) if f["available"].as_bool() == Some(true) => Verdict::Available,
        Some(f) => Verdict::Unavailable(f["detail"].as_str().unwrap_or("").to_owned()),
    }
}

fn placement_verdict(placed: Option<&Section>, control: Option<&Section>) -> Verdict {
    let Some(placed) = placed else {
        return Verdict::Fail("the guest did not run it".into());
    };
    if placed.status != 0 {
        return Verdict::Fail(format!(
            "probes at memtrace's spots: {} {}",
            placed
                .stdout
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            last_lines(&placed.stderr, 3)
        ));
    }
    match control {
        // Nothing was moved off a first instruction: no control to run.
        None => Verdict::Pass,
        Some(control) if control.status == 0 => Verdict::Pass,
        Some(control) => Verdict::Fail(format!(
            "control (probes at the first instructions) did not map [uprobes]: the check \
             cannot tell: {}",
            control
                .stdout
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )),
    }
}

/// What the guest wrote for one step.
#[derive(Debug, Default)]
struct Section {
    stdout: String,
    stderr: String,
    status: i32,
}

/// The guest's `/init`: mount what memtrace needs, run each step, write its outputs to
/// the second serial port between markers, power off.
fn init_script(libc: &str, placed: &[String], moved: &[String]) -> String {
    let control = if moved.is_empty() {
        String::new()
    } else {
        format!(
            "step control /fixtures/placement --control {libc} {}\n",
            moved.join(" ")
        )
    };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
step() {{
    name=$1; shift
    "$@" >/tmp/out 2>/tmp/err
    status=$?
    {{
        echo "{MARK} stdout $name"; cat /tmp/out
        echo "{MARK} stderr $name"; cat /tmp/err
        echo "{MARK} status $name $status"
    }} >/dev/ttyS1
}}
step check /memtrace check --format json
step exact /memtrace top --format json --interval 600 -- /fixtures/exact
step placement /fixtures/placement {libc} {placed}
{control}step perfmon /fixtures/setpriv --bounding-set=-all,+bpf,+perfmon,+sys_ptrace --inh-caps=-all -- /fixtures/placement {libc} {placed}
echo "{MARK} done" >/dev/ttyS1
sync
sleep 1
poweroff -f
"#,
        placed = placed.join(" "),
    )
}

/// Boots one guest and returns its sections by step name.
fn boot(vmlinuz: &Path, initrd: &Path, dir: &Path) -> Result<BTreeMap<String, Section>> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("data.txt");
    let console = dir.join("console.txt");
    let _ = std::fs::remove_file(&data);
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
        ])
        .args([
            "-m",
            "2G",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
        ])
        .args(["-serial", "stdio", "-serial"])
        .arg(format!("file:{}", data.display()))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console)?)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the guest did not power off within {} s (console: {})",
                GUEST_TIMEOUT.as_secs(),
                console.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let text = std::fs::read_to_string(&data)
        .unwrap_or_default()
        .replace('\r', "");
    if !text.lines().any(|l| l == format!("{MARK} done")) {
        bail!(
            "the guest stopped before its checks finished (qemu {status}: {}; console: {}: {})",
            stderr.trim(),
            console.display(),
            last_lines(&std::fs::read_to_string(&console).unwrap_or_default(), 5)
        );
    }
    Ok(parse_sections(&text))
}

fn parse_sections(text: &str) -> BTreeMap<String, Section> {
    let mut sections: BTreeMap<String, Section> = BTreeMap::new();
    let mut current: Option<(String, bool)> = None; // (step, is stdout)
    for line in text.lines() {
        let marker: Vec<&str> = match line.strip_prefix(MARK) {
            Some(rest) => rest.split_whitespace().collect(),
            None => {
                if let Some((step, is_stdout)) = &current {
                    let section = sections.entry(step.clone()).or_default();
                    let buffer = if *is_stdout {
                        &mut section.stdout
                    } else {
                        &mut section.stderr
                    };
                    buffer.push_str(line);
                    buffer.push('\n');
                }
                continue;
            }
        };
        current = match marker.as_slice() {
            ["stdout", step] => Some((step.to_string(), true)),
            ["stderr", step] => Some((step.to_string(), false)),
            ["status", step, status] => {
                sections.entry(step.to_string()).or_default().status = status.parse().unwrap_or(-1);
                None
            }
            _ => None,
        };
    }
    sections
}

/// The shared libraries `binary` loads, as its dynamic loader resolves them (and the
/// loader itself).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let listed = output(Command::new("ldd").arg(binary))?;
    Ok(listed
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-... (0x...)"
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `path` into `tree` at the same place, recreating the symbolic links on the way
/// (`/lib -> usr/lib` on Debian), so that paths the binaries were linked with resolve.
fn copy_with_links(path: &Path, tree: &Path) -> Result<()> {
    let mut host = PathBuf::from("/");
    for component in path.components().skip(1) {
        host.push(component);
        let inside = tree.join(host.strip_prefix("/")?);
        let meta = std::fs::symlink_metadata(&host)
            .with_context(|| format!("reading {}", host.display()))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host)?;
            if std::fs::symlink_metadata(&inside).is_err() {
                std::os::unix::fs::symlink(&target, &inside)?;
            }
            // Follow it, so that what it points at is copied too.
            let resolved = host.parent().expect("not the root").join(&target);
            copy_with_links(&resolved, tree)?;
            host = std::fs::canonicalize(&host)?;
        } else if meta.is_dir() {
            std::fs::create_dir_all(&inside)?;
        } else if !inside.exists() {
            std::fs::copy(&host, &inside).with_context(|| format!("copying {}", host.display()))?;
        }
    }
    Ok(())
}

/// `(function, bytes, allocations)` from the header of `exact.c`, lines such as
/// ` *   leak_malloc          10 x malloc(1000)                    = 10000`.
fn expected_leaks(source: &str) -> Vec<(String, u64, u64)> {
    source
        .lines()
        .take_while(|l| !l.contains("*/"))
        .filter_map(|line| {
            let words: Vec<&str> = line
                .trim_start_matches([' ', '*'])
                .split_whitespace()
                .collect();
            let (function, count) = (words.first()?, words.get(1)?.parse().ok()?);
            if !function.starts_with("leak_") || words.get(2) != Some(&"x") {
                return None;
            }
            let bytes = line
                .split("= ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((function.to_string(), bytes, count))
        })
        .collect()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_exact_fixture_header() {
        let source = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/exact.c"),
        )
        .unwrap();
        let leaks = expected_leaks(&source);
        assert_eq!(leaks.len(), 11, "{leaks:?}");
        assert!(leaks.contains(&("leak_malloc".into(), 10000, 10)));
        assert!(leaks.contains(&("leak_realloc_grow".into(), 13000, 10)));
        assert!(leaks.contains(&("leak_mmap".into(), 49152, 4)));
    }

    #[test]
    fn sections_are_split_by_markers() {
        let text = "noise\n@@@ stdout a\n{\"x\":1}\n@@@ stderr a\nwarn\n@@@ status a 3\n@@@ done\n";
        let sections = parse_sections(text);
        assert_eq!(sections["a"].stdout, "{\"x\":1}\n");
        assert_eq!(sections["a"].stderr, "warn\n");
        assert_eq!(sections["a"].status, 3);
    }

    #[test]
    fn newest_version_wins() {
        let mut names = ["linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64"];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[1], "linux-image-6.1.0-56-amd64");
    }
}
