// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! Fault plans: which faults to inject when, from a JSON file
//! (docs/fault-injection.md, "Plan files").
//!
//! ```json
//! {"seed": 7, "faults": [
//!   {"after_commands": 100, "fault": {"kind": "copy_error"}},
//!   {"every_commands": 50, "probability": 0.25, "times": 4,
//!    "fault": {"kind": "drop_interrupts"}},
//!   {"after_ms": 2000, "fault": {"kind": "ecc", "offset": 4096, "bit": 3}}
//! ]}
//! ```
//!
//! Triggers are evaluated when the plan is loaded and after each command
//! the device executes, in file order; probabilities are rolled with a
//! [`SplitMix64`] seeded from `seed`, so a plan replayed against the same
//! command sequence injects the same faults at the same commands.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::faults::{Fault, FaultError};

/// Largest plan file read (a plan is a few hundred bytes in practice; a
/// path naming /dev/zero must not fill the memory).
pub const MAX_PLAN_FILE: u64 = 1 << 20;

/// Why a plan cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Not a plan in JSON.
    #[error("bad fault plan: {0}")]
    Parse(#[from] serde_json::Error),
    /// An entry is inconsistent.
    #[error("fault plan entry {index}: {reason}")]
    Entry {
        /// Its index in `faults`.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// An entry's fault is bad.
    #[error("fault plan entry {index}: {source}")]
    Fault {
        /// Its index in `faults`.
        index: usize,
        /// What is wrong with the fault.
        source: FaultError,
    },
    /// The plan file cannot be read.
    #[error("fault plan {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The plan file is not a regular file, or too large.
    #[error("fault plan {}: {reason}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The plan file holds a bad plan.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        source: Box<PlanError>,
    },
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed, seedable
/// generator; the only randomness fault injection uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A fault plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Seed of the generator behind every probability (default 0).
    #[serde(default)]
    pub seed: u64,
    /// The entries, evaluated in this order.
    pub faults: Vec<PlanEntry>,
}

/// When to inject one fault.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanEntry {
    /// Fire once `after_commands` commands have executed since the plan
    /// was loaded (0: at load). With `every_commands`: the first firing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_commands: Option<u64>,
    /// Fire again every this many commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_commands: Option<u64>,
    /// Fire once, after the first command that completes at least this many
    /// milliseconds after the plan was loaded (wall clock: not
    /// reproducible to the command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
    /// Each firing injects the fault with this probability (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// With `every_commands`: fire at most this many times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
    /// The fault.
    pub fault: Fault,
}

impl Plan {
    /// Parses a plan from JSON text, validated.
    pub fn from_json_str(text: &str) -> Result<Self, PlanError> {
        let plan: Plan = serde_json::from_str(text)?;
        plan.validate()?;
        Ok(plan)
    }

    /// Parses a plan from a JSON value, validated.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, PlanError> {
        let plan = Plan::deserialize(value)?;
        plan.validate()?;
        Ok(plan)
    }

    /// Reads and parses the plan file at `path`: a regular file of at most
    /// [`MAX_PLAN_FILE`] bytes, opened without blocking (a FIFO or a device
    /// is refused, never waited on or read without end).
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = read_plan_file(path)?;
        Self::from_json_str(&text).map_err(|e| PlanError::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), PlanError> {
        for (index, entry) in self.faults.iter().enumerate() {
            let bad = |reason| Err(PlanError::Entry { index, reason });
            if let Err(source) = entry.fault.validate() {
                return Err(PlanError::Fault { index, source });
            }
            if entry.after_ms.is_some()
                && (entry.after_commands.is_some() || entry.every_commands.is_some())
            {
                return bad("after_ms cannot be combined with command triggers");
            }
            if entry.every_commands == Some(0) {
                return bad("every_commands must be at least 1");
            }
            if entry.times.is_some() && entry.every_commands.is_none() {
                return bad("times needs every_commands");
            }
            if entry.times == Some(0) {
                return bad("times must be at least 1");
            }
            if entry.probability.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
                return bad("probability must be within 0..=1");
            }
        }
        Ok(())
    }
}

/// The text of the plan file at `path` (see [`Plan::load`]).
fn read_plan_file(path: &Path) -> Result<String, PlanError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| PlanError::Read {
        path: path.to_owned(),
        source,
    };
    let refuse = |reason: String| PlanError::File {
        path: path.to_owned(),
        reason,
    };
    // O_NONBLOCK: opening a FIFO without a writer would block the control
    // thread; it is refused below instead.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if meta.len() > MAX_PLAN_FILE {
        return Err(refuse(format!(
            "{} bytes; a plan file may have at most {MAX_PLAN_FILE}",
            meta.len()
        )));
    }
    let mut text = String::new();
    // The file may grow after the check: read one byte more than allowed.
    file.take(MAX_PLAN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_PLAN_FILE {
        return Err(refuse(format!("more than {MAX_PLAN_FILE} bytes")));
    }
    Ok(text)
}

/// A loaded plan: its entries and how far each got.
#[derive(Debug)]
pub struct PlanState {
    entries: Vec<(PlanEntry, EntryState)>,
    /// Commands executed when the plan was loaded.
    base_commands: u64,
    loaded: Instant,
}

#[derive(Debug, Default)]
struct EntryState {
    fired: u64,
    done: bool,
}

impl PlanState {
    /// `plan`, loaded when `commands` commands had executed, at `now`.
    pub fn new(plan: Plan, commands: u64, now: Instant) -> Self {
        Self {
            entries: plan
                .faults
                .into_iter()
                .map(|e| (e, EntryState::default()))
                .collect(),
            base_commands: commands,
            loaded: now,
        }
    }

    /// Entries that may still fire.
    pub fn pending(&self) -> usize {
        self.entries.iter().filter(|(_, s)| !s.done).count()
    }

    /// The faults due now that `commands` commands have executed (device
    /// total), in entry order, after rolling their probabilities.
    pub fn due(&mut self, commands: u64, now: Instant, rng: &mut SplitMix64) -> Vec<Fault> {
        let since = commands.saturating_sub(self.base_commands);
        let elapsed = now.saturating_duration_since(self.loaded);
        let mut due = Vec::new();
        for (entry, state) in &mut self.entries {
            if state.done {
                continue;
            }
            let fires = match (entry.after_ms, entry.every_commands) {
                (Some(ms), _) => {
                    let fires = elapsed >= Duration::from_millis(ms);
                    state.done = fires;
                    fires
                }
                (None, Some(every)) => {
                    let first = entry.after_commands.unwrap_or(every);
                    let fires = since >= first && (since - first).is_multiple_of(every);
                    // Each command count fires once (a plan loaded twice at
                    // the same count is a new plan).
                    let fires = fires && state.fired <= (since - first.min(since)) / every;
                    if fires {
                        state.fired += 1;
                        state.done = entry.times.is_some_and(|t| state.fired >= t);
                    }
                    fires
                }
                (None, None) => {
                    let fires = since >= entry.after_commands.unwrap_or(0);
                    state.done = fires;
                    fires
                }
            };
            if !fires {
                continue;
            }
            let roll = match entry.probability {
                Some(p) => rng.next_f64() < p,
                None => true,
            };
            if roll {
                due.push(entry.fault.clone());
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference() {
        // Reference values of SplitMix64 seeded with 1234567.
        let mut g = SplitMix64::new(1234567);
        assert_eq!(g.next_u64(), 6457827717110365317);
        assert_eq!(g.next_u64(), 3203168211198807973);
        let mut a = SplitMix64::new(9);
        let mut b = SplitMix64::new(9);
        for _ in 0..100 {
            let x = a.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert_eq!(x, b.next_f64());
        }
    }

    #[test]
    fn parses_and_validates() {
        let plan = Plan::from_json_str(
            r#"{"seed": 5, "faults": [
                {"after_commands": 3, "fault": {"kind": "copy_error", "count": 2}},
                {"every_commands": 2, "times": 3, "probability": 0.5,
                 "fault": {"kind": "drop_interrupts"}},
                {"after_ms": 10, "fault": {"kind": "ecc", "offset": 8, "bit": 1}},
                {"fault": {"kind": "copy_error",
                           "range": {"space": "vram", "start": 0, "len": 4096}, "skip": 2}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(plan.seed, 5);
        assert_eq!(plan.faults.len(), 4);
        for bad in [
            r#"{"faults": [{"fault": {"kind": "nope"}}]}"#,
            r#"{"faults": [{"fault": {"kind": "ecc", "offset": 1, "bit": 8}}]}"#,
            r#"{"faults": [{"after_ms": 1, "after_commands": 1, "fault": {"kind": "stall_queue"}}]}"#,
            r#"{"faults": [{"every_commands": 0, "fault": {"kind": "stall_queue"}}]}"#,
            r#"{"faults": [{"times": 2, "fault": {"kind": "stall_queue"}}]}"#,
            r#"{"faults": [{"probability": 1.5, "fault": {"kind": "stall_queue"}}]}"#,
            r#"{"faults": [{"fault": {"kind": "stall_queue"}, "extra": 1}]}"#,
            r#"{"faults": [{"fault": {"kind": "latency", "us": 1, "bogus": 2}}]}"#,
            r#"{"seed": -1, "faults": []}"#,
            r#"{"faults": 3}"#,
            "not json",
        ] {
            assert!(Plan::from_json_str(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn command_triggers_fire_at_their_counts() {
        let plan = Plan::from_json_str(
            r#"{"faults": [
                {"fault": {"kind": "stall_queue"}},
                {"after_commands": 2, "fault": {"kind": "drop_interrupts", "count": 2}},
                {"after_commands": 1, "every_commands": 3, "times": 3,
                 "fault": {"kind": "drop_interrupts", "count": 3}}
            ]}"#,
        )
        .unwrap();
        let now = Instant::now();
        let mut state = PlanState::new(plan, 10, now);
        let mut rng = SplitMix64::new(0);
        let mut fired = Vec::new();
        for commands in 10..=25 {
            for fault in state.due(commands, now, &mut rng) {
                let count = match fault {
                    Fault::DropInterrupts { count } => count,
                    _ => 0,
                };
                fired.push((commands - 10, count));
            }
            // Evaluating the same count twice fires nothing new.
            assert!(state.due(commands, now, &mut rng).is_empty());
        }
        assert_eq!(fired, [(0, 0), (1, 3), (2, 2), (4, 3), (7, 3)]);
        assert_eq!(state.pending(), 0);
    }

    #[test]
    fn time_triggers_fire_once_after_their_delay() {
        let plan = Plan::from_json_str(
            r#"{"faults": [{"after_ms": 50, "fault": {"kind": "stall_queue"}}]}"#,
        )
        .unwrap();
        let now = Instant::now();
        let mut state = PlanState::new(plan, 0, now);
        let mut rng = SplitMix64::new(0);
        assert!(state
            .due(5, now + Duration::from_millis(49), &mut rng)
            .is_empty());
        assert_eq!(
            state
                .due(6, now + Duration::from_millis(50), &mut rng)
                .len(),
            1
        );
        assert!(state
            .due(7, now + Duration::from_millis(99), &mut rng)
            .is_empty());
    }
}
