//! Builds the BPF object (memtrace-ebpf, for `bpfel-unknown-none`, with nightly and
//! bpf-linker) and copies it into OUT_DIR, where `src/tracer.rs` embeds it.
//!
//! With `MEMTRACE_SKIP_EBPF=1` an empty stub is written instead, so that `cargo check`,
//! clippy and docs work on machines without the BPF toolchain (the binary then refuses to
//! trace). `cargo xtask build-ebpf` installs the toolchain (rust-src, bpf-linker).
use std::{env, path::PathBuf};

#[path = "../xtask/src/ebpf_build.rs"]
mod ebpf_build;

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
    for path in [
        "memtrace-ebpf/src",
        "memtrace-ebpf/Cargo.toml",
        "memtrace-common/src",
        "xtask/src/ebpf_build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    let status = ebpf_build::command(&root)
        .status()
        .unwrap_or_else(|e| panic!("running rustup (nightly cargo): {e}"));
    if !status.success() {
        panic!(
            "building the BPF object failed ({status}).\n\
             Run `cargo xtask build-ebpf` once: it installs rust-src for nightly and a \
             bpf-linker built against nightly's LLVM."
        );
    }
    let built = ebpf_build::object_path(&root);
    std::fs::copy(&built, &object)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), object.display()));
}
