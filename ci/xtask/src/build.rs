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

/// ci/setup-host.sh: installs what is missing (after listing it and asking
/// on a terminal; it changes nothing without an answer or --yes), quick once
/// its stamp exists. `--no-setup` / HMMGPU_NO_SETUP=1 skips it.
pub fn setup_host() -> Result<()> {
    let start = Instant::now();
    // stdin passed through: on a terminal the script asks before changing
    // the host.
    let status = bash("ci/setup-host.sh")?
        .status()
        .context("running ci/setup-host.sh")?;
    if signals::interrupted() {
        return Err(exit::interrupted());
    }
    if !status.success() {
        bail!(
            "ci/setup-host.sh did not set up this host ({status}; it says why above). \
             `cargo xtask doctor` lists what is missing; with all of it installed, \
             --no-setup (or HMMGPU_NO_SETUP=1) skips the script"
        );
    }
    if start.elapsed().as_secs() >= 2 {
        log(format!(
            "host setup done in {:.0}s",
            start.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

mod tree;
pub use tree::Kernel;

/// images/config/, the fragments a guest kernel's config is checked against.
pub fn config_dir() -> PathBuf {
    repo_root().join("images/config")
}

/// The environment variable that names a user's kernel tree for `arch`
/// guests (aliases of `--kernel-dir`).
pub fn kernel_dir_var(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "HMMGPU_KERNEL_DIR",
        Arch::Ppc64le => "HMMGPU_KERNEL_DIR_PPC64LE",
    }
}

/// A Debian linux-source release images/build-kernel.sh builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The guest kernel of every test but own-kernel.
    V7_3,
    /// own-kernel's tree.
    V7_2,
}

impl Release {
    pub fn as_str(self) -> &'static str {
        match self {
            Release::V7_3 => "7.3",
            Release::V7_2 => "7.2",
        }
    }
}

/// images/build-kernel.sh: builds (or finds cached) a Debian kernel tree and
/// returns its build directory, a plain `O=` tree. `plain`: the sources as
/// shipped, without images/patches/, as a user would build them.
pub fn debian_tree(arch: Arch, flavour: Flavour, release: Release, plain: bool) -> Result<PathBuf> {
    let mut cmd = bash("images/build-kernel.sh")?;
    cmd.args([
        "--arch",
        arch.as_str(),
        "--flavour",
        flavour.as_str(),
        "--release",
        release.as_str(),
    ]);
    if plain {
        cmd.arg("--plain");
    }
    Ok(PathBuf::from(run_script("kernel", &mut cmd)?))
}

/// Reads the kernel tree `dir` for an `arch` guest the one way every tree is
/// read (ours and a user's), checked against images/config for `flavour`.
pub fn open_kernel(dir: &Path, arch: Arch, flavour: Flavour) -> Result<Kernel> {
    let k = Kernel::open(dir, arch, flavour, &config_dir())?;
    log(format!("kernel: {}", k.describe()));
    Ok(k)
}

/// The guest kernel for `arch`: the tree `kernel_dir` (`--kernel-dir`), else
/// the one `HMMGPU_KERNEL_DIR` (x86_64) or `HMMGPU_KERNEL_DIR_PPC64LE` names,
/// else Debian's 7.3 built by images/build-kernel.sh. All three are read by
/// [`open_kernel`].
pub fn kernel(arch: Arch, flavour: Flavour, kernel_dir: Option<&Path>) -> Result<Kernel> {
    let var = kernel_dir_var(arch);
    let own = match (kernel_dir, std::env::var_os(var)) {
        (Some(d), env) => {
            if env.is_some() {
                log(format!(
                    "kernel: --kernel-dir {} overrides {var}",
                    d.display()
                ));
            }
            Some((d.to_path_buf(), "--kernel-dir".to_string()))
        }
        (None, Some(d)) if !d.is_empty() => Some((PathBuf::from(d), var.to_string())),
        (None, _) => None,
    };
    match own {
        Some((dir, from)) => {
            log(format!(
                "kernel: your tree {} ({from}; checked against images/config/{})",
                dir.display(),
                tree::fragment_names(arch, flavour).join(", images/config/")
            ));
            open_kernel(&dir, arch, flavour).context(from)
        }
        None => {
            let dir = debian_tree(arch, flavour, Release::V7_3, false)?;
            open_kernel(&dir, arch, flavour)
                .with_context(|| format!("images/build-kernel.sh built {}", dir.display()))
        }
    }
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

/// images/build-driver.sh: builds hmmgpu.ko (W=1, warnings as errors)
/// against `k`, with the make variables read from the tree (ARCH, LLVM,
/// CROSS_COMPILE, CC) in its environment.
pub fn driver(k: &Kernel) -> Result<PathBuf> {
    let mut cmd = bash("images/build-driver.sh").context("cannot build hmmgpu.ko")?;
    cmd.arg(&k.build);
    for v in &k.make_vars {
        if let Some((name, value)) = v.split_once('=') {
            cmd.env(name, value);
        }
    }
    let ko = PathBuf::from(run_script("driver", &mut cmd)?);
    if !ko.is_file() {
        bail!(
            "images/build-driver.sh printed {}, which is not a file",
            ko.display()
        );
    }
    Ok(ko)
}

/// A short stable name for a path (a cache or output directory per tree).
fn path_key(p: &Path) -> String {
    // FNV-1a: stable across Rust releases, unlike std's DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The static guest programs of ci/guest/ and the tree's own hmm-tests,
/// built against `k` (its lib/test_hmm_uapi.h, its uapi headers) into
/// target/xtask/guest-<arch>-<tree key>.
pub fn guest_programs(k: &Kernel) -> Result<Vec<PathBuf>> {
    let out = target_dir().join(format!(
        "xtask/guest-{}-{}",
        k.arch.as_str(),
        path_key(&k.build)
    ));
    let mut cmd = bash("images/build-guest-programs.sh")?;
    cmd.arg("--build")
        .arg(&k.build)
        .arg("--source")
        .arg(&k.source)
        .arg("--arch")
        .arg(k.arch.as_str())
        .arg("--out")
        .arg(&out)
        .arg("--")
        .args(&k.make_vars);
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

/// The cases of the tree's own hmm-tests (`hmm-tests -l`, written beside the
/// binary by images/build-guest-programs.sh), as hmm-tests names them in its
/// TAP output: `fixture.variant.test`.
pub fn hmm_tests_list(programs: &[PathBuf]) -> Result<String> {
    let bin = programs
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "hmm-tests"))
        .context("the guest programs have no hmm-tests")?;
    let list = bin.with_extension("list");
    std::fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))
}

/// The initramfs for a guest of `k`: the modules (and the tree's
/// test_hmm.ko), programs, and `adds` under /host/.
pub fn initramfs(
    k: &Kernel,
    out: &Path,
    modules: &[PathBuf],
    progs: &[PathBuf],
    adds: &[PathBuf],
) -> Result<PathBuf> {
    let mut cmd = bash("images/build-initramfs.sh")?;
    cmd.arg("--arch").arg(k.arch.as_str()).arg("--out").arg(out);
    for m in modules.iter().chain(k.test_hmm.iter()) {
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

pub struct Wants<'a> {
    pub arch: Arch,
    pub flavour: Flavour,
    pub device: bool,
    pub driver: bool,
    /// `--kernel-dir`: the user's built tree for `arch`.
    pub kernel_dir: Option<&'a Path>,
    /// `--no-setup` / HMMGPU_NO_SETUP=1: skip ci/setup-host.sh.
    pub no_setup: bool,
}

/// Everything `cargo xtask run` and `bench` need (and own-kernel, the same
/// way): host setup, the kernel, QEMU, the backend, hmmgpu.ko, the programs.
pub fn artifacts(w: &Wants) -> Result<Artifacts> {
    if w.no_setup {
        log("host setup skipped (--no-setup / HMMGPU_NO_SETUP)");
    } else {
        setup_host()?;
    }
    let kernel = kernel(w.arch, w.flavour, w.kernel_dir)?;
    let qemu = qemu(w.arch)?;
    let device = if w.device { Some(device()?) } else { None };
    let driver = if w.driver {
        Some(driver(&kernel)?)
    } else {
        None
    };
    let programs = guest_programs(&kernel)?;
    Ok(Artifacts {
        kernel,
        qemu,
        device,
        driver,
        programs,
    })
}
