//! The verdict: how a run ended, from what was seen (docs/running.md, "What
//! makes a run pass"). A pure function of its evidence, so every rule has a
//! host-side test.

use super::{BackendStats, StatsSource, VmResult, BACKEND_EXIT_GRACE};
use crate::exit::Exit;
use crate::splat::{self, Source, Splat};
use std::time::Duration;

/// How one backend ended.
#[derive(Clone, Debug)]
pub(super) struct BackendEnd {
    pub(super) gpu: u32,
    pub(super) argv: Vec<String>,
    /// Its exit status (None: it could not be reaped).
    pub(super) status: Option<std::process::ExitStatus>,
    /// It did not exit within [`BACKEND_EXIT_GRACE`] of QEMU and was stopped.
    pub(super) stopped: bool,
    /// It exited while the guest still ran: its status then.
    pub(super) died_early: Option<std::process::ExitStatus>,
    /// The `hmmgpu-device: stats: {json}` line it printed at exit.
    pub(super) exit_stats: Option<serde_json::Value>,
    /// The control socket's stats, asked before it was stopped.
    pub(super) control_stats: Option<serde_json::Value>,
    pub(super) stderr: Vec<String>,
}

impl BackendEnd {
    /// The stats a test reads: the exit line's, else the control socket's.
    pub(super) fn stats(&self) -> Option<BackendStats> {
        let (source, raw) = match (&self.exit_stats, &self.control_stats) {
            (Some(v), _) => (StatsSource::ExitLine, v.clone()),
            (None, Some(v)) => (StatsSource::ControlSocket, v.clone()),
            (None, None) => return None,
        };
        Some(BackendStats {
            gpu: self.gpu,
            source,
            raw,
        })
    }

    pub(super) fn killed(&self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        self.status.and_then(|s| s.signal()) == Some(libc::SIGKILL)
    }

    pub(super) fn tail(&self) -> String {
        self.stderr[self.stderr.len().saturating_sub(40)..]
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect()
    }
}

/// Why the console loop stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stopped {
    /// QEMU closed its stdout (it exited).
    QemuExited,
    /// The guest reported its status but QEMU kept running past the grace.
    NoPowerOff,
    /// No status within `--timeout`.
    Timeout,
    /// A backend exited while the guest ran (and the test does not kill
    /// backends).
    BackendDied,
}

/// Everything the verdict looks at.
pub(super) struct Evidence {
    pub(super) stopped: Stopped,
    pub(super) timeout: Duration,
    /// The guest command's status from init's marker (with the nonce).
    pub(super) status: Option<i32>,
    pub(super) init_failed: Option<String>,
    pub(super) console_splats: Vec<Splat>,
    /// None: QEMU did not exit by itself and was stopped.
    pub(super) qemu_status: Option<std::process::ExitStatus>,
    pub(super) qemu_stderr: Vec<String>,
    pub(super) backends: Vec<BackendEnd>,
    pub(super) backends_killed: bool,
}

impl Evidence {
    fn host_splats(&self) -> Vec<Splat> {
        let mut v = splat::scan(Source::QemuStderr, &self.qemu_stderr);
        for b in &self.backends {
            v.extend(splat::scan(Source::BackendStderr(b.gpu), &b.stderr));
        }
        v
    }

    pub(super) fn all_splats(&self) -> Vec<Splat> {
        let mut v = self.console_splats.clone();
        v.extend(self.host_splats());
        v
    }
}

fn indented(lines: &[String]) -> String {
    lines.iter().map(|l| format!("    {l}\n")).collect()
}

/// How the run ended. It passes (the command's status) only if the guest
/// reported a status with the run's nonce, powered off by itself, QEMU
/// exited 0, every backend exited 0 after QEMU with its stats line (or was
/// SIGKILLed by a test that kills backends), and no splat appeared in the
/// console, QEMU's stderr or a backend's stderr. Otherwise every problem
/// found is listed; the exit status is the first one's.
pub(super) fn verdict(e: &Evidence) -> VmResult {
    let mut problems: Vec<(Exit, String)> = Vec::new();
    let mut problem = |exit: Exit, msg: String| problems.push((exit, msg));
    match e.stopped {
        Stopped::Timeout => problem(
            Exit::Timeout,
            format!(
                "no HMMGPU-EXIT-STATUS within {}s (--timeout)",
                e.timeout.as_secs()
            ),
        ),
        Stopped::NoPowerOff => problem(
            Exit::NoPowerOff,
            "the guest reported its status but did not power off: QEMU was stopped".into(),
        ),
        Stopped::QemuExited | Stopped::BackendDied => {}
    }
    for b in &e.backends {
        if let Some(s) = b.died_early {
            if !(e.backends_killed && b.killed()) {
                problem(
                    Exit::BackendFailed,
                    format!(
                        "hmmgpu-device for gpu{} exited ({s}) while the guest ran:\n{}",
                        b.gpu,
                        b.tail()
                    ),
                );
            }
        }
    }
    if !e.console_splats.is_empty() {
        problem(
            Exit::GuestKernelError,
            format!(
                "the guest kernel reported errors (command status: {}):\n{}",
                e.status.map_or("none".into(), |s| s.to_string()),
                indented(
                    &e.console_splats
                        .iter()
                        .map(|s| format!("[{}] {}", s.kind, s.line))
                        .collect::<Vec<_>>()
                )
            ),
        );
    }
    if let Some(why) = &e.init_failed {
        problem(
            Exit::GuestInitFailed,
            format!(
                "{why} (init reported status {})",
                e.status.map_or("none".into(), |s| s.to_string())
            ),
        );
    }
    let failed_early = matches!(e.stopped, Stopped::Timeout | Stopped::BackendDied);
    if e.status.is_none() && !failed_early && e.init_failed.is_none() {
        problem(
            Exit::QemuFailed,
            format!(
                "QEMU exited ({}) without an HMMGPU-EXIT-STATUS marker{}",
                e.qemu_status.map_or("stopped".into(), |s| s.to_string()),
                if e.qemu_stderr.is_empty() {
                    String::new()
                } else {
                    format!("; its stderr:\n{}", indented(&e.qemu_stderr))
                }
            ),
        );
    }
    if let Some(s) = e.qemu_status.filter(|s| !s.success()) {
        if e.status.is_some() {
            problem(
                Exit::QemuFailed,
                format!(
                    "QEMU exited with {s} after the guest powered off{}",
                    if e.qemu_stderr.is_empty() {
                        String::new()
                    } else {
                        format!("; its stderr:\n{}", indented(&e.qemu_stderr))
                    }
                ),
            );
        }
    }
    let host_splats = e.host_splats();
    for s in &host_splats {
        let exit = match s.source {
            Source::QemuStderr => Exit::QemuFailed,
            _ => Exit::BackendFailed,
        };
        problem(exit, format!("a crash report: {s}"));
    }
    // How the backends ended after QEMU: only meaningful if QEMU ended
    // normally (a stopped QEMU leaves them in any state).
    if !failed_early {
        for b in &e.backends {
            if e.backends_killed && b.killed() {
                continue;
            }
            if b.died_early.is_some() {
                continue; // reported above
            }
            let how = b.status.map_or("unknown".into(), |s| s.to_string());
            if b.stopped {
                problem(
                    Exit::BackendFailed,
                    format!(
                        "hmmgpu-device for gpu{} did not exit within {}s of QEMU (stopped; {how}):\n{}",
                        b.gpu,
                        BACKEND_EXIT_GRACE.as_secs(),
                        b.tail()
                    ),
                );
            } else if !b.status.is_some_and(|s| s.success()) {
                problem(
                    Exit::BackendFailed,
                    format!(
                        "hmmgpu-device for gpu{} exited with {how} at shutdown:\n{}",
                        b.gpu,
                        b.tail()
                    ),
                );
            } else if b.exit_stats.is_none() {
                problem(
                    Exit::BackendFailed,
                    format!(
                        "hmmgpu-device for gpu{} exited 0 without its stats line:\n{}",
                        b.gpu,
                        b.tail()
                    ),
                );
            }
        }
    }
    match problems.first() {
        None => match e.status {
            Some(s) => VmResult::Exited(s),
            // Unreachable: no status is a problem above.
            None => VmResult::Failed(Exit::QemuFailed, "no status".into()),
        },
        Some((exit, _)) => VmResult::Failed(
            *exit,
            problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: i32) -> std::process::ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        std::process::ExitStatus::from_raw(code << 8)
    }

    fn signalled(sig: i32) -> std::process::ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        std::process::ExitStatus::from_raw(sig)
    }

    fn backend(gpu: u32) -> BackendEnd {
        BackendEnd {
            gpu,
            status: Some(status(0)),
            stopped: false,
            argv: vec!["hmmgpu-device".into()],
            died_early: None,
            exit_stats: Some(serde_json::json!({"commands": 5})),
            control_stats: None,
            stderr: vec![
                "[INFO hmmgpu_device::cli] listening".into(),
                "hmmgpu-device: stats: {\"commands\":5}".into(),
            ],
        }
    }

    /// A run everything about which is right: the guest said 0, powered off,
    /// QEMU and two backends exited 0 with stats, no splat.
    fn clean() -> Evidence {
        Evidence {
            stopped: Stopped::QemuExited,
            timeout: Duration::from_secs(600),
            status: Some(0),
            init_failed: None,
            console_splats: Vec::new(),
            qemu_status: Some(status(0)),
            qemu_stderr: Vec::new(),
            backends: vec![backend(0), backend(1)],
            backends_killed: false,
        }
    }

    fn failed_with(e: &Evidence) -> (Exit, String) {
        match verdict(e) {
            VmResult::Failed(x, m) => (x, m),
            r => panic!("the run passed ({r:?})"),
        }
    }

    #[test]
    fn verdict_passes_only_a_clean_run() {
        assert_eq!(verdict(&clean()), VmResult::Exited(0));
        let mut e = clean();
        e.status = Some(7);
        assert_eq!(verdict(&e), VmResult::Exited(7));
    }

    #[test]
    fn verdict_no_power_off() {
        // Old behaviour: QEMU stopped 30 s after the marker, and the run
        // passed with the marker's status.
        let mut e = clean();
        e.stopped = Stopped::NoPowerOff;
        e.qemu_status = None;
        assert_eq!(failed_with(&e).0, Exit::NoPowerOff);
    }

    #[test]
    fn verdict_qemu_exit_status() {
        let mut e = clean();
        e.qemu_status = Some(status(1));
        e.qemu_stderr = vec!["qemu-system-x86_64: vhost lost".into()];
        let (x, m) = failed_with(&e);
        assert_eq!(x, Exit::QemuFailed);
        assert!(m.contains("vhost lost"), "{m}");
        let mut e = clean();
        e.qemu_status = Some(signalled(libc::SIGSEGV));
        assert_eq!(failed_with(&e).0, Exit::QemuFailed);
    }

    #[test]
    fn verdict_backend_at_shutdown() {
        // Exits 1 at shutdown (old behaviour: "reported no stats", pass).
        let mut e = clean();
        e.backends[1].status = Some(status(1));
        e.backends[1].exit_stats = None;
        let (x, m) = failed_with(&e);
        assert_eq!(x, Exit::BackendFailed);
        assert!(m.contains("gpu1") && m.contains("exit status: 1"), "{m}");
        // Exits 0 but never printed its stats.
        let mut e = clean();
        e.backends[0].exit_stats = None;
        assert_eq!(failed_with(&e).0, Exit::BackendFailed);
        // Hangs after QEMU exited and has to be stopped.
        let mut e = clean();
        e.backends[0].stopped = true;
        e.backends[0].status = Some(signalled(libc::SIGTERM));
        e.backends[0].exit_stats = None;
        e.backends[0].control_stats = Some(serde_json::json!({"commands": 5}));
        assert_eq!(failed_with(&e).0, Exit::BackendFailed);
        // Dies while the guest runs.
        let mut e = clean();
        e.stopped = Stopped::BackendDied;
        e.status = None;
        e.qemu_status = None;
        e.backends[0].died_early = Some(signalled(libc::SIGSEGV));
        e.backends[0].status = e.backends[0].died_early;
        let (x, m) = failed_with(&e);
        assert_eq!(x, Exit::BackendFailed);
        assert!(m.contains("while the guest ran"), "{m}");
    }

    #[test]
    fn verdict_killed_backends_only_where_the_test_kills_them() {
        let kill = |e: &mut Evidence| {
            e.backends[0].died_early = Some(signalled(libc::SIGKILL));
            e.backends[0].status = e.backends[0].died_early;
            e.backends[0].exit_stats = None;
        };
        // The kill test: SIGKILL expected.
        let mut e = clean();
        e.backends_killed = true;
        kill(&mut e);
        assert_eq!(verdict(&e), VmResult::Exited(0));
        // The link-down test shares the guest program but kills nothing: a
        // backend that died there fails (old behaviour: passed).
        let mut e = clean();
        kill(&mut e);
        assert_eq!(failed_with(&e).0, Exit::BackendFailed);
        // Even where backends are killed, a crash is not a kill.
        let mut e = clean();
        e.backends_killed = true;
        e.backends[0].died_early = Some(status(101));
        e.backends[0].status = Some(status(101));
        assert_eq!(failed_with(&e).0, Exit::BackendFailed);
    }

    #[test]
    fn verdict_splats_in_every_stream() {
        // A backend's stderr (old behaviour: never scanned).
        let mut e = clean();
        e.backends[1].stderr.insert(
            1,
            "thread 'vhost' panicked at device/src/backend.rs:10:5:".into(),
        );
        let (x, m) = failed_with(&e);
        assert_eq!(x, Exit::BackendFailed);
        assert!(m.contains("gpu1's backend stderr"), "{m}");
        let mut e = clean();
        e.backends[0].stderr.push("BUG: KASAN: planted".into());
        assert_eq!(failed_with(&e).0, Exit::BackendFailed);
        // QEMU's stderr.
        let mut e = clean();
        e.qemu_stderr =
            vec!["qemu-system-x86_64: ../hw/virtio/virtio.c:1: f: Assertion `x' failed.".into()];
        assert_eq!(failed_with(&e).0, Exit::QemuFailed);
        // The console.
        let mut e = clean();
        e.console_splats = splat::scan(
            Source::Console,
            &["[ 9.0] INFO: task kworker/0:1:12 blocked for more than 120 seconds.".to_string()],
        );
        assert_eq!(failed_with(&e).0, Exit::GuestKernelError);
    }

    #[test]
    fn verdict_without_a_status() {
        let mut e = clean();
        e.status = None;
        e.qemu_stderr = vec!["qemu-system-x86_64: cannot set up guest memory".into()];
        let (x, m) = failed_with(&e);
        assert_eq!(x, Exit::QemuFailed);
        assert!(m.contains("cannot set up guest memory"), "{m}");
        let mut e = clean();
        e.status = None;
        e.stopped = Stopped::Timeout;
        e.qemu_status = None;
        assert_eq!(failed_with(&e).0, Exit::Timeout);
        let mut e = clean();
        e.status = Some(118);
        e.init_failed = Some("mount proc on /proc".into());
        assert_eq!(failed_with(&e).0, Exit::GuestInitFailed);
    }
}
