//! Turns a [`Snapshot`] into what users read: stacks with symbolized frames, sorted by
//! outstanding bytes, as JSON or as a table.
use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use memtrace_common::{COUNT_SCALE, Counter, ProcessKey};
use serde::Serialize;

use crate::{
    process::{self, FileId, MemoryMap},
    python::{Layout, code::CodeReader, merge},
    symbolize::Symbolizer,
    tracer::{Snapshot, StackUsage},
};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub target: Target,
    pub duration_secs: f64,
    pub sample_bytes: u64,
    pub totals: Totals,
    pub stacks: Vec<StackReport>,
    /// CPython processes: version, mode, garbage collections, live objects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<crate::python::session::PythonSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub pid: u32,
    pub command: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub allocated_bytes: u64,
    pub freed_bytes: u64,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    /// Allocation events counted (each one probe hit, or a pool refill in Python growth mode).
    pub allocations: u64,
    pub dropped_events: u64,
    pub unmatched_frees: u64,
    /// Each drop counter by reason (only those that are not zero).
    pub drops: HashMap<&'static str, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StackReport {
    /// Stable across runs for the same binaries: a hash of (file, offset) of each frame.
    pub stack_id: String,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub allocated_bytes: u64,
    pub frames: Vec<Frame>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Frame {
    pub function: Option<String>,
    pub module: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The return address in the process.
    pub address: String,
    /// The same address as an offset into `module`.
    pub offset: Option<String>,
}

impl Frame {
    /// `function (file:line)`, or `module+0xoffset` when there is no name.
    pub fn site(&self) -> String {
        match (&self.function, &self.file, self.line) {
            (Some(function), Some(file), Some(line)) => {
                let file = Path::new(file)
                    .file_name()
                    .map(|f| f.to_string_lossy())
                    .unwrap_or_default();
                format!("{function} ({file}:{line})")
            }
            (Some(function), _, _) => function.clone(),
            _ => format!(
                "{}+{}",
                self.module,
                self.offset.as_deref().unwrap_or(&self.address)
            ),
        }
    }
}

/// The site a stack is labelled with: its innermost Python frame when it has one (for a
/// Python program that is the line to look at; the native allocator under it is not), else
/// its innermost frame.
pub fn site(frames: &[Frame]) -> String {
    frames
        .iter()
        .find(|f| f.module == crate::python::merge::PYTHON_MODULE && f.function.is_some())
        .or(frames.first())
        .map(Frame::site)
        .unwrap_or_else(|| "[no stack]".into())
}

/// The frames of a stack as return addresses, innermost first, starting at the
/// allocator's caller.
pub fn return_addresses(stack: &StackUsage) -> Vec<u64> {
    stack
        .frames
        .iter()
        .copied()
        .take_while(|ip| *ip != 0)
        .collect()
}

/// Normalizes addresses of one process against its memory map, kept from while it was
/// alive so that stacks still resolve after it exits.
pub struct Resolver {
    pid: u32,
    map: MemoryMap,
    /// CPython processes: their code objects, and the interpreter's path as the process
    /// sees it.
    python: Option<(CodeReader, String)>,
    /// Stack ids whose code objects were checked (each once, when first seen).
    python_seen: std::collections::HashSet<u64>,
}

impl Resolver {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            map: MemoryMap::default(),
            python: None,
            python_seen: Default::default(),
        }
    }

    /// Puts this process's Python frames into its stacks: `interpreter` is the path of
    /// the interpreter's file as the process maps it.
    pub fn set_python(&mut self, layout: Layout, skip_code: [u64; 2], interpreter: &Path) {
        self.python = Some((
            CodeReader::new(self.pid, layout, skip_code),
            interpreter.display().to_string(),
        ));
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Re-reads the process's memory map now (kept as it was if the process is gone).
    /// A process may exit before the first report: read it as soon as it is known.
    pub fn refresh_map(&mut self) {
        if let Ok(map) = MemoryMap::read(self.pid)
            && !map.is_empty()
        {
            self.map = map;
        }
    }

    /// Symbolizes every address of this process's `stacks` not resolved yet. Re-reads
    /// the memory map when an address falls outside it (a library loaded late).
    pub fn learn<'a>(
        &mut self,
        stacks: impl IntoIterator<Item = &'a StackUsage>,
        symbolizer: &mut Symbolizer,
    ) {
        let stacks: Vec<&StackUsage> = stacks
            .into_iter()
            .filter(|s| s.key.tgid == self.pid)
            .collect();
        if let Some((reader, _)) = &mut self.python {
            // Code objects are read from the live process, once each; a new stack's are
            // checked to still be the ones cached (an address can be reused).
            for stack in stacks.iter().filter(|s| !s.python.is_empty()) {
                let new = self.python_seen.insert(stack.key.stack_id);
                for frame in &stack.python {
                    if new {
                        reader.revalidate(frame.code);
                    }
                    reader.learn(frame.code);
                }
            }
        }
        let addresses: Vec<u64> = stacks.into_iter().flat_map(return_addresses).collect();
        if self.map.is_empty() || addresses.iter().any(|a| self.map.find(*a).is_none()) {
            self.refresh_map();
        }
        let mut by_file: HashMap<FileId, (PathBuf, Vec<u64>)> = HashMap::new();
        for address in addresses {
            if let Some((mapping, offset)) = self.map.to_file_offset(address.saturating_sub(1)) {
                by_file
                    .entry(mapping.file)
                    .or_insert_with(|| (mapping.path.clone(), Vec::new()))
                    .1
                    .push(offset);
            }
        }
        let alive = process::exists(self.pid);
        for (file, (path, offsets)) in by_file {
            let readable = if alive {
                match process::in_root(self.pid, &path) {
                    Ok(readable) => readable,
                    Err(e) => {
                        log::debug!("not symbolizing {}: {e}", path.display());
                        continue;
                    }
                }
            } else {
                path
            };
            symbolizer.resolve(file, &readable, &offsets);
        }
    }

    /// The stack's id and frames, innermost first, from what [`Resolver::learn`] resolved.
    pub fn stack(&self, stack: &StackUsage, symbolizer: &Symbolizer) -> (String, Vec<Frame>) {
        let addresses = return_addresses(stack);
        let frames: Vec<Frame> = addresses
            .iter()
            .map(|a| self.frame(*a, symbolizer))
            .collect();
        if let Some((reader, interpreter)) = &self.python
            && !stack.python.is_empty()
        {
            let python = merge::python_frames(reader, &stack.python);
            let frames = merge::merge(frames, python, |f| f.module == *interpreter);
            return (merge::stack_id(&frames), frames);
        }
        (self.stack_id(&addresses), frames)
    }

    fn frame(&self, address: u64, symbolizer: &Symbolizer) -> Frame {
        // Return addresses point after the call: symbolize the call instruction.
        let located = self.map.to_file_offset(address.saturating_sub(1));
        let symbol = located.and_then(|(mapping, offset)| symbolizer.get(mapping.file, offset));
        Frame {
            function: symbol.and_then(|s| s.function.clone()),
            module: located
                .map(|(mapping, _)| mapping.path.display().to_string())
                .unwrap_or_else(|| "[unknown]".into()),
            file: symbol.and_then(|s| s.file.clone()),
            line: symbol.and_then(|s| s.line),
            address: format!("{address:#x}"),
            offset: self
                .map
                .to_file_offset(address)
                .map(|(_, offset)| format!("{offset:#x}")),
        }
    }

    fn stack_id(&self, addresses: &[u64]) -> String {
        // FNV-1a over (file, offset) of each frame: the same code gives the same id, in
        // every process and every run.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |bytes: &[u8]| {
            for byte in bytes {
                hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for address in addresses {
            match self.map.to_file_offset(*address) {
                Some((mapping, offset)) => {
                    mix(mapping.path.as_os_str().as_encoded_bytes());
                    mix(&offset.to_le_bytes());
                }
                None => mix(&address.to_le_bytes()),
            }
        }
        format!("{hash:016x}")
    }
}

/// The report of one process's `snapshot` (already passed through [`Resolver::learn`]).
pub fn process_report(
    snapshot: &Snapshot,
    resolver: &Resolver,
    symbolizer: &Symbolizer,
    target: Target,
    duration_secs: f64,
    sample_bytes: u64,
) -> Report {
    // One process may have allocated from several cgroups: merge per stack.
    let mut merged: HashMap<String, StackReport> = HashMap::new();
    for stack in snapshot
        .stacks
        .iter()
        .filter(|s| s.key.tgid == resolver.pid())
    {
        let (stack_id, frames) = resolver.stack(stack, symbolizer);
        let entry = merged
            .entry(stack_id.clone())
            .or_insert_with(|| StackReport {
                stack_id,
                outstanding_bytes: 0,
                outstanding_allocations: 0,
                allocated_bytes: 0,
                frames,
            });
        entry.outstanding_bytes += stack.usage.outstanding_bytes.max(0) as u64;
        entry.outstanding_allocations += scaled_count(stack.usage.outstanding_count);
        entry.allocated_bytes += stack.usage.allocated_bytes;
    }
    let mut stacks: Vec<StackReport> = merged.into_values().collect();
    stacks.sort_by(|a, b| {
        (b.outstanding_bytes, b.allocated_bytes, &a.stack_id).cmp(&(
            a.outstanding_bytes,
            a.allocated_bytes,
            &b.stack_id,
        ))
    });
    let totals = totals(snapshot, |key| key.tgid == resolver.pid());
    Report {
        target,
        duration_secs,
        sample_bytes,
        totals,
        stacks,
        python: None,
    }
}

/// Sums the exact per-process totals that `keep` selects, and the drop counters.
pub fn totals(snapshot: &Snapshot, keep: impl Fn(&ProcessKey) -> bool) -> Totals {
    let mut totals = Totals::default();
    let mut outstanding: i64 = 0;
    let mut count: i64 = 0;
    for (_, t) in snapshot.totals.iter().filter(|(key, _)| keep(key)) {
        totals.allocated_bytes += t.allocated_bytes;
        totals.freed_bytes += t.freed_bytes;
        totals.unmatched_frees += t.unmatched_frees;
        totals.allocations += t.allocations;
        outstanding += t.outstanding_bytes;
        count += t.outstanding_count;
    }
    totals.outstanding_bytes = outstanding.max(0) as u64;
    totals.outstanding_allocations = count.max(0) as u64;
    for counter in Counter::ALL.into_iter().filter(|c| c.is_drop()) {
        let value = snapshot.counters[counter as usize];
        totals.dropped_events += value;
        if value > 0 {
            totals.drops.insert(counter.name(), value);
        }
    }
    totals
}

/// Counts are kept in 1/COUNT_SCALE units (sampled estimates); round to whole blocks.
pub fn scaled_count(count: i64) -> u64 {
    (count.max(0) as u64 + COUNT_SCALE / 2) / COUNT_SCALE
}

/// `1.5 MiB`-style sizes for the table.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The table view: a header line, then the top `limit` stacks with up to `depth` frames.
pub fn table(report: &Report, limit: usize, depth: usize) -> String {
    let mut out = String::new();
    let t = &report.totals;
    let _ = writeln!(
        out,
        "memtrace: pid {} ({}) {:.1}s  outstanding {} in {} allocations  allocated {}  freed {}  \
         unmatched frees {}  dropped {}",
        report.target.pid,
        report.target.command,
        report.duration_secs,
        human_bytes(t.outstanding_bytes),
        t.outstanding_allocations,
        human_bytes(t.allocated_bytes),
        human_bytes(t.freed_bytes),
        t.unmatched_frees,
        t.dropped_events,
    );
    if report.sample_bytes > 1 {
        let _ = writeln!(
            out,
            "(sampled: 1 byte in {}; per-stack numbers are estimates)",
            report.sample_bytes
        );
    }
    let _ = writeln!(
        out,
        "{:>12} {:>9} {:>12}  STACK",
        "OUTSTANDING", "ALLOCS", "ALLOCATED"
    );
    for stack in report.stacks.iter().take(limit) {
        let mut frames = stack.frames.iter();
        let first = frames
            .next()
            .map(Frame::site)
            .unwrap_or_else(|| "[no stack]".into());
        let _ = writeln!(
            out,
            "{:>12} {:>9} {:>12}  {first}",
            human_bytes(stack.outstanding_bytes),
            stack.outstanding_allocations,
            human_bytes(stack.allocated_bytes),
        );
        for frame in frames.take(depth.saturating_sub(1)) {
            let _ = writeln!(out, "{:>36}  ← {}", "", frame.site());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use memtrace_common::UsageKey;

    #[test]
    fn frames_end_at_the_first_zero() {
        let stack = StackUsage {
            key: UsageKey {
                cgroup_id: 1,
                tgid: 1,
                _pad: 0,
                stack_id: 7,
            },
            usage: Default::default(),
            frames: vec![0x10, 0x20, 0, 0x30],
            python: Vec::new(),
        };
        assert_eq!(return_addresses(&stack), vec![0x10, 0x20]);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn sampled_counts_round_to_whole_blocks() {
        assert_eq!(scaled_count(2_600), 3);
        assert_eq!(scaled_count(-5), 0);
    }

    #[test]
    fn sites_fall_back_to_module_and_address() {
        let frame = Frame {
            function: None,
            module: "/lib/x.so".into(),
            file: None,
            line: None,
            address: "0x7f0000001234".into(),
            offset: Some("0x1234".into()),
        };
        assert_eq!(frame.site(), "/lib/x.so+0x1234");
        let named = Frame {
            function: Some("leak".into()),
            file: Some("/src/a.c".into()),
            line: Some(3),
            ..frame
        };
        assert_eq!(named.site(), "leak (a.c:3)");
    }
}
