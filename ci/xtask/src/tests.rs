//! `cargo xtask test`: what CI runs. `cargo test --workspace`, the driver
//! build (warnings as errors), then the VM tests, each a function that boots a
//! VM with a guest command and checks what came back.

use crate::build::{self, log, Kernel};
use crate::cli::{AccelChoice, Arch, Flavour};
mod ecc;
mod faults;
mod loss;
mod reset;
mod selftest;
mod unplug;
use crate::cli::TestArgs;
use crate::exit;
use crate::pattern;
use crate::signals;
use crate::vm::{self, Accel, Echo, VmConfig, VmOutcome, VmResult};
use anyhow::{anyhow, bail, ensure, Context, Result};
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
                let kernel = build::kernel(arch, flavour)?;
                let driver = build::driver(&kernel)?;
                let programs = build::guest_programs(&kernel, flavour)?;
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
        let device_bin = if b.gpus > 0 {
            Some(need("hmmgpu-device", &self.device)?.clone())
        } else {
            None
        };
        let run_dir = vm::RunDir::create()?;
        let (cmd, adds) = match &self.coverage {
            Some(c) => (c.wrap(&b.cmd), vec![c.dump_script().to_path_buf()]),
            None => (b.cmd.clone(), Vec::new()),
        };
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
            echo: Echo::Prefixed(format!("  {}| ", b.test)),
            run_dir: run_dir.path.clone(),
            extra,
        };
        let out = vm::run(&cfg)?;
        log(format!("{test}: {}", out.timings));
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

fn expect_status(out: &VmOutcome, want: i32) -> Result<()> {
    match &out.result {
        VmResult::Exited(n) if *n == want => Ok(()),
        VmResult::Exited(n) => bail!("the guest command exited with {n}, want {want}"),
        VmResult::Failed(e, m) => bail!("the VM failed: {e}: {m}"),
    }
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
        ^ std::process::id() as u64;
    Ok(seed & 0xFFFF_FFFF_FFFF) // short enough to read in logs
}

/// Checks that every 4 KiB page of the pattern of `seed` that the guest
/// says it left in VRAM (`HMMGPU-VRAM-PATTERN seed=S bytes=N`) is in GPU 0's
/// VRAM file; returns N.
fn vram_holds_pattern(test: &str, out: &VmOutcome, seed: u64) -> Result<usize> {
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
    let vram = out.vram.paths.first().context("the run has no VRAM file")?;
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
    expect_status(&out, 0)
}

/// The VM tests' names, in run order.
pub fn names() -> Vec<&'static str> {
    VM_TESTS.iter().map(|t| t.name).collect()
}

pub fn list() {
    for t in VM_TESTS {
        println!("{:16} {}", t.name, t.about);
    }
}

struct Outcome {
    name: String,
    pass: bool,
    time: Duration,
    note: String,
}

fn record(results: &mut Vec<Outcome>, name: &str, start: Instant, r: Result<()>) -> Result<()> {
    let time = start.elapsed();
    if signals::interrupted() {
        return Err(exit::interrupted());
    }
    let (pass, note) = match r {
        Ok(()) => (true, String::new()),
        Err(e) => (false, format!("{e:#}")),
    };
    println!(
        "--- {name}: {} ({:.1}s){}",
        if pass { "PASS" } else { "FAIL" },
        time.as_secs_f64(),
        if note.is_empty() {
            String::new()
        } else {
            format!("\n    {}", note.replace('\n', "\n    "))
        }
    );
    results.push(Outcome {
        name: name.to_string(),
        pass,
        time,
        note,
    });
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
    for name in &args.only {
        if !VM_TESTS.iter().any(|t| t.name == name) {
            bail!("no VM test named '{name}' (cargo xtask test --list)");
        }
    }
    let accel = vm::resolve_accel(args.vm.accel, args.vm.arch)?;
    let mut results = Vec::new();

    println!("=== host setup");
    let t = Instant::now();
    let setup = build::setup_host();
    let setup_failed = setup.is_err();
    record(&mut results, "host-setup", t, setup)?;
    if setup_failed {
        log("host setup failed: the builds below will likely fail too");
    }

    if !args.vm_only {
        println!("=== cargo test --workspace");
        let t = Instant::now();
        record(&mut results, "cargo-test", t, cargo_test())?;
        for target in crate::cross::CrossTarget::ALL {
            println!("=== backend tests on {} (qemu-user)", target.name());
            let t = Instant::now();
            let name = format!("device-tests-{}", target.name());
            record(&mut results, &name, t, crate::cross::device_tests(target))?;
        }
    }

    println!("=== builds");
    let t = Instant::now();
    let kernel = s(build::kernel(args.vm.arch, args.vm.flavour));
    let driver = match &kernel {
        Ok(k) => s(build::driver(k)),
        Err(e) => Err(format!("no kernel to build it against: {e}")),
    };
    if !args.vm_only {
        // images/build-driver.sh builds with W=1 and warnings as errors.
        record(
            &mut results,
            "driver-build",
            t,
            driver.as_ref().map(|_| ()).map_err(|e| anyhow!("{e}")),
        )?;
    }
    let qemu = s(build::qemu(args.vm.arch));
    let device = s(build::device());
    let programs = match &kernel {
        Ok(k) => s(build::guest_programs(k, args.vm.flavour)),
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
    };
    for t in VM_TESTS {
        if !args.only.is_empty() && !args.only.iter().any(|n| n == t.name) {
            continue;
        }
        println!("=== {}: {}", t.name, t.about);
        let start = Instant::now();
        let r = (t.run)(&mut ctx);
        record(&mut results, t.name, start, r)?;
    }

    println!();
    println!("=== summary");
    for r in &results {
        println!(
            "{:24} {} {:7.1}s{}",
            r.name,
            if r.pass { "PASS" } else { "FAIL" },
            r.time.as_secs_f64(),
            if r.pass {
                String::new()
            } else {
                format!("  {}", r.note.lines().next().unwrap_or(""))
            }
        );
    }
    let fmt =
        |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
    println!(
        "boot time ({}): bare-boot launch→init {}, demo launch→ready (driver bound) {}",
        if accel == Accel::Kvm { "KVM" } else { "TCG" },
        fmt(ctx.bare_init),
        fmt(ctx.demo_ready)
    );
    let passed = results.iter().filter(|r| r.pass).count();
    let failed = results.len() - passed;
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { 0 } else { 1 })
}
