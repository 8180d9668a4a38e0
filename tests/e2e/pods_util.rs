//! Helpers for the `pods_*` tests: a fake Kubernetes API server on loopback that serves
//! real Pod JSON (list and watch, with resource versions) to the agent's real kube client,
//! a kubeconfig pointing at it, and kubelet-style cgroup hierarchies (systemd driver) under
//! a test's cgroup root. The server can misbehave on demand: an outage (500s), garbage
//! (malformed or wrongly shaped JSON, a garbage line in a watch), or a hang (connections
//! accepted, never answered).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::agent_util::*;

/// The node the agent is told it runs on.
pub const NODE: &str = "node-e2e";

/// How long a watch response stays open at most before the server ends it (the client
/// then watches again from its last resource version, as with a real API server); less
/// when the request's `timeoutSeconds` says so.
const WATCH_SLICE: Duration = Duration::from_secs(20);

/// How the fake API server answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Healthy,
    /// Every request answers 500 (an API outage); open watches end.
    Failing,
    /// Lists answer 200 with JSON cut short.
    MalformedList,
    /// Lists answer 200 with well-formed JSON of the wrong shape (`items` an object).
    WrongShapeList,
    /// Connections are accepted and never answered; open watches go silent. When the mode
    /// ends, those connections are closed without an answer.
    Hanging,
    /// Like `Hanging`, for lists only (watches are served).
    HangingLists,
}

/// One pod of the fake cluster.
#[derive(Clone, Debug)]
pub struct FakePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// (container name, runtime container id) of started containers.
    pub containers: Vec<(String, String)>,
}

impl FakePod {
    pub fn new(namespace: &str, name: &str, uid: &str, containers: &[(&str, &str)]) -> FakePod {
        FakePod {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            node: NODE.into(),
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            annotations: BTreeMap::new(),
            containers: containers
                .iter()
                .map(|(n, id)| (n.to_string(), id.to_string()))
                .collect(),
        }
    }

    pub fn annotate(mut self, key: &str, value: &str) -> FakePod {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// The Pod as the API server returns it (checked against k8s-openapi's type).
    fn json(&self, resource_version: u64) -> Value {
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, id)| {
                json!({
                    "name": name,
                    "containerID": format!("containerd://{id}"),
                    "image": "docker.io/library/busybox:1.36",
                    "imageID": "docker.io/library/busybox@sha256:0000",
                    "ready": true,
                    "started": true,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
                })
            })
            .collect();
        let containers: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, _)| json!({"name": name, "image": "busybox:1.36"}))
            .collect();
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "resourceVersion": resource_version.to_string(),
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": self.labels,
                "annotations": self.annotations,
            },
            "spec": {"nodeName": self.node, "containers": containers},
            "status": {"phase": "Running", "qosClass": "Burstable", "containerStatuses": statuses},
        });
        let _: Pod = serde_json::from_value(pod.clone())
            .unwrap_or_else(|e| panic!("the fake pod is not a valid Pod: {e}\n{pod:#}"));
        pod
    }
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// uid → (pod, its resource version).
    pods: BTreeMap<String, (FakePod, u64)>,
    /// Every change: (resource version, ADDED/MODIFIED/DELETED, object).
    events: Vec<(u64, &'static str, FakePod)>,
    /// Raw lines watches send once they are past their resource version (garbage).
    raw_lines: Vec<(u64, String)>,
    mode: Mode,
    /// Requests served, as request lines (for assertions on the field selector).
    requests: Vec<String>,
    stopped: bool,
}

/// A fake API server on 127.0.0.1: `GET /api/v1/pods` (list, and `watch=true`), filtered by
/// the `spec.nodeName` field selector like the real one. Stopped when dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    kubeconfig: tempfile::TempDir,
}

impl FakeApiServer {
    pub fn start(pods: &[FakePod]) -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake API server");
        let addr = listener.local_addr().unwrap();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        {
            let mut s = state.0.lock().unwrap();
            for pod in pods {
                s.resource_version += 1;
                let rv = s.resource_version;
                s.pods.insert(pod.uid.clone(), (pod.clone(), rv));
            }
        }
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if shared.0.lock().unwrap().stopped {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(conn, &shared));
            }
        });
        let kubeconfig = tempfile::tempdir().unwrap();
        std::fs::write(
            kubeconfig.path().join("config"),
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\n\
                 users:\n- name: fake\n  user: {{}}\n"
            ),
        )
        .unwrap();
        FakeApiServer {
            addr,
            state,
            kubeconfig,
        }
    }

    /// A kubeconfig file for this server.
    pub fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig.path().join("config")
    }

    fn change(&self, kind: &'static str, pod: FakePod) {
        let (lock, cvar) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version;
        if kind == "DELETED" {
            s.pods.remove(&pod.uid);
        } else {
            s.pods.insert(pod.uid.clone(), (pod.clone(), rv));
        }
        s.events.push((rv, kind, pod));
        cvar.notify_all();
    }

    pub fn add(&self, pod: FakePod) {
        self.change("ADDED", pod);
    }

    pub fn modify(&self, pod: FakePod) {
        self.change("MODIFIED", pod);
    }

    pub fn delete(&self, pod: &FakePod) {
        self.change("DELETED", pod.clone());
    }

    /// Starts or ends an outage: every request answers 500, open watches end.
    pub fn set_failing(&self, failing: bool) {
        self.set_mode(if failing {
            Mode::Failing
        } else {
            Mode::Healthy
        });
    }

    pub fn set_mode(&self, mode: Mode) {
        let (lock, cvar) = &*self.state;
        lock.lock().unwrap().mode = mode;
        cvar.notify_all();
    }

    /// Makes every watch (open now, or opened from an older resource version) send `line`
    /// as if it were an event, then go on with the real ones.
    pub fn watch_line(&self, line: &str) {
        let (lock, cvar) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version;
        s.raw_lines.push((rv, line.to_owned()));
        cvar.notify_all();
    }

    /// Watch requests served so far.
    pub fn watches(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.contains("watch=true"))
            .count()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.state;
        lock.lock().unwrap().stopped = true;
        cvar.notify_all();
        // Wake the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// The value of `name` in a query string (percent-decoding what the kube client encodes).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            v.replace("%3D", "=")
                .replace("%3d", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
                .replace('+', " ")
        })
    })
}

fn respond(conn: &mut TcpStream, status: &str, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// What a watch sends: an event, or a raw line.
enum WatchLine {
    Event(&'static str, FakePod),
    Raw(String),
}

/// Serves one request and closes the connection.
fn serve(mut conn: TcpStream, state: &(Mutex<State>, Condvar)) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip the headers (GET requests have no body).
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.trim().is_empty() => break,
            Ok(_) => {}
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (lock, cvar) = state;
    {
        let mut s = lock.lock().unwrap();
        s.requests.push(request_line.trim().to_owned());
        let is_watch = target.contains("watch=true") || target.contains("watch=1");
        let hang = match s.mode {
            Mode::Hanging => true,
            Mode::HangingLists => !is_watch,
            _ => false,
        };
        if hang {
            // Accepted, never answered: hold the connection until the mode ends.
            let mode = s.mode;
            while s.mode == mode && !s.stopped {
                s = cvar.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
            }
            return;
        }
        if s.mode == Mode::Failing {
            drop(s);
            respond(
                &mut conn,
                "500 Internal Server Error",
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "fake outage", "reason": "InternalError", "code": 500}),
            );
            return;
        }
    }
    if path != "/api/v1/pods" {
        respond(
            &mut conn,
            "404 Not Found",
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("{path} not found"), "reason": "NotFound", "code": 404}),
        );
        return;
    }
    let node = query_param(query, "fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName=").map(str::to_owned));
    let on_node = |pod: &FakePod| node.as_ref().is_none_or(|n| *n == pod.node);
    if query_param(query, "watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = query_param(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let slice = query_param(query, "timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(WATCH_SLICE, |secs| {
                Duration::from_secs(secs).min(WATCH_SLICE)
            });
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        let _ = conn.flush();
        let mut sent = from;
        let until = Instant::now() + slice;
        let mut s = lock.lock().unwrap();
        loop {
            if s.mode == Mode::Hanging {
                // Silent from now on; dropped without an end when the hang is over.
                while s.mode == Mode::Hanging && !s.stopped {
                    s = cvar.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
                }
                return;
            }
            if s.stopped || s.mode == Mode::Failing || Instant::now() >= until {
                break;
            }
            // Events and raw lines after `sent`, in resource-version order.
            let mut new: Vec<(u64, WatchLine)> = s
                .events
                .iter()
                .filter(|(rv, _, _)| *rv > sent)
                .map(|(rv, kind, pod)| (*rv, WatchLine::Event(kind, pod.clone())))
                .chain(
                    s.raw_lines
                        .iter()
                        .filter(|(rv, _)| *rv > sent)
                        .map(|(rv, line)| (*rv, WatchLine::Raw(line.clone()))),
                )
                .collect();
            new.sort_by_key(|(rv, _)| *rv);
            if !new.is_empty() {
                drop(s);
                for (rv, line) in new {
                    sent = rv;
                    let line = match line {
                        WatchLine::Raw(raw) => format!("{raw}\n"),
                        WatchLine::Event(_, pod) if !on_node(&pod) => continue,
                        WatchLine::Event(kind, pod) => {
                            format!("{}\n", json!({"type": kind, "object": pod.json(rv)}))
                        }
                    };
                    if write!(conn, "{:x}\r\n{line}\r\n", line.len())
                        .and_then(|()| conn.flush())
                        .is_err()
                    {
                        return;
                    }
                }
                s = lock.lock().unwrap();
                continue;
            }
            s = cvar.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
        }
        drop(s);
        let _ = write!(conn, "0\r\n\r\n");
        return;
    }
    let s = lock.lock().unwrap();
    match s.mode {
        Mode::MalformedList => {
            let rv = s.resource_version;
            drop(s);
            let body = format!(
                r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{"resourceVersion":"{rv}"}},"items":[{{"metadata":"#
            );
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        Mode::WrongShapeList => {
            let rv = s.resource_version;
            drop(s);
            let wrong = json!({"kind": "PodList", "apiVersion": "v1",
                               "metadata": {"resourceVersion": rv.to_string()},
                               "items": {"web-1": {"metadata": {"uid": 42}}}});
            respond(&mut conn, "200 OK", &wrong);
            return;
        }
        _ => {}
    }
    let items: Vec<Value> = s
        .pods
        .values()
        .filter(|(pod, _)| on_node(pod))
        .map(|(pod, rv)| pod.json(*rv))
        .collect();
    let list = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": s.resource_version.to_string()},
        "items": items,
    });
    drop(s);
    respond(&mut conn, "200 OK", &list);
}

/// A 64-hex-digit container id made from a small number.
pub fn container_id(n: u32) -> String {
    format!("{n:08x}").repeat(8)
}

/// A pod UID made from a small number.
pub fn pod_uid(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-00000000e2e0")
}

/// Creates the kubelet's systemd-driver cgroups of one container under the test root:
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID_>.slice/
/// cri-containerd-<ID>.scope` (parents created once).
pub fn kubelet_cgroup(cgroups: &mut TestCgroups, uid: &str, id: &str) -> Cgroup {
    let levels = [
        "kubepods.slice".to_string(),
        "kubepods.slice/kubepods-burstable.slice".to_string(),
        format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ),
        format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
            uid.replace('-', "_")
        ),
    ];
    let mut last = None;
    for level in levels {
        last = Some(cgroups.create_all(&level));
    }
    last.unwrap()
}

/// `memtrace agent` on Kubernetes: the fake API server's kubeconfig and node, a short
/// interval (unless `args` has one), plus `args`.
pub fn start_pod_agent(api: &FakeApiServer, args: &[&str], env: &[(&str, &str)]) -> Agent {
    let addr = free_addr();
    let mut cmd = crate::util::memtrace_command(["agent"]);
    cmd.arg("--kubeconfig")
        .arg(api.kubeconfig())
        .args(["--node-name", NODE, "--window", "20s"]);
    if !args.contains(&"--interval") {
        cmd.args(["--interval", "500ms"]);
    }
    cmd.args(args).arg("--listen").arg(addr.to_string());
    Agent::spawn(cmd, env, addr)
}

/// The value of a series of a pod container, if exported.
pub fn pod_value(
    scrape: &Scrape,
    name: &str,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Option<f64> {
    scrape.value(
        name,
        &[
            ("namespace", namespace),
            ("pod", pod),
            ("container", container),
        ],
    )
}

/// Starts `program args` inside `cgroup` (the shell moves itself in, then execs it) and
/// waits for its `ready` line.
pub fn start_in(cgroup: &Cgroup, program: &std::path::Path, args: &[&str]) -> crate::util::Proc {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(cgroup.dir.join("cgroup.procs"))
        .arg(program)
        .args(args);
    let proc = crate::util::Proc::spawn(
        format!("{} {args:?} in {}", program.display(), cgroup.label),
        cmd,
    );
    proc.wait_for_line(
        crate::util::Stream::Stdout,
        "`ready` line",
        crate::util::WAIT_TIMEOUT,
        |l| l.starts_with("ready"),
    );
    proc
}

/// Open file descriptors of a process.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
