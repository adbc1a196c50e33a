//! Launching a VM: per-GPU VRAM files and `hmmgpu-device` backends, QEMU,
//! and cleanup on every exit path (the guards' Drop impls run on errors,
//! panics and Ctrl-C). `run` is spawn, the console loop (`watch`), shut-down
//! and the verdict; console.rs follows the console, initrd.rs puts the run's
//! nonce in the initramfs, verdict.rs judges the run.

mod console;
mod initrd;
mod verdict;

use crate::build::log;
use crate::cli::{AccelChoice, Arch};
use crate::exit::{self, Exit, ExitError};
use crate::signals;
use crate::splat::Splat;
use anyhow::{bail, Context, Result};
use console::{read_console, relay_stdin, RawTerminal, Scanner, RUNNING};
use initrd::{initramfs_with_nonce, new_nonce};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use verdict::{verdict, BackendEnd, Evidence, Stopped};

/// The accelerator a VM runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Resolves `--accel` for a guest of `arch`; `auto` picks KVM only for a
/// guest of the host's architecture, if /dev/kvm opens read-write and (on
/// x86) the CPU flags have vmx or svm, and says which it chose and why.
pub fn resolve_accel(choice: AccelChoice, arch: Arch) -> Result<Accel> {
    if !arch.is_host() {
        if choice == AccelChoice::Kvm {
            bail!(
                "--accel kvm: a {} guest cannot use this host's KVM (another architecture)",
                arch.as_str()
            );
        }
        log(format!(
            "accel: TCG (a {} guest on a {} host)",
            arch.as_str(),
            std::env::consts::ARCH
        ));
        return Ok(Accel::Tcg);
    }
    let kvm_open = OpenOptions::new().read(true).write(true).open("/dev/kvm");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        // PowerPC hosts have no such flag: KVM-HV or KVM-PR works if /dev/kvm does.
        || !cfg!(target_arch = "x86_64");
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => {
            if let Err(e) = kvm_open {
                bail!("--accel kvm: cannot open /dev/kvm read-write: {e}");
            }
            Ok(Accel::Kvm)
        }
        AccelChoice::Auto => {
            let (accel, why) = match (&kvm_open, virt_flag) {
                // The KVM probe (doctor.rs): API version, the capabilities
                // QEMU needs, a tiny guest that must reach HLT in time.
                (Ok(_), true) => match crate::doctor::kvm_for_auto() {
                    Ok(why) => (Accel::Kvm, format!("{why}; the CPU has vmx/svm")),
                    Err(why) => (Accel::Tcg, why),
                },
                (Err(e), _) => (Accel::Tcg, format!("/dev/kvm does not open read-write ({e})")),
                (Ok(_), false) => (
                    Accel::Tcg,
                    "/dev/kvm opens but /proc/cpuinfo has no vmx/svm flag (nested/paravirtual KVM); --accel kvm forces it"
                        .to_string(),
                ),
            };
            log(format!(
                "accel: {} ({why})",
                if accel == Accel::Kvm { "KVM" } else { "TCG" }
            ));
            Ok(accel)
        }
    }
}

static RUN_SEQ: AtomicU32 = AtomicU32::new(0);

fn unique_name(what: &str) -> String {
    format!(
        "hmmgpu-{what}-{}-{}",
        std::process::id(),
        RUN_SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A per-run temporary directory (sockets, initramfs), removed on drop.
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn create() -> Result<RunDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let path = base.join(unique_name("run"));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating run directory {}", path.display()))?;
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            log(format!("warning: removing {}: {e}", self.path.display()));
        }
    }
}

/// The VRAM backing files of a run (in /dev/shm), removed on drop.
pub struct VramFiles {
    pub paths: Vec<PathBuf>,
}

impl VramFiles {
    fn create(gpus: u32, size: u64) -> Result<VramFiles> {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            bail!("/dev/shm does not exist: the VRAM files live there (mount a tmpfs on /dev/shm)");
        }
        let mut files = VramFiles { paths: Vec::new() };
        let base = unique_name("vram");
        for i in 0..gpus {
            let p = shm.join(format!("{base}-gpu{i}"));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .with_context(|| {
                    format!("creating VRAM file {} (is /dev/shm writable?)", p.display())
                })?;
            files.paths.push(p.clone());
            f.set_len(size)
                .with_context(|| format!("sizing VRAM file {} to {size} bytes", p.display()))?;
        }
        Ok(files)
    }
}

impl Drop for VramFiles {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The x86 TCG guest CPU unless a test asks for another: QEMU's default
/// qemu64 (an AMD CPU) with 39 rather than 40 physical address bits. With
/// 40, QEMU reserves the AMD HyperTransport hole [0xfd00000000, 1 TiB) in
/// the e820 map and SeaBIOS puts the 64-bit PCI window at the top of the
/// address space, inside that hole; Linux keeps what the firmware assigned
/// at boot but never allocates from an e820-reserved range, so a GPU
/// plugged back after a hot-unplug gets no room for its VRAM BAR ("can't
/// assign; no space"). With 39 bits there is no hole.
pub const TCG_X86_CPU: &str = "qemu64,phys-bits=39";

/// How the guest console is shown while it is scanned.
#[derive(Clone, Debug)]
pub enum Echo {
    /// Each line as is, on stdout.
    Raw,
    /// Each line behind a prefix, on stdout.
    Prefixed(String),
    /// Each line behind a prefix, on stderr (stdout carries KTAP).
    PrefixedStderr(String),
    /// Only the guest command's own output, on stdout: no kernel messages,
    /// no init lines or markers (`cargo xtask run --quiet`).
    CommandOnly,
    /// The console's bytes as they come, unbuffered, on stdout; the
    /// terminal's input goes to the guest (`cargo xtask run --shell`).
    Interactive,
}

pub struct VmConfig {
    pub arch: Arch,
    pub qemu: PathBuf,
    pub kernel_image: PathBuf,
    pub initramfs: PathBuf,
    /// Required when `gpus > 0`.
    pub device_bin: Option<PathBuf>,
    pub gpus: u32,
    pub vram_size: u64,
    pub memory: u64,
    /// Guest vCPUs.
    pub cpus: u32,
    pub accel: Accel,
    pub timeout: Duration,
    /// The guest command's argv; quoted into `hmmgpu.cmd`.
    pub cmd: Vec<String>,
    /// Pass `hmmgpu.noload`: init does not insmod hmmgpu.ko.
    pub noload: bool,
    pub echo: Echo,
    /// Where sockets go; the run's directory.
    pub run_dir: PathBuf,
    /// Optional additions (fault injection tests).
    pub extra: VmExtra,
}

/// Called with the run directory and each console line; a returned line
/// is typed into the guest's console (its stdin), newline added.
pub type ConsoleHook = Box<dyn Fn(&Path, &str) -> Option<String>>;

/// Optional parts of a [`VmConfig`].
#[derive(Default)]
pub struct VmExtra {
    /// Extra `hmmgpu-device` arguments per GPU (index = GPU; e.g.
    /// `--fault-plan FILE --fault-log FILE`).
    pub backend_args: Vec<Vec<String>>,
    /// Answers console lines: with it, QEMU's stdin (the guest console's
    /// input) is a pipe the hook's replies are written to.
    pub console_hook: Option<ConsoleHook>,
    /// The test SIGKILLs backends (a surprise loss): a backend ended by
    /// SIGKILL is part of the test, and has no stats line. Any other early
    /// or unclean exit still fails the run.
    pub backends_killed: bool,
    /// A backend SIGKILLed while the guest runs is started again, with the
    /// same arguments on the same socket and VRAM file, and QEMU reconnects
    /// to it (its chardevs get `reconnect-ms`): a backend restarted under a
    /// running guest (docs/fault-injection.md). The killed process has no
    /// stats line; the new one must end like any backend.
    pub restart_killed_backends: bool,
    /// How long QEMU may run after the guest reported its status before the
    /// run fails with [`Exit::NoPowerOff`] (default [`POWEROFF_GRACE`]).
    pub poweroff_grace: Option<Duration>,
    /// `-cpu` for a TCG guest (e.g. [`crate::hostfault::MCE_CPU`]; default
    /// [`TCG_X86_CPU`] on x86_64, QEMU's default on ppc64le).
    pub tcg_cpu: Option<String>,
    /// VRAM per GPU instead of the tests' default (small enough for a
    /// guest to fill it all).
    pub vram_size: Option<u64>,
    /// A replacement for images/init (the oracle's self-test boots a
    /// deliberately broken init); appended to the initramfs with the nonce.
    pub init_override: Option<String>,
    /// Another backend binary than the built one (the oracle's self-test
    /// wraps the real one in scripts that misbehave).
    pub backend_bin: Option<PathBuf>,
    /// Write the run's artifacts folder here (src/artifacts.rs).
    pub artifacts: Option<PathBuf>,
    /// Added to the kernel command line (`--append`).
    pub append: Vec<String>,
    /// Added to QEMU's command line, in order (`--qemu-arg`).
    pub qemu_args: Vec<String>,
    /// Host folders mounted in the guest over virtio-9p (`--share`).
    pub shares: Vec<crate::cli::Share>,
    /// Host files the guest finds in /host/ (e.g. a test-only module that
    /// must not sit beside hmmgpu.ko in /lib/modules).
    pub adds: Vec<PathBuf>,
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmResult {
    /// The guest command's exit status (init's HMMGPU-EXIT-STATUS marker).
    Exited(i32),
    /// The VM failed; the reason is also printed.
    Failed(Exit, String),
}

impl VmResult {
    pub fn exit_code(&self) -> i32 {
        match self {
            VmResult::Exited(n) => *n,
            VmResult::Failed(e, _) => e.code(),
        }
    }
}

/// Times from QEMU's launch (host clock) to console markers.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// `HMMGPU-INIT`: init started.
    pub init: Option<Duration>,
    /// `HMMGPU-READY`: mounts done and hmmgpu.ko loaded (its probe done).
    pub ready: Option<Duration>,
    /// `HMMGPU-EXIT-STATUS`: the command finished.
    pub exit_marker: Option<Duration>,
    /// QEMU exited.
    pub total: Duration,
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64()))
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "launch→init {}, launch→ready {}, launch→exit-marker {}, total {:.2}s",
            secs(self.init),
            secs(self.ready),
            secs(self.exit_marker),
            self.total.as_secs_f64()
        )
    }
}

/// Where a [`BackendStats`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsSource {
    /// The `hmmgpu-device: stats: {json}` line the backend prints at exit.
    ExitLine,
    /// The control socket's answer to `{"cmd":"stats"}`, asked after QEMU exited.
    ControlSocket,
}

/// One backend's counters (see docs/device-spec.md "Host side").
#[derive(Clone, Debug)]
pub struct BackendStats {
    pub gpu: u32,
    pub source: StatsSource,
    pub raw: serde_json::Value,
}

impl BackendStats {
    /// The counter `name` (e.g. `guest_to_vram`), found as a key at any depth
    /// of the JSON (the backend may group counters, e.g. under "bytes").
    pub fn counter(&self, name: &str) -> Result<u64> {
        fn find<'a>(v: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
            match v {
                serde_json::Value::Object(m) => m
                    .get(name)
                    .or_else(|| m.values().find_map(|c| find(c, name))),
                _ => None,
            }
        }
        let v = find(&self.raw, name).with_context(|| {
            format!(
                "gpu{} stats have no counter '{name}': {}",
                self.gpu, self.raw
            )
        })?;
        v.as_u64().with_context(|| {
            format!(
                "gpu{} stats counter '{name}' is not a number: {v}",
                self.gpu
            )
        })
    }
}

pub struct VmOutcome {
    pub result: VmResult,
    pub timings: Timings,
    /// When QEMU was launched (the timings count from here).
    pub launched: Instant,
    /// One per GPU that reported stats, in GPU order.
    pub stats: Vec<BackendStats>,
    /// The whole console, line by line.
    pub console: Vec<String>,
    /// When each console line arrived, after QEMU's launch (host clock).
    pub console_times: Vec<Duration>,
    /// Every splat seen: console, QEMU's and the backends' stderr.
    #[allow(dead_code)]
    pub splats: Vec<Splat>,
    /// The driver's debugfs counters per GPU, as images/init read them
    /// before power-off (empty if the driver was not loaded then).
    pub guest_counters: Vec<GpuCounters>,
    /// The VRAM files; removed when the outcome is dropped.
    pub vram: VramFiles,
    /// Backends started again after a SIGKILL
    /// ([`VmExtra::restart_killed_backends`]).
    pub backend_restarts: u32,
}

/// /sys/kernel/debug/hmmgpu<gpu>/counters at the end of the run, or why it
/// could not be read (a dead device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuCounters {
    pub gpu: u32,
    pub counters: Result<BTreeMap<String, u64>, String>,
}

/// How long QEMU may take to exit after the guest's status marker.
pub const POWEROFF_GRACE: Duration = Duration::from_secs(30);

/// How long a backend may take to exit after QEMU did (it exits when the
/// front end disconnects).
const BACKEND_EXIT_GRACE: Duration = Duration::from_secs(10);

/// A child in its own process group, killed (the whole group) on drop.
struct Proc {
    name: String,
    child: Child,
    exited: Option<std::process::ExitStatus>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        cmd.process_group(0);
        let child = cmd.spawn().with_context(|| {
            format!("starting {name} ({})", cmd.get_program().to_string_lossy())
        })?;
        Ok(Proc {
            name: name.to_string(),
            child,
            exited: None,
        })
    }

    fn poll(&mut self) -> Option<std::process::ExitStatus> {
        if self.exited.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exited = Some(s);
            }
        }
        self.exited
    }

    fn signal(&self, sig: i32) {
        if self.exited.is_none() {
            // The child leads its own group; signal the group.
            // SAFETY: kill(2) takes plain integers and touches no memory; the
            // group is our child's, not yet reaped (`exited` is None).
            unsafe {
                libc::kill(-self.child.id().cast_signed(), sig);
            }
        }
    }

    /// Waits up to `grace` for it to exit by itself.
    fn wait_for(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + grace;
        loop {
            if let Some(s) = self.poll() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it.
    fn stop(&mut self, grace: Duration) -> std::process::ExitStatus {
        if let Some(s) = self.poll() {
            return s;
        }
        self.signal(libc::SIGTERM);
        if let Some(s) = self.wait_for(grace) {
            return s;
        }
        log(format!(
            "{} did not exit {:.0}s after SIGTERM: SIGKILL",
            self.name,
            grace.as_secs_f64()
        ));
        self.signal(libc::SIGKILL);
        let s = self.child.wait().expect("waiting for a killed child");
        self.exited = Some(s);
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.poll().is_none() {
            self.stop(Duration::from_secs(3));
        }
    }
}

struct Backend {
    gpu: u32,
    proc: Proc,
    control: PathBuf,
    exit_stats: Arc<Mutex<Option<serde_json::Value>>>,
    /// Its command line, program first (for reproduce.sh).
    argv: Vec<String>,
    /// Its stderr, line by line (up to [`MAX_STDERR_LINES`]).
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

/// Lines of a backend's stderr kept in memory; a guest that makes a backend
/// log without end cannot exhaust the host's.
const MAX_STDERR_LINES: usize = 200_000;

const STATS_PREFIX: &str = "hmmgpu-device: stats: ";

fn spawn_backend(cfg: &VmConfig, bin: &Path, gpu: u32, vram: &Path) -> Result<Backend> {
    let socket = cfg.run_dir.join(format!("gpu{gpu}.sock"));
    let control = cfg.run_dir.join(format!("gpu{gpu}.control"));
    // Its stdout goes to our stderr: stdout carries only the guest console.
    let stdout = Stdio::from(std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned()?);
    let extra: &[String] = cfg
        .extra
        .backend_args
        .get(gpu as usize)
        .map_or(&[], |a| a.as_slice());
    let mut argv: Vec<String> = vec![
        bin.display().to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--vram-path".into(),
        vram.display().to_string(),
        "--vram-size".into(),
        cfg.vram_size.to_string(),
        "--control".into(),
        control.display().to_string(),
    ];
    argv.extend(extra.iter().cloned());
    // The fault log goes to the artifacts (unless the test reads its own).
    if !extra.iter().any(|a| a == "--fault-log") {
        argv.push("--fault-log".into());
        argv.push(
            cfg.run_dir
                .join(format!("gpu{gpu}.faults"))
                .display()
                .to_string(),
        );
    }
    let mut cmd = Command::new(bin);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped());
    log(format!("gpu{gpu}: {}", shell_join(&argv)));
    let mut proc = Proc::spawn(&format!("hmmgpu-device gpu{gpu}"), &mut cmd)?;
    // For fault injection from outside (a killed backend: surprise loss).
    let pid_file = cfg.run_dir.join(format!("gpu{gpu}.pid"));
    std::fs::write(&pid_file, format!("{}\n", proc.child.id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    let stderr = proc.child.stderr.take().unwrap();
    let exit_stats = Arc::new(Mutex::new(None));
    let stderr_lines = Arc::new(Mutex::new(Vec::new()));
    let (es, lines) = (Arc::clone(&exit_stats), Arc::clone(&stderr_lines));
    let reader = std::thread::spawn(move || {
        let mut dropped = 0u64;
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            eprintln!("[gpu{gpu}] {line}");
            if let Some(pos) = line.find(STATS_PREFIX) {
                match serde_json::from_str(&line[pos + STATS_PREFIX.len()..]) {
                    Ok(v) => *es.lock().unwrap() = Some(v),
                    Err(e) => eprintln!("[xtask] warning: gpu{gpu} stats line is not JSON: {e}"),
                }
            }
            let mut l = lines.lock().unwrap();
            if l.len() < MAX_STDERR_LINES || line.contains(STATS_PREFIX) {
                l.push(line);
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            lines.lock().unwrap().push(format!(
                "[xtask: {dropped} more lines of this stderr were not kept]"
            ));
        }
    });
    let mut b = Backend {
        gpu,
        proc,
        control,
        exit_stats,
        argv,
        stderr: stderr_lines,
        reader: Some(reader),
    };

    // Wait for its vhost-user socket.
    let until = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(s) = b.proc.poll() {
            b.join_reader();
            bail!(ExitError {
                exit: Exit::BackendFailed,
                message: format!(
                    "hmmgpu-device for gpu{gpu} exited ({s}) before creating its socket:\n{}",
                    b.tail()
                )
            });
        }
        if signals::interrupted() {
            return Err(exit::interrupted());
        }
        if Instant::now() >= until {
            bail!(ExitError {
                exit: Exit::BackendFailed,
                message: format!(
                    "hmmgpu-device for gpu{gpu} did not create {} within 20s",
                    socket.display()
                )
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(b)
}

impl Backend {
    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// The last 40 lines of its stderr, indented.
    fn tail(&self) -> String {
        let lines = self.stderr.lock().unwrap();
        lines[lines.len().saturating_sub(40)..]
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect()
    }

    /// Asks the control socket for `stats`.
    fn query_stats(&self) -> Result<serde_json::Value> {
        let mut s = UnixStream::connect(&self.control)
            .with_context(|| format!("connecting to {}", self.control.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.set_write_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"{\"cmd\":\"stats\"}\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("control socket answered '{}'", line.trim()))?;
        // {"ok": true, "stats": {...}} (docs/control.md)
        match (&v["ok"], v.get("stats")) {
            (serde_json::Value::Bool(true), Some(stats)) => Ok(stats.clone()),
            _ => bail!("control socket answered {v}"),
        }
    }

    /// Ends the backend (after QEMU exited) and says how it ended: it should
    /// exit by itself when the front end disconnects, with its stats line.
    fn finish(&mut self) -> BackendEnd {
        let mut control_stats = None;
        let mut stopped = false;
        if self.proc.wait_for(BACKEND_EXIT_GRACE).is_none() {
            // Its counters, for the report, before it is stopped.
            match self.query_stats() {
                Ok(v) => control_stats = Some(v),
                Err(e) => log(format!("gpu{}: control socket stats: {e:#}", self.gpu)),
            }
            self.proc.stop(Duration::from_secs(5));
            stopped = true;
        }
        self.join_reader();
        BackendEnd {
            gpu: self.gpu,
            argv: self.argv.clone(),
            status: self.proc.exited,
            stopped,
            died_early: None,
            exit_stats: self.exit_stats.lock().unwrap().take(),
            control_stats,
            stderr: std::mem::take(&mut *self.stderr.lock().unwrap()),
        }
    }
}

/// Quotes argv into one POSIX shell command line.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The kernel command line for a run: the console, init's parameters
/// (`hmmgpu.noload`, `hmmgpu.share=TAG:DIR[:ro]` per shared folder,
/// `hmmgpu.cmd=BASE64`) and `append` (`--append`).
pub fn kernel_cmdline(
    arch: Arch,
    cmd: &[String],
    noload: bool,
    shares: &[crate::cli::Share],
    append: &[String],
) -> Result<String> {
    let console = match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Ppc64le => "hvc0",
    };
    let mut s = format!("console={console} panic=-1 oops=panic loglevel=6 printk.time=1");
    if noload {
        s.push_str(" hmmgpu.noload");
    }
    for (i, sh) in shares.iter().enumerate() {
        s.push_str(&format!(
            " hmmgpu.share={}:{}{}",
            share_tag(i),
            sh.guest,
            if sh.readonly { ":ro" } else { "" }
        ));
    }
    for a in append {
        s.push(' ');
        s.push_str(a);
    }
    if !cmd.is_empty() {
        s.push_str(" hmmgpu.cmd=");
        s.push_str(&base64(shell_join(cmd).as_bytes()));
    }
    // COMMAND_LINE_SIZE is 2048 on x86 and powerpc.
    if s.len() > 2000 {
        bail!("the guest command is too long for the kernel command line ({} bytes, 2000 at most): put it in a script and --add it", s.len());
    }
    Ok(s)
}

fn qemu_args(
    cfg: &VmConfig,
    initrd: &Path,
    vram: &VramFiles,
    backends: &[Backend],
) -> Result<Vec<String>> {
    let mem_mib = cfg.memory >> 20;
    let machine = match (cfg.arch, cfg.accel) {
        (Arch::X86_64, _) => "q35,memory-backend=mem",
        // vhost-user needs guest RAM in a shareable backend on pseries too.
        (Arch::Ppc64le, Accel::Kvm) => "pseries,memory-backend=mem",
        // TCG does not emulate the speculation-mitigation capabilities the
        // machine asks for by default; say so instead of three warnings.
        (Arch::Ppc64le, Accel::Tcg) => {
            "pseries,memory-backend=mem,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off"
        }
    };
    let mut a: Vec<String> = vec![
        "-M".into(),
        machine.into(),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        "-m".into(),
        format!("{mem_mib}M"),
        "-smp".into(),
        cfg.cpus.to_string(),
        "-accel".into(),
        match cfg.accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg => "tcg".into(),
        },
    ];
    if cfg.accel == Accel::Kvm {
        a.extend(["-cpu".into(), "host".into()]);
    } else if let Some(cpu) = &cfg.extra.tcg_cpu {
        a.extend(["-cpu".into(), cpu.clone()]);
    } else if cfg.arch == Arch::X86_64 {
        a.extend(["-cpu".into(), TCG_X86_CPU.into()]);
    }
    a.extend(
        [
            "-nodefaults",
            "-nographic",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-kernel",
        ]
        .map(String::from),
    );
    a.push(cfg.kernel_image.display().to_string());
    a.push("-initrd".into());
    a.push(initrd.display().to_string());
    a.push("-append".into());
    a.push(kernel_cmdline(
        cfg.arch,
        &cfg.cmd,
        cfg.noload,
        &cfg.extra.shares,
        &cfg.extra.append,
    )?);
    a.push("-qmp".into());
    a.push(format!(
        "unix:{},server=on,wait=off",
        cfg.run_dir.join("qmp.sock").display()
    ));
    for (i, sh) in cfg.extra.shares.iter().enumerate() {
        a.push("-virtfs".into());
        a.push(format!(
            "local,path={},mount_tag={},security_model=none,id={}{}",
            sh.host.display(),
            share_tag(i),
            share_tag(i),
            if sh.readonly { ",readonly=on" } else { "" }
        ));
    }
    for (b, path) in backends.iter().zip(&vram.paths) {
        a.extend(gpu_qemu_args(
            cfg.arch,
            b.gpu,
            path,
            cfg.vram_size,
            &cfg.run_dir,
            cfg.extra.restart_killed_backends,
        ));
    }
    a.extend(cfg.extra.qemu_args.iter().cloned());
    Ok(a)
}

/// The 9p mount tag (and QEMU id) of shared folder `i`.
fn share_tag(i: usize) -> String {
    format!("hmmgpushare{i}")
}

/// How often QEMU tries to connect again to a backend that went away, when
/// killed backends are restarted ([`VmExtra::restart_killed_backends`]).
const RECONNECT_MS: u32 = 100;

/// QEMU arguments for GPU `n`: its root port (q35), VRAM memdev, vhost-user
/// chardev (the socket `gpuN.sock` in `run_dir`; `reconnect`: QEMU connects
/// again to a backend started anew on it) and the device.
fn gpu_qemu_args(
    arch: Arch,
    n: u32,
    vram: &Path,
    vram_size: u64,
    run_dir: &Path,
    reconnect: bool,
) -> Vec<String> {
    let props = gpu_device_props(arch, n);
    let prop = |key: &str| props.iter().find(|(k, _)| *k == key).map(|(_, v)| v);
    let mut a = Vec::new();
    if let Some(port) = prop("bus") {
        // The port's link runs at 5 GT/s: above that, Linux waits after a
        // bus reset (AER recovery) for Data Link Layer Link Active, which
        // QEMU only sets with native hotplug, and gives the reset up.
        a.extend([
            "-device".into(),
            format!(
                "pcie-root-port,id={port},bus=pcie.0,chassis={},slot=0,x-speed=5",
                n + 1
            ),
        ]);
    }
    let (memdev, chardev) = (prop("memdev").unwrap(), prop("chardev").unwrap());
    a.extend([
        "-object".into(),
        format!(
            "memory-backend-file,id={memdev},mem-path={},size={vram_size},share=on",
            vram.display()
        ),
        "-chardev".into(),
        format!(
            "socket,id={chardev},path={}{}",
            run_dir.join(format!("gpu{n}.sock")).display(),
            if reconnect {
                format!(",reconnect-ms={RECONNECT_MS}")
            } else {
                String::new()
            }
        ),
        "-device".into(),
        props
            .iter()
            .map(|(k, v)| {
                if *k == "driver" {
                    v.clone()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(","),
    ]);
    a
}

/// GPU `n`'s `vhost-user-hmmgpu-pci` as QOM properties, "driver" first: the
/// `-device` of the boot and the `device_add` of a re-plug
/// (src/hostfault.rs), so both put the same device on the same chardev,
/// memdev and slot. The chardev (`-chardev socket`), the memdev
/// (`-object memory-backend-file`) and, on q35, the root port are created
/// at boot with the ids named here and outlive an unplug.
pub fn gpu_device_props(arch: Arch, n: u32) -> Vec<(&'static str, String)> {
    let mut props = vec![
        ("driver", "vhost-user-hmmgpu-pci".to_string()),
        // The QOM path /machine/peripheral/gpuN (link-down, device_del).
        ("id", format!("gpu{n}")),
        ("chardev", format!("gpu{n}")),
        ("memdev", format!("vram{n}")),
    ];
    match arch {
        // Each GPU behind its own PCIe root port (hotplug), with an AER
        // capability (pcie_aer_inject_error).
        Arch::X86_64 => {
            props.push(("bus", format!("rp{n}")));
            props.push(("aer", "on".to_string()));
        }
        // The default PHB's conventional PCI bus.
        Arch::Ppc64le => {}
    }
    props
}

/// Boots the VM of `cfg` and waits for the guest command's status: starts
/// everything ([`spawn`]), follows the console ([`watch`]), ends QEMU and the
/// backends ([`shut_down`]) and judges what happened ([`verdict`]).
pub fn run(cfg: &VmConfig) -> Result<VmOutcome> {
    check_inputs(cfg)?;
    let nonce = new_nonce()?;
    let initrd = cfg.run_dir.join("initramfs-run.img");
    initramfs_with_nonce(
        &cfg.initramfs,
        &initrd,
        &nonce,
        cfg.extra.init_override.as_deref(),
    )?;
    let mut vm = spawn(cfg, &initrd)?;
    let mut scan = Scanner {
        echo: Some(cfg.echo.clone()),
        launch: Some(vm.launch),
        nonce,
        ..Default::default()
    };
    let stopped = watch(cfg, &mut vm, &mut scan)?;
    let ended = shut_down(vm, &mut scan, stopped);
    let Scanner {
        console,
        console_times,
        splats: console_splats,
        mut timings,
        status,
        init_failed,
        counters,
        ..
    } = scan;
    timings.total = ended.launch.elapsed();
    let launched = ended.launch;
    let evidence = Evidence {
        stopped: ended.stopped,
        timeout: cfg.timeout,
        status,
        init_failed,
        console_splats,
        qemu_status: ended.qemu_status,
        qemu_stderr: ended.qemu_stderr,
        backends: ended.backends,
        backends_killed: cfg.extra.backends_killed,
    };
    let result = verdict(&evidence);
    let stats: Vec<BackendStats> = evidence
        .backends
        .iter()
        .filter_map(|b| {
            let s = b.stats();
            if s.is_none() {
                log(format!("warning: gpu{} reported no stats", b.gpu));
            }
            s
        })
        .collect();
    if let Some(dir) = &cfg.extra.artifacts {
        let timed: Vec<(Duration, String)> = console_times
            .iter()
            .copied()
            .zip(console.iter().cloned())
            .collect();
        let record = crate::artifacts::Record {
            dir,
            run_dir: &cfg.run_dir,
            vram: &ended.vram.paths,
            vram_size: cfg.vram_size,
            initrd: &initrd,
            qemu: &ended.qemu_argv,
            backends: &evidence
                .backends
                .iter()
                .map(|b| b.argv.clone())
                .collect::<Vec<_>>(),
            console: &timed,
            qemu_stderr: &evidence.qemu_stderr,
            backend_stderr: &evidence
                .backends
                .iter()
                .map(|b| b.stderr.clone())
                .collect::<Vec<_>>(),
            stats: serde_json::Value::Array(
                stats
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "gpu": s.gpu,
                            "source": format!("{:?}", s.source),
                            "stats": s.raw,
                        })
                    })
                    .collect(),
            ),
            verdict: &match &result {
                VmResult::Exited(n) => format!("passed: the guest command exited with {n}"),
                VmResult::Failed(e, m) => format!("failed: {e}\n{m}"),
            },
            interactive: cfg.extra.console_hook.is_some(),
        };
        if let Err(e) = crate::artifacts::write_all(&record) {
            log(format!(
                "warning: writing the artifacts to {}: {e:#}",
                dir.display()
            ));
        }
    }
    Ok(VmOutcome {
        result,
        timings,
        launched,
        stats,
        console,
        console_times,
        splats: evidence.all_splats(),
        guest_counters: counters,
        vram: ended.vram,
        backend_restarts: ended.restarts,
    })
}

fn check_inputs(cfg: &VmConfig) -> Result<()> {
    if !cfg.qemu.is_file() {
        bail!("QEMU binary {} does not exist", cfg.qemu.display());
    }
    if !cfg.kernel_image.is_file() {
        bail!("kernel image {} does not exist", cfg.kernel_image.display());
    }
    if !cfg.initramfs.is_file() {
        bail!("initramfs {} does not exist", cfg.initramfs.display());
    }
    crate::cli::check_memory(cfg.memory)
}

/// A started VM: its VRAM files, backends, QEMU and the threads that read
/// QEMU's console and stderr.
struct Running {
    vram: VramFiles,
    backends: Vec<Backend>,
    qemu: Proc,
    launch: Instant,
    /// The guest console's input (for the console hook), non-blocking.
    console_in: Option<std::process::ChildStdin>,
    /// Console lines with the host time they arrived.
    console: mpsc::Receiver<(Instant, String)>,
    console_reader: JoinHandle<()>,
    qemu_stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: JoinHandle<()>,
    /// Backends that exited while the guest ran: (index, status).
    died_early: Vec<(usize, std::process::ExitStatus)>,
    /// Backends started again after a SIGKILL
    /// ([`VmExtra::restart_killed_backends`]).
    restarts: u32,
    /// QEMU's command line, program first.
    qemu_argv: Vec<String>,
    /// Interactive runs: the guest started the command (input may flow),
    /// the user typed the escape, and the terminal's saved mode.
    ready: Arc<std::sync::atomic::AtomicBool>,
    quit: Arc<std::sync::atomic::AtomicBool>,
    _raw: Option<RawTerminal>,
}

/// Creates the VRAM files, starts the backends (each up to its socket), then
/// QEMU (booting `initrd`), and the threads that read QEMU's output.
fn spawn(cfg: &VmConfig, initrd: &Path) -> Result<Running> {
    let vram = VramFiles::create(cfg.gpus, cfg.vram_size)?;
    let mut backends = Vec::new();
    if cfg.gpus > 0 {
        let bin = cfg
            .device_bin
            .as_deref()
            .context("runs with GPUs need the hmmgpu-device binary")?;
        if !bin.is_file() {
            bail!("backend binary {} does not exist", bin.display());
        }
        for (i, path) in vram.paths.iter().enumerate() {
            backends.push(spawn_backend(cfg, bin, i as u32, path)?);
        }
    }

    let args = qemu_args(cfg, initrd, &vram, &backends)?;
    log(format!(
        "qemu: {} {}",
        cfg.qemu.display(),
        shell_join(&args)
    ));
    let launch = Instant::now();
    let mut qemu = Proc::spawn(
        "qemu",
        Command::new(&cfg.qemu)
            .args(&args)
            .stdin(
                if cfg.extra.console_hook.is_some() || matches!(cfg.echo, Echo::Interactive) {
                    Stdio::piped()
                } else {
                    Stdio::null()
                },
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;

    // Non-blocking, so a guest that never reads cannot stall the console
    // loop (a reply is dropped).
    let mut console_in = qemu.child.stdin.take();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let quit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut raw = None;
    if matches!(cfg.echo, Echo::Interactive) {
        if let Some(to_guest) = console_in.take() {
            raw = RawTerminal::enter();
            let (r, q) = (Arc::clone(&ready), Arc::clone(&quit));
            // Not joined: it may sit in a read of the terminal to the end.
            std::thread::spawn(move || relay_stdin(std::io::stdin(), to_guest, r, q));
        }
    } else if let Some(input) = &console_in {
        set_nonblocking(input)?;
    }
    let (tx, console) = mpsc::channel::<(Instant, String)>();
    let stdout = qemu.child.stdout.take().context("QEMU's stdout")?;
    let passthrough = matches!(cfg.echo, Echo::Interactive);
    let console_reader = std::thread::spawn(move || read_console(stdout, tx, passthrough));
    let qemu_stderr = Arc::new(Mutex::new(Vec::<String>::new()));
    let qs = Arc::clone(&qemu_stderr);
    let stderr = qemu.child.stderr.take().context("QEMU's stderr")?;
    let stderr_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            eprintln!("[qemu] {line}");
            let mut l = qs.lock().unwrap();
            if l.len() < MAX_STDERR_LINES {
                l.push(line);
            }
        }
    });
    Ok(Running {
        vram,
        backends,
        qemu,
        launch,
        console_in,
        console,
        console_reader,
        qemu_stderr,
        stderr_reader,
        died_early: Vec::new(),
        restarts: 0,
        qemu_argv: std::iter::once(cfg.qemu.display().to_string())
            .chain(args)
            .collect(),
        ready,
        quit,
        _raw: raw,
    })
}

fn set_nonblocking(fd: &impl std::os::fd::AsRawFd) -> Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a file descriptor this process owns (a child's pipe
    // end held by the caller); F_GETFL/F_SETFL touch no memory.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if !ok {
        bail!(
            "making the guest console's input non-blocking: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Follows the console until QEMU exits, the guest's status came and QEMU
/// did not power off, the timeout passes or a backend dies; feeds each line
/// to `scan` and the console hook.
fn watch(cfg: &VmConfig, vm: &mut Running, scan: &mut Scanner) -> Result<Stopped> {
    let grace = cfg.extra.poweroff_grace.unwrap_or(POWEROFF_GRACE);
    loop {
        if signals::interrupted() {
            return Err(exit::interrupted());
        }
        match vm.console.recv_timeout(Duration::from_millis(100)) {
            Ok((t, line)) => {
                if let (Some(hook), Some(input)) = (&cfg.extra.console_hook, vm.console_in.as_mut())
                {
                    if let Some(reply) = hook(&cfg.run_dir, &line) {
                        if let Err(e) = input.write_all(format!("{reply}\n").as_bytes()) {
                            log(format!("warning: writing to the guest console: {e}"));
                        }
                    }
                }
                if line.contains(RUNNING) {
                    vm.ready.store(true, Ordering::SeqCst);
                }
                scan.feed(t, line)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(Stopped::QemuExited),
        }
        if vm.quit.load(Ordering::SeqCst) {
            return Err(ExitError {
                exit: Exit::Interrupted,
                message: "the VM was ended with Ctrl-A x".into(),
            }
            .into());
        }
        if vm.launch.elapsed() > cfg.timeout && scan.status.is_none() {
            return Ok(Stopped::Timeout);
        }
        if let Some(m) = scan.timings.exit_marker {
            if vm.launch.elapsed() > m + grace {
                return Ok(Stopped::NoPowerOff);
            }
        }
        if scan.status.is_none() {
            for i in 0..vm.backends.len() {
                let Some(s) = vm.backends[i].proc.poll() else {
                    continue;
                };
                let killed =
                    std::os::unix::process::ExitStatusExt::signal(&s) == Some(libc::SIGKILL);
                if cfg.extra.restart_killed_backends && killed {
                    restart_backend(cfg, vm, i)?;
                    continue;
                }
                if !vm.died_early.iter().any(|(j, _)| *j == i) {
                    vm.died_early.push((i, s));
                    if !cfg.extra.backends_killed {
                        return Ok(Stopped::BackendDied);
                    }
                }
            }
        }
    }
}

/// Starts backend `i` again after it was SIGKILLed: the same arguments, so
/// the same socket (QEMU reconnects) and VRAM file. The dead one's stderr
/// goes first in the new one's.
fn restart_backend(cfg: &VmConfig, vm: &mut Running, i: usize) -> Result<()> {
    let old = &mut vm.backends[i];
    old.join_reader();
    let gpu = old.gpu;
    log(format!(
        "gpu{gpu}: its backend was killed (SIGKILL); starting a new one on the same socket and VRAM file"
    ));
    let bin = Path::new(&old.argv[0]).to_path_buf();
    let mut dead = std::mem::take(&mut *old.stderr.lock().unwrap());
    dead.push("[xtask: this backend was killed (SIGKILL); a new one was started]".to_string());
    // So that spawn_backend waits for the new one's socket.
    let _ = std::fs::remove_file(cfg.run_dir.join(format!("gpu{gpu}.sock")));
    let new = spawn_backend(cfg, &bin, gpu, &vm.vram.paths[i])?;
    {
        let mut lines = new.stderr.lock().unwrap();
        dead.append(&mut lines);
        *lines = dead;
    }
    vm.backends[i] = new;
    vm.restarts += 1;
    Ok(())
}

/// What [`shut_down`] collected.
struct Ended {
    stopped: Stopped,
    qemu_argv: Vec<String>,
    launch: Instant,
    qemu_status: Option<std::process::ExitStatus>,
    qemu_stderr: Vec<String>,
    backends: Vec<BackendEnd>,
    vram: VramFiles,
    restarts: u32,
}

/// Ends QEMU (after a grace period if the guest is powering off by itself)
/// and the backends; collects the rest of the console, the stderr streams
/// and how each process exited.
fn shut_down(vm: Running, scan: &mut Scanner, stopped: Stopped) -> Ended {
    let Running {
        vram,
        mut backends,
        mut qemu,
        launch,
        console,
        console_reader,
        qemu_stderr,
        stderr_reader,
        died_early,
        qemu_argv,
        restarts,
        ..
    } = vm;
    let grace = if stopped == Stopped::QemuExited {
        Duration::from_secs(5)
    } else {
        Duration::ZERO
    };
    let qemu_status = match qemu.wait_for(grace) {
        Some(s) => Some(s),
        None => {
            qemu.stop(Duration::from_secs(5));
            // Stopped by us: its status says nothing about QEMU itself.
            None
        }
    };
    // The readers end at QEMU's EOF; then take what the console still had.
    let _ = console_reader.join();
    let _ = stderr_reader.join();
    for (t, line) in console.try_iter() {
        scan.feed(t, line);
    }
    let qemu_stderr = std::mem::take(&mut *qemu_stderr.lock().unwrap());
    let backends = backends
        .iter_mut()
        .enumerate()
        .map(|(i, b)| {
            let mut end = b.finish();
            end.died_early = died_early.iter().find(|(j, _)| *j == i).map(|(_, s)| *s);
            end
        })
        .collect();
    Ended {
        stopped,
        qemu_argv,
        launch,
        qemu_status,
        qemu_stderr,
        backends,
        vram,
        restarts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(shell_join(&v(&["sh", "-c", "exit 7"])), "sh -c 'exit 7'");
        assert_eq!(shell_join(&v(&["echo", "it's", ""])), r"echo 'it'\''s' ''");
    }

    #[test]
    fn gpu_device_args() {
        let args = gpu_qemu_args(
            Arch::X86_64,
            0,
            Path::new("/dev/shm/v0"),
            64 << 20,
            Path::new("/run/x"),
            false,
        );
        assert_eq!(
            args,
            [
                "-device",
                "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=0,x-speed=5",
                "-object",
                "memory-backend-file,id=vram0,mem-path=/dev/shm/v0,size=67108864,share=on",
                "-chardev",
                "socket,id=gpu0,path=/run/x/gpu0.sock",
                "-device",
                "vhost-user-hmmgpu-pci,id=gpu0,chardev=gpu0,memdev=vram0,bus=rp0,aer=on",
            ]
        );
        let ppc = gpu_qemu_args(
            Arch::Ppc64le,
            1,
            Path::new("/v1"),
            1 << 30,
            Path::new("/r"),
            true,
        );
        assert_eq!(ppc[0], "-object", "no root port on pseries");
        assert_eq!(ppc[3], "socket,id=gpu1,path=/r/gpu1.sock,reconnect-ms=100");
        assert_eq!(
            ppc[5],
            "vhost-user-hmmgpu-pci,id=gpu1,chardev=gpu1,memdev=vram1"
        );
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn stats_counter_lookup() {
        let s = BackendStats {
            gpu: 0,
            source: StatsSource::ExitLine,
            raw: serde_json::json!({"commands": 3, "bytes": {"guest_to_vram": 4096}}),
        };
        assert_eq!(s.counter("guest_to_vram").unwrap(), 4096);
        assert_eq!(s.counter("commands").unwrap(), 3);
        s.counter("nope").unwrap_err();
    }
}
