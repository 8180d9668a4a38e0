//! The agent's HTTP listener: metrics, health, suspects, and profiles. Read-only: every
//! handler serves what the agent already published in its [`View`]; no request can make
//! the agent read a process or a file.
use std::{collections::HashMap, net::TcpListener, sync::mpsc, thread::JoinHandle};

use anyhow::Result;
use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{
    agent::SharedView,
    metrics::Metrics,
    profile::{self, ProfileSample},
};

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    view: SharedView,
}

/// A running server; dropping it shuts the runtime down.
pub struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves on `listener` from a small runtime of its own, and turns SIGTERM/SIGINT into a
/// message on `stop` (the agent loop then detaches and exits).
pub fn spawn(
    listener: TcpListener,
    metrics: Metrics,
    view: SharedView,
    stop: mpsc::Sender<()>,
) -> Result<Server> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("memtrace-http")
        .enable_all()
        .build()?;
    let app = router(AppState { metrics, view });
    let listener = runtime.block_on(async { tokio::net::TcpListener::from_std(listener) })?;
    runtime.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("HTTP server stopped: {e}");
        }
    });
    runtime.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop.send(());
    });
    Ok(Server {
        runtime: Some(runtime),
        thread: None,
    })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/suspects", get(suspects))
        .route("/api/v1/growth", get(growth))
        .route("/debug/pprof/heap", get(pprof_heap))
        .route("/flamegraph.svg", get(flamegraph))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.view.read().map(|v| v.ready).unwrap_or(false) {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: probes not attached yet\n",
        )
            .into_response()
    }
}

async fn suspects(State(state): State<AppState>) -> Response {
    let view = state.view.read().unwrap_or_else(|e| e.into_inner());
    axum::Json(&view.suspects).into_response()
}

/// The always-on tier's top growth sites per container.
async fn growth(State(state): State<AppState>) -> Response {
    let view = state.view.read().unwrap_or_else(|e| e.into_inner());
    axum::Json(&view.growth).into_response()
}

/// The samples of `?container=` (all containers when absent) from `?tier=` (`exact`, the
/// default: outstanding memory; `growth`: pages populated), or an error saying why not.
fn samples(
    state: &AppState,
    query: &HashMap<String, String>,
) -> Result<Vec<ProfileSample>, (StatusCode, String)> {
    let view = state.view.read().unwrap_or_else(|e| e.into_inner());
    let profiles = match query.get("tier").map(String::as_str) {
        None | Some("exact") => &view.profiles,
        Some("growth") => &view.growth_profiles,
        Some("mapped") => &view.mapped_profiles,
        Some(other) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("unknown tier {other:?}: exact, growth or mapped\n"),
            ));
        }
    };
    match query.get("container") {
        None => Ok(profiles.values().flatten().cloned().collect()),
        Some(container) => profiles.get(container).cloned().ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("no traced container {container:?}\n"),
            )
        }),
    }
}

async fn pprof_heap(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    match samples(&state, &query) {
        Ok(samples) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"heap.pb.gz\"",
                ),
            ],
            profile::pprof_heap(&samples),
        )
            .into_response(),
        Err(not_found) => not_found.into_response(),
    }
}

async fn flamegraph(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let samples = match samples(&state, &query) {
        Ok(samples) => samples,
        Err(not_found) => return not_found.into_response(),
    };
    let what = match query.get("tier").map(String::as_str) {
        Some("growth") => "Memory growth (pages populated)",
        Some("mapped") => "Mapped memory (anonymous mappings outstanding)",
        _ => "Outstanding memory",
    };
    let title = match query.get("container") {
        Some(container) => format!("{what} of {container}"),
        None => what.to_owned(),
    };
    match profile::flamegraph_svg(&samples, &title) {
        Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("flame graph failed: {e:#}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    //! The listener takes query strings from anyone who can reach it: property tests that
    //! no query makes it fail, and that it only reads.
    use axum::{body::Body, http::Request};
    use proptest::prelude::*;
    use tower::ServiceExt;

    use super::*;
    use crate::report::Frame;

    const HOSTILE: &str = "</text><script>alert(1)</script>";

    fn app() -> Router {
        let view = SharedView::default();
        {
            let mut view = view.write().unwrap();
            for container in ["/a", HOSTILE] {
                let frame = Frame {
                    function: Some(format!("leak<{container}>")),
                    module: "/app".into(),
                    file: None,
                    line: None,
                    address: "0x1".into(),
                    offset: None,
                };
                view.profiles.insert(
                    container.to_owned(),
                    vec![ProfileSample {
                        frames: vec![frame],
                        bytes: 100,
                        count: 1,
                    }],
                );
            }
        }
        router(AppState {
            metrics: Metrics::new().unwrap(),
            view,
        })
    }

    fn request(method: &str, uri: &str) -> (StatusCode, Vec<u8>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let request = Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap();
            let response = app().oneshot(request).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 16 << 20)
                .await
                .unwrap();
            (status, body.to_vec())
        })
    }

    fn encode(value: &str) -> String {
        value
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    #[test]
    fn a_hostile_container_name_is_escaped_in_the_flame_graph() {
        let (status, body) = request(
            "GET",
            &format!("/flamegraph.svg?container={}", encode(HOSTILE)),
        );
        assert_eq!(status, StatusCode::OK);
        // (inferno's SVG has a script of its own: look for ours.)
        let svg = String::from_utf8(body).unwrap();
        assert!(!svg.contains("<script>alert"), "{svg}");
        assert!(svg.contains("&lt;script&gt;alert(1)"), "{svg}");
    }

    #[test]
    fn only_get_is_served() {
        for path in [
            "/metrics",
            "/healthz",
            "/readyz",
            "/api/v1/suspects",
            "/debug/pprof/heap",
            "/flamegraph.svg",
        ] {
            for method in ["POST", "PUT", "DELETE", "PATCH"] {
                assert_eq!(
                    request(method, path).0,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any decoded value of `container` (and any other parameter) is served or
        /// refused with 404; never a server error.
        #[test]
        fn any_container_parameter_is_answered(
            container in ".{0,40}",
            other in "[a-z]{1,8}",
            path in prop::sample::select(vec!["/flamegraph.svg", "/debug/pprof/heap"]),
        ) {
            let uri = format!("{path}?{other}=1&container={}", encode(&container));
            let (status, body) = request("GET", &uri);
            let known = container == "/a" || container == HOSTILE;
            prop_assert_eq!(status, if known { StatusCode::OK } else { StatusCode::NOT_FOUND });
            if !known {
                prop_assert!(String::from_utf8_lossy(&body).contains("no traced container"));
            }
        }

        /// Raw query strings, well-formed or not, never make a handler fail.
        #[test]
        fn raw_query_strings_never_fail(query in "[ -~]{0,60}") {
            let query: String = query.chars().filter(|c| !c.is_whitespace() && *c != '#').collect();
            for path in ["/flamegraph.svg", "/debug/pprof/heap", "/metrics"] {
                let Ok(uri) = format!("{path}?{query}").parse::<axum::http::Uri>() else {
                    continue;
                };
                let (status, _) = request("GET", &uri.to_string());
                prop_assert!(
                    [StatusCode::OK, StatusCode::NOT_FOUND, StatusCode::BAD_REQUEST].contains(&status),
                    "{} -> {}", uri, status
                );
            }
        }
    }
}
