//! `memtrace top`: trace one process (running, or started by memtrace) and show the call
//! stacks that hold its unfreed memory.
use std::{
    collections::HashSet,
    io::{IsTerminal, Write},
    path::Path,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::RecvTimeoutError,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    cli::{Format, Tier, TopArgs},
    elf::ElfFile,
    launch::{self, ChildEvent, TracedChild},
    preflight, process,
    python::session::PythonTarget,
    report::{self, Resolver, Target},
    symbolize::Symbolizer,
    tracer::{AttachSummary, Snapshot, Tracer, TracerOptions},
};

/// How often the loop wakes to check for exit, the deadline and Ctrl-C.
const TICK: Duration = Duration::from_millis(100);
/// How often, and for how long after the start, an interpreter not configured yet is
/// looked for.
const PYTHON_TICK: Duration = Duration::from_millis(2);
const PYTHON_EAGER_FOR: Duration = Duration::from_secs(10);
/// How often a CPython target's new stacks have their code objects read.
const PYTHON_LEARN_EVERY: Duration = Duration::from_millis(200);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The process being traced, and how we learn that it ends.
enum Traced {
    Running { pid: u32 },
    Child(TracedChild),
}

impl Traced {
    fn pid(&self) -> u32 {
        match self {
            Traced::Running { pid } => *pid,
            Traced::Child(child) => child.pid,
        }
    }
}

pub fn run(args: TopArgs) -> Result<ExitCode> {
    preflight::check(Path::new("/sys"))?;
    let options = TracerOptions {
        sample_bytes: args.sample_bytes,
        max_allocations: args.max_allocations,
        max_stacks: args.max_stack_traces,
        // One process: probes scoped to it, so nothing else on the machine traps.
        filter_processes: false,
        fault_sample: args.fault_sample,
    };
    if args.tier == Tier::Growth {
        return run_growth(args, options);
    }

    // Everything that can be checked about the target is checked before loading BPF.
    let mut program_path = None;
    let (traced, libc, command) = match (&args.pid, args.command.split_first()) {
        (Some(pid), None) => (
            Traced::Running { pid: *pid },
            process::allocator_of_running(*pid)?.path,
            process::command_line(*pid),
        ),
        (None, Some((program, rest))) => {
            let program = process::find_program(program)?;
            launch::check_runnable(&program)?;
            let libc = process::allocator_of_program(&ElfFile::open(&program)?)?;
            // Not from /proc: the child has not exec'd yet.
            let command = args.command.join(" ");
            program_path = Some(program.clone());
            (
                Traced::Child(TracedChild::spawn(&program, rest)?),
                libc,
                command,
            )
        }
        _ => bail!("give either --pid PID or a command after `--`"),
    };
    let pid = traced.pid();

    let mut tracer = Tracer::load(&options)?;
    let readable_libc = process::in_root(pid, &libc)?;
    // A running target's memory map is read before it is told (by our "attached" line)
    // that it is traced: it may exit right after, and its stacks must still resolve.
    let mut resolver = Resolver::new(pid);
    if let Traced::Running { .. } = traced {
        resolver.refresh_map();
    }
    let attached = if args.no_libc {
        Ok(AttachSummary::default())
    } else {
        tracer.attach_libc(
            pid,
            if readable_libc.exists() {
                &readable_libc
            } else {
                &libc
            },
        )
    };
    let summary = match attached {
        Ok(summary) => summary,
        Err(e) if !process::exists(pid) => {
            // It left while we attached: say so, and show whatever was counted.
            let tgids = HashSet::from([pid]);
            let snapshot = read(&args, &mut tracer, &tgids)?;
            let mut symbolizer = Symbolizer::new();
            resolver.learn(&snapshot.stacks, &mut symbolizer);
            let report = report::process_report(
                &snapshot,
                &resolver,
                &symbolizer,
                Target { pid, command },
                0.0,
                options.sample_bytes,
            );
            print_final(&args, &report)?;
            return Err(e.context(format!("process {pid} exited while memtrace was attaching")));
        }
        Err(e) => return Err(e),
    };
    let cheap = summary.probes.iter().filter(|p| p.emulated).count();
    if args.no_libc {
        eprintln!("memtrace: no libc probes (--no-libc): native allocations are not traced");
    } else {
        eprintln!(
            "memtrace: attached {} probes to {} in pid {pid} ({cheap} on emulated instructions)",
            summary.probes.len(),
            libc.display(),
        );
    }
    if !summary.missing.is_empty() {
        log::info!(
            "{} lacks {}: not traced",
            libc.display(),
            summary.missing.join(", ")
        );
    }

    let python = match &program_path {
        Some(program) => PythonTarget::program(&mut tracer, pid, program, args.python),
        None => PythonTarget::running(&mut tracer, &mut resolver, pid, args.python, false),
    };

    install_interrupt_handler();
    if let Traced::Child(child) = &traced {
        child.resume();
    }
    trace(
        &args,
        &mut tracer,
        resolver,
        python,
        traced,
        command,
        options.sample_bytes,
    )
}

/// `top --tier growth`: no allocator probes, only the page faults of the target (so a
/// statically linked program or one without libc is fine).
fn run_growth(args: TopArgs, options: TracerOptions) -> Result<ExitCode> {
    let (traced, command) = match (&args.pid, args.command.split_first()) {
        (Some(pid), None) => {
            if !process::exists(*pid) {
                bail!("no process with pid {pid}");
            }
            (Traced::Running { pid: *pid }, process::command_line(*pid))
        }
        (None, Some((program, rest))) => {
            let program = process::find_program(program)?;
            launch::check_runnable(&program)?;
            (
                Traced::Child(TracedChild::spawn(&program, rest)?),
                args.command.join(" "),
            )
        }
        _ => bail!("give either --pid PID or a command after `--`"),
    };
    let pid = traced.pid();
    let mut tracer = Tracer::load(&options)?;
    tracer.enable_growth()?;
    tracer.watch_process(pid)?;
    let mut resolver = Resolver::new(pid);
    if let Traced::Running { .. } = traced {
        resolver.refresh_map();
    }
    eprintln!("memtrace: counting the page faults that populate new memory in pid {pid}");
    install_interrupt_handler();
    if let Traced::Child(child) = &traced {
        child.resume();
    }
    trace(&args, &mut tracer, resolver, None, traced, command, 1)
}

/// This run's numbers: allocator usage (exact tier) or page-fault growth.
fn read(args: &TopArgs, tracer: &mut Tracer, tgids: &HashSet<u32>) -> Result<Snapshot> {
    match args.tier {
        Tier::Exact => tracer.snapshot(tgids),
        Tier::Growth => tracer.growth_snapshot(|key| tgids.contains(&key.tgid)),
    }
}

fn install_interrupt_handler() {
    let handler = nix::sys::signal::SigHandler::Handler(on_interrupt);
    let action = nix::sys::signal::SigAction::new(
        handler,
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { nix::sys::signal::sigaction(signal, &action) };
    }
}

/// Reads the maps every interval until the target exits, the duration passes or the user
/// interrupts; prints the live table as it goes and the final report at the end.
fn trace(
    args: &TopArgs,
    tracer: &mut Tracer,
    mut resolver: Resolver,
    mut python: Option<PythonTarget>,
    traced: Traced,
    command: String,
    sample_bytes: u64,
) -> Result<ExitCode> {
    let pid = traced.pid();
    let tgids = HashSet::from([pid]);
    let mut symbolizer = Symbolizer::new();
    let started = Instant::now();
    let deadline = args
        .duration
        .map(|secs| started + Duration::from_secs_f64(secs));
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    let live = args.format == Format::Table && std::io::stdout().is_terminal();
    let mut next_refresh = started + interval;
    let mut next_learn = started;
    let mut exit_note = None;

    loop {
        if INTERRUPTED.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        // Until the interpreter is configured, look for it often: a launched program maps
        // libpython right after its exec, and its first Python code runs milliseconds
        // later (a short script would be over before a 100 ms tick).
        let python_pending = python.as_ref().is_some_and(|p| !p.is_configured())
            && started.elapsed() < PYTHON_EAGER_FOR;
        let tick = if python_pending { PYTHON_TICK } else { TICK };
        match &traced {
            Traced::Child(child) => match child.events.recv_timeout(tick) {
                Ok(ChildEvent::Exiting) => {
                    // Its address space is still there: resolve everything now.
                    resolver.refresh_map();
                    resolver.learn(&read(args, tracer, &tgids)?.stacks, &mut symbolizer);
                    child.resume();
                }
                Ok(ChildEvent::Exited(code)) => {
                    exit_note = Some(format!(
                        "{command} exited ({})",
                        launch::describe_exit(code)
                    ));
                    break;
                }
                Ok(ChildEvent::Failed(e)) => bail!("tracing the command failed: {e}"),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            },
            Traced::Running { .. } => {
                if !process::exists(pid) {
                    exit_note = Some(format!("pid {pid} exited"));
                    break;
                }
                std::thread::sleep(tick);
            }
        }
        if let Some(python) = python.as_mut().filter(|p| !p.is_configured()) {
            python.poll(tracer, &mut resolver);
        }
        // Python frames name code objects, read from the live process: learnt while it
        // runs, since by the time it exits the interpreter has torn its modules down.
        if python.as_ref().is_some_and(|p| p.is_configured()) && Instant::now() >= next_learn {
            next_learn = Instant::now() + PYTHON_LEARN_EVERY;
            resolver.learn(&read(args, tracer, &tgids)?.stacks, &mut symbolizer);
        }
        if Instant::now() >= next_refresh {
            next_refresh += interval;
            if let Err(e) = tracer.sweep_freed(false) {
                log::warn!("sweeping freed live-block entries: {e:#}");
            }
            let snapshot = read(args, tracer, &tgids)?;
            resolver.learn(&snapshot.stacks, &mut symbolizer);
            if args.format == Format::Table {
                let target = Target {
                    pid,
                    command: command.clone(),
                };
                let report = report::process_report(
                    &snapshot,
                    &resolver,
                    &symbolizer,
                    target,
                    started.elapsed().as_secs_f64(),
                    sample_bytes,
                );
                let mut out = std::io::stdout().lock();
                if live {
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                writeln!(out, "{}", report::table(&report, args.top.unwrap_or(10), 4))?;
            }
        }
    }

    let snapshot = read(args, tracer, &tgids)?;
    resolver.learn(&snapshot.stacks, &mut symbolizer);
    let mut report = report::process_report(
        &snapshot,
        &resolver,
        &symbolizer,
        Target { pid, command },
        started.elapsed().as_secs_f64(),
        sample_bytes,
    );
    if let Some(python) = &python {
        report.python = python.summary(tracer)?;
    }
    if let Some(note) = exit_note {
        eprintln!("memtrace: {note}");
    }
    if report.totals.dropped_events > 0 {
        eprintln!(
            "memtrace: {} events dropped ({:?}): numbers are incomplete; raise --max-allocations or --max-stacks",
            report.totals.dropped_events, report.totals.drops
        );
    }
    print_final(args, &report)?;
    drop(traced);
    Ok(ExitCode::SUCCESS)
}

fn print_final(args: &TopArgs, report: &report::Report) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let mut report = report.clone();
            if let Some(top) = args.top {
                report.stacks.truncate(top);
            }
            serde_json::to_writer_pretty(&mut out, &report).context("writing JSON")?;
            writeln!(out)?;
        }
        Format::Table => writeln!(out, "{}", report::table(report, args.top.unwrap_or(10), 8))?,
    }
    Ok(())
}
