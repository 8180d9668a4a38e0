//! `/debug/pprof/heap` and `/flamegraph.svg` of a traced container: the pprof profile's
//! in-use totals are the fixture's exact leak (plus the C runtime's few blocks), and
//! agree with `memtrace_outstanding_bytes`; the flame graph names the leaking function;
//! an unknown container is a 404.

use std::collections::HashMap;
use std::io::Read as _;
use std::time::Instant;

use crate::agent_util::*;
use crate::util::*;

const LEAKS: u64 = 200;
const SIZE: u64 = 4096;
const LEAK: u64 = LEAKS * SIZE;
const LEAK_FUNCTION: &str = "fixed_leak";
/// What the C runtime may add on top of the leak.
const RUNTIME_ALLOWANCE: u64 = 64 * 1024;

/// The parts of pprof's profile.proto (github.com/google/pprof, proto/profile.proto) this
/// test reads; prost skips the other fields.
mod pprof {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub kind: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

/// A decoded heap profile with its totals.
struct Heap {
    profile: pprof::Profile,
    /// (inuse_objects, inuse_space) over all samples.
    total: (i64, i64),
    /// (inuse_objects, inuse_space) over the samples whose innermost frame is LEAK_FUNCTION.
    leak_site: (i64, i64),
}

fn decode_heap(gz: &[u8]) -> Heap {
    assert!(
        gz.starts_with(&[0x1f, 0x8b]),
        "/debug/pprof/heap is not gzip (starts with {:02x?})",
        &gz[..gz.len().min(8)]
    );
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("gunzipping /debug/pprof/heap: {e}"));
    let profile = <pprof::Profile as prost::Message>::decode(raw.as_slice())
        .unwrap_or_else(|e| panic!("/debug/pprof/heap is not a pprof Profile: {e}"));
    let strings = &profile.string_table;
    let string = |i: i64| -> &str {
        strings
            .get(usize::try_from(i).unwrap_or(usize::MAX))
            .unwrap_or_else(|| panic!("string index {i} outside the table ({})", strings.len()))
    };
    assert_eq!(
        strings.first().map(String::as_str),
        Some(""),
        "string_table[0] must be \"\""
    );
    let types: Vec<(&str, &str)> = profile
        .sample_type
        .iter()
        .map(|t| (string(t.kind), string(t.unit)))
        .collect();
    assert_eq!(
        types,
        [("inuse_objects", "count"), ("inuse_space", "bytes")],
        "sample types"
    );
    assert_eq!(string(profile.default_sample_type), "inuse_space");

    let functions: HashMap<u64, &pprof::Function> =
        profile.function.iter().map(|f| (f.id, f)).collect();
    let locations: HashMap<u64, &pprof::Location> =
        profile.location.iter().map(|l| (l.id, l)).collect();
    // The innermost function of a location (its first line; later lines are its callers
    // when inlined).
    let innermost = |location_id: u64| -> Option<&str> {
        let location = locations
            .get(&location_id)
            .unwrap_or_else(|| panic!("sample names location {location_id}, which is not defined"));
        let line = location.line.first()?;
        let function = functions.get(&line.function_id).unwrap_or_else(|| {
            panic!(
                "location {location_id} names function {}, which is not defined",
                line.function_id
            )
        });
        Some(string(function.name))
    };

    let mut total = (0, 0);
    let mut leak_site = (0, 0);
    for sample in &profile.sample {
        assert_eq!(
            sample.value.len(),
            2,
            "a sample has {:?} values, not 2",
            sample.value
        );
        assert!(!sample.location_id.is_empty(), "a sample without locations");
        for &id in &sample.location_id {
            innermost(id); // every location and function is defined
        }
        let (objects, space) = (sample.value[0], sample.value[1]);
        assert!(
            objects > 0 && space > 0,
            "a sample with nothing in use: {sample:?}"
        );
        total.0 += objects;
        total.1 += space;
        if innermost(sample.location_id[0]) == Some(LEAK_FUNCTION) {
            leak_site.0 += objects;
            leak_site.1 += space;
        }
    }
    Heap {
        profile,
        total,
        leak_site,
    }
}

#[test]
fn agent_pprof_and_flamegraph() {
    let _serial = serial();
    require_root();

    let mut cgroups = TestCgroups::new("pprof");
    let cg = cgroups.create("fixed");
    let agent = Agent::start(&[
        "--cgroup",
        &format!("{}/*", cgroups.root_pattern()),
        "--interval",
        "500ms",
        "--window",
        "15s",
    ]);
    agent.wait_ready();
    let fixture = start_shape(&cg, &["fixed", &LEAKS.to_string(), &SIZE.to_string()]);
    agent.wait_traced(1, WAIT_TIMEOUT);
    fixture.signal(libc::SIGUSR1);
    fixture.wait_for_line(Stream::Stdout, "`done` line", WAIT_TIMEOUT, |l| {
        l.starts_with("done")
    });
    agent.wait_outstanding(&cg.label, LEAK, WAIT_TIMEOUT);

    // The fixture is idle now; the profile is published in the same interval as the
    // metric: poll until it shows the leak too.
    let pprof_path = format!("/debug/pprof/heap?container={}", url_encode(&cg.label));
    let deadline = Instant::now() + WAIT_TIMEOUT;
    let heap = loop {
        let response = agent.get(&pprof_path);
        assert_eq!(
            response.status,
            200,
            "GET {pprof_path}: {}\n--- agent stderr ---\n{}",
            response.text(),
            agent.stderr()
        );
        let heap = decode_heap(&response.body);
        if heap.leak_site.1 >= LEAK as i64 || Instant::now() >= deadline {
            break heap;
        }
        std::thread::sleep(POLL);
    };
    let outstanding = agent
        .scrape()
        .value("memtrace_outstanding_bytes", &[("container", &cg.label)])
        .expect("memtrace_outstanding_bytes of the container");

    assert!(
        heap.profile.string_table.iter().any(|s| s == LEAK_FUNCTION),
        "{LEAK_FUNCTION} is not in the profile's string table: {:?}",
        heap.profile.string_table
    );
    assert_eq!(
        heap.leak_site,
        (LEAKS as i64, LEAK as i64),
        "(inuse_objects, inuse_space) of the samples whose innermost frame is {LEAK_FUNCTION}"
    );
    let space = heap.total.1 as u64;
    assert!(
        (LEAK..=LEAK + RUNTIME_ALLOWANCE).contains(&space),
        "sum of inuse_space {space} not within [{LEAK}, {LEAK} + {RUNTIME_ALLOWANCE}]"
    );
    assert!(
        (space as f64 - outstanding).abs() <= 0.05 * outstanding,
        "sum of inuse_space {space} differs by more than 5% from memtrace_outstanding_bytes {outstanding}"
    );

    // The flame graph.
    let svg_path = format!("/flamegraph.svg?container={}", url_encode(&cg.label));
    let svg = agent.get(&svg_path);
    assert_eq!(svg.status, 200, "GET {svg_path}: {}", svg.text());
    assert!(
        svg.header("content-type")
            .is_some_and(|t| t.starts_with("image/svg+xml")),
        "GET {svg_path}: content-type {:?}",
        svg.header("content-type")
    );
    let text = svg.text();
    assert!(
        text.contains("<svg"),
        "not an SVG:\n{}",
        &text[..text.len().min(2000)]
    );
    assert!(
        text.contains(LEAK_FUNCTION),
        "the flame graph does not name {LEAK_FUNCTION}:\n{}",
        &text[..text.len().min(4000)]
    );

    // Unknown containers.
    for endpoint in ["/debug/pprof/heap", "/flamegraph.svg"] {
        let path = format!("{endpoint}?container={}", url_encode("/no/such/container"));
        let response = agent.get(&path);
        assert_eq!(
            response.status,
            404,
            "GET {path}: expected 404, got {}: {}",
            response.status,
            response.text()
        );
    }
    drop(fixture);
    drop(agent);
}
