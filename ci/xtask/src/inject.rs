//! `cargo xtask inject`: sends a fault (or any request) to the control socket
//! of a running `cargo xtask run` VM's backend (docs/control.md,
//! docs/fault-injection.md). The fault is passed through as JSON; shorthand
//! (`copy_error count=3`) is parsed by the backend crate's own parser, so the
//! catalogue is known in one place only. Host-side faults (a failed link, a
//! killed backend, a hot-unplug and re-plug) are applied by xtask itself
//! (src/hostfault.rs).

use crate::build;
use crate::hostfault;
use anyhow::{bail, Context, Result};
use clap::Args;
use hmmgpu_device::faults::{AerSeverity, HostFault};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// The GPU whose backend gets the request (its `gpuN.control` socket).
    #[arg(long, default_value_t = 0)]
    pub gpu: u32,
    /// The run directory of the VM (default: the latest `cargo xtask run`,
    /// recorded in target/xtask/last-run).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Send this raw JSON request instead of a fault, e.g. '{"cmd":"list"}',
    /// '{"cmd":"stats"}', '{"cmd":"clear"}'.
    #[arg(long, value_name = "JSON", conflicts_with = "fault")]
    pub request: Option<String>,
    /// The fault: one JSON object ('{"kind":"copy_error","count":3}') or
    /// KIND [KEY=VALUE...] (copy_error count=3 range=vram:0x100000:4096).
    /// Host-side faults go to QEMU or the backend process instead:
    /// `link_down on|off` (QMP qom-set), `kill_backend` (SIGKILL),
    /// `aer correctable|nonfatal|fatal` (HMP pcie_aer_inject_error),
    /// `unplug` (QMP device_del, waits for the guest to release the
    /// device), `plug` (QMP device_add of the unplugged GPU).
    #[arg(value_name = "FAULT", required_unless_present = "request")]
    pub fault: Vec<String>,
}

/// The file `cargo xtask run` records its run directory in while it runs.
pub fn last_run_file() -> PathBuf {
    build::repo_root().join("target/xtask/last-run")
}

/// Records `run_dir` as the latest run's (for `cargo xtask inject`).
pub fn record_run(run_dir: &Path) -> Result<()> {
    let f = last_run_file();
    if let Some(dir) = f.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&f, format!("{}\n", run_dir.display()))
        .with_context(|| format!("writing {}", f.display()))
}

/// Removes the record if it still names `run_dir` (the run is over).
pub fn forget_run(run_dir: &Path) {
    let f = last_run_file();
    if std::fs::read_to_string(&f).is_ok_and(|s| Path::new(s.trim()) == run_dir) {
        let _ = std::fs::remove_file(&f);
    }
}

/// The control socket of GPU `gpu` in `run_dir`.
pub fn control_socket(run_dir: &Path, gpu: u32) -> PathBuf {
    run_dir.join(format!("gpu{gpu}.control"))
}

/// Sends `request` to GPU `gpu`'s backend in `run_dir`; returns the reply,
/// or an error if it cannot be reached or answers `"ok":false`.
pub fn send(run_dir: &Path, gpu: u32, request: &Value) -> Result<Value> {
    let socket = control_socket(run_dir, gpu);
    if !socket.exists() {
        bail!(
            "no control socket {} (is the VM still running, and does it have GPU {gpu}?)",
            socket.display()
        );
    }
    let reply = hmmgpu_device::control::request(&socket, request)
        .with_context(|| format!("asking {}", socket.display()))?;
    if reply["ok"] != true {
        bail!("gpu{gpu} refused {request}: {reply}");
    }
    Ok(reply)
}

/// Injects one fault (a catalogue JSON object).
pub fn inject(run_dir: &Path, gpu: u32, fault: Value) -> Result<Value> {
    send(run_dir, gpu, &json!({ "cmd": "inject", "fault": fault }))
}

/// The request `args` describe.
fn request_of(args: &InjectArgs) -> Result<Value> {
    if let Some(r) = &args.request {
        let v: Value =
            serde_json::from_str(r).with_context(|| format!("--request {r}: bad JSON"))?;
        if !v.is_object() {
            bail!("--request must be a JSON object, got {v}");
        }
        return Ok(v);
    }
    let fault = hmmgpu_device::cli::parse_fault_args(&args.fault)
        .map_err(|e| anyhow::anyhow!("bad fault {:?}: {e}", args.fault.join(" ")))?;
    Ok(json!({ "cmd": "inject", "fault": fault }))
}

/// A host-side fault (src/hostfault.rs) named by `words`: its JSON, or
/// `link_down on|off`, `kill_backend`, `unplug` or `plug`. None: a backend
/// fault.
fn host_fault_of(words: &[String]) -> Result<Option<Value>> {
    let words: Vec<&str> = words.iter().map(|w| w.as_str()).collect();
    let fault = match words.as_slice() {
        [w] if w.trim_start().starts_with('{') => {
            let v: Value = serde_json::from_str(w).with_context(|| format!("bad JSON {w}"))?;
            if !hostfault::is_host_fault(&v) {
                return Ok(None);
            }
            HostFault::from_json(&v)?
        }
        ["kill_backend"] => HostFault::KillBackend {},
        ["unplug"] => HostFault::Unplug { timeout_s: None },
        ["plug"] => HostFault::Plug {},
        ["unplug" | "plug", ..] => bail!(
            "{} takes no arguments (the wait for the guest: '{{\"kind\":\"unplug\",\"timeout_s\":N}}')",
            words[0]
        ),
        ["link_down", "on" | "down=true"] => HostFault::LinkDown { down: true },
        ["link_down", "off" | "down=false"] => HostFault::LinkDown { down: false },
        ["link_down", ..] => bail!("usage: link_down on|off"),
        ["kill_backend", ..] => bail!("kill_backend takes no arguments"),
        ["aer", severity] => HostFault::Aer {
            error: serde_json::from_value::<AerSeverity>(json!(severity))
                .with_context(|| "usage: aer correctable|nonfatal|fatal")?,
        },
        ["aer", ..] => bail!("usage: aer correctable|nonfatal|fatal"),
        _ => return Ok(None),
    };
    Ok(Some(serde_json::to_value(fault)?))
}

/// `cargo xtask inject`: prints the backend's JSON answer (or, for a
/// host-side fault, what xtask did); status 0 when it says ok, 1 when it
/// does not or cannot be reached, 2 for a bad fault.
pub fn run(args: &InjectArgs) -> Result<i32> {
    let host = match args.request {
        Some(_) => Ok(None),
        None => host_fault_of(&args.fault),
    };
    let parsed = host.and_then(|h| match h {
        Some(fault) => Ok((Some(fault), Value::Null)),
        None => request_of(args).map(|r| (None, r)),
    });
    let (host, request) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("[xtask] inject: {e:#}");
            return Ok(2);
        }
    };
    let run_dir = match &args.run_dir {
        Some(d) => d.clone(),
        None => {
            let f = last_run_file();
            match std::fs::read_to_string(&f) {
                Ok(s) => PathBuf::from(s.trim()),
                Err(e) => {
                    eprintln!(
                        "[xtask] inject: no running `cargo xtask run` recorded in {} ({e}); pass --run-dir",
                        f.display()
                    );
                    return Ok(1);
                }
            }
        }
    };
    let result = match &host {
        Some(fault) => hostfault::apply(&run_dir, args.gpu, fault),
        None => send(&run_dir, args.gpu, &request),
    };
    match result {
        Ok(reply) => {
            println!("{reply}");
            Ok(0)
        }
        Err(e) => {
            eprintln!("[xtask] inject: {e:#}");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InjectArgs,
    }

    fn parse(argv: &[&str]) -> Result<Value> {
        let cli = Cli::try_parse_from(std::iter::once("inject").chain(argv.iter().copied()))?;
        request_of(&cli.args)
    }

    #[test]
    fn requests() {
        assert_eq!(
            parse(&["copy_error", "count=3"]).unwrap(),
            json!({"cmd": "inject", "fault": {"kind": "copy_error", "count": 3}})
        );
        assert_eq!(
            parse(&[r#"{"kind":"latency","us":2000}"#]).unwrap(),
            json!({"cmd": "inject", "fault": {"kind": "latency", "us": 2000}})
        );
        assert_eq!(
            parse(&["--request", r#"{"cmd":"list"}"#]).unwrap(),
            json!({"cmd": "list"})
        );
        assert!(parse(&[]).is_err(), "a fault or --request is required");
        parse(&["copy_error", "count"]).unwrap_err();
        parse(&["--request", "[1]"]).unwrap_err();
        parse(&["--request", "{", "ecc"]).unwrap_err();
    }

    #[test]
    fn host_faults() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            host_fault_of(&w(&["link_down", "on"])).unwrap(),
            Some(json!({"kind": "link_down", "down": true}))
        );
        assert_eq!(
            host_fault_of(&w(&[r#"{"kind":"kill_backend"}"#])).unwrap(),
            Some(json!({"kind": "kill_backend"}))
        );
        assert_eq!(host_fault_of(&w(&["copy_error", "count=3"])).unwrap(), None);
        host_fault_of(&w(&["link_down"])).unwrap_err();
        host_fault_of(&w(&["kill_backend", "now"])).unwrap_err();
        assert_eq!(
            host_fault_of(&w(&["aer", "fatal"])).unwrap(),
            Some(json!({"kind": "aer", "error": "fatal"}))
        );
        host_fault_of(&w(&["aer", "severe"])).unwrap_err();
        assert_eq!(
            host_fault_of(&w(&["unplug"])).unwrap(),
            Some(json!({"kind": "unplug"}))
        );
        assert_eq!(
            host_fault_of(&w(&["plug"])).unwrap(),
            Some(json!({"kind": "plug"}))
        );
        assert_eq!(
            host_fault_of(&w(&[r#"{"kind":"unplug","timeout_s":120}"#])).unwrap(),
            Some(json!({"kind": "unplug", "timeout_s": 120}))
        );
        host_fault_of(&w(&["plug", "gpu=1"])).unwrap_err();
    }

    #[test]
    fn unreachable_socket_is_an_error() {
        let dir = std::env::temp_dir().join(format!("xtask-inject-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = send(&dir, 3, &json!({"cmd": "ping"})).unwrap_err();
        assert!(format!("{e:#}").contains("gpu3.control"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
