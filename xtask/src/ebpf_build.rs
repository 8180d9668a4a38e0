//! How the BPF object is built. Shared, via `#[path]`, by `memtrace/build.rs` (which
//! embeds the object) and `cargo xtask build-ebpf` (the explicit entry point), so the two
//! can never disagree.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Where the nested nightly build puts its output, under the workspace root. A separate
/// target dir: the outer cargo holds the lock on the workspace's own.
pub fn target_dir(root: &Path) -> PathBuf {
    root.join("target").join("bpf")
}

/// The built object.
pub fn object_path(root: &Path) -> PathBuf {
    target_dir(root).join("bpfel-unknown-none/release/memtrace")
}

/// `cargo +nightly build` of memtrace-ebpf for `bpfel-unknown-none`, with the outer
/// build's compiler settings removed from the environment.
pub fn command(root: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--package",
            "memtrace-ebpf",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir(root));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO")
            || key.starts_with("RUSTC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    // --btf keeps BTF for the maps; x86_64 selects pt_regs' layout in aya-ebpf.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\u{1f}"),
    );
    cmd
}
