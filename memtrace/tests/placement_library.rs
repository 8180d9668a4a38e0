//! Probe placement on a real shared library (`tests/fixtures/prologues.c`, compiled here):
//! the function symbols are found the way memtrace finds libc's, and each prologue gets
//! the placement its shape calls for.
use std::{path::Path, process::Command};

use memtrace::{elf::ElfFile, placement};

fn build_library(dir: &Path) -> std::path::PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/prologues.c");
    let library = dir.join("libprologues.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .expect("running cc (Debian: gcc)");
    assert!(status.success(), "cc failed to build {}", source.display());
    library
}

#[test]
fn placement_follows_each_prologue() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let elf = ElfFile::open(&build_library(dir.path())).expect("reading the library");
    let placed = |name: &str| {
        let function = elf
            .function(name)
            .unwrap_or_else(|| panic!("{name} not found in the library's symbols"));
        placement::place(elf.code(function, 4096))
    };
    // test (3 bytes) + je (2 bytes), then the push: the skipped path only returns.
    assert_eq!(
        placed("free_like"),
        placement::Placement {
            offset: 5,
            emulated: true
        }
    );
    // The early branch leads to real work: a probe past it would miss those calls, so
    // the branch itself (emulated, and every call passes it) gets the probe.
    assert_eq!(
        placed("branch_to_work"),
        placement::Placement {
            offset: 3,
            emulated: true
        }
    );
    // A compare that only reads (7 bytes), then the branch.
    assert_eq!(
        placed("cmp_flag"),
        placement::Placement {
            offset: 7,
            emulated: true
        }
    );
    // Moving the stack pointer first: nothing cheaper is safe, offset 0 it is.
    assert_eq!(
        placed("stack_first"),
        placement::Placement {
            offset: 0,
            emulated: false
        }
    );
    assert_eq!(
        placed("push_first"),
        placement::Placement {
            offset: 0,
            emulated: true
        }
    );
}
