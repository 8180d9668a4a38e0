//! Where CPython keeps what memtrace reads, per minor version: the one offset table.
//!
//! 3.11 and 3.12 come from pahole on pyenv 3.11.7 / 3.12.1 and Debian 3.11.2 (identical
//! to 3.11.7), checked by walking real processes (`shared/python-frames.md`). 3.13 reads
//! most of it from `_Py_DebugOffsets`, the interpreter's own description of its layout at
//! the start of `_PyRuntime`; the table supplies only what that struct does not publish.
use anyhow::{Result, bail};

/// Byte offsets into the interpreter's structures (x86-64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// From `_PyRuntime` to the thread state holding the GIL: each hop reads a pointer.
    pub tstate_hops: &'static [u32],
    /// `_PyRuntime` → an interpreter (`interpreters.main`, or `head` on 3.13).
    pub interp_main: u32,
    pub threads_head: u32,
    pub thread_next: u32,
    pub native_thread_id: u32,
    /// Thread state → innermost frame (3.11/3.12 go through `cframe`).
    pub frame_hops: &'static [u32],
    pub frame_code: u32,
    pub frame_previous: u32,
    pub frame_instr: u32,
    pub frame_owner: Option<u32>,
    /// The `owner` value of C-stack shim frames (3.12+).
    pub owner_cstack: Option<u32>,
    pub frame_is_entry: Option<u32>,
    pub code_firstlineno: u32,
    pub code_filename: u32,
    pub code_qualname: u32,
    pub code_linetable: u32,
    pub code_firsttraceable: u32,
    pub code_adaptive: u32,
    /// Where the characters of a compact ASCII string, or of any other compact string,
    /// start.
    pub ascii_data: u32,
    pub compact_data: u32,
    /// pymalloc: `mgmt.usable_arenas` in the `OMState` that `allocate_from_new_pool`
    /// takes (3.12+; 3.11 has a static), and `arena_object.freepools`.
    pub usable_arenas_in_state: Option<u32>,
    pub arena_freepools: u32,
    pub pool_size_arg: u32,
    pub pool_szidx: u32,
}

const V3_11: Layout = Layout {
    tstate_hops: &[576],
    interp_main: 48,
    threads_head: 16,
    thread_next: 8,
    native_thread_id: 160,
    frame_hops: &[56, 8],
    frame_code: 32,
    frame_previous: 48,
    frame_instr: 56,
    frame_owner: Some(69),
    owner_cstack: None,
    frame_is_entry: Some(68),
    code_firstlineno: 72,
    code_filename: 112,
    code_qualname: 128,
    code_linetable: 136,
    code_firsttraceable: 168,
    code_adaptive: 184,
    ascii_data: 48,
    compact_data: 72,
    usable_arenas_in_state: None,
    arena_freepools: 24,
    pool_size_arg: 0,
    pool_szidx: 36,
};

const V3_12: Layout = Layout {
    tstate_hops: &[48, 384, 8],
    interp_main: 48,
    threads_head: 72,
    thread_next: 8,
    native_thread_id: 144,
    frame_hops: &[56, 0],
    frame_code: 0,
    frame_previous: 8,
    frame_instr: 56,
    frame_owner: Some(70),
    owner_cstack: Some(3),
    frame_is_entry: None,
    code_firstlineno: 68,
    code_filename: 112,
    code_qualname: 128,
    code_linetable: 136,
    code_firsttraceable: 176,
    code_adaptive: 192,
    ascii_data: 40,
    compact_data: 56,
    usable_arenas_in_state: Some(0x218),
    arena_freepools: 24,
    pool_size_arg: 1,
    pool_szidx: 36,
};

/// 3.13's values for what `_Py_DebugOffsets` also says (it overrides these).
const V3_13: Layout = Layout {
    tstate_hops: &[632, 7760],
    interp_main: 632,
    threads_head: 7344,
    thread_next: 8,
    native_thread_id: 160,
    frame_hops: &[72],
    frame_code: 0,
    frame_previous: 8,
    frame_instr: 56,
    frame_owner: Some(70),
    owner_cstack: Some(3),
    frame_is_entry: None,
    code_firstlineno: 68,
    code_filename: 112,
    code_qualname: 128,
    code_linetable: 136,
    code_firsttraceable: 184,
    code_adaptive: 200,
    ascii_data: 40,
    compact_data: 56,
    usable_arenas_in_state: Some(0x218),
    arena_freepools: 24,
    pool_size_arg: 1,
    pool_szidx: 36,
};

/// The layout of CPython `major.minor`, or why there is none. `debug_offsets` is the
/// start of `_PyRuntime` as stored in the file (3.13+).
pub fn for_version(major: u8, minor: u8, debug_offsets: Option<&[u8]>) -> Result<Layout> {
    match (major, minor) {
        (3, 11) => Ok(V3_11),
        (3, 12) => Ok(V3_12),
        (3, 13) => match debug_offsets {
            Some(bytes) => from_debug_offsets(bytes),
            None => bail!("CPython 3.13 without a readable _Py_DebugOffsets"),
        },
        _ => bail!("CPython {major}.{minor} is not supported (3.11, 3.12 and 3.13 are)"),
    }
}

/// Reads 3.13's `_Py_DebugOffsets` (cookie, version, free_threaded, then sub-structs of
/// u64 offsets, each led by its struct's size).
fn from_debug_offsets(bytes: &[u8]) -> Result<Layout> {
    let word = |at: usize| -> Result<u64> {
        match bytes.get(at..at + 8) {
            Some(b) => Ok(u64::from_le_bytes(b.try_into().expect("8 bytes"))),
            None => bail!("_Py_DebugOffsets is cut short"),
        }
    };
    if bytes.get(..8) != Some(b"xdebugpy") {
        bail!("_PyRuntime does not start with _Py_DebugOffsets");
    }
    let version = word(8)?;
    if version >> 16 != 0x030d {
        bail!("_Py_DebugOffsets of version {version:#x}, expected 3.13");
    }
    if word(16)? != 0 {
        bail!("free-threaded CPython (3.13t) is not supported");
    }
    let field = |at: usize| -> Result<u32> { Ok(u32::try_from(word(at)?)?) };
    let mut layout = V3_13;
    let head = field(40)?;
    layout.interp_main = head;
    layout.threads_head = field(72)?;
    let holder = field(144)?;
    layout.thread_next = field(168)?;
    layout.native_thread_id = field(200)?;
    let current_frame = field(184)?;
    layout.frame_previous = field(232)?;
    layout.frame_code = field(240)?;
    layout.frame_instr = field(248)?;
    layout.frame_owner = Some(field(264)?);
    layout.code_filename = field(280)?;
    layout.code_qualname = field(296)?;
    layout.code_linetable = field(304)?;
    layout.code_firstlineno = field(312)?;
    layout.code_adaptive = field(344)?;
    // The hop lists are static slices: accept what 3.13.0 publishes, refuse the rest
    // rather than guess.
    if (head, holder, current_frame) != (632, 7760, 72) {
        bail!(
            "this CPython 3.13 moved its thread state (interpreters {head}, GIL holder \
             {holder}, current frame {current_frame}): not supported yet"
        );
    }
    Ok(layout)
}

impl Layout {
    /// Frame fields the BPF side reads as words must be 8-aligned and inside the bytes it
    /// reads; bytes inside them too.
    pub fn check(&self) -> Result<()> {
        use memtrace_common::python::FRAME_READ_BYTES;
        for offset in [self.frame_code, self.frame_previous, self.frame_instr] {
            if offset % 8 != 0 || offset as usize + 8 > FRAME_READ_BYTES.min(64) {
                bail!("frame field at {offset} is out of the BPF side's reach");
            }
        }
        for offset in [self.frame_owner, self.frame_is_entry]
            .into_iter()
            .flatten()
        {
            if offset as usize >= FRAME_READ_BYTES {
                bail!("frame byte at {offset} is out of the BPF side's reach");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_fits_the_bpf_reader() {
        for layout in [V3_11, V3_12, V3_13] {
            layout.check().unwrap();
        }
    }

    #[test]
    fn other_versions_are_refused_with_their_number() {
        let err = for_version(3, 10, None).unwrap_err().to_string();
        assert!(err.contains("3.10"), "{err}");
    }

    #[test]
    fn debug_offsets_need_their_cookie() {
        assert!(from_debug_offsets(&[0; 400]).is_err());
    }
}
