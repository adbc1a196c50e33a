//! The exit statuses of `cargo xtask run` and `cargo xtask test` that are not
//! the guest command's own. docs/running.md documents the same table: keep
//! them in step.

use std::fmt;

/// Why a run has no status of the guest command to report (or, for
/// [`Exit::GuestInitFailed`], the status the guest's init reports itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest's init could not set up (mount, insmod hmmgpu.ko, decode the
    /// command) and did not run the command. Reported by images/init itself.
    GuestInitFailed = 118,
    /// The guest reported the command's status but did not power off (QEMU
    /// was still running 30 s later): a hang at shutdown.
    NoPowerOff = 119,
    /// A kernel report (panic, oops, BUG, WARNING, KASAN, UBSAN, KFENCE,
    /// lockdep, a lockup, a hung task, an RCU stall...) was seen on the guest
    /// console (a WARNING does not stop the guest, but fails the run).
    GuestKernelError = 120,
    /// The VM did not report the command's status within `--timeout`.
    Timeout = 121,
    /// An `hmmgpu-device` backend failed: it exited while the guest was
    /// still running, exited non-zero or by a signal, printed no stats line,
    /// did not exit after QEMU did, or its stderr has a crash report.
    BackendFailed = 122,
    /// QEMU failed to start, exited without the `HMMGPU-EXIT-STATUS` marker,
    /// exited non-zero, or its stderr has a crash report.
    QemuFailed = 123,
    /// xtask itself failed before or around the VM: a build, a missing tool
    /// or file, a bad argument value, /dev/shm not writable, ...
    HostError = 125,
    /// Interrupted by SIGINT/SIGTERM; everything started was cleaned up.
    Interrupted = 130,
}

impl Exit {
    #[cfg_attr(not(test), allow(dead_code))]
    pub const ALL: [Exit; 8] = [
        Exit::GuestInitFailed,
        Exit::NoPowerOff,
        Exit::GuestKernelError,
        Exit::Timeout,
        Exit::BackendFailed,
        Exit::QemuFailed,
        Exit::HostError,
        Exit::Interrupted,
    ];

    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn name(self) -> &'static str {
        match self {
            Exit::GuestInitFailed => "guest init failed",
            Exit::NoPowerOff => "the guest did not power off",
            Exit::GuestKernelError => "guest kernel error (a splat on the console)",
            Exit::Timeout => "timeout",
            Exit::BackendFailed => "backend failed",
            Exit::QemuFailed => "QEMU failed",
            Exit::HostError => "host-side error",
            Exit::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (exit status {})", self.name(), self.code())
    }
}

/// An error that carries the exit status xtask should end with.
#[derive(Debug)]
pub struct ExitError {
    pub exit: Exit,
    pub message: String,
}

impl fmt::Display for ExitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.exit.name(), self.message)
    }
}

impl std::error::Error for ExitError {}

pub fn interrupted() -> anyhow::Error {
    ExitError {
        exit: Exit::Interrupted,
        message: "interrupted by a signal".into(),
    }
    .into()
}

/// The exit status for an error that ends xtask.
pub fn code_of(err: &anyhow::Error) -> i32 {
    match err.downcast_ref::<ExitError>() {
        Some(e) => e.exit.code(),
        None => Exit::HostError.code(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_outside_shell_conventions() {
        let mut codes: Vec<i32> = Exit::ALL.iter().map(|e| e.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Exit::ALL.len());
        // 126/127 are the shell's "cannot execute"/"not found", 124 is GNU
        // timeout's and kselftest's "timed out".
        for taken in [124, 126, 127] {
            assert!(!codes.contains(&taken), "{taken} has another meaning");
        }
    }

    #[test]
    fn docs_list_every_code() {
        let doc = include_str!("../../../docs/running.md");
        for e in Exit::ALL {
            assert!(
                doc.contains(&format!("| {} ", e.code())),
                "docs/running.md lacks {}",
                e.code()
            );
        }
    }
}
