// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The fault-injection catalogue (docs/fault-injection.md) and its state.
//!
//! [`Fault`] is one entry of the catalogue as the control socket and plan
//! files spell it (JSON, `"kind"` names the variant). [`FaultInjector`]
//! holds the faults armed at run time and implements the engine's
//! [`FaultHooks`]: the copy engine, the command loop and the vhost-user glue
//! ask it, at fixed points, whether to fail a copy, sleep, drop or delay an
//! interrupt, stop taking commands, or post injected events.
//!
//! Everything that decides *whether* a fault fires depends only on the
//! sequence of commands and copies and on the plan's seed (a [`SplitMix64`]
//! in this crate, never OS entropy), so the same plan and the same guest
//! workload give the same fault log (`fault #N: <kind> <args> at command
//! <M>`), written to stderr and, optionally, a file.
//!
//! The injector is shared between the queue worker thread and the control
//! socket's thread; its state sits behind one mutex that is only held for
//! bookkeeping, never while sleeping (sleeps wait on a condition variable
//! that `clear` signals, so clearing a latency fault cuts a sleep short).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hmmgpu_abi::{event, ContextId, Event, Opcode, MAX_CONTEXTS, PAGE_SIZE};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::engine::{CopyInfo, FaultHooks, InjectedFault, InterruptAction};
use crate::mmu::{Mmu, Phys};
use crate::plan::{Plan, PlanError, PlanState, SplitMix64};
use crate::trace::{self, Record, Tracer};
use crate::vram::Vram;

/// Most events one spurious_faults or fault_storm injection may ask for.
pub const MAX_INJECTED_EVENTS: u64 = 1 << 20;

/// Why a fault cannot be injected.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The JSON is no fault of the catalogue.
    #[error("bad fault: {0}")]
    Parse(#[from] serde_json::Error),
    /// `ctx` names no context.
    #[error("ctx {0} is not a context (1..={MAX_CONTEXTS})")]
    Context(u32),
    /// A count outside its range.
    #[error("count {count} out of range 1..={max}")]
    Count {
        /// The count given.
        count: u64,
        /// The largest allowed.
        max: u64,
    },
    /// An empty `range`.
    #[error("range.len must be at least 1")]
    EmptyRange,
    /// A probability outside 0..=1.
    #[error("probability must be within 0..=1")]
    Probability,
    /// A sleep (`us`, `ms`) longer than an hour.
    #[error("{0} must be at most one hour")]
    TooLong(&'static str),
    /// A bandwidth of 0.
    #[error("bytes_per_sec must be at least 1")]
    ZeroBandwidth,
    /// A bit index above 7.
    #[error("bit {0} out of range 0..=7")]
    Bit(u8),
    /// `unplug` with `timeout_s` 0.
    #[error("unplug: \"timeout_s\" is a number of seconds, at least 1")]
    ZeroTimeout,
    /// ECC injection without a VRAM (tests).
    #[error("no VRAM attached")]
    NoVram,
    /// The ECC offset is outside the VRAM.
    #[error("ecc offset {offset:#x}: {source}")]
    EccOffset {
        /// The offset.
        offset: u64,
        /// What the VRAM said.
        source: crate::vram::VramError,
    },
}

/// Which address space an [`AddrRange`] is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// VRAM offsets.
    Vram,
    /// Guest-physical addresses.
    Guest,
}

/// `[start, start + len)` in guest RAM or the VRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddrRange {
    /// The address space.
    pub space: Space,
    /// First byte.
    pub start: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
}

impl AddrRange {
    /// Whether `len` bytes at `side` overlap this range.
    pub fn touches(&self, side: Phys, len: u64) -> bool {
        let at = match (self.space, side) {
            (Space::Vram, Phys::Vram(at)) | (Space::Guest, Phys::Guest(at)) => at,
            _ => return false,
        };
        len > 0 && at < self.start.saturating_add(self.len) && self.start < at.saturating_add(len)
    }
}

fn one() -> u64 {
    1
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One fault of the catalogue, as requests and plans spell it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// The next `count` copies (after `skip` that succeed) fail with
    /// COPY_ERROR; with `range`, only copies touching it count; with
    /// `probability`, each eligible copy fails with that probability.
    CopyError {
        /// Copies to fail (default 1).
        #[serde(default = "one")]
        count: u64,
        /// Only copies touching this range.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        range: Option<AddrRange>,
        /// Eligible copies to let through first (the `skip + 1`th fails).
        #[serde(default, skip_serializing_if = "is_zero")]
        skip: u64,
        /// Chance (0..=1) that an eligible copy fails (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        probability: Option<f64>,
    },
    /// Each data-moving command waits `us` microseconds before it executes;
    /// for `count` commands, or until cleared.
    Latency {
        /// Microseconds per command.
        us: u64,
        /// Commands to delay (default: until cleared).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
    },
    /// Data-moving commands take at least bytes / `bytes_per_sec` seconds.
    Bandwidth {
        /// The cap, bytes per second (at least 1).
        bytes_per_sec: u64,
    },
    /// Flips bit `bit` of the VRAM byte at `offset` and posts an ECC event.
    Ecc {
        /// VRAM byte offset.
        offset: u64,
        /// Bit index, 0..=7.
        bit: u8,
    },
    /// The next `count` command-queue interrupts are not signalled.
    DropInterrupts {
        /// Interrupts to drop (default 1).
        #[serde(default = "one")]
        count: u64,
    },
    /// The next `count` command-queue interrupts are signalled `ms` late.
    DelayInterrupts {
        /// Delay in milliseconds.
        ms: u64,
        /// Interrupts to delay (default 1).
        #[serde(default = "one")]
        count: u64,
    },
    /// The device takes no more commands from queue 0 until it is reset.
    StallQueue,
    /// `count` FAULT events for `addr` of context `ctx`, with nothing parked.
    SpuriousFaults {
        /// Context named in the events.
        ctx: u32,
        /// Device virtual address named in the events.
        addr: u64,
        /// Events to post (default 1).
        #[serde(default = "one")]
        count: u64,
    },
    /// `count` FAULT events spread over the pages `ctx` has mapped.
    FaultStorm {
        /// Context named in the events.
        ctx: u32,
        /// Events to post.
        count: u64,
    },
}

impl Fault {
    /// The `kind` string.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::CopyError { .. } => "copy_error",
            Fault::Latency { .. } => "latency",
            Fault::Bandwidth { .. } => "bandwidth",
            Fault::Ecc { .. } => "ecc",
            Fault::DropInterrupts { .. } => "drop_interrupts",
            Fault::DelayInterrupts { .. } => "delay_interrupts",
            Fault::StallQueue => "stall_queue",
            Fault::SpuriousFaults { .. } => "spurious_faults",
            Fault::FaultStorm { .. } => "fault_storm",
        }
    }

    /// Parses a fault from JSON, validated.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, FaultError> {
        let fault = Fault::deserialize(value)?;
        fault.validate()?;
        Ok(fault)
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), FaultError> {
        let ctx_ok = |ctx: u32| match ContextId::new(ctx) {
            Some(_) => Ok(()),
            None => Err(FaultError::Context(ctx)),
        };
        let count_ok = |count: u64, max: u64| {
            if (1..=max).contains(&count) {
                Ok(())
            } else {
                Err(FaultError::Count { count, max })
            }
        };
        match self {
            Fault::CopyError {
                count,
                range,
                probability,
                ..
            } => {
                count_ok(*count, u64::MAX)?;
                if range.is_some_and(|r| r.len == 0) {
                    return Err(FaultError::EmptyRange);
                }
                if probability.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
                    return Err(FaultError::Probability);
                }
                Ok(())
            }
            Fault::Latency { us, count } => {
                if *us > 3_600_000_000 {
                    return Err(FaultError::TooLong("us"));
                }
                count.map_or(Ok(()), |c| count_ok(c, u64::MAX))
            }
            Fault::Bandwidth { bytes_per_sec: 0 } => Err(FaultError::ZeroBandwidth),
            Fault::Bandwidth { .. } | Fault::StallQueue => Ok(()),
            Fault::Ecc { bit, .. } if *bit > 7 => Err(FaultError::Bit(*bit)),
            Fault::Ecc { .. } => Ok(()),
            Fault::DropInterrupts { count } => count_ok(*count, u64::MAX),
            Fault::DelayInterrupts { ms, count } => {
                if *ms > 3_600_000 {
                    return Err(FaultError::TooLong("ms"));
                }
                count_ok(*count, u64::MAX)
            }
            Fault::SpuriousFaults { ctx, count, .. } | Fault::FaultStorm { ctx, count } => {
                ctx_ok(*ctx)?;
                count_ok(*count, MAX_INJECTED_EVENTS)
            }
        }
    }

    /// The arguments as the fault log shows them: `key=value`, in a fixed
    /// order, addresses in hex.
    pub fn args(&self) -> String {
        match self {
            Fault::CopyError {
                count,
                range,
                skip,
                probability,
            } => {
                let mut s = format!("count={count}");
                if let Some(r) = range {
                    s += &format!(" range={}", describe_range(r));
                }
                if *skip != 0 {
                    s += &format!(" skip={skip}");
                }
                if let Some(p) = probability {
                    s += &format!(" probability={p}");
                }
                s
            }
            Fault::Latency { us, count } => match count {
                Some(c) => format!("us={us} count={c}"),
                None => format!("us={us}"),
            },
            Fault::Bandwidth { bytes_per_sec } => format!("bytes_per_sec={bytes_per_sec}"),
            Fault::Ecc { offset, bit } => format!("offset={offset:#x} bit={bit}"),
            Fault::DropInterrupts { count } => format!("count={count}"),
            Fault::DelayInterrupts { ms, count } => format!("ms={ms} count={count}"),
            Fault::StallQueue => String::new(),
            Fault::SpuriousFaults { ctx, addr, count } => {
                format!("ctx={ctx} addr={addr:#x} count={count}")
            }
            Fault::FaultStorm { ctx, count } => format!("ctx={ctx} count={count}"),
        }
    }
}

/// The severity of an injected PCIe AER error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AerSeverity {
    /// Corrected by the link.
    Correctable,
    /// Uncorrectable, non-fatal.
    Nonfatal,
    /// Uncorrectable, fatal.
    Fatal,
}

/// A fault a running VM gets from the host side rather than from the
/// backend's catalogue ([`Fault`]): applied by `cargo xtask inject`
/// through QEMU or to the backend process (docs/fault-injection.md,
/// "Host-side faults"). Spelt like a [`Fault`], with `kind`; here so the
/// whole catalogue parses in one crate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostFault {
    /// The VRAM BAR's link fails (`down`) or comes back.
    LinkDown {
        /// Down (true) or up.
        down: bool,
    },
    /// SIGKILL of the GPU's backend.
    KillBackend {},
    /// A machine check at guest-physical `addr`.
    Mce {
        /// The guest-physical address.
        addr: u64,
    },
    /// A PCIe AER error.
    Aer {
        /// Its severity.
        error: AerSeverity,
    },
    /// An orderly hot-unplug; waits at most `timeout_s` seconds (at least
    /// 1) for the guest to release the device.
    Unplug {
        /// The wait, seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_s: Option<u64>,
    },
    /// Plugs the unplugged GPU back.
    Plug {},
}

impl HostFault {
    /// The `kind`s of host-side faults.
    pub const KINDS: [&'static str; 6] =
        ["link_down", "kill_backend", "mce", "aer", "unplug", "plug"];

    /// Whether `fault` (a JSON object) is a host-side fault by its `kind`
    /// (it may still be malformed).
    pub fn is_host_fault(fault: &serde_json::Value) -> bool {
        fault["kind"]
            .as_str()
            .is_some_and(|kind| Self::KINDS.contains(&kind))
    }

    /// Parses a host-side fault, checked.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, FaultError> {
        let fault = Self::deserialize(value)?;
        if let HostFault::Unplug { timeout_s: Some(0) } = fault {
            return Err(FaultError::ZeroTimeout);
        }
        Ok(fault)
    }
}

fn describe_range(r: &AddrRange) -> String {
    let space = match r.space {
        Space::Vram => "vram",
        Space::Guest => "guest",
    };
    format!("{space}:{:#x}+{:#x}", r.start, r.len)
}

fn describe_side(side: Phys) -> String {
    match side {
        Phys::Vram(at) => format!("vram:{at:#x}"),
        Phys::Guest(at) => format!("guest:{at:#x}"),
    }
}

/// The delay a bandwidth cap of `bytes_per_sec` imposes on a command that
/// moved `bytes`: bytes / bytes_per_sec seconds (rounded up to the
/// microsecond).
pub fn bandwidth_delay(bytes: u64, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return Duration::ZERO;
    }
    let us = (u128::from(bytes) * 1_000_000).div_ceil(u128::from(bytes_per_sec));
    Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX))
}

/// Counts of what injection did, reported by the control socket's `stats`
/// (under `"injected"`), not in the guest-visible COUNTERS block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedStats {
    /// Fault log lines written (the last `#N`).
    pub logged: u64,
    /// Faults injected through the control socket or a plan.
    pub injected: u64,
    /// Copies failed with COPY_ERROR.
    pub copy_errors: u64,
    /// Commands delayed by a latency fault.
    pub delayed_commands: u64,
    /// Commands slowed by a bandwidth cap.
    pub throttled_commands: u64,
    /// VRAM bits flipped.
    pub ecc_flips: u64,
    /// Command-queue interrupts not signalled.
    pub interrupts_dropped: u64,
    /// Command-queue interrupts signalled late.
    pub interrupts_delayed: u64,
    /// Times the command queue was stalled.
    pub queue_stalls: u64,
    /// Injected events (ECC, spurious faults, storms) posted.
    pub events_posted: u64,
    /// Injected events that found no event buffer.
    pub events_dropped: u64,
}

/// An armed fault.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActiveFault {
    /// Its id (for `clear`).
    pub id: u64,
    /// The fault, with its counts as they are now.
    pub fault: Fault,
}

/// Where fault log lines go besides stderr.
#[derive(Default)]
struct LogSinks {
    file: Option<File>,
    memory: Option<Vec<String>>,
    /// The device timeline.
    tracer: Option<Arc<Tracer>>,
}

/// The mutable state of a [`FaultInjector`].
struct State {
    next_id: u64,
    active: BTreeMap<u64, Fault>,
    /// Commands started since the device started (`at command M`).
    commands: u64,
    log_seq: u64,
    rng: SplitMix64,
    plan: Option<PlanState>,
    stalled: bool,
    pending: VecDeque<Fault>,
    stats: InjectedStats,
    /// Bumped by `clear` to cut sleeps short.
    generation: u64,
    sinks: LogSinks,
}

/// Faults armed at run time (by the control socket, a plan, or tests) and
/// the engine's [`FaultHooks`].
pub struct FaultInjector {
    state: Mutex<State>,
    wakeup: Condvar,
    vram: Mutex<Option<Arc<Vram>>>,
    /// Written when the queue worker has something to do outside a command
    /// (post injected events, resume after a stall is cleared).
    notify: Option<EventFd>,
    /// Whether log lines also go to stderr.
    stderr: bool,
}

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultInjector").finish_non_exhaustive()
    }
}

impl Default for FaultInjector {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                next_id: 1,
                active: BTreeMap::new(),
                commands: 0,
                log_seq: 0,
                rng: SplitMix64::new(0),
                plan: None,
                stalled: false,
                pending: VecDeque::new(),
                stats: InjectedStats::default(),
                generation: 0,
                sinks: LogSinks::default(),
            }),
            wakeup: Condvar::new(),
            vram: Mutex::new(None),
            notify: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .inspect_err(|e| error!("fault injection: creating the wakeup eventfd: {e}"))
                .ok(),
            stderr: true,
        }
    }
}

impl FaultInjector {
    /// An injector that can flip bits in `vram` (ECC faults).
    pub fn with_vram(vram: Arc<Vram>) -> Self {
        let injector = Self::default();
        *lock(&injector.vram) = Some(vram);
        injector
    }

    /// Keeps a copy of every fault log line in memory ([`Self::log_lines`]).
    pub fn capture_log(&self) {
        self.lock().sinks.memory.get_or_insert_with(Vec::new);
    }

    /// Silences the stderr copy of the log (tests with many faults).
    pub fn quiet(mut self) -> Self {
        self.stderr = false;
        self
    }

    /// Also writes the fault log to `path` (created or truncated).
    pub fn log_to_file(&self, path: &Path) -> io::Result<()> {
        let file = File::create(path)?;
        self.lock().sinks.file = Some(file);
        Ok(())
    }

    /// Also puts every fault log line on the device timeline.
    pub fn trace_to(&self, tracer: Arc<Tracer>) {
        self.lock().sinks.tracer = Some(tracer);
    }

    /// The log lines kept since [`Self::capture_log`].
    pub fn log_lines(&self) -> Vec<String> {
        self.lock().sinks.memory.clone().unwrap_or_default()
    }

    /// The eventfd the queue worker must poll (see
    /// `backend::register_wakeups`).
    pub fn notify_fd(&self) -> Option<RawFd> {
        self.notify.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn wake_worker(&self) {
        if let Some(fd) = &self.notify {
            if let Err(e) = fd.write(1) {
                warn!("fault injection: waking the queue worker: {e}");
            }
        }
    }

    /// Arms one copy-engine error: the next `n` copies (ranges of COPY or
    /// FILL, pieces of VREAD/VWRITE) succeed and the one after them fails
    /// with COPY_ERROR. With `n` = 0 the very next copy fails.
    pub fn copy_error_next(&self, n: u32) {
        let _ = self.inject(Fault::CopyError {
            count: 1,
            range: None,
            skip: u64::from(n),
            probability: None,
        });
    }

    /// Injects `fault`: faults with an immediate effect (ecc,
    /// spurious_faults, fault_storm) take it now, the others are armed.
    /// Returns its id.
    pub fn inject(&self, fault: Fault) -> Result<u64, FaultError> {
        fault.validate()?;
        let mut state = self.lock();
        self.inject_locked(&mut state, fault)
    }

    fn inject_locked(&self, state: &mut State, fault: Fault) -> Result<u64, FaultError> {
        let id = state.next_id;
        match &fault {
            Fault::Ecc { offset, bit } => {
                self.flip(*offset, *bit)?;
                state.stats.ecc_flips += 1;
                self.log(state, "ecc", &fault.args());
                state.pending.push_back(fault);
                self.wake_worker();
            }
            Fault::SpuriousFaults { .. } | Fault::FaultStorm { .. } => {
                self.log(state, fault.kind(), &fault.args());
                state.pending.push_back(fault);
                self.wake_worker();
            }
            Fault::StallQueue => {
                state.stalled = true;
                state.stats.queue_stalls += 1;
                self.log(state, "stall_queue", "");
                state.active.insert(id, fault);
            }
            _ => {
                state.active.insert(id, fault);
            }
        }
        state.next_id += 1;
        state.stats.injected += 1;
        Ok(id)
    }

    /// Flips bit `bit` of VRAM byte `offset`.
    fn flip(&self, offset: u64, bit: u8) -> Result<(), FaultError> {
        let vram = lock(&self.vram).clone().ok_or(FaultError::NoVram)?;
        let at = |source| FaultError::EccOffset { offset, source };
        let mut byte = [0u8];
        vram.read(offset, &mut byte).map_err(at)?;
        byte[0] ^= 1 << bit;
        vram.write(offset, &byte).map_err(at)
    }

    /// Disarms every fault, forgets the plan and pending events, and
    /// un-stalls the queue; returns how many armed faults went.
    pub fn clear(&self) -> usize {
        let mut state = self.lock();
        let n = state.active.len();
        state.active.clear();
        state.plan = None;
        state.pending.clear();
        let was_stalled = std::mem::take(&mut state.stalled);
        state.generation += 1;
        drop(state);
        self.wakeup.notify_all();
        if was_stalled {
            self.wake_worker();
        }
        n
    }

    /// Disarms fault `id`; false if no such fault is armed.
    pub fn clear_id(&self, id: u64) -> bool {
        let mut state = self.lock();
        let Some(fault) = state.active.remove(&id) else {
            return false;
        };
        let unstall =
            fault == Fault::StallQueue && !state.active.values().any(|f| *f == Fault::StallQueue);
        if unstall {
            state.stalled = false;
        }
        state.generation += 1;
        drop(state);
        self.wakeup.notify_all();
        if unstall {
            self.wake_worker();
        }
        true
    }

    /// The armed faults, by id.
    pub fn list(&self) -> Vec<ActiveFault> {
        self.lock()
            .active
            .iter()
            .map(|(&id, fault)| ActiveFault {
                id,
                fault: fault.clone(),
            })
            .collect()
    }

    /// Whether the command queue is stalled.
    pub fn stalled(&self) -> bool {
        self.lock().stalled
    }

    /// Plan entries that have not fired for the last time yet.
    pub fn plan_pending(&self) -> Option<usize> {
        self.lock().plan.as_ref().map(PlanState::pending)
    }

    /// What injection did so far.
    pub fn injected_stats(&self) -> InjectedStats {
        self.lock().stats
    }

    /// Loads `plan`: replaces any earlier plan, reseeds the generator with
    /// its seed and fires the entries due at once (no trigger, or
    /// `after_commands: 0`). Plan command counts start from here.
    pub fn load_plan(&self, plan: Plan) -> Result<(), PlanError> {
        plan.validate()?;
        let mut state = self.lock();
        state.rng = SplitMix64::new(plan.seed);
        let commands = state.commands;
        state.plan = Some(PlanState::new(plan, commands, Instant::now()));
        self.run_plan(&mut state);
        Ok(())
    }

    /// Fires the plan entries that are due.
    fn run_plan(&self, state: &mut State) {
        let Some(mut plan) = state.plan.take() else {
            return;
        };
        let due = plan.due(state.commands, Instant::now(), &mut state.rng);
        for fault in due {
            let args = fault.args();
            if let Err(e) = self.inject_locked(state, fault.clone()) {
                warn!("fault plan: {} {args}: {e}", fault.kind());
            }
        }
        state.plan = Some(plan);
    }

    /// Writes a fault log line.
    fn log(&self, state: &mut State, kind: &str, args: &str) {
        state.log_seq += 1;
        state.stats.logged = state.log_seq;
        let sep = if args.is_empty() { "" } else { " " };
        let line = format!(
            "fault #{}: {kind}{sep}{args} at command {}",
            state.log_seq, state.commands
        );
        if self.stderr {
            eprintln!("{line}");
        }
        if let Some(file) = &mut state.sinks.file {
            if let Err(e) = writeln!(file, "{line}").and_then(|()| file.flush()) {
                warn!("fault log: {e}");
            }
        }
        if let Some(tracer) = &state.sinks.tracer {
            tracer.record(Record::InjectedFault {
                ts: trace::now(),
                line: line.clone(),
            });
        }
        if let Some(lines) = &mut state.sinks.memory {
            lines.push(line);
        }
    }

    /// Sleeps `duration` unless `clear` is called meanwhile.
    fn sleep(&self, duration: Duration) {
        let state = self.lock();
        let generation = state.generation;
        let _unused = self
            .wakeup
            .wait_timeout_while(state, duration, |s| s.generation == generation);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether `op` moves data (latency and bandwidth apply to it).
fn moves_data(op: Option<Opcode>) -> bool {
    op.is_some_and(Opcode::moves_data)
}

impl FaultHooks for FaultInjector {
    fn before_copy(&self, copy: &CopyInfo) -> Option<InjectedFault> {
        let mut state = self.lock();
        let state = &mut *state;
        let mut fired = None;
        for (&id, fault) in state.active.iter_mut() {
            let Fault::CopyError {
                count,
                range,
                skip,
                probability,
            } = fault
            else {
                continue;
            };
            if let Some(r) = range {
                let src = copy.src.is_some_and(|s| r.touches(s, copy.len));
                if !src && !r.touches(copy.dst, copy.len) {
                    continue;
                }
            }
            if *skip > 0 {
                *skip -= 1;
                continue;
            }
            if let Some(p) = probability {
                if state.rng.next_f64() >= *p {
                    continue;
                }
            }
            *count -= 1;
            fired = Some((id, *count == 0));
            break;
        }
        let (id, done) = fired?;
        if done {
            state.active.remove(&id);
        }
        state.stats.copy_errors += 1;
        let src = copy.src.map(|s| format!("src={} ", describe_side(s)));
        let args = format!(
            "range={} {}dst={} len={:#x}",
            copy.index,
            src.unwrap_or_default(),
            describe_side(copy.dst),
            copy.len
        );
        self.log(state, "copy_error", &args);
        Some(InjectedFault::CopyError)
    }

    fn before_command(&self, op: Option<Opcode>) {
        let delay = {
            let mut state = self.lock();
            let state = &mut *state;
            state.commands += 1;
            if !moves_data(op) {
                return;
            }
            let mut delay = None;
            let mut done = None;
            for (&id, fault) in state.active.iter_mut() {
                if let Fault::Latency { us, count } = fault {
                    delay = Some(*us);
                    if let Some(c) = count {
                        *c -= 1;
                        if *c == 0 {
                            done = Some(id);
                        }
                    }
                    break;
                }
            }
            if let Some(id) = done {
                state.active.remove(&id);
            }
            let Some(us) = delay else {
                return;
            };
            state.stats.delayed_commands += 1;
            self.log(state, "latency", &format!("us={us}"));
            Duration::from_micros(us)
        };
        self.sleep(delay);
    }

    fn after_command(&self, op: Option<Opcode>, bytes: u64, elapsed: Duration) {
        let delay = {
            let mut state = self.lock();
            let cap = state.active.values().find_map(|f| match f {
                Fault::Bandwidth { bytes_per_sec } => Some(*bytes_per_sec),
                _ => None,
            });
            let delay = match cap {
                Some(bps) if moves_data(op) && bytes > 0 => {
                    let delay = bandwidth_delay(bytes, bps);
                    state.stats.throttled_commands += 1;
                    let args = format!(
                        "bytes_per_sec={bps} bytes={bytes} delay_us={}",
                        delay.as_micros()
                    );
                    self.log(&mut state, "bandwidth", &args);
                    delay.saturating_sub(elapsed)
                }
                _ => Duration::ZERO,
            };
            self.run_plan(&mut state);
            delay
        };
        if !delay.is_zero() {
            self.sleep(delay);
        }
    }

    fn take_events(&self, mmu: &Mmu) -> Vec<Event> {
        let pending: Vec<Fault> = self.lock().pending.drain(..).collect();
        let mut events = Vec::new();
        for fault in pending {
            match fault {
                Fault::Ecc { offset, bit } => events.push(Event {
                    kind: event::ECC,
                    ctx: 0,
                    addr: offset,
                    access: 0,
                    reason: u32::from(bit),
                    seq: 0,
                }),
                Fault::SpuriousFaults { ctx, addr, count } => {
                    events.extend((0..count).map(|_| fault_event(ctx, addr)));
                }
                Fault::FaultStorm { ctx, count } => {
                    let pages = ContextId::new(ctx)
                        .map(|ctx| mmu.mapped_pages(ctx, count as usize))
                        .unwrap_or_default();
                    events.extend((0..count).map(|i| {
                        let addr = if pages.is_empty() {
                            i * PAGE_SIZE
                        } else {
                            pages[(i % pages.len() as u64) as usize]
                        };
                        fault_event(ctx, addr)
                    }));
                }
                _ => {}
            }
        }
        events
    }

    fn events_posted(&self, posted: u64, dropped: u64) {
        let mut state = self.lock();
        state.stats.events_posted += posted;
        state.stats.events_dropped += dropped;
    }

    fn interrupt(&self) -> InterruptAction {
        let mut state = self.lock();
        let state = &mut *state;
        let mut action = None;
        for (&id, fault) in state.active.iter_mut() {
            let (count, act) = match fault {
                Fault::DropInterrupts { count } => (count, InterruptAction::Drop),
                Fault::DelayInterrupts { ms, count } => {
                    (count, InterruptAction::Delay(Duration::from_millis(*ms)))
                }
                _ => continue,
            };
            *count -= 1;
            action = Some((id, *count == 0, act));
            break;
        }
        let Some((id, done, act)) = action else {
            return InterruptAction::Signal;
        };
        if done {
            state.active.remove(&id);
        }
        match act {
            InterruptAction::Drop => {
                state.stats.interrupts_dropped += 1;
                self.log(state, "drop_interrupt", "queue=0");
            }
            InterruptAction::Delay(d) => {
                state.stats.interrupts_delayed += 1;
                self.log(
                    state,
                    "delay_interrupt",
                    &format!("queue=0 ms={}", d.as_millis()),
                );
            }
            InterruptAction::Signal => {}
        }
        act
    }

    fn queue_stalled(&self) -> bool {
        self.lock().stalled
    }

    fn acknowledge_wakeup(&self) {
        if let Some(fd) = &self.notify {
            // Non-blocking: WouldBlock when there was nothing to consume.
            let _ = fd.read();
        }
    }

    fn reset(&self) {
        let mut state = self.lock();
        if state.stalled {
            state.stalled = false;
            state.active.retain(|_, f| *f != Fault::StallQueue);
            info!("device reset: the command queue is no longer stalled");
        }
    }
}

fn fault_event(ctx: u32, addr: u64) -> Event {
    Event {
        kind: event::FAULT,
        ctx,
        addr,
        access: event::ACCESS_READ,
        reason: event::REASON_NOT_MAPPED,
        seq: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EventSink, GuestRam, NoEventQueue, Stats};
    use crate::plan::Plan;
    use hmmgpu_abi::{CmdHeader, Range, RangeFlags, Response, Status};

    const NONE: RangeFlags = RangeFlags::NONE;
    const DST_VRAM: RangeFlags = RangeFlags::DST_VRAM;
    const SRC_VRAM: RangeFlags = RangeFlags::SRC_VRAM;
    const MAP_READ: RangeFlags = RangeFlags::MAP_READ;
    const MAP_WRITE: RangeFlags = RangeFlags::MAP_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    const RAM: u64 = 0x10_0000;
    const RAM_LEN: usize = 0x10_0000;
    const VRAM_SIZE: u64 = 2 << 20;

    struct Fixture {
        _dir: tempfile::TempDir,
        mem: GuestRam,
        engine: Engine,
        faults: Arc<FaultInjector>,
        vram_path: std::path::PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vram_path = dir.path().join("vram");
        let vram = Arc::new(Vram::open(&vram_path, VRAM_SIZE).unwrap());
        let mem = GuestRam::from_ranges(&[(GuestAddress(RAM), RAM_LEN)]).unwrap();
        let faults = Arc::new(FaultInjector::with_vram(vram.clone()).quiet());
        faults.capture_log();
        let engine = Engine::new(vram, Arc::new(Stats::default()), faults.clone());
        Fixture {
            _dir: dir,
            mem,
            engine,
            faults,
            vram_path,
        }
    }

    fn range(src: u64, dst: u64, len: u32, flags: RangeFlags) -> Range {
        Range::new(src, dst, len, flags)
    }

    fn command(op: Opcode, ctx: u32, ranges: &[Range]) -> Vec<u8> {
        let header = CmdHeader::new(op, ctx, 1, ranges.len() as u32);
        let mut bytes = header.to_bytes().to_vec();
        for r in ranges {
            bytes.extend_from_slice(&r.to_bytes());
        }
        bytes
    }

    fn run(
        f: &mut Fixture,
        op: Opcode,
        ctx: u32,
        ranges: &[Range],
        events: &mut dyn EventSink,
    ) -> Response {
        f.engine
            .process(&f.mem, &command(op, ctx, ranges), 9, events)
            .response
            .expect("completed")
    }

    fn exec(f: &mut Fixture, op: Opcode, ranges: &[Range]) -> Response {
        run(f, op, 0, ranges, &mut NoEventQueue)
    }

    fn ok(bytes: u64) -> Response {
        Response::ok(bytes)
    }

    fn copy_error(index: u32, bytes: u64) -> Response {
        Response {
            status: Status::CopyError,
            failed_index: index,
            bytes,
        }
    }

    fn inject(f: &Fixture, json: serde_json::Value) -> u64 {
        f.faults.inject(Fault::from_json(&json).unwrap()).unwrap()
    }

    fn vram_bytes(f: &Fixture, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        f.engine.vram().read(offset, &mut buf).unwrap();
        buf
    }

    #[test]
    fn copy_error_on_the_next_copies() {
        let mut f = fixture();
        let to_vram = range(RAM, 0, 4096, DST_VRAM);
        inject(&f, serde_json::json!({"kind":"copy_error","count":2}));
        assert_eq!(exec(&mut f, Opcode::Copy, &[to_vram]), copy_error(0, 0));
        assert_eq!(
            exec(&mut f, Opcode::Fill, &[range(7, RAM, 64, NONE)]),
            copy_error(0, 0)
        );
        assert_eq!(exec(&mut f, Opcode::Copy, &[to_vram]), ok(4096));
        assert!(f.faults.list().is_empty(), "spent faults are disarmed");
        assert_eq!(f.faults.injected_stats().copy_errors, 2);
        assert_eq!(
            f.faults.log_lines(),
            [
                "fault #1: copy_error range=0 src=guest:0x100000 dst=vram:0x0 len=0x1000 at command 1",
                "fault #2: copy_error range=0 dst=guest:0x100000 len=0x40 at command 2",
            ]
        );
    }

    #[test]
    fn copy_error_on_a_range_keeps_the_partial_completion() {
        let mut f = fixture();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        f.mem.write_slice(&data, GuestAddress(RAM)).unwrap();
        // The second copy touching VRAM [0x2000, 0x3000) fails.
        inject(
            &f,
            serde_json::json!({"kind":"copy_error","range":{"space":"vram","start":0x2000,"len":0x1000},"skip":1}),
        );
        let outside = range(RAM, 0x8000, 4096, DST_VRAM);
        let inside = range(RAM + 4096, 0x2ff0, 0x20, DST_VRAM);
        assert_eq!(exec(&mut f, Opcode::Copy, &[outside]), ok(4096));
        assert_eq!(exec(&mut f, Opcode::Copy, &[inside]), ok(0x20), "skipped");
        let command = [outside, range(RAM, 0x1000, 4096, DST_VRAM), inside, outside];
        assert_eq!(exec(&mut f, Opcode::Copy, &command), copy_error(2, 8192));
        // Ranges before the failing one were done, it and later ones not.
        assert_eq!(vram_bytes(&f, 0x1000, 4096), data[..4096]);
        assert_eq!(
            f.engine.stats().snapshot().bytes_guest_to_vram,
            4096 * 3 + 0x20
        );
        // A copy *from* the range counts too; one out of it does not.
        inject(
            &f,
            serde_json::json!({"kind":"copy_error","range":{"space":"vram","start":0x2000,"len":0x1000}}),
        );
        assert_eq!(exec(&mut f, Opcode::Copy, &[outside]), ok(4096));
        let from = range(0x2800, RAM, 16, SRC_VRAM);
        assert_eq!(exec(&mut f, Opcode::Copy, &[from]), copy_error(0, 0));
    }

    #[test]
    fn copy_error_hits_device_mmu_accesses() {
        let mut f = fixture();
        let mut events = Vec::new();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 3) as u8).collect();
        f.engine.vram().write(0, &data).unwrap();
        assert_eq!(run(&mut f, Opcode::CtxCreate, 1, &[], &mut events), ok(0));
        let map = range(0, 0x7000_0000, 4096, SRC_VRAM | MAP_READ | MAP_WRITE);
        assert_eq!(run(&mut f, Opcode::Map, 1, &[map], &mut events), ok(0));
        // The guest buffer of the second range is in the fault's range.
        inject(
            &f,
            serde_json::json!({"kind":"copy_error","range":{"space":"guest","start":RAM + 0x8000,"len":1}}),
        );
        let reads = [
            range(0x7000_0000, RAM + 0x1000, 0x100, NONE),
            range(0x7000_0100, RAM + 0x8000, 0x100, NONE),
        ];
        assert_eq!(
            run(&mut f, Opcode::Vread, 1, &reads, &mut events),
            copy_error(1, 0x100)
        );
        let mut got = vec![0; 0x100];
        f.mem
            .read_slice(&mut got, GuestAddress(RAM + 0x1000))
            .unwrap();
        assert_eq!(got, data[..0x100]);
        // VWRITE: the next copy fails, into VRAM through the MMU.
        inject(&f, serde_json::json!({"kind":"copy_error"}));
        let write = [range(RAM, 0x7000_0000, 0x10, NONE)];
        assert_eq!(
            run(&mut f, Opcode::Vwrite, 1, &write, &mut events),
            copy_error(0, 0)
        );
        assert_eq!(
            run(&mut f, Opcode::Vwrite, 1, &write, &mut events),
            ok(0x10)
        );
        assert!(events.is_empty());
        assert!(f.faults.log_lines()[1].contains("src=guest:0x100000 dst=vram:0x0 len=0x10"));
    }

    #[test]
    fn probability_zero_never_fires_and_one_always_does() {
        let mut f = fixture();
        let copy = range(RAM, 0, 64, DST_VRAM);
        inject(
            &f,
            serde_json::json!({"kind":"copy_error","count":5,"probability":0.0}),
        );
        for _ in 0..20 {
            assert_eq!(exec(&mut f, Opcode::Copy, &[copy]), ok(64));
        }
        f.faults.clear();
        inject(
            &f,
            serde_json::json!({"kind":"copy_error","count":2,"probability":1.0}),
        );
        assert_eq!(
            exec(&mut f, Opcode::Copy, &[copy]).status,
            Status::CopyError
        );
        assert_eq!(
            exec(&mut f, Opcode::Copy, &[copy]).status,
            Status::CopyError
        );
        assert_eq!(exec(&mut f, Opcode::Copy, &[copy]), ok(64));
    }

    #[test]
    fn latency_delays_data_commands() {
        let mut f = fixture();
        inject(
            &f,
            serde_json::json!({"kind":"latency","us":30_000,"count":2}),
        );
        // Not a data-moving command: no delay, and the count is untouched.
        assert_eq!(exec(&mut f, Opcode::Nop, &[]), ok(0));
        for _ in 0..2 {
            let start = Instant::now();
            assert_eq!(exec(&mut f, Opcode::Fill, &[range(1, RAM, 8, NONE)]), ok(8));
            assert!(start.elapsed() >= Duration::from_millis(30));
        }
        assert!(f.faults.list().is_empty());
        assert_eq!(exec(&mut f, Opcode::Fill, &[range(1, RAM, 8, NONE)]), ok(8));
        assert_eq!(f.faults.injected_stats().delayed_commands, 2);
        assert_eq!(
            f.faults.log_lines(),
            [
                "fault #1: latency us=30000 at command 2",
                "fault #2: latency us=30000 at command 3"
            ]
        );
    }

    #[test]
    fn clear_cuts_a_latency_sleep_short() {
        let mut f = fixture();
        inject(&f, serde_json::json!({"kind":"latency","us":60_000_000u64}));
        let faults = f.faults.clone();
        let clearer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            faults.clear()
        });
        let start = Instant::now();
        assert_eq!(exec(&mut f, Opcode::Fill, &[range(1, RAM, 8, NONE)]), ok(8));
        assert!(start.elapsed() < Duration::from_secs(30));
        assert_eq!(clearer.join().unwrap(), 1);
    }

    #[test]
    fn bandwidth_cap_computes_the_delay() {
        assert_eq!(
            bandwidth_delay(1_000_000, 2_000_000),
            Duration::from_millis(500)
        );
        assert_eq!(bandwidth_delay(4096, 4096), Duration::from_secs(1));
        assert_eq!(bandwidth_delay(1, 3), Duration::from_micros(333_334));
        assert_eq!(bandwidth_delay(0, 5), Duration::ZERO);
        assert_eq!(
            bandwidth_delay(u64::MAX, 1),
            Duration::from_micros(u64::MAX)
        );
        let mut f = fixture();
        inject(
            &f,
            serde_json::json!({"kind":"bandwidth","bytes_per_sec":1_000_000}),
        );
        let start = Instant::now();
        assert_eq!(
            exec(&mut f, Opcode::Copy, &[range(RAM, 0, 50_000, DST_VRAM)]),
            ok(50_000)
        );
        assert!(start.elapsed() >= Duration::from_millis(50));
        // Commands that move nothing are not throttled.
        assert_eq!(exec(&mut f, Opcode::Nop, &[]), ok(0));
        assert_eq!(
            f.faults.log_lines(),
            ["fault #1: bandwidth bytes_per_sec=1000000 bytes=50000 delay_us=50000 at command 1"]
        );
    }

    #[test]
    fn ecc_flips_exactly_one_bit_and_posts_an_event() {
        let mut f = fixture();
        f.engine.vram().write(0x1234, &[0b1010_0101]).unwrap();
        let before = std::fs::read(&f.vram_path).unwrap();
        inject(
            &f,
            serde_json::json!({"kind":"ecc","offset":0x1234,"bit":3}),
        );
        let after = std::fs::read(&f.vram_path).unwrap();
        let diff: Vec<(usize, u8)> = before
            .iter()
            .zip(&after)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, a ^ b))
            .collect();
        assert_eq!(diff, [(0x1234, 1 << 3)]);
        assert_eq!(after[0x1234], 0b1010_1101);
        // The event goes out with the next post, numbered like faults.
        let mut events = Vec::new();
        assert_eq!(f.engine.post_injected(&mut events), 1);
        assert_eq!(
            events,
            [Event {
                kind: event::ECC,
                ctx: 0,
                addr: 0x1234,
                access: 0,
                reason: 3,
                seq: 1
            }]
        );
        // Without an event buffer it is dropped (the flip stays).
        inject(
            &f,
            serde_json::json!({"kind":"ecc","offset":VRAM_SIZE - 1,"bit":7}),
        );
        assert_eq!(f.engine.post_injected(&mut NoEventQueue), 0);
        let stats = f.faults.injected_stats();
        assert_eq!(
            (stats.ecc_flips, stats.events_posted, stats.events_dropped),
            (2, 1, 1)
        );
        assert_eq!(vram_bytes(&f, VRAM_SIZE - 1, 1), [0x80]);
        // Outside the VRAM: an error, nothing flipped.
        let bad = Fault::Ecc {
            offset: VRAM_SIZE,
            bit: 0,
        };
        f.faults.inject(bad).unwrap_err();
        assert_eq!(
            f.faults.log_lines(),
            [
                "fault #1: ecc offset=0x1234 bit=3 at command 0",
                "fault #2: ecc offset=0x1fffff bit=7 at command 0",
            ]
        );
    }

    #[test]
    fn interrupts_are_dropped_then_delayed_then_signalled() {
        let f = fixture();
        inject(&f, serde_json::json!({"kind":"drop_interrupts","count":2}));
        inject(
            &f,
            serde_json::json!({"kind":"delay_interrupts","ms":40,"count":1}),
        );
        let hooks: &dyn FaultHooks = &*f.faults;
        assert_eq!(hooks.interrupt(), InterruptAction::Drop);
        assert_eq!(hooks.interrupt(), InterruptAction::Drop);
        assert_eq!(
            hooks.interrupt(),
            InterruptAction::Delay(Duration::from_millis(40))
        );
        assert_eq!(hooks.interrupt(), InterruptAction::Signal);
        let stats = f.faults.injected_stats();
        assert_eq!((stats.interrupts_dropped, stats.interrupts_delayed), (2, 1));
        assert_eq!(
            f.faults.log_lines()[2],
            "fault #3: delay_interrupt queue=0 ms=40 at command 0"
        );
    }

    #[test]
    fn a_stall_lasts_until_reset() {
        let mut f = fixture();
        assert!(!f.engine.faults().queue_stalled());
        inject(&f, serde_json::json!({"kind":"stall_queue"}));
        assert!(f.engine.faults().queue_stalled());
        assert!(f.faults.stalled());
        assert_eq!(f.faults.list().len(), 1);
        f.engine.reset();
        assert!(!f.engine.faults().queue_stalled());
        assert!(f.faults.list().is_empty());
        // Only the stall goes with a reset; other faults stay armed.
        inject(&f, serde_json::json!({"kind":"stall_queue"}));
        inject(&f, serde_json::json!({"kind":"drop_interrupts"}));
        f.engine.faults().reset();
        assert_eq!(f.faults.list().len(), 1);
        assert_eq!(f.faults.injected_stats().queue_stalls, 2);
    }

    #[test]
    fn spurious_faults_and_storms_are_fault_events_without_a_parked_command() {
        let mut f = fixture();
        let mut events = Vec::new();
        run(&mut f, Opcode::CtxCreate, 2, &[], &mut events);
        let map = range(RAM, 0x40_0000, 3 * 4096, MAP_READ);
        run(&mut f, Opcode::Map, 2, &[map], &mut events);
        // A real fault first, to show the numbering is shared.
        let read = [range(0x50_0000, RAM + 0x8000, 8, NONE)];
        assert_eq!(
            f.engine
                .process(&f.mem, &command(Opcode::Vread, 2, &read), 5, &mut events)
                .response,
            None
        );
        run(&mut f, Opcode::Cancel, 2, &[], &mut events);
        inject(
            &f,
            serde_json::json!({"kind":"spurious_faults","ctx":2,"addr":0x40_1008,"count":2}),
        );
        inject(
            &f,
            serde_json::json!({"kind":"fault_storm","ctx":2,"count":5}),
        );
        assert_eq!(f.engine.post_injected(&mut events), 7);
        let got: Vec<(u32, u32, u64, u64)> = events
            .iter()
            .map(|e| (e.kind, e.ctx, e.addr, e.seq))
            .collect();
        assert_eq!(
            got,
            [
                (event::FAULT, 2, 0x50_0000, 1),
                (event::FAULT, 2, 0x40_1008, 2),
                (event::FAULT, 2, 0x40_1008, 3),
                (event::FAULT, 2, 0x40_0000, 4),
                (event::FAULT, 2, 0x40_1000, 5),
                (event::FAULT, 2, 0x40_2000, 6),
                (event::FAULT, 2, 0x40_0000, 7),
                (event::FAULT, 2, 0x40_1000, 8),
            ]
        );
        assert!(events[1..]
            .iter()
            .all(|e| e.access == event::ACCESS_READ && e.reason == event::REASON_NOT_MAPPED));
        // Nothing is parked: REPLAY answers BAD_CONTEXT, as the spec says.
        assert_eq!(f.engine.parked(), 0);
        assert_eq!(
            run(&mut f, Opcode::Replay, 2, &[], &mut events).status,
            Status::BadContext
        );
        // A storm on a context with nothing mapped uses page addresses from 0.
        inject(
            &f,
            serde_json::json!({"kind":"fault_storm","ctx":9,"count":2}),
        );
        let mut more = Vec::new();
        f.engine.post_injected(&mut more);
        assert_eq!(more.iter().map(|e| e.addr).collect::<Vec<_>>(), [0, 4096]);
        // Fewer buffers than events: the rest are dropped.
        struct Two(Vec<Event>);
        impl EventSink for Two {
            fn post(&mut self, event: &Event) -> bool {
                self.0.len() < 2 && {
                    self.0.push(*event);
                    true
                }
            }
        }
        inject(
            &f,
            serde_json::json!({"kind":"fault_storm","ctx":2,"count":100}),
        );
        let mut two = Two(Vec::new());
        assert_eq!(f.engine.post_injected(&mut two), 2);
        assert_eq!(f.faults.injected_stats().events_dropped, 98);
    }

    /// Runs a fixed workload of COPYs under `plan` and returns the log.
    fn replay(plan: &str) -> Vec<String> {
        let mut f = fixture();
        f.faults
            .load_plan(Plan::from_json_str(plan).unwrap())
            .unwrap();
        for i in 0..300u64 {
            let copy = range(RAM + (i % 16) * 4096, (i % 64) * 4096, 4096, DST_VRAM);
            let _ = exec(&mut f, Opcode::Copy, &[copy, copy]);
            let _ = f.faults.interrupt();
        }
        f.faults.log_lines()
    }

    #[test]
    fn plans_replay_deterministically_with_a_seed() {
        let plan = |seed: u64| {
            format!(
                r#"{{"seed": {seed}, "faults": [
                    {{"every_commands": 7, "probability": 0.5,
                      "fault": {{"kind": "copy_error", "count": 1}}}},
                    {{"fault": {{"kind": "copy_error", "count": 1000, "probability": 0.05,
                                 "range": {{"space": "vram", "start": 0, "len": 65536}}}}}},
                    {{"after_commands": 100, "every_commands": 20, "times": 5, "probability": 0.7,
                      "fault": {{"kind": "drop_interrupts"}}}},
                    {{"after_commands": 250, "fault": {{"kind": "ecc", "offset": 4096, "bit": 2}}}}
                ]}}"#
            )
        };
        let first = replay(&plan(1));
        assert!(first.len() > 20, "{first:#?}");
        assert_eq!(first, replay(&plan(1)), "same seed, same faults");
        assert_ne!(first, replay(&plan(2)), "another seed, other faults");
        for (i, line) in first.iter().enumerate() {
            assert!(line.starts_with(&format!("fault #{}: ", i + 1)), "{line}");
        }
        assert!(
            first
                .iter()
                .any(|l| l.ends_with(": ecc offset=0x1000 bit=2 at command 250")),
            "{first:#?}"
        );
    }

    #[test]
    fn host_faults_parse_strictly() {
        use serde_json::json;
        let ok = |v: serde_json::Value| HostFault::from_json(&v).unwrap();
        assert_eq!(
            ok(json!({"kind":"link_down","down":true})),
            HostFault::LinkDown { down: true }
        );
        assert_eq!(
            ok(json!({"kind":"kill_backend"})),
            HostFault::KillBackend {}
        );
        assert_eq!(
            ok(json!({"kind":"aer","error":"nonfatal"})),
            HostFault::Aer {
                error: AerSeverity::Nonfatal
            }
        );
        assert_eq!(
            ok(json!({"kind":"unplug"})),
            HostFault::Unplug { timeout_s: None }
        );
        assert_eq!(
            ok(json!({"kind":"mce","addr":4096})),
            HostFault::Mce { addr: 4096 }
        );
        for bad in [
            json!({"kind":"link_down"}),
            json!({"kind":"link_down","down":true,"x":1}),
            json!({"kind":"kill_backend","x":1}),
            json!({"kind":"aer","error":"bad"}),
            json!({"kind":"unplug","timeout_s":0}),
            json!({"kind":"plug","bus":"rp1"}),
            json!({"kind":"copy_error"}),
        ] {
            assert!(HostFault::from_json(&bad).is_err(), "{bad}");
        }
        for kind in HostFault::KINDS {
            assert!(HostFault::is_host_fault(&json!({ "kind": kind })));
        }
        assert!(!HostFault::is_host_fault(&json!({"kind":"copy_error"})));
    }

    /// A plan counts commands, not the slices a long one is cut into: a
    /// fault due after command 1 hits command 2 even when command 1 ran in
    /// many calls.
    #[test]
    fn plans_count_commands_not_slices() {
        use crate::engine::{Budget, Step};
        let mut f = fixture();
        f.faults
            .load_plan(
                Plan::from_json_str(
                    r#"{"faults":[{"after_commands":1,"fault":{"kind":"copy_error"}}]}"#,
                )
                .unwrap(),
            )
            .unwrap();
        let copy = command(Opcode::Copy, 0, &[range(RAM, 0, 0x8000, DST_VRAM)]);
        let mut slices = 1;
        let mut step = f.engine.process_budgeted(
            &f.mem,
            &copy,
            1,
            &mut NoEventQueue,
            &mut Budget::new(Budget::STEP_COST),
        );
        while step == Step::Suspended {
            slices += 1;
            step = f
                .engine
                .continue_suspended(&f.mem, &mut NoEventQueue, &mut Budget::new(1000));
        }
        let Step::Done(executed) = step else {
            unreachable!()
        };
        assert_eq!(executed.response, Some(ok(0x8000)), "after {slices} slices");
        assert!(slices > 10, "{slices}");
        assert_eq!(
            exec(&mut f, Opcode::Copy, &[range(RAM, 0, 8, DST_VRAM)]),
            copy_error(0, 0)
        );
    }

    #[test]
    fn the_fault_log_goes_to_a_file_too() {
        let mut f = fixture();
        let path = f._dir.path().join("faults.log");
        f.faults.log_to_file(&path).unwrap();
        inject(&f, serde_json::json!({"kind":"copy_error"}));
        let _ = exec(&mut f, Opcode::Copy, &[range(RAM, 0, 8, DST_VRAM)]);
        inject(&f, serde_json::json!({"kind":"stall_queue"}));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), f.faults.log_lines());
        assert_eq!(text.lines().count(), 2);
        assert!(
            text.ends_with("fault #2: stall_queue at command 1\n"),
            "{text}"
        );
    }
}
