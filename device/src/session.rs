// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The front-end sessions of one backend process.
//!
//! A vhost-user session is one connection from QEMU: everything the
//! protocol sets up (owner, features, memory table, rings) belongs to it.
//! QEMU closes it when the VM ends and when the device is hot-unplugged
//! (qemu-patches/0004); a device plugged back connects again. The backend
//! serves one session and exits with its final counters, unless asked on
//! the control socket (`session` with `"serve_next": true`, which `cargo
//! xtask inject unplug` sends before `device_del`) to serve the next one
//! too: then the same process, with the same VRAM mapping, counters and
//! armed faults, waits for the re-plugged device.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{json, Value};

/// Session bookkeeping shared by the serving loop and the control socket.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Front ends accepted so far.
    started: AtomicU64,
    /// A front end is connected now.
    connected: AtomicBool,
    /// Serve another front end after the current one (or, between
    /// sessions, the next one) hangs up, instead of exiting. Taken by that
    /// hang-up: each request covers one re-plug.
    serve_next: AtomicBool,
}

impl Sessions {
    /// A front end connected.
    pub fn begin(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.connected.store(true, Ordering::Release);
    }

    /// The front end hung up; returns whether to wait for the next one.
    pub fn end(&self) -> bool {
        self.connected.store(false, Ordering::Release);
        self.serve_next.swap(false, Ordering::AcqRel)
    }

    /// Asks for (or cancels) serving the next front end.
    pub fn set_serve_next(&self, on: bool) {
        self.serve_next.store(on, Ordering::Release);
    }

    /// Front ends accepted so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// The state as the control socket reports it.
    pub fn to_json(&self) -> Value {
        json!({
            "started": self.started(),
            "connected": self.connected.load(Ordering::Acquire),
            "serve_next": self.serve_next.load(Ordering::Acquire),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_next_covers_one_hang_up() {
        let s = Sessions::default();
        assert_eq!(
            s.to_json(),
            json!({"started": 0, "connected": false, "serve_next": false})
        );
        s.begin();
        s.set_serve_next(true);
        assert_eq!(
            s.to_json(),
            json!({"started": 1, "connected": true, "serve_next": true})
        );
        assert!(s.end(), "armed: serve the next front end");
        s.begin();
        assert!(!s.end(), "the request was used up by the first hang-up");
        assert_eq!(s.started(), 2);
        s.set_serve_next(true);
        s.set_serve_next(false);
        assert!(!s.end(), "cancelled");
    }
}
