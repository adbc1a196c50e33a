//! Builds everything a VM needs by calling the repo's build scripts. Each
//! script logs progress on stderr (passed through) and prints its result as
//! the last line of its stdout.

use crate::cli::{Arch, Flavour};
use crate::exit;
use crate::signals;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

pub fn repo_root() -> PathBuf {
    // ci/xtask -> repo root
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    dir.canonicalize().unwrap_or(dir)
}

pub fn log(msg: impl AsRef<str>) {
    eprintln!("[xtask] {}", msg.as_ref());
}

/// Runs `cmd` with stderr passed through; returns the last nonempty line of
/// its stdout (the other stdout lines are passed to stderr).
pub fn run_script(what: &str, cmd: &mut Command) -> Result<String> {
    let start = Instant::now();
    log(format!("{what}: {}", describe(cmd)));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{what}: cannot start {}", describe(cmd)))?;
    let mut last = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.with_context(|| format!("{what}: reading its output"))?;
        if !line.trim().is_empty() {
            if !last.is_empty() {
                eprintln!("{last}");
            }
            last = line.trim().to_string();
        }
    }
    let status = child.wait()?;
    if signals::interrupted() {
        return Err(exit::interrupted());
    }
    if !status.success() {
        bail!("{what} failed ({status}): {}", describe(cmd));
    }
    if last.is_empty() {
        bail!("{what}: {} printed no result on stdout", describe(cmd));
    }
    log(format!(
        "{what}: {last} ({:.1}s)",
        start.elapsed().as_secs_f64()
    ));
    Ok(last)
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn script(rel: &str) -> Result<PathBuf> {
    let p = repo_root().join(rel);
    if !p.is_file() {
        bail!("{} does not exist yet", p.display());
    }
    Ok(p)
}

fn bash(rel: &str) -> Result<Command> {
    let mut c = Command::new("bash");
    c.arg(script(rel)?).current_dir(repo_root());
    Ok(c)
}

/// ci/setup-host.sh: idempotent, quick once its stamp exists.
pub fn setup_host() -> Result<()> {
    let start = Instant::now();
    let status = bash("ci/setup-host.sh")?
        .stdin(Stdio::null())
        .status()
        .context("running ci/setup-host.sh")?;
    if signals::interrupted() {
        return Err(exit::interrupted());
    }
    if !status.success() {
        bail!("ci/setup-host.sh failed ({status})");
    }
    if start.elapsed().as_secs() >= 2 {
        log(format!(
            "host setup done in {:.0}s",
            start.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// A built guest kernel (images/build-kernel.sh's KDIR).
#[derive(Clone, Debug)]
pub struct Kernel {
    pub kdir: PathBuf,
    pub arch: Arch,
}

impl Kernel {
    pub fn image(&self) -> PathBuf {
        self.kdir.join("image")
    }
}

pub fn kernel(arch: Arch, flavour: Flavour) -> Result<Kernel> {
    let kdir = PathBuf::from(run_script(
        "kernel",
        bash("images/build-kernel.sh")?.args([
            "--arch",
            arch.as_str(),
            "--flavour",
            flavour.as_str(),
        ]),
    )?);
    let k = Kernel { kdir, arch };
    if !k.image().is_file() {
        bail!(
            "images/build-kernel.sh printed {}, which has no kernel image",
            k.kdir.display()
        );
    }
    Ok(k)
}

/// The patched QEMU for `arch` guests: qemu-patches/build-qemu.sh prints its
/// install prefix. HMMGPU_QEMU=/path/to/qemu-system-x86_64 (x86_64 guests) or
/// HMMGPU_QEMU_PPC64=/path/to/qemu-system-ppc64 (ppc64le guests) uses that
/// binary instead (it must have vhost-user-hmmgpu-pci for runs with GPUs).
pub fn qemu(arch: Arch) -> Result<PathBuf> {
    let var = match arch {
        Arch::X86_64 => "HMMGPU_QEMU",
        Arch::Ppc64le => "HMMGPU_QEMU_PPC64",
    };
    if let Some(q) = std::env::var_os(var) {
        let q = PathBuf::from(q);
        if !q.is_file() {
            bail!("{var}={} is not a file", q.display());
        }
        log(format!("qemu: {var}={}", q.display()));
        return Ok(q);
    }
    let prefix = PathBuf::from(run_script(
        "qemu",
        &mut bash("qemu-patches/build-qemu.sh")
            .with_context(|| format!("building QEMU (or set {var})"))?,
    )?);
    let bin = prefix.join("bin").join(arch.qemu_binary());
    if !bin.is_file() {
        bail!(
            "qemu-patches/build-qemu.sh printed {}, which has no bin/{}",
            prefix.display(),
            arch.qemu_binary()
        );
    }
    Ok(bin)
}

/// `cargo build --release -p hmmgpu-device`; returns the binary's path.
/// HMMGPU_DEVICE=/path/to/hmmgpu-device uses that binary instead.
pub fn device() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("HMMGPU_DEVICE") {
        let d = PathBuf::from(d);
        if !d.is_file() {
            bail!("HMMGPU_DEVICE={} is not a file", d.display());
        }
        log(format!("device: HMMGPU_DEVICE={}", d.display()));
        return Ok(d);
    }
    log("device: cargo build --release -p hmmgpu-device");
    let mut child = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "build",
            "--release",
            "-p",
            "hmmgpu-device",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting cargo")?;
    let mut exe = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "hmmgpu-device" {
            if let Some(e) = v["executable"].as_str() {
                exe = Some(PathBuf::from(e));
            }
        }
    }
    let status = child.wait()?;
    if signals::interrupted() {
        return Err(exit::interrupted());
    }
    if !status.success() {
        bail!("cargo build --release -p hmmgpu-device failed ({status})");
    }
    exe.context("cargo built no hmmgpu-device executable")
}

/// images/build-driver.sh KDIR: builds hmmgpu.ko (W=1, warnings as errors).
pub fn driver(k: &Kernel) -> Result<PathBuf> {
    let mut cmd = bash("images/build-driver.sh").context("cannot build hmmgpu.ko")?;
    cmd.arg(&k.kdir);
    let ko = PathBuf::from(run_script("driver", &mut cmd)?);
    if !ko.is_file() {
        bail!(
            "images/build-driver.sh printed {}, which is not a file",
            ko.display()
        );
    }
    Ok(ko)
}

/// images/build-test-modules.sh KDIR: builds the test-only modules of
/// ci/guest/*/ (W=1, warnings as errors); returns the directory of the .ko
/// files. A test puts the one it needs into its own initramfs.
pub fn test_modules(k: &Kernel) -> Result<PathBuf> {
    let mut cmd = bash("images/build-test-modules.sh").context("cannot build the test modules")?;
    cmd.arg(&k.kdir);
    let dir = PathBuf::from(run_script("test modules", &mut cmd)?);
    if !dir.is_dir() {
        bail!(
            "images/build-test-modules.sh printed {}, which is not a directory",
            dir.display()
        );
    }
    Ok(dir)
}

/// The static guest programs of ci/guest/ for `k`'s architecture, built into
/// target/xtask/guest-<arch>-<flavour>.
pub fn guest_programs(k: &Kernel, flavour: Flavour) -> Result<Vec<PathBuf>> {
    let out = target_dir().join(format!(
        "xtask/guest-{}-{}",
        k.arch.as_str(),
        flavour.as_str()
    ));
    let mut cmd = bash("images/build-guest-programs.sh")?;
    cmd.arg("--kdir").arg(&k.kdir).arg("--out").arg(&out);
    let dir = PathBuf::from(run_script("guest programs", &mut cmd)?);
    let mut progs = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_file() && p.extension().is_none() {
            progs.push(p);
        }
    }
    progs.sort();
    if progs.is_empty() {
        bail!("{} holds no guest programs", dir.display());
    }
    Ok(progs)
}

pub fn initramfs(
    k: &Kernel,
    out: &Path,
    modules: &[PathBuf],
    progs: &[PathBuf],
    adds: &[PathBuf],
) -> Result<PathBuf> {
    let mut cmd = bash("images/build-initramfs.sh")?;
    cmd.arg("--kdir").arg(&k.kdir).arg("--out").arg(out);
    for m in modules {
        cmd.arg("--module").arg(m);
    }
    for p in progs {
        cmd.arg("--prog").arg(p);
    }
    for a in adds {
        if !a.is_file() {
            bail!("--add {}: no such file", a.display());
        }
        cmd.arg("--add").arg(a);
    }
    Ok(PathBuf::from(run_script("initramfs", &mut cmd)?))
}

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => repo_root().join("target"),
    }
}

/// What a VM run needs, built once.
#[derive(Clone, Debug)]
pub struct Artifacts {
    pub kernel: Kernel,
    pub qemu: PathBuf,
    /// hmmgpu-device, when some run has GPUs.
    pub device: Option<PathBuf>,
    /// hmmgpu.ko, unless left out.
    pub driver: Option<PathBuf>,
    pub programs: Vec<PathBuf>,
}

impl Artifacts {
    /// The initramfs of these artifacts (driver, guest programs, `adds`
    /// under /host/), built into `run_dir`.
    pub fn initramfs(&self, run_dir: &Path, adds: &[PathBuf]) -> Result<PathBuf> {
        let modules: Vec<_> = self.driver.iter().cloned().collect();
        initramfs(
            &self.kernel,
            &run_dir.join("initramfs.cpio.gz"),
            &modules,
            &self.programs,
            adds,
        )
    }
}

pub struct Wants {
    pub arch: Arch,
    pub flavour: Flavour,
    pub device: bool,
    pub driver: bool,
}

pub fn artifacts(w: &Wants) -> Result<Artifacts> {
    setup_host()?;
    let kernel = kernel(w.arch, w.flavour)?;
    let qemu = qemu(w.arch)?;
    let device = if w.device { Some(device()?) } else { None };
    let driver = if w.driver {
        Some(driver(&kernel)?)
    } else {
        None
    };
    let programs = guest_programs(&kernel, w.flavour)?;
    Ok(Artifacts {
        kernel,
        qemu,
        device,
        driver,
        programs,
    })
}
