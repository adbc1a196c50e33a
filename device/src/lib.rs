// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! hmmgpu's vhost-user device backend (docs/device-spec.md).
//!
//! - [`vram`]: the VRAM file mapping, bounds-checked.
//! - [`engine`]: the device model executing every command (copy engine,
//!   device MMU commands, device faults and parking), its counters and the
//!   fault-injection hook point; no vhost-user in it.
//! - [`faults`]: the fault-injection catalogue and its armed state.
//! - [`plan`]: fault plan files and the seeded generator behind them.
//! - [`mmu`]: the device MMU's per-context page tables.
//! - [`backend`]: the vhost-user glue (features, config space, command and
//!   event queues).
//! - [`control`]: the JSON-lines control socket.
//! - [`socket`]: the listening sockets, private whatever the umask.
//! - [`stats`]: the stats record the control socket, the exit line and
//!   xtask share.
//! - [`session`]: the front-end sessions (a hot-unplug ends one, a re-plug
//!   starts the next).
//! - [`trace`]: the device timeline (`--trace`), a Chrome trace-event file.
//! - [`cli`]: the command line and the sessions it serves.
#![forbid(unsafe_code)]

pub mod backend;
pub mod cli;
pub mod control;
pub mod engine;
pub mod faults;
pub mod mmu;
pub mod plan;
pub mod session;
pub mod socket;
pub mod stats;
pub mod trace;
pub mod vram;

pub use backend::HmmGpuBackend;
pub use engine::{
    Completion, CopyInfo, Engine, EventSink, Executed, FaultHooks, FaultInjector, InterruptAction,
    NoEventQueue, NoFaults, Stats, StatsSnapshot,
};
pub use faults::Fault;
pub use mmu::Mmu;
pub use plan::Plan;
pub use vram::Vram;
