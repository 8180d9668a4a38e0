//! Where on a function to put its probe.
//!
//! A uprobe replaces one instruction with a breakpoint. The kernel emulates a few
//! instructions in place (push, jmp/jcc/call, nop); any other one is copied out of line
//! and single-stepped, a second trap that costs ~10x more on the machines we measured
//! (`shared/toolchain.md`: 1.1 µs at a `push`, 14 µs at a `test` or `mov`). glibc's `free`
//! starts with `test %rdi,%rdi`, `posix_memalign` with `cmpb`.
//!
//! So the probe goes on the function's first emulated instruction, provided every
//! instruction before it is *transparent*: it falls through (no branch, no call, no
//! return), and writes neither memory, nor the stack or frame pointer, nor an argument
//! register.
//! Then every call reaches the probe, the arguments are still in their registers, and no
//! push has happened yet, so `[rsp]` is still the return address: the BPF side reads the
//! caller from there, and a return probe placed at the same spot hijacks the right slot.
//! When no such instruction is found, the probe stays at offset 0.
use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, Register,
};

/// How far into a function we look for a cheap instruction.
const MAX_SCAN_BYTES: usize = 48;

/// The chosen probe point of one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Bytes from the function's start.
    pub offset: u64,
    /// Whether the instruction there is one the kernel emulates (one trap per hit).
    pub emulated: bool,
}

/// Chooses the probe offset for a function whose first bytes are `code` (x86-64).
pub fn place(code: &[u8]) -> Placement {
    let fallback = Placement {
        offset: 0,
        emulated: false,
    };
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut instruction = Instruction::default();
    while decoder.can_decode() && (decoder.ip() as usize) < MAX_SCAN_BYTES {
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return fallback;
        }
        if instruction.is_jcc_short_or_near()
            && returns_at_once(code, instruction.near_branch_target())
        {
            // An early return with nothing done (free(NULL)): calls that take it do no
            // work worth seeing, so the probe may sit past it, on the path that works.
            continue;
        }
        if is_emulated(&instruction) {
            return Placement {
                offset: instruction.ip(),
                emulated: true,
            };
        }
        if !is_transparent(&instruction, &mut info) {
            return fallback;
        }
    }
    fallback
}

/// Whether the instruction at `target` is a return.
fn returns_at_once(code: &[u8], target: u64) -> bool {
    let Some(bytes) = usize::try_from(target).ok().and_then(|t| code.get(t..)) else {
        return false;
    };
    let mut decoder = Decoder::with_ip(64, bytes, target, DecoderOptions::NONE);
    decoder.can_decode() && decoder.decode().flow_control() == FlowControl::Return
}

/// Instructions the x86 uprobe code emulates instead of single-stepping
/// (`arch/x86/kernel/uprobes.c`: `branch_setup_xol_ops` and `push_setup_xol_ops`).
fn is_emulated(instruction: &Instruction) -> bool {
    match instruction.mnemonic() {
        Mnemonic::Push => matches!(instruction.code(), Code::Push_r64),
        Mnemonic::Nop => true,
        Mnemonic::Call | Mnemonic::Jmp => instruction.is_call_near() || instruction.is_jmp_near(),
        _ => instruction.is_jcc_short_or_near(),
    }
}

/// Registers that carry arguments in the SysV x86-64 ABI, the stack pointer, and the frame
/// pointer (the stack walk starts from the caller's).
fn is_protected(register: Register) -> bool {
    matches!(
        register.full_register(),
        Register::RDI
            | Register::RSI
            | Register::RDX
            | Register::RCX
            | Register::R8
            | Register::R9
            | Register::RSP
            | Register::RBP
    )
}

fn is_transparent(instruction: &Instruction, info: &mut InstructionInfoFactory) -> bool {
    if instruction.flow_control() != FlowControl::Next {
        return false;
    }
    let info = info.info(instruction);
    let writes_register = info.used_registers().iter().any(|used| {
        is_protected(used.register())
            && !matches!(
                used.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::None
            )
    });
    let writes_memory = info.used_memory().iter().any(|used| {
        !matches!(
            used.access(),
            OpAccess::Read | OpAccess::CondRead | OpAccess::None
        )
    });
    !writes_register && !writes_memory
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> Placement {
        Placement {
            offset,
            emulated: true,
        }
    }

    #[test]
    fn push_at_entry_stays_at_zero() {
        // glibc 2.36 malloc: push %r12; push %rbp
        assert_eq!(place(&[0x41, 0x54, 0x55]), at(0));
    }

    #[test]
    fn free_moves_past_the_null_return_onto_the_push() {
        // glibc 2.36 free: test %rdi,%rdi; je +0x10 (to a ret); push %rbp; ...
        let mut code = vec![0x48, 0x85, 0xff, 0x0f, 0x84, 0x10, 0x00, 0x00, 0x00, 0x55];
        code.resize(0x19, 0x90);
        code.push(0xc3); // ret at 9 + 0x10
        assert_eq!(place(&code), at(9));
    }

    #[test]
    fn a_branch_to_real_work_is_probed_itself() {
        // aligned_alloc: cmpb $0,(rip); je +7 (to `sub $0x18,%rsp`, real work)
        let mut code = vec![0x80, 0x3d, 0x71, 0x0e, 0x14, 0x00, 0x00, 0x74, 0x07];
        code.resize(0x10, 0x90);
        code.extend([0x48, 0x83, 0xec, 0x18]);
        assert_eq!(place(&code), at(7));
    }

    #[test]
    fn posix_memalign_moves_past_the_flag_compare() {
        // cmpb $0x0,0x140201(%rip); push %r12
        let code = [0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00, 0x41, 0x54];
        assert_eq!(place(&code), at(7));
    }

    #[test]
    fn writing_an_argument_register_keeps_offset_zero() {
        // reallocarray: mov %rsi,%rax; mul %rdx (writes rdx); ...
        let code = [
            0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05,
        ];
        assert_eq!(
            place(&code),
            Placement {
                offset: 0,
                emulated: false
            }
        );
    }

    #[test]
    fn a_syscall_is_not_transparent() {
        // munmap: mov $0xb,%eax; syscall
        let code = [0xb8, 0x0b, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xc3];
        assert_eq!(
            place(&code),
            Placement {
                offset: 0,
                emulated: false
            }
        );
    }

    #[test]
    fn stack_pointer_changes_keep_offset_zero() {
        // sub $0x18,%rsp; push %rbx
        let code = [0x48, 0x83, 0xec, 0x18, 0x53];
        assert_eq!(
            place(&code),
            Placement {
                offset: 0,
                emulated: false
            }
        );
    }

    #[test]
    fn writing_the_frame_pointer_keeps_offset_zero() {
        // mov %rsp,%rbp; push %rbx
        let code = [0x48, 0x89, 0xe5, 0x53];
        assert_eq!(
            place(&code),
            Placement {
                offset: 0,
                emulated: false
            }
        );
    }

    #[test]
    fn memory_stores_keep_offset_zero() {
        // mov %rdi,(%rax); push %rbx
        let code = [0x48, 0x89, 0x38, 0x53];
        assert_eq!(
            place(&code),
            Placement {
                offset: 0,
                emulated: false
            }
        );
    }

    #[test]
    fn endbr64_is_skipped() {
        // endbr64; push %rbp (Ubuntu's CET-enabled libc)
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x55];
        assert_eq!(place(&code), at(4));
    }

    #[test]
    fn truncated_code_falls_back() {
        assert_eq!(
            place(&[0x48]),
            Placement {
                offset: 0,
                emulated: false
            }
        );
        assert_eq!(
            place(&[]),
            Placement {
                offset: 0,
                emulated: false
            }
        );
    }
}
