//! A C extension that leaks native memory, called from a named Python function: the leak's
//! stack shows the native frames (the extension's leaking function and its caller) under
//! the Python frames that called them, the interpreter's evaluation loop replaced by those
//! Python frames, with the exact bytes. Launched by `memtrace top -- python ...`, whose
//! interpreter must be known before the script's first line runs.
use std::{path::Path, process::Command};

use crate::{python_util::*, util::*};

const CALLS: u64 = 500;
const SIZE: u64 = 3000;

#[test]
fn python_3_11_c_extension_leak() {
    c_extension_leak("3.11");
}

#[test]
fn python_3_12_c_extension_leak() {
    c_extension_leak("3.12");
}

#[test]
fn python_3_13_c_extension_leak() {
    c_extension_leak("3.13");
}

fn c_extension_leak(version: &str) {
    let _serial = serial();
    require_root();
    let python = pyenv_python(version);
    let dir = tempfile::tempdir().unwrap();
    build_extension(&python, dir.path());
    let script = python_fixture("python_ext.py");
    let line = marked_line(&script, "NATIVE");
    let ext_dir = dir.path().to_str().expect("a UTF-8 temporary path");
    let report = trace_program(
        &python,
        &["--python", "frames"],
        &[
            script.to_str().unwrap(),
            ext_dir,
            &CALLS.to_string(),
            &SIZE.to_string(),
        ],
    );

    let leaks: Vec<&StackEntry> = report
        .stacks
        .iter()
        .filter(|s| s.frames.first().and_then(|f| f.function.as_deref()) == Some("keep_native"))
        .collect();
    let bytes: u64 = leaks.iter().map(|s| s.outstanding_bytes).sum();
    let count: u64 = leaks.iter().map(|s| s.outstanding_allocations).sum();
    assert_eq!(
        (bytes, count),
        (CALLS * SIZE, CALLS),
        "the extension's leak, exactly\n{}",
        describe_stacks(&report, 6)
    );
    for stack in &leaks {
        let frames: Vec<&str> = stack
            .frames
            .iter()
            .map(|f| f.function.as_deref().unwrap_or("?"))
            .collect();
        assert_eq!(
            frames.get(1),
            Some(&"remember"),
            "the native caller under the leak site: {frames:?}"
        );
        assert!(
            stack
                .frames
                .iter()
                .any(|f| is_python_frame(f, "cache_native", "python_ext.py", line)),
            "the Python line that called the extension is in the stack: {frames:?}"
        );
        assert!(
            !frames.contains(&"_PyEval_EvalFrameDefault"),
            "the evaluation loop's frame is replaced by the Python frames it ran: {frames:?}"
        );
    }
}

/// Builds `fixtures/leaky_ext.c` against `python`'s headers into `dir`, with frame pointers.
fn build_extension(python: &Path, dir: &Path) {
    let query = Command::new(python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['include']); \
             print(sysconfig.get_config_var('EXT_SUFFIX'))",
        ])
        .output()
        .expect("running python for its include directory");
    assert!(query.status.success(), "{query:?}");
    let text = String::from_utf8(query.stdout).unwrap();
    let mut lines = text.lines();
    let (include, suffix) = (lines.next().unwrap(), lines.next().unwrap());
    let source = python_fixture("leaky_ext.c");
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O0", "-g", "-fno-omit-frame-pointer"])
        .arg(format!("-I{include}"))
        .arg(&source)
        .arg("-o")
        .arg(dir.join(format!("leaky_ext{suffix}")))
        .output()
        .expect("running cc");
    assert!(
        output.status.success(),
        "building {}: {}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}
