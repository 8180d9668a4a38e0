//! Hybrid hosts whose kubelet uses the cgroupfs driver. The v1 controllers hold the
//! container cgroups (`/proc/PID/cgroup` lines like
//! `5:memory:/kubepods/burstable/pod<UID>/<ID>`), while the unified (v2) hierarchy, the
//! one whose id BPF records (`bpf_get_current_cgroup_id`), has no kubelet cgroups at all:
//! every container process there sits in its runtime's cgroup, the same for all. So cgroup
//! ids cannot tell such containers apart, and memtrace tells them apart per process. (runc
//! 1.0 and later join the unified hierarchy too in hybrid mode, at the same path: their
//! containers are found in v2 and never reach this module; older runtimes, and any that do
//! not, do.)
//!
//!
//! - discovery finds the containers in a v1 hierarchy (the same kubelet layout, parsed by
//!   [`container`]) that the v2 hierarchy does not have, and names each by a *v1 path*,
//!   `<hierarchy>:<path>` as in `/proc/PID/cgroup` (`memory:/kubepods/...`);
//! - a v1 path's container gets a key of its own in place of a cgroup id ([`key`]: a hash
//!   of its container id with the top bit set, which no kernel cgroup id has), so that
//!   series, escalation and labels, all keyed by cgroup id, stay apart;
//! - what BPF recorded under the shared v2 id is re-keyed by process ([`rekey`]), and the
//!   always-on tier watches such processes one by one (`WATCHED_PROCESSES`), not their
//!   shared v2 cgroup;
//! - anonymous memory comes from the v1 memory controller's `memory.stat` (`total_rss`)
//!   when that hierarchy is mounted and holds the container, else from the processes'
//!   `RssAnon`.
//!
//! Any v1 hierarchy will do for discovery (the kubelet and runc create the container in
//! every mounted one, `name=systemd` included): the path says which container it is, not
//! the controller. The first hierarchy holding kubelet containers is used, the memory
//! controller's first.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use memtrace_common::ProcessKey;

use crate::{
    container::{self, ContainerRef},
    tracer::{PythonStats, Snapshot},
};

/// Set in every key of a v1-only container; cgroup ids (kernfs node ids) never reach it.
const V1_KEY: u64 = 1 << 63;

/// A mounted cgroup v1 hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Mount {
    /// Where it is mounted.
    pub dir: PathBuf,
    /// Its controllers and name as `/proc/PID/cgroup` shows them (`memory`, `cpu,cpuacct`,
    /// `name=systemd`).
    pub name: String,
}

/// v1 controllers, to tell them from mount options in mountinfo's super options.
const CONTROLLERS: [&str; 15] = [
    "cpuset",
    "cpu",
    "cpuacct",
    "io",
    "blkio",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// The cgroup v1 hierarchies of a mountinfo text, the memory controller's first.
pub fn v1_mounts(mountinfo: &str) -> Vec<V1Mount> {
    let mut mounts: Vec<V1Mount> = mountinfo
        .lines()
        .filter_map(|line| {
            // "35 25 0:30 / /sys/fs/cgroup/memory rw,... shared:16 - cgroup cgroup rw,memory"
            let (left, right) = line.split_once(" - ")?;
            let mut right = right.split_whitespace();
            if right.next()? != "cgroup" {
                return None;
            }
            let options = right.nth(1)?;
            let dir = PathBuf::from(left.split_whitespace().nth(4)?);
            let controllers = options.split(',').filter(|o| CONTROLLERS.contains(o));
            let names = options.split(',').filter(|o| o.starts_with("name="));
            let name: Vec<&str> = controllers.chain(names).collect();
            (!name.is_empty()).then(|| V1Mount {
                dir,
                name: name.join(","),
            })
        })
        .collect();
    mounts.sort_by_key(|m| !m.name.split(',').any(|c| c == "memory"));
    mounts
}

fn mounts_now() -> Vec<V1Mount> {
    v1_mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// A container found only in a cgroup v1 hierarchy.
#[derive(Clone, Debug)]
pub struct V1Container {
    /// `<hierarchy>:<path>`: what the agent knows it by (see the module's docs).
    pub path: String,
    pub container: ContainerRef,
    /// Its directory in the hierarchy it was found in.
    pub dir: PathBuf,
}

impl V1Container {
    /// The processes in it now.
    pub fn processes(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// The kubelet containers of the first v1 hierarchy that has any, except those whose ids
/// are in `in_v2` (found in the unified hierarchy: on hybrid hosts with the systemd
/// driver, systemd mirrors every container there, and the cgroup id tells them apart).
pub fn containers(in_v2: &HashSet<String>) -> Vec<V1Container> {
    containers_of(&mounts_now(), in_v2)
}

fn containers_of(mounts: &[V1Mount], in_v2: &HashSet<String>) -> Vec<V1Container> {
    for mount in mounts {
        let found = crate::pods::containers(&mount.dir);
        if found.is_empty() {
            continue;
        }
        return found
            .into_iter()
            .filter(|(_, c)| !in_v2.contains(&c.id))
            .map(|(relative, container)| V1Container {
                path: format!("{}:{relative}", mount.name),
                dir: mount.dir.join(relative.trim_start_matches('/')),
                container,
            })
            .collect();
    }
    Vec::new()
}

/// The hierarchy and path of a v1 path (`memory:/kubepods/...`); `None` for a v2 path
/// (those start with `/`).
pub fn split(path: &str) -> Option<(&str, &str)> {
    let (hierarchy, relative) = path.split_once(':')?;
    (!hierarchy.is_empty() && !hierarchy.contains('/') && relative.starts_with('/'))
        .then_some((hierarchy, relative))
}

/// The key that stands for a v1 path's container where a cgroup id would: stable (a hash
/// of its container id) and apart from every cgroup id. `None` for other paths.
pub fn key(path: &str) -> Option<u64> {
    let (_, relative) = split(path)?;
    let id = container::parse(relative)?.id;
    // FNV-1a.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    Some(V1_KEY | hash)
}

/// Whether `id` is a [`key`], not a cgroup id.
pub fn is_v1_key(id: u64) -> bool {
    id & V1_KEY != 0
}

/// The memory controller's directory of a v1 path's container, when that hierarchy is
/// mounted and holds it (its `memory.stat` has the container's anonymous memory).
pub fn memory_dir(path: &str) -> Option<PathBuf> {
    let (_, relative) = split(path)?;
    memory_dir_in(&mounts_now(), relative)
}

fn memory_dir_in(mounts: &[V1Mount], relative: &str) -> Option<PathBuf> {
    let memory = mounts
        .iter()
        .find(|m| m.name.split(',').any(|c| c == "memory"))?;
    let dir = memory.dir.join(relative.trim_start_matches('/'));
    dir.join("memory.stat").exists().then_some(dir)
}

/// The processes of `keys` (pid → the key of its v1-only container) whose numbers BPF
/// keyed by their shared v2 cgroup: keyed by their container instead.
pub fn rekey(snapshot: &mut Snapshot, keys: &HashMap<u32, u64>) {
    if keys.is_empty() {
        return;
    }
    for stack in &mut snapshot.stacks {
        if let Some(key) = keys.get(&stack.key.tgid) {
            stack.key.cgroup_id = *key;
        }
    }
    for (process, _) in &mut snapshot.totals {
        rekey_process(process, keys);
    }
}

/// [`rekey`] for the CPython counters.
pub fn rekey_python(stats: &mut PythonStats, keys: &HashMap<u32, u64>) {
    for (gc, _) in &mut stats.gc {
        if let Some(key) = keys.get(&gc.tgid) {
            gc.cgroup_id = *key;
        }
    }
    for (process, _) in &mut stats.live_objects {
        rekey_process(process, keys);
    }
}

fn rekey_process(process: &mut ProcessKey, keys: &HashMap<u32, u64>) {
    if let Some(key) = keys.get(&process.tgid) {
        process.cgroup_id = *key;
    }
}

/// The processes of v1-only containers among `processes` (pid → key).
pub fn v1_keys<'a>(processes: impl Iterator<Item = (&'a u32, u64)>) -> HashMap<u32, u64> {
    processes
        .filter(|(_, key)| is_v1_key(*key))
        .map(|(pid, key)| (*pid, key))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "0b3f6c2e-7a1d-4f0e-9b8a-1c2d3e4f5a6b";

    #[test]
    fn reads_the_v1_hierarchies_memory_first() {
        let mountinfo = "\
31 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n\
32 31 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
33 31 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
34 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
35 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
36 25 0:31 / /tmp/x rw - cgroup cgroup rw,relatime,name=memtrace-e2e-7\n";
        let mounts = v1_mounts(mountinfo);
        let names: Vec<&str> = mounts.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "memory",
                "name=systemd",
                "cpu,cpuacct",
                "name=memtrace-e2e-7"
            ]
        );
        assert_eq!(mounts[0].dir, Path::new("/sys/fs/cgroup/memory"));
        assert!(v1_mounts("1 2 3:4 / / rw - ext4 /dev/vda rw\n").is_empty());
    }

    #[test]
    fn v1_paths_have_keys_of_their_own() {
        let path = format!("memory:/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(split(&path), Some(("memory", &path["memory:".len()..])));
        let key = key(&path).unwrap();
        assert!(is_v1_key(key));
        // The container decides, not the hierarchy it was found in.
        assert_eq!(
            super::key(&format!("name=systemd:/kubepods/burstable/pod{UID}/{ID}")),
            Some(key)
        );
        let other = format!("memory:/kubepods/burstable/pod{UID}/{}", "1".repeat(64));
        assert_ne!(super::key(&other), Some(key));
        // v2 paths, and v1 paths that are not containers, have none.
        for path in [
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            "memory:/system.slice".into(),
            "".into(),
            "memory:relative".into(),
        ] {
            assert_eq!(super::key(&path), None, "{path}");
        }
        assert!(!is_v1_key(12345));
    }

    #[test]
    fn finds_v1_only_containers() {
        let dir = std::env::temp_dir().join(format!("memtrace-hybrid-{}", std::process::id()));
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        for id in [&a, &b] {
            std::fs::create_dir_all(dir.join(format!("v1/kubepods/besteffort/pod{UID}/{id}")))
                .unwrap();
        }
        std::fs::create_dir_all(dir.join("empty/system.slice")).unwrap();
        let mounts = [
            V1Mount {
                dir: dir.join("empty"),
                name: "memory".into(),
            },
            V1Mount {
                dir: dir.join("v1"),
                name: "name=test".into(),
            },
        ];
        // b is in the unified hierarchy too: left to it.
        let found = containers_of(&mounts, &HashSet::from([b.clone()]));
        let memory = memory_dir_in(&mounts, "/kubepods");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].container.id, a);
        assert_eq!(
            found[0].path,
            format!("name=test:/kubepods/besteffort/pod{UID}/{a}")
        );
        assert!(found[0].dir.ends_with(format!("pod{UID}/{a}")));
        assert_eq!(memory, None, "no memory.stat there");
    }

    #[test]
    fn the_memory_controller_holds_the_anonymous_memory() {
        let dir = std::env::temp_dir().join(format!("memtrace-hybrid-mem-{}", std::process::id()));
        let relative = format!("/kubepods/burstable/pod{UID}/{ID}");
        let container = dir.join(relative.trim_start_matches('/'));
        std::fs::create_dir_all(&container).unwrap();
        std::fs::write(container.join("memory.stat"), "total_rss 4096\n").unwrap();
        let mounts = [V1Mount {
            dir: dir.clone(),
            name: "memory".into(),
        }];
        let found = memory_dir_in(&mounts, &relative);
        let elsewhere = memory_dir_in(&mounts, "/kubepods/besteffort");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found, Some(container));
        assert_eq!(elsewhere, None);
    }

    #[test]
    fn rekeys_processes_of_v1_containers_only() {
        use crate::tracer::StackUsage;
        use memtrace_common::{ProcessTotals, Usage, UsageKey};
        let stack = |tgid| StackUsage {
            key: UsageKey {
                cgroup_id: 7,
                tgid,
                _pad: 0,
                stack_id: 1,
            },
            usage: Usage::default(),
            frames: Vec::new(),
            python: Vec::new(),
        };
        let mut snapshot = Snapshot {
            stacks: vec![stack(1), stack(2)],
            totals: vec![(
                ProcessKey {
                    cgroup_id: 7,
                    tgid: 2,
                    _pad: 0,
                },
                ProcessTotals::default(),
            )],
            ..Snapshot::default()
        };
        let key = V1_KEY | 5;
        rekey(&mut snapshot, &HashMap::from([(2, key)]));
        assert_eq!(snapshot.stacks[0].key.cgroup_id, 7);
        assert_eq!(snapshot.stacks[1].key.cgroup_id, key);
        assert_eq!(snapshot.totals[0].0.cgroup_id, key);
    }
}
