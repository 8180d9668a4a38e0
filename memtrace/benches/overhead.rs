//! What tracing costs a traced program, per `malloc` + `free` pair, on one workload, in one
//! run (`cargo xtask bench` prints the table; `cargo bench -p memtrace --bench overhead`
//! runs this alone). Needs root: the benchmark traces its own process.
//!
//! The modes, measured in this order, each attached before and detached after its own
//! measurement:
//!
//! 1. `untraced`: no probes.
//! 2. `trap_floor`: bare perf uprobe events, no BPF program, at memtrace's placement
//!    (`placement.rs`: malloc's entry and return, free at its first `push`): the cost of the
//!    traps alone, which no uprobe-based tracer probing there can go under.
//! 3. `trap_floor_offset0`: the same events at offset 0 of each function, where bcc's
//!    memleak and bpftrace attach (free starts with `test %rdi,%rdi`, single-stepped).
//! 4. `empty_bpf`: empty BPF programs at exactly memtrace's probe spots: the traps plus the
//!    kernel's cost of running a BPF program.
//! 5. `memtrace_exact`: memtrace, every block sampled (`sample_bytes` 1).
//! 6. `memtrace_sampled`: memtrace, `sample_bytes` 4096 (every block still kept for exact
//!    totals; unsampled ones skip the stack walk and the per-stack update).
//! 7. `bpftrace_memleak`: a bpftrace script doing what bcc's memleak does (size per thread
//!    and the user stack at entry, the block and per-stack bytes at return, removal at free).
//!
//! Before each traced mode is measured, a check proves its probes fire in this process, so
//! probes that attach to nothing fail the run instead of printing a plausible table (the trap
//! floors read their perf counters). For the empty programs and memtrace's modes the check also prints how much of a pair the BPF programs
//! themselves take, from the kernel's BPF statistics (on only during the check: they add a
//! few tens of ns to each program run); the rest of a traced pair is the traps.
//!
//! Time is the measuring thread's CPU time (user + system: the traps and BPF programs run
//! in the kernel on that thread), not wall time: on a shared machine a thread that waits
//! for a CPU would otherwise count the wait, and modes measured a minute apart would see
//! different neighbours.
//!
//! bpftrace 0.17 puts its uprobes in every process that maps libc (`-p` does not scope
//! them), so its script filters on the pid, and other processes pay a trap per call while
//! that mode runs.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    hint::black_box,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, loaded_maps};
use criterion::{
    Criterion, criterion_group, criterion_main,
    measurement::{Measurement, ValueFormatter, WallTime},
};
use memtrace::{
    elf::ElfFile,
    perf_uprobe::{PerfUprobe, ProbeKind},
    placement,
    process::own_libc,
    tracer::{Programs, Tracer, TracerOptions},
};

const GROUP: &str = "malloc_free_pair";
/// Block sizes cycle through 16, 32, ..., 272 bytes (all small-bin, tcache-served sizes).
const MIN_SIZE: usize = 16;
const MAX_SIZE: usize = 272;
const SIZE_STEP: usize = 16;
/// Pairs made by each probe check; the check wants to see at least this many events.
const CHECK_PAIRS: u64 = 10_000;
/// The sampled mode's rate: each byte sampled with probability 1/4096.
const SAMPLED_BYTES: u64 = 4096;
/// How long bpftrace may take to start and to show its probes firing.
const BPFTRACE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long bpftrace may take to exit after SIGINT before it is killed.
const BPFTRACE_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// bpftrace names the BPF map of `@allocs` like this.
const BPFTRACE_ALLOCS_MAP: &str = "AT_allocs";

/// The measured routine: one `malloc` and its `free`, the size moving on each call.
struct Workload {
    size: usize,
}

impl Workload {
    fn new() -> Self {
        Self { size: MIN_SIZE }
    }

    fn next_size(&mut self) -> usize {
        let size = self.size;
        self.size = if size >= MAX_SIZE {
            MIN_SIZE
        } else {
            size + SIZE_STEP
        };
        size
    }

    #[inline(never)]
    fn pair(&mut self) {
        let size = self.next_size();
        // SAFETY: malloc with any size is sound; the pointer (possibly null) goes straight
        // to free, which accepts both.
        unsafe {
            let block = libc::malloc(black_box(size));
            libc::free(black_box(block));
        }
    }

    /// Makes `n` pairs, returning the bytes they allocated.
    fn pairs(&mut self, n: u64) -> u64 {
        let mut bytes = 0;
        for _ in 0..n {
            bytes += self.size as u64;
            self.pair();
        }
        bytes
    }
}

/// The calling thread's CPU time, in ns (criterion's default measures wall time).
struct ThreadTime {
    /// Formats values as durations, as wall time does.
    wall: WallTime,
}

impl ThreadTime {
    fn now() -> u64 {
        let mut time = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill; this clock exists on every Linux.
        let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
        assert_eq!(result, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
        time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
    }
}

impl Measurement for ThreadTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        Self::now()
    }

    fn end(&self, started: u64) -> u64 {
        Self::now() - started
    }

    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }

    fn zero(&self) -> u64 {
        0
    }

    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

fn thread_time() -> Criterion<ThreadTime> {
    Criterion::default().with_measurement(ThreadTime { wall: WallTime })
}

fn bench_modes(c: &mut Criterion<ThreadTime>) {
    let pid = std::process::id();
    let libc = own_libc().expect("finding this process's libc");
    let mut workload = Workload::new();
    let mut group = c.benchmark_group(GROUP);
    // A traced pair costs microseconds: a few seconds per mode give millions of pairs.
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    group.bench_function("untraced", |b| b.iter(|| workload.pair()));

    for (name, placed) in [("trap_floor", true), ("trap_floor_offset0", false)] {
        let floor = TrapFloor::open(&libc, placed);
        floor.check_fires(name, &mut workload);
        group.bench_function(name, |b| b.iter(|| workload.pair()));
        drop(floor);
    }

    {
        let before = loaded_program_ids();
        let tracer = attach(pid, &libc, 1, Programs::Noop);
        let ours = &loaded_program_ids() - &before;
        check_noop_fires(&ours, &mut workload);
        group.bench_function("empty_bpf", |b| b.iter(|| workload.pair()));
        drop(tracer);
    }

    for (name, sample_bytes) in [("memtrace_exact", 1), ("memtrace_sampled", SAMPLED_BYTES)] {
        let before = loaded_program_ids();
        let mut tracer = attach(pid, &libc, sample_bytes, Programs::Memtrace);
        let ours = &loaded_program_ids() - &before;
        check_memtrace_counts(name, &mut tracer, pid, &mut workload);
        let programs = program_runs(name, &ours, &mut workload, CHECK_PAIRS);
        report_program_time(name, &programs, CHECK_PAIRS);
        group.bench_function(name, |b| b.iter(|| workload.pair()));
        drop(tracer);
    }

    match Bpftrace::start(pid, &libc, &mut workload) {
        Some(bpftrace) => {
            group.bench_function("bpftrace_memleak", |b| b.iter(|| workload.pair()));
            bpftrace.stop();
        }
        None => eprintln!("bpftrace_memleak: skipped (bpftrace is not installed; test mode only)"),
    }

    group.finish();
}

/// Loads and attaches a tracer from a helper thread, while the measuring thread waits
/// without allocating: a thread that allocates while the probes are being attached can see
/// an entry probe fire without its return probe (attached a moment later), which leaves a
/// stale per-thread state in memtrace's `THREADS` map, and memtrace then takes all of that
/// thread's later calls for nested ones and records none of them.
fn attach(pid: u32, libc: &Path, sample_bytes: u64, programs: Programs) -> Tracer {
    thread::scope(|scope| {
        let attaching = scope.spawn(|| {
            let options = TracerOptions {
                sample_bytes,
                ..Default::default()
            };
            let mut tracer = Tracer::load(&options).unwrap_or_else(|e| {
                panic!("loading memtrace's BPF object (the benchmark needs root): {e:#}")
            });
            tracer
                .attach_libc_programs(pid, libc, programs)
                .unwrap_or_else(|e| {
                    panic!(
                        "attaching {programs:?} programs to {}: {e:#}",
                        libc.display()
                    )
                });
            tracer
        });
        attaching
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// memtrace's exact totals must count every allocation the check makes.
fn check_memtrace_counts(name: &str, tracer: &mut Tracer, pid: u32, workload: &mut Workload) {
    let tgids = HashSet::from([pid]);
    let totals = |tracer: &mut Tracer| {
        let snapshot = tracer
            .snapshot(&tgids)
            .unwrap_or_else(|e| panic!("{name}: reading memtrace's maps: {e:#}"));
        snapshot
            .totals
            .iter()
            .fold((0u64, 0u64), |(n, bytes), (_, t)| {
                (n + t.allocations, bytes + t.allocated_bytes)
            })
    };
    let (count_before, bytes_before) = totals(tracer);
    let bytes = workload.pairs(CHECK_PAIRS);
    let (count_after, bytes_after) = totals(tracer);
    let (counted, counted_bytes) = (count_after - count_before, bytes_after - bytes_before);
    assert!(
        counted >= CHECK_PAIRS && counted_bytes >= bytes,
        "{name}: memtrace's probes do not fire in this process: {CHECK_PAIRS} mallocs of \
         {bytes} bytes made, its totals grew by {counted} allocations of {counted_bytes} bytes"
    );
}

/// IDs of every BPF program loaded on the host.
fn loaded_program_ids() -> HashSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(|info| info.ok())
        .map(|info| info.id())
        .collect()
}

/// How often, and how long, the BPF programs of one name ran.
struct ProgramRuns {
    name: String,
    runs: u64,
    time: Duration,
}

/// Runs and run time of the programs in `ids` (grouped by name) over `pairs` pairs, from
/// the kernel's BPF statistics, enabled only meanwhile (they cost time themselves).
fn program_runs(
    mode: &str,
    ids: &HashSet<u32>,
    workload: &mut Workload,
    pairs: u64,
) -> Vec<ProgramRuns> {
    let read = || -> HashMap<u32, (String, u64, Duration)> {
        aya::programs::loaded_programs()
            .filter_map(|info| info.ok())
            .filter(|info| ids.contains(&info.id()))
            .map(|info| {
                let name = info.name_as_str().unwrap_or("?").to_owned();
                (info.id(), (name, info.run_count(), info.run_time()))
            })
            .collect()
    };
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .unwrap_or_else(|e| panic!("{mode}: enabling BPF run statistics for the probe check: {e}"));
    let before = read();
    workload.pairs(pairs);
    let after = read();
    drop(stats);
    let mut by_name: Vec<ProgramRuns> = Vec::new();
    for (id, (name, runs, time)) in after {
        let (runs_before, time_before) = before
            .get(&id)
            .map_or((0, Duration::ZERO), |(_, r, t)| (*r, *t));
        let runs = runs - runs_before;
        let time = time.saturating_sub(time_before);
        match by_name.iter_mut().find(|p| p.name == name) {
            Some(program) => {
                program.runs += runs;
                program.time += time;
            }
            None => by_name.push(ProgramRuns { name, runs, time }),
        }
    }
    by_name.retain(|p| p.runs > 0);
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    by_name
}

/// Prints where the BPF side of a mode's cost goes; the rest of a traced pair is the traps.
fn report_program_time(mode: &str, programs: &[ProgramRuns], pairs: u64) {
    let per_pair = |time: Duration| time.as_nanos() as f64 / pairs as f64;
    let parts: Vec<String> = programs
        .iter()
        .map(|p| format!("{} {:.0} ns ({} runs)", p.name, per_pair(p.time), p.runs))
        .collect();
    let total: Duration = programs.iter().map(|p| p.time).sum();
    eprintln!(
        "{mode}: BPF program time per pair, over {pairs} pairs: {:.0} ns in all: {}",
        per_pair(total),
        parts.join(", ")
    );
}

/// The empty programs record nothing, so the kernel's run counts must show each of them
/// ran once per pair; and the kernel must have mapped the `[uprobes]` area into this
/// process, which it does when a uprobe first fires here.
fn check_noop_fires(ours: &HashSet<u32>, workload: &mut Workload) {
    let programs = program_runs("empty_bpf", ours, workload, CHECK_PAIRS);
    for name in ["noop_enter", "noop_exit"] {
        let runs = programs
            .iter()
            .find(|p| p.name == name)
            .map_or(0, |p| p.runs);
        assert!(
            runs >= CHECK_PAIRS,
            "empty_bpf: the empty probes do not fire in this process: {CHECK_PAIRS} mallocs \
             made, {name} ran {runs} times"
        );
    }
    assert!(
        uprobes_area_mapped(),
        "empty_bpf: no [uprobes] mapping in this process after probes fired"
    );
    report_program_time("empty_bpf", &programs, CHECK_PAIRS);
}

/// The traps a malloc + free pair takes, as bare perf uprobe events (no BPF program):
/// malloc's entry and return, free's entry. Opened on the measuring thread, whose hits they
/// count; closed (the probes removed) when dropped.
struct TrapFloor {
    events: Vec<(&'static str, PerfUprobe)>,
}

impl TrapFloor {
    /// At memtrace's placement when `placed`, else at offset 0 of each function.
    fn open(libc: &Path, placed: bool) -> Self {
        let elf = ElfFile::open(libc).unwrap_or_else(|e| panic!("reading {}: {e}", libc.display()));
        let offset = |symbol: &str| {
            let function = elf
                .function(symbol)
                .unwrap_or_else(|| panic!("{} has no {symbol}", libc.display()));
            let at = if placed {
                placement::place(elf.code(function, 4096)).offset
            } else {
                0
            };
            eprintln!("trap floor: {symbol} probed at +{at}");
            function.file_offset + at
        };
        let (malloc, free) = (offset("malloc"), offset("free"));
        let open = |offset, kind| {
            PerfUprobe::open(libc, offset, kind)
                .unwrap_or_else(|e| panic!("trap floor (the benchmark needs root): {e:#}"))
        };
        // The return probe first, as memtrace does: no entry is ever seen without it.
        let events = vec![
            ("malloc return", open(malloc, ProbeKind::Return)),
            ("malloc entry", open(malloc, ProbeKind::Entry)),
            ("free entry", open(free, ProbeKind::Entry)),
        ];
        Self { events }
    }

    /// Every event must count each of `CHECK_PAIRS` pairs: a probe on nothing fails here.
    fn check_fires(&self, mode: &str, workload: &mut Workload) {
        let counts = |floor: &Self| -> Vec<u64> {
            floor
                .events
                .iter()
                .map(|(name, event)| {
                    event
                        .count()
                        .unwrap_or_else(|e| panic!("{mode}: {name}: {e:#}"))
                })
                .collect()
        };
        let before = counts(self);
        workload.pairs(CHECK_PAIRS);
        let after = counts(self);
        for (((name, _), before), after) in self.events.iter().zip(before).zip(after) {
            let hits = after - before;
            assert!(
                hits >= CHECK_PAIRS,
                "{mode}: the {name} probe does not fire: {CHECK_PAIRS} pairs made, it counted {hits}"
            );
        }
        assert!(
            uprobes_area_mapped(),
            "{mode}: no [uprobes] mapping in this process after probes fired"
        );
    }
}

fn uprobes_area_mapped() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .map(|maps| maps.lines().any(|line| line.ends_with("[uprobes]")))
        .unwrap_or(false)
}

/// bcc memleak's bookkeeping in bpftrace: size and user stack per thread at entry, the block
/// and per-stack bytes at return, removal at free. bpftrace 0.17 attaches uprobes to every
/// process mapping the library, so each probe filters on the pid itself.
fn memleak_script(pid: u32, libc: &Path) -> String {
    let libc = libc.display();
    format!(
        r#"
uprobe:{libc}:malloc /pid == {pid}/ {{
    @size[tid] = arg0;
    @stack[tid] = ustack;
}}
uretprobe:{libc}:malloc /pid == {pid} && @size[tid]/ {{
    if (retval != 0) {{
        @allocs[retval] = @size[tid];
        @stack_of[retval] = @stack[tid];
        @bytes[@stack[tid]] += @size[tid];
    }}
    delete(@size[tid]);
    delete(@stack[tid]);
}}
uprobe:{libc}:free /pid == {pid} && @allocs[arg0]/ {{
    @bytes[@stack_of[arg0]] -= @allocs[arg0];
    delete(@allocs[arg0]);
    delete(@stack_of[arg0]);
}}
END {{
    clear(@size);
    clear(@stack);
    clear(@allocs);
    clear(@stack_of);
    clear(@bytes);
}}
"#
    )
}

/// A running bpftrace, stopped (SIGINT, then SIGKILL) and reaped when dropped, panics
/// included.
struct Bpftrace {
    child: Option<Child>,
    log: PathBuf,
}

impl Bpftrace {
    /// Starts bpftrace on this process and waits until its probes record this process's
    /// blocks. `None` when bpftrace is missing and this is a test run (`cargo test
    /// --benches`), where the other modes still get checked.
    fn start(pid: u32, libc: &Path, workload: &mut Workload) -> Option<Self> {
        let log = std::env::temp_dir().join(format!("memtrace-bench-bpftrace-{pid}.log"));
        let stdout =
            File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let stderr = stdout
            .try_clone()
            .expect("duplicating the bpftrace log's descriptor");
        let spawned = Command::new("bpftrace")
            .arg("-p")
            .arg(pid.to_string())
            .arg("-e")
            .arg(memleak_script(pid, libc))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !bench_mode() => {
                let _ = std::fs::remove_file(&log);
                return None;
            }
            Err(e) => panic!(
                "bpftrace_memleak: running bpftrace: {e} (`cargo xtask bench` installs it: \
                 apt-get install bpftrace)"
            ),
        };
        let mut bpftrace = Self {
            child: Some(child),
            log,
        };
        bpftrace.wait_for("Attaching", workload);
        bpftrace.wait_until_recording(workload);
        Some(bpftrace)
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("bpftrace already stopped")
    }

    fn output(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    fn fail(&mut self, what: &str) -> ! {
        let status = self.child().try_wait().ok().flatten();
        let output = self.output();
        panic!(
            "bpftrace_memleak: {what} (bpftrace {}); its output:\n{output}",
            status.map_or("still running".to_owned(), |s| s.to_string())
        );
    }

    fn wait_for(&mut self, text: &str, workload: &mut Workload) {
        let deadline = Instant::now() + BPFTRACE_START_TIMEOUT;
        while !self.output().contains(text) {
            if matches!(self.child().try_wait(), Ok(Some(_))) {
                self.fail(&format!("bpftrace exited before printing {text:?}"));
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "no {text:?} from bpftrace within {BPFTRACE_START_TIMEOUT:?}"
                ));
            }
            workload.pairs(10);
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls (bounded) until bpftrace's `@allocs` holds a block this process keeps alive
    /// and drops it once freed: proof that its malloc and free probes fire here and record
    /// (bpftrace attaches them one after the other, after saying "Attaching").
    fn wait_until_recording(&mut self, workload: &mut Workload) {
        const MARKER_SIZE: usize = 4242;
        let deadline = Instant::now() + BPFTRACE_START_TIMEOUT;
        let mut last = "its probes never recorded this process's mallocs".to_owned();
        loop {
            // SAFETY: a plain allocation, freed below.
            let block = unsafe { libc::malloc(MARKER_SIZE) };
            assert!(!block.is_null(), "malloc({MARKER_SIZE}) failed");
            let recorded = bpftrace_allocs_size(block as u64);
            // SAFETY: `block` came from malloc above and is freed once.
            unsafe { libc::free(block) };
            match recorded {
                Some(size) if size == MARKER_SIZE as u64 => {
                    // The free above ran traced: its probe must have removed the block.
                    if bpftrace_allocs_size(block as u64).is_none() {
                        return;
                    }
                    last = "its free probe does not remove freed blocks from @allocs".to_owned();
                }
                Some(size) => {
                    last = format!("it recorded a {MARKER_SIZE}-byte block as {size} bytes");
                }
                None => {}
            }
            if matches!(self.child().try_wait(), Ok(Some(_))) {
                self.fail("bpftrace exited while starting");
            }
            if Instant::now() > deadline {
                let maps: Vec<String> = loaded_maps()
                    .filter_map(|m| m.ok())
                    .filter_map(|m| m.name_as_str().map(str::to_owned))
                    .filter(|name| name.starts_with("AT_"))
                    .collect();
                self.fail(&format!(
                    "after {BPFTRACE_START_TIMEOUT:?}, {last} (bpftrace maps seen: {maps:?})"
                ));
            }
            workload.pairs(10);
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, a bounded wait, SIGKILL; always reaps.
    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child, not yet reaped, so its pid is still ours.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + BPFTRACE_EXIT_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The size bpftrace's `@allocs` holds for `address`, looking at every bpftrace map of that
/// name on the host (the script only ever records this process).
fn bpftrace_allocs_size(address: u64) -> Option<u64> {
    for info in loaded_maps().filter_map(|m| m.ok()) {
        if info.name_as_str() != Some(BPFTRACE_ALLOCS_MAP)
            || info.key_size() != 8
            || info.value_size() != 8
        {
            continue;
        }
        let Ok(data) = MapData::from_id(info.id()) else {
            continue;
        };
        let Ok(map) = Map::from_map_data(data) else {
            continue;
        };
        let Ok(allocs) = BpfHashMap::<MapData, u64, u64>::try_from(map) else {
            continue;
        };
        if let Ok(size) = allocs.get(&address, 0) {
            return Some(size);
        }
    }
    None
}

/// `cargo bench` passes `--bench`; `cargo test --benches` does not.
fn bench_mode() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

criterion_group! {
    name = benches;
    config = thread_time();
    targets = bench_modes
}
criterion_main!(benches);
