//! Container identity from a cgroup path, as the kubelet and the container runtimes name
//! their cgroups:
//!
//! | driver | path |
//! |---|---|
//! | systemd | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID_>.slice/cri-containerd-<ID>.scope` (also `crio-<ID>.scope`, `docker-<ID>.scope`) |
//! | cgroupfs | `kubepods/burstable/pod<UID>/<ID>` (guaranteed pods sit right under `kubepods`) |
//!
//! With the systemd driver the pod UID's dashes become underscores. The same paths show up
//! under the cgroup v2 mount and, on hybrid hosts, in the v1 controllers' hierarchies; only
//! the part from `kubepods` on matters, so a prefix (a nested kubelet, a test's own root)
//! is ignored. Parsing never fails loudly: a path that is not a container's gives `None`.

/// What a container's cgroup path says about it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    /// The runtime's container id (64 hex digits for containerd, CRI-O and docker).
    pub id: String,
    /// The pod's UID, with dashes, when the path names the pod.
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`.
    pub qos: Qos,
}

/// A pod's quality-of-service class, from the level of the hierarchy it sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn name(self) -> &'static str {
        match self {
            Qos::Guaranteed => "guaranteed",
            Qos::Burstable => "burstable",
            Qos::BestEffort => "besteffort",
        }
    }
}

/// Scope prefixes of the container runtimes (systemd driver).
const SCOPE_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-", "docker-", "containerd-"];

/// The container a cgroup path belongs to, if it is a container's (or one of its
/// sub-cgroups: a container that creates cgroups of its own stays that container).
pub fn parse(path: &str) -> Option<ContainerRef> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let root = parts.iter().position(|p| is_kubepods_root(p))?;
    let mut rest = parts[root + 1..].iter().copied();
    let mut next = rest.next()?;
    let qos = match qos_level(next) {
        Some(qos) => {
            next = rest.next()?;
            qos
        }
        None => Qos::Guaranteed,
    };
    let pod_uid = pod_uid(next)?;
    let id = container_id(rest.next()?)?;
    Some(ContainerRef {
        id,
        pod_uid: Some(pod_uid),
        qos,
    })
}

/// The pod UID of a cgroup path at or under a pod's cgroup (`None` for any other path).
pub fn pod_uid_of(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let root = parts.iter().position(|p| is_kubepods_root(p))?;
    let mut rest = parts[root + 1..].iter().copied();
    let mut next = rest.next()?;
    if qos_level(next).is_some() {
        next = rest.next()?;
    }
    pod_uid(next)
}

/// `kubepods`, `kubepods.slice`, or a nested kubelet's `kubelet-kubepods.slice` (kind).
fn is_kubepods_root(part: &str) -> bool {
    part == "kubepods" || part == "kubepods.slice" || part.ends_with("-kubepods.slice")
}

/// `kubepods-burstable.slice` (or `kubelet-kubepods-burstable.slice`), `burstable`, ...
fn qos_level(part: &str) -> Option<Qos> {
    let name = match part.strip_suffix(".slice") {
        Some(unit) => unit.split_once("kubepods-")?.1,
        None => part,
    };
    match name {
        "burstable" => Some(Qos::Burstable),
        "besteffort" => Some(Qos::BestEffort),
        "guaranteed" => Some(Qos::Guaranteed),
        _ => None,
    }
}

/// `kubepods-burstable-pod<UID_>.slice`, `kubepods-pod<UID_>.slice`, `pod<UID>`.
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(unit) => unit.rsplit_once("-pod")?.1.replace('_', "-"),
        None => part.strip_prefix("pod")?.to_owned(),
    };
    is_uid(&uid).then_some(uid)
}

/// A Kubernetes UID: hex digits and dashes (a UUID in practice).
fn is_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && uid.bytes().any(|b| b.is_ascii_hexdigit())
}

/// `cri-containerd-<ID>.scope`, `crio-<ID>.scope`, `docker-<ID>.scope`, or a bare `<ID>`.
fn container_id(part: &str) -> Option<String> {
    let id = match part.strip_suffix(".scope") {
        Some(unit) => SCOPE_PREFIXES
            .iter()
            .find_map(|prefix| unit.strip_prefix(prefix))?,
        None => part,
    };
    is_container_id(id).then(|| id.to_ascii_lowercase())
}

/// Runtimes use 64 hex digits; shorter ids (12+) are accepted for other runtimes.
fn is_container_id(id: &str) -> bool {
    (12..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id of a pod status's `containerID` (`containerd://<ID>`,
/// `cri-o://<ID>`, `docker://<ID>`), without the runtime's scheme.
pub fn strip_runtime_scheme(container_id: &str) -> Option<String> {
    let id = container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id);
    is_container_id(id).then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "0b3f6c2e-7a1d-4f0e-9b8a-1c2d3e4f5a6b";

    fn underscored() -> String {
        UID.replace('-', "_")
    }

    #[test]
    fn systemd_driver_runtimes() {
        for (scope, qos, level) in [
            ("cri-containerd", Qos::Burstable, "burstable"),
            ("crio", Qos::BestEffort, "besteffort"),
            ("docker", Qos::Burstable, "burstable"),
        ] {
            let path = format!(
                "/kubepods.slice/kubepods-{level}.slice/kubepods-{level}-pod{}.slice/{scope}-{ID}.scope",
                underscored()
            );
            let found = parse(&path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(found.id, ID);
            assert_eq!(found.pod_uid.as_deref(), Some(UID));
            assert_eq!(found.qos, qos);
        }
    }

    #[test]
    fn systemd_driver_guaranteed_pods_sit_under_kubepods() {
        let path = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            underscored()
        );
        let found = parse(&path).unwrap();
        assert_eq!((found.id.as_str(), found.qos), (ID, Qos::Guaranteed));
    }

    #[test]
    fn cgroupfs_driver() {
        for (level, qos) in [
            ("/burstable", Qos::Burstable),
            ("/besteffort", Qos::BestEffort),
            ("", Qos::Guaranteed),
        ] {
            let path = format!("/kubepods{level}/pod{UID}/{ID}");
            let found = parse(&path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(found.id, ID);
            assert_eq!(found.pod_uid.as_deref(), Some(UID));
            assert_eq!(found.qos, qos);
        }
    }

    #[test]
    fn prefixes_and_sub_cgroups_are_fine() {
        // kind/nested kubelets put kubepods under another slice; a test under its own root.
        let nested = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/crio-{ID}.scope/init",
            underscored()
        );
        assert_eq!(parse(&nested).unwrap().id, ID);
        let test_root = format!("/memtrace-e2e-1/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(parse(&test_root).unwrap().id, ID);
    }

    #[test]
    fn other_paths_are_not_containers() {
        for path in [
            "",
            "/",
            "/system.slice/docker.service",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                underscored()
            ),
            &format!("/kubepods/burstable/pod{UID}/not-hex"),
            &format!("/kubepods/burstable/podXYZ/{ID}"),
            &format!("/kubepods.slice/kubepods-burstable.slice/x-pod{UID}.slice/foo-{ID}.scope"),
            "/user.slice/user-0.slice/session-1.scope",
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
    }

    #[test]
    fn hybrid_hosts_with_the_systemd_driver() {
        // systemd mirrors its slices and scopes in the unified hierarchy: the v2 line of a
        // container process on a hybrid host names its container like on a v2 host.
        let proc_cgroup = format!(
            "12:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n\
             1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n\
             0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n",
            u = underscored()
        );
        let v2 = crate::cgroup::parse_proc_cgroup(&proc_cgroup).unwrap();
        assert_eq!(parse(&v2).unwrap().id, ID);
    }

    #[test]
    fn pod_uid_of_a_pod_cgroup() {
        assert_eq!(
            pod_uid_of(&format!("/kubepods/besteffort/pod{UID}")).as_deref(),
            Some(UID)
        );
        assert_eq!(pod_uid_of("/kubepods/besteffort"), None);
    }

    #[test]
    fn status_container_ids() {
        for scheme in ["containerd://", "cri-o://", "docker://", ""] {
            assert_eq!(
                strip_runtime_scheme(&format!("{scheme}{ID}")).as_deref(),
                Some(ID)
            );
        }
        assert_eq!(strip_runtime_scheme(""), None);
        assert_eq!(strip_runtime_scheme("containerd://"), None);
    }

    proptest! {
        #[test]
        fn never_panics(path in ".{0,300}") {
            let _ = parse(&path);
            let _ = pod_uid_of(&path);
            let _ = strip_runtime_scheme(&path);
        }

        #[test]
        fn never_panics_on_path_like_input(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("kubepods.slice".to_string()),
                    Just("kubepods".to_string()),
                    Just("burstable".to_string()),
                    "kubepods-[a-z]{0,12}(-pod[0-9a-f_]{0,40})?\\.slice",
                    "(cri-containerd-|crio-|docker-)?[0-9a-f]{0,70}(\\.scope)?",
                    "pod[0-9a-f-]{0,40}",
                    ".{0,20}",
                ],
                0..8,
            )
        ) {
            let path = parts.join("/");
            if let Some(found) = parse(&path) {
                prop_assert!(is_container_id(&found.id));
                prop_assert!(found.pod_uid.is_some());
            }
        }

        #[test]
        fn finds_every_well_formed_id(id in "[0-9a-f]{64}", uid in "[0-9a-f]{8}-[0-9a-f]{4}") {
            let systemd = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
                uid.replace('-', "_")
            );
            let found = parse(&systemd).unwrap();
            prop_assert_eq!(&found.id, &id);
            prop_assert_eq!(found.pod_uid.as_deref(), Some(uid.as_str()));
            let cgroupfs = format!("/kubepods/besteffort/pod{uid}/{id}");
            prop_assert_eq!(parse(&cgroupfs).unwrap().id, id);
        }
    }
}
