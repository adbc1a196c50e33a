// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! `cargo xtask fuzz`: the backend's coverage-guided fuzz targets
//! (device/fuzz, docs/fuzzing.md).
//!
//! libFuzzer through libfuzzer-sys on stable Rust: the targets are built
//! with the coverage instrumentation cargo-fuzz uses (`-Cpasses=sancov-module`
//! and the sanitizer-coverage LLVM options, all stable flags) and no
//! sanitizer, in release mode with overflow checks and debug assertions on.
//! Only crates.io packages are needed: no cargo-fuzz binary, no nightly.
//!
//! - `cargo xtask fuzz [--time S] [TARGET...]`: a campaign, S seconds per
//!   target (default 60), on the checked-in corpus
//!   (device/fuzz/corpus/TARGET, grown in place) and every past crash
//!   (device/fuzz/regressions/TARGET); new crashes land in
//!   device/fuzz/artifacts/TARGET. Prints executions per target.
//! - `cargo xtask fuzz --regress`: every target over its corpus and past
//!   crashes, then [`REGRESS_SECONDS`] of fuzzing each: the short fixed run
//!   `cargo xtask test` makes ([`regress`]). It leaves the checked-in
//!   corpus as it is (new inputs go to target/fuzz/scratch).

use crate::build::{self, log};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The fuzz targets, in the order a campaign runs them.
pub const TARGETS: [&str; 6] = ["abi_decode", "cli", "control", "mmu", "engine", "queue"];

/// Seconds of fuzzing per target in a regression run.
pub const REGRESS_SECONDS: u64 = 10;

/// Longest one input may run before libFuzzer calls it a hang (a freeze of
/// the queue handler is a finding).
const TIMEOUT_SECONDS: u64 = 10;

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub time: u64,
    /// The regression run: the corpus and past crashes, then a short
    /// fixed run per target (what `cargo xtask test` runs).
    #[arg(long, conflicts_with = "time")]
    pub regress: bool,
    /// Parallel fuzzing jobs per target (libFuzzer -fork).
    #[arg(long, default_value_t = 1)]
    pub jobs: u32,
    /// Targets (default: all).
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
}

/// What one target's run did.
#[derive(Debug)]
pub struct Outcome {
    pub target: String,
    pub executions: u64,
    pub seconds: u64,
    pub crashed: bool,
}

fn fuzz_dir() -> PathBuf {
    build::repo_root().join("device/fuzz")
}

/// The host's target triple (the instrumentation must not reach build
/// scripts and proc macros, so cargo gets an explicit --target).
fn host_triple() -> Result<String> {
    let out = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV named no host")
}

/// Builds the fuzz targets, instrumented; returns the directory of the
/// binaries.
pub fn build_targets() -> Result<PathBuf> {
    let triple = host_triple()?;
    let target_dir = build::target_dir().join("fuzz");
    let flags = [
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "--cfg=fuzzing",
    ]
    .join(" ");
    log("fuzz: building the targets with coverage instrumentation");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--target", &triple])
        .arg("--manifest-path")
        .arg(fuzz_dir().join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", flags)
        .status()
        .context("running cargo build for the fuzz targets")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    Ok(target_dir.join(triple).join("release"))
}

/// Runs `target` for `seconds` (0: only its corpus and past crashes) and
/// says how it went. New inputs go to the checked-in corpus when `grow`,
/// else to a scratch directory (a regression run leaves the tree as it was).
fn run_target(
    bin_dir: &Path,
    target: &str,
    seconds: u64,
    jobs: u32,
    grow: bool,
) -> Result<Outcome> {
    let dir = fuzz_dir();
    let corpus = dir.join("corpus").join(target);
    let regressions = dir.join("regressions").join(target);
    let artifacts = dir.join("artifacts").join(target);
    for d in [&corpus, &regressions, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = Command::new(bin_dir.join(target));
    cmd.arg(format!("-timeout={TIMEOUT_SECONDS}"))
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    if seconds == 0 {
        cmd.arg("-runs=0");
    } else {
        cmd.arg(format!("-max_total_time={seconds}"));
    }
    if jobs > 1 {
        cmd.arg(format!("-fork={jobs}")).arg("-ignore_crashes=0");
    }
    // libFuzzer writes new inputs to the first directory; past crashes are
    // read, never added to.
    if !grow {
        let scratch = build::target_dir().join("fuzz/scratch").join(target);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        cmd.arg(scratch);
    }
    cmd.arg(&corpus).arg(&regressions);
    let started = std::time::Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running the {target} fuzz target"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let executions: u64 = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum();
    let crashed = !out.status.success();
    if crashed {
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        eprintln!("--- {target} ---");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
    Ok(Outcome {
        target: target.to_owned(),
        executions,
        seconds: started.elapsed().as_secs(),
        crashed,
    })
}

/// Runs `targets` (all when empty) for `seconds` each; prints a line per
/// target and "N passed, N failed".
pub fn campaign(
    targets: &[String],
    seconds: u64,
    jobs: u32,
    replay_first: bool,
) -> Result<Vec<Outcome>> {
    let targets: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        targets.to_vec()
    };
    if let Some(bad) = targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        bail!(
            "no fuzz target {bad:?}; the targets: {}",
            TARGETS.join(", ")
        );
    }
    let bin_dir = build_targets()?;
    let mut outcomes = Vec::new();
    for target in &targets {
        if replay_first {
            // The corpus and past crashes on their own first, so that a
            // failing one is reported as such.
            let replay = run_target(&bin_dir, target, 0, 1, false)?;
            log(format!(
                "fuzz {:<10} corpus and past crashes, {} inputs: {}",
                replay.target,
                replay.executions,
                if replay.crashed { "FAILED" } else { "ok" }
            ));
            outcomes.push(replay);
        }
        let outcome = run_target(&bin_dir, target, seconds, jobs, !replay_first)?;
        log(format!(
            "fuzz {:<10} {:>12} executions in {:>4} s: {}",
            outcome.target,
            outcome.executions,
            outcome.seconds,
            if outcome.crashed { "FAILED" } else { "ok" }
        ));
        outcomes.push(outcome);
    }
    let total: u64 = outcomes.iter().map(|o| o.executions).sum();
    let failed = outcomes.iter().filter(|o| o.crashed).count();
    log(format!("fuzz: {total} executions in all"));
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    Ok(outcomes)
}

/// The regression run for `cargo xtask test`: every target over its
/// corpus and every past crash, then [`REGRESS_SECONDS`] of fuzzing each.
/// Fails if any input crashes or hangs.
pub fn regress() -> Result<()> {
    let outcomes = campaign(&[], REGRESS_SECONDS, 1, true)?;
    if let Some(o) = outcomes.iter().find(|o| o.crashed) {
        bail!(
            "fuzz target {} failed: see device/fuzz/artifacts/{}",
            o.target,
            o.target
        );
    }
    Ok(())
}

/// `cargo xtask fuzz`.
pub fn run(args: &FuzzArgs) -> Result<i32> {
    if args.regress {
        regress()?;
        return Ok(0);
    }
    let outcomes = campaign(&args.targets, args.time, args.jobs, false)?;
    Ok(i32::from(outcomes.iter().any(|o| o.crashed)))
}
