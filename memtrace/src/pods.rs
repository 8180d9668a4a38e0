//! Node-wide discovery on Kubernetes: every container cgroup under the kubelet's
//! `kubepods` hierarchy whose pod the [`Policy`] selects is traced, labelled by its pod
//! from the [`k8s`](crate::k8s) index, or by its container id while its pod is not known.
use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
};

use anyhow::Result;

use crate::{
    cgroup::Hierarchy,
    container::{self, ContainerRef},
    hybrid,
    k8s::{self, Kubernetes, Lookup, Notify},
    metrics::ContainerLabels,
    policy::{self, PodFacts, Policy},
};

/// How deep a `kubepods` root is looked for (`/kubepods.slice`, `/kubelet.slice/
/// kubelet-kubepods.slice` on kind, or a test's own root).
const ROOT_DEPTH: usize = 3;
/// How deep containers are looked for under a root (qos / pod / container, plus margin).
const CONTAINER_DEPTH: usize = 4;

pub struct PodDiscovery {
    pub kube: Kubernetes,
    pub policy: Policy,
}

impl PodDiscovery {
    /// Watches this node's pods when running with Kubernetes; `None` otherwise.
    pub fn start(
        options: &k8s::Options,
        policy: Policy,
        registry: &prometheus::Registry,
        changed: Notify,
    ) -> Result<Option<Self>> {
        Ok(Kubernetes::start(options, registry, changed)?.map(|kube| Self { kube, policy }))
    }

    /// Adds the processes of every selected container to `wanted` (pid → cgroup path; a
    /// v1 path for a container only a cgroup v1 hierarchy has, see [`hybrid`]).
    pub fn wanted(&self, hierarchy: &Hierarchy, wanted: &mut BTreeMap<u32, String>) {
        let index = self.kube.index.read().unwrap_or_else(|e| e.into_inner());
        let in_v2 = containers(&hierarchy.mount);
        let ids: HashSet<String> = in_v2.iter().map(|(_, c)| c.id.clone()).collect();
        for (path, found) in in_v2 {
            if self.selects(&index, &found) {
                for pid in hierarchy.processes(&path).unwrap_or_default() {
                    wanted.insert(pid, path.clone());
                }
            }
        }
        // Hybrid hosts with the cgroupfs driver: containers that only v1 hierarchies have.
        for v1 in hybrid::containers(&ids) {
            if self.selects(&index, &v1.container) {
                for pid in v1.processes() {
                    wanted.entry(pid).or_insert_with(|| v1.path.clone());
                }
            }
        }
    }

    fn selects(&self, index: &k8s::PodIndex, found: &ContainerRef) -> bool {
        match index.lookup(found) {
            // A cgroup of a known pod that none of its statuses names: the pod's sandbox
            // (the static `pause` process), or a container the kubelet has not reported
            // yet (the status update wakes discovery again).
            Lookup::Known {
                container: None, ..
            } => false,
            Lookup::Known { pod, .. } => self.policy.traces(PodFacts {
                namespace: &pod.namespace,
                labels: &pod.labels,
                annotations: &pod.annotations,
            }),
            Lookup::Deleted => false,
            Lookup::Unknown => self.policy.traces_unknown(),
        }
    }

    /// Whether the pod of a container cgroup asks for the allocator probes (its
    /// `memtrace.io/escalate` annotation).
    pub fn escalation_requested(&self, cgroup_path: &str) -> bool {
        let Some(found) = container::parse(cgroup_path) else {
            return false;
        };
        let index = self.kube.index.read().unwrap_or_else(|e| e.into_inner());
        matches!(index.lookup(&found), Lookup::Known { pod, .. } if policy::asks_for_probes(&pod.annotations))
    }

    /// The labels of a container cgroup, as the API knows it now; `None` for a cgroup
    /// that is not a container's.
    pub fn labels(&self, cgroup_path: &str) -> Option<ContainerLabels> {
        let found = container::parse(cgroup_path)?;
        let index = self.kube.index.read().unwrap_or_else(|e| e.into_inner());
        Some(k8s::labels(&index.lookup(&found), &found))
    }
}

fn is_root(name: &str) -> bool {
    name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice")
}

/// The `kubepods` roots of the hierarchy mounted at `mount` (relative, with a leading /).
pub fn roots(mount: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![(mount.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if is_root(&entry.file_name().to_string_lossy()) {
                if let Ok(relative) = path.strip_prefix(mount) {
                    found.push(format!("/{}", relative.to_string_lossy()));
                }
            } else if depth + 1 < ROOT_DEPTH {
                stack.push((path, depth + 1));
            }
        }
    }
    found.sort();
    found
}

/// Every container cgroup under a `kubepods` root of the hierarchy mounted at `mount`, as
/// (path relative to the mount, with a leading /, and what the path says).
pub fn containers(mount: &Path) -> Vec<(String, ContainerRef)> {
    let mut found = Vec::new();
    let mut stack = vec![(mount.to_path_buf(), 0usize, None::<usize>)];
    while let Some((dir, depth, under_root)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let Ok(relative) = path.strip_prefix(mount) else {
                continue;
            };
            let relative = format!("/{}", relative.to_string_lossy());
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_root =
                name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice");
            match under_root {
                Some(root_depth) => {
                    if let Some(container) = container::parse(&relative) {
                        // A container's own sub-cgroups belong to it: stop here.
                        found.push((relative, container));
                    } else if depth + 1 - root_depth < CONTAINER_DEPTH {
                        stack.push((path, depth + 1, under_root));
                    }
                }
                None if is_root => stack.push((path, depth + 1, Some(depth + 1))),
                None if depth + 1 < ROOT_DEPTH => stack.push((path, depth + 1, None)),
                None => {}
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_containers_of_both_drivers_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("memtrace-pods-{}", std::process::id()));
        let id_a = "a".repeat(64);
        let id_b = "b".repeat(64);
        let uid = "0b3f6c2e-7a1d-4f0e-9b8a-1c2d3e4f5a6b";
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id_a}.scope",
            uid.replace('-', "_")
        );
        let cgroupfs = format!("test-root/kubepods/besteffort/pod{uid}/{id_b}");
        for path in [
            systemd.as_str(),
            &format!("{systemd}/sub"),
            &cgroupfs,
            "system.slice/docker.service",
            "kubepods.slice/kubepods-besteffort.slice",
        ] {
            std::fs::create_dir_all(dir.join(path)).unwrap();
        }
        let found = containers(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let ids: Vec<(&str, &str)> = found
            .iter()
            .map(|(p, c)| (p.as_str(), c.id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                (format!("/{systemd}").as_str(), id_a.as_str()),
                (format!("/{cgroupfs}").as_str(), id_b.as_str()),
            ]
        );
    }
}
