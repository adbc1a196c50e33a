// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The one stats record of a backend (docs/control.md, "stats"): what the
//! control socket's `stats` answers, what the backend prints as its last
//! line when it exits, and what `cargo xtask` reads back from either.

use serde::{Deserialize, Serialize};

use crate::engine::StatsSnapshot;
use crate::faults::InjectedStats;
use hmmgpu_abi::counter;

/// Everything a backend counts. Readers must ignore members they do not
/// know (new ones may be added), so this type does not deny them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// The device's counters, the same as the COUNTERS block (flattened:
    /// `"commands_ok"` etc. are members of the record itself).
    #[serde(flatten)]
    pub device: StatsSnapshot,
    /// What fault injection did (absent without fault injection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injected: Option<InjectedStats>,
    /// Front ends served so far (absent where there are no sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u64>,
    /// Errors the guest caused (failed commands, dropped chains).
    #[serde(default)]
    pub guest_errors: u64,
    /// Of those, how many were not logged (rate limit,
    /// `engine::GUEST_WARNINGS_PER_SEC`).
    #[serde(default)]
    pub guest_errors_unlogged: u64,
    /// The device timeline's records written and dropped (absent without
    /// `--trace`; final only in the exit line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::TraceStats>,
}

/// Why a stats line could not be read.
#[derive(Debug, thiserror::Error)]
#[error("stats line is not a stats record: {0}")]
pub struct StatsLineError(#[from] serde_json::Error);

impl DeviceStats {
    /// What starts the backend's exit line on stderr; the JSON follows.
    pub const EXIT_LINE_PREFIX: &'static str = "hmmgpu-device: stats: ";

    /// The exit line (without newline).
    pub fn exit_line(&self) -> String {
        // Serializing plain integers and options cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{}{json}", Self::EXIT_LINE_PREFIX)
    }

    /// The record in `line` if it is an exit line; `None` for other lines.
    pub fn from_exit_line(line: &str) -> Option<Result<Self, StatsLineError>> {
        let json = line.trim_end().strip_prefix(Self::EXIT_LINE_PREFIX)?;
        Some(serde_json::from_str(json).map_err(StatsLineError))
    }

    /// The stats of `control`'s device as they are now.
    pub fn of(stats: &crate::engine::Stats) -> Self {
        let (guest_errors, guest_errors_unlogged) = stats.guest_errors();
        Self {
            device: stats.snapshot(),
            injected: None,
            sessions: None,
            guest_errors,
            guest_errors_unlogged,
            trace: None,
        }
    }

    /// A counter by the name the record gives it: a device counter
    /// (`"bytes_guest_to_vram"`), `"sessions"`, `"guest_errors"`, or an
    /// injection counter as `"injected.copy_errors"`. `None` when there is
    /// no such counter (or the record lacks its group).
    pub fn counter(&self, name: &str) -> Option<u64> {
        if let Some(index) = counter::NAMES.iter().position(|&n| n == name) {
            return self.device.values().get(index).copied();
        }
        let record = serde_json::to_value(self).ok()?;
        name.split('.')
            .try_fold(&record, |value, key| value.get(key))?
            .as_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_line_round_trips_and_names_every_counter() {
        let mut stats = DeviceStats {
            device: StatsSnapshot::from_values(std::array::from_fn(|i| i as u64 * 10 + 1)),
            injected: Some(InjectedStats {
                copy_errors: 3,
                ..Default::default()
            }),
            sessions: Some(2),
            guest_errors: 7,
            guest_errors_unlogged: 1,
            trace: None,
        };
        let line = stats.exit_line();
        assert!(
            line.starts_with("hmmgpu-device: stats: {\"commands_ok\":1,"),
            "{line}"
        );
        assert!(
            line.ends_with(",\"sessions\":2,\"guest_errors\":7,\"guest_errors_unlogged\":1}"),
            "{line}"
        );
        let back = DeviceStats::from_exit_line(&format!("{line}\n"))
            .unwrap()
            .unwrap();
        assert_eq!(back, stats);
        for (i, name) in counter::NAMES.iter().enumerate() {
            assert_eq!(back.counter(name), Some(i as u64 * 10 + 1), "{name}");
        }
        assert_eq!(back.counter("sessions"), Some(2));
        assert_eq!(back.counter("guest_errors"), Some(7));
        assert_eq!(back.counter("injected.copy_errors"), Some(3));
        assert_eq!(back.counter("injected.nonsense"), None);
        assert_eq!(back.counter("nonsense"), None);
        stats.injected = None;
        stats.sessions = None;
        assert!(!stats.exit_line().contains("injected"));
        assert_eq!(stats.counter("injected.copy_errors"), None);
        assert_eq!(stats.counter("sessions"), None);
    }

    #[test]
    fn readers_ignore_new_members_and_refuse_garbage() {
        let mut json = serde_json::to_value(DeviceStats::default()).unwrap();
        json["commands_ok"] = 5.into();
        json["new_counter"] = 9.into();
        let line = format!("{}{json}", DeviceStats::EXIT_LINE_PREFIX);
        let stats = DeviceStats::from_exit_line(&line).unwrap().unwrap();
        assert_eq!(stats.counter("commands_ok"), Some(5));
        assert_eq!(stats.counter("bytes_filled"), Some(0));
        // A record missing a counter is no record (the writer is broken).
        let short = line.replace("\"bytes_filled\":0,", "");
        DeviceStats::from_exit_line(&short).unwrap().unwrap_err();
        assert!(DeviceStats::from_exit_line("hmmgpu-device: error: x").is_none());
        let garbage = DeviceStats::from_exit_line("hmmgpu-device: stats: [1]");
        assert!(matches!(garbage, Some(Err(_))));
    }
}
