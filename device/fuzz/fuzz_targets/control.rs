// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The control socket's request parser and handler on any lines: every
//! reply is a JSON object with a boolean "ok", an error has a message, and
//! a refused request changes nothing (armed faults, stall, plan, counts,
//! sessions).
#![no_main]

use std::sync::{Arc, OnceLock};

use hmmgpu_device::control::{handle_request, Control};
use hmmgpu_device::session::Sessions;
use hmmgpu_device::{FaultInjector, Stats, Vram};
use libfuzzer_sys::fuzz_target;

/// A VRAM for `ecc` faults, shared by every run.
fn vram() -> Arc<Vram> {
    static VRAM: OnceLock<(tempfile::TempDir, Arc<Vram>)> = OnceLock::new();
    VRAM.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let vram = Arc::new(Vram::open(&dir.path().join("vram"), 2 << 20).expect("vram"));
        (dir, vram)
    })
    .1
    .clone()
}

/// Everything a request may change, as JSON.
fn state(faults: &FaultInjector, sessions: &Sessions) -> serde_json::Value {
    serde_json::json!({
        "faults": faults.list(),
        "stalled": faults.stalled(),
        "plan": faults.plan_pending(),
        "injected": faults.injected_stats(),
        "session": sessions.to_json(),
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let faults = Arc::new(FaultInjector::with_vram(vram()).quiet());
    let sessions = Arc::new(Sessions::default());
    let control = Control {
        stats: Arc::new(Stats::default()),
        faults: Some(faults.clone()),
        sessions: Some(sessions.clone()),
    };
    for line in text.lines().take(16) {
        let before = state(&faults, &sessions);
        let reply = handle_request(line, &control);
        let ok = reply["ok"].as_bool().expect("a reply without a boolean ok");
        if !ok {
            let error = reply["error"]
                .as_str()
                .expect("an error reply without a message");
            assert!(!error.is_empty());
            assert_eq!(
                state(&faults, &sessions),
                before,
                "refused {line:?} changed the state"
            );
        }
    }
});
