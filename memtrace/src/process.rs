//! What memtrace learns about a traced process from `/proc`: whether it exists, its
//! command line, which libc it runs, and its memory map (cached, so that addresses can
//! still be resolved to files after the process has exited).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use procfs::{
    FromBufRead,
    process::{MMPermissions, MMapPath, MemoryMaps},
};

use crate::elf::ElfFile;

/// A file as the kernel knows it: the same (device, inode) is the same file, whatever
/// path each container sees it under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub device: (i32, i32),
    pub inode: u64,
}

/// One file-backed executable mapping of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// Path as the process sees it (inside its own root).
    pub path: PathBuf,
    pub file: FileId,
}

/// The file-backed mappings of a process, as last read from `/proc/PID/maps`.
#[derive(Clone, Debug, Default)]
pub struct MemoryMap {
    mappings: Vec<Mapping>,
}

impl MemoryMap {
    /// Reads `/proc/PID/maps`.
    pub fn read(pid: u32) -> Result<Self> {
        let text = std::fs::read(format!("/proc/{pid}/maps"))
            .with_context(|| format!("reading /proc/{pid}/maps"))?;
        Self::parse(&text).with_context(|| format!("parsing /proc/{pid}/maps"))
    }

    /// Parses the text of a `maps` file, keeping executable file mappings.
    pub fn parse(text: &[u8]) -> Result<Self> {
        let maps = MemoryMaps::from_buf_read(text)?;
        let mut mappings: Vec<Mapping> = maps
            .into_iter()
            .filter(|m| m.perms.contains(MMPermissions::EXECUTE) && m.inode != 0)
            .filter_map(|m| match m.pathname {
                MMapPath::Path(path) => Some(Mapping {
                    start: m.address.0,
                    end: m.address.1,
                    offset: m.offset,
                    path: strip_deleted(path),
                    file: FileId {
                        device: m.dev,
                        inode: m.inode,
                    },
                }),
                _ => None,
            })
            .collect();
        mappings.sort_by_key(|m| m.start);
        Ok(Self { mappings })
    }

    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// Every executable file mapping, by address.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let index = self
            .mappings
            .partition_point(|m| m.start <= addr)
            .checked_sub(1)?;
        let mapping = &self.mappings[index];
        (addr < mapping.end).then_some(mapping)
    }

    /// `addr` as (its mapping, offset in the mapped file).
    pub fn to_file_offset(&self, addr: u64) -> Option<(&Mapping, u64)> {
        let mapping = self.find(addr)?;
        Some((mapping, addr - mapping.start + mapping.offset))
    }

    /// The first mapped file whose name looks like a C library.
    pub fn libc(&self) -> Option<&Path> {
        self.libc_mapping().map(|m| m.path.as_path())
    }

    /// The executable mapping of the C library.
    pub fn libc_mapping(&self) -> Option<&Mapping> {
        self.mappings.iter().find(|m| is_libc(&m.path))
    }
}

/// The kernel marks unlinked files with a " (deleted)" suffix.
fn strip_deleted(path: PathBuf) -> PathBuf {
    match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(stripped) => PathBuf::from(stripped),
        None => path,
    }
}

/// glibc's `libc.so.6`, older `libc-2.x.so`, musl's `libc.musl-*.so.1`.
fn is_libc(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("libc.musl")
}

/// Whether a process with this pid exists now (a zombie does not count: it has exited,
/// and only waits for its parent to reap it).
pub fn exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|stat| !matches!(stat.state, 'Z' | 'X' | 'x'))
}

/// The command line of a process, space-joined (its comm name if that is unreadable).
pub fn command_line(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    if words.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default()
    } else {
        words.join(" ")
    }
}

/// A path inside the process's own root (its container's filesystem), seen from here,
/// with every symbolic link on the way resolved inside that root: see [`resolve_in_root`].
pub fn in_root(pid: u32, path: &Path) -> std::io::Result<PathBuf> {
    resolve_in_root(Path::new(&format!("/proc/{pid}/root")), path)
}

/// Most symbolic links followed for one path (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// `path` as the process whose root is `root` sees it, spelled from here as `root` plus
/// components that are not symbolic links.
///
/// The kernel, walking `/proc/PID/root/...`, would resolve an absolute link or a `..`
/// inside the container against *memtrace's* root: a container could point its libc at
/// any file of the host. So each link is read here and resolved against `root`, and `..`
/// stops at `root`, as `openat2(RESOLVE_IN_ROOT)` would. A component that does not exist
/// is kept as it is (opening the result then fails, naming it). A link swapped in between
/// this walk and the open is not caught here: callers that attach check the file's
/// identity against the process's maps.
pub fn resolve_in_root(root: &Path, path: &Path) -> std::io::Result<PathBuf> {
    use std::{collections::VecDeque, ffi::OsString, path::Component};
    fn parts(path: &Path) -> impl Iterator<Item = OsString> + '_ {
        path.components().filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
    }
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<OsString> = parts(path).collect();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = root.join(&resolved).join(&name);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(std::io::Error::other(format!(
                        "{}: more than {MAX_LINKS} symbolic links",
                        root.join(path.strip_prefix("/").unwrap_or(path)).display()
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for part in parts(&target).collect::<Vec<_>>().into_iter().rev() {
                    pending.push_front(part);
                }
            }
            _ => resolved.push(&name),
        }
    }
    Ok(root.join(resolved))
}

/// The device and inode of the file at `path`, as `/proc/PID/maps` names them.
pub fn file_id(path: &Path) -> std::io::Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    let dev = meta.dev();
    Ok(FileId {
        device: (libc::major(dev) as i32, libc::minor(dev) as i32),
        inode: meta.ino(),
    })
}

/// Whether `path` is the file the kernel knows as `file` (a mapping's device and inode).
pub fn is_file(path: &Path, file: FileId) -> std::io::Result<bool> {
    Ok(file_id(path)? == file)
}

/// The libc this program itself runs on.
pub fn own_libc() -> Result<PathBuf> {
    let maps = MemoryMap::read(std::process::id())?;
    maps.libc()
        .map(Path::to_owned)
        .context("memtrace's own process maps no libc")
}

/// Whether an ELF file has an allocator of its own: it defines `malloc` and `free`. So do a
/// statically linked program (its copy of the C library's) and one linked with an
/// allocator that replaces malloc (tcmalloc, jemalloc built unprefixed): their calls never
/// reach a shared libc's allocator, so that is not where to trace them.
pub fn defines_allocator(elf: &ElfFile) -> bool {
    elf.function("malloc").is_some() && elf.function("free").is_some()
}

/// The file whose allocator a program will use: the program itself if it has one of its
/// own ([`defines_allocator`]), else the libc it loads ([`libc_of_program`]).
pub fn allocator_of_program(program: &ElfFile) -> Result<PathBuf> {
    if defines_allocator(program) {
        return std::fs::canonicalize(program.path())
            .with_context(|| format!("resolving {}", program.path().display()));
    }
    libc_of_program(program)
}

/// The libc a dynamically linked program will load, as its own dynamic loader resolves
/// it (`ld.so --list`, what ldd does); memtrace's own libc if the loader cannot tell.
pub fn libc_of_program(program: &ElfFile) -> Result<PathBuf> {
    let Some(interpreter) = program.interpreter() else {
        bail!(
            "{} is statically linked and has no allocator of its own (no malloc and free): \
             nothing for memtrace's allocator probes",
            program.path().display()
        );
    };
    let listed = Command::new(interpreter)
        .arg("--list")
        .arg(program.path())
        .output();
    if let Ok(output) = listed
        && output.status.success()
    {
        let text = String::from_utf8_lossy(&output.stdout);
        for line in text.lines() {
            // "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)"
            if let Some((_, resolved)) = line.split_once("=> ") {
                let path = Path::new(resolved.split(" (").next().unwrap_or("").trim());
                if is_libc(path) && path.is_absolute() {
                    return Ok(path.to_owned());
                }
            }
        }
        bail!(
            "{} does not link a C library (its loader lists none)",
            program.path().display()
        );
    }
    log::debug!(
        "{} --list failed; assuming memtrace's own libc",
        interpreter.display()
    );
    own_libc()
}

/// The mapping of the file whose allocator a running process uses: its program's, if the
/// program has one of its own ([`defines_allocator`]), else its libc's; or a clear reason
/// why there is none.
pub fn allocator_of_running(pid: u32) -> Result<Mapping> {
    if pid == 0 || !exists(pid) {
        bail!("no such process: PID {pid}");
    }
    let maps = MemoryMap::read(pid)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let exe = strip_deleted(exe);
    if let Some(program) = maps.mappings().iter().find(|m| m.path == exe)
        && has_own_allocator(pid, program)
    {
        return Ok(program.clone());
    }
    if let Some(libc) = maps.libc_mapping() {
        return Ok(libc.clone());
    }
    bail!(
        "PID {pid} ({}) has no C library mapped and no allocator of its own (no malloc and \
         free): nothing for memtrace's allocator probes",
        exe.display()
    )
}

/// [`defines_allocator`] for a process's program file, remembered per file: the answer
/// never changes for a file, and reading a large program at every exec would be costly.
fn has_own_allocator(pid: u32, program: &Mapping) -> bool {
    use std::{collections::HashMap, sync::Mutex};
    static KNOWN: Mutex<Option<HashMap<FileId, bool>>> = Mutex::new(None);
    /// Distinct program files remembered (then forgotten all at once: a node runs fewer).
    const MAX_KNOWN: usize = 4096;
    if let Some(&known) = KNOWN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_default()
        .get(&program.file)
    {
        return known;
    }
    let Ok(path) = in_root(pid, &program.path) else {
        return false;
    };
    // Only the file the process maps (it may have been replaced on disk since).
    if !is_file(&path, program.file).unwrap_or(false) {
        return false;
    }
    let own = ElfFile::open(&path).is_ok_and(|elf| defines_allocator(&elf));
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    let known = known.get_or_insert_default();
    if known.len() >= MAX_KNOWN {
        known.clear();
    }
    known.insert(program.file, own);
    own
}

/// Finds `program` on `PATH` like a shell would, when it has no slash.
pub fn find_program(program: &str) -> Result<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return if path.is_file() {
            Ok(path)
        } else {
            bail!("{program}: no such file")
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{program}: command not found on PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234 /usr/bin/leaky
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234 /usr/bin/leaky
7f1c2a028000-7f1c2a1bd000 r-xp 00028000 fe:01 5678 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2a400000-7f1c2a401000 rw-p 00000000 00:00 0 [heap]
7f1c2a500000-7f1c2a501000 r-xp 00000000 fe:01 91 /tmp/my lib.so (deleted)
";

    #[test]
    fn parses_executable_file_mappings_only() {
        let map = MemoryMap::parse(MAPS.as_bytes()).unwrap();
        assert_eq!(map.mappings.len(), 3);
        assert_eq!(
            map.libc(),
            Some(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        let (mapping, offset) = map.to_file_offset(0x55d0c0a01010).unwrap();
        assert_eq!(
            (mapping.path.as_path(), offset),
            (Path::new("/usr/bin/leaky"), 0x1010)
        );
        assert_eq!(
            mapping.file,
            FileId {
                device: (0xfe, 1),
                inode: 1234
            }
        );
        assert_eq!(
            map.find(0x7f1c2a500000).unwrap().path,
            Path::new("/tmp/my lib.so")
        );
        assert!(
            map.find(0x7f1c2a400010).is_none(),
            "anonymous memory has no file"
        );
        assert!(map.find(0x1000).is_none());
    }

    #[test]
    fn malformed_maps_are_an_error() {
        assert!(MemoryMap::parse(b"zzzz-1000 r-xp nothex fe:01 1 /x\n").is_err());
    }

    #[test]
    fn recognises_libc_names() {
        assert!(is_libc(Path::new("/lib/libc.musl-x86_64.so.1")));
        assert!(is_libc(Path::new("/lib64/libc-2.17.so")));
        assert!(!is_libc(Path::new("/usr/lib/libcrypt.so.1")));
    }

    #[test]
    fn a_zombie_does_not_exist() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Not reaped yet: it turns into a zombie, which must not count as running.
        while exists(pid) {
            assert!(std::time::Instant::now() < deadline, "`true` never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "zombie still has /proc"
        );
        child.wait().unwrap();
        assert!(!exists(pid));
    }

    #[test]
    fn own_process_exists_and_has_a_command() {
        let pid = std::process::id();
        assert!(exists(pid));
        assert!(!command_line(pid).is_empty());
        assert!(own_libc().unwrap().is_file());
    }
}
