//! Property tests for the parsers of what traced processes and containers control:
//! `/proc/PID/maps`, `/proc/PID/cgroup`, mountinfo, cgroup patterns, ELF files, paths
//! inside a container's root, and pod JSON from the API server (its container ids and
//! names become labels). None may panic, whatever the input; well-formed input
//! must parse to what it says.
//!
//! Seeds are the files under `tests/corpus/`; inputs proptest found failing are kept in
//! `tests/untrusted_input.proptest-regressions` and replayed first.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::Pod;
use memtrace::{
    cgroup::{Hierarchy, Patterns, parse_proc_cgroup},
    container::{ContainerRef, Qos},
    elf::ElfFile,
    hybrid,
    k8s::{PodIndex, PodInfo, labels, pod_info},
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
    fn v1_mountinfo_never_panics(bytes in mutated("mountinfo")) {
        for mount in hybrid::v1_mounts(&String::from_utf8_lossy(&bytes)) {
            prop_assert!(!mount.name.is_empty());
        }
    }

    /// v1 paths (hybrid hosts) come from cgroup names containers may choose: whatever they
    /// are, a key is given only to a container's path, and never collides with cgroup ids.
    #[test]
    fn v1_paths_never_panic(path in "\\PC{0,200}", id in "[0-9a-f]{64}", uid in "[0-9a-f-]{36}") {
        if let Some(key) = hybrid::key(&path) {
            prop_assert!(hybrid::is_v1_key(key));
            prop_assert!(memtrace::container::parse(&path).is_some());
        }
        let path = format!("memory:/kubepods/besteffort/pod{uid}/{id}");
        let key = hybrid::key(&path);
        prop_assert!(key.is_some_and(hybrid::is_v1_key), "{}", path);
        prop_assert_eq!(key, hybrid::key(&format!("pids:/kubepods/besteffort/pod{uid}/{id}")));
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

// ---------------------------------------------------------------------------
// Pod JSON → labels

/// What the agent makes of pod JSON: kube decodes it into a `Pod` (or refuses it: counted
/// as a malformed answer), then memtrace takes what it labels series with.
fn pod_json(bytes: &[u8]) -> Option<(String, PodInfo)> {
    let pod: Pod = serde_json::from_slice(bytes).ok()?;
    pod_info(&pod)
}

/// The labels the agent gives the container with runtime id `id` of a pod just indexed.
fn labels_in_index(uid: &str, info: &PodInfo, id: &str) -> [String; 3] {
    let mut index = PodIndex::default();
    index.apply(uid.to_owned(), info.clone());
    let found = ContainerRef {
        id: id.to_owned(),
        pod_uid: None,
        qos: Qos::Burstable,
    };
    let labels = labels(&index.lookup(&found), &found);
    labels.values().map(str::to_owned)
}

fn corpus_pod(name: &str) -> (String, PodInfo) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/pod_json")
        .join(name);
    pod_json(&std::fs::read(&path).unwrap()).unwrap_or_else(|| panic!("{}", path.display()))
}

#[test]
fn pod_json_regular_init_and_ephemeral_containers() {
    let (uid, info) = corpus_pod("running_with_init_and_ephemeral.json");
    assert_eq!(uid, "0b3f6c2e-7a1d-4f0e-9b8a-1c2d3e4f5a6b");
    let expected: HashMap<String, String> = [
        ("0123456789abcdef".repeat(4), "app"),
        ("1".repeat(64), "envoy"),
        ("fedcba9876543210".repeat(4), "migrate"),
        ("2".repeat(64), "debugger-abcde"),
    ]
    .into_iter()
    .map(|(id, name)| (id, name.to_owned()))
    .collect();
    assert_eq!(info.containers, expected);
    assert_eq!(
        labels_in_index(&uid, &info, &"1".repeat(64)),
        ["shop", "web-7d4b9c6f5-x2x9z", "envoy"]
    );
}

#[test]
fn pod_json_odd_runtimes_and_missing_fields() {
    let (_, info) = corpus_pod("crio_and_docker_and_pending.json");
    assert_eq!(info.name, "batch-ü-日本");
    let ids: BTreeMap<&str, &str> = info
        .containers
        .iter()
        .map(|(id, name)| (name.as_str(), id.as_str()))
        .collect();
    // Upper-case ids are lower-cased (cgroup paths carry them so); no id, no entry.
    assert_eq!(
        ids,
        BTreeMap::from([
            ("legacy", "3".repeat(64).as_str()),
            (
                "worker",
                "abcdef0123456789abcdef0123456789abcdef0123456789abcdef01234567"
            ),
        ])
    );
    let (_, info) = corpus_pod("scheduled_without_status.json");
    assert!(info.containers.is_empty());
    // Any runtime's scheme is stripped; ids that are not 12 to 64 hex digits are not ids.
    let (_, info) = corpus_pod("odd_runtime_ids.json");
    let mut names: Vec<&str> = info.containers.values().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["gvisor", "noscheme", "short"]);
    // A pod without a UID cannot be indexed.
    assert!(pod_json(br#"{"metadata": {"name": "x"}}"#).is_none());
}

/// One container status of a generated pod: which list, its name, its `containerID`.
#[derive(Clone, Debug)]
struct Status {
    list: &'static str,
    name: String,
    container_id: Option<String>,
}

fn status() -> impl Strategy<Value = Status> {
    let id = prop_oneof![
        // Well formed, any case, with the schemes of the runtimes (and one made up).
        (
            prop::sample::select(vec![
                "containerd://",
                "cri-o://",
                "docker://",
                "runsc://",
                ""
            ]),
            "[0-9a-fA-F]{64}",
        )
            .prop_map(|(scheme, id)| format!("{scheme}{id}")),
        // Lengths around the limits, and junk.
        "(containerd://)?[0-9a-f]{0,80}",
        "\\PC{0,80}",
    ];
    (
        prop::sample::select(vec![
            "containerStatuses",
            "initContainerStatuses",
            "ephemeralContainerStatuses",
        ]),
        "\\PC{0,64}",
        prop::option::of(id),
    )
        .prop_map(|(list, name, container_id)| Status {
            list,
            name,
            container_id,
        })
}

/// A pod as the API server would serve it: odd, long and non-ASCII names included.
fn pod() -> impl Strategy<
    Value = (
        Option<String>,
        String,
        String,
        Vec<Status>,
        serde_json::Value,
    ),
> {
    (
        prop::option::of("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
        prop_oneof!["\\PC{0,64}", "x{1000,5000}"],
        "\\PC{0,64}",
        prop::collection::vec(status(), 0..8),
        prop::collection::btree_map("[a-z./-]{1,20}", "\\PC{0,20}", 0..4),
    )
        .prop_map(|(uid, namespace, name, statuses, labels)| {
            let mut lists: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
            for s in &statuses {
                let mut status = serde_json::json!({
                    "name": s.name, "image": "img", "imageID": "", "ready": true, "restartCount": 0,
                });
                if let Some(id) = &s.container_id {
                    status["containerID"] = id.clone().into();
                }
                lists.entry(s.list).or_default().push(status);
            }
            let mut metadata = serde_json::json!({
                "namespace": namespace, "name": name, "labels": labels,
            });
            if let Some(uid) = &uid {
                metadata["uid"] = uid.clone().into();
            }
            let json = serde_json::json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                "spec": {"containers": []}, "status": lists,
            });
            (uid, namespace, name, statuses, json)
        })
}

/// What a status's `containerID` means: the runtime's id without its scheme, when it is
/// 12 to 64 hex digits (lower-cased, as in cgroup paths).
fn expected_id(container_id: &str) -> Option<String> {
    let id = container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id);
    ((12..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| id.to_ascii_lowercase())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pod_json_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = pod_json(&bytes);
    }

    #[test]
    fn pod_json_never_panics_on_mutated_pods(bytes in mutated("pod_json")) {
        if let Some((uid, info)) = pod_json(&bytes) {
            for id in info.containers.keys() {
                let _ = labels_in_index(&uid, &info, id);
            }
        }
    }

    /// Well-formed pods map exactly: every status with a valid id gives (namespace, pod,
    /// container name), later lists winning for an id named twice (as the agent reads them:
    /// regular, init, ephemeral).
    #[test]
    fn well_formed_pods_map_exactly((uid, namespace, name, statuses, json) in pod()) {
        let bytes = serde_json::to_vec(&json).unwrap();
        let Some(uid) = uid else {
            prop_assert!(pod_json(&bytes).is_none());
            return Ok(());
        };
        let (got_uid, info) = pod_json(&bytes).expect("a well-formed pod");
        prop_assert_eq!(&got_uid, &uid);
        prop_assert_eq!(&info.namespace, &namespace);
        prop_assert_eq!(&info.name, &name);
        let mut expected: HashMap<String, String> = HashMap::new();
        for list in ["containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"] {
            for s in statuses.iter().filter(|s| s.list == list) {
                if let Some(id) = s.container_id.as_deref().and_then(expected_id) {
                    expected.insert(id, s.name.clone());
                }
            }
        }
        prop_assert_eq!(&info.containers, &expected);
        for (id, container) in &expected {
            prop_assert_eq!(
                labels_in_index(&uid, &info, id),
                [namespace.clone(), name.clone(), container.clone()]
            );
        }
    }
}
