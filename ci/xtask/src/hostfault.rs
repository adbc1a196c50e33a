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
//! - `{"kind":"unplug"}`: an orderly hot-unplug (QMP `device_del`); returns
//!   once QEMU deleted the device, i.e. after the guest's driver let go of
//!   it (evicting its VRAM) and ejected it. The backend is asked first to
//!   serve the device plugged back (`session`, docs/control.md).
//! - `{"kind":"plug"}`: plugs the unplugged GPU back (QMP `device_add`,
//!   the boot's device properties, src/vm.rs `gpu_device_props`).
//!
//! They act on a run directory of `cargo xtask run` (its `qmp.sock`,
//! `gpuN.pid` and `gpuN.control`).

use crate::cli::Arch;
use crate::inject;
use crate::vm::gpu_device_props;
use anyhow::{bail, ensure, Context, Result};
use hmmgpu_device::faults::{AerSeverity, HostFault};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Whether `fault` is one of the host-side kinds above.
pub fn is_host_fault(fault: &Value) -> bool {
    HostFault::is_host_fault(fault)
}

/// How long `unplug` waits for the guest to release the device by default:
/// the driver copies all of the VRAM in use back to system RAM first (under
/// TCG about 100 MB/s).
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(60);

/// Applies a host-side fault to GPU `gpu` of the VM in `run_dir` (the JSON
/// is parsed by the catalogue's [`HostFault`]: a member the fault does not
/// take is an error).
pub fn apply(run_dir: &Path, gpu: u32, fault: &Value) -> Result<Value> {
    let parsed = HostFault::from_json(fault).with_context(|| format!("host-side fault {fault}"))?;
    match parsed {
        HostFault::LinkDown { down } => set_link_down(run_dir, gpu, down),
        HostFault::Mce { addr } => machine_check(run_dir, addr),
        HostFault::KillBackend {} => kill_backend(run_dir, gpu),
        HostFault::Aer { error } => inject_aer(run_dir, gpu, error),
        HostFault::Unplug { timeout_s } => unplug(
            run_dir,
            gpu,
            timeout_s.map_or(UNPLUG_TIMEOUT, Duration::from_secs),
        ),
        HostFault::Plug {} => plug(run_dir, gpu),
    }
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
pub fn aer_error_name(severity: AerSeverity) -> &'static str {
    match severity {
        AerSeverity::Correctable => "RCVR",   // receiver error
        AerSeverity::Nonfatal => "COMP_TIME", // completion timeout
        AerSeverity::Fatal => "DLP",          // data link protocol error
    }
}

/// Raises a PCIe AER error of `severity` on GPU `gpu` (HMP
/// `pcie_aer_inject_error`; the device has `aer=on` behind its root port,
/// x86_64 q35 only): the guest's AER driver handles it.
pub fn inject_aer(run_dir: &Path, gpu: u32, severity: AerSeverity) -> Result<Value> {
    let name = aer_error_name(severity);
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

/// The QOM path of GPU `gpu`'s device (its id is `gpuN`, src/vm.rs).
fn device_path(gpu: u32) -> String {
    format!("/machine/peripheral/gpu{gpu}")
}

/// Whether GPU `gpu`'s device exists in QEMU now.
fn device_present(q: &mut Qmp, gpu: u32) -> Result<bool> {
    let children = q.execute("qom-list", json!({ "path": "/machine/peripheral" }))?;
    let name = format!("gpu{gpu}");
    Ok(children
        .as_array()
        .context("qom-list did not answer a list")?
        .iter()
        .any(|c| c["name"] == name.as_str()))
}

/// GPU `gpu`'s backend's front-end sessions (`session` on its control
/// socket, docs/control.md), after setting `serve_next` if given.
fn backend_session(run_dir: &Path, gpu: u32, serve_next: Option<bool>) -> Result<Value> {
    let mut request = json!({ "cmd": "session" });
    if let Some(on) = serve_next {
        request["serve_next"] = json!(on);
    }
    let reply = inject::send(run_dir, gpu, &request)?;
    Ok(reply["session"].clone())
}

/// Polls GPU `gpu`'s backend until its front end is connected (or not) as
/// `connected` says; its session state then, or an error after `timeout`.
fn wait_backend_connected(
    run_dir: &Path,
    gpu: u32,
    connected: bool,
    timeout: Duration,
) -> Result<Value> {
    let until = Instant::now() + timeout;
    loop {
        let session = backend_session(run_dir, gpu, None)?;
        if session["connected"] == connected {
            return Ok(session);
        }
        if Instant::now() >= until {
            bail!(
                "gpu{gpu}'s backend still says connected={} after {}s: {session}",
                !connected,
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Hot-unplugs GPU `gpu` (`device_del`) and waits, at most `timeout`, until
/// QEMU deleted it: the guest's PCI hotplug removed the driver, which
/// evicts the VRAM to system RAM, and ejected the slot. The backend is
/// asked first to wait for the device to be plugged back rather than exit
/// when QEMU hangs up on it.
pub fn unplug(run_dir: &Path, gpu: u32, timeout: Duration) -> Result<Value> {
    let mut q = Qmp::connect(&run_dir.join("qmp.sock"))?;
    if !device_present(&mut q, gpu)? {
        bail!("gpu{gpu} is not plugged in: nothing to unplug (`plug` plugs it back)");
    }
    let before = backend_session(run_dir, gpu, Some(true)).context(
        "unplug needs the GPU's backend running: it serves the device when it is plugged back",
    )?;
    let start = Instant::now();
    if let Err(e) = q.execute("device_del", json!({ "id": format!("gpu{gpu}") })) {
        // Nothing will hang up: the next disconnect is the VM's end again.
        let disarmed = backend_session(run_dir, gpu, Some(false));
        return Err(e.context(format!(
            "device_del gpu{gpu} (the backend was asked not to wait for a re-plug after all: {})",
            match disarmed {
                Ok(_) => "done".to_string(),
                Err(d) => format!("failed: {d:#}"),
            }
        )));
    }
    let path = device_path(gpu);
    let deleted = q.wait_event(
        "DEVICE_DELETED",
        |data| data["path"] == path.as_str(),
        timeout,
    )?;
    if deleted.is_none() {
        bail!(
            "device_del gpu{gpu}: QEMU did not delete the device within {}s: the guest did not \
             release it (its PCI hotplug driver must remove the driver and eject the slot: ACPI \
             hotplug on q35; on pseries an RTAS hotplug event that only userspace drmgr handles). \
             The request stays pending in QEMU, and the backend waits for a re-plug",
            timeout.as_secs()
        );
    }
    let released = start.elapsed();
    ensure!(
        !device_present(&mut q, gpu)?,
        "QEMU sent DEVICE_DELETED for {path} but still lists it under /machine/peripheral"
    );
    // QEMU hangs up on the backend when it unrealizes the device
    // (qemu-patches/0004): that ends the backend's session.
    let after = wait_backend_connected(run_dir, gpu, false, Duration::from_secs(10))
        .context("the device is gone but its vhost-user connection was not closed")?;
    Ok(json!({
        "ok": true,
        "unplugged": format!("gpu{gpu}"),
        "ms": released.as_millis() as u64,
        "sessions_before": before["started"],
        "backend": after,
    }))
}

/// The guest architecture of the QEMU behind `q`.
fn target_arch(q: &mut Qmp) -> Result<Arch> {
    let target = q.execute("query-target", json!({}))?;
    match target["arch"].as_str() {
        Some("x86_64") => Ok(Arch::X86_64),
        // qemu-system-ppc64 runs the pseries little-endian guests of xtask.
        Some("ppc64") => Ok(Arch::Ppc64le),
        _ => bail!("QEMU's target {target} is not one xtask runs"),
    }
}

/// Plugs GPU `gpu` back after an `unplug`: `device_add` with the boot's
/// properties (same chardev, memdev and slot), which connects to the
/// backend still waiting on the socket; the guest's PCI hotplug then probes
/// it.
pub fn plug(run_dir: &Path, gpu: u32) -> Result<Value> {
    let mut q = Qmp::connect(&run_dir.join("qmp.sock"))?;
    if device_present(&mut q, gpu)? {
        bail!("gpu{gpu} is plugged in already (`unplug` it first)");
    }
    let before = backend_session(run_dir, gpu, None)
        .context("plug needs the GPU's backend, which waits for the device after `unplug`")?;
    ensure!(
        before["connected"] == false,
        "gpu{gpu}'s backend still serves a front end ({before}): the device is not plugged in, \
         so QEMU should have hung up on it"
    );
    let props = gpu_device_props(target_arch(&mut q)?, gpu);
    // QMP's device_add checks JSON types: a bool property (`aer`) takes a
    // boolean where the command line takes on/off.
    let args: serde_json::Map<String, Value> = props
        .into_iter()
        .map(|(k, v)| {
            let v = match v.as_str() {
                "on" => Value::Bool(true),
                "off" => Value::Bool(false),
                _ => Value::String(v),
            };
            (k.to_string(), v)
        })
        .collect();
    let start = Instant::now();
    let args = Value::Object(args);
    q.execute("device_add", args.clone())
        .with_context(|| format!("plugging gpu{gpu} back"))?;
    let added = start.elapsed();
    // The device's realize set up its vhost-user session before device_add
    // returned; the backend counts it as it accepts.
    let after = wait_backend_connected(run_dir, gpu, true, Duration::from_secs(10))?;
    ensure!(
        after["started"].as_u64() == before["started"].as_u64().map(|n| n + 1),
        "gpu{gpu}'s backend did not start a new session for the plugged device: before {before}, after {after}"
    );
    Ok(json!({
        "ok": true,
        "plugged": format!("gpu{gpu}"),
        "device_add": args,
        "ms": added.as_millis() as u64,
        "backend": after,
    }))
}

/// Runs one QMP command on the socket at `sock`; returns its "return".
pub fn qmp(sock: &Path, execute: &str, arguments: Value) -> Result<Value> {
    Qmp::connect(sock)?.execute(execute, arguments)
}

/// One QMP connection, capabilities negotiated. Events that arrive while a
/// command waits for its answer are kept for [`Qmp::wait_event`].
pub struct Qmp {
    sock: std::path::PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// A line read in part when a read timed out.
    partial: Vec<u8>,
    events: Vec<Value>,
}

/// How long a command may take to answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    pub fn connect(sock: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(sock)
            .with_context(|| format!("connecting to {}", sock.display()))?;
        let writer = stream.try_clone()?;
        let mut q = Qmp {
            sock: sock.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: Vec::new(),
        };
        let greeting = q
            .read_message(Instant::now() + QMP_TIMEOUT)?
            .with_context(|| format!("{} sent no QMP greeting", sock.display()))?;
        if greeting.get("QMP").is_none() {
            bail!("{} is not a QMP socket: {greeting}", sock.display());
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Runs `cmd`; returns its "return".
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let line = json!({ "execute": cmd, "arguments": args }).to_string();
        writeln!(self.writer, "{line}")?;
        let until = Instant::now() + QMP_TIMEOUT;
        loop {
            let msg = self.read_message(until)?.with_context(|| {
                format!("QMP {cmd}: no answer within {}s", QMP_TIMEOUT.as_secs())
            })?;
            if msg.get("event").is_some() {
                self.events.push(msg); // asynchronous, not the answer
                continue;
            }
            if let Some(e) = msg.get("error") {
                bail!("QMP {cmd} {args}: {e}");
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            bail!("QMP {cmd}: unexpected answer {msg}");
        }
    }

    /// Waits at most `timeout` for the event `name` whose data `matches`
    /// (including events that came while commands ran); None on timeout.
    pub fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Option<Value>> {
        let is_it = |e: &Value| e["event"] == name && matches(&e["data"]);
        if let Some(i) = self.events.iter().position(is_it) {
            return Ok(Some(self.events.remove(i)));
        }
        let until = Instant::now() + timeout;
        while let Some(msg) = self.read_message(until)? {
            if is_it(&msg) {
                return Ok(Some(msg));
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
        Ok(None)
    }

    /// The next message, or None if none came by `until`.
    fn read_message(&mut self, until: Instant) -> Result<Option<Value>> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            // A line cut by a timeout stays in `partial` for the next read.
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => bail!("QMP on {} closed the connection", self.sock.display()),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    let text = String::from_utf8_lossy(&line);
                    return serde_json::from_str(text.trim())
                        .map(Some)
                        .with_context(|| format!("QMP sent non-JSON {text:?}"));
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading from QMP"),
            }
        }
    }
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
        apply(dir, 0, &json!({"kind": "link_down"})).unwrap_err();
        apply(dir, 0, &json!({"kind": "link_down", "down": true, "x": 1})).unwrap_err();
        apply(dir, 0, &json!({"kind": "kill_backend", "x": 1})).unwrap_err();
        assert!(is_host_fault(&json!({"kind": "aer", "error": "fatal"})));
        apply(dir, 0, &json!({"kind": "aer", "error": "bad"})).unwrap_err();
        apply(dir, 0, &json!({"kind": "aer"})).unwrap_err();
        assert_eq!(aer_error_name(AerSeverity::Fatal), "DLP");
        assert!(is_host_fault(&json!({"kind": "unplug"})));
        assert!(is_host_fault(&json!({"kind": "plug"})));
        let err = |f: Value| format!("{:#}", apply(dir, 0, &f).unwrap_err());
        assert!(err(json!({"kind": "unplug", "now": true})).contains("unknown field `now`"));
        assert!(err(json!({"kind": "unplug", "timeout_s": 0})).contains("timeout_s"));
        assert!(err(json!({"kind": "plug", "bus": "rp1"})).contains("unknown field `bus`"));
        // Well-formed, but there is no VM.
        assert!(err(json!({"kind": "unplug", "timeout_s": 5})).contains("qmp.sock"));
    }

    /// A fake QMP server: the greeting, then answers and events as scripted,
    /// one message per line, each after reading one command (None) or right
    /// away (Some(delay)).
    fn fake_qmp(
        name: &str,
        script: Vec<(Option<Duration>, &'static str)>,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let dir = std::env::temp_dir().join(format!("hmmgpu-qmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut got = Vec::new();
            for (delay, line) in script {
                match delay {
                    None => {
                        let mut l = String::new();
                        r.read_line(&mut l).unwrap();
                        got.push(l);
                    }
                    Some(d) => std::thread::sleep(d),
                }
                w.write_all(line.as_bytes()).unwrap();
            }
            got
        });
        (sock, server)
    }

    #[test]
    fn qmp_exchange() {
        let (sock, server) = fake_qmp(
            "exchange",
            vec![
                (None, "{\"return\": {}}\n"),
                (None, "{\"event\": \"X\", \"data\": {}}\n"),
                (Some(Duration::ZERO), "{\"return\": true}\n"),
            ],
        );
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
        std::fs::remove_dir_all(sock.parent().unwrap()).unwrap();
    }

    /// device_del's DEVICE_DELETED: an event that came with a command's
    /// answer is found, one split over two writes is read whole, other
    /// events are skipped, and a wait for one that never comes times out.
    #[test]
    fn qmp_events() {
        let (sock, server) = fake_qmp(
            "events",
            vec![
                (None, "{\"return\": {}}\n"),
                (None, "{\"event\": \"DEVICE_DELETED\", \"data\": {\"path\": \"/a/virtio-backend\"}}\n"),
                (Some(Duration::ZERO), "{\"event\": \"DEVICE_DELETED\", \"data\": {\"path\": \"/a\"}}\n{\"return\": {}}\n"),
                (Some(Duration::from_millis(50)), "{\"event\": \"DEVICE_DELETED\", \"da"),
                (Some(Duration::from_millis(300)), "ta\": {\"path\": \"/b\"}}\n"),
                // Keeps the connection open until the client closes it.
                (None, ""),
            ],
        );
        let mut q = Qmp::connect(&sock).unwrap();
        assert_eq!(
            q.execute("device_del", json!({"id": "a"})).unwrap(),
            json!({})
        );
        let a = q
            .wait_event(
                "DEVICE_DELETED",
                |d| d["path"] == "/a",
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(a.unwrap()["data"]["path"], "/a");
        // The first half comes at 50 ms, the rest 300 ms later: this wait
        // gives up in between, with half a line read...
        let early = q
            .wait_event(
                "DEVICE_DELETED",
                |d| d["path"] == "/b",
                Duration::from_millis(150),
            )
            .unwrap();
        assert!(early.is_none());
        // ...which the next one completes.
        let b = q
            .wait_event(
                "DEVICE_DELETED",
                |d| d["path"] == "/b",
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(b.unwrap()["data"]["path"], "/b");
        let t = Instant::now();
        let none = q
            .wait_event(
                "DEVICE_DELETED",
                |d| d["path"] == "/c",
                Duration::from_millis(200),
            )
            .unwrap();
        assert!(none.is_none() && t.elapsed() >= Duration::from_millis(200));
        drop(q);
        server.join().unwrap();
        std::fs::remove_dir_all(sock.parent().unwrap()).unwrap();
    }
}
