//! Build and test entry points: `cargo xtask <command>`.
//!
//! Every command first makes sure the machine has what it needs (the nightly `rust-src`
//! component, a `bpf-linker` built against nightly's LLVM, Debian packages), installing
//! what is missing and saying so, so that a fresh machine needs nothing by hand.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod bench_agent;
mod bench_django;
mod bench_mapped;
mod bench_pages;
mod bench_python;
mod bench_quiet;
mod bench_self_timed;
mod bench_tiers;
mod ebpf_build;
mod soak;
mod vm;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the BPF toolchain if missing and build the BPF object.
    BuildEbpf,
    /// Build memtrace (release) and run it on the bundled leaky example.
    Demo,
    /// Build everything and run every test (unit, BPF end-to-end).
    Test,
    /// Run the benchmarks and print their tables.
    Bench {
        /// Run only this part (while working on it): overhead, python, pages, django or agent.
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
    },
    /// Run the agent under process churn for a long time; table of its RSS and fds.
    Soak {
        /// How long (`30m`, `90s`, or seconds).
        #[arg(long, default_value = "3m", value_parser = parse_minutes)]
        duration: std::time::Duration,
    },
    /// Boot other kernels under qemu and check memtrace on each (cached downloads).
    VmTest {
        /// Only these kernels of the matrix (5.10, 6.1, 6.12, newest).
        #[arg(long = "kernel")]
        kernels: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    let root = workspace_root();
    match task {
        Task::BuildEbpf => {
            ensure_bpf_toolchain()?;
            run_cmd(&mut ebpf_build::command(&root))?;
            println!(
                "xtask: BPF object at {}",
                ebpf_build::object_path(&root).display()
            );
        }
        Task::Demo => {
            ensure_bpf_toolchain()?;
            run_cmd(cargo(&root).args(["build", "--release", "-p", "memtrace"]))?;
            let demo = root.join("target/demo/leaky");
            compile_c(&root.join("tests/fixtures/demo.c"), &demo)?;
            let memtrace = root.join("target/release/memtrace");
            println!("xtask: running: memtrace top -- {}", demo.display());
            run_cmd(
                Command::new(memtrace)
                    .args(["top", "--interval", "60", "--"])
                    .arg(&demo),
            )?;
        }
        Task::Test => {
            ensure_bpf_toolchain()?;
            // python3.11-dbg: pymalloc's refill function in Debian's stripped python3.11 (growth mode).
            ensure_debian_packages(&[
                "libc6-dev",
                "gcc",
                "util-linux",
                "prometheus",
                "python3.11-dbg",
            ])?;
            run_cmd(cargo(&root).args(["build", "-p", "memtrace"]))?;
            // BPF and fixture processes share kernel state: one test at a time.
            run_cmd(
                cargo(&root)
                    .args([
                        "test",
                        "--workspace",
                        "--exclude",
                        "memtrace-ebpf",
                        "--no-fail-fast",
                        "--",
                        "--test-threads=1",
                    ])
                    .env("MEMTRACE_BIN", root.join("target/debug/memtrace")),
            )?;
        }
        Task::Bench { only } => {
            ensure_bpf_toolchain()?;
            bench::run(&root, only)?;
        }
        Task::Soak { duration } => {
            ensure_bpf_toolchain()?;
            soak::run(&root, duration)?;
        }
        Task::VmTest { kernels } => {
            ensure_bpf_toolchain()?;
            vm::run(&root, &kernels)?;
        }
    }
    Ok(())
}

/// `30m`, `90s`, or plain seconds.
fn parse_minutes(text: &str) -> Result<std::time::Duration, String> {
    let (number, scale) = match text.strip_suffix('m') {
        Some(minutes) => (minutes, 60),
        None => (text.strip_suffix('s').unwrap_or(text), 1),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration"))?;
    Ok(std::time::Duration::from_secs(value * scale))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The recipe of `shared/toolchain.md`: nightly with rust-src, and bpf-linker linked
/// against nightly's own libLLVM (a system LLVM of another version cannot read its bitcode).
fn ensure_bpf_toolchain() -> Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("xtask: installing the nightly toolchain");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        println!("xtask: installing rust-src for nightly");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
        let llvm_major = version
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next())
            .context("nightly rustc does not say its LLVM version")?
            .to_owned();
        let lib = sysroot.join("lib");
        let libllvm = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("libLLVM.so.") && n.ends_with("-nightly")
                })
            })
            .with_context(|| format!("no libLLVM.so.*-nightly in {}", lib.display()))?;
        let link = lib.join("libLLVM.so");
        if !link.exists() {
            std::os::unix::fs::symlink(&libllvm, &link)?;
        }
        println!(
            "xtask: installing bpf-linker against nightly's LLVM {llvm_major} (about a minute)"
        );
        run_cmd(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--locked", "--no-default-features"])
                .args(["--features", &format!("llvm-{llvm_major}")])
                .env("LLVM_PREFIX", &sysroot),
        )?;
    }
    Ok(())
}

/// Installs the Debian packages that are not installed yet.
pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages: {}", missing.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        run_cmd(Command::new("apt-get").arg("update"))?;
        if !install() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    Ok(())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Compiles a C fixture the way the tests do: frame pointers on, so stacks are whole.
fn compile_c(source: &Path, output: &Path) -> Result<()> {
    std::fs::create_dir_all(output.parent().expect("output has a parent"))?;
    run_cmd(
        Command::new("cc")
            .args(["-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
            .arg(output)
            .arg(source),
    )
}
