//! Faults a running VM gets from the host side rather than from the
//! backend's catalogue (docs/fault-injection.md, "Host-side faults"):
//!
//! - `{"kind":"link_down","down":true|false}`: the VRAM BAR's PCIe link
//!   fails (reads all-ones, writes dropped) or comes back, through QEMU's
//!   `link-down` QOM property of `vhost-user-hmmgpu-pci` (qom-set over QMP).
//! - `{"kind":"kill_backend"}`: the GPU's `hmmgpu-device` process is killed
//!   (SIGKILL): a surprise loss of the device.
//! - `{"kind":"mce","addr":PHYS}`: an uncorrected, action-optional memory
//!   error (a machine check, QEMU's HMP `mce`) at guest-physical PHYS, e.g.
//!   a device-coherent page in the VRAM BAR. x86 guests only; the guest
//!   must see an Intel CPU for Linux to recover from it (see `MCE_CPU`).
//!
//! Both act on a run directory of `cargo xtask run` (its `qmp.sock` and
//! `gpuN.pid`).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Whether `fault` is one of the host-side kinds above.
pub fn is_host_fault(fault: &Value) -> bool {
    matches!(
        fault["kind"].as_str(),
        Some("link_down" | "kill_backend" | "mce" | "aer")
    )
}

/// Applies a host-side fault to GPU `gpu` of the VM in `run_dir`.
pub fn apply(run_dir: &Path, gpu: u32, fault: &Value) -> Result<Value> {
    let obj = fault.as_object().context("a fault is a JSON object")?;
    match fault["kind"].as_str() {
        Some("link_down") => {
            only_members(obj, "link_down", &["down"])?;
            let down = fault["down"]
                .as_bool()
                .context("link_down needs \"down\": true or false")?;
            set_link_down(run_dir, gpu, down)
        }
        Some("mce") => {
            only_members(obj, "mce", &["addr"])?;
            let addr = fault["addr"]
                .as_u64()
                .context("mce needs \"addr\": the guest-physical address")?;
            machine_check(run_dir, addr)
        }
        Some("kill_backend") => {
            only_members(obj, "kill_backend", &[])?;
            kill_backend(run_dir, gpu)
        }
        Some("aer") => {
            only_members(obj, "aer", &["error"])?;
            let severity = fault["error"]
                .as_str()
                .context("aer needs \"error\": \"correctable\", \"nonfatal\" or \"fatal\"")?;
            inject_aer(run_dir, gpu, severity)
        }
        _ => bail!("not a host-side fault: {fault}"),
    }
}

/// Fails on a member of the `kind` fault `obj` other than "kind" and `allowed`.
fn only_members(obj: &serde_json::Map<String, Value>, kind: &str, allowed: &[&str]) -> Result<()> {
    if let Some(k) = obj
        .keys()
        .find(|k| *k != "kind" && !allowed.contains(&k.as_str()))
    {
        bail!("{kind}: unknown member '{k}' (it takes {allowed:?})");
    }
    Ok(())
}

/// Sets `link-down` of GPU `gpu`'s device (QOM path /machine/peripheral/gpuN).
pub fn set_link_down(run_dir: &Path, gpu: u32, down: bool) -> Result<Value> {
    let path = format!("/machine/peripheral/gpu{gpu}");
    qmp(
        &run_dir.join("qmp.sock"),
        "qom-set",
        json!({ "path": path, "property": "link-down", "value": down }),
    )?;
    // Read it back: the property really changed.
    let now = qmp(
        &run_dir.join("qmp.sock"),
        "qom-get",
        json!({ "path": path, "property": "link-down" }),
    )?;
    if now != json!(down) {
        bail!("qom-set {path} link-down={down} did not stick: qom-get says {now}");
    }
    Ok(json!({ "ok": true, "link_down": down }))
}

/// The TCG guest CPU for machine-check tests: Linux recovers from an
/// uncorrected memory error only with MCA recovery, which QEMU's MCG_CAP
/// offers (MCG_SER_P) but Linux uses on Intel CPUs only (AMD needs SUCCOR,
/// which qemu64 lacks: the guest panics "Uncorrected error without MCA
/// Recovery").
pub const MCE_CPU: &str = "qemu64,vendor=GenuineIntel";

/// Injects an action-optional uncorrected memory error (SRAO, "memory
/// scrubbing": MCi_STATUS VAL|UC|EN|MISCV|ADDRV|S, MCACOD 0xc0) at `addr`
/// into bank 9, broadcast from CPU 0; Linux queues memory_failure() for its
/// page.
pub fn machine_check(run_dir: &Path, addr: u64) -> Result<Value> {
    // -b: to every CPU, as the hardware does (Linux waits for all of them).
    let line = format!("mce -b 0 9 0xbd000000000000c0 5 {addr:#x} 0x86");
    let out = qmp(
        &run_dir.join("qmp.sock"),
        "human-monitor-command",
        json!({ "command-line": line }),
    )?;
    // HMP reports its errors as text.
    if out.as_str().is_some_and(|s| !s.trim().is_empty()) {
        bail!("QEMU: {line}: {}", out.as_str().unwrap().trim());
    }
    Ok(json!({ "ok": true, "mce": addr }))
}

/// SIGKILLs GPU `gpu`'s backend (its pid from `gpuN.pid`).
/// The PCIe error `pcie_aer_inject_error` raises for an AER severity: one
/// that QEMU's AER capability does not mask by default and that has this
/// severity in the default severity register (INTN, the obvious "internal
/// error", is masked, so injecting it does nothing).
pub fn aer_error_name(severity: &str) -> Result<&'static str> {
    Ok(match severity {
        "correctable" => "RCVR",   // receiver error
        "nonfatal" => "COMP_TIME", // completion timeout
        "fatal" => "DLP",          // data link protocol error
        other => bail!("aer: error must be correctable, nonfatal or fatal, not {other:?}"),
    })
}

/// Raises a PCIe AER error of `severity` on GPU `gpu` (HMP
/// `pcie_aer_inject_error`; the device has `aer=on` behind its root port,
/// x86_64 q35 only): the guest's AER driver handles it.
pub fn inject_aer(run_dir: &Path, gpu: u32, severity: &str) -> Result<Value> {
    let name = aer_error_name(severity)?;
    let line = format!("pcie_aer_inject_error gpu{gpu} {name}");
    let out = qmp(
        &run_dir.join("qmp.sock"),
        "human-monitor-command",
        json!({ "command-line": line }),
    )?;
    // "OK id: gpu0 root bus: ..." on success, "Error: ..." otherwise.
    let text = out.as_str().unwrap_or_default().trim();
    if !text.starts_with("OK") {
        bail!("QEMU: {line}: {text}");
    }
    Ok(json!({ "ok": true, "aer": severity, "error": name }))
}

pub fn kill_backend(run_dir: &Path, gpu: u32) -> Result<Value> {
    let pid_file = run_dir.join(format!("gpu{gpu}.pid"));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no pid", pid_file.display()))?;
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -KILL {pid} (gpu{gpu}'s backend) failed ({status})");
    }
    Ok(json!({ "ok": true, "killed": pid }))
}

/// Runs one QMP command on the socket at `sock`; returns its "return".
pub fn qmp(sock: &Path, execute: &str, arguments: Value) -> Result<Value> {
    let stream =
        UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    // The greeting, then capabilities negotiation, then the command.
    let greeting = read_message(&mut reader)?;
    if greeting.get("QMP").is_none() {
        bail!("{} is not a QMP socket: {greeting}", sock.display());
    }
    for (cmd, args) in [
        ("qmp_capabilities", json!({})),
        (execute, arguments.clone()),
    ] {
        let line = json!({ "execute": cmd, "arguments": args }).to_string();
        writeln!(writer, "{line}")?;
        loop {
            let msg = read_message(&mut reader)?;
            if msg.get("event").is_some() {
                continue; // asynchronous events are not answers
            }
            if let Some(e) = msg.get("error") {
                bail!("QMP {cmd} {args}: {e}");
            }
            if let Some(r) = msg.get("return") {
                if cmd == execute {
                    return Ok(r.clone());
                }
                break;
            }
            bail!("QMP {cmd}: unexpected answer {msg}");
        }
    }
    unreachable!("the loop returns the command's answer")
}

fn read_message(r: &mut impl BufRead) -> Result<Value> {
    let mut line = String::new();
    if r.read_line(&mut line).context("reading from QMP")? == 0 {
        bail!("QMP closed the connection");
    }
    serde_json::from_str(line.trim()).with_context(|| format!("QMP sent non-JSON {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_fault_kinds() {
        assert!(is_host_fault(&json!({"kind": "link_down", "down": true})));
        assert!(is_host_fault(&json!({"kind": "kill_backend"})));
        assert!(!is_host_fault(&json!({"kind": "copy_error"})));
        let dir = Path::new("/nonexistent");
        assert!(apply(dir, 0, &json!({"kind": "link_down"})).is_err());
        assert!(apply(dir, 0, &json!({"kind": "link_down", "down": true, "x": 1})).is_err());
        assert!(apply(dir, 0, &json!({"kind": "kill_backend", "x": 1})).is_err());
        assert!(is_host_fault(&json!({"kind": "aer", "error": "fatal"})));
        assert!(apply(dir, 0, &json!({"kind": "aer", "error": "bad"})).is_err());
        assert!(apply(dir, 0, &json!({"kind": "aer"})).is_err());
        assert_eq!(aer_error_name("fatal").unwrap(), "DLP");
    }

    /// A fake QMP server on a socket pair: greeting, capabilities, command.
    #[test]
    fn qmp_exchange() {
        let dir = std::env::temp_dir().join(format!("hmmgpu-qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut got = Vec::new();
            for answer in [r#"{"return": {}}"#, r#"{"event": "X", "data": {}}"#] {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                got.push(l);
                writeln!(w, "{answer}").unwrap();
            }
            writeln!(w, r#"{{"return": true}}"#).unwrap();
            got
        });
        let r = qmp(
            &sock,
            "qom-get",
            json!({"path": "/p", "property": "link-down"}),
        )
        .unwrap();
        assert_eq!(r, json!(true));
        let got = server.join().unwrap();
        assert!(got[0].contains("qmp_capabilities"));
        assert!(got[1].contains("qom-get") && got[1].contains("link-down"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
