// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The command line, and the one vhost-user session the daemon serves.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use clap::Parser;
use log::{info, LevelFilter};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

use crate::backend::HmmGpuBackend;
use crate::control::ControlServer;
use crate::engine::{Engine, FaultInjector, GuestRam, Stats, StatsSnapshot};
use crate::vram::Vram;

/// hmmgpu vhost-user device backend: serves one VM's virtual GPU (its
/// command queue, config space and VRAM) over a vhost-user socket, and exits
/// when the VM disconnects.
#[derive(Debug, Parser)]
#[command(name = "hmmgpu-device", version)]
pub struct Args {
    /// vhost-user socket to listen on (QEMU connects to it).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// VRAM file, the one QEMU's share=on memory backend maps; created when
    /// missing, otherwise its size must equal --vram-size.
    #[arg(long, value_name = "FILE")]
    pub vram_path: PathBuf,
    /// VRAM size: a power of two of at least 2M; suffixes K, M, G, T
    /// (powers of 1024), e.g. 64M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub vram_size: u64,
    /// Control socket (JSON lines, mode 0600; see docs/control.md).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Log level: off, error, warn, info, debug or trace (default: RUST_LOG,
    /// else info).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<LevelFilter>,
}

/// Parses a byte count with an optional K/M/G/T suffix (binary multiples).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix {c:?} in {text:?}; use K, M, G or T"
                    ))
                }
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 64M or 1073741824"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size {text:?} does not fit in 64 bits"))
}

/// Serves one vhost-user session as `args` say and returns the final
/// counters. Errors are messages for the user.
pub fn run(args: &Args) -> Result<StatsSnapshot, String> {
    let vram = Arc::new(Vram::open(&args.vram_path, args.vram_size).map_err(|e| e.to_string())?);
    let stats = Arc::new(Stats::default());
    let engine = Engine::new(vram, stats.clone(), Arc::new(FaultInjector::default()));
    let _control = match &args.control {
        Some(path) => Some(ControlServer::start(path, stats.clone()).map_err(|e| e.to_string())?),
        None => None,
    };
    let backend = Arc::new(RwLock::new(HmmGpuBackend::new(engine)));
    let mut daemon = VhostUserDaemon::new(
        "hmmgpu-device".to_owned(),
        backend,
        GuestMemoryAtomic::new(GuestRam::new()),
    )
    .map_err(|e| format!("creating the vhost-user daemon: {e}"))?;
    info!(
        "listening on {} (VRAM {} bytes in {})",
        args.socket.display(),
        args.vram_size,
        args.vram_path.display()
    );
    // serve() accepts one front end and returns when it disconnects: one VM,
    // one session.
    let served = daemon.serve(&args.socket);
    let snapshot = stats.snapshot();
    match served {
        Ok(()) => {
            info!("front end disconnected");
            Ok(snapshot)
        }
        Err(e) => Err(format!(
            "vhost-user session on {}: {e}",
            args.socket.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "",
            "M",
            "64X",
            "-1",
            "1.5G",
            "64MB",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn command_line() {
        let args = Args::try_parse_from([
            "hmmgpu-device",
            "--socket",
            "/s",
            "--vram-path",
            "/v",
            "--vram-size",
            "64M",
            "--log-level",
            "debug",
        ])
        .unwrap();
        assert_eq!(args.vram_size, 64 << 20);
        assert_eq!(args.control, None);
        assert_eq!(args.log_level, Some(LevelFilter::Debug));
        assert!(Args::try_parse_from(["hmmgpu-device", "--socket", "/s"]).is_err());
        assert!(Args::try_parse_from([
            "hmmgpu-device",
            "--socket",
            "/s",
            "--vram-path",
            "/v",
            "--vram-size",
            "big",
        ])
        .is_err());
    }
}
