//! Reading the ELF files memtrace attaches to: function symbols, their file offsets, and
//! their first bytes (for probe placement). Files come from targets and may be hostile:
//! every lookup is bounds-checked and fails with an error naming the file.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSegment, ObjectSymbol, elf};

/// A function found in an ELF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Virtual address in the file (before load bias).
    pub address: u64,
    /// Offset of its first byte in the file (what a uprobe is attached at).
    pub file_offset: u64,
    /// Size from the symbol table (0 if unknown).
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file memtrace can read: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
}

/// An ELF file loaded into memory, with its function symbols indexed by name.
pub struct ElfFile {
    path: PathBuf,
    data: Vec<u8>,
    functions: HashMap<String, Function>,
    interpreter: Option<PathBuf>,
}

impl ElfFile {
    pub fn open(path: &Path) -> Result<Self, ElfError> {
        let data = std::fs::read(path).map_err(|source| ElfError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, data)
    }

    /// Parses `data`, the contents of the file at `path` (named in errors).
    pub fn parse(path: &Path, data: Vec<u8>) -> Result<Self, ElfError> {
        let parse = |source| ElfError::Parse {
            path: path.to_owned(),
            source,
        };
        let file = object::File::parse(&*data).map_err(parse)?;
        let segments: Vec<(u64, u64, u64)> = file
            .segments()
            .map(|s| {
                let (offset, _) = s.file_range();
                (s.address(), s.size(), offset)
            })
            .collect();
        let to_file_offset = |address: u64| {
            segments
                .iter()
                .find(|(start, size, _)| address >= *start && address - start < *size)
                .map(|(start, _, offset)| address - start + offset)
        };
        let mut functions = HashMap::new();
        // .dynsym first, then .symtab: both name the same functions when both exist.
        for symbol in file.dynamic_symbols().chain(file.symbols()) {
            if symbol.kind() != object::SymbolKind::Text || symbol.is_undefined() {
                continue;
            }
            let Ok(name) = symbol.name() else { continue };
            // Versioned names ("malloc@@GLIBC_2.2.5") in some tables: keep the base name.
            let name = name.split('@').next().unwrap_or(name);
            let Some(file_offset) = to_file_offset(symbol.address()) else {
                continue;
            };
            functions.entry(name.to_owned()).or_insert(Function {
                address: symbol.address(),
                file_offset,
                size: symbol.size(),
            });
        }
        let interpreter = interpreter(&file);
        Ok(Self {
            path: path.to_owned(),
            data,
            functions,
            interpreter,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.get(name)
    }

    /// Up to `len` bytes of code starting at `function` (fewer at the end of the file).
    pub fn code(&self, function: &Function, len: usize) -> &[u8] {
        let start = usize::try_from(function.file_offset).unwrap_or(usize::MAX);
        let limit = if function.size > 0 {
            len.min(function.size as usize)
        } else {
            len
        };
        let end = start.saturating_add(limit).min(self.data.len());
        self.data.get(start..end).unwrap_or(&[])
    }

    /// The program interpreter (`PT_INTERP`): `None` for libraries, and for executables
    /// that are statically linked.
    pub fn interpreter(&self) -> Option<&Path> {
        self.interpreter.as_deref()
    }
}

fn interpreter(file: &object::File) -> Option<PathBuf> {
    let object::File::Elf64(elf_file) = file else {
        return None;
    };
    use object::read::elf::ProgramHeader;
    let endian = elf_file.endian();
    for header in elf_file.elf_program_headers() {
        if header.p_type(endian) == elf::PT_INTERP {
            let bytes = header.data(endian, elf_file.data()).ok()?;
            let bytes = bytes.split(|b| *b == 0).next()?;
            return Some(PathBuf::from(String::from_utf8_lossy(bytes).into_owned()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libc_malloc_and_its_code() {
        let libc = crate::process::own_libc().expect("this test binary links libc");
        let elf = ElfFile::open(&libc).unwrap();
        let malloc = elf.function("malloc").expect("libc exports malloc");
        assert!(malloc.file_offset > 0);
        assert!(!elf.code(malloc, 16).is_empty());
    }

    #[test]
    fn own_executable_has_an_interpreter() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let elf = ElfFile::open(&exe).unwrap();
        assert!(elf.interpreter().is_some());
    }

    #[test]
    fn garbage_is_a_parse_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("memtrace-elf-{}", std::process::id()));
        std::fs::write(&dir, b"not an elf").unwrap();
        let err = ElfFile::open(&dir).err().expect("garbage must not parse");
        std::fs::remove_file(&dir).unwrap();
        assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");
    }
}
