//! Starting a command so that it is traced from its first instruction, and catching it
//! just before it exits, while its memory map can still be read.
//!
//! The child stops itself (SIGSTOP) between fork and exec, so probes can be attached to
//! its pid before any of its code runs; the uprobes follow it through exec because they
//! are scoped to the task. ptrace's exit event then stops it once more with its address
//! space intact, so its final numbers and symbols can be read. ptrace requests must come
//! from the thread that forked, so one thread owns the child for its whole life.
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::Path,
    sync::mpsc::{Receiver, Sender, channel},
    thread::JoinHandle,
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::{
        ptrace,
        signal::{Signal, raise},
        wait::{WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork},
};

/// What happens to the child, as seen by its owner thread.
#[derive(Debug)]
pub enum ChildEvent {
    /// The main thread is about to exit; it waits until [`TracedChild::resume`].
    Exiting,
    /// Gone, with this exit code (128 + signal number when killed).
    Exited(i32),
    /// Something went wrong with the child itself.
    Failed(String),
}

pub struct TracedChild {
    pub pid: u32,
    pub events: Receiver<ChildEvent>,
    resume: Sender<()>,
    owner: Option<JoinHandle<()>>,
}

impl TracedChild {
    /// Forks and stops `program` before exec. Nothing of it runs until `resume`.
    pub fn spawn(program: &Path, args: &[String]) -> Result<Self> {
        let path =
            CString::new(program.as_os_str().as_bytes()).context("program path has a NUL byte")?;
        let argv = std::iter::once(program.display().to_string())
            .chain(args.iter().cloned())
            .map(|a| CString::new(a).context("argument has a NUL byte"))
            .collect::<Result<Vec<_>>>()?;
        let (pid_tx, pid_rx) = channel();
        let (event_tx, events) = channel();
        let (resume, resume_rx) = channel();
        let owner = std::thread::Builder::new()
            .name("memtrace-child".into())
            .spawn(move || own_child(path, argv, pid_tx, event_tx, resume_rx))?;
        let pid = pid_rx.recv().context("the child owner thread died")??;
        Ok(Self {
            pid,
            events,
            resume,
            owner: Some(owner),
        })
    }

    /// Lets the child run (after spawn) or finish exiting (after [`ChildEvent::Exiting`]).
    pub fn resume(&self) {
        let _ = self.resume.send(());
    }
}

impl Drop for TracedChild {
    fn drop(&mut self) {
        // PTRACE_O_EXITKILL: if memtrace goes, the child goes with it; make sure the owner
        // thread is not left waiting for a resume that never comes.
        let _ = nix::sys::signal::kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let _ = self.resume.send(());
        if let Some(owner) = self.owner.take() {
            let _ = owner.join();
        }
    }
}

fn own_child(
    path: CString,
    argv: Vec<CString>,
    pid_tx: Sender<Result<u32>>,
    events: Sender<ChildEvent>,
    resume: Receiver<()>,
) {
    // Built before fork: the child must not allocate, or its first traced malloc would be
    // memtrace's own (and malloc after fork in a threaded program is not safe anyway).
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    // SAFETY: the child only calls async-signal-safe functions before exec.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = ptrace::traceme();
            let _ = raise(Signal::SIGSTOP);
            // SAFETY: NUL-terminated strings and a NULL-terminated array, alive until exec.
            unsafe { libc::execv(path.as_ptr(), argv_ptrs.as_ptr()) };
            // SAFETY: exec failed; leave without running the parent's atexit handlers.
            unsafe { libc::_exit(127) }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            let _ = pid_tx.send(Err(e).context("fork"));
            return;
        }
    };
    match waitpid(child, None) {
        Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
        other => {
            let _ = pid_tx.send(Err(anyhow::anyhow!(
                "child did not stop before exec: {other:?}"
            )));
            return;
        }
    }
    let options = ptrace::Options::PTRACE_O_EXITKILL
        | ptrace::Options::PTRACE_O_TRACEEXIT
        | ptrace::Options::PTRACE_O_TRACEEXEC;
    if let Err(e) = ptrace::setoptions(child, options) {
        let _ = pid_tx.send(Err(e).context("ptrace(PTRACE_SETOPTIONS)"));
        return;
    }
    let _ = pid_tx.send(Ok(child.as_raw() as u32));
    if resume.recv().is_err() {
        return;
    }
    let mut deliver: Option<Signal> = None;
    loop {
        if let Err(e) = ptrace::cont(child, deliver.take()) {
            let _ = events.send(ChildEvent::Failed(format!("ptrace(PTRACE_CONT): {e}")));
        }
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                let _ = events.send(ChildEvent::Exited(code));
                return;
            }
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                let _ = events.send(ChildEvent::Exited(128 + signal as i32));
                return;
            }
            Ok(WaitStatus::PtraceEvent(_, _, event)) if event == libc::PTRACE_EVENT_EXIT => {
                let _ = events.send(ChildEvent::Exiting);
                if resume.recv().is_err() {
                    return;
                }
            }
            Ok(WaitStatus::PtraceEvent(..)) => {} // exec: nothing to do
            // A signal for the child: pass it on, as if nobody were watching.
            Ok(WaitStatus::Stopped(_, signal)) => deliver = Some(signal),
            Ok(_) => {}
            Err(e) => {
                let _ = events.send(ChildEvent::Failed(format!("waitpid: {e}")));
                return;
            }
        }
    }
}

/// `program`'s exit code as text for messages.
pub fn describe_exit(code: i32) -> String {
    if code > 128 {
        match Signal::try_from(code - 128) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("exit code {code}"),
        }
    } else if code == 127 {
        "exit code 127 (could it be executed?)".into()
    } else {
        format!("exit code {code}")
    }
}

/// Fails early with a clear message when `program` cannot be run at all.
pub fn check_runnable(program: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(program).with_context(|| format!("{}", program.display()))?;
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("{} is not executable", program.display());
    }
    Ok(())
}
