//! Fault-injection VM tests (docs/fault-injection.md, "Expected outcomes in
//! the guest"): each injects faults of the backend's catalogue while the
//! guest program `hmmgpu-faults` (ci/guest/faults/, a file per catalogue
//! entry) runs a workload with checksummed data, and checks the documented
//! outcome. Any kernel error on the console (oops, WARNING, lockdep, KASAN)
//! fails the boot.
//!
//! Faults are armed either by a fault plan at backend start (`--fault-plan`,
//! deterministic) or at a precise point of the guest program: it prints
//! `HMMGPU-INJECT-REQUEST gpu=N {FAULT}` and waits; the console hook below
//! injects the fault through the backend's control socket and types
//! `HMMGPU-INJECT-REPLY ok|error ...` into the guest's console.

use super::{argv, expect_status, Boot, Ctx};
use crate::build::log;
use crate::hostfault;
use crate::inject;
use crate::pattern;
use crate::vm::{self, VmOutcome};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

const REQUEST: &str = "HMMGPU-INJECT-REQUEST ";
const REPLY: &str = "HMMGPU-INJECT-REPLY ";

/// Parses `... HMMGPU-INJECT-REQUEST gpu=N {json}` into (N, fault).
fn parse_request(line: &str) -> Option<Result<(u32, serde_json::Value)>> {
    let rest = &line[line.find(REQUEST)? + REQUEST.len()..];
    Some((|| {
        let (gpu, fault) = rest
            .trim()
            .split_once(' ')
            .with_context(|| format!("malformed injection request {rest:?}"))?;
        let gpu: u32 = gpu
            .strip_prefix("gpu=")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("bad gpu= in injection request {rest:?}"))?;
        let fault: serde_json::Value = serde_json::from_str(fault)
            .with_context(|| format!("injection request {rest:?}: the fault is not JSON"))?;
        Ok((gpu, fault))
    })())
}

/// The console hook that serves the guest's injection requests: backend
/// faults through the control socket, host-side ones (link down, a killed
/// backend) by xtask itself.
pub(super) fn inject_hook() -> vm::ConsoleHook {
    Box::new(|run_dir: &Path, line: &str| {
        let request = parse_request(line)?;
        let answer = request.and_then(|(gpu, fault)| {
            log(format!("injecting into gpu{gpu} for the guest: {fault}"));
            if hostfault::is_host_fault(&fault) {
                hostfault::apply(run_dir, gpu, &fault)
            } else {
                inject::inject(run_dir, gpu, fault)
            }
        });
        Some(match answer {
            Ok(reply) => format!("{REPLY}ok {reply}"),
            Err(e) => {
                log(format!("guest injection request failed: {e:#}"));
                format!("{REPLY}error {}", format!("{e:#}").replace('\n', " "))
            }
        })
    })
}

/// A temporary directory for plans, fault logs and wrapper scripts, removed
/// on drop.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(test: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("hmmgpu-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An `"injected"` counter of GPU 0's final stats.
pub(super) fn injected(out: &VmOutcome, name: &str) -> Result<u64> {
    let s = out.stats.first().context("gpu0 reported no stats")?;
    s.raw["injected"][name]
        .as_u64()
        .with_context(|| format!("gpu0 stats have no injected.{name}: {}", s.raw))
}

/// The last value the guest printed for a driver/device counter
/// (`hmmgpu-faults: counter NAME VALUE`).
pub(super) fn guest_counter(out: &VmOutcome, name: &str) -> Result<u64> {
    let key = format!("hmmgpu-faults: counter {name} ");
    let line = out
        .console
        .iter()
        .rev()
        .find(|l| l.contains(&key))
        .with_context(|| format!("the guest printed no counter {name}"))?;
    let v = &line[line.find(&key).unwrap() + key.len()..];
    v.trim()
        .parse()
        .with_context(|| format!("bad counter line {line:?}"))
}

/// Appended to a guest command: after the fault workload, a fresh data
/// round through `device` (None: the workload removed the driver, so
/// through a forked child) with the pattern of `seed`
/// (`hmmgpu-faults responsive`, ci/guest/faults/responsive.c); see
/// [`expect_responsive`].
pub(super) fn then_responsive(seed: u64, device: Option<&str>) -> String {
    match device {
        Some(dev) => format!(" && hmmgpu-faults -d {dev} responsive --seed {seed}"),
        None => format!(" && hmmgpu-faults responsive --seed {seed} --no-device"),
    }
}

/// Fails unless the guest ran [`then_responsive`]'s round for `seed`.
pub(super) fn expect_responsive(out: &VmOutcome, seed: u64) -> Result<()> {
    responsive_round_ran(&out.console, seed)
}

/// FNV-1a (64-bit), ci/guest/pattern.h's fnv1a().
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether `console` has `hmmgpu-faults: responsive: seed=SEED bytes=B
/// fnv1a=H` with H the checksum of the pattern: a line only a guest that
/// ran the round can print (init's echo of the command has the seed, not
/// the checksum).
fn responsive_round_ran(console: &[String], seed: u64) -> Result<()> {
    let key = format!("hmmgpu-faults: responsive: seed={seed} ");
    let line = console.iter().find(|l| l.contains(&key)).with_context(|| {
        format!("the guest printed no '{key}...' line: it did not run its post-fault round")
    })?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .with_context(|| format!("no {name} in {line:?}"))
    };
    let bytes: usize = field("bytes=")?
        .parse()
        .with_context(|| format!("bad bytes= in {line:?}"))?;
    let got = u64::from_str_radix(field("fnv1a=")?, 16)
        .with_context(|| format!("bad fnv1a= in {line:?}"))?;
    let want = fnv1a(&pattern::pattern(seed, bytes));
    ensure!(
        got == want,
        "the guest's post-fault round read back data with FNV-1a {got:016x}, want {want:016x} (the pattern of seed {seed})"
    );
    Ok(())
}

/// Fails unless a console line contains `what`.
pub(super) fn console_has(out: &VmOutcome, what: &str) -> Result<()> {
    ensure!(
        out.console.iter().any(|l| l.contains(what)),
        "the console has no line with '{what}'"
    );
    Ok(())
}

pub(super) fn faults_boot<'a>(test: &'a str, cmd: &[&str]) -> Boot<'a> {
    Boot {
        test,
        gpus: 1,
        driver: true,
        cmd: argv(cmd),
    }
}

pub(super) fn t_copy_error(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.boot_extra(
        faults_boot("fault-copy-error", &["hmmgpu-faults", "copy-error"]),
        vm::VmExtra {
            console_hook: Some(inject_hook()),
            ..Default::default()
        },
    )?;
    expect_status(&out, 0)?;
    let errors = injected(&out, "copy_errors")?;
    log(format!(
        "fault-copy-error: backend injected.copy_errors = {errors}"
    ));
    ensure!(
        errors == 4,
        "the backend failed {errors} copies, want 4 (one per injection)"
    );
    ensure!(
        out.console
            .iter()
            .any(|l| l.contains("copy from VRAM failed in a CPU fault")),
        "the driver did not log the failed CPU fault"
    );
    Ok(())
}

/// Latency per data-moving command and a bandwidth cap, armed from the
/// start by a plan.
const SLOW_LATENCY_US: u64 = 2000;
const SLOW_BYTES_PER_SEC: u64 = 16 << 20;
const SLOW_SIZE: u64 = 4 << 20;

pub(super) fn t_slow_copies(ctx: &mut Ctx) -> Result<()> {
    let dir = TempDir::new("fault-slow-copies")?;
    let plan = dir.0.join("plan.json");
    let json = serde_json::json!({
        "seed": 1,
        "faults": [
            {"fault": {"kind": "latency", "us": SLOW_LATENCY_US}},
            {"fault": {"kind": "bandwidth", "bytes_per_sec": SLOW_BYTES_PER_SEC}},
        ]
    });
    std::fs::write(&plan, json.to_string())?;
    // The migration's COPY alone moves SLOW_SIZE bytes at the capped rate.
    let min_ms = SLOW_SIZE * 1000 / SLOW_BYTES_PER_SEC;
    let out = ctx.boot_extra(
        faults_boot(
            "fault-slow-copies",
            &[
                "hmmgpu-faults",
                "data",
                "--rounds",
                "2",
                "--size",
                &SLOW_SIZE.to_string(),
                "--min-migrate-ms",
                &min_ms.to_string(),
            ],
        ),
        vm::VmExtra {
            backend_args: vec![vec!["--fault-plan".into(), plan.display().to_string()]],
            ..Default::default()
        },
    )?;
    expect_status(&out, 0)?;
    let delayed = injected(&out, "delayed_commands")?;
    let throttled = injected(&out, "throttled_commands")?;
    log(format!(
        "fault-slow-copies: backend delayed {delayed} and throttled {throttled} commands; every byte verified"
    ));
    ensure!(
        delayed > 0 && throttled > 0,
        "the plan's faults did not take effect (delayed {delayed}, throttled {throttled})"
    );
    Ok(())
}

/// The storm: after every device command from the 100th on, 100 FAULT
/// events on context 1 (the workload's), 1000 times; and 10 spurious ones
/// on an unused context after every 10th command, 100 times. The device
/// posts as many as the driver has event buffers free at that moment and
/// drops the rest.
const STORM_FIRINGS: u64 = 1000;
const STORM_EVENTS: u64 = 100;
const SPURIOUS_FIRINGS: u64 = 100;
const SPURIOUS_EVENTS: u64 = 10;

pub(super) fn t_storm(ctx: &mut Ctx) -> Result<()> {
    let dir = TempDir::new("fault-storm")?;
    let plan = dir.0.join("plan.json");
    let json = serde_json::json!({
        "seed": 6,
        "faults": [
            {"after_commands": 100, "every_commands": 1, "times": STORM_FIRINGS,
             "fault": {"kind": "fault_storm", "ctx": 1, "count": STORM_EVENTS}},
            {"every_commands": 10, "times": SPURIOUS_FIRINGS,
             "fault": {"kind": "spurious_faults", "ctx": 4000, "addr": 4096, "count": SPURIOUS_EVENTS}},
        ]
    });
    std::fs::write(&plan, json.to_string())?;
    let seed = super::vram_seed()?;
    let script = format!(
        "hmmgpu-faults storm --size 1M{}",
        then_responsive(seed, Some("/dev/hmm_dmirror0"))
    );
    let out = ctx.boot_extra(
        faults_boot("fault-storm", &["sh", "-c", &script]),
        vm::VmExtra {
            backend_args: vec![vec!["--fault-plan".into(), plan.display().to_string()]],
            ..Default::default()
        },
    )?;
    expect_status(&out, 0)?;
    expect_responsive(&out, seed)?;
    let posted = injected(&out, "events_posted")?;
    let dropped = injected(&out, "events_dropped")?;
    let received = guest_counter(&out, "driver_fault_events")?;
    let spurious = guest_counter(&out, "driver_spurious_faults")?;
    log(format!(
        "fault-storm: backend posted {posted} injected events, dropped {dropped} (no free event buffer); \
         the driver received {received} FAULT events, {spurious} of them spurious"
    ));
    let offered = STORM_FIRINGS * STORM_EVENTS + SPURIOUS_FIRINGS * SPURIOUS_EVENTS;
    ensure!(
        posted + dropped == offered,
        "posted {posted} + dropped {dropped} != {offered} injected"
    );
    // Every FAULT event the driver got is a real device fault or injected.
    let real = guest_counter(&out, "faults")?;
    ensure!(
        received == posted + real,
        "the driver saw {received} FAULT events, not the {posted} injected + {real} real device faults posted"
    );
    ensure!(
        spurious > 0 && posted > 0,
        "no injected event reached the driver"
    );
    Ok(())
}

/// A plan whose log does not depend on guest-physical addresses: seeded
/// probabilities at command boundaries, latency and spurious events.
const REPLAY_PLAN: &str = r#"{
  "seed": 4242,
  "faults": [
    {"every_commands": 7, "probability": 0.5, "times": 40,
     "fault": {"kind": "latency", "us": 300, "count": 2}},
    {"every_commands": 13, "probability": 0.3, "times": 20,
     "fault": {"kind": "spurious_faults", "ctx": 4000, "addr": 4096, "count": 3}},
    {"after_commands": 40, "fault": {"kind": "latency", "us": 100, "count": 5}}
  ]
}"#;

pub(super) fn t_plan_replay(ctx: &mut Ctx) -> Result<()> {
    let dir = TempDir::new("fault-plan-replay")?;
    let plan = dir.0.join("plan.json");
    std::fs::write(&plan, REPLAY_PLAN)?;
    let mut logs = Vec::new();
    for run in 1..=2 {
        let log_path = dir.0.join(format!("run{run}.log"));
        let out = ctx.boot_extra(
            faults_boot(
                "fault-plan-replay",
                &[
                    "hmmgpu-faults",
                    "data",
                    "--rounds",
                    "2",
                    "--size",
                    "1M",
                    "--nohuge",
                ],
            ),
            vm::VmExtra {
                backend_args: vec![vec![
                    "--fault-plan".into(),
                    plan.display().to_string(),
                    "--fault-log".into(),
                    log_path.display().to_string(),
                ]],
                ..Default::default()
            },
        )?;
        expect_status(&out, 0).with_context(|| format!("run {run}"))?;
        let text = std::fs::read_to_string(&log_path)
            .with_context(|| format!("reading the fault log {}", log_path.display()))?;
        say!(
            "--- fault log of run {run} ({} lines):",
            text.lines().count()
        );
        for l in text.lines() {
            say!("    {l}");
        }
        logs.push(text);
    }
    ensure!(
        !logs[0].is_empty(),
        "the plan injected nothing (empty fault log)"
    );
    if logs[0] != logs[1] {
        let first = logs[0]
            .lines()
            .zip(logs[1].lines())
            .position(|(a, b)| a != b)
            .unwrap_or(logs[0].lines().count().min(logs[1].lines().count()));
        bail!(
            "the two runs' fault logs differ from line {} on ({} vs {} lines)",
            first + 1,
            logs[0].lines().count(),
            logs[1].lines().count()
        );
    }
    log(format!(
        "fault-plan-replay: both runs logged the same {} faults",
        logs[0].lines().count()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injection_requests() {
        let (gpu, fault) = parse_request(
            r#"[ 1.2] x HMMGPU-INJECT-REQUEST gpu=1 {"kind":"copy_error","count":1}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(gpu, 1);
        assert_eq!(fault, serde_json::json!({"kind": "copy_error", "count": 1}));
        assert!(parse_request("HMMGPU-INJECT-REPLY ok {}").is_none());
        parse_request("HMMGPU-INJECT-REQUEST gpu=x {}")
            .unwrap()
            .unwrap_err();
        parse_request("HMMGPU-INJECT-REQUEST gpu=0 {broken")
            .unwrap()
            .unwrap_err();
    }

    #[test]
    fn responsive_line() {
        // Printed by `hmmgpu-faults responsive --seed 5 --no-device`.
        let ran = |lines: &[&str]| {
            let console: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            responsive_round_ran(&console, 5)
        };
        let echo = "hmmgpu-init: running: hmmgpu-faults ecc && hmmgpu-faults responsive --seed 5 --no-device";
        ran(&[
            echo,
            "hmmgpu-faults: responsive: seed=5 bytes=1048576 fnv1a=b24df35af927c496 (read back by a forked child)"
        ]).unwrap();
        // The command's echo alone, a wrong checksum, another seed: no.
        assert!(ran(&[echo]).is_err());
        assert!(
            ran(&["hmmgpu-faults: responsive: seed=5 bytes=1048576 fnv1a=b24df35af927c497"])
                .is_err()
        );
        assert!(
            ran(&["hmmgpu-faults: responsive: seed=6 bytes=1048576 fnv1a=b24df35af927c496"])
                .is_err()
        );
        assert!(
            ran(&["hmmgpu-faults: responsive: seed=5 bytes=4096 fnv1a=b24df35af927c496"]).is_err()
        );
    }

    #[test]
    fn replay_plan_parses() {
        let v: serde_json::Value = serde_json::from_str(REPLAY_PLAN).unwrap();
        assert_eq!(v["faults"].as_array().unwrap().len(), 3);
    }
}
