//! Python frames in reported stacks.
//!
//! Since 3.11 a Python-to-Python call runs inside the same native
//! `_PyEval_EvalFrameDefault` frame, so the Python frames of a stack form runs, each
//! ending (outermost) at a frame entered from C. Each native evaluation-loop frame is
//! replaced by its run, innermost first, as py-spy --native shows them. When the native
//! walk did not reach the evaluation loop (the interpreter is built without frame
//! pointers, so frames past the first few are unreliable), the native frames are kept up
//! to the first one in the interpreter and the Python frames follow it.
use memtrace_common::python::PyFrame;

use super::{EVAL_FUNCTION, code::CodeReader, code::line_of};
use crate::report::Frame;

/// The module shown for Python frames.
pub const PYTHON_MODULE: &str = "[python]";

/// Report frames of the Python frames `raw` (innermost first), with their entry flag.
/// Frames that have not started (an allocation before their first instruction, such as
/// a generator being created) are left out: their caller is charged, as tracebacks do.
pub fn python_frames(reader: &CodeReader, raw: &[PyFrame]) -> Vec<(Frame, bool)> {
    let layout = reader.layout();
    let adaptive = i64::from(layout.code_adaptive);
    let mut frames: Vec<(Frame, bool)> = Vec::with_capacity(raw.len());
    for frame in raw {
        let owner = frame.flags & 0xff;
        if layout.owner_cstack == Some(owner) {
            // A C-stack shim (3.12+): the frame above it was entered from C.
            if let Some(last) = frames.last_mut() {
                last.1 = true;
            }
            continue;
        }
        if frame.code == 0 || reader.skip_code().contains(&frame.code) {
            continue; // 3.13's `Py_None` shims and `_Py_InitCleanup`
        }
        let entry = layout.frame_is_entry.is_some() && (frame.flags >> 8) & 0xff != 0;
        let lasti = (i64::from(frame.instr_offset) - adaptive).div_euclid(2);
        let Some(info) = reader.get(frame.code) else {
            frames.push((
                Frame {
                    function: None,
                    module: PYTHON_MODULE.into(),
                    file: None,
                    line: None,
                    address: format!("{:#x}", frame.code),
                    offset: Some(format!("lasti {lasti}")),
                },
                entry,
            ));
            continue;
        };
        let generator = owner == 1; // FRAME_OWNED_BY_GENERATOR
        if !generator && lasti >= 0 && lasti < info.firsttraceable {
            // Not started yet: pass the entry mark on to its caller.
            if entry && let Some(last) = frames.last_mut() {
                last.1 = true;
            }
            continue;
        }
        frames.push((
            Frame {
                function: Some(info.qualname.clone()),
                module: PYTHON_MODULE.into(),
                file: Some(info.filename.clone()),
                line: line_of(&info.linetable, info.firstlineno, lasti),
                address: format!("{:#x}", frame.code),
                offset: Some(format!("lasti {lasti}")),
            },
            entry,
        ));
    }
    frames
}

/// Native frames (innermost first) with the Python frames put in place of the evaluation
/// loop. `in_interpreter` says whether a native frame lies in the interpreter's file.
pub fn merge(
    native: Vec<Frame>,
    python: Vec<(Frame, bool)>,
    in_interpreter: impl Fn(&Frame) -> bool,
) -> Vec<Frame> {
    if python.is_empty() {
        return native;
    }
    // Runs of Python frames, each ending at a frame entered from C.
    let mut runs: Vec<Vec<Frame>> = vec![Vec::new()];
    for (frame, entry) in python {
        runs.last_mut().expect("never empty").push(frame);
        if entry {
            runs.push(Vec::new());
        }
    }
    runs.retain(|run| !run.is_empty());
    let mut runs = runs.into_iter();
    let has_eval = native
        .iter()
        .any(|f| f.function.as_deref() == Some(EVAL_FUNCTION));
    let mut merged = Vec::new();
    if has_eval {
        for frame in native {
            if frame.function.as_deref() == Some(EVAL_FUNCTION)
                && let Some(run) = runs.next()
            {
                merged.extend(run);
            } else {
                merged.push(frame);
            }
        }
    } else {
        // Keep what the walk is sure of: up to the first interpreter frame.
        for frame in native {
            let inside = in_interpreter(&frame);
            merged.push(frame);
            if inside {
                break;
            }
        }
    }
    merged.extend(runs.flatten());
    merged
}

/// A stable id of a merged stack: FNV-1a over each frame's module and offset (native) or
/// file, function and line (Python).
pub fn stack_id(frames: &[Frame]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |bytes: &[u8]| {
        for byte in bytes {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
        hash = (hash ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    };
    for frame in frames {
        if frame.module == PYTHON_MODULE {
            mix(frame.file.as_deref().unwrap_or("").as_bytes());
            mix(frame
                .function
                .as_deref()
                .unwrap_or(&frame.address)
                .as_bytes());
            mix(&frame.line.unwrap_or(0).to_le_bytes());
        } else {
            mix(frame.module.as_bytes());
            mix(frame.offset.as_deref().unwrap_or(&frame.address).as_bytes());
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(name: &str, module: &str) -> Frame {
        Frame {
            function: Some(name.into()),
            module: module.into(),
            file: None,
            line: None,
            address: "0x1".into(),
            offset: Some(format!("{name}-offset")),
        }
    }

    fn py(name: &str) -> Frame {
        Frame {
            function: Some(name.into()),
            module: PYTHON_MODULE.into(),
            file: Some("/app/x.py".into()),
            line: Some(3),
            address: "0x2".into(),
            offset: None,
        }
    }

    fn names(frames: &[Frame]) -> Vec<&str> {
        frames
            .iter()
            .map(|f| f.function.as_deref().unwrap())
            .collect()
    }

    #[test]
    fn each_evaluation_loop_gets_its_run() {
        let stack = vec![
            native("PyList_New", "libpython"),
            native(EVAL_FUNCTION, "libpython"),
            native("cfunction_call", "libpython"),
            native(EVAL_FUNCTION, "libpython"),
            native("main", "python3"),
        ];
        let python = vec![
            (py("leaf"), false),
            (py("middle"), true),
            (py("callback_caller"), false),
            (py("<module>"), true),
        ];
        let merged = merge(stack, python, |f| f.module == "libpython");
        assert_eq!(
            names(&merged),
            [
                "PyList_New",
                "leaf",
                "middle",
                "cfunction_call",
                "callback_caller",
                "<module>",
                "main"
            ]
        );
    }

    #[test]
    fn without_the_loop_python_follows_the_first_interpreter_frame() {
        let stack = vec![
            native("ext_alloc", "ext.so"),
            native("cfunction_call", "libpython"),
            native("garbage", "libpython"),
        ];
        let python = vec![(py("view"), false), (py("<module>"), true)];
        let merged = merge(stack, python, |f| f.module == "libpython");
        assert_eq!(
            names(&merged),
            ["ext_alloc", "cfunction_call", "view", "<module>"]
        );
    }

    #[test]
    fn ids_differ_by_python_line() {
        let a = vec![native("f", "m"), py("g")];
        let mut b = a.clone();
        b[1].line = Some(4);
        assert_ne!(stack_id(&a), stack_id(&b));
        assert_eq!(stack_id(&a), stack_id(&a.clone()));
    }
}
