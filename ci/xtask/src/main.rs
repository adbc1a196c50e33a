//! `cargo xtask`: builds the hmmgpu stack and runs it in QEMU VMs.
//! See docs/running.md.

mod bench;
mod build;
mod cli;
mod coverage;
mod cross;
mod exit;
mod fuzz;
mod hostfault;
mod inject;
mod pattern;
mod signals;
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
        Command::Coverage(args) => coverage::run(&args),
    }
}

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
    let cmd = if args.cmd.is_empty() {
        vec!["hmmgpu-demo".to_string()]
    } else {
        args.cmd.clone()
    };
    // Fail on a too-long command before building anything.
    vm::kernel_cmdline(args.vm.arch, &cmd, args.noload)?;
    let accel = vm::resolve_accel(args.vm.accel, args.vm.arch)?;
    let art = build::artifacts(&build::Wants {
        arch: args.vm.arch,
        flavour: args.vm.flavour,
        device: args.gpus > 0,
        driver: !args.no_driver,
    })?;
    let run_dir = vm::RunDir::create()?;
    let initramfs = art.initramfs(&run_dir.path, &args.add)?;
    let mut extra = vm::VmExtra::default();
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
        timeout: Duration::from_secs(args.timeout),
        cmd,
        noload: args.noload,
        echo: vm::Echo::Raw,
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
    match &out.result {
        vm::VmResult::Exited(n) => log(format!("guest command exited with status {n}")),
        vm::VmResult::Failed(e, m) => log(format!("VM failed: {e}: {m}")),
    }
    Ok(out.result.exit_code())
}
