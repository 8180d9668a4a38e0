//! Builds the BPF object (memtrace-ebpf, for `bpfel-unknown-none`, with nightly and
//! bpf-linker) into OUT_DIR, where `src/tracer` embeds it.
//!
//! With `MEMTRACE_SKIP_EBPF=1` an empty stub is written instead, so that `cargo check`,
//! clippy and docs work on machines without the BPF toolchain (the binary then refuses to
//! trace). `cargo xtask build-ebpf` installs the toolchain (rust-src, bpf-linker).
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let object = out_dir.join("memtrace.bpf.o");
    println!("cargo:rerun-if-env-changed=MEMTRACE_SKIP_EBPF");
    if env::var_os("MEMTRACE_SKIP_EBPF").is_some_and(|v| v == "1") {
        std::fs::write(&object, []).expect("write stub BPF object");
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let root = manifest_dir.parent().expect("workspace root").to_path_buf();
    for dir in ["memtrace-ebpf/src", "memtrace-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    for file in ["memtrace-ebpf/Cargo.toml", "memtrace-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    // A separate target dir: the outer cargo holds the lock on the workspace's own.
    let target_dir = root.join("target").join("bpf");

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&root)
        .args(["run", "nightly", "cargo", "build", "--release", "--package", "memtrace-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's compiler settings must not leak into the nested nightly build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO") || key.starts_with("RUSTC") || key == "RUSTUP_TOOLCHAIN" || key == "RUSTFLAGS" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"\u{1f}-Cdebuginfo=2\u{1f}-Clink-arg=--btf");
    let status = cmd.status().unwrap_or_else(|e| panic!("running rustup (nightly cargo): {e}"));
    if !status.success() {
        panic!(
            "building the BPF object failed ({status}).\n\
             Run `cargo xtask build-ebpf` once: it installs rust-src for nightly and a \
             bpf-linker built against nightly's LLVM."
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/memtrace");
    std::fs::copy(&built, &object)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), object.display()));
}
