//! Setting up Python support for one traced process: probes on its interpreter, the BPF
//! configuration once the interpreter is mapped, and Python frames in its reports.
use std::{collections::HashSet, path::Path};

use anyhow::Result;
use serde::Serialize;

use super::{PythonFile, PythonMode, find_for_program, find_in_process};
use crate::{report::Resolver, tracer::Tracer};

/// Python support of one process, pending until its interpreter is mapped.
pub struct PythonTarget {
    pid: u32,
    mode: PythonMode,
    file: Option<PythonFile>,
    configured: bool,
    /// Probes shared node-wide per interpreter file (the agent), else scoped to `pid`.
    shared: bool,
    /// Whether to attach the interpreter's probes at all (not for the always-on tier).
    probes: bool,
    /// Probed because the agent escalated its container: growth mode becomes exact where
    /// the interpreter allows it (see [`PythonFile::escalated_mode`]).
    escalated: bool,
}

/// What a report says about the Python side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PythonSummary {
    pub version: String,
    pub mode: String,
    pub gc: Vec<GcSummary>,
    /// Live blocks of the object allocator (exact mode only).
    pub live_objects: Option<i64>,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GcSummary {
    pub generation: u32,
    pub collections: u64,
    pub seconds: f64,
}

impl PythonTarget {
    /// A process already running: configured and probed now if it runs CPython. With
    /// `shared`, the interpreter's probes are shared by every traced process that maps the
    /// same file (needs a tracer that filters processes).
    pub fn running(
        tracer: &mut Tracer,
        resolver: &mut Resolver,
        pid: u32,
        mode: PythonMode,
        shared: bool,
    ) -> Option<Self> {
        Self::probed(tracer, resolver, pid, mode, shared, false)
    }

    /// A running process of a container the agent escalated (`--probes escalate`): like
    /// [`Self::running`] with probes of its own (as its libc's: no other process traps on
    /// them), except that growth mode becomes exact mode where the interpreter supports it. Escalation is the bounded
    /// investigation exact mode is for (a window, under the CPU budget), and only exact
    /// mode counts live objects.
    pub fn escalated(
        tracer: &mut Tracer,
        resolver: &mut Resolver,
        pid: u32,
        mode: PythonMode,
    ) -> Option<Self> {
        Self::probed(tracer, resolver, pid, mode, false, true)
    }

    fn probed(
        tracer: &mut Tracer,
        resolver: &mut Resolver,
        pid: u32,
        mode: PythonMode,
        shared: bool,
        escalated: bool,
    ) -> Option<Self> {
        if mode == PythonMode::Off {
            return None;
        }
        let mut target = Self {
            pid,
            mode,
            file: None,
            configured: false,
            shared,
            probes: true,
            escalated,
        };
        target.poll(tracer, resolver);
        target.configured.then_some(target)
    }

    /// A process already running, for the always-on tier: its Python frames are read at
    /// each stack walk (page faults too), and no probe is attached to its interpreter.
    pub fn frames_only(tracer: &mut Tracer, resolver: &mut Resolver, pid: u32) -> Option<Self> {
        let mut target = Self {
            pid,
            mode: PythonMode::Frames,
            file: None,
            configured: false,
            shared: false,
            probes: false,
            escalated: false,
        };
        target.poll(tracer, resolver);
        target.configured.then_some(target)
    }

    /// A program about to be started (stopped before exec): its interpreter's probes are
    /// attached now (they are per file), the frames configured by [`Self::poll`] once
    /// the process has mapped it.
    pub fn program(
        tracer: &mut Tracer,
        pid: u32,
        program: &Path,
        mode: PythonMode,
    ) -> Option<Self> {
        if mode == PythonMode::Off {
            return None;
        }
        let file = match find_for_program(program) {
            Ok(Some(file)) => file,
            Ok(None) => return None,
            Err(e) => {
                eprintln!("memtrace: {e:#}: Python frames are off, native stacks only");
                return None;
            }
        };
        attach_probes(tracer, pid, &file, mode, None);
        Some(Self {
            pid,
            mode,
            file: Some(file),
            configured: false,
            shared: false,
            probes: true,
            escalated: false,
        })
    }

    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// Configures the BPF side once the interpreter is mapped (cheap to call each tick).
    pub fn poll(&mut self, tracer: &mut Tracer, resolver: &mut Resolver) {
        if self.configured {
            return;
        }
        let found = match find_in_process(self.pid) {
            Ok(found) => found,
            Err(e) => {
                if self.file.is_none() {
                    eprintln!(
                        "memtrace: pid {}: {e:#}: Python frames are off, native stacks only",
                        self.pid
                    );
                    self.configured = true; // nothing more to try
                }
                return;
            }
        };
        let Some(found) = found else { return };
        let config = found.file.config(found.bias);
        if let Err(e) = tracer.set_python(self.pid, &config) {
            eprintln!("memtrace: pid {}: {e:#}: Python frames are off", self.pid);
            self.configured = true;
            return;
        }
        if self.file.is_none() && self.probes {
            if self.escalated {
                self.mode = found.file.escalated_mode(self.mode);
            }
            // Exact mode's probes are never shared: untraced processes mapping the same
            // file would trap on every object they allocate.
            let shared = (self.shared && self.mode != PythonMode::Exact).then_some(found.file_id);
            attach_probes(tracer, self.pid, &found.file, self.mode, shared);
        }
        resolver.set_python(found.file.layout, config.skip_code, &found.process_path);
        self.file = Some(found.file);
        self.configured = true;
    }

    /// GC statistics and live objects of this process, for its report.
    pub fn summary(&self, tracer: &Tracer) -> Result<Option<PythonSummary>> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let stats = tracer.python_stats(&HashSet::from([self.pid]))?;
        let mut summary = PythonSummary {
            version: file.version_string(),
            mode: format!("{:?}", self.mode).to_lowercase(),
            ..PythonSummary::default()
        };
        for (key, value) in &stats.gc {
            summary.gc.push(GcSummary {
                generation: key.generation,
                collections: value.count,
                seconds: value.duration_ns_sum as f64 / 1e9,
            });
        }
        summary.gc.sort_by_key(|g| g.generation);
        if self.mode == PythonMode::Exact {
            summary.live_objects = Some(stats.live_objects.iter().map(|(_, n)| n).sum());
        }
        for counter in memtrace_common::python::PyCounter::ALL {
            summary
                .counters
                .insert(counter.name(), stats.counters[counter as usize]);
        }
        Ok(Some(summary))
    }
}

/// Attaches the probes of `mode` to `file` (for `pid` alone, or shared per file),
/// saying in one line what is missing.
pub fn attach_probes(
    tracer: &mut Tracer,
    pid: u32,
    file: &PythonFile,
    mode: PythonMode,
    shared: Option<crate::process::FileId>,
) {
    if !file.supports(mode) {
        eprintln!(
            "memtrace: CPython {} ({}): {}",
            file.version_string(),
            file.path.display(),
            file.symbols_note
                .as_deref()
                .unwrap_or("pymalloc's functions not found: this mode is off")
        );
    }
    if mode == PythonMode::Exact && file.lto {
        eprintln!(
            "memtrace: CPython {} ({}) is built with LTO: pymalloc's fast path is inlined \
             into its callers, so exact mode misses most object allocations; growth mode \
             sees them all as pool refills",
            file.version_string(),
            file.path.display()
        );
    }
    let probes = file.probes(mode);
    let attached = match shared {
        Some(file_id) => tracer.attach_python_shared(pid, &file.path, file_id, &probes),
        None => tracer.attach_python(pid, &file.path, &probes),
    };
    match attached {
        Ok(attached) if attached.is_empty() && !probes.is_empty() => eprintln!(
            "memtrace: CPython {} in pid {pid}: Python frames on, sharing the probes already \
             on {}",
            file.version_string(),
            file.path.display()
        ),
        Ok(probes) => eprintln!(
            "memtrace: CPython {} in pid {pid}: Python frames on, {} probes on the \
             interpreter ({})",
            file.version_string(),
            probes.len(),
            probes
                .iter()
                .map(|p| p.symbol)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(e) => eprintln!(
            "memtrace: attaching to CPython {}: {e:#}",
            file.version_string()
        ),
    }
}
