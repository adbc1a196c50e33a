//! Launching a VM: per-GPU VRAM files and `hmmgpu-device` backends, QEMU, the
//! console scan for init's markers and kernel errors, and cleanup on every
//! exit path (the guards' Drop impls run on errors, panics and Ctrl-C).

use crate::build::log;
use crate::cli::{AccelChoice, Arch};
use crate::exit::{self, Exit, ExitError};
use crate::signals;
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
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
                (Ok(_), true) => (Accel::Kvm, "/dev/kvm is usable and the CPU has vmx/svm".to_string()),
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
    /// A backend that exits while the guest runs is part of the test (a
    /// surprise loss), not a failure of the run.
    pub backends_may_die: bool,
    /// `-cpu` for a TCG guest (e.g. [`crate::hostfault::MCE_CPU`]; default
    /// [`TCG_X86_CPU`] on x86_64, QEMU's default on ppc64le).
    pub tcg_cpu: Option<String>,
    /// VRAM per GPU instead of the tests' default (small enough for a
    /// guest to fill it all).
    pub vram_size: Option<u64>,
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
    /// Kernel error lines seen (panic, oops, BUG, WARNING, KASAN...), for
    /// tests that assert on them.
    #[allow(dead_code)]
    pub kernel_errors: Vec<String>,
    /// The VRAM files; removed when the outcome is dropped.
    pub vram: VramFiles,
}

/// Console substrings that mean the guest kernel hit an error.
const KERNEL_ERROR_PATTERNS: &[&str] = &[
    "Kernel panic - not syncing",
    "Oops: ",
    "BUG: ",
    "WARNING: ",
    "general protection fault",
    "Unable to handle kernel",
    "KASAN: ",
    "UBSAN: ",
    "Call Trace:",
];

const MARKER_INIT: &str = "HMMGPU-INIT uptime=";
const MARKER_READY: &str = "HMMGPU-READY uptime=";
const MARKER_STATUS: &str = "HMMGPU-EXIT-STATUS=";
const MARKER_INIT_FAILED: &str = "HMMGPU-INIT-FAILED:";

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
            unsafe {
                libc::kill(-(self.child.id() as i32), sig);
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
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    reader: Option<JoinHandle<()>>,
}

const STATS_PREFIX: &str = "hmmgpu-device: stats: ";

fn spawn_backend(cfg: &VmConfig, bin: &Path, gpu: u32, vram: &Path) -> Result<Backend> {
    let socket = cfg.run_dir.join(format!("gpu{gpu}.sock"));
    let control = cfg.run_dir.join(format!("gpu{gpu}.control"));
    // Its stdout goes to our stderr: stdout carries only the guest console.
    let stdout = Stdio::from(std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned()?);
    let mut cmd = Command::new(bin);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--vram-path")
        .arg(vram)
        .arg("--vram-size")
        .arg(cfg.vram_size.to_string())
        .arg("--control")
        .arg(&control)
        .args(
            cfg.extra
                .backend_args
                .get(gpu as usize)
                .into_iter()
                .flatten(),
        )
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped());
    log(format!(
        "gpu{gpu}: {} --socket {} --vram-path {} --vram-size {} --control {}{}",
        bin.display(),
        socket.display(),
        vram.display(),
        cfg.vram_size,
        control.display(),
        cfg.extra
            .backend_args
            .get(gpu as usize)
            .map_or(String::new(), |a| format!(" {}", shell_join(a)))
    ));
    let mut proc = Proc::spawn(&format!("hmmgpu-device gpu{gpu}"), &mut cmd)?;
    // For fault injection from outside (a killed backend: surprise loss).
    let pid_file = cfg.run_dir.join(format!("gpu{gpu}.pid"));
    std::fs::write(&pid_file, format!("{}\n", proc.child.id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    let stderr = proc.child.stderr.take().unwrap();
    let exit_stats = Arc::new(Mutex::new(None));
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    let (es, tail) = (Arc::clone(&exit_stats), Arc::clone(&stderr_tail));
    let reader = std::thread::spawn(move || {
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
            let mut t = tail.lock().unwrap();
            t.push_back(line);
            if t.len() > 40 {
                t.pop_front();
            }
        }
    });
    let mut b = Backend {
        gpu,
        proc,
        control,
        exit_stats,
        stderr_tail,
        reader: Some(reader),
    };

    // Wait for its vhost-user socket.
    let until = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(s) = b.proc.poll() {
            b.join_reader();
            bail!(ExitError {
                exit: Exit::BackendDied,
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
                exit: Exit::BackendDied,
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

    fn tail(&self) -> String {
        self.stderr_tail
            .lock()
            .unwrap()
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

    /// Ends the backend and returns its final stats: the exit line if it
    /// printed one, else what the control socket said before it was stopped.
    fn finish(&mut self) -> Option<BackendStats> {
        let mut control = None;
        if self.proc.poll().is_none() {
            // QEMU is gone; a backend may exit on the disconnect by itself.
            if self.proc.wait_for(Duration::from_secs(2)).is_none() {
                match self.query_stats() {
                    Ok(v) => control = Some(v),
                    Err(e) => log(format!("gpu{}: control socket stats: {e:#}", self.gpu)),
                }
                self.proc.stop(Duration::from_secs(5));
            }
        }
        self.join_reader();
        if let Some(v) = self.exit_stats.lock().unwrap().take() {
            return Some(BackendStats {
                gpu: self.gpu,
                source: StatsSource::ExitLine,
                raw: v,
            });
        }
        control.map(|raw| BackendStats {
            gpu: self.gpu,
            source: StatsSource::ControlSocket,
            raw,
        })
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
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
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

/// The kernel command line for a run.
pub fn kernel_cmdline(arch: Arch, cmd: &[String], noload: bool) -> Result<String> {
    let console = match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Ppc64le => "hvc0",
    };
    let mut s = format!("console={console} panic=-1 oops=panic loglevel=6 printk.time=1");
    if noload {
        s.push_str(" hmmgpu.noload");
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

fn qemu_args(cfg: &VmConfig, vram: &VramFiles, backends: &[Backend]) -> Result<Vec<String>> {
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
    a.push(cfg.initramfs.display().to_string());
    a.push("-append".into());
    a.push(kernel_cmdline(cfg.arch, &cfg.cmd, cfg.noload)?);
    a.push("-qmp".into());
    a.push(format!(
        "unix:{},server=on,wait=off",
        cfg.run_dir.join("qmp.sock").display()
    ));
    for (b, path) in backends.iter().zip(&vram.paths) {
        a.extend(gpu_qemu_args(
            cfg.arch,
            b.gpu,
            path,
            cfg.vram_size,
            &cfg.run_dir,
        ));
    }
    Ok(a)
}

/// QEMU arguments for GPU `n`: its root port (q35), VRAM memdev, vhost-user
/// chardev (the socket `gpuN.sock` in `run_dir`) and the device.
fn gpu_qemu_args(arch: Arch, n: u32, vram: &Path, vram_size: u64, run_dir: &Path) -> Vec<String> {
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
            "socket,id={chardev},path={}",
            run_dir.join(format!("gpu{n}.sock")).display()
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

/// Scans console lines for init's markers and kernel errors, echoing them.
#[derive(Default)]
struct Scanner {
    echo: Option<Echo>,
    launch: Option<Instant>,
    console: Vec<String>,
    kernel_errors: Vec<String>,
    timings: Timings,
    status: Option<i32>,
    init_failed: Option<String>,
}

impl Scanner {
    fn feed(&mut self, t: Instant, line: String) {
        {
            let mut out = std::io::stdout().lock();
            let _ = match &self.echo {
                Some(Echo::Prefixed(p)) => writeln!(out, "{p}{line}"),
                _ => writeln!(out, "{line}"),
            };
            let _ = out.flush();
        }
        let at = t.duration_since(self.launch.unwrap_or(t));
        if line.contains(MARKER_INIT) && self.timings.init.is_none() {
            self.timings.init = Some(at);
        }
        if line.contains(MARKER_READY) && self.timings.ready.is_none() {
            self.timings.ready = Some(at);
        }
        if let Some(pos) = line.find(MARKER_INIT_FAILED) {
            self.init_failed = Some(line[pos + MARKER_INIT_FAILED.len()..].trim().to_string());
        }
        if line.contains(MARKER_STATUS) {
            match parse_uint_after(&line, MARKER_STATUS) {
                Some(n) if self.status.is_none() => {
                    self.status = Some(n as i32);
                    self.timings.exit_marker = Some(at);
                }
                Some(_) => {}
                None => log(format!("warning: malformed status marker: {line}")),
            }
        }
        if KERNEL_ERROR_PATTERNS.iter().any(|p| line.contains(p)) {
            self.kernel_errors.push(line.clone());
        }
        self.console.push(line);
    }
}

fn parse_uint_after(line: &str, marker: &str) -> Option<i64> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Boots the VM of `cfg` and waits for the guest command's status.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome> {
    if !cfg.qemu.is_file() {
        bail!("QEMU binary {} does not exist", cfg.qemu.display());
    }
    if !cfg.kernel_image.is_file() {
        bail!("kernel image {} does not exist", cfg.kernel_image.display());
    }
    if !cfg.initramfs.is_file() {
        bail!("initramfs {} does not exist", cfg.initramfs.display());
    }
    crate::cli::check_memory(cfg.memory)?;
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

    let args = qemu_args(cfg, &vram, &backends)?;
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
            .stdin(if cfg.extra.console_hook.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;

    // The guest console's input, for the console hook; non-blocking, so a
    // guest that never reads cannot stall this loop (a reply is dropped).
    let mut console_in = qemu.child.stdin.take();
    if let Some(input) = &console_in {
        use std::os::fd::AsRawFd;
        unsafe {
            let fd = input.as_raw_fd();
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            );
        }
    }
    // The console, line by line with host timestamps.
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stdout = qemu.child.stdout.take().unwrap();
    let console_reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let qemu_stderr = Arc::new(Mutex::new(VecDeque::<String>::new()));
    let qs = Arc::clone(&qemu_stderr);
    let mut stderr = qemu.child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        for l in all.lines() {
            eprintln!("[qemu] {l}");
            qs.lock().unwrap().push_back(l.to_string());
        }
    });

    let mut scan = Scanner {
        echo: Some(cfg.echo.clone()),
        launch: Some(launch),
        ..Default::default()
    };
    let mut failure: Option<(Exit, String)> = None;
    loop {
        if signals::interrupted() {
            return Err(exit::interrupted());
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((t, line)) => {
                if let (Some(hook), Some(input)) = (&cfg.extra.console_hook, console_in.as_mut()) {
                    if let Some(reply) = hook(&cfg.run_dir, &line) {
                        if let Err(e) = input.write_all(format!("{reply}\n").as_bytes()) {
                            log(format!("warning: writing to the guest console: {e}"));
                        }
                    }
                }
                scan.feed(t, line)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break, // QEMU closed its stdout: it exited
        }
        if launch.elapsed() > cfg.timeout && scan.status.is_none() {
            failure = Some((
                Exit::Timeout,
                format!(
                    "no HMMGPU-EXIT-STATUS within {}s (--timeout)",
                    cfg.timeout.as_secs()
                ),
            ));
            break;
        }
        if let Some(m) = scan.timings.exit_marker {
            if launch.elapsed() > m + Duration::from_secs(30) {
                break; // handled below: QEMU did not power off
            }
        }
        if scan.status.is_none() && !cfg.extra.backends_may_die {
            if let Some(i) = backends.iter_mut().position(|b| b.proc.poll().is_some()) {
                let b = &mut backends[i];
                let s = b.proc.poll().unwrap();
                b.join_reader();
                failure = Some((
                    Exit::BackendDied,
                    format!(
                        "hmmgpu-device for gpu{} exited ({s}) while the guest ran:\n{}",
                        b.gpu,
                        b.tail()
                    ),
                ));
                break;
            }
        }
    }

    // QEMU powers off after the marker; give it a moment, then stop it.
    let qemu_status = match qemu.wait_for(Duration::from_secs(if failure.is_some() {
        0
    } else {
        5
    })) {
        Some(s) => s,
        None => {
            if failure.is_none() {
                log("warning: QEMU did not exit 30s after the guest's status marker: stopping it");
            }
            qemu.stop(Duration::from_secs(5))
        }
    };
    // The readers end at QEMU's EOF; then take what the console still had.
    let _ = console_reader.join();
    let _ = stderr_reader.join();
    for (t, line) in rx.try_iter() {
        scan.feed(t, line);
    }
    let Scanner {
        console,
        kernel_errors,
        mut timings,
        status,
        init_failed,
        ..
    } = scan;
    timings.total = launch.elapsed();

    // A backend that failed before the guest reported a status is the likelier
    // cause of QEMU's failure than QEMU itself.
    if failure.is_none() && status.is_none() && !cfg.extra.backends_may_die {
        if let Some(i) = backends
            .iter_mut()
            .position(|b| b.proc.poll().is_some_and(|s| !s.success()))
        {
            let b = &mut backends[i];
            let s = b.proc.poll().unwrap();
            b.join_reader();
            failure = Some((
                Exit::BackendDied,
                format!(
                    "hmmgpu-device for gpu{} exited ({s}) before the guest reported a status (QEMU: {qemu_status}):\n{}",
                    b.gpu,
                    b.tail()
                ),
            ));
        }
    }

    let mut stats = Vec::new();
    for b in &mut backends {
        if let Some(s) = b.finish() {
            stats.push(s);
        } else {
            log(format!("warning: gpu{} reported no stats", b.gpu));
        }
    }

    let result = if let Some((e, m)) = failure {
        VmResult::Failed(e, m)
    } else if !kernel_errors.is_empty() {
        VmResult::Failed(
            Exit::GuestKernelError,
            format!(
                "the guest kernel reported errors (command status: {}):\n{}",
                status.map_or("none".into(), |s| s.to_string()),
                kernel_errors
                    .iter()
                    .map(|l| format!("    {l}\n"))
                    .collect::<String>()
            ),
        )
    } else if let (Some(why), Some(s)) = (&init_failed, status) {
        debug_assert_eq!(s, Exit::GuestInitFailed.code());
        VmResult::Failed(
            Exit::GuestInitFailed,
            format!("{why} (init reported status {s})"),
        )
    } else if let Some(s) = status {
        VmResult::Exited(s)
    } else {
        let tail: String = qemu_stderr
            .lock()
            .unwrap()
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect();
        VmResult::Failed(
            Exit::QemuFailed,
            format!(
                "QEMU exited ({qemu_status}) without an HMMGPU-EXIT-STATUS marker{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("; its stderr:\n{tail}")
                }
            ),
        )
    };
    Ok(VmOutcome {
        result,
        timings,
        launched: launch,
        stats,
        console,
        kernel_errors,
        vram,
    })
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
        let ppc = gpu_qemu_args(Arch::Ppc64le, 1, Path::new("/v1"), 1 << 30, Path::new("/r"));
        assert_eq!(ppc[0], "-object", "no root port on pseries");
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
    fn markers() {
        assert_eq!(
            parse_uint_after("[ 1.0] x HMMGPU-EXIT-STATUS=7", MARKER_STATUS),
            Some(7)
        );
        assert_eq!(parse_uint_after("HMMGPU-EXIT-STATUS=", MARKER_STATUS), None);
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
        assert!(s.counter("nope").is_err());
    }
}
