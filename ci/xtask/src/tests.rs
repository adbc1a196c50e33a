//! `cargo xtask test`: what CI runs. `cargo test --workspace`, the driver
//! build (warnings as errors), then the VM tests, each a function that boots a
//! VM with a guest command and checks what came back.

use crate::build::{self, log, Kernel};
use crate::cli::{AccelChoice, Arch, Flavour, OutputFormat};

/// Where the human-readable report goes: stdout, or stderr when stdout
/// carries KTAP (`--format ktap`).
static REPORT_TO_STDERR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn report_to_stderr() -> bool {
    REPORT_TO_STDERR.load(std::sync::atomic::Ordering::Relaxed)
}

/// println! for the human-readable report (see [`REPORT_TO_STDERR`]).
macro_rules! say {
    ($($t:tt)*) => {
        if $crate::tests::report_to_stderr() { eprintln!($($t)*) } else { println!($($t)*) }
    };
}

/// print! for the human-readable report.
macro_rules! say_part {
    ($($t:tt)*) => {
        if $crate::tests::report_to_stderr() { eprint!($($t)*) } else { print!($($t)*) }
    };
}

mod ecc;
mod faults;
mod hostile;
mod loss;
mod oracle;
mod ownkernel;
mod recovery;
mod report;
mod reset;
mod select;
mod selftest;
mod unplug;
use crate::cli::TestArgs;
use crate::exit;
use crate::pattern;
use crate::signals;
use crate::vm::{self, Accel, Echo, VmConfig, VmOutcome, VmResult};
use anyhow::{anyhow, bail, ensure, Context, Result};
use report::{Case, TestResult};
pub use select::Shard;
use std::cell::RefCell;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the VM tests need, each built once; a build's error fails the tests
/// that need it (and only those).
struct Ctx {
    /// The architecture of the main tests (`--arch`).
    arch: Arch,
    /// `--accel`, for builds of `arch` made on demand.
    accel_choice: AccelChoice,
    /// `--kernel-dir`: the user's tree for `arch` (every flavour).
    kernel_dir: Option<PathBuf>,
    kernel: Result<Kernel, String>,
    qemu: Result<PathBuf, String>,
    device: Result<PathBuf, String>,
    driver: Result<PathBuf, String>,
    programs: Result<Vec<PathBuf>, String>,
    accel: Accel,
    memory: u64,
    cpus: u32,
    timeout: Duration,
    /// bare-boot's launch→init, for the boot-time comparison.
    bare_init: Option<Duration>,
    /// demo's launch→ready (driver loaded and bound).
    demo_ready: Option<Duration>,
    /// For tests that always run on another flavour or architecture, built
    /// on first use.
    stacks: Vec<((Arch, Flavour), Result<Stack, String>)>,
    /// `--trace DIR`: each boot's device timeline goes there.
    trace_dir: Option<PathBuf>,
    /// Boots per test so far (a test's second boot is TEST.boot2.json).
    trace_boots: std::cell::RefCell<std::collections::BTreeMap<String, u32>>,
    /// `cargo xtask coverage`: every boot dumps its gcov counters.
    coverage: Option<std::rc::Rc<crate::coverage::Collector>>,
    /// When set, every boot runs on this build (a test's `-debug` variant).
    on: Option<Stack>,
    /// This run's artifacts folder, target/xtask/runs/<time>.
    runs_dir: PathBuf,
    /// How the consoles are echoed.
    format: OutputFormat,
    /// The current test's boots' artifacts folders, its last boot's console
    /// and its cases (hmm-tests'), for the report.
    boot_dirs: RefCell<Vec<PathBuf>>,
    last_console: RefCell<Vec<String>>,
    cases: RefCell<Vec<Case>>,
}

/// One boot of a VM test.
struct Boot<'a> {
    test: &'a str,
    gpus: u32,
    /// Include and load hmmgpu.ko.
    driver: bool,
    cmd: Vec<String>,
}

/// Everything a boot of one architecture and flavour needs.
#[derive(Clone)]
struct Stack {
    kernel: Kernel,
    driver: PathBuf,
    programs: Vec<PathBuf>,
    qemu: PathBuf,
    accel: Accel,
}

/// Console lines a failed test's report shows (JUnit, JSON).
const CONSOLE_EXCERPT: usize = 60;

/// Per GPU; half of it is device-private, half device-coherent, and
/// hmm-tests' THP benchmark migrates up to 256 MiB at once.
const VRAM_SIZE: u64 = 1 << 30;

fn s<T>(r: Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{e:#}"))
}

fn argv(s: &[&str]) -> Vec<String> {
    s.iter().map(|a| a.to_string()).collect()
}

fn need<'a, T>(what: &str, r: &'a Result<T, String>) -> Result<&'a T> {
    r.as_ref().map_err(|e| anyhow!("{what} unavailable: {e}"))
}

impl Ctx {
    /// The build of `arch` and `flavour` (built the first time it is asked
    /// for; a failed build fails every test that asks for it).
    fn stack(&mut self, arch: Arch, flavour: Flavour) -> Result<Stack> {
        // Coverage runs every x86_64 boot on the gcov kernel.
        let flavour = match (&self.coverage, arch) {
            (Some(_), Arch::X86_64) => Flavour::Gcov,
            _ => flavour,
        };
        let key = (arch, flavour);
        if !self.stacks.iter().any(|(k, _)| *k == key) {
            let built = (|| {
                let own = self.kernel_dir.as_deref().filter(|_| arch == self.arch);
                let kernel = build::kernel(arch, flavour, own)?;
                let driver = build::driver(&kernel)?;
                let programs = build::guest_programs(&kernel)?;
                let qemu = build::qemu(arch)?;
                let choice = if arch == self.arch {
                    self.accel_choice
                } else {
                    AccelChoice::Auto
                };
                let accel = vm::resolve_accel(choice, arch)?;
                Ok::<_, anyhow::Error>(Stack {
                    kernel,
                    driver,
                    programs,
                    qemu,
                    accel,
                })
            })();
            self.stacks.push((key, s(built)));
        }
        let (_, r) = self.stacks.iter().find(|(k, _)| *k == key).unwrap();
        need(
            &format!("the {} {} build", arch.as_str(), flavour.as_str()),
            r,
        )
        .cloned()
    }

    fn boot(&self, b: Boot) -> Result<VmOutcome> {
        self.boot_extra(b, vm::VmExtra::default())
    }

    /// [`Ctx::boot`] with backend arguments or a console hook.
    fn boot_extra(&self, b: Boot, extra: vm::VmExtra) -> Result<VmOutcome> {
        if let Some(st) = &self.on {
            let driver = b.driver.then_some(&st.driver);
            return self.boot_with(
                b,
                &st.kernel,
                driver,
                &st.programs,
                &st.qemu,
                st.accel,
                self.cpus,
                extra,
            );
        }
        let kernel = need("the guest kernel", &self.kernel)?;
        let programs = need("the guest programs", &self.programs)?;
        let driver = if b.driver {
            Some(need("hmmgpu.ko", &self.driver)?)
        } else {
            None
        };
        let qemu = need("QEMU", &self.qemu)?;
        self.boot_with(
            b, kernel, driver, programs, qemu, self.accel, self.cpus, extra,
        )
    }

    /// Boots `b` on another build (see [`Ctx::stack`]).
    fn boot_on(&self, b: Boot, st: &Stack, cpus: u32) -> Result<VmOutcome> {
        let driver = b.driver.then_some(&st.driver);
        self.boot_with(
            b,
            &st.kernel,
            driver,
            &st.programs,
            &st.qemu,
            st.accel,
            cpus,
            vm::VmExtra::default(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn boot_with(
        &self,
        b: Boot,
        kernel: &Kernel,
        driver: Option<&PathBuf>,
        programs: &[PathBuf],
        qemu: &std::path::Path,
        accel: Accel,
        cpus: u32,
        mut extra: vm::VmExtra,
    ) -> Result<VmOutcome> {
        let modules: Vec<PathBuf> = driver.into_iter().cloned().collect();
        let device_bin = match (b.gpus, &extra.backend_bin) {
            (0, _) => None,
            (_, Some(bin)) => Some(bin.clone()),
            (_, None) => Some(need("hmmgpu-device", &self.device)?.clone()),
        };
        let run_dir = vm::RunDir::create()?;
        let (cmd, mut adds) = match &self.coverage {
            Some(c) => (c.wrap(&b.cmd), vec![c.dump_script().to_path_buf()]),
            None => (b.cmd.clone(), Vec::new()),
        };
        adds.extend(extra.adds.iter().cloned());
        let initramfs = build::initramfs(
            kernel,
            &run_dir.path.join("initramfs.cpio.gz"),
            &modules,
            programs,
            &adds,
        )?;
        let vram_size = extra.vram_size.unwrap_or(VRAM_SIZE);
        // --trace DIR, unless the test records the timeline itself.
        let traced = match &self.trace_dir {
            Some(dir) if !extra.backend_args.iter().flatten().any(|a| a == "--trace") => {
                let mut boots = self.trace_boots.borrow_mut();
                let n = boots.entry(b.test.to_string()).or_default();
                *n += 1;
                Some((
                    crate::trace::boot_file(dir, b.test, *n),
                    crate::trace::arm(&mut extra, &run_dir.path, b.gpus),
                ))
            }
            _ => None,
        };
        let test = b.test;
        let cfg = VmConfig {
            arch: kernel.arch,
            qemu: qemu.to_path_buf(),
            kernel_image: kernel.image(),
            initramfs,
            device_bin,
            gpus: b.gpus,
            vram_size,
            memory: self.memory,
            cpus,
            accel,
            timeout: self.timeout,
            cmd,
            noload: false,
            echo: match self.format {
                OutputFormat::Human => Echo::Prefixed(format!("  {}| ", b.test)),
                OutputFormat::Ktap => Echo::PrefixedStderr(format!("  {}| ", b.test)),
            },
            run_dir: run_dir.path.clone(),
            extra: {
                let dir = crate::artifacts::boot_dir(&self.runs_dir, b.test);
                self.boot_dirs.borrow_mut().push(dir.clone());
                extra.artifacts = Some(dir);
                extra
            },
        };
        let out = vm::run(&cfg)?;
        *self.last_console.borrow_mut() =
            out.console[out.console.len().saturating_sub(CONSOLE_EXCERPT)..].to_vec();
        log(format!("{}: {}", b.test, out.timings));
        for s in &out.stats {
            log(format!(
                "{test}: gpu{} stats ({:?}): {}",
                s.gpu, s.source, s.raw
            ));
        }
        if let Some((dest, armed)) = &traced {
            crate::trace::write(dest, armed, &out, test)?;
        }
        if let Some(c) = &self.coverage {
            c.collect(test, &out);
        }
        Ok(out)
    }
}

/// Fails unless the guest command exited with `want` (in a run the oracle
/// passed, see vm::verdict) and the driver recovered from nothing: no
/// reset, no polled completion, no recovery message (tests/recovery.rs).
fn expect_status(out: &VmOutcome, want: i32) -> Result<()> {
    expect_status_with(out, want, &recovery::Expected::NONE)
}

/// [`expect_status`] for a test that expects the recoveries `exp`.
fn expect_status_with(out: &VmOutcome, want: i32, exp: &recovery::Expected) -> Result<()> {
    match &out.result {
        VmResult::Exited(n) if *n == want => {}
        VmResult::Exited(n) => bail!("the guest command exited with {n}, want {want}"),
        VmResult::Failed(e, m) => bail!("the VM failed: {e}: {m}"),
    }
    recovery::check(out, exp)
}

struct VmTest {
    name: &'static str,
    about: &'static str,
    run: fn(&mut Ctx) -> Result<()>,
}

const VM_TESTS: &[VmTest] = &[
    VmTest {
        name: "bare-boot",
        about: "--gpus 0, no driver, `true`: the baseline boot",
        run: t_bare_boot,
    },
    VmTest {
        name: "exit-status",
        about: "`sh -c 'exit 7'` gives 7",
        run: t_exit_status,
    },
    VmTest {
        name: "oracle",
        about: "the run oracle catches broken runs: a forged status marker, an init that does not power off, a backend that exits 1 or prints a crash, a driver that polled a completion",
        run: oracle::t_oracle,
    },
    VmTest {
        name: "device-bound",
        about: "the driver binds the virtio device and registers device-private memory",
        run: t_device_bound,
    },
    VmTest {
        name: "demo",
        about: "hmmgpu-demo exits 0",
        run: t_demo,
    },
    VmTest {
        name: "trace-demo",
        about: "hmmgpu-demo with the device timeline (--trace): a valid Chrome trace whose COPY events add up to the backend's bytes_guest_to_vram and bytes_vram_to_guest, on the guest markers' clock",
        run: t_trace_demo,
    },
    VmTest {
        name: "vram-holds-data",
        about: "a buffer left in VRAM is in the host's VRAM file",
        run: t_vram_holds_data,
    },
    VmTest {
        name: "rmmod-resident",
        about: "rmmod with a buffer in VRAM brings every byte back",
        run: t_rmmod_resident,
    },
    VmTest {
        name: "hmm-tests",
        about: "the kernel's hmm-tests on test_hmm.ko then on hmmgpu (2 GPUs), same boot: hmmgpu passes all but ci/hmm-tests-expected.txt",
        run: selftest::t_hmm_tests,
    },
    VmTest {
        name: "own-kernel",
        about: "a user's plain O= tree of Debian's linux-source-7.2 (make allnoconfig, images/config merged, make) through --kernel-dir: its own hmm-tests on hmmgpu (2 GPUs) passes every case, 0 skipped; hmmgpu-demo passes; no splat",
        run: ownkernel::t_own_kernel,
    },
    VmTest {
        name: "hmm-tests-debug",
        about: "hmm-tests on hmmgpu on the debug kernel (lockdep, KASAN, DEBUG_VM): as expected, no splat",
        run: selftest::t_hmm_tests_debug,
    },
    VmTest {
        name: "fault-copy-error",
        about: "copy-engine errors: a failed migration to VRAM leaves pages in RAM (EIO, data intact), a failed CPU fault gives that process SIGBUS, a failed MIGRATE_TO_SYS gives EIO",
        run: faults::t_copy_error,
    },
    VmTest {
        name: "fault-slow-copies",
        about: "latency per command and a bandwidth cap (fault plan): every byte correct, migrations measurably slower",
        run: faults::t_slow_copies,
    },
    VmTest {
        name: "fault-storm",
        about: "a fault plan offers 100000 FAULT events (storm on the workload's context) plus spurious ones while a workload runs: correct data, no livelock",
        run: faults::t_storm,
    },
    VmTest {
        name: "fault-plan-replay",
        about: "one seeded fault plan, two boots: the two fault logs are identical and non-empty",
        run: faults::t_plan_replay,
    },
    VmTest {
        name: "fault-ecc",
        about: "VRAM ECC errors (free page, device-private page, THP, device-coherent page, link canary): the page is retired, only its owner gets SIGBUS and only there, all other data intact, rmmod works",
        run: ecc::t_ecc,
    },
    VmTest {
        name: "fault-surprise-loss",
        about: "the backend is killed with data in VRAM: ENODEV, SIGBUS for device-private data, coherent data intact, rmmod works",
        run: loss::t_surprise_loss,
    },
    VmTest {
        name: "fault-backend-restart",
        about: "the backend is killed mid-migration, then mid-READ, and each time a new one is started on the same socket and VRAM file (QEMU reconnects): the driver resets the device once each time, the migration and the READ complete, every byte intact",
        run: loss::t_backend_restart,
    },
    VmTest {
        name: "fault-link-down",
        about: "the VRAM BAR's link goes down (QEMU link-down): ENODEV, all-ones through the BAR, SIGBUS for lost data, rmmod works",
        run: loss::t_link_down,
    },
    VmTest {
        name: "fault-hot-unplug",
        about: "an orderly hot-unplug (device_del) with data in both kinds of VRAM: evicted to system RAM, every byte intact in the process and a forked child, ENODEV on open files; the device plugged back (device_add) works (x86_64)",
        run: unplug::t_hot_unplug,
    },
    VmTest {
        name: "fault-machine-check",
        about: "a machine check (QEMU mce) on a device-coherent page: its owner gets SIGBUS, the other pages are intact, the guest stays up, rmmod works",
        run: loss::t_machine_check,
    },
    VmTest {
        name: "fault-interrupts-stall",
        about: "8 dropped and 4 late command interrupts, then a stalled command queue: the driver polls, resets the device after its 10 s timeout, retries; every byte correct, VRAM data kept",
        run: reset::t_interrupts_and_stall,
    },
    VmTest {
        name: "fault-pci-reset",
        about: "a PCI function reset (sysfs reset) with data in VRAM: reset_prepare evicts everything, reset_done restarts the device; every byte intact, the device works after",
        run: reset::t_function_reset,
    },
    VmTest {
        name: "fault-aer",
        about: "PCIe AER errors (QEMU pcie_aer_inject_error): correctable and non-fatal change nothing; a fatal one resets the bus, the driver evicts VRAM first and comes back; every byte intact",
        run: reset::t_aer,
    },
    VmTest {
        name: "hostile-guest",
        about: "a test-only module on GPU 1's command queue (8 TiB FILL, aliased VREAD, a full ring, a flood of bad chains): config reads, QMP and the control socket answer (p99 150 ms, max 2 s), a CPU bystander keeps running and hmmgpu-demo rounds on GPU 0 pass throughout, guest errors are counted and rate-limited, GPU 1's data round after passes",
        run: hostile::t_hostile_guest,
    },
    VmTest {
        name: "ppc64le-smoke",
        about: "a ppc64le pseries guest (TCG): driver bound, then hmmgpu-demo (migrations to VRAM and back, every byte checked)",
        run: t_ppc64le_smoke,
    },
    VmTest {
        name: "ppc64le-hmm-tests",
        about: "the kernel's hmm-tests on hmmgpu in a ppc64le pseries guest (2 GPUs): as expected",
        run: selftest::t_hmm_tests_ppc64le,
    },
];

fn t_bare_boot(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.boot(Boot {
        test: "bare-boot",
        gpus: 0,
        driver: false,
        cmd: argv(&["true"]),
    })?;
    ctx.bare_init = out.timings.init;
    expect_status(&out, 0)
}

fn t_exit_status(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.boot(Boot {
        test: "exit-status",
        gpus: 1,
        driver: true,
        cmd: argv(&["sh", "-c", "exit 7"]),
    })?;
    expect_status(&out, 7)
}

fn t_device_bound(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.boot(Boot {
        test: "device-bound",
        gpus: 1,
        driver: true,
        cmd: argv(&["sh", "-c", DEVICE_BOUND_SCRIPT]),
    })?;
    expect_status(&out, 0)
}

fn t_demo(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.boot(Boot {
        test: "demo",
        gpus: 1,
        driver: true,
        cmd: argv(&["hmmgpu-demo"]),
    })?;
    ctx.demo_ready = out.timings.ready;
    expect_status(&out, 0)
}

fn t_trace_demo(ctx: &mut Ctx) -> Result<()> {
    let dest = ctx.trace_dir.clone().map_or_else(
        || build::target_dir().join("xtask/trace-demo.json"),
        |dir| dir.join("trace-demo.json"),
    );
    let run_dir = vm::RunDir::create()?;
    let mut extra = vm::VmExtra::default();
    let armed = crate::trace::arm(&mut extra, &run_dir.path, 1);
    let out = ctx.boot_extra(
        Boot {
            test: "trace-demo",
            gpus: 1,
            driver: true,
            cmd: argv(&["hmmgpu-demo"]),
        },
        extra,
    )?;
    expect_status(&out, 0)?;
    crate::trace::write(&dest, &armed, &out, "trace-demo: hmmgpu-demo")?;
    let stats = out.stats.first().context("gpu0 reported no stats")?;
    crate::trace::check_against_stats(&dest, stats)
}

fn t_vram_holds_data(ctx: &mut Ctx) -> Result<()> {
    let seed = vram_seed()?;
    let out = ctx.boot(Boot {
        test: "vram-holds-data",
        gpus: 1,
        driver: true,
        cmd: argv(&["hmmgpu-demo", "--leave-in-vram", &seed.to_string()]),
    })?;
    expect_status(&out, 0)?;
    let bytes = vram_holds_pattern("vram-holds-data", &out, seed)?;
    let stats = out.stats.first().context("gpu0 reported no stats")?;
    let g2v = stats.counter("bytes_guest_to_vram")?;
    ensure!(
        g2v >= bytes as u64,
        "backend stats: bytes_guest_to_vram {g2v} bytes < buffer size {bytes}"
    );
    log(format!(
        "vram-holds-data: backend bytes_guest_to_vram {g2v} bytes >= {bytes}"
    ));
    Ok(())
}

/// A seed for a pattern left in VRAM, different in every run.
fn vram_seed() -> Result<u64> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        ^ u64::from(std::process::id());
    Ok(seed & 0xFFFF_FFFF_FFFF) // short enough to read in logs
}

/// Checks that every 4 KiB page of the pattern of `seed` that the guest
/// says it left in VRAM (`HMMGPU-VRAM-PATTERN seed=S bytes=N`) is in GPU 0's
/// VRAM file; returns N.
fn vram_holds_pattern(test: &str, out: &VmOutcome, seed: u64) -> Result<usize> {
    vram_of_gpu_holds_pattern(test, out, seed, 0)
}

/// [`vram_holds_pattern`] in the VRAM file of GPU `gpu`.
fn vram_of_gpu_holds_pattern(test: &str, out: &VmOutcome, seed: u64, gpu: usize) -> Result<usize> {
    let marker = format!("HMMGPU-VRAM-PATTERN seed={seed} bytes=");
    let line = out
        .console
        .iter()
        .find(|l| l.contains(&marker))
        .with_context(|| format!("the console has no '{marker}N' line"))?;
    let bytes: usize = line[line.find(&marker).unwrap() + marker.len()..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("bad pattern marker: {line}"))?;
    let vram = out
        .vram
        .paths
        .get(gpu)
        .with_context(|| format!("the run has no VRAM file for GPU {gpu}"))?;
    let scan = pattern::scan_vram(vram, seed, bytes)?;
    log(format!(
        "{test}: {} of {} pattern pages found in {}",
        scan.pages - scan.missing(),
        scan.pages,
        vram.display()
    ));
    ensure!(
        scan.missing() == 0,
        "{} of {} pages of the pattern are not in the VRAM file",
        scan.missing(),
        scan.pages
    );
    Ok(bytes)
}

/// Checks that hmmgpu bound a virtio device and registered its VRAM.
const DEVICE_BOUND_SCRIPT: &str = r#"
set -e
echo "virtio devices bound to hmmgpu:"; ls /sys/bus/virtio/drivers/hmmgpu/
ls /sys/bus/virtio/drivers/hmmgpu/ | grep -q '^virtio[0-9]' || { echo "FAIL: no device bound to the hmmgpu virtio driver"; exit 1; }
grep -l 0x107f /sys/bus/pci/devices/*/device || { echo "FAIL: no PCI device 0x107f"; exit 1; }
dmesg | grep 'device-private' || true
dmesg | grep -q 'device-private' || { echo "FAIL: no 'device-private' line in dmesg"; exit 1; }
echo "device-bound: all checks passed"
"#;

fn t_ppc64le_smoke(ctx: &mut Ctx) -> Result<()> {
    let st = ctx.stack(Arch::Ppc64le, Flavour::Release)?;
    let script = format!("{DEVICE_BOUND_SCRIPT}\nuname -m\nhmmgpu-demo");
    let out = ctx.boot_on(
        Boot {
            test: "ppc64le-smoke",
            gpus: 1,
            driver: true,
            cmd: argv(&["sh", "-c", &script]),
        },
        &st,
        ctx.cpus,
    )?;
    expect_status(&out, 0)?;
    ensure!(
        out.console
            .iter()
            .any(|l| l.trim_end().ends_with("ppc64le")),
        "the guest's `uname -m` did not print ppc64le"
    );
    log(format!(
        "boot time (TCG, ppc64le): launch→init {}, launch→ready (driver bound) {}",
        out.timings
            .init
            .map_or("n/a".into(), |d| format!("{:.2}s", d.as_secs_f64())),
        out.timings
            .ready
            .map_or("n/a".into(), |d| format!("{:.2}s", d.as_secs_f64()))
    ));
    Ok(())
}

fn t_rmmod_resident(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.boot(Boot {
        test: "rmmod-resident",
        gpus: 1,
        driver: true,
        cmd: argv(&["hmmgpu-demo", "--rmmod-resident"]),
    })?;
    // The driver's counters go with it; its recovery messages would show.
    expect_status_with(&out, 0, &recovery::Expected::NONE_UNLOADED)
}

/// The fault tests (and hostile-guest) that also run on the debug kernel
/// flavour, as `NAME-debug` (lockdep, KASAN, KFENCE, UBSAN, the lockup
/// detectors): a recovery path, or a guest module abusing the device, must
/// not splat either.
const DEBUG_VARIANTS: &[&str] = &[
    "fault-copy-error",
    "fault-slow-copies",
    "fault-storm",
    "fault-ecc",
    "fault-surprise-loss",
    "fault-backend-restart",
    "fault-link-down",
    "fault-hot-unplug",
    "fault-machine-check",
    "fault-interrupts-stall",
    "fault-pci-reset",
    "fault-aer",
    "hostile-guest",
];

/// A VM test to run: name, what it checks, its function, and whether it
/// boots the debug flavour (a `-debug` variant).
type Entry = (String, String, fn(&mut Ctx) -> Result<()>, bool);

/// Every VM test by name: the list, then the `-debug` variants.
fn all_tests() -> Vec<Entry> {
    let mut v: Vec<_> = VM_TESTS
        .iter()
        .map(|t| (t.name.to_string(), t.about.to_string(), t.run, false))
        .collect();
    for name in DEBUG_VARIANTS {
        let t = VM_TESTS
            .iter()
            .find(|t| t.name == *name)
            .expect("a debug variant of a listed test");
        v.push((
            format!("{name}-debug"),
            format!("{} (on the debug kernel)", t.about),
            t.run,
            true,
        ));
    }
    v
}

/// The VM tests' names, in run order.
pub fn names() -> Vec<&'static str> {
    VM_TESTS.iter().map(|t| t.name).collect()
}

pub fn list() {
    for (name, about, _, _) in all_tests() {
        println!("{name:30} {about}");
    }
}

/// Runs `run` with every boot on the debug flavour of the tests'
/// architecture.
fn on_debug(ctx: &mut Ctx, run: fn(&mut Ctx) -> Result<()>) -> Result<()> {
    let st = ctx.stack(ctx.arch, Flavour::Debug)?;
    ctx.on = Some(st);
    let r = run(ctx);
    ctx.on = None;
    r
}

/// Prints a test's result and adds it to `results`; `boots` are its
/// artifacts folders, kept if it failed (or with `--keep`).
fn record(
    results: &mut Vec<TestResult>,
    name: &str,
    start: Instant,
    r: Result<()>,
    ctx: Option<&Ctx>,
    keep: bool,
) -> Result<()> {
    let time = start.elapsed();
    if signals::interrupted() {
        return Err(exit::interrupted());
    }
    let (pass, message) = match r {
        Ok(()) => (true, String::new()),
        Err(e) => (false, format!("{e:#}")),
    };
    let (mut artifacts, console, cases) = match ctx {
        Some(c) => (c.boot_dirs.take(), c.last_console.take(), c.cases.take()),
        None => Default::default(),
    };
    artifacts.retain(|d| d.is_dir());
    if pass && !keep {
        for d in artifacts.drain(..) {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    say!(
        "--- {name}: {} ({:.1}s){}{}",
        if pass { "PASS" } else { "FAIL" },
        time.as_secs_f64(),
        if message.is_empty() {
            String::new()
        } else {
            format!("\n    {}", message.replace('\n', "\n    "))
        },
        if pass || artifacts.is_empty() {
            String::new()
        } else {
            format!(
                "\n    artifacts: {}",
                artifacts
                    .iter()
                    .map(|a| a.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    );
    results.push(TestResult {
        name: name.to_string(),
        pass,
        time,
        message,
        console: if pass { Vec::new() } else { console },
        artifacts,
        cases,
    });
    Ok(())
}

/// `cargo fmt --all --check` and `cargo clippy --workspace --all-targets --
/// -D warnings`: style as gates (steps `fmt` and `clippy` of the summary).
fn cargo_gate(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(args)
        .current_dir(build::repo_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

fn cargo_test() -> Result<()> {
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["test", "--workspace"])
        .current_dir(build::repo_root())
        .status()
        .context("running cargo test")?;
    ensure!(status.success(), "cargo test --workspace failed ({status})");
    Ok(())
}

/// Runs the tests; returns the exit status (0 if all passed).
pub fn run(args: &TestArgs) -> Result<i32> {
    crate::cli::check_memory(args.vm.memory)?;
    let tests = all_tests();
    let names: Vec<&str> = tests.iter().map(|t| t.0.as_str()).collect();
    let chosen = select::select(&names, &args.only, &args.skip, args.shard)?;
    REPORT_TO_STDERR.store(
        args.format == OutputFormat::Ktap,
        std::sync::atomic::Ordering::Relaxed,
    );
    // The steps before the VM tests belong to the first shard.
    let first_shard = args.shard.is_none_or(|s| s.k == 1);
    let accel = vm::resolve_accel(args.vm.accel, args.vm.arch)?;
    let runs_dir = crate::artifacts::runs_root().join(crate::artifacts::timestamp());
    let started = Instant::now();
    let mut results = Vec::new();
    let stop = |results: &Vec<TestResult>| args.fail_fast && results.iter().any(|r| !r.pass);

    if args.vm.no_setup {
        say!("=== host setup: skipped (--no-setup / HMMGPU_NO_SETUP)");
    } else {
        say!("=== host setup");
        let t = Instant::now();
        let setup = build::setup_host();
        let setup_failed = setup.is_err();
        record(&mut results, "host-setup", t, setup, None, args.keep)?;
        if setup_failed {
            log("host setup failed: the builds below will likely fail too");
        }
    }

    if !args.vm_only && first_shard {
        for (name, gate) in [
            ("fmt", &["fmt", "--all", "--check"][..]),
            (
                "clippy",
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ][..],
            ),
        ] {
            if stop(&results) {
                break;
            }
            say!("=== cargo {}", gate.join(" "));
            let t = Instant::now();
            record(&mut results, name, t, cargo_gate(gate), None, args.keep)?;
        }
        if !stop(&results) {
            say!("=== cargo test --workspace");
            let t = Instant::now();
            record(&mut results, "cargo-test", t, cargo_test(), None, args.keep)?;
        }
        if !stop(&results) {
            // Every fuzz target over its checked-in corpus and past crashes,
            // then a short fixed run each (docs/fuzzing.md).
            say!(
                "=== fuzz targets: corpus, past crashes, {}s each",
                crate::fuzz::REGRESS_SECONDS
            );
            let t = Instant::now();
            record(
                &mut results,
                "fuzz-regress",
                t,
                crate::fuzz::regress(),
                None,
                args.keep,
            )?;
        }
        for target in crate::cross::CrossTarget::ALL {
            if stop(&results) {
                break;
            }
            say!("=== backend tests on {} (qemu-user)", target.name());
            let t = Instant::now();
            let name = format!("device-tests-{}", target.name());
            let r = crate::cross::device_tests(target);
            record(&mut results, &name, t, r, None, args.keep)?;
        }
    }

    say!("=== builds");
    let t = Instant::now();
    let kernel = s(build::kernel(
        args.vm.arch,
        args.vm.flavour,
        args.vm.kernel_dir.as_deref(),
    ));
    let driver = match &kernel {
        Ok(k) => s(build::driver(k)),
        Err(e) => Err(format!("no kernel to build it against: {e}")),
    };
    if !args.vm_only && first_shard {
        // images/build-driver.sh builds with W=1 and warnings as errors.
        let r = driver.as_ref().map(|_| ()).map_err(|e| anyhow!("{e}"));
        record(&mut results, "driver-build", t, r, None, args.keep)?;
        let t = Instant::now();
        let r = match &kernel {
            Ok(k) => report::kunit_parse_check(k),
            Err(e) => Err(anyhow!("no kernel source: {e}")),
        };
        record(&mut results, "ktap-kunit-parse", t, r, None, args.keep)?;
    }
    let qemu = s(build::qemu(args.vm.arch));
    let device = s(build::device());
    let programs = match &kernel {
        Ok(k) => s(build::guest_programs(k)),
        Err(e) => Err(format!("no kernel: {e}")),
    };
    if signals::interrupted() {
        return Err(exit::interrupted());
    }
    for (what, e) in [
        ("kernel", kernel.as_ref().err()),
        ("driver", driver.as_ref().err()),
        ("qemu", qemu.as_ref().err()),
        ("hmmgpu-device", device.as_ref().err()),
        ("guest programs", programs.as_ref().err()),
    ] {
        if let Some(e) = e {
            log(format!("build of {what} failed: {e}"));
        }
    }

    let mut ctx = Ctx {
        arch: args.vm.arch,
        accel_choice: args.vm.accel,
        kernel_dir: args.vm.kernel_dir.clone(),
        kernel,
        qemu,
        device,
        driver,
        programs,
        accel,
        memory: args.vm.memory,
        cpus: args.vm.cpus,
        timeout: Duration::from_secs(args.timeout),
        bare_init: None,
        demo_ready: None,
        stacks: Vec::new(),
        trace_dir: args.trace.clone(),
        trace_boots: Default::default(),
        coverage: args.coverage.clone(),
        on: None,
        runs_dir: runs_dir.clone(),
        format: args.format,
        boot_dirs: RefCell::new(Vec::new()),
        last_console: RefCell::new(Vec::new()),
        cases: RefCell::new(Vec::new()),
    };
    for (name, about, run, debug) in &tests {
        if !chosen.contains(&name.as_str()) {
            continue;
        }
        if stop(&results) {
            log(format!("--fail-fast: not running {name} and the rest"));
            break;
        }
        say!("=== {name}: {about}");
        let start = Instant::now();
        let r = if *debug {
            on_debug(&mut ctx, *run)
        } else {
            run(&mut ctx)
        };
        record(&mut results, name, start, r, Some(&ctx), args.keep)?;
    }
    // Only the folders of failed tests (or all, with --keep) are left.
    let _ = std::fs::remove_dir(&runs_dir);

    say!("");
    say!("=== summary");
    for r in &results {
        say!(
            "{:30} {} {:7.1}s{}",
            r.name,
            if r.pass { "PASS" } else { "FAIL" },
            r.time.as_secs_f64(),
            if r.pass {
                String::new()
            } else {
                format!("  {}", r.message.lines().next().unwrap_or(""))
            }
        );
    }
    let fmt =
        |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
    say!(
        "boot time ({}): bare-boot launch→init {}, demo launch→ready (driver bound) {}",
        if accel == Accel::Kvm { "KVM" } else { "TCG" },
        fmt(ctx.bare_init),
        fmt(ctx.demo_ready)
    );
    if runs_dir.is_dir() {
        say!("artifacts: {}", runs_dir.display());
    }
    if let Some(path) = &args.junit {
        std::fs::write(path, report::junit(&results))
            .with_context(|| format!("writing {}", path.display()))?;
        log(format!("JUnit results: {}", path.display()));
    }
    if let Some(path) = &args.json {
        let meta = serde_json::json!({
            "arch": args.vm.arch.as_str(),
            "flavour": args.vm.flavour.as_str(),
            "accel": if accel == Accel::Kvm { "kvm" } else { "tcg" },
            "shard": args.shard.map(|s| s.to_string()),
            "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        });
        let text = serde_json::to_string_pretty(&report::json(&results, meta))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        log(format!("JSON results: {}", path.display()));
    }
    if args.format == OutputFormat::Ktap {
        print!("{}", report::ktap(&results));
    }
    let passed = results.iter().filter(|r| r.pass).count();
    let failed = results.len() - passed;
    println!("{passed} passed, {failed} failed");
    Ok(i32::from(failed != 0))
}
