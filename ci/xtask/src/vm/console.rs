//! The guest console: following it line by line (init's markers, splats,
//! the echo modes) and, for `cargo xtask run --shell`, feeding the
//! terminal to it.

use super::{Echo, GpuCounters, Timings};
use crate::build::log;
use crate::splat::{self, Source, Splat};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const MARKER_INIT: &str = "HMMGPU-INIT uptime=";
const MARKER_READY: &str = "HMMGPU-READY uptime=";
// These carry the run's nonce (`MARKER<nonce>...`): images/init reads it from
// the initramfs and deletes it before the command runs, so the command
// cannot print them (docs/running.md, "The guest side").
const MARKER_STATUS: &str = "HMMGPU-EXIT-STATUS=";
const MARKER_INIT_FAILED: &str = "HMMGPU-INIT-FAILED=";
const MARKER_COUNTERS: &str = "HMMGPU-COUNTERS=";

/// Follows console lines: echoes them, times init's markers, takes the
/// nonce-carrying markers (status, init failure, counters) and notes splats.
#[derive(Default)]
pub(super) struct Scanner {
    pub(super) echo: Option<Echo>,
    pub(super) launch: Option<Instant>,
    /// The run's nonce: markers without it are the command's output.
    pub(super) nonce: String,
    pub(super) console: Vec<String>,
    /// Each console line's time after QEMU's launch.
    pub(super) console_times: Vec<Duration>,
    /// [`Echo::CommandOnly`]: whether the command is running (between
    /// init's "running:" line and its first end marker), and an empty
    /// line held back (init prints one before its markers).
    pub(super) in_command: bool,
    pub(super) held_empty: bool,
    pub(super) splats: Vec<Splat>,
    pub(super) timings: Timings,
    pub(super) status: Option<i32>,
    pub(super) init_failed: Option<String>,
    pub(super) counters: Vec<GpuCounters>,
}

impl Scanner {
    pub(super) fn feed(&mut self, t: Instant, line: String) {
        self.echo(&line);
        let at = t.duration_since(self.launch.unwrap_or(t));
        if line.contains(MARKER_INIT) && self.timings.init.is_none() {
            self.timings.init = Some(at);
        }
        if line.contains(MARKER_READY) && self.timings.ready.is_none() {
            self.timings.ready = Some(at);
        }
        if let Some(rest) = self.marker(&line, MARKER_INIT_FAILED) {
            self.init_failed = Some(rest.trim_start_matches(':').trim().to_string());
        }
        if let Some(rest) = self.marker(&line, MARKER_COUNTERS) {
            match parse_counters(rest) {
                Some(c) => self.counters.push(c),
                None => log(format!("warning: malformed counters marker: {line}")),
            }
        }
        if let Some(rest) = self.marker(&line, MARKER_STATUS) {
            match rest
                .strip_prefix(':')
                .and_then(|n| n.trim().parse::<i32>().ok())
            {
                Some(n) if self.status.is_none() => {
                    self.status = Some(n);
                    self.timings.exit_marker = Some(at);
                }
                Some(_) => log(format!("warning: a second status marker: {line}")),
                None => log(format!("warning: malformed status marker: {line}")),
            }
        } else if line.contains(MARKER_STATUS) && !line.contains(RUNNING) {
            log(format!(
                "note: a status marker without this run's nonce is the guest's own output, not init's: {line}"
            ));
        }
        if let Some(kind) = splat::classify_line(&Source::Console, &line) {
            self.splats.push(Splat {
                kind,
                source: Source::Console,
                line: line.clone(),
            });
        }
        self.console.push(line);
        self.console_times.push(at);
    }

    fn echo(&mut self, line: &str) {
        let to_stdout = |l: &str| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{l}");
            let _ = out.flush();
        };
        match &self.echo {
            None | Some(Echo::Interactive) => {}
            Some(Echo::Raw) => to_stdout(line),
            Some(Echo::Prefixed(p)) => to_stdout(&format!("{p}{line}")),
            Some(Echo::PrefixedStderr(p)) => eprintln!("{p}{line}"),
            Some(Echo::CommandOnly) => {
                if line.contains(RUNNING) && !self.in_command {
                    self.in_command = true;
                    return;
                }
                if !self.in_command {
                    return;
                }
                if line.contains(MARKER_COUNTERS) || line.contains(MARKER_STATUS) {
                    self.in_command = false;
                    self.held_empty = false;
                    return;
                }
                if is_kernel_message(line) {
                    return;
                }
                if std::mem::take(&mut self.held_empty) {
                    to_stdout("");
                }
                if line.is_empty() {
                    self.held_empty = true;
                } else {
                    to_stdout(line);
                }
            }
        }
    }

    /// What follows `marker` and this run's nonce in `line`, if both are there.
    fn marker<'l>(&self, line: &'l str, marker: &str) -> Option<&'l str> {
        let rest = &line[line.find(marker)? + marker.len()..];
        rest.strip_prefix(self.nonce.as_str())
            .filter(|_| !self.nonce.is_empty())
    }
}

/// images/init's line before it runs the command.
pub(super) const RUNNING: &str = "hmmgpu-init: running: ";

/// A printk line: `[    1.234567] ...` (printk.time=1).
pub(super) fn is_kernel_message(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let Some((stamp, _)) = rest.split_once(']') else {
        return false;
    };
    let stamp = stamp.trim();
    !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// `gpu=N name=value...` or `gpu=N unreadable: REASON` (images/init).
pub(super) fn parse_counters(rest: &str) -> Option<GpuCounters> {
    let mut words = rest.split_whitespace();
    let gpu = words.next()?.strip_prefix("gpu=")?.parse().ok()?;
    let rest: Vec<&str> = words.collect();
    if rest.first() == Some(&"unreadable:") {
        return Some(GpuCounters {
            gpu,
            counters: Err(rest[1..].join(" ")),
        });
    }
    let mut counters = BTreeMap::new();
    for w in rest {
        let (k, v) = w.split_once('=')?;
        counters.insert(k.to_string(), v.parse().ok()?);
    }
    Some(GpuCounters {
        gpu,
        counters: Ok(counters),
    })
}

/// Reads QEMU's stdout (the guest console) and sends it line by line; with
/// `passthrough`, also copies every byte to stdout as it comes (a shell's
/// prompt has no newline).
pub(super) fn read_console(
    mut stdout: std::process::ChildStdout,
    tx: mpsc::Sender<(Instant, String)>,
    passthrough: bool,
) {
    let mut buf = [0u8; 4096];
    let mut line = Vec::new();
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if passthrough {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                let l = String::from_utf8_lossy(&line).replace('\r', "");
                line.clear();
                if tx.send((Instant::now(), l)).is_err() {
                    return;
                }
            } else {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        let _ = tx.send((
            Instant::now(),
            String::from_utf8_lossy(&line).replace('\r', ""),
        ));
    }
}

/// The terminal in raw mode while it feeds an interactive guest console
/// (Ctrl-C is a byte for the guest, not a signal for xtask); restored on
/// drop.
pub(super) struct RawTerminal(libc::termios);

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal.
    pub(super) fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a termios this
        // function owns; no other memory is touched.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            t.c_iflag &= !(libc::ICRNL | libc::IXON | libc::INLCR | libc::IGNCR);
            t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawTerminal(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the termios saved by `enter` on fd 0.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

/// Ctrl-A, then `x`: ends an interactive VM (as QEMU's own escape does);
/// Ctrl-A Ctrl-A types one Ctrl-A.
pub(super) const ESCAPE: u8 = 0x01;

/// Copies `input` (xtask's stdin) to the guest console once `ready` (init
/// started the command), watching for the escape; sets `quit` on Ctrl-A x.
/// EOF on the input closes nothing: the guest ends the run.
pub(super) fn relay_stdin(
    mut input: impl Read,
    mut to_guest: impl Write,
    ready: Arc<std::sync::atomic::AtomicBool>,
    quit: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = [0u8; 1024];
    let mut escape = false;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n);
        let mut quitting = false;
        for &b in &buf[..n] {
            if escape {
                escape = false;
                match b {
                    b'x' | b'X' => {
                        quitting = true;
                        break;
                    }
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend([ESCAPE, other]),
                }
            } else if b == ESCAPE {
                escape = true;
            } else {
                out.push(b);
            }
        }
        while !ready.load(Ordering::SeqCst) && !quitting {
            if quit.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !out.is_empty() && (to_guest.write_all(&out).is_err() || to_guest.flush().is_err()) {
            return;
        }
        if quitting {
            quit.store(true, Ordering::SeqCst);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanner(nonce: &str) -> Scanner {
        Scanner {
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn feed(s: &mut Scanner, lines: &[&str]) {
        for l in lines {
            s.feed(Instant::now(), l.to_string());
        }
    }

    #[test]
    fn only_markers_with_the_nonce_count() {
        let mut s = scanner("c0ffee");
        feed(
            &mut s,
            &[
                // The command printing the marker text itself, with no
                // nonce, a wrong one and an empty one.
                "HMMGPU-EXIT-STATUS=0",
                "HMMGPU-EXIT-STATUS=deadbeef:0",
                "HMMGPU-EXIT-STATUS=:0",
                "HMMGPU-INIT-FAILED: forged",
                "HMMGPU-COUNTERS= gpu=0 driver_resets=0",
            ],
        );
        assert_eq!(s.status, None);
        assert_eq!(s.init_failed, None);
        assert!(s.counters.is_empty());
        feed(
            &mut s,
            &[
                "[ 2.0] HMMGPU-COUNTERS=c0ffee gpu=0 commands=12 driver_resets=0 driver_polled_completions=1",
                "HMMGPU-COUNTERS=c0ffee gpu=1 unreadable: cat: read error: No such device",
                "HMMGPU-EXIT-STATUS=c0ffee:3",
                "HMMGPU-EXIT-STATUS=c0ffee:0",
            ],
        );
        assert_eq!(s.status, Some(3), "the first real marker counts");
        assert_eq!(s.counters.len(), 2);
        assert_eq!(
            s.counters[0].counters.as_ref().unwrap()["driver_polled_completions"],
            1
        );
        assert_eq!(
            s.counters[1].counters,
            Err("cat: read error: No such device".to_string())
        );
        // A scanner without a nonce believes nothing.
        let mut s = scanner("");
        feed(&mut s, &["HMMGPU-EXIT-STATUS=:0"]);
        assert_eq!(s.status, None);
    }

    #[test]
    fn init_failure_and_console_splats() {
        let mut s = scanner("n1");
        feed(
            &mut s,
            &[
                "HMMGPU-INIT-FAILED=n1: insmod /lib/modules/hmmgpu.ko (exit status 1)",
                "[ 3.0] BUG: KASAN: slab-use-after-free in hmmgpu_probe+0x10/0x20",
                "HMMGPU-EXIT-STATUS=n1:118",
            ],
        );
        assert_eq!(
            s.init_failed.as_deref(),
            Some("insmod /lib/modules/hmmgpu.ko (exit status 1)")
        );
        assert_eq!(s.splats.len(), 1);
        assert_eq!(s.splats[0].kind, splat::Kind::Kasan);
    }

    #[test]
    fn the_shell_escape() {
        use std::sync::atomic::AtomicBool;
        let relay = |input: &[u8]| {
            let (ready, quit) = (
                Arc::new(AtomicBool::new(true)),
                Arc::new(AtomicBool::new(false)),
            );
            let mut out = Vec::new();
            relay_stdin(input, &mut out, ready, Arc::clone(&quit));
            (out, quit.load(Ordering::SeqCst))
        };
        // Ctrl-C and everything else go to the guest as typed.
        assert_eq!(relay(b"echo hi\x03\n"), (b"echo hi\x03\n".to_vec(), false));
        // Ctrl-A x ends the VM; what came before it still reaches the guest.
        assert_eq!(relay(b"ls\n\x01xrm -rf /\n"), (b"ls\n".to_vec(), true));
        assert_eq!(relay(b"\x01X"), (Vec::new(), true));
        // Ctrl-A Ctrl-A types one Ctrl-A; Ctrl-A other passes both.
        assert_eq!(relay(b"\x01\x01a\x01b"), (b"\x01a\x01b".to_vec(), false));
    }

    #[test]
    fn quiet_echo_keeps_the_command_output_only() {
        assert!(is_kernel_message("[    1.234567] hmmgpu0: registered"));
        assert!(!is_kernel_message("[x] not a stamp"));
        assert!(!is_kernel_message("hello"));
    }
}
