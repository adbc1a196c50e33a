// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! hmmgpu's vhost-user device backend (docs/device-spec.md).
//!
//! - [`vram`]: the VRAM file mapping, bounds-checked.
//! - [`engine`]: the copy engine executing COPY/FILL/NOP, its counters and
//!   the fault-injection hook point; no vhost-user in it.
//! - [`backend`]: the vhost-user glue (features, config space, queue).
//! - [`control`]: the JSON-lines control socket.
//! - [`cli`]: the command line and the session it runs.
#![deny(missing_docs)]

pub mod backend;
pub mod cli;
pub mod control;
pub mod engine;
pub mod vram;

pub use backend::HmmGpuBackend;
pub use engine::{Engine, FaultHooks, FaultInjector, NoFaults, Stats, StatsSnapshot};
pub use vram::Vram;
