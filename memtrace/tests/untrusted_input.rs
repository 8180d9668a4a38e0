//! Property tests for the parsers of what traced processes and containers control:
//! `/proc/PID/maps`, `/proc/PID/cgroup`, mountinfo, cgroup patterns, ELF files, and paths
//! inside a container's root. None may panic, whatever the input; well-formed input
//! must parse to what it says.
//!
//! Seeds are the files under `tests/corpus/`; inputs proptest found failing are kept in
//! `tests/untrusted_input.proptest-regressions` and replayed first.
use std::path::{Path, PathBuf};

use memtrace::{
    cgroup::{Hierarchy, Patterns, parse_proc_cgroup},
    elf::ElfFile,
    process::{MemoryMap, resolve_in_root},
};
use proptest::prelude::*;

fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// A corpus file with some bytes overwritten, cut, or duplicated.
fn mutated(kind: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(kind);
    (
        0..seeds.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(move |(seed, edits, cut, truncate)| {
            let mut bytes = seeds[seed].clone();
            if bytes.is_empty() {
                return bytes;
            }
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            } else {
                let i = cut.index(bytes.len());
                let tail = bytes[i..].to_vec();
                bytes.extend(tail);
            }
            bytes
        })
}

fn maps_line() -> impl Strategy<Value = (u64, u64, u64, u32, u32, u64, String)> {
    (
        0u64..1 << 46,
        1u64..1 << 20,
        0u64..1 << 32,
        0u32..256,
        0u32..256,
        1u64..u64::from(u32::MAX),
        "(/[a-zA-Z0-9_.+-]{1,12}){1,4}",
    )
        .prop_map(|(start, len, offset, major, minor, inode, path)| {
            (start, start + len, offset, major, minor, inode, path)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn maps_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = MemoryMap::parse(&bytes);
    }

    #[test]
    fn maps_never_panics_on_mutated_maps(bytes in mutated("maps")) {
        if let Ok(map) = MemoryMap::parse(&bytes) {
            let _ = map.libc();
            let _ = map.to_file_offset(0x7f3a_1e02_9000);
            let _ = map.find(u64::MAX);
        }
    }

    #[test]
    fn an_executable_maps_line_reads_back((start, end, offset, major, minor, inode, path) in maps_line()) {
        let line = format!(
            "{start:x}-{end:x} r-xp {offset:08x} {major:02x}:{minor:02x} {inode} {path}\n"
        );
        let map = MemoryMap::parse(line.as_bytes()).unwrap();
        let (mapping, file_offset) = map.to_file_offset(start).expect("its start is mapped");
        prop_assert_eq!(file_offset, offset);
        prop_assert_eq!(&mapping.path, Path::new(&path));
        prop_assert_eq!(mapping.file.inode, inode);
        prop_assert_eq!(mapping.file.device, (major as i32, minor as i32));
        prop_assert!(map.find(end).is_none());
    }

    #[test]
    fn proc_cgroup_never_panics(bytes in mutated("proc_cgroup")) {
        let _ = parse_proc_cgroup(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn the_v2_line_reads_back(path in "(/[a-zA-Z0-9_.:@-]{1,20}){0,6}", v1 in "[0-9]{1,2}:[a-z,=]{1,10}:/[a-z]{0,8}") {
        let path = if path.is_empty() { "/".to_owned() } else { path };
        let text = format!("{v1}\n0::{path}\n");
        prop_assert_eq!(parse_proc_cgroup(&text), Some(path));
    }

    #[test]
    fn mountinfo_never_panics(bytes in mutated("mountinfo")) {
        let _ = Hierarchy::from_mountinfo(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn cgroup_patterns_never_panic(patterns in prop::collection::vec(".{0,24}", 0..4)) {
        let _ = Patterns::new(&patterns);
    }

    #[test]
    fn elf_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        probe_elf(bytes);
    }

    #[test]
    fn elf_never_panics_on_mutated_elf(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..64),
        header_edits in prop::collection::vec((0usize..64, any::<u8>()), 0..4),
    ) {
        let mut bytes = small_elf().to_vec();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        for (i, byte) in header_edits {
            bytes[i] = byte;
        }
        probe_elf(bytes);
    }
}

/// A small real ELF executable (a compiled C program), read once.
fn small_elf() -> &'static [u8] {
    static ELF: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ELF.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("memtrace-proptest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (source, binary) = (dir.join("a.c"), dir.join("a"));
        std::fs::write(
            &source,
            "#include <stdlib.h>\nint main(void){free(malloc(9));return 0;}\n",
        )
        .unwrap();
        let status = std::process::Command::new("cc")
            .arg("-o")
            .arg(&binary)
            .arg(&source)
            .status()
            .expect("running cc");
        assert!(status.success());
        let bytes = std::fs::read(&binary).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        bytes
    })
}

/// Everything memtrace asks of an ELF file it will attach to.
fn probe_elf(bytes: Vec<u8>) {
    if let Ok(elf) = ElfFile::parse(Path::new("/fuzzed"), bytes) {
        let _ = elf.interpreter();
        for name in ["main", "malloc", "free", "_start", ""] {
            if let Some(function) = elf.function(name) {
                let _ = elf.code(function, 4096);
                let _ = memtrace::placement::place(elf.code(function, 4096));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Paths inside a container's root

/// A fake container root with hostile links:
/// `usr/lib/libc.so.6 -> /etc/passwd` (absolute: must stay inside), `lib -> ../../..`
/// (climbs: must stop at the root), `loop -> loop`, `etc/passwd` (the fake one).
struct FakeRoot {
    dir: PathBuf,
}

impl FakeRoot {
    fn new(tag: &str) -> FakeRoot {
        let dir =
            std::env::temp_dir().join(format!("memtrace-fakeroot-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["usr/lib", "etc", "a/b"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("etc/passwd"), "inside the container\n").unwrap();
        let link =
            |target: &str, at: &str| std::os::unix::fs::symlink(target, dir.join(at)).unwrap();
        link("/etc/passwd", "usr/lib/libc.so.6");
        link("../../../../..", "lib");
        link("loop", "loop");
        link("/a/b/../../usr", "a/b/up");
        link("/", "a/root");
        FakeRoot { dir }
    }
}

impl Drop for FakeRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn an_absolute_link_in_a_container_stays_in_it() {
    let root = FakeRoot::new("abs");
    let resolved = resolve_in_root(&root.dir, Path::new("/usr/lib/libc.so.6")).unwrap();
    assert_eq!(resolved, root.dir.join("etc/passwd"));
    assert_eq!(
        std::fs::read_to_string(&resolved).unwrap(),
        "inside the container\n",
        "the host's /etc/passwd was reached through the container's link"
    );
}

#[test]
fn climbing_links_stop_at_the_container_root() {
    let root = FakeRoot::new("climb");
    let resolved = resolve_in_root(&root.dir, Path::new("/lib/etc/passwd")).unwrap();
    assert_eq!(resolved, root.dir.join("etc/passwd"));
    let resolved = resolve_in_root(&root.dir, Path::new("/../../etc/passwd")).unwrap();
    assert_eq!(resolved, root.dir.join("etc/passwd"));
}

#[test]
fn a_link_loop_is_an_error_naming_the_path() {
    let root = FakeRoot::new("loop");
    let err = resolve_in_root(&root.dir, Path::new("/loop/x")).unwrap_err();
    assert!(err.to_string().contains("symbolic links"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever path a container names, the result is under its root and no component of
    /// it (after the root) is a link the kernel would follow on its own.
    #[test]
    fn resolved_paths_stay_in_the_root(
        parts in prop::collection::vec(
            prop::sample::select(vec!["usr", "lib", "libc.so.6", "..", ".", "etc", "passwd",
                                       "a", "b", "up", "root", "loop", "x"]),
            0..10,
        )
    ) {
        let root = FakeRoot::new("prop");
        let path = format!("/{}", parts.join("/"));
        if let Ok(resolved) = resolve_in_root(&root.dir, Path::new(&path)) {
            let inside = resolved.strip_prefix(&root.dir);
            prop_assert!(inside.is_ok(), "{path} -> {} left the root", resolved.display());
            let mut walked = root.dir.clone();
            for component in inside.unwrap().components() {
                walked.push(component);
                let is_link = std::fs::symlink_metadata(&walked)
                    .is_ok_and(|m| m.file_type().is_symlink());
                prop_assert!(!is_link, "{path} -> {} still goes through a link", resolved.display());
            }
        }
    }
}
