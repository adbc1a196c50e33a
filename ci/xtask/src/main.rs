//! `cargo xtask`: builds the hmmgpu stack and runs it in QEMU VMs.
//! See docs/running.md.

mod artifacts;
mod bench;
mod build;
mod cli;
mod coverage;
mod cross;
mod doctor;
mod exit;
mod fuzz;
mod hostfault;
mod inject;
mod pattern;
mod signals;
mod splat;
mod tests;
mod trace;
mod vm;
#[cfg(test)]
mod workflow;

use anyhow::Result;
use build::log;
use clap::Parser;
use cli::{Cli, Command, RunArgs};
use std::time::Duration;

fn main() {
    let cli = Cli::parse();
    let code = match signals::install().and_then(|()| dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("[xtask] error: {e:#}");
            let code = exit::code_of(&e);
            eprintln!("[xtask] exit status {code}");
            code
        }
    };
    std::process::exit(code);
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Test(args) if args.list => {
            tests::list();
            Ok(0)
        }
        Command::Test(args) => tests::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::CrossTest(args) => {
            let targets = if args.targets.is_empty() {
                cross::CrossTarget::ALL.to_vec()
            } else {
                args.targets
            };
            for t in targets {
                cross::device_tests(t)?;
            }
            Ok(0)
        }
        Command::Inject(args) => inject::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Doctor => doctor::run(),
        Command::KvmProbe => Ok(doctor::kvm::child()),
        Command::Coverage(args) => coverage::run(&args),
    }
}

/// The guest command of `run --shell`: a shell on the console that owns it
/// as its controlling terminal (so Ctrl-C interrupts its foreground job).
/// init's `sh -c` child is no process-group leader, so setsid does not fork
/// and the shell's status is the command's.
const SHELL_CMD: [&str; 4] = ["exec", "setsid", "cttyhack", "sh"];

fn run(args: RunArgs) -> Result<i32> {
    cli::check_memory(args.vm.memory)?;
    for a in &args.add {
        if !a.is_file() {
            anyhow::bail!("--add {}: no such file", a.display());
        }
    }
    if args.no_driver && args.noload {
        anyhow::bail!("--noload and --no-driver together make no sense: --no-driver already leaves hmmgpu.ko out");
    }
    let mut shares = args.share.clone();
    for sh in &mut shares {
        if !sh.host.is_dir() {
            anyhow::bail!("--share {}: no such folder", sh.host.display());
        }
        sh.host = sh.host.canonicalize()?;
    }
    let cmd = if args.shell {
        SHELL_CMD.iter().map(|s| s.to_string()).collect()
    } else if args.cmd.is_empty() {
        vec!["hmmgpu-demo".to_string()]
    } else {
        args.cmd.clone()
    };
    // Fail on a too-long command before building anything.
    vm::kernel_cmdline(args.vm.arch, &cmd, args.noload, &shares, &args.append)?;
    let accel = vm::resolve_accel(args.vm.accel, args.vm.arch)?;
    let art = build::artifacts(&build::Wants {
        arch: args.vm.arch,
        flavour: args.vm.flavour,
        device: args.gpus > 0,
        driver: !args.no_driver,
        kernel_dir: args.vm.kernel_dir.as_deref(),
        no_setup: args.vm.no_setup,
    })?;
    let run_dir = vm::RunDir::create()?;
    let initramfs = art.initramfs(&run_dir.path, &args.add)?;
    let artifacts_dir = artifacts::runs_root()
        .join(artifacts::timestamp())
        .join("run");
    let timeout = match (args.timeout, args.shell) {
        (Some(t), _) => Duration::from_secs(t),
        // A person at the shell: no limit.
        (None, true) => Duration::from_secs(100 * 365 * 86400),
        (None, false) => Duration::from_secs(900),
    };
    let mut extra = vm::VmExtra {
        artifacts: Some(artifacts_dir.clone()),
        append: args.append.clone(),
        qemu_args: args.qemu_arg.clone(),
        shares,
        restart_killed_backends: args.restart_backends,
        ..Default::default()
    };
    let traced = args
        .trace
        .as_ref()
        .map(|_| trace::arm(&mut extra, &run_dir.path, args.gpus));
    let cfg = vm::VmConfig {
        arch: args.vm.arch,
        qemu: art.qemu.clone(),
        kernel_image: art.kernel.image(),
        initramfs,
        device_bin: art.device.clone(),
        gpus: args.gpus,
        vram_size: args.vram,
        memory: args.vm.memory,
        cpus: args.vm.cpus,
        accel,
        timeout,
        cmd,
        noload: args.noload,
        echo: if args.shell {
            vm::Echo::Interactive
        } else if args.quiet {
            vm::Echo::CommandOnly
        } else {
            vm::Echo::Raw
        },
        run_dir: run_dir.path.clone(),
        extra,
    };
    // Where `cargo xtask inject` finds this run's control sockets.
    inject::record_run(&run_dir.path)?;
    log(format!(
        "run directory {} (control sockets gpuN.control; recorded in {} for `cargo xtask inject`)",
        run_dir.path.display(),
        inject::last_run_file().display()
    ));
    if args.shell {
        log("interactive shell on the guest console: Ctrl-C goes to the guest, Ctrl-A x ends the VM");
    }
    let out = vm::run(&cfg);
    inject::forget_run(&run_dir.path);
    let out = out?;
    log(format!("timing: {}", out.timings));
    for s in &out.stats {
        log(format!("gpu{} stats ({:?}): {}", s.gpu, s.source, s.raw));
    }
    if let (Some(dest), Some(armed)) = (&args.trace, &traced) {
        trace::write(dest, armed, &out, &vm::shell_join(&cfg.cmd))?;
    }
    let passed = match &out.result {
        vm::VmResult::Exited(n) => {
            log(format!("guest command exited with status {n}"));
            *n == 0
        }
        vm::VmResult::Failed(e, m) => {
            log(format!("VM failed: {e}: {m}"));
            false
        }
    };
    if passed && !args.keep {
        let _ = std::fs::remove_dir_all(&artifacts_dir);
        if let Some(parent) = artifacts_dir.parent() {
            let _ = std::fs::remove_dir(parent); // only if empty
        }
    } else if artifacts_dir.is_dir() {
        log(format!("artifacts: {}", artifacts_dir.display()));
    }
    Ok(out.result.exit_code())
}
