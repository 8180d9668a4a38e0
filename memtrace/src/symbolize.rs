//! Addresses to function, file and line, with blazesym.
//!
//! An address is first normalized against the process's memory map (file + file offset),
//! which memtrace caches while the process is alive; the file is then symbolized on its
//! own, so a report written after the process exited still has names. Results are cached
//! per (device, inode, offset): processes of many containers share one file's work, and
//! two containers' different files at the same path never mix. blazesym caches each
//! file's parsed symbols and DWARF.
use std::{collections::HashMap, path::Path};

use crate::process::FileId;
use blazesym::symbolize::{
    Input, Symbolized, Symbolizer as Blazesym,
    source::{Elf, Source},
};

/// What one code address resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Symbol {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

pub struct Symbolizer {
    blazesym: Blazesym,
    cache: HashMap<(FileId, u64), Symbol>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            blazesym: Blazesym::new(),
            cache: HashMap::new(),
        }
    }

    /// Resolves `offsets` of one file, read through `readable_path` (for a file inside a
    /// container, a path under `/proc/PID/root`). Unknown offsets get an empty [`Symbol`];
    /// one bad file never fails the others.
    pub fn resolve(&mut self, file: FileId, readable_path: &Path, offsets: &[u64]) {
        let mut missing: Vec<u64> = offsets
            .iter()
            .copied()
            .filter(|offset| !self.cache.contains_key(&(file, *offset)))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return;
        }
        let source = Source::Elf(Elf::new(readable_path));
        let results = match self
            .blazesym
            .symbolize(&source, Input::FileOffset(&missing))
        {
            Ok(results) => results,
            Err(e) => {
                log::debug!("symbolizing {}: {e:#}", readable_path.display());
                Vec::new()
            }
        };
        let mut results = results.into_iter();
        for offset in missing {
            let symbol = match results.next() {
                Some(Symbolized::Sym(sym)) => Symbol {
                    function: Some(sym.name.into_owned()),
                    file: sym
                        .code_info
                        .as_ref()
                        .map(|c| c.to_path().display().to_string()),
                    line: sym.code_info.as_ref().and_then(|c| c.line),
                },
                _ => Symbol::default(),
            };
            self.cache.insert((file, offset), symbol);
        }
    }

    /// A resolved offset, if [`Symbolizer::resolve`] has seen it.
    pub fn get(&self, file: FileId, offset: u64) -> Option<&Symbol> {
        self.cache.get(&(file, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{elf::ElfFile, process::own_libc};

    #[test]
    fn resolves_a_libc_function_by_file_offset() {
        let libc = own_libc().unwrap();
        let malloc = ElfFile::open(&libc)
            .unwrap()
            .function("malloc")
            .unwrap()
            .clone();
        let file = FileId {
            device: (0, 0),
            inode: 1,
        };
        let mut symbolizer = Symbolizer::new();
        symbolizer.resolve(file, &libc, &[malloc.file_offset + 1]);
        let symbol = symbolizer.get(file, malloc.file_offset + 1).unwrap();
        let name = symbol.function.as_deref().unwrap_or_default();
        assert!(name.contains("malloc"), "got {symbol:?}");
    }

    #[test]
    fn an_unreadable_file_gives_unknown_symbols() {
        let mut symbolizer = Symbolizer::new();
        let file = FileId {
            device: (0, 0),
            inode: 2,
        };
        symbolizer.resolve(file, Path::new("/nonexistent/lib.so"), &[0x1000]);
        assert_eq!(symbolizer.get(file, 0x1000), Some(&Symbol::default()));
    }
}
