//! What one Prometheus scrape of the agent costs on a big node: `/metrics` rendered from
//! 1,000 containers of synthetic state (`cargo xtask bench` prints the table;
//! `cargo bench -p memtrace --bench scrape` runs this alone; no root needed).
//!
//! Each container has the per-container series (outstanding bytes, allocated and freed
//! counters, suspects, leak events) and the default top-K (5) stacks, each with a
//! suspicion and a growth series labelled with a 16-hex-digit stack id and a site, as the
//! agent publishes them. Measured:
//!
//! 1. `render`: `Metrics::render()`, the body of `/metrics` (gathering and text encoding).
//! 2. `http_get`: a whole `GET /metrics` through `memtrace::http` on loopback, one new
//!    connection per scrape as Prometheus makes after an idle interval, body read to the end.
//!
//! The body's size is printed, and written to `$MEMTRACE_SCRAPE_BENCH_OUT` when that is set
//! (the xtask reads it from there).
use std::{
    hint::black_box,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, RwLock, mpsc},
    time::Duration,
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memtrace::{
    agent::View,
    metrics::{ContainerLabels, Metrics},
};

const GROUP: &str = "scrape";
const CONTAINERS: usize = 1_000;
/// The agent's default `--top-k`.
const TOP_K: usize = 5;

const NAMESPACES: &[&str] = &[
    "default",
    "payments",
    "checkout",
    "search",
    "catalog",
    "identity",
    "ingest",
    "analytics",
    "monitoring",
    "kube-system",
    "ml-serving",
    "notifications",
];
const APPS: &[&str] = &[
    "api-gateway",
    "checkout-api",
    "cart-service",
    "search-indexer",
    "image-resizer",
    "auth-server",
    "ledger-writer",
    "event-consumer",
    "recommendation-model",
    "session-store",
    "pdf-renderer",
    "email-dispatcher",
];
const CONTAINER_NAMES: &[&str] = &["app", "server", "worker", "envoy", "log-shipper"];
const FUNCTIONS: &[&str] = &[
    "handle_request",
    "json_decode",
    "cache_insert",
    "build_response",
    "parse_headers",
    "PyObject_Malloc",
    "std::vector<Order>::_M_realloc_insert",
    "alloc::raw_vec::finish_grow",
    "lru_cache_put",
    "render_template",
    "read_batch",
    "grpc_call_start_batch",
];
const FILES: &[&str] = &[
    "views.py",
    "decoder.c",
    "cache.rs",
    "server.cc",
    "http_parser.c",
    "obmalloc.c",
    "stl_vector.h",
    "raw_vec.rs",
    "lru.go",
    "templates.py",
    "reader.cc",
    "call.cc",
];

/// A small deterministic generator (xorshift64*): same state every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` characters of the alphabet Kubernetes uses for generated name suffixes.
    fn suffix(&mut self, n: usize) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..n)
            .map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize] as char)
            .collect()
    }
}

/// Fills `metrics` the way the agent does for `CONTAINERS` containers, each with `TOP_K`
/// published stacks.
fn fill(metrics: &Metrics) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..CONTAINERS {
        let labels = ContainerLabels {
            namespace: rng.pick(NAMESPACES).to_owned(),
            pod: format!("{}-{}-{}", rng.pick(APPS), rng.suffix(10), rng.suffix(5)),
            container: CONTAINER_NAMES[i % CONTAINER_NAMES.len()].to_owned(),
        };
        let values = labels.values();
        let allocated = rng.below(1 << 40);
        let outstanding = rng.below(1 << 30);
        metrics
            .outstanding_bytes
            .with_label_values(&values)
            .set(outstanding as i64);
        metrics
            .allocated_bytes
            .with_label_values(&values)
            .inc_by(allocated);
        metrics
            .freed_bytes
            .with_label_values(&values)
            .inc_by(allocated.saturating_sub(outstanding));
        let suspects = rng.below(3);
        metrics
            .leak_suspects
            .with_label_values(&values)
            .set(suspects as i64);
        metrics
            .leak_events
            .with_label_values(&values)
            .inc_by(suspects + rng.below(4));
        for _ in 0..TOP_K {
            let stack_id = format!("{:016x}", rng.next());
            let site = format!(
                "{} ({}:{})",
                rng.pick(FUNCTIONS),
                rng.pick(FILES),
                1 + rng.below(2_000)
            );
            let values = labels.with_stack(&stack_id, &site);
            metrics
                .leak_suspicion
                .with_label_values(&values)
                .set(rng.unit());
            metrics
                .leak_growth
                .with_label_values(&values)
                .set(rng.unit() * 65_536.0);
        }
    }
    // The agent's own series, present on every scrape.
    metrics.traced_processes.set(CONTAINERS as i64);
    metrics.attached_probes.set(CONTAINERS as i64 * 12);
    metrics
        .map_entries
        .with_label_values(&["usage"])
        .set(40_000);
    metrics
        .map_entries
        .with_label_values(&["allocs"])
        .set(900_000);
    metrics.tick_seconds.set(0.25);
}

/// Resident memory of this process (kB), to see what the synthetic state costs.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One `GET /metrics` on a new connection; returns the body's length.
fn get_metrics(addr: SocketAddr) -> usize {
    let mut stream = TcpStream::connect(addr).expect("connecting to the metrics server");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("sending the request");
    let mut response = Vec::with_capacity(4 << 20);
    stream
        .read_to_end(&mut response)
        .expect("reading the response");
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "unexpected response: {:?}",
        String::from_utf8_lossy(&response[..response.len().min(200)])
    );
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    response.len() - head_end - 4
}

fn bench_scrape(c: &mut Criterion) {
    let rss_before = rss_kib();
    let metrics = Metrics::new().expect("creating the metrics");
    fill(&metrics);
    let rss_after = rss_kib();
    let body = metrics.render();
    let series = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    println!(
        "scrape: {CONTAINERS} containers, {series} series, body {} bytes ({:.2} MiB)",
        body.len(),
        body.len() as f64 / (1024.0 * 1024.0)
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "scrape: the synthetic state grew this process's RSS by {:.1} MiB",
            after.saturating_sub(before) as f64 / 1024.0
        );
    }
    if let Some(out) = std::env::var_os("MEMTRACE_SCRAPE_BENCH_OUT") {
        let text = format!(
            "containers {CONTAINERS}\nseries {series}\nbody_bytes {}\n",
            body.len()
        );
        std::fs::write(&out, text).expect("writing $MEMTRACE_SCRAPE_BENCH_OUT");
    }

    let mut group = c.benchmark_group(GROUP);
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("render", |b| b.iter(|| black_box(metrics.render()).len()));

    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = mpsc::channel();
    // The server turns SIGINT/SIGTERM into a stop message: honour it as the default
    // action would.
    std::thread::spawn(move || {
        if stopped.recv().is_ok() {
            std::process::exit(130);
        }
    });
    let server = memtrace::http::spawn(
        listener,
        metrics.clone(),
        Arc::new(RwLock::new(View::default())),
        stop,
    )
    .expect("starting the HTTP server");
    // The process collector's numbers change between scrapes: the sizes agree roughly.
    let served = get_metrics(addr);
    assert!(
        served.abs_diff(body.len()) < body.len() / 100,
        "served {served} bytes, rendered {}",
        body.len()
    );
    group.bench_function("http_get", |b| b.iter(|| get_metrics(addr)));
    group.finish();
    drop(server);
}

criterion_group!(benches, bench_scrape);
criterion_main!(benches);
