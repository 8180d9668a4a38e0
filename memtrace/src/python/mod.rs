//! CPython support: finding the interpreter in a process, what the BPF side needs to walk
//! its frames, which of its functions to probe, and Python frames in reported stacks.
//!
//! The interpreter is the ELF object that defines `_PyRuntime` (a shared libpython, or a
//! statically linked `python3`). Its version comes from `Py_Version` in the file, and the
//! offsets from [`layout`]. Frames are read in BPF at each walked stack (see
//! `memtrace-ebpf/src/python.rs`) as (code object, instruction offset); [`code`] turns them
//! into function, file and line, and [`merge`] puts them where the evaluation loop's
//! native frames were.
pub mod agent;
pub mod code;
pub mod layout;
pub mod merge;
pub mod session;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use memtrace_common::python::{NO_FIELD, PyConfig};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use crate::process::{self, MemoryMap};
pub use layout::Layout;

/// How much of the Python allocator memtrace probes (libc's allocator is always traced).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PythonMode {
    /// No Python support: native stacks only.
    Off,
    /// Python frames in stacks, and garbage-collector statistics; no pymalloc probe.
    Frames,
    /// Also pymalloc's pool refills: each is a pool of growth at the Python stack that
    /// needed it. One trap per pool, not per object: cheap enough to leave on.
    Growth,
    /// Also every `_PyObject_Malloc/Calloc/Realloc/Free`: exact, a trap per object. For
    /// bounded investigations.
    Exact,
}

/// [`PythonFile::escalated_mode`], given whether exact mode works on the interpreter.
fn escalated_mode(configured: PythonMode, exact_works: bool) -> PythonMode {
    match configured {
        PythonMode::Growth if exact_works => PythonMode::Exact,
        mode => mode,
    }
}

/// The name of the evaluation loop's native frame, which Python frames replace.
pub const EVAL_FUNCTION: &str = "_PyEval_EvalFrameDefault";

/// One probe on the interpreter.
#[derive(Clone, Debug)]
pub struct PythonProbe {
    pub symbol: &'static str,
    /// File offset of the function in the interpreter's file.
    pub file_offset: u64,
    /// Its first bytes, for probe placement.
    pub code: Vec<u8>,
    pub entry: &'static str,
    /// The return program, if any.
    pub exit: Option<&'static str>,
}

/// An interpreter file: its version, layout, and where its symbols are.
#[derive(Clone, Debug)]
pub struct PythonFile {
    /// Readable path (through the process's root).
    pub path: PathBuf,
    pub version: (u8, u8, u8),
    pub layout: Layout,
    runtime: u64,
    skip_code: [u64; 2],
    /// Every function we may probe (and pymalloc's `usable_arenas` in 3.11).
    functions: HashMap<&'static str, Symbol>,
    /// Where the functions of growth and exact mode came from, or why they are missing.
    pub symbols_note: Option<String>,
    /// Built with LTO (local functions renamed `.lto_priv.N`): pymalloc's fast path is
    /// inlined into its callers, so exact mode misses most allocations.
    pub lto: bool,
    /// Loadable segments: (virtual address, file offset, file size).
    segments: Vec<(u64, u64, u64)>,
}

/// A symbol of the interpreter's file.
#[derive(Clone, Debug)]
struct Symbol {
    vaddr: u64,
    file_offset: u64,
    /// First bytes (functions), for probe placement.
    code: Vec<u8>,
}

/// pymalloc's pool size in 3.11–3.13 on 64-bit builds (radix tree, `USE_LARGE_POOLS`).
const POOL_BYTES: u64 = 16 * 1024;

/// Functions probed per mode (name without any `.lto_priv.N` suffix).
const EXACT_FUNCTIONS: [&str; 4] = [
    "_PyObject_Malloc",
    "_PyObject_Calloc",
    "_PyObject_Realloc",
    "_PyObject_Free",
];
const POOL_FUNCTION: &str = "allocate_from_new_pool";
const GC_FUNCTION: &str = "gc_collect_main";
/// 3.11 keeps pymalloc's arena list in this static; 3.12+ in the state passed to
/// `allocate_from_new_pool`.
const USABLE_ARENAS: &str = "usable_arenas";

impl PythonFile {
    /// Reads `path` if it is a CPython interpreter (defines `_PyRuntime`); `Ok(None)` if not.
    pub fn open(path: &Path) -> Result<Option<Self>> {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let file =
            object::File::parse(&*data).with_context(|| format!("parsing {}", path.display()))?;
        let mut symbols: HashMap<String, (u64, u64)> = HashMap::new();
        for symbol in file.dynamic_symbols().chain(file.symbols()) {
            if let Ok(name) = symbol.name() {
                symbols
                    .entry(name.to_owned())
                    .or_insert((symbol.address(), symbol.size()));
            }
        }
        let Some(&(runtime, _)) = symbols.get("_PyRuntime") else {
            return Ok(None);
        };
        let segments: Vec<(u64, u64, u64, u64)> = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (s.address(), s.size(), offset, size)
            })
            .collect();
        let file_bytes = |vaddr: u64, len: u64| -> Option<&[u8]> {
            let (start, _, offset, size) = segments
                .iter()
                .find(|(start, _, _, size)| vaddr >= *start && vaddr - start < *size)?;
            let at = offset + (vaddr - start);
            let end = (at + len).min(offset + size);
            data.get(at as usize..end as usize)
        };
        let to_offset = |vaddr: u64| -> Option<u64> {
            let (start, _, offset, _) = segments
                .iter()
                .find(|(start, size, _, _)| vaddr >= *start && vaddr - start < *size)?;
            Some(offset + (vaddr - start))
        };
        let version = match symbols
            .get("Py_Version")
            .and_then(|(a, _)| file_bytes(*a, 4))
        {
            Some(b) if b.len() == 4 => u32::from_le_bytes(b.try_into().expect("4 bytes")),
            _ => bail!(
                "{} defines _PyRuntime but no Py_Version: CPython older than 3.11",
                path.display()
            ),
        };
        let version = (
            (version >> 24) as u8,
            (version >> 16) as u8,
            (version >> 8) as u8,
        );
        let layout = layout::for_version(version.0, version.1, file_bytes(runtime, 600))?;
        layout.check()?;

        // Probed functions: this file's symbols, else its separate debug file's.
        let mut functions = HashMap::new();
        let mut wanted: Vec<&'static str> = EXACT_FUNCTIONS.to_vec();
        wanted.extend([POOL_FUNCTION, GC_FUNCTION, USABLE_ARENAS]);
        let mut note = None;
        let lookup = |symbols: &HashMap<String, (u64, u64)>,
                      functions: &mut HashMap<&'static str, Symbol>| {
            for name in &wanted {
                if functions.contains_key(name) {
                    continue;
                }
                let found = symbols.get(*name).copied().or_else(|| {
                    // LTO renames local functions `name.lto_priv.N`.
                    symbols
                        .iter()
                        .find(|(n, _)| {
                            n.strip_prefix(name)
                                .and_then(|rest| rest.strip_prefix(".lto_priv."))
                                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                        })
                        .map(|(_, v)| *v)
                });
                if let Some((vaddr, size)) = found
                    && vaddr != 0
                    && let Some(offset) = to_offset(vaddr)
                {
                    let code = file_bytes(vaddr, size.clamp(1, 4096))
                        .unwrap_or(&[])
                        .to_vec();
                    functions.insert(
                        *name,
                        Symbol {
                            vaddr,
                            file_offset: offset,
                            code,
                        },
                    );
                }
            }
        };
        lookup(&symbols, &mut functions);
        if !functions.contains_key(POOL_FUNCTION) {
            match debug_file(path, &file) {
                Some(debug) => {
                    let debug_symbols = read_symbols(&debug).unwrap_or_default();
                    lookup(&debug_symbols, &mut functions);
                    note = Some(format!("symbols from {}", debug.display()));
                }
                None => {
                    note = Some(format!(
                        "{} has no symbol for pymalloc's slow paths and no debug file \
                         (Debian: apt install python{}.{}-dbg): growth mode and exact mode \
                         are off",
                        path.display(),
                        version.0,
                        version.1
                    ))
                }
            }
        }
        if version.1 == 11
            && !functions.contains_key(USABLE_ARENAS)
            && let Some(pool) = functions.get(POOL_FUNCTION)
            && let Some(vaddr) = first_rip_load(&pool.code, pool.vaddr)
        {
            // LTO builds (Debian's) drop the static's symbol; the refill reads it first.
            functions.insert(
                USABLE_ARENAS,
                Symbol {
                    vaddr,
                    file_offset: 0,
                    code: Vec::new(),
                },
            );
        }
        let lto = functions.contains_key(POOL_FUNCTION)
            && !symbols.contains_key(POOL_FUNCTION)
            && note
                .as_deref()
                .is_some_and(|n| n.starts_with("symbols from"));
        let address = |name: &str| symbols.get(name).map(|(a, _)| *a).unwrap_or(0);
        // 3.13: shim frames hold `Py_None`; class calls push a `_Py_InitCleanup` frame.
        let skip_code = if version.1 >= 13 {
            [address("_Py_NoneStruct"), address("_Py_InitCleanup")]
        } else {
            [0, 0]
        };
        Ok(Some(Self {
            path: path.to_owned(),
            version,
            layout,
            runtime,
            skip_code,
            functions,
            symbols_note: note,
            lto,
            segments: segments.iter().map(|(a, _, o, s)| (*a, *o, *s)).collect(),
        }))
    }

    pub fn version_string(&self) -> String {
        format!("{}.{}.{}", self.version.0, self.version.1, self.version.2)
    }

    /// The probes of `mode` this file has (missing ones are left out).
    pub fn probes(&self, mode: PythonMode) -> Vec<PythonProbe> {
        let mut wanted: Vec<(&'static str, &'static str, Option<&'static str>)> = Vec::new();
        if mode == PythonMode::Off {
            return Vec::new();
        }
        wanted.push((GC_FUNCTION, "py_gc_enter", Some("py_gc_exit")));
        match mode {
            PythonMode::Exact => {
                wanted.push(("_PyObject_Malloc", "py_malloc_enter", Some("alloc_exit")));
                wanted.push(("_PyObject_Calloc", "py_calloc_enter", Some("alloc_exit")));
                wanted.push(("_PyObject_Realloc", "py_realloc_enter", Some("alloc_exit")));
                wanted.push(("_PyObject_Free", "py_free_enter", Some("alloc_exit")));
            }
            PythonMode::Growth => {
                wanted.push((POOL_FUNCTION, "py_pool_refill_enter", Some("alloc_exit")));
            }
            _ => {}
        }
        wanted
            .into_iter()
            .filter_map(|(symbol, entry, exit)| {
                let found = self.functions.get(symbol)?;
                Some(PythonProbe {
                    symbol,
                    file_offset: found.file_offset,
                    code: found.code.clone(),
                    entry,
                    exit,
                })
            })
            .collect()
    }

    /// The mode a process on this interpreter gets while the agent has its container
    /// escalated, `--python` being `configured`: growth becomes exact, whose probes see
    /// every object (live objects, exact bytes per Python line), unless this file lacks
    /// exact mode's functions or is built with LTO (exact mode would miss most objects
    /// there; growth mode's pool refills see them all).
    pub fn escalated_mode(&self, configured: PythonMode) -> PythonMode {
        escalated_mode(configured, self.supports(PythonMode::Exact) && !self.lto)
    }

    /// Whether `mode` has everything it needs in this file.
    pub fn supports(&self, mode: PythonMode) -> bool {
        match mode {
            PythonMode::Exact => EXACT_FUNCTIONS
                .iter()
                .all(|f| self.functions.contains_key(f)),
            PythonMode::Growth => {
                self.functions.contains_key(POOL_FUNCTION)
                    && (self.layout.usable_arenas_in_state.is_some()
                        || self.functions.contains_key(USABLE_ARENAS))
            }
            _ => true,
        }
    }

    /// The BPF configuration for a process that maps this file with load bias `bias`.
    pub fn config(&self, bias: u64) -> PyConfig {
        let l = &self.layout;
        let mut config = PyConfig {
            runtime: bias + self.runtime,
            pool_bytes: POOL_BYTES,
            interp_main: l.interp_main,
            threads_head: l.threads_head,
            thread_next: l.thread_next,
            native_thread_id: l.native_thread_id,
            frame_code: l.frame_code,
            frame_previous: l.frame_previous,
            frame_instr: l.frame_instr,
            frame_owner: l.frame_owner.unwrap_or(NO_FIELD),
            owner_cstack: l.owner_cstack.unwrap_or(NO_FIELD),
            frame_is_entry: l.frame_is_entry.unwrap_or(NO_FIELD),
            ..PyConfig::default()
        };
        for (i, hop) in l
            .tstate_hops
            .iter()
            .enumerate()
            .take(config.tstate_hops.len())
        {
            config.tstate_hops[i] = *hop;
        }
        config.tstate_hop_count = l.tstate_hops.len() as u32;
        for (i, hop) in l.frame_hops.iter().enumerate().take(2) {
            config.frame_hops[i] = *hop;
        }
        config.frame_hop_count = l.frame_hops.len() as u32;
        config.usable_arenas_in_state = l.usable_arenas_in_state.unwrap_or(NO_FIELD);
        config.arena_freepools = l.arena_freepools;
        config.pool_size_arg = l.pool_size_arg;
        config.pool_szidx = l.pool_szidx;
        if let Some(arenas) = self.functions.get(USABLE_ARENAS) {
            config.usable_arenas = bias + arenas.vaddr;
        }
        for (i, address) in self.skip_code.iter().enumerate() {
            if *address != 0 {
                config.skip_code[i] = bias + address;
            }
        }
        config
    }
}

/// The address of the first `mov reg, [rip + disp]` (a 64-bit load of a static) in
/// `code`, which starts at virtual address `ip`.
fn first_rip_load(code: &[u8], ip: u64) -> Option<u64> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    for instruction in decoder.iter().take(16) {
        if instruction.mnemonic() == Mnemonic::Mov
            && instruction.op_count() == 2
            && instruction.op0_kind() == OpKind::Register
            && instruction.op1_kind() == OpKind::Memory
            && instruction.memory_base() == Register::RIP
            && instruction.op0_register().size() == 8
        {
            return Some(instruction.ip_rel_memory_address());
        }
    }
    None
}

fn read_symbols(path: &Path) -> Result<HashMap<String, (u64, u64)>> {
    let data = std::fs::read(path)?;
    let file = object::File::parse(&*data)?;
    Ok(file
        .symbols()
        .filter_map(|s| Some((s.name().ok()?.to_owned(), (s.address(), s.size()))))
        .collect())
}

/// The separate debug file of `path`: by build id under `/usr/lib/debug/.build-id`, or
/// by `.gnu_debuglink` next to it or under `/usr/lib/debug`. Looked up in the same root
/// as `path` (a `/proc/PID/root/...` path stays in that container).
fn debug_file(path: &Path, file: &object::File) -> Option<PathBuf> {
    let path_str = path.to_string_lossy();
    let root = match path_str.find("/root/") {
        Some(i) if path_str.starts_with("/proc/") => PathBuf::from(&path_str[..i + 5]),
        _ => PathBuf::from("/"),
    };
    let debug_dir = root.join("usr/lib/debug");
    let mut candidates = Vec::new();
    if let Ok(Some(id)) = file.build_id()
        && id.len() > 1
    {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        candidates.push(debug_dir.join(format!(".build-id/{}/{}.debug", &hex[..2], &hex[2..])));
    }
    if let Some(section) = file.section_by_name(".gnu_debuglink")
        && let Ok(bytes) = section.data()
        && let Some(name) = bytes.split(|b| *b == 0).next()
    {
        let name = String::from_utf8_lossy(name).into_owned();
        if let Some(dir) = path.parent() {
            candidates.push(dir.join(&name));
            candidates.push(dir.join(".debug").join(&name));
        }
        candidates.push(debug_dir.join(&name));
    }
    candidates.into_iter().find(|c| c.is_file())
}

/// An interpreter found in a running process.
pub struct FoundPython {
    pub file: PythonFile,
    /// Runtime address = bias + virtual address in the file.
    pub bias: u64,
    /// The file's path as the process sees it.
    pub process_path: PathBuf,
    /// The file as the kernel knows it (probes are shared per file in the agent).
    pub file_id: crate::process::FileId,
}

/// The interpreter mapped by running process `pid`; `Ok(None)` when the process runs no
/// CPython (or not yet: a shared libpython maps after exec).
pub fn find_in_process(pid: u32) -> Result<Option<FoundPython>> {
    let map = MemoryMap::read(pid)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let mut seen = Vec::new();
    for mapping in map.mappings() {
        if seen.contains(&mapping.file) {
            continue;
        }
        seen.push(mapping.file);
        let name = mapping
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let candidate = name.starts_with("libpython3")
            || exe.as_deref() == Some(mapping.path.as_path()) && name.starts_with("python3");
        if !candidate {
            continue;
        }
        let readable = process::in_root(pid, &mapping.path)?;
        let Some(python) = open_cached(&readable, mapping.file)? else {
            continue;
        };
        let bias = python.load_bias(mapping.start, mapping.offset)?;
        let mut python = python;
        if python.version.1 >= 13 {
            // The live `_Py_DebugOffsets` (the file's copy is the same bytes: it is
            // statically initialised; the process's is the authority).
            let mut bytes = vec![0; 600];
            let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
            std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, bias + python.runtime)
                .with_context(|| format!("reading _Py_DebugOffsets of pid {pid}"))?;
            python.layout = layout::for_version(python.version.0, python.version.1, Some(&bytes))?;
            python.layout.check()?;
        }
        return Ok(Some(FoundPython {
            file: python,
            bias,
            process_path: mapping.path.clone(),
            file_id: mapping.file,
        }));
    }
    Ok(None)
}

/// [`PythonFile::open`], once per file (device, inode) for the life of memtrace: the agent
/// meets the same libpython in every worker process, and reading it costs tens of MB.
fn open_cached(path: &Path, file: crate::process::FileId) -> Result<Option<PythonFile>> {
    type Cache = HashMap<crate::process::FileId, Result<Option<PythonFile>, String>>;
    static CACHE: std::sync::OnceLock<std::sync::Mutex<Cache>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(found) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&file) {
        let mut found = found.clone().map_err(anyhow::Error::msg)?;
        if let Some(python) = &mut found {
            python.path = path.to_owned(); // this process's view of it
        }
        return Ok(found);
    }
    let opened = PythonFile::open(path).map_err(|e| format!("{e:#}"));
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(file, opened.clone());
    opened.map_err(anyhow::Error::msg)
}

impl PythonFile {
    /// The load bias when the file's bytes from `file_offset` are mapped at `start`:
    /// runtime address = bias + virtual address.
    fn load_bias(&self, start: u64, file_offset: u64) -> Result<u64> {
        for (vaddr, offset, size) in &self.segments {
            if file_offset >= *offset && file_offset < offset + (*size).max(1) {
                return Ok(start.wrapping_sub(vaddr + (file_offset - offset)));
            }
        }
        bail!(
            "{}: no segment holds offset {file_offset:#x}",
            self.path.display()
        )
    }
}

/// The interpreter a program will run on before it starts: the program itself (a static
/// `python3`), or a `libpython3*` its dynamic loader resolves.
pub fn find_for_program(program: &Path) -> Result<Option<PythonFile>> {
    // Through the cache the launched process's first look will hit: parsing libpython
    // takes ~0.15 s, time in which a short script would run without its Python frames.
    let open = |path: &Path| -> Result<Option<PythonFile>> {
        let file =
            crate::process::file_id(path).with_context(|| format!("reading {}", path.display()))?;
        open_cached(path, file)
    };
    if let Some(python) = open(program)? {
        return Ok(Some(python));
    }
    let elf = crate::elf::ElfFile::open(program)?;
    let Some(interpreter) = elf.interpreter() else {
        return Ok(None);
    };
    let Ok(output) = std::process::Command::new(interpreter)
        .arg("--list")
        .arg(program)
        .output()
    else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&output.stdout);
    for line in text.lines() {
        if let Some((name, resolved)) = line.trim().split_once(" => ")
            && name.starts_with("libpython3")
        {
            let path = Path::new(resolved.split(" (").next().unwrap_or("").trim());
            if path.is_absolute() {
                return open(path);
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalation_brings_exact_mode_where_it_works() {
        assert_eq!(escalated_mode(PythonMode::Growth, true), PythonMode::Exact);
        // LTO builds or missing symbols: growth's pool refills are all there is.
        assert_eq!(
            escalated_mode(PythonMode::Growth, false),
            PythonMode::Growth
        );
        // An explicit choice below growth, or exact itself, stays.
        for mode in [PythonMode::Off, PythonMode::Frames, PythonMode::Exact] {
            assert_eq!(escalated_mode(mode, true), mode);
            assert_eq!(escalated_mode(mode, false), mode);
        }
    }
}
