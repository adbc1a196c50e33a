//! hostile-guest: a guest that attacks its own device cannot freeze the
//! backend, the VM or the host (docs/device-spec.md, "Against a hostile or
//! broken guest").
//!
//! The guest (ci/guest/hostile-guest.sh) has two GPUs. It takes GPU 1 away
//! from hmmgpu.ko and binds the test-only module ci/guest/hostile/ to it,
//! once per phase: none
//! at all (`idle`, the same figures without an attack), an 8 TiB FILL (4096
//! ranges of the whole 2 GiB VRAM), VREADs through 4096 aliases of one VRAM
//! page, a ring kept full of small commands, and a flood of malformed chains
//! and commands; in each attack every descriptor of the ring is in use.
//! Throughout, the module times config-space reads in the guest and this
//! test times QMP `query-status` and the backend's control socket from the
//! host, while hmmgpu-bystander spins in the guest and hmmgpu-demo rounds
//! on GPU 0 check every byte they move. Afterwards hmmgpu.ko gets GPU 1
//! back and a data round checks every byte, and a buffer left in its VRAM
//! is found in the host's VRAM file of GPU 1.
//!
//! The phases are followed by the module's kernel messages (`HOSTILE-PHASE
//! P` when a bind starts one, `HOSTILE-CHAINS phase=P ...` when the unbind
//! ended it): kernel records reach the console whole, where a shell's echo
//! can be cut by them.

use super::{argv, expect_status, need, vram_of_gpu_holds_pattern, vram_seed, Boot, Ctx};
use crate::build::{self, log};
use crate::hostfault::Qmp;
use crate::inject;
use crate::vm::{self, VmOutcome};
use anyhow::{bail, ensure, Context, Result};
use hmmgpu_device::engine::GUEST_WARNINGS_PER_SEC;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The phases, in order (the module's names): first no attack at all, then
/// the attacks.
const PHASES: &[&str] = &["idle", "fill", "vread", "ring", "flood"];
/// How long each phase lasts.
const PHASE_SECONDS: u32 = 10;
/// What 99% of the config reads, QMP queries and control requests of every
/// phase must be answered within, whatever the guest does. The device adds
/// at most its budget (one worker call, about 5 ms, then a 1 ms pause);
/// passing runs on a loaded 2-core TCG host measure a p99 of 5 to 60 ms.
const P99_BOUND: Duration = Duration::from_millis(150);
/// What every one of them, and every device reset, must be answered
/// within. Generous: on a 2-core TCG host shared with other builds and VMs
/// the host scheduler alone delays a few answers by tens to a couple of
/// hundred milliseconds with no attack at all (the idle phase shows it),
/// and a lock holder preempted for a while holds up whoever waits for it.
/// A freeze is far beyond it: the backend before the work budget froze the
/// VM for minutes in the fill phase (QMP unanswered after 10 s, then no
/// console line until the 300 s timeout).
const MAX_BOUND: Duration = Duration::from_secs(2);
/// The longest the bystander may go without finishing a work step (a
/// frozen VM stops it for as long as the freeze; passing runs: about
/// 120 ms).
const BYSTANDER_MAX_GAP: Duration = Duration::from_secs(1);
/// The GPU the hostile module gets; the other one (GPU 0) is the
/// bystanders'.
const VICTIM: u32 = 1;
/// VRAM per GPU: a FILL range may be 2 GiB, so 4096 of them are 8 TiB.
const VRAM_SIZE: u64 = 2 << 30;
/// The whole boot's timeout: about five times what a pass takes, so a
/// frozen VM fails the test rather than hanging CI for `--timeout`.
const TIMEOUT: Duration = Duration::from_secs(300);
/// How often the host asks QEMU; every CONTROL_EVERY-th time it asks the
/// backend's control socket too.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
const CONTROL_EVERY: u32 = 10;
/// Fewest config reads and QMP queries a phase must have to mean anything.
const MIN_READS: u64 = 100;
const MIN_QUERIES: usize = 10;
/// What the host's probes are labelled with outside a phase.
const BETWEEN: &str = "between";
const END: &str = "end";

/// What the host-side prober saw.
#[derive(Default)]
struct Probes {
    /// The phase the guest is in, or [`BETWEEN`].
    phase: String,
    /// The last phase ended (or the VM did): stop probing.
    ended: bool,
    /// (phase, time to answer) of every QMP query-status.
    qmp: Vec<(String, Duration)>,
    /// (phase, time to answer) of every control socket `stats`.
    control: Vec<(String, Duration)>,
    /// The backend's stats each time the label changed (at the start of
    /// each phase, between phases, and [`END`]).
    stats: Vec<(String, Value)>,
    /// Why probing stopped early (a query with no answer).
    failure: Option<String>,
    /// The query waiting for its answer, and since when.
    in_flight: Option<(String, Instant)>,
}

type Shared = Arc<Mutex<Probes>>;

/// Asks QEMU (and now and then the backend) until the last phase ended,
/// timing every answer.
fn probe(run_dir: &Path, shared: &Shared) {
    let fail = |why: String| shared.lock().unwrap().failure = Some(why);
    let mut qmp = match Qmp::connect(&run_dir.join("qmp.sock")) {
        Ok(q) => q,
        Err(e) => return fail(format!("connecting to QMP: {e:#}")),
    };
    let mut last: Option<String> = None;
    for n in 0u32.. {
        let (phase, ended) = {
            let p = shared.lock().unwrap();
            (p.phase.clone(), p.ended)
        };
        let label = if ended {
            END.to_string()
        } else {
            phase.clone()
        };
        let changed = last.as_ref() != Some(&label);
        if n % CONTROL_EVERY == 0 || changed {
            let t = Instant::now();
            match inject::send(run_dir, VICTIM, &json!({ "cmd": "stats" })) {
                Ok(reply) => {
                    let mut p = shared.lock().unwrap();
                    p.control.push((phase.clone(), t.elapsed()));
                    if changed {
                        p.stats.push((label.clone(), reply["stats"].clone()));
                    }
                }
                Err(e) => return fail(format!("control socket stats during {phase}: {e:#}")),
            }
        }
        if ended {
            return;
        }
        last = Some(label);
        let t = Instant::now();
        shared.lock().unwrap().in_flight = Some((phase.clone(), t));
        let answer = qmp.execute("query-status", json!({}));
        let took = t.elapsed();
        {
            let mut p = shared.lock().unwrap();
            p.in_flight = None;
            p.qmp.push((phase.clone(), took));
        }
        match answer {
            Ok(status) if status["running"] == true => {}
            Ok(status) => return fail(format!("QMP query-status during {phase}: {status}")),
            Err(e) => {
                return fail(format!(
                    "QMP query-status during {phase}: {e:#} (after {:.1}s)",
                    took.as_secs_f64()
                ))
            }
        }
        std::thread::sleep(PROBE_INTERVAL);
    }
}

/// The phase a console line starts (`HOSTILE-PHASE P`), or ends
/// (`HOSTILE-CHAINS phase=P`): (phase, started).
fn phase_event(line: &str) -> Option<(String, bool)> {
    let word = |rest: &str| -> String {
        rest.chars()
            .take_while(|c| c.is_ascii_lowercase())
            .collect()
    };
    if let Some(i) = line.find("HOSTILE-PHASE ") {
        return Some((word(&line[i + "HOSTILE-PHASE ".len()..]), true));
    }
    let i = line.find("HOSTILE-CHAINS phase=")?;
    Some((word(&line[i + "HOSTILE-CHAINS phase=".len()..]), false))
}

/// The console hook: starts the prober when the first phase starts,
/// follows the phases, stops it when the last one ended.
fn hook(shared: Shared, prober: Arc<Mutex<Option<JoinHandle<()>>>>) -> vm::ConsoleHook {
    Box::new(move |run_dir: &Path, line: &str| {
        let (phase, started) = phase_event(line)?;
        let mut p = shared.lock().unwrap();
        if started {
            p.phase = phase;
            let mut prober = prober.lock().unwrap();
            if prober.is_none() {
                let (run_dir, shared) = (run_dir.to_path_buf(), Arc::clone(&shared));
                *prober = Some(std::thread::spawn(move || probe(&run_dir, &shared)));
            }
        } else {
            p.ended = PHASES.last() == Some(&phase.as_str());
            p.phase = BETWEEN.into();
        }
        None
    })
}

/// The `key=value` words after `marker` on the console line that has it for
/// `phase=P` (the module's HOSTILE-CONFIG and HOSTILE-CHAINS lines; any
/// phase if `phase` is None).
fn report(
    console: &[String],
    marker: &str,
    phase: Option<&str>,
) -> Option<BTreeMap<String, String>> {
    console.iter().find_map(|l| {
        let rest = &l[l.find(marker)? + marker.len()..];
        let words: BTreeMap<String, String> = rest
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (phase.is_none() || words.get("phase").map(String::as_str) == phase).then_some(words)
    })
}

fn num(words: &BTreeMap<String, String>, key: &str) -> Result<u64> {
    words
        .get(key)
        .with_context(|| format!("no {key}= in {words:?}"))?
        .parse()
        .with_context(|| format!("{key}= is not a number in {words:?}"))
}

/// Count, median, 99th percentile and maximum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Latencies {
    count: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn latencies(mut v: Vec<Duration>) -> Latencies {
    v.sort();
    let at = |q: usize| {
        v.get((v.len().max(1) - 1) * q / 100)
            .copied()
            .unwrap_or_default()
    };
    Latencies {
        count: v.len(),
        p50: at(50),
        p99: at(99),
        max: v.last().copied().unwrap_or_default(),
    }
}

impl std::fmt::Display for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} p50 {} p99 {} max {}",
            self.count,
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
}

/// Fails unless `l` is within the bounds.
fn within_bounds(what: &str, l: Latencies) -> Result<()> {
    ensure!(
        l.p99 <= P99_BOUND,
        "{what}: 99% answered within {}, more than {}",
        ms(l.p99),
        ms(P99_BOUND)
    );
    ensure!(
        l.max <= MAX_BOUND,
        "{what}: one took {}, more than {}",
        ms(l.max),
        ms(MAX_BOUND)
    );
    Ok(())
}

fn of_phase(v: &[(String, Duration)], phase: &str) -> Vec<Duration> {
    v.iter()
        .filter(|(p, _)| p == phase)
        .map(|(_, d)| *d)
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

fn us_ms(us: u64) -> String {
    ms(Duration::from_micros(us))
}

/// The backend's stats at the start of `phase` and at the next change of
/// label after it.
fn phase_stats<'a>(stats: &'a [(String, Value)], phase: &str) -> Option<(&'a Value, &'a Value)> {
    let i = stats.iter().position(|(p, _)| p == phase)?;
    Some((&stats[i].1, &stats.get(i + 1)?.1))
}

/// A stats counter that changed from `from` to `to`.
fn delta(from: &Value, to: &Value, name: &str) -> u64 {
    to[name]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(from[name].as_u64().unwrap_or(0))
}

pub(super) fn t_hostile_guest(ctx: &mut Ctx) -> Result<()> {
    // The -debug variant boots the debug flavour: the module is built for
    // the kernel that boots.
    let kernel = match &ctx.on {
        Some(stack) => stack.kernel.clone(),
        None => need("the guest kernel", &ctx.kernel)?.clone(),
    };
    let module = build::test_modules(&kernel)?.join("hmmgpu_hostile.ko");
    ensure!(module.is_file(), "{} was not built", module.display());
    let seed = vram_seed()?;
    let shared = Arc::new(Mutex::new(Probes {
        phase: BETWEEN.into(),
        ..Default::default()
    }));
    let prober = Arc::new(Mutex::new(None));
    let mut cmd = argv(&[
        "hostile-guest",
        "/host/hmmgpu_hostile.ko",
        &PHASE_SECONDS.to_string(),
        &seed.to_string(),
    ]);
    cmd.extend(PHASES.iter().map(|p| p.to_string()));
    let saved_timeout = ctx.timeout;
    ctx.timeout = ctx.timeout.min(TIMEOUT);
    let out = ctx.boot_extra(
        Boot {
            test: "hostile-guest",
            gpus: 2,
            driver: true,
            cmd,
        },
        vm::VmExtra {
            console_hook: Some(hook(Arc::clone(&shared), Arc::clone(&prober))),
            vram_size: Some(VRAM_SIZE),
            adds: vec![module],
            ..Default::default()
        },
    );
    ctx.timeout = saved_timeout;
    // The VM is gone: a prober still waiting for QEMU sees the socket close.
    shared.lock().unwrap().ended = true;
    if let Some(t) = prober.lock().unwrap().take() {
        let _ = t.join();
    }
    let probes = std::mem::take(&mut *shared.lock().unwrap());
    // Whatever the run's verdict, show what was measured (a frozen VM
    // times out, and the figures say where it froze), and report every
    // problem.
    let measured = check_figures(out.as_ref().map_or(&[], |o| &o.console), &probes);
    let out = out?;
    let mut problems = Vec::new();
    let mut check = |r: Result<()>| {
        if let Err(e) = r {
            problems.push(format!("{e:#}"));
        }
    };
    let status = expect_status(&out, 0);
    let passed = status.is_ok();
    check(status);
    check(measured);
    check(gpu0_rounds(&out.console));
    if passed {
        check(check_backend(&out));
        check(vram_of_gpu_holds_pattern("hostile-guest", &out, seed, VICTIM as usize).map(drop));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// Prints the figures of every phase and checks them.
fn check_figures(console: &[String], probes: &Probes) -> Result<()> {
    let mut problems = Vec::new();
    if let Some(why) = &probes.failure {
        problems.push(format!("host prober: {why}"));
    }
    if let Some((phase, since)) = &probes.in_flight {
        problems.push(format!(
            "QMP query-status sent during {phase} was still unanswered after {:.1}s when the VM ended",
            since.elapsed().as_secs_f64()
        ));
    }
    log("hostile-guest: phase | guest config reads (n p50 p99 max) | host QMP query-status (n p50 p99 max) | chains submitted/completed of a ring of N | device work");
    for &phase in PHASES {
        let q = latencies(of_phase(&probes.qmp, phase));
        let (config, chains) = (
            report(console, "HOSTILE-CONFIG ", Some(phase)),
            report(console, "HOSTILE-CHAINS ", Some(phase)),
        );
        let get = |m: &Option<BTreeMap<String, String>>, k: &str| {
            m.as_ref()
                .and_then(|m| m.get(k).cloned())
                .unwrap_or_else(|| "?".into())
        };
        let us = |m: &Option<BTreeMap<String, String>>, k: &str| {
            m.as_ref()
                .and_then(|m| num(m, k).ok())
                .map_or("?".into(), us_ms)
        };
        let work = phase_stats(&probes.stats, phase).map_or("no stats".into(), |(a, b)| {
            format!(
                "filled {} GiB, read {} GiB through aliases, {} commands ok, {} failed",
                delta(a, b, "bytes_filled") >> 30,
                delta(a, b, "bytes_vread") >> 30,
                delta(a, b, "commands_ok"),
                delta(a, b, "commands_failed")
            )
        });
        log(format!(
            "hostile-guest: {phase:5} | {} {} {} {} | {q} | {}/{} of {} | {work}",
            get(&config, "reads"),
            us(&config, "p50_us"),
            us(&config, "p99_us"),
            us(&config, "max_us"),
            get(&chains, "submitted"),
            get(&chains, "completed"),
            get(&chains, "ring"),
        ));
        if let Err(e) = check_phase(phase, config.as_ref(), chains.as_ref(), q) {
            problems.push(format!("{phase}: {e:#}"));
        }
        let (counter, what) = match phase {
            "fill" => ("bytes_filled", "filled nothing"),
            "vread" => ("bytes_vread", "read nothing through the aliases"),
            "ring" => ("commands_ok", "completed no command"),
            "flood" => ("commands_failed", "failed no command"),
            _ => continue,
        };
        match phase_stats(&probes.stats, phase) {
            Some((a, b)) if delta(a, b, counter) == 0 => {
                problems.push(format!("{phase}: the device {what} ({counter} unchanged)"))
            }
            Some(_) => {}
            None => problems.push(format!("{phase}: no backend stats at its start and end")),
        }
    }
    // Outside the phases too (binds, unbinds): every answer counts.
    let qmp = latencies(probes.qmp.iter().map(|(_, d)| *d).collect());
    let control = latencies(probes.control.iter().map(|(_, d)| *d).collect());
    log(format!("hostile-guest: all QMP query-status: {qmp}"));
    log(format!(
        "hostile-guest: all control socket stats: {control}"
    ));
    for (what, l) in [("QMP query-status", qmp), ("control socket stats", control)] {
        if let Err(e) = within_bounds(what, l) {
            problems.push(format!("{e:#}"));
        }
    }
    match bystander(console) {
        Ok(b) => log(b),
        Err(e) => problems.push(format!("bystander: {e:#}")),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// Checks one phase's figures: the guest's config reads, its chains, the
/// host's QMP queries.
fn check_phase(
    phase: &str,
    config: Option<&BTreeMap<String, String>>,
    chains: Option<&BTreeMap<String, String>>,
    qmp: Latencies,
) -> Result<()> {
    let config = config.context("the module printed no HOSTILE-CONFIG line")?;
    let chains = chains.context("the module printed no HOSTILE-CHAINS line")?;
    let reads = num(config, "reads")?;
    ensure!(
        reads >= MIN_READS,
        "{reads} config reads, fewer than {MIN_READS}"
    );
    ensure!(
        num(config, "bad")? == 0,
        "config reads returned a wrong magic: {config:?}"
    );
    let guest = Latencies {
        count: reads as usize,
        p50: Duration::from_micros(num(config, "p50_us")?),
        p99: Duration::from_micros(num(config, "p99_us")?),
        max: Duration::from_micros(num(config, "max_us")?),
    };
    within_bounds("config-space reads", guest)?;
    ensure!(
        qmp.count >= MIN_QUERIES,
        "{} QMP queries, fewer than {MIN_QUERIES}",
        qmp.count
    );
    within_bounds("QMP query-status", qmp)?;
    let (ring, submitted, completed) = (
        num(chains, "ring")?,
        num(chains, "submitted")?,
        num(chains, "completed")?,
    );
    ensure!(
        num(chains, "unexpected")? == 0,
        "completions with another outcome than the spec's: {chains:?}"
    );
    ensure!(
        phase == "idle" || submitted >= ring,
        "{submitted} chains submitted: the ring of {ring} was never full"
    );
    if matches!(phase, "ring" | "flood") {
        ensure!(
            completed >= 4 * ring,
            "{completed} chains completed: the ring of {ring} did not turn over (at least {} wanted)",
            4 * ring
        );
    }
    let reset = Duration::from_micros(num(chains, "reset_us")?);
    ensure!(
        reset <= MAX_BOUND,
        "the device reset that ended the phase took {} (bound {})",
        ms(reset),
        ms(MAX_BOUND)
    );
    Ok(())
}

/// The bystander's summary line, checked: it kept running.
fn bystander(console: &[String]) -> Result<String> {
    let words = report(console, "HOSTILE-BYSTANDER ", None)
        .context("hmmgpu-bystander printed no HOSTILE-BYSTANDER line")?;
    let (min_rate, max_gap) = (num(&words, "min_rate")?, num(&words, "max_gap_us")?);
    let seconds: f64 = words
        .get("seconds")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no seconds= in {words:?}"))?;
    let want = f64::from(PHASES.len() as u32 * PHASE_SECONDS);
    ensure!(
        seconds >= want,
        "it ran {seconds:.1}s, less than the {want}s of the phases: {words:?}"
    );
    ensure!(min_rate > 0, "a second without progress: {words:?}");
    ensure!(
        Duration::from_micros(max_gap) <= BYSTANDER_MAX_GAP,
        "it stalled for {} (bound {}): {words:?}",
        us_ms(max_gap),
        ms(BYSTANDER_MAX_GAP)
    );
    Ok(format!(
        "hostile-guest: bystander: {seconds:.1}s, slowest second {min_rate} steps, longest stall {}",
        us_ms(max_gap)
    ))
}

/// GPU 0's data rounds (the `HOSTILE-DATA phase=P end=E round=N status=S`
/// records): every one passed, and in each attack a round started or
/// ended.
fn gpu0_rounds(console: &[String]) -> Result<()> {
    let rounds: Vec<BTreeMap<String, String>> = console
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("HOSTILE-DATA ")? + "HOSTILE-DATA ".len()..];
            Some(
                rest.split_whitespace()
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        })
        .collect();
    let failed: Vec<String> = rounds
        .iter()
        .filter(|r| r.get("status").map(String::as_str) != Some("0"))
        .map(|r| format!("{r:?}"))
        .collect();
    let per_phase: Vec<(&str, usize)> = PHASES
        .iter()
        .map(|&p| {
            let n = rounds
                .iter()
                .filter(|r| {
                    r.get("phase").map(String::as_str) == Some(p)
                        || r.get("end").map(String::as_str) == Some(p)
                })
                .count();
            (p, n)
        })
        .collect();
    // The longest round, where the guest gave its times.
    let longest = rounds
        .iter()
        .filter_map(|r| {
            let at = |k: &str| r.get(k)?.parse::<f64>().ok();
            Some(at("stop")? - at("start")?)
        })
        .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))));
    log(format!(
        "hostile-guest: GPU 0 bystander: {} hmmgpu-demo rounds, {} failed, longest {}; started or ended per phase: {}",
        rounds.len(),
        failed.len(),
        longest.map_or_else(|| "unknown".to_string(), |s| format!("{s:.2}s")),
        per_phase
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    ensure!(
        failed.is_empty(),
        "GPU 0's hmmgpu-demo rounds failed beside the attacks: {}",
        failed.join("; ")
    );
    let idle: Vec<&str> = per_phase
        .iter()
        .filter(|(p, n)| *p != "idle" && *n == 0)
        .map(|(p, _)| *p)
        .collect();
    ensure!(
        idle.is_empty(),
        "no GPU 0 round started or ended during {} (GPU 0 made no progress)",
        idle.join(", ")
    );
    Ok(())
}

/// GPU 1's backend counted the guest's errors and logged few of them; GPU
/// 0's, which only the bystander used, counted none.
fn check_backend(out: &VmOutcome) -> Result<()> {
    let of_gpu = |gpu: u32| {
        out.stats
            .iter()
            .find(|s| s.gpu == gpu)
            .with_context(|| format!("gpu{gpu}'s backend reported no stats"))
    };
    let bystanders = of_gpu(0)?.counter("guest_errors")?;
    ensure!(
        bystanders == 0,
        "GPU 0's backend counted {bystanders} guest errors: only the bystander used it"
    );
    let stats = of_gpu(VICTIM)?;
    let (errors, unlogged) = (
        stats.counter("guest_errors")?,
        stats.counter("guest_errors_unlogged")?,
    );
    let flood =
        report(&out.console, "HOSTILE-CHAINS ", Some("flood")).context("no flood figures")?;
    let flood_errors = num(&flood, "completed")?;
    let logged = errors - unlogged.min(errors);
    let seconds = out.timings.total.as_secs() + 1;
    log(format!(
        "hostile-guest: backend: {errors} guest errors counted, {logged} logged, {unlogged} not (the flood alone completed {flood_errors} bad chains) in a {seconds}s run"
    ));
    ensure!(
        errors >= flood_errors,
        "the backend counted {errors} guest errors, fewer than the flood's {flood_errors} bad chains"
    );
    ensure!(
        logged <= GUEST_WARNINGS_PER_SEC * seconds,
        "the backend logged {logged} guest errors in {seconds}s, more than {GUEST_WARNINGS_PER_SEC} a second"
    );
    ensure!(
        unlogged > 0,
        "the backend's rate limit never held back a log line"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_found_by_phase() {
        let console = vec![
            "[ 9.1] HOSTILE-CONFIG phase=fill reads=300 bad=0 p50_us=900 p99_us=4000 max_us=7000"
                .to_string(),
            // A shell's echo cut by a kernel record.
            "hostile-guest: pha[ 20.1] HOSTILE-CONFIG phase=vread reads=10 bad=1 p50_us=1 p99_us=2 max_us=3"
                .to_string(),
        ];
        let fill = report(&console, "HOSTILE-CONFIG ", Some("fill")).unwrap();
        assert_eq!(num(&fill, "max_us").unwrap(), 7000);
        let vread = report(&console, "HOSTILE-CONFIG ", Some("vread")).unwrap();
        assert_eq!(num(&vread, "bad").unwrap(), 1);
        assert!(report(&console, "HOSTILE-CONFIG ", Some("ring")).is_none());
        num(&fill, "nope").unwrap_err();
    }

    #[test]
    fn phases_follow_the_module_s_records() {
        assert_eq!(
            phase_event("[   13.8] HOSTILE-PHASE fill"),
            Some(("fill".into(), true))
        );
        assert_eq!(
            phase_event(
                "hostile-guest: ph[  23.8] HOSTILE-CHAINS phase=fill ring=1024 submitted=1"
            ),
            Some(("fill".into(), false))
        );
        assert_eq!(phase_event("hostile-guest: phase fill"), None);
    }

    fn words(s: &str) -> BTreeMap<String, String> {
        s.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn quick(n: usize) -> Latencies {
        latencies(vec![Duration::from_millis(2); n])
    }

    #[test]
    fn a_phase_passes_only_within_the_bounds() {
        let config = words("phase=ring reads=500 bad=0 p50_us=800 p99_us=3000 max_us=90000");
        let chains =
            words("phase=ring ring=256 submitted=9000 completed=8800 unexpected=0 reset_us=4000");
        check_phase("ring", Some(&config), Some(&chains), quick(50)).unwrap();
        // Slow config reads: the p99, the one frozen read.
        let slow = words("phase=ring reads=500 bad=0 p50_us=800 p99_us=200000 max_us=210000");
        assert!(check_phase("ring", Some(&slow), Some(&chains), quick(50)).is_err());
        let frozen = words("phase=ring reads=500 bad=0 p50_us=800 p99_us=3000 max_us=144000000");
        assert!(check_phase("ring", Some(&frozen), Some(&chains), quick(50)).is_err());
        // A frozen QMP query, a slow reset.
        let mut q = quick(50);
        q.max = Duration::from_secs(10);
        assert!(check_phase("ring", Some(&config), Some(&chains), q).is_err());
        let reset = words(
            "phase=ring ring=256 submitted=9000 completed=8800 unexpected=0 reset_us=3000000",
        );
        assert!(check_phase("ring", Some(&config), Some(&reset), quick(50)).is_err());
        // A wrong outcome, a ring that never turned over, too few probes.
        let wrong =
            words("phase=ring ring=256 submitted=9000 completed=8800 unexpected=1 reset_us=4000");
        assert!(check_phase("ring", Some(&config), Some(&wrong), quick(50)).is_err());
        let stuck =
            words("phase=ring ring=256 submitted=256 completed=0 unexpected=0 reset_us=4000");
        assert!(check_phase("ring", Some(&config), Some(&stuck), quick(50)).is_err());
        // ...which a fill is allowed (its commands are too big to finish).
        let fill =
            words("phase=fill ring=256 submitted=256 completed=0 unexpected=0 reset_us=4000");
        check_phase("fill", Some(&config), Some(&fill), quick(50)).unwrap();
        assert!(check_phase("ring", Some(&config), Some(&chains), quick(3)).is_err());
        assert!(check_phase("ring", None, Some(&chains), quick(50)).is_err());
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = latencies(v);
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, Duration::from_millis(50));
        assert_eq!(l.p99, Duration::from_millis(99));
        assert_eq!(l.max, Duration::from_millis(100));
        assert_eq!(latencies(Vec::new()).count, 0);
    }

    #[test]
    fn stats_of_a_phase_run_to_the_next_label() {
        let stats = vec![
            ("idle".to_string(), json!({"bytes_filled": 0})),
            (BETWEEN.to_string(), json!({"bytes_filled": 0})),
            ("fill".to_string(), json!({"bytes_filled": 0})),
            (BETWEEN.to_string(), json!({"bytes_filled": 5u64 << 30})),
        ];
        let (a, b) = phase_stats(&stats, "fill").unwrap();
        assert_eq!(delta(a, b, "bytes_filled"), 5u64 << 30);
        assert!(phase_stats(&stats, "vread").is_none());
    }

    #[test]
    fn gpu0_rounds_must_pass_in_every_attack() {
        let rounds = |lines: &[(&str, u32)]| -> Vec<String> {
            lines
                .iter()
                .enumerate()
                .map(|(n, (p, s))| {
                    format!("[ 9.{n}] HOSTILE-DATA phase={p} end={p} round={n} status={s}")
                })
                .collect()
        };
        let all = [
            ("none", 0),
            ("idle", 0),
            ("fill", 0),
            ("vread", 0),
            ("ring", 0),
            ("flood", 0),
        ];
        gpu0_rounds(&rounds(&all)).unwrap();
        let mut bad = all;
        bad[3].1 = 1;
        assert!(gpu0_rounds(&rounds(&bad)).is_err(), "a failed round");
        assert!(
            gpu0_rounds(&rounds(&all[..4])).is_err(),
            "no round in ring, flood"
        );
        assert!(gpu0_rounds(&[]).is_err());
        // A round that starts in one phase and ends in the next counts for both.
        let mut spanning = rounds(&all[..4]);
        spanning.push("[ 9.9] HOSTILE-DATA phase=ring end=flood round=9 status=0".into());
        gpu0_rounds(&spanning).unwrap();
    }

    #[test]
    fn the_bystander_must_not_stall() {
        let line = |gap: u64, seconds: u32| {
            vec![format!(
                "[ 60.0] HOSTILE-BYSTANDER seconds={seconds}.3 steps=36000 min_rate=850 max_gap_us={gap}"
            )]
        };
        let whole = PHASES.len() as u32 * PHASE_SECONDS + 1;
        bystander(&line(30_000, whole)).unwrap();
        assert!(bystander(&line(9_000_000, whole)).is_err(), "a stall");
        assert!(bystander(&line(30_000, 12)).is_err(), "it ended early");
        bystander(&[]).unwrap_err();
    }
}
