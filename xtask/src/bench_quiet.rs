//! Other tracers on this shared machine. A uprobe that someone else put on libc's allocator
//! for every process (memtrace's agent shares its probes per libc file; bpftrace's and bcc's
//! probes are system-wide too) traps in every process, this benchmark's "untraced" runs
//! included, and makes its numbers meaningless. The kernel writes a breakpoint into each
//! process's copy of a probed page, so comparing this process's libc code with the file's
//! bytes shows such probes. Each part waits (bounded) for them to go, and a part that ran
//! with them says so in its table.
use std::{
    ffi::CString,
    fs::File,
    io::{Read, Seek, SeekFrom},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// The functions every part's workload calls, and how many of their first bytes to compare
/// (memtrace's placement looks at most 48 bytes in).
const FUNCTIONS: &[&str] = &["malloc", "free", "calloc", "realloc"];
const BYTES: usize = 48;
/// How long a part waits for foreign probes to go before it runs anyway.
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_secs(2);

/// `function+offset` of every byte of libc's allocator that differs from the file here.
pub(crate) fn foreign_probes() -> Result<Vec<String>> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut found = Vec::new();
    for name in FUNCTIONS {
        let symbol = CString::new(*name).expect("no NUL");
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name has no preconditions.
        let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, symbol.as_ptr()) } as u64;
        if address == 0 {
            continue;
        }
        let (path, file_offset) = file_offset_of(&maps, address)
            .with_context(|| format!("{name} at {address:#x} is in no file mapping"))?;
        let mut on_disk = [0u8; BYTES];
        let mut file = File::open(&path).with_context(|| format!("opening {path}"))?;
        file.seek(SeekFrom::Start(file_offset))?;
        file.read_exact(&mut on_disk)?;
        // SAFETY: the function's code, mapped readable and executable; BYTES bytes from a
        // function start stay inside libc's text.
        let in_memory = unsafe { std::slice::from_raw_parts(address as *const u8, BYTES) };
        found.extend(
            in_memory
                .iter()
                .zip(on_disk)
                .enumerate()
                .filter(|(_, (memory, disk))| **memory != *disk)
                .map(|(offset, _)| format!("{name}+{offset}")),
        );
    }
    Ok(found)
}

/// The file and file offset that `address` maps, from `/proc/self/maps` text.
fn file_offset_of(maps: &str, address: u64) -> Option<(String, u64)> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        );
        let _permissions = fields.next()?;
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let (_device, _inode) = (fields.next()?, fields.next()?);
        let path = fields.next()?;
        (start <= address && address < end && path.starts_with('/'))
            .then(|| (path.to_owned(), address - start + offset))
    })
}

/// Waits (bounded) until no foreign probe is on libc's allocator. `None` when there is
/// none; else a note for the part's table.
pub(crate) fn wait_until_quiet(part: &str) -> Result<Option<String>> {
    let deadline = Instant::now() + WAIT;
    let mut said = false;
    loop {
        let probes = foreign_probes()?;
        if probes.is_empty() {
            return Ok(None);
        }
        if Instant::now() >= deadline {
            println!(
                "xtask: {part}: running with foreign uprobes at {}",
                probes.join(", ")
            );
            return Ok(Some(note(&probes)));
        }
        if !said {
            println!(
                "xtask: {part}: another tracer has uprobes on libc's allocator ({}); waiting \
                 up to {WAIT:?} for them to go",
                probes.join(", ")
            );
            said = true;
        }
        thread::sleep(POLL);
    }
}

/// What a table says when foreign probes were there before or after its part ran.
pub(crate) fn note(probes: &[String]) -> String {
    format!(
        "**Not valid:** another tracer on this shared machine had uprobes on libc's allocator \
         ({}) during this part, so every process, its untraced runs included, paid their \
         traps.\n",
        probes.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
5581a0a00000-5581a0a02000 r--p 00000000 00:2a 1234   /usr/bin/cat
7f1c2a428000-7f1c2a450000 r--p 00000000 08:01 5678   /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2a450000-7f1c2a5e5000 r-xp 00028000 08:01 5678   /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2a5e5000-7f1c2a63d000 rw-p 00000000 00:00 0
7fffffffe000-7ffffffff000 --xp 00000000 00:00 0      [uprobes]
";

    #[test]
    fn finds_the_file_offset_of_an_address() {
        assert_eq!(
            file_offset_of(MAPS, 0x7f1c2a450000 + 0x10),
            Some((
                "/usr/lib/x86_64-linux-gnu/libc.so.6".to_owned(),
                0x28000 + 0x10
            ))
        );
        assert_eq!(file_offset_of(MAPS, 0x7f1c2a5e5010), None, "anonymous");
        assert_eq!(file_offset_of(MAPS, 0x7fffffffe010), None, "[uprobes]");
        assert_eq!(file_offset_of(MAPS, 0x1000), None, "unmapped");
    }

    #[test]
    fn reads_this_processes_allocator() {
        // Whether or not another tracer is about, the comparison itself must work here.
        assert!(foreign_probes().is_ok());
    }
}
