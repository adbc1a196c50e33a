//! The driver's recovery paths (polling for a completion whose interrupt did
//! not come, resetting the device after a command timed out, abandoning a
//! command) keep a guest running when the device misbehaves. They must never
//! make a test pass by hiding a broken interrupt path or a lost completion:
//! a test that injects nothing fails if the driver recovered at all, and a
//! fault test states exactly which recoveries it expects.
//!
//! The evidence is the driver's debugfs counters, which images/init prints
//! before power-off (`HMMGPU-COUNTERS=...`, in [`VmOutcome::guest_counters`]),
//! and the driver's recovery messages on the console, matched by content
//! (not by a "hmmgpuN:" or dev_* prefix, which may change).

use crate::vm::VmOutcome;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::ops::RangeInclusive;

/// Counters of recoveries; each must be in the driver's counters file.
const COUNTERS: &[&str] = &["driver_resets", "driver_polled_completions"];

/// The driver's recovery messages (guest-driver/gpu.rs, queue.rs), by the
/// part of their text that says what happened.
const LINES: &[&str] = &[
    // "a command got no answer in N ms; resetting the device"
    "got no answer in",
    // "the device restarted under the driver (its contexts are gone); resetting it"
    "restarted under the driver",
    // "reset done (N contexts recreated); commands in flight were retried"
    "commands in flight were retried",
    // "abandoning a command the device never completed"
    "abandoning a command",
    // "the device stopped answering; it is dead"
    "the device stopped answering",
    // "the device did not come back from its reset"
    "did not come back from its reset",
];

/// The recoveries a test expects.
pub(super) struct Expected<'a> {
    /// Recovery counters (summed over the GPUs) and the values allowed; a
    /// counter not listed must be 0.
    pub counters: &'a [(&'a str, RangeInclusive<u64>)],
    /// Recovery messages allowed (each a part of [`LINES`]); others fail.
    pub lines: &'a [&'a str],
    /// The driver is still loaded at the end, so init's counter dump must be
    /// there for every GPU. Tests that rmmod the driver set this false; the
    /// guest program's last `hmmgpu-faults: counter NAME VALUE` lines then
    /// stand in for the dump where it printed them.
    pub loaded_at_end: bool,
}

impl Expected<'_> {
    /// No recovery at all, the driver loaded at the end.
    pub const NONE: Expected<'static> = Expected {
        counters: &[],
        lines: &[],
        loaded_at_end: true,
    };
    /// No recovery at all; the test unloads the driver before the end.
    pub const NONE_UNLOADED: Expected<'static> = Expected {
        counters: &[],
        lines: &[],
        loaded_at_end: false,
    };
}

/// The recovery counters of a run: init's dump summed over GPUs, else the
/// guest program's last printed values; None if neither is there.
fn counters(out: &VmOutcome) -> Result<Option<BTreeMap<String, u64>>> {
    let mut sum: BTreeMap<String, u64> = BTreeMap::new();
    for g in &out.guest_counters {
        match &g.counters {
            Ok(c) => {
                for name in COUNTERS {
                    let Some(v) = c.get(*name) else {
                        bail!(
                            "gpu{}'s debugfs counters have no {name} (renamed?): {:?}",
                            g.gpu,
                            c.keys().collect::<Vec<_>>()
                        );
                    };
                    *sum.entry(name.to_string()).or_default() += v;
                }
            }
            Err(why) => bail!(
                "gpu{}'s debugfs counters were unreadable at the end: {why}",
                g.gpu
            ),
        }
    }
    if !out.guest_counters.is_empty() {
        return Ok(Some(sum));
    }
    // hmmgpu-faults prints "hmmgpu-faults: counter NAME VALUE" (GPU 0).
    for name in COUNTERS {
        let key = format!("hmmgpu-faults: counter {name} ");
        if let Some(v) = out.console.iter().rev().find_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            rest.trim().parse::<u64>().ok()
        }) {
            sum.insert(name.to_string(), v);
        }
    }
    Ok((!sum.is_empty()).then_some(sum))
}

/// Fails unless the run's recoveries are exactly what `exp` allows.
pub(super) fn check(out: &VmOutcome, exp: &Expected) -> Result<()> {
    let mut problems = Vec::new();
    match counters(out)? {
        Some(c) => {
            for (name, value) in &c {
                let allowed = exp
                    .counters
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0..=0, |(_, r)| r.clone());
                if !allowed.contains(value) {
                    problems.push(format!(
                        "the driver's {name} is {value}, want {}",
                        if allowed == (0..=0) {
                            "0 (a test that injects no such fault)".to_string()
                        } else {
                            format!("{}..={}", allowed.start(), allowed.end())
                        }
                    ));
                }
            }
            for (name, range) in exp.counters {
                if !c.contains_key(*name) && !range.contains(&0) {
                    problems.push(format!("no value of {name} (want {range:?})"));
                }
            }
        }
        None if exp.loaded_at_end && !out.stats.is_empty() => problems.push(
            "init printed no driver counters (HMMGPU-COUNTERS) for the run's GPUs: was the driver unloaded?"
                .to_string(),
        ),
        None => {
            if let Some((name, range)) = exp.counters.iter().find(|(_, r)| !r.contains(&0)) {
                problems.push(format!(
                    "no driver counters at the end to check {name} (want {range:?})"
                ));
            }
        }
    }
    for l in &out.console {
        if let Some(what) = LINES.iter().find(|w| l.contains(*w)) {
            if !exp.lines.contains(what) {
                problems.push(format!("the driver recovered: {}", l.trim()));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{GpuCounters, VmResult, VramFiles};

    fn outcome(counters: Vec<GpuCounters>, console: &[&str], gpus: u32) -> VmOutcome {
        VmOutcome {
            result: VmResult::Exited(0),
            timings: Default::default(),
            launched: std::time::Instant::now(),
            stats: (0..gpus)
                .map(|gpu| crate::vm::BackendStats {
                    gpu,
                    source: crate::vm::StatsSource::ExitLine,
                    raw: serde_json::json!({}),
                })
                .collect(),
            console: console.iter().map(|s| s.to_string()).collect(),
            console_times: Vec::new(),
            splats: Vec::new(),
            guest_counters: counters,
            vram: VramFiles { paths: Vec::new() },
            backend_restarts: 0,
        }
    }

    fn gpu(n: u32, resets: u64, polled: u64) -> GpuCounters {
        GpuCounters {
            gpu: n,
            counters: Ok([
                ("commands".to_string(), 99),
                ("driver_resets".to_string(), resets),
                ("driver_polled_completions".to_string(), polled),
            ]
            .into_iter()
            .collect()),
        }
    }

    #[test]
    fn a_clean_run_passes() {
        let out = outcome(vec![gpu(0, 0, 0), gpu(1, 0, 0)], &["ok"], 2);
        check(&out, &Expected::NONE).unwrap();
    }

    #[test]
    fn a_polled_completion_fails_a_test_that_injects_nothing() {
        let out = outcome(vec![gpu(0, 0, 0), gpu(1, 0, 1)], &[], 2);
        let e = check(&out, &Expected::NONE).unwrap_err().to_string();
        assert!(e.contains("driver_polled_completions is 1"), "{e}");
    }

    #[test]
    fn a_reset_or_its_message_fails() {
        let out = outcome(vec![gpu(0, 1, 0)], &[], 1);
        assert!(check(&out, &Expected::NONE).is_err());
        let out = outcome(
            vec![gpu(0, 0, 0)],
            &["[ 3.1] hmmgpu 0000:01:00.0: a command got no answer in 10000 ms; resetting the device"],
            1,
        );
        let e = check(&out, &Expected::NONE).unwrap_err().to_string();
        assert!(e.contains("the driver recovered"), "{e}");
    }

    #[test]
    fn missing_or_unreadable_counters_fail() {
        // Driver loaded but no dump: cannot prove anything.
        assert!(check(&outcome(vec![], &[], 1), &Expected::NONE).is_err());
        let dead = GpuCounters {
            gpu: 0,
            counters: Err("No such device".into()),
        };
        assert!(check(&outcome(vec![dead], &[], 1), &Expected::NONE).is_err());
        // A counter renamed away.
        let renamed = GpuCounters {
            gpu: 0,
            counters: Ok([("driver_resets".to_string(), 0)].into_iter().collect()),
        };
        assert!(check(&outcome(vec![renamed], &[], 1), &Expected::NONE).is_err());
        // No GPU at all (bare boot): nothing to check.
        check(&outcome(vec![], &[], 0), &Expected::NONE).unwrap();
    }

    #[test]
    fn fault_tests_get_exactly_what_they_expect() {
        let exp = Expected {
            counters: &[
                ("driver_resets", 1..=1),
                ("driver_polled_completions", 1..=12),
            ],
            lines: &["got no answer in", "commands in flight were retried"],
            loaded_at_end: true,
        };
        let console = [
            "hmmgpu0: a command got no answer in 10000 ms; resetting the device",
            "hmmgpu0: reset done (1 contexts recreated); commands in flight were retried",
        ];
        check(&outcome(vec![gpu(0, 1, 3)], &console, 1), &exp).unwrap();
        // One reset too many, or none at all.
        assert!(check(&outcome(vec![gpu(0, 2, 3)], &console, 1), &exp).is_err());
        assert!(check(&outcome(vec![gpu(0, 0, 3)], &console, 1), &exp).is_err());
        // A recovery message the test does not expect.
        let more = [
            console[0],
            console[1],
            "hmmgpu: abandoning a command the device never completed",
        ];
        assert!(check(&outcome(vec![gpu(0, 1, 3)], &more, 1), &exp).is_err());
    }

    #[test]
    fn unloaded_driver_uses_the_guest_programs_counters() {
        let console = [
            "hmmgpu-faults: counter driver_resets 0",
            "hmmgpu-faults: counter driver_polled_completions 2",
        ];
        let e = check(&outcome(vec![], &console, 1), &Expected::NONE_UNLOADED);
        assert!(e.is_err());
        let console = [
            "hmmgpu-faults: counter driver_resets 0",
            "hmmgpu-faults: counter driver_polled_completions 0",
        ];
        check(&outcome(vec![], &console, 1), &Expected::NONE_UNLOADED).unwrap();
        check(&outcome(vec![], &[], 1), &Expected::NONE_UNLOADED).unwrap();
    }
}
