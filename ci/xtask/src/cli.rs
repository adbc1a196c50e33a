//! Command-line interface of `cargo xtask`.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "hmmgpu developer and CI tasks", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build what is missing and boot a VM with N hmmgpu GPUs running a command.
    ///
    /// Exits with the guest command's exit status, or with one of the statuses
    /// of docs/running.md when the VM itself failed.
    Run(RunArgs),
    /// Everything CI runs: cargo test, the driver build (warnings as errors)
    /// and the VM tests. Ends with "N passed, N failed".
    Test(TestArgs),
    /// The same HMM workloads on test_hmm.ko and on hmmgpu in one VM boot:
    /// a table of ratios, also written as JSON. Not a test.
    Bench(BenchArgs),
    /// The backend's tests (unit and vhost-user socket tests) built for
    /// PowerPC hosts and run under qemu-user (also part of `test`).
    CrossTest(CrossTestArgs),
    /// Injects a fault into a running `cargo xtask run` VM's backend (its
    /// control socket), or sends it another request (docs/running.md).
    Inject(crate::inject::InjectArgs),
    /// The backend's fuzz targets: a campaign, or (--regress) the corpus,
    /// every past crash and a short run each (docs/fuzzing.md).
    Fuzz(crate::fuzz::FuzzArgs),
    /// Checks, changing nothing, what each command needs on this host: tools
    /// and packages (versions, Debian packages), the kernel toolchain, QEMU,
    /// hugepages and /dev/shm, KVM (with a probe guest). Exits 1 if
    /// something needed is missing.
    Doctor,
    /// The KVM probe's child process (`doctor` and `--accel auto` run it
    /// with a deadline).
    #[command(hide = true)]
    KvmProbe,
    /// Runs VM tests on the gcov kernel and reports the lines of mm/hmm.c,
    /// mm/migrate_device.c, mm/memremap.c, mm/migrate.c and the driver's C
    /// they executed: a table, an lcov tracefile and an HTML report.
    Coverage(crate::coverage::CoverageArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccelChoice {
    /// KVM if /dev/kvm is usable and the CPU has VMX/SVM, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Flavour {
    Release,
    /// lockdep, DEBUG_VM, KASAN (kernel built with clang).
    Debug,
    /// Release plus gcov profiling of mm/hmm.c, mm/migrate_device.c,
    /// mm/memremap.c, mm/migrate.c and the driver's C (cargo xtask coverage).
    Gcov,
}

/// The guest architecture (the host's is whatever this runs on: x86_64 or
/// PowerPC; a guest of another architecture runs under TCG).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    /// q35, console on ttyS0.
    #[value(name = "x86_64")]
    X86_64,
    /// pseries (little-endian), console on hvc0.
    #[value(name = "ppc64le")]
    Ppc64le,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Ppc64le => "ppc64le",
        }
    }

    /// The QEMU system emulator for this guest.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Ppc64le => "qemu-system-ppc64",
        }
    }

    /// Whether this guest can use the host's KVM (same architecture).
    pub fn is_host(self) -> bool {
        match self {
            Arch::X86_64 => cfg!(target_arch = "x86_64"),
            Arch::Ppc64le => cfg!(all(target_arch = "powerpc64", target_endian = "little")),
        }
    }
}

impl Flavour {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavour::Release => "release",
            Flavour::Debug => "debug",
            Flavour::Gcov => "gcov",
        }
    }
}

/// Options shared by `run`, `test` and `bench`.
#[derive(Args, Debug, Clone)]
pub struct VmOpts {
    /// Guest architecture (`test` always adds its ppc64le tests; this picks
    /// the architecture of the others).
    #[arg(long, value_enum, default_value_t = Arch::X86_64)]
    pub arch: Arch,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Guest kernel flavour.
    #[arg(long, value_enum, default_value_t = Flavour::Release)]
    pub flavour: Flavour,
    /// Guest RAM (bytes, or with a K/M/G suffix).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub memory: u64,
    /// Guest vCPUs. Under TCG one vCPU avoids TLB-shootdown IPIs between
    /// emulated CPUs, which makes migration-heavy debug-kernel runs about
    /// twice as fast.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub cpus: u32,
    /// Your own built kernel tree for `--arch` guests: an in-tree build or
    /// an `O=` build directory, configured with images/config's fragments
    /// (docs/running.md). Aliases: HMMGPU_KERNEL_DIR (x86_64),
    /// HMMGPU_KERNEL_DIR_PPC64LE (ppc64le).
    #[arg(long, value_name = "PATH")]
    pub kernel_dir: Option<PathBuf>,
    /// Skip ci/setup-host.sh (you installed what `cargo xtask doctor` lists).
    #[arg(long, env = "HMMGPU_NO_SETUP", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_setup: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Number of hmmgpu devices (0: a bare boot without backends).
    #[arg(long, default_value_t = 1)]
    pub gpus: u32,
    /// VRAM per GPU: a power of two, at least 4M (K/M/G suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_vram_size)]
    pub vram: u64,
    #[command(flatten)]
    pub vm: VmOpts,
    /// Seconds from launch until the command's status must be reported
    /// (default 900; none with --shell).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Copy a host file into the guest's /host/ (repeatable).
    #[arg(long = "add", value_name = "PATH")]
    pub add: Vec<PathBuf>,
    /// Leave hmmgpu.ko out of the initramfs (it is built and loaded by default).
    #[arg(long)]
    pub no_driver: bool,
    /// Put hmmgpu.ko in the initramfs but do not load it (hmmgpu.noload).
    #[arg(long)]
    pub noload: bool,
    /// Write the device timeline here: a Chrome trace-event JSON file
    /// (ui.perfetto.dev, chrome://tracing) with every GPU's commands,
    /// faults, interrupts and resets and the guest's markers, on
    /// CLOCK_MONOTONIC.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// An interactive shell on the guest console instead of a command:
    /// stdin and stdout on the terminal, the shell's exit status is the
    /// run's; Ctrl-C goes to the guest, Ctrl-A X ends the VM.
    #[arg(long, conflicts_with = "cmd")]
    pub shell: bool,
    /// Mount a host folder in the guest over virtio-9p:
    /// HOST_DIR[:GUEST_DIR][,ro] (default GUEST_DIR /mnt/NAME, read-write).
    #[arg(long, value_name = "HOST_DIR[:GUEST_DIR][,ro]", value_parser = parse_share)]
    pub share: Vec<Share>,
    /// Add to the guest kernel's command line (repeatable).
    #[arg(long, value_name = "ARGS")]
    pub append: Vec<String>,
    /// Add one argument to QEMU's command line (repeatable, in order).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_arg: Vec<String>,
    /// Kernel messages off stdout (they still go to the console log):
    /// stdout is the command's output.
    #[arg(long)]
    pub quiet: bool,
    /// Start a GPU's backend again when it is killed with SIGKILL (e.g.
    /// `cargo xtask inject kill_backend`), on the same socket and VRAM
    /// file; QEMU reconnects and the guest driver resets the device
    /// (docs/fault-injection.md, `kill_backend`).
    #[arg(long)]
    pub restart_backends: bool,
    /// Keep the run's artifacts folder under target/xtask/runs/ even if
    /// the run passed.
    #[arg(long)]
    pub keep: bool,
    /// Command to run in the guest (cwd /tmp); default: hmmgpu-demo.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// A host folder shared with the guest (`--share`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
}

/// Parses `HOST_DIR[:GUEST_DIR][,ro]`.
pub fn parse_share(s: &str) -> Result<Share, String> {
    let (spec, readonly) = match s.strip_suffix(",ro") {
        Some(rest) => (rest, true),
        None => (s.strip_suffix(",rw").unwrap_or(s), false),
    };
    let (host, guest) = match spec.split_once(':') {
        Some((h, g)) => (h, Some(g)),
        None => (spec, None),
    };
    if host.is_empty() {
        return Err(format!("--share '{s}': no host folder"));
    }
    let host = PathBuf::from(host);
    let guest = match guest {
        Some(g) if g.starts_with('/') && !g.contains(char::is_whitespace) => g.to_string(),
        Some(g) => {
            return Err(format!(
                "--share '{s}': the guest folder '{g}' must be an absolute path without spaces"
            ))
        }
        None => {
            let name = host
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| !n.contains(char::is_whitespace))
                .ok_or_else(|| format!("--share '{s}': name the guest folder (HOST:GUEST)"))?;
            format!("/mnt/{name}")
        }
    };
    Ok(Share {
        host,
        guest,
        readonly,
    })
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub vm: VmOpts,
    /// hmmgpu devices. The workloads use GPU 0, except one process per GPU
    /// on two GPUs; the second GPU also makes hmmgpu's full hmm-tests run
    /// (hmm2 cases need /dev/hmm_dmirror1) the same set of cases as
    /// test_hmm.ko's, so their wall times compare.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub gpus: u32,
    /// VRAM per GPU (half device-private, half coherent); the
    /// oversubscription workload is twice the device-private half.
    #[arg(long, default_value = "1G", value_parser = parse_vram_size)]
    pub vram: u64,
    /// Also write the results here (default: target/xtask/bench/<unix time>.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seconds the whole benchmark boot may take.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Draw throughput against migration size for both drivers (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No VM: print the change from run A to run B (their JSON files).
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"], conflicts_with = "from")]
    pub compare: Option<Vec<PathBuf>>,
    /// No VM: print (and --plot) a saved run's JSON instead of running.
    #[arg(long, value_name = "RUN.json")]
    pub from: Option<PathBuf>,
    /// Record the device timeline while benchmarking (its cost shows with
    /// --compare against a run without it); written here.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["compare", "from"])]
    pub trace: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CrossTestArgs {
    /// Targets (default: both).
    #[arg(long = "target", value_enum)]
    pub targets: Vec<crate::cross::CrossTarget>,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Skip the fmt and clippy gates, `cargo test --workspace`, the PowerPC
    /// backend tests and the driver build; only the VM tests.
    #[arg(long)]
    pub vm_only: bool,
    /// Seconds each VM test may take from launch to the status marker.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Run only the VM tests matching these names or glob patterns
    /// (`'fault-*'`; default: all). `--list` shows them.
    #[arg(value_name = "TEST")]
    pub only: Vec<String>,
    /// List the VM tests and exit.
    #[arg(long)]
    pub list: bool,
    /// Write each VM test boot's device timeline into this folder
    /// (TEST.json, TEST.boot2.json...).
    #[arg(long, value_name = "DIR")]
    pub trace: Option<PathBuf>,
    /// `cargo xtask coverage`: collects each boot's gcov counters.
    #[arg(skip)]
    pub coverage: Option<std::rc::Rc<crate::coverage::Collector>>,
    /// Leave out the VM tests matching this name or glob (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub skip: Vec<String>,
    /// Stop at the first failure.
    #[arg(long)]
    pub fail_fast: bool,
    /// Run part K of N of the selected VM tests (the i-th goes to shard
    /// i mod N + 1); the steps before the VM tests run in shard 1 only.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<crate::tests::Shard>,
    /// Also write the results as JUnit XML (one testcase per step and VM
    /// test, hmm-tests' cases as their own).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Also write the results as JSON (docs/running.md, "Results").
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// How results go to stdout: `human` (default) or `ktap` (KTAP v1, as
    /// the kernel's kunit.py parses; the consoles go to stderr then).
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub format: OutputFormat,
    /// Keep every boot's artifacts folder under target/xtask/runs/ (by
    /// default those of passing tests are removed).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Ktap,
}

/// The project's one size parser (binary units; `64MB` is refused as
/// ambiguous).
pub use hmmgpu_device::cli::parse_size;

pub fn parse_vram_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    // The driver splits it into two halves (device-private and
    // device-coherent), each registered in 2 MiB subsections.
    if n < 4 << 20 || !n.is_power_of_two() {
        return Err(format!(
            "VRAM size '{s}' ({n} bytes) must be a power of two of at least 4M"
        ));
    }
    Ok(n)
}

/// Checks the guest RAM size QEMU gets.
pub fn check_memory(n: u64) -> Result<()> {
    if !n.is_multiple_of(1 << 20) || n < 256 << 20 {
        bail!("--memory {n} bytes: want a whole number of MiB, at least 256M");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        parse_size("M").unwrap_err();
        parse_size("12Q").unwrap_err();
        parse_size("-1").unwrap_err();
        parse_size("99999999999T").unwrap_err();
        assert_eq!(parse_vram_size("4M"), Ok(4 << 20));
        parse_vram_size("2M").unwrap_err();
        parse_vram_size("3M").unwrap_err();
        check_memory(2 << 30).unwrap();
        assert!(check_memory((2 << 30) + 1).is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c =
            Cli::try_parse_from(["x", "run", "--gpus", "0", "--", "sh", "-c", "exit 7"]).unwrap();
        match c.command {
            Command::Run(r) => {
                assert_eq!(r.gpus, 0);
                assert_eq!(r.cmd, ["sh", "-c", "exit 7"]);
                assert_eq!(r.vram, 1 << 30);
            }
            _ => panic!(),
        }
        Cli::try_parse_from(["x", "run", "--vram", "3M"]).unwrap_err();
        let c = Cli::try_parse_from(["x", "run", "--arch", "ppc64le"]).unwrap();
        match c.command {
            Command::Run(r) => assert_eq!(r.vm.arch, Arch::Ppc64le),
            _ => panic!(),
        }
        Cli::try_parse_from(["x", "run", "--arch", "arm64"]).unwrap_err();
    }

    #[test]
    fn kernel_dir_and_no_setup() {
        for cmd in ["run", "test", "bench"] {
            let c = Cli::try_parse_from(["x", cmd, "--kernel-dir", "/k", "--no-setup"]).unwrap();
            let vm = match c.command {
                Command::Run(r) => r.vm,
                Command::Test(t) => t.vm,
                Command::Bench(b) => b.vm,
                _ => panic!(),
            };
            assert_eq!(vm.kernel_dir, Some(PathBuf::from("/k")));
            assert!(vm.no_setup);
        }
        let c = Cli::try_parse_from(["x", "run"]).unwrap();
        match c.command {
            Command::Run(r) => assert!(r.vm.kernel_dir.is_none()),
            _ => panic!(),
        }
    }

    #[test]
    fn shares() {
        let s = parse_share("/tmp/out").unwrap();
        assert_eq!((s.guest.as_str(), s.readonly), ("/mnt/out", false));
        let s = parse_share("/tmp/out:/results,ro").unwrap();
        assert_eq!(s.host, PathBuf::from("/tmp/out"));
        assert_eq!((s.guest.as_str(), s.readonly), ("/results", true));
        parse_share(":/x").unwrap_err();
        parse_share("/tmp/a:rel").unwrap_err();
    }

    #[test]
    fn run_and_test_options() {
        let c = Cli::try_parse_from([
            "x",
            "run",
            "--shell",
            "--append",
            "a=1 b",
            "--qemu-arg",
            "-d",
            "--qemu-arg",
            "guest_errors",
            "--quiet",
            "--share",
            "/tmp/x:/y",
            "--restart-backends",
        ])
        .unwrap();
        match c.command {
            Command::Run(r) => {
                assert!(r.shell && r.quiet && r.restart_backends);
                assert_eq!(r.append, ["a=1 b"]);
                assert_eq!(r.qemu_arg, ["-d", "guest_errors"]);
                assert_eq!(r.share[0].guest, "/y");
            }
            _ => panic!(),
        }
        Cli::try_parse_from(["x", "run", "--shell", "--", "true"]).unwrap_err();
        let c = Cli::try_parse_from([
            "x",
            "test",
            "fault-*",
            "--skip",
            "*-debug",
            "--shard",
            "2/3",
            "--fail-fast",
            "--format",
            "ktap",
            "--junit",
            "j.xml",
        ])
        .unwrap();
        match c.command {
            Command::Test(t) => {
                assert_eq!(t.only, ["fault-*"]);
                assert_eq!(t.skip, ["*-debug"]);
                assert_eq!(t.shard.map(|s| (s.k, s.n)), Some((2, 3)));
                assert!(t.fail_fast);
                assert_eq!(t.format, OutputFormat::Ktap);
            }
            _ => panic!(),
        }
        Cli::try_parse_from(["x", "test", "--shard", "3/2"]).unwrap_err();
    }
}
