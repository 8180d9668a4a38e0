//! Code objects read from a live process's memory (`/proc/PID/mem`), and the 3.11+
//! location table that maps an instruction to its line (CPython's
//! `Objects/locations.md`). Decoded here, not in BPF: the same (code, instruction) pairs
//! repeat constantly, so each code object is read once and its lines are cached.
use std::{collections::HashMap, fs::File, os::unix::fs::FileExt};

use super::layout::Layout;

/// Longest name or file name read (longer ones are cut).
const MAX_STRING_CHARS: u64 = 4096;
/// Largest location table read (the standard library's largest is ~22 KB).
const MAX_LINETABLE_BYTES: u64 = 256 * 1024;

/// What memtrace needs of one code object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeInfo {
    pub qualname: String,
    pub filename: String,
    pub firstlineno: u32,
    pub firsttraceable: i64,
    pub linetable: Vec<u8>,
    /// The addresses of its location table and name objects: a code object freed and
    /// another allocated at its address has other ones.
    identity: (u64, u64),
}

/// Reads code objects of one process, caching each by address.
pub struct CodeReader {
    pid: u32,
    layout: Layout,
    /// Code addresses that are not code objects (3.13's shims and init cleanup).
    skip_code: [u64; 2],
    mem: Option<File>,
    cache: HashMap<u64, Option<CodeInfo>>,
    /// Code objects that could not be read (the process gone, a bad pointer).
    pub failures: u64,
}

impl CodeReader {
    pub fn new(pid: u32, layout: Layout, skip_code: [u64; 2]) -> Self {
        Self {
            pid,
            layout,
            skip_code,
            mem: None,
            cache: HashMap::new(),
            failures: 0,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn skip_code(&self) -> &[u64; 2] {
        &self.skip_code
    }

    /// Reads `code` if not read yet; call while the process is alive.
    pub fn learn(&mut self, code: u64) {
        if code == 0 || self.skip_code.contains(&code) || self.cache.contains_key(&code) {
            return;
        }
        let info = self.read_code(code);
        if info.is_none() {
            self.failures += 1;
            log::debug!("pid {}: code object {code:#x} unreadable", self.pid);
        }
        self.cache.insert(code, info);
    }

    pub fn get(&self, code: u64) -> Option<&CodeInfo> {
        self.cache.get(&code).and_then(Option::as_ref)
    }

    fn read_code(&mut self, code: u64) -> Option<CodeInfo> {
        let l = self.layout;
        let filename = self.read_ptr(code.wrapping_add(l.code_filename as u64))?;
        let qualname = self.read_ptr(code.wrapping_add(l.code_qualname as u64))?;
        let linetable = self.read_ptr(code.wrapping_add(l.code_linetable as u64))?;
        let firstlineno = self.read_u32(code.wrapping_add(l.code_firstlineno as u64))?;
        let firsttraceable = self.read_u32(code.wrapping_add(l.code_firsttraceable as u64))? as i32;
        Some(CodeInfo {
            qualname: self.read_str(qualname)?,
            filename: self.read_str(filename)?,
            firstlineno,
            firsttraceable: i64::from(firsttraceable),
            linetable: self.read_bytes_object(linetable)?,
            identity: (linetable, qualname),
        })
    }

    /// Re-reads `code` if the object at that address is no longer the one cached (freed,
    /// and another code object allocated there): two pointer reads. Call it for frames of
    /// stacks seen for the first time.
    pub fn revalidate(&mut self, code: u64) {
        let Some(Some(cached)) = self.cache.get(&code) else {
            return;
        };
        let expected = cached.identity;
        let linetable = self.read_ptr(code.wrapping_add(u64::from(self.layout.code_linetable)));
        let qualname = self.read_ptr(code.wrapping_add(u64::from(self.layout.code_qualname)));
        if let (Some(linetable), Some(qualname)) = (linetable, qualname)
            && (linetable, qualname) != expected
        {
            log::debug!("pid {}: code object {code:#x} was replaced", self.pid);
            self.cache.remove(&code);
            self.learn(code);
        }
    }

    fn read(&mut self, address: u64, len: usize) -> Option<Vec<u8>> {
        if self.mem.is_none() {
            self.mem = File::open(format!("/proc/{}/mem", self.pid)).ok();
        }
        let mut buf = vec![0; len];
        self.mem.as_ref()?.read_exact_at(&mut buf, address).ok()?;
        Some(buf)
    }

    fn read_ptr(&mut self, address: u64) -> Option<u64> {
        let b = self.read(address, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn read_u32(&mut self, address: u64) -> Option<u32> {
        let b = self.read(address, 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    /// A `str` object: compact ASCII is UTF-8 already; other compact strings are Latin-1,
    /// UCS-2 or UCS-4 by their `kind`.
    fn read_str(&mut self, object: u64) -> Option<String> {
        let length = self
            .read_ptr(object.wrapping_add(16))?
            .min(MAX_STRING_CHARS);
        let state = self.read_u32(object.wrapping_add(32))?;
        let kind = (state >> 2) & 7;
        let compact = state & (1 << 5) != 0;
        let ascii = state & (1 << 6) != 0;
        if !compact || !matches!(kind, 1 | 2 | 4) {
            return None;
        }
        // `object` comes from the target's memory (a stale frame may name freed memory):
        // arithmetic on it wraps, and the read fails, rather than overflow.
        let data = object.wrapping_add(u64::from(if ascii {
            self.layout.ascii_data
        } else {
            self.layout.compact_data
        }));
        let bytes = self.read(data, (length * u64::from(kind)) as usize)?;
        Some(match kind {
            1 => bytes.iter().map(|b| char::from(*b)).collect(),
            2 => char::decode_utf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]])),
            )
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or(char::REPLACEMENT_CHARACTER)
                })
                .collect(),
        })
    }

    /// A `bytes` object's contents (`ob_size` at +16, data at +32).
    fn read_bytes_object(&mut self, object: u64) -> Option<Vec<u8>> {
        let size = self.read_ptr(object.wrapping_add(16))?;
        if size > MAX_LINETABLE_BYTES {
            return None;
        }
        self.read(object.wrapping_add(32), size as usize)
    }
}

/// The line of the instruction at code unit `lasti`, from a 3.11+ location table.
/// `None` when the instruction has no line (or the table ends first).
pub fn line_of(linetable: &[u8], firstlineno: u32, lasti: i64) -> Option<u32> {
    if lasti < 0 {
        // A frame that has not run its first instruction: its definition line.
        return Some(firstlineno);
    }
    let mut bytes = linetable.iter().copied();
    let mut line = i64::from(firstlineno);
    let mut address: i64 = 0;
    while let Some(first) = bytes.next() {
        if first & 0x80 == 0 {
            return None; // not at an entry start: a corrupt table
        }
        let code = (first >> 3) & 15;
        let units = i64::from(first & 7) + 1;
        let mut has_line = true;
        match code {
            15 => has_line = false,
            14 => {
                line = line.checked_add(svarint(&mut bytes)?)?;
                for _ in 0..3 {
                    varint(&mut bytes)?;
                }
            }
            13 => line = line.checked_add(svarint(&mut bytes)?)?,
            10..=12 => {
                line += i64::from(code - 10);
                bytes.next()?;
                bytes.next()?;
            }
            _ => {
                bytes.next()?;
            }
        }
        if lasti < address + units {
            return (has_line && line >= 0).then_some(line as u32);
        }
        address += units;
    }
    None
}

fn varint(bytes: &mut impl Iterator<Item = u8>) -> Option<u64> {
    let mut byte = bytes.next()?;
    let mut value = u64::from(byte & 63);
    let mut shift = 0;
    while byte & 64 != 0 {
        byte = bytes.next()?;
        shift += 6;
        if shift > 60 {
            return None;
        }
        value |= u64::from(byte & 63) << shift;
    }
    Some(value)
}

fn svarint(bytes: &mut impl Iterator<Item = u8>) -> Option<i64> {
    let value = varint(bytes)?;
    Some(if value & 1 != 0 {
        -((value >> 1) as i64)
    } else {
        (value >> 1) as i64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table written by hand: 2 units at firstlineno (code 0, one column byte),
    /// 3 units one line down (code 11, two column bytes), 1 unit with no location,
    /// then 2 units 300 lines further (code 13, svarint 600 = two 6-bit chunks).
    fn table() -> Vec<u8> {
        vec![
            0x80 | 1, // code 0
            5,
            0x80 | (11 << 3) | 2,
            1,
            2,
            0x80 | (15 << 3),
            0x80 | (13 << 3) | 1,
            64 | (600 & 63) as u8,
            (600 >> 6) as u8,
        ]
    }

    #[test]
    fn lines_follow_the_deltas() {
        let t = table();
        assert_eq!(line_of(&t, 10, 0), Some(10));
        assert_eq!(line_of(&t, 10, 1), Some(10));
        assert_eq!(line_of(&t, 10, 2), Some(11));
        assert_eq!(line_of(&t, 10, 4), Some(11));
        assert_eq!(line_of(&t, 10, 5), None);
        assert_eq!(line_of(&t, 10, 6), Some(311));
        assert_eq!(line_of(&t, 10, 8), None);
    }

    #[test]
    fn before_the_first_instruction_is_the_definition_line() {
        assert_eq!(line_of(&table(), 10, -1), Some(10));
    }

    #[test]
    fn negative_svarints_go_up() {
        // Code 14 (long form): svarint -3 (7), then end line, column, end column.
        let t = vec![0x80 | (14 << 3), 7, 0, 1, 1];
        assert_eq!(line_of(&t, 10, 0), Some(7));
    }

    /// A compact ASCII `str` object as 3.11 lays it out (data at 48).
    fn fake_str(text: &str) -> Vec<u64> {
        let mut words = vec![0u64; 6 + text.len() / 8 + 1];
        words[2] = text.len() as u64; // length at +16
        words[4] = (1 << 2) | (1 << 5) | (1 << 6); // kind 1, compact, ascii at +32
        let bytes: &mut [u8] = bytemuck_words(&mut words);
        bytes[48..48 + text.len()].copy_from_slice(text.as_bytes());
        words
    }

    fn bytemuck_words(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: u64 has no invalid bit patterns and a stricter alignment than u8.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
    }

    /// A `bytes` object (size at +16, data at +32).
    fn fake_bytes(data: &[u8]) -> Vec<u64> {
        let mut words = vec![0u64; 4 + data.len() / 8 + 1];
        words[2] = data.len() as u64;
        bytemuck_words(&mut words)[32..32 + data.len()].copy_from_slice(data);
        words
    }

    /// A frame may name freed memory, whose words are anything: pointers near the top of
    /// the address space must fail to read, not overflow.
    #[test]
    fn garbage_pointers_read_as_nothing() {
        let layout = super::super::layout::for_version(3, 11, None).unwrap();
        let mut code = vec![u64::MAX - 8; 32];
        code[layout.code_firstlineno as usize / 8] = 10;
        let mut reader = CodeReader::new(std::process::id(), layout, [0, 0]);
        reader.learn(code.as_ptr() as u64);
        assert!(reader.get(code.as_ptr() as u64).is_none());
        reader.learn(u64::MAX - 4);
        assert!(reader.get(u64::MAX - 4).is_none());
        // A line table whose deltas overflow a line number.
        let huge = [
            0x80 | (13 << 3),
            0x3f | 0x40,
            0x7f,
            0x7f,
            0x7f,
            0x7f,
            0x7f,
            0x7f,
            0x7f,
            0x3f,
        ];
        let _ = line_of(&huge, u32::MAX, 0);
    }

    /// Reads fake code objects from this very process, and notices when the object at a
    /// cached address is replaced by another.
    #[test]
    fn code_objects_are_read_and_revalidated() {
        let layout = super::super::layout::for_version(3, 11, None).unwrap();
        let file = fake_str("/app/views.py");
        let (first, second) = (fake_str("Cache.put"), fake_str("other"));
        let lines = fake_bytes(&table());
        let other_lines = fake_bytes(&table());
        let mut code = vec![0u64; 32];
        let set = |code: &mut Vec<u64>, name: &Vec<u64>, table: &Vec<u64>| {
            code[layout.code_filename as usize / 8] = file.as_ptr() as u64;
            code[layout.code_qualname as usize / 8] = name.as_ptr() as u64;
            code[layout.code_linetable as usize / 8] = table.as_ptr() as u64;
            code[layout.code_firstlineno as usize / 8] = 10; // low half: firstlineno
            code[layout.code_firsttraceable as usize / 8] = 0;
        };
        set(&mut code, &first, &lines);
        let address = code.as_ptr() as u64;
        let mut reader = CodeReader::new(std::process::id(), layout, [0, 0]);
        reader.learn(address);
        let info = reader.get(address).expect("readable");
        assert_eq!(info.qualname, "Cache.put");
        assert_eq!(info.filename, "/app/views.py");
        assert_eq!(line_of(&info.linetable, info.firstlineno, 2), Some(11));

        set(&mut code, &second, &other_lines);
        reader.learn(address);
        assert_eq!(reader.get(address).unwrap().qualname, "Cache.put", "cached");
        reader.revalidate(address);
        assert_eq!(reader.get(address).unwrap().qualname, "other");
    }

    #[test]
    fn garbage_is_no_line() {
        assert_eq!(line_of(&[0x01, 0x02], 10, 0), None);
    }
}
