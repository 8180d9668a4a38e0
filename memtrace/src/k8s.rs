//! The pods of this node, from the Kubernetes API: a kube-rs watcher on pods with
//! `spec.nodeName=<node>` keeps an index from container id (the runtime's, as in the
//! container's cgroup path) to (namespace, pod, container) and the pod's labels and
//! annotations. When the API is unreachable, answers errors or garbage, or hangs, the index
//! keeps what it last knew, the failure is said in one line per episode and counted
//! (`memtrace_kubernetes_errors_total{reason}`), and the watcher retries with kube's
//! exponential backoff (0.8 s doubling to 30 s). A hang is bounded by `--kube-timeout`:
//! no byte from the server for that long fails the request.
//!
//! Kubernetes is used only when asked for: `--kubeconfig FILE`, or in-cluster config (the
//! `KUBERNETES_SERVICE_HOST` the kubelet sets in every pod). Otherwise memtrace runs on
//! cgroup paths alone.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::{container, metrics::ContainerLabels};

/// How long a deleted pod's UID is remembered, so that its containers' processes, if they
/// linger, are not traced again under their container ids.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// Called when the node's pods changed.
pub type Notify = Box<dyn Fn() + Send + Sync>;

/// Where to find the API server and which node this is.
#[derive(Clone, Debug)]
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
    /// How long the server may send nothing before a request counts as hung.
    pub timeout: Duration,
}

/// What the API says of one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Container id (without the runtime's scheme) → container name, for regular, init and
    /// ephemeral containers that have started.
    pub containers: HashMap<String, String>,
}

/// What the agent learns of a container.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// Its pod is known; the container's name too, when its status names its id.
    Known {
        pod: &'a PodInfo,
        container: Option<&'a str>,
    },
    /// Its pod was deleted.
    Deleted,
    /// Not known (yet): the API has not reported it, or is unreachable.
    Unknown,
}

/// Pods by UID, kept by the watcher and read by the agent.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<String, PodInfo>,
    /// Container id → pod UID.
    containers: HashMap<String, String>,
    deleted: HashMap<String, Instant>,
    /// Pods seen since the last (re)list began, replacing `pods` when it is complete.
    relisting: Option<HashMap<String, PodInfo>>,
}

impl PodIndex {
    /// The pod (and container name) of a container found in the cgroup hierarchy.
    pub fn lookup(&self, found: &container::ContainerRef) -> Lookup<'_> {
        let uid = self.containers.get(&found.id).or(found.pod_uid.as_ref());
        let Some(uid) = uid else {
            return Lookup::Unknown;
        };
        if let Some(pod) = self.pods.get(uid) {
            return Lookup::Known {
                pod,
                container: pod.containers.get(&found.id).map(String::as_str),
            };
        }
        if self.deleted.contains_key(uid) {
            Lookup::Deleted
        } else {
            Lookup::Unknown
        }
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// An added or modified pod.
    pub fn apply(&mut self, uid: String, info: PodInfo) {
        self.deleted.remove(&uid);
        self.unlink(&uid);
        for id in info.containers.keys() {
            self.containers.insert(id.clone(), uid.clone());
        }
        self.pods.insert(uid, info);
    }

    /// A deleted pod.
    pub fn delete(&mut self, uid: &str) {
        self.unlink(uid);
        self.pods.remove(uid);
        self.deleted.insert(uid.to_owned(), Instant::now());
        let now = Instant::now();
        self.deleted
            .retain(|_, when| now.duration_since(*when) < TOMBSTONE_TTL);
    }

    fn unlink(&mut self, uid: &str) {
        if let Some(old) = self.pods.get(uid) {
            for id in old.containers.keys() {
                if self.containers.get(id).is_some_and(|u| u == uid) {
                    self.containers.remove(id);
                }
            }
        }
    }

    fn begin_relist(&mut self) {
        self.relisting = Some(HashMap::new());
    }

    fn relisted(&mut self, uid: String, info: PodInfo) {
        match &mut self.relisting {
            Some(seen) => {
                seen.insert(uid, info);
            }
            None => self.apply(uid, info),
        }
    }

    /// The relist is complete: pods it did not return were deleted meanwhile.
    fn end_relist(&mut self) {
        let Some(seen) = self.relisting.take() else {
            return;
        };
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !seen.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.delete(&uid);
        }
        for (uid, info) in seen {
            self.apply(uid, info);
        }
    }
}

/// The labels of a container: from its pod when known, else its container id.
pub fn labels(lookup: &Lookup, found: &container::ContainerRef) -> ContainerLabels {
    match lookup {
        Lookup::Known { pod, container } => ContainerLabels {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container: container.map_or_else(|| found.id.clone(), str::to_owned),
        },
        _ => ContainerLabels {
            container: found.id.clone(),
            ..Default::default()
        },
    }
}

/// The parts of a `Pod` memtrace uses: (UID, info).
pub fn pod_info(pod: &Pod) -> Option<(String, PodInfo)> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let mut containers = HashMap::new();
    if let Some(status) = &pod.status {
        let all = [
            status.container_statuses.as_deref(),
            status.init_container_statuses.as_deref(),
            status.ephemeral_container_statuses.as_deref(),
        ];
        for status in all.into_iter().flatten().flatten() {
            if let Some(id) = status
                .container_id
                .as_deref()
                .and_then(container::strip_runtime_scheme)
            {
                containers.insert(id, status.name.clone());
            }
        }
    }
    Some((
        uid,
        PodInfo {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            containers,
        },
    ))
}

/// The running watcher. Dropping it stops the watch.
pub struct Kubernetes {
    pub index: Arc<RwLock<PodIndex>>,
    pub node: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Kubernetes {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Metrics of the watch.
#[derive(Clone)]
struct WatchMetrics {
    /// Failed requests by [`Failure::reason`].
    errors: IntCounterVec,
    pods: IntGauge,
}

/// Why a request to the API server failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Nothing came back within `--kube-timeout`.
    Timeout,
    /// A response (or a line of a watch) that is not the JSON expected.
    Malformed,
    /// The server answered an error status (a 5xx, a 403 ...).
    Status,
    /// No connection, or a connection broken off.
    Connection,
}

impl Failure {
    /// The `reason` label of `memtrace_kubernetes_errors_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Malformed => "malformed",
            Failure::Status => "status",
            Failure::Connection => "connection",
        }
    }

    /// What happened, for the log.
    fn describe(self, timeout: Duration) -> String {
        match self {
            Failure::Timeout => format!("no answer within {timeout:?}"),
            Failure::Malformed => "a malformed response".into(),
            Failure::Status => "an error status".into(),
            Failure::Connection => "cannot connect".into(),
        }
    }

    /// Classifies a watcher error by what its chain of causes holds.
    pub fn of(error: &watcher::Error) -> Failure {
        match error {
            watcher::Error::WatchError(_) => return Failure::Status,
            watcher::Error::NoResourceVersion => return Failure::Malformed,
            _ => {}
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = cause {
            if let Some(kube) = e.downcast_ref::<kube::Error>() {
                match kube {
                    // kube turns a watch line that is no event into a Status when it
                    // parses as one (all its fields are optional): without a code, it
                    // did not come from the server's error handling.
                    kube::Error::Api(status) if status.code == 0 => return Failure::Malformed,
                    kube::Error::Api(_) => return Failure::Status,
                    kube::Error::SerdeError(_)
                    | kube::Error::FromUtf8(_)
                    | kube::Error::LinesCodecMaxLineLengthExceeded => return Failure::Malformed,
                    _ => {}
                }
            }
            if e.is::<serde_json::Error>() {
                return Failure::Malformed;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::TimedOut {
                    return Failure::Timeout;
                }
                // An io::Error's `source` skips the error it wraps: look at that too.
                if let Some(inner) = io.get_ref() {
                    cause = Some(inner);
                    continue;
                }
            }
            cause = e.source();
        }
        Failure::Connection
    }
}

/// How long watches ask the server to run (`timeoutSeconds`): a little less than
/// `--kube-timeout`, so that a quiet, healthy watch ends before it could count as hung,
/// and more than `--kube-timeout` minus kube's own 5 s idle margin, so that a watch that
/// went silent fails on our read timeout (said and counted) rather than being re-opened
/// silently.
pub fn watch_seconds(timeout: Duration) -> u32 {
    let margin = (timeout / 4).min(Duration::from_secs(4));
    (timeout.saturating_sub(margin).as_secs() as u32).max(1)
}

impl Kubernetes {
    /// Starts watching this node's pods, or returns `None` off Kubernetes (no
    /// `--kubeconfig`, no in-cluster environment). `changed` is told when pods change,
    /// so that the agent looks for their processes at once.
    pub fn start(options: &Options, registry: &Registry, changed: Notify) -> Result<Option<Self>> {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        if options.kubeconfig.is_none() && !in_cluster {
            return Ok(None);
        }
        let node = match &options.node_name {
            Some(node) if !node.is_empty() => node.clone(),
            _ => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                log::warn!("no --node-name (NODE_NAME): watching the pods of node {host:?}");
                host
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("memtrace-kube")
            .enable_all()
            .build()?;
        let config = match runtime.block_on(client_config(options.kubeconfig.as_deref())) {
            Ok(config) => with_timeouts(config, options.timeout),
            // An explicit kubeconfig that does not work is the user's mistake: say so.
            Err(e) if options.kubeconfig.is_some() => return Err(e),
            Err(e) => {
                log::warn!("{e:#}: running without Kubernetes (cgroup paths only)");
                return Ok(None);
            }
        };
        let client = {
            let _guard = runtime.enter();
            Client::try_from(config).context("Kubernetes client")?
        };
        let metrics = WatchMetrics {
            errors: IntCounterVec::new(
                Opts::new(
                    "memtrace_kubernetes_errors_total",
                    "Failed requests to the Kubernetes API (list and watch; retried with backoff), \
                     by reason: timeout, malformed, status, connection.",
                ),
                &["reason"],
            )?,
            pods: IntGauge::new(
                "memtrace_kubernetes_pods",
                "Pods of this node known from the Kubernetes API.",
            )?,
        };
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.pods.clone()))?;
        let index = Arc::new(RwLock::new(PodIndex::default()));
        runtime.spawn(watch(
            client,
            node.clone(),
            options.timeout,
            index.clone(),
            metrics,
            changed,
        ));
        log::info!("watching the pods of node {node}");
        Ok(Some(Self {
            index,
            node,
            runtime: Some(runtime),
        }))
    }
}

/// Bounds every request by `timeout` of silence: the read timeout restarts with each byte
/// received (and with each request written, so that a pooled connection's idle time does
/// not count), which leaves long watches alone as long as the server keeps them alive.
fn with_timeouts(mut config: Config, timeout: Duration) -> Config {
    config.read_timeout = Some(timeout);
    config.reset_reader_on_write = true;
    config.write_timeout = Some(timeout);
    config.connect_timeout = Some(
        config
            .connect_timeout
            .map_or(timeout, |default| default.min(timeout)),
    );
    config
}

async fn client_config(kubeconfig: Option<&std::path::Path>) -> Result<Config> {
    match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))
        }
        None => Config::incluster().context("in-cluster Kubernetes config"),
    }
}

/// Follows the node's pods until the runtime is shut down.
async fn watch(
    client: Client,
    node: String,
    timeout: Duration,
    index: Arc<RwLock<PodIndex>>,
    metrics: WatchMetrics,
    changed: Notify,
) {
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .timeout(watch_seconds(timeout));
    let mut events = std::pin::pin!(watcher(pods, config).default_backoff());
    // The kind of failure of the episode going on, if any.
    let mut failing: Option<Failure> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            // The resource version is too old (compacted): kube lists again. Routine.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                log::debug!("Kubernetes API: {status:?}; listing again");
                continue;
            }
            Err(e) => {
                let failure = Failure::of(&e);
                metrics.errors.with_label_values(&[failure.reason()]).inc();
                // One line per episode (and kind of failure), not per retry; the counter
                // says how many.
                if failing != Some(failure) {
                    log::warn!(
                        "Kubernetes API: {} ({e}); keeping the last known pods, retrying",
                        failure.describe(timeout)
                    );
                }
                failing = Some(failure);
                continue;
            }
        };
        // `Init` only says a (re)list begins: the server has not answered yet.
        if !matches!(event, watcher::Event::Init) && failing.take().is_some() {
            log::info!("Kubernetes API answers again");
        }
        let mut index = index.write().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Init => index.begin_relist(),
            watcher::Event::InitApply(pod) => {
                if let Some((uid, info)) = pod_info(&pod) {
                    index.relisted(uid, info);
                }
            }
            watcher::Event::InitDone => index.end_relist(),
            watcher::Event::Apply(pod) => {
                if let Some((uid, info)) = pod_info(&pod) {
                    index.apply(uid, info);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = &pod.metadata.uid {
                    index.delete(uid);
                }
            }
        }
        metrics.pods.set(index.len() as i64);
        let settled = index.relisting.is_none();
        drop(index);
        if settled {
            changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const INIT_ID: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const UID: &str = "0b3f6c2e-7a1d-4f0e-9b8a-1c2d3e4f5a6b";

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": UID,
                         "labels": {"app": "web"}, "annotations": {"memtrace.io/trace": "true"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "app"}]},
            "status": {
                "containerStatuses": [{"name": "app", "containerID": format!("containerd://{ID}"),
                    "image": "x", "imageID": "", "ready": true, "restartCount": 0}],
                "initContainerStatuses": [{"name": "setup", "containerID": format!("cri-o://{INIT_ID}"),
                    "image": "x", "imageID": "", "ready": false, "restartCount": 0}],
                "ephemeralContainerStatuses": [{"name": "debug",
                    "image": "x", "imageID": "", "ready": false, "restartCount": 0}]
            }
        }))
        .unwrap()
    }

    fn cgroup_ref(id: &str, uid: Option<&str>) -> container::ContainerRef {
        container::ContainerRef {
            id: id.into(),
            pod_uid: uid.map(str::to_owned),
            qos: container::Qos::Burstable,
        }
    }

    #[test]
    fn maps_every_kind_of_container_status() {
        let (uid, info) = pod_info(&pod()).unwrap();
        assert_eq!(uid, UID);
        assert_eq!(
            (info.namespace.as_str(), info.name.as_str()),
            ("shop", "web-1")
        );
        assert_eq!(info.containers.get(ID).map(String::as_str), Some("app"));
        assert_eq!(
            info.containers.get(INIT_ID).map(String::as_str),
            Some("setup")
        );
        assert_eq!(
            info.containers.len(),
            2,
            "a status without an id maps nothing"
        );
        assert_eq!(info.labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn lookups_follow_applies_deletes_and_relists() {
        let mut index = PodIndex::default();
        let found = cgroup_ref(ID, Some(UID));
        assert!(matches!(index.lookup(&found), Lookup::Unknown));
        let (uid, info) = pod_info(&pod()).unwrap();
        index.apply(uid.clone(), info.clone());
        let labels = labels(&index.lookup(&found), &found);
        assert_eq!(labels.values(), ["shop", "web-1", "app"]);
        // A container the pod's status does not name yet: the pod from the cgroup's UID.
        let new = cgroup_ref(&"a".repeat(64), Some(UID));
        assert_eq!(
            super::labels(&index.lookup(&new), &new).values(),
            ["shop", "web-1", "a".repeat(64).as_str()]
        );
        index.delete(&uid);
        assert!(matches!(index.lookup(&found), Lookup::Deleted));
        index.apply(uid.clone(), info.clone());
        assert!(matches!(index.lookup(&found), Lookup::Known { .. }));
        // A relist that no longer returns the pod deletes it.
        index.begin_relist();
        assert!(matches!(index.lookup(&found), Lookup::Known { .. }));
        index.end_relist();
        assert!(matches!(index.lookup(&found), Lookup::Deleted));
        assert!(index.is_empty());
        // Unknown pods are labelled by container id.
        let stray = cgroup_ref(ID, None);
        let mut fresh = PodIndex::default();
        assert_eq!(labels_of_unknown(&mut fresh, &stray), ["", "", ID]);
    }

    #[test]
    fn builds_a_tls_client() {
        // In a cluster the API server is https: the rustls connector (ring) must build.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let config = Config::new("https://127.0.0.1:6443".parse().unwrap());
        Client::try_from(config).unwrap();
    }

    #[test]
    fn failures_are_told_apart() {
        use std::io::{Error as IoError, ErrorKind};
        let list = watcher::Error::InitialListFailed;
        let garbage = serde_json::from_str::<serde_json::Value>("{\"items\": [").unwrap_err();
        let cases = [
            (list(kube::Error::SerdeError(garbage)), Failure::Malformed),
            (watcher::Error::NoResourceVersion, Failure::Malformed),
            (
                watcher::Error::WatchFailed(kube::Error::Api(
                    serde_json::from_str::<kube::core::Status>(r#"{"type": "ADDED"}"#)
                        .unwrap()
                        .boxed(),
                )),
                Failure::Malformed,
            ),
            (
                list(kube::Error::Api(
                    kube::core::Status::failure("fake outage", "InternalError")
                        .with_code(500)
                        .boxed(),
                )),
                Failure::Status,
            ),
            (
                watcher::Error::WatchStartFailed(kube::Error::ReadEvents(IoError::from(
                    ErrorKind::TimedOut,
                ))),
                Failure::Timeout,
            ),
            // A timeout wrapped in another io::Error (as hyper's body errors are).
            (
                watcher::Error::WatchFailed(kube::Error::ReadEvents(IoError::other(
                    IoError::from(ErrorKind::TimedOut),
                ))),
                Failure::Timeout,
            ),
            (
                list(kube::Error::ReadEvents(IoError::from(
                    ErrorKind::ConnectionRefused,
                ))),
                Failure::Connection,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(Failure::of(&error), expected, "{error}");
        }
    }

    #[test]
    fn watches_end_before_they_could_count_as_hung() {
        for secs in [1, 2, 3, 10, 20, 60, 300, 3600] {
            let timeout = Duration::from_secs(secs);
            let watch = Duration::from_secs(watch_seconds(timeout).into());
            assert!(watch >= Duration::from_secs(1));
            if secs > 1 {
                assert!(watch < timeout, "{secs}: {watch:?}");
            }
            // kube re-opens a watch silent for its timeout + 5 s: ours must fire first.
            assert!(
                watch + Duration::from_secs(5) > timeout,
                "{secs}: {watch:?}"
            );
        }
        assert_eq!(watch_seconds(Duration::from_secs(300)), 296);
    }

    fn labels_of_unknown(index: &mut PodIndex, found: &container::ContainerRef) -> [String; 3] {
        let l = labels(&index.lookup(found), found);
        [l.namespace, l.pod, l.container]
    }
}
