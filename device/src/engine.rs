// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The device model: the copy engine and the device MMU executing one
//! decoded command (docs/device-spec.md, "Commands" and "Device MMU")
//! against guest RAM and the VRAM.
//!
//! It knows nothing of virtqueues: [`Engine::process`] takes the bytes of a
//! command (header and ranges), an opaque token naming it and an
//! [`EventSink`] standing for the event queue, and says what completed, so
//! it is tested here with plain guest memory and no vhost-user at all.
//!
//! Physical commands (COPY, FILL) have two passes. The first decodes and
//! validates every range (flags, guest ranges entirely inside guest RAM,
//! VRAM ranges entirely inside the VRAM, all with checked arithmetic); only
//! when the whole command is valid does the second pass move bytes. So
//! BAD_REQUEST, BAD_GUEST_ADDR and BAD_VRAM_RANGE never leave memory
//! half-modified; only an injected COPY_ERROR ([`FaultHooks`]) does, as the
//! spec allows. MAP validates every range the same way before installing
//! any translation.
//!
//! Device-virtual commands (VREAD, VWRITE, ATOMIC) validate their
//! guest-physical buffers up front, then translate page by page through the
//! [`Mmu`], copying each physically contiguous run of pages in one go. A
//! missing translation or permission is a device fault: the engine reports
//! an [`Event`] through the sink and *parks* the command with its progress
//! (range index, offset in the range, bytes done); REPLAY resumes it, CANCEL
//! and CTX_DESTROY complete it with FAULT. When the sink has no buffer, the
//! command completes with FAULT at once.

use std::cmp::min;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hmmgpu_abi::{
    counter, event, Access, AtomicOp, AtomicRange, CmdHeader, Command, ContextId, CopyRange,
    CountersRange, Event, FillRange, MapRange, Opcode, Phys, Range, Ranges, Response, Status,
    TransferRange, UnmapRange, MAX_RANGES,
};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory, VolatileSlice,
};

use crate::mmu::{self, Mmu};
use crate::trace::{self, CommandRecord, Moved, Outcome, Record, Tracer, Unpark};
use crate::vram::Vram;

/// Guest RAM as the vhost-user daemon maps it (no dirty-page bitmap).
pub type GuestRam = GuestMemoryMmap<()>;

/// Longest command the device reads: a header and [`MAX_RANGES`] ranges.
/// Bytes after that in a chain's readable part are ignored.
pub const MAX_COMMAND_LEN: usize = CmdHeader::SIZE + MAX_RANGES as usize * Range::SIZE;

/// FILL writes its pattern from a buffer of this many bytes (plus one
/// pattern's worth, so every start phase has a full chunk).
const FILL_CHUNK: usize = 64 * 1024;

/// Guest-caused warnings (failed commands, dropped chains) logged per
/// second at most; the rest are only counted, so a guest cannot flood the
/// host's log.
pub const GUEST_WARNINGS_PER_SEC: u64 = 10;

/// The device's counters ([`counter`] indices). Updated by the engine, read
/// by COUNTERS, the control socket, and printed when the daemon exits.
#[derive(Debug, Default)]
pub struct Stats {
    counters: [AtomicU64; counter::COUNT],
    /// Guest-caused errors, and how many of them were not logged.
    guest_errors: AtomicU64,
    guest_errors_unlogged: AtomicU64,
    /// The current one-second logging window: its start and lines logged.
    log_window: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

/// A copy of [`Stats`] at one moment, as the control socket reports it: one
/// field per [`counter::NAMES`] entry, same names, same order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Commands completed with status OK.
    pub commands_ok: u64,
    /// Commands completed with any other status, plus chains dropped for
    /// having no room for a response.
    pub commands_failed: u64,
    /// Bytes copied from guest RAM to VRAM.
    pub bytes_guest_to_vram: u64,
    /// Bytes copied from VRAM to guest RAM.
    pub bytes_vram_to_guest: u64,
    /// Bytes copied within the VRAM.
    pub bytes_vram_to_vram: u64,
    /// Bytes copied within guest RAM.
    pub bytes_guest_to_guest: u64,
    /// Bytes written by FILL, to guest RAM or VRAM.
    pub bytes_filled: u64,
    /// Device faults raised (reported or not).
    pub faults: u64,
    /// Ranges of completed UNMAP commands.
    pub invalidations: u64,
    /// Bytes read through the device MMU (VREAD).
    pub bytes_vread: u64,
    /// Bytes written through the device MMU (VWRITE).
    pub bytes_vwrite: u64,
    /// Atomics executed.
    pub atomics: u64,
    /// REPLAY commands that resumed a parked command.
    pub replays: u64,
    /// Faults that could not be reported for want of an event buffer.
    pub events_dropped: u64,
}

impl StatsSnapshot {
    /// The values in [`counter`] order.
    pub fn values(&self) -> [u64; counter::COUNT] {
        let mut v = [0; counter::COUNT];
        v[counter::COMMANDS_OK] = self.commands_ok;
        v[counter::COMMANDS_FAILED] = self.commands_failed;
        v[counter::BYTES_GUEST_TO_VRAM] = self.bytes_guest_to_vram;
        v[counter::BYTES_VRAM_TO_GUEST] = self.bytes_vram_to_guest;
        v[counter::BYTES_VRAM_TO_VRAM] = self.bytes_vram_to_vram;
        v[counter::BYTES_GUEST_TO_GUEST] = self.bytes_guest_to_guest;
        v[counter::BYTES_FILLED] = self.bytes_filled;
        v[counter::FAULTS] = self.faults;
        v[counter::INVALIDATIONS] = self.invalidations;
        v[counter::BYTES_VREAD] = self.bytes_vread;
        v[counter::BYTES_VWRITE] = self.bytes_vwrite;
        v[counter::ATOMICS] = self.atomics;
        v[counter::REPLAYS] = self.replays;
        v[counter::EVENTS_DROPPED] = self.events_dropped;
        v
    }

    /// From the values in [`counter`] order.
    pub fn from_values(v: [u64; counter::COUNT]) -> Self {
        Self {
            commands_ok: v[counter::COMMANDS_OK],
            commands_failed: v[counter::COMMANDS_FAILED],
            bytes_guest_to_vram: v[counter::BYTES_GUEST_TO_VRAM],
            bytes_vram_to_guest: v[counter::BYTES_VRAM_TO_GUEST],
            bytes_vram_to_vram: v[counter::BYTES_VRAM_TO_VRAM],
            bytes_guest_to_guest: v[counter::BYTES_GUEST_TO_GUEST],
            bytes_filled: v[counter::BYTES_FILLED],
            faults: v[counter::FAULTS],
            invalidations: v[counter::INVALIDATIONS],
            bytes_vread: v[counter::BYTES_VREAD],
            bytes_vwrite: v[counter::BYTES_VWRITE],
            atomics: v[counter::ATOMICS],
            replays: v[counter::REPLAYS],
            events_dropped: v[counter::EVENTS_DROPPED],
        }
    }
}

impl Stats {
    /// Counter `index` ([`counter`]).
    pub fn get(&self, index: usize) -> u64 {
        self.counters
            .get(index)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Adds `n` to counter `index`.
    pub fn add(&self, index: usize, n: u64) {
        if let Some(c) = self.counters.get(index) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Every counter, in [`counter`] order.
    pub fn values(&self) -> [u64; counter::COUNT] {
        std::array::from_fn(|i| self.get(i))
    }

    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot::from_values(self.values())
    }

    /// The block COUNTERS writes: little-endian u64s at index × 8, the rest
    /// zero.
    pub fn block(&self) -> [u8; counter::BLOCK_SIZE] {
        let mut block = [0u8; counter::BLOCK_SIZE];
        for (chunk, value) in block.chunks_exact_mut(8).zip(self.values()) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        block
    }

    /// Counts a command that failed before the engine could execute it (a
    /// chain without room for a response, or whose command is unreadable).
    pub fn count_failed(&self) {
        self.add(counter::COMMANDS_FAILED, 1);
    }

    /// Counts an error the guest caused and logs it as a warning, unless
    /// [`GUEST_WARNINGS_PER_SEC`] were logged in the last second already;
    /// the first line of the next second says how many were left out.
    pub fn guest_error(&self, message: std::fmt::Arguments<'_>) {
        self.guest_errors.fetch_add(1, Ordering::Relaxed);
        let now = std::time::Instant::now();
        let mut window = self
            .log_window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, logged) = window.get_or_insert((now, 0));
        if now.duration_since(*start) >= std::time::Duration::from_secs(1) {
            let unlogged = logged.saturating_sub(GUEST_WARNINGS_PER_SEC);
            if unlogged > 0 {
                warn!("{unlogged} more guest errors in the last second were not logged");
            }
            (*start, *logged) = (now, 0);
        }
        *logged += 1;
        if *logged <= GUEST_WARNINGS_PER_SEC {
            warn!("{message}");
        } else {
            self.guest_errors_unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Guest-caused errors so far, and how many of them were not logged.
    pub fn guest_errors(&self) -> (u64, u64) {
        (
            self.guest_errors.load(Ordering::Relaxed),
            self.guest_errors_unlogged.load(Ordering::Relaxed),
        )
    }

    fn count_completion(&self, status: Status) {
        self.add(
            if status == Status::Ok {
                counter::COMMANDS_OK
            } else {
                counter::COMMANDS_FAILED
            },
            1,
        );
    }

    fn count_bytes(&self, op: Op, src: Phys, dst: Phys, bytes: u64) {
        let index = match (op, src, dst) {
            (Op::Fill, _, _) => counter::BYTES_FILLED,
            (Op::Copy, Phys::Guest(_), Phys::Vram(_)) => counter::BYTES_GUEST_TO_VRAM,
            (Op::Copy, Phys::Vram(_), Phys::Guest(_)) => counter::BYTES_VRAM_TO_GUEST,
            (Op::Copy, Phys::Vram(_), Phys::Vram(_)) => counter::BYTES_VRAM_TO_VRAM,
            (Op::Copy, Phys::Guest(_), Phys::Guest(_)) => counter::BYTES_GUEST_TO_GUEST,
        };
        self.add(index, bytes);
    }
}

// ---------------------------------------------------------------------------
// Fault injection hook points.
//
// The engine asks its `FaultHooks` before each copy (a range of COPY/FILL, a
// physically contiguous piece of a VREAD/VWRITE range), before and after
// each command, and for injected events to post; the vhost-user glue asks
// it whether to signal an interrupt and whether the command queue is
// stalled. `FaultInjector` (crate::faults) is the implementation the
// control socket and fault plans arm; `NoFaults` does nothing.
// ---------------------------------------------------------------------------

pub use crate::faults::FaultInjector;

/// A fault the copy engine should suffer instead of executing a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// The copy fails with COPY_ERROR; it and everything after it in its
    /// command are not executed, what came before was.
    CopyError,
}

/// One copy the engine is about to execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyInfo {
    /// Index of the range within its command.
    pub index: u32,
    /// Source (`None` for FILL).
    pub src: Option<Phys>,
    /// Destination.
    pub dst: Phys,
    /// Bytes.
    pub len: u64,
}

/// What to do with an interrupt the command queue is about to signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptAction {
    /// Signal it now.
    Signal,
    /// Do not signal it (the used ring is updated all the same).
    Drop,
    /// Signal it after this long.
    Delay(std::time::Duration),
}

/// Consulted by the engine and the vhost-user glue at fixed points. Every
/// method but `before_copy` has a do-nothing default.
pub trait FaultHooks: Send + Sync {
    /// Called before a copy is executed; `None` lets it run.
    fn before_copy(&self, copy: &CopyInfo) -> Option<InjectedFault>;

    /// Called before each command (`op`: its opcode, `None` when its header
    /// is short or names none) is executed; may block to model latency.
    fn before_command(&self, _op: Option<Opcode>) {}

    /// Called after each command executed (completed or parked): it moved
    /// `bytes` and took `elapsed`. May block to model a bandwidth cap.
    fn after_command(&self, _op: Option<Opcode>, _bytes: u64, _elapsed: std::time::Duration) {}

    /// Injected events waiting to be posted (their `seq` is assigned by the
    /// engine); `mmu` tells which addresses contexts map.
    fn take_events(&self, _mmu: &Mmu) -> Vec<Event> {
        Vec::new()
    }

    /// How many of the events [`FaultHooks::take_events`] returned were
    /// posted, and how many found no buffer.
    fn events_posted(&self, _posted: u64, _dropped: u64) {}

    /// Called when the command queue is about to signal an interrupt.
    fn interrupt(&self) -> InterruptAction {
        InterruptAction::Signal
    }

    /// Whether the device must take no commands from the command queue.
    fn queue_stalled(&self) -> bool {
        false
    }

    /// Device reset (RESET_DEVICE, or the front end stopping the command
    /// queue): ends a stall.
    fn reset(&self) {}

    /// The queue worker was woken through the injector's eventfd (see
    /// `backend::register_wakeups`): consume the wakeup.
    fn acknowledge_wakeup(&self) {}
}

/// No faults: the default.
#[derive(Debug, Default)]
pub struct NoFaults;

impl FaultHooks for NoFaults {
    fn before_copy(&self, _copy: &CopyInfo) -> Option<InjectedFault> {
        None
    }
}

// ---------------------------------------------------------------------------
// The event queue, as the engine sees it, and what a command produced.
// ---------------------------------------------------------------------------

/// Where device faults are reported: the event queue.
pub trait EventSink {
    /// Writes `event` into the next event buffer; false when there is none
    /// (the fault then cannot be reported).
    fn post(&mut self, event: &Event) -> bool;
}

/// An event queue without buffers: every fault completes its command with
/// FAULT at once.
#[derive(Debug, Default)]
pub struct NoEventQueue;

impl EventSink for NoEventQueue {
    fn post(&mut self, _event: &Event) -> bool {
        false
    }
}

/// An endless event queue collecting the events (for tests and tools).
impl EventSink for Vec<Event> {
    fn post(&mut self, event: &Event) -> bool {
        self.push(*event);
        true
    }
}

/// A command that completed, named by the token it was submitted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token given to [`Engine::process`] with the command.
    pub token: u64,
    /// Its response.
    pub response: Response,
}

/// What [`Engine::process`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Executed {
    /// A parked command that this one completed (REPLAY, CANCEL,
    /// CTX_DESTROY). Completing it before this one keeps its result visible
    /// to the driver by the time it sees this command complete.
    pub resumed: Option<Completion>,
    /// This command's response; `None` when it was parked on a device
    /// fault (its completion comes later, as some command's `resumed`).
    pub response: Option<Response>,
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// What a physical command does with each range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Copy,
    Fill,
}

/// A COPY or FILL range, as the copy engine executes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PhysRange {
    op: Op,
    /// The source (COPY) or the pattern (FILL, as `Phys::Guest`, unused).
    src: Phys,
    pattern: u64,
    dst: Phys,
    len: u32,
}

impl From<CopyRange> for PhysRange {
    fn from(r: CopyRange) -> Self {
        Self {
            op: Op::Copy,
            src: r.src,
            pattern: 0,
            dst: r.dst,
            len: r.len,
        }
    }
}

impl From<FillRange> for PhysRange {
    fn from(r: FillRange) -> Self {
        Self {
            op: Op::Fill,
            src: Phys::Guest(0),
            pattern: r.pattern,
            dst: r.dst,
            len: r.len,
        }
    }
}

/// Whether guest-physical `[addr, addr + len)` is entirely guest RAM. It may
/// span several adjacent memory regions, but no hole.
fn guest_contains(mem: &GuestRam, addr: u64, len: u32) -> bool {
    addr.checked_add(u64::from(len)).is_some()
        && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize)
}

/// Index `index` of a command's ranges as a `failed_index` (below
/// MAX_RANGES, so it fits).
fn index_u32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// The engine.
// ---------------------------------------------------------------------------

/// How much work one call of the queue handler may do before it lets go of
/// the device (so that the front end's config-space reads and the vhost-user
/// protocol are answered in time however long a guest's command is): bytes
/// moved, with every command, range and device-MMU piece costing at least
/// [`Budget::STEP_COST`], and, for the worker, a deadline, so the time a call
/// takes does not depend on how fast the host copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    left: u64,
    deadline: Option<std::time::Instant>,
    /// A piece of data was moved in this call: the deadline applies only
    /// then, so every call makes progress however slow the host.
    moved: bool,
}

impl Budget {
    /// Bytes one call of the queue handler may spend.
    pub const PER_CALL: u64 = 16 << 20;
    /// Time one call of the queue handler may take (checked between pieces
    /// of at most [`Budget::TIMED_PIECE`] bytes).
    pub const CALL_TIME: std::time::Duration = std::time::Duration::from_millis(5);
    /// The largest piece moved at once under a deadline.
    pub const TIMED_PIECE: u64 = 256 << 10;
    /// The least a command, a range or a piece costs, however small.
    pub const STEP_COST: u64 = 4096;

    /// A budget of `bytes`, with no deadline (tests, tools).
    pub const fn new(bytes: u64) -> Self {
        Self {
            left: bytes,
            deadline: None,
            moved: false,
        }
    }

    /// No limit (tests, tools).
    pub const fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// One call of the queue worker: [`Budget::PER_CALL`] bytes, at most
    /// [`Budget::CALL_TIME`] from now.
    pub fn per_call() -> Self {
        Self {
            left: Self::PER_CALL,
            deadline: Some(std::time::Instant::now() + Self::CALL_TIME),
            moved: false,
        }
    }

    /// Whether nothing is left.
    pub fn exhausted(&self) -> bool {
        self.left == 0
            || self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
    }

    /// How many of `wanted` bytes may be moved now (at least 1 when not
    /// exhausted).
    fn grant(&self, wanted: u64) -> u64 {
        let piece = if self.deadline.is_some() {
            Self::TIMED_PIECE
        } else {
            u64::MAX
        };
        wanted.min(self.left).min(piece)
    }

    /// Spends `bytes` (at least [`Budget::STEP_COST`]).
    pub fn spend(&mut self, bytes: u64) {
        self.left = self.left.saturating_sub(bytes.max(Self::STEP_COST));
    }

    /// Spends a piece of `bytes` of data moved.
    fn spend_piece(&mut self, bytes: u64) {
        self.moved = true;
        self.spend(bytes);
    }
}

/// How far a command got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    /// Range being executed.
    index: u32,
    /// Bytes of that range done.
    offset: u32,
    /// Bytes of the command done.
    bytes: u64,
}

/// The work of a device-virtual command.
#[derive(Clone, Debug)]
enum VirtualWork {
    /// VREAD (`write` false) or VWRITE.
    Transfer {
        write: bool,
        ranges: Vec<TransferRange>,
    },
    /// ATOMIC.
    Atomic(AtomicRange),
}

impl VirtualWork {
    fn access(&self) -> Access {
        match self {
            VirtualWork::Transfer { write: true, .. } => Access::WRITE,
            VirtualWork::Transfer { write: false, .. } => Access::READ,
            VirtualWork::Atomic(_) => Access::ATOMIC,
        }
    }
}

/// What a data-moving command does, owned so it can be suspended (out of
/// budget) or parked (on a device fault).
#[derive(Clone, Debug)]
enum Work {
    /// COPY or FILL, every range already checked against memory.
    Physical(Vec<PhysRange>),
    /// VREAD, VWRITE or ATOMIC on a context.
    Virtual(ContextId, VirtualWork),
}

/// A data-moving command under way.
struct Job {
    token: u64,
    tag: u64,
    work: Work,
    progress: Progress,
}

/// A command that ran out of budget; it goes on at the next call of
/// [`Engine::continue_suspended`]. At most one: commands run in order.
struct Suspended {
    job: Job,
    /// The REPLAY that resumed this (parked) job: it completes, OK, once
    /// the job completes or parks again.
    replay: Option<(u64, u64)>,
    /// Its opcode, for the fault hooks.
    op: Option<Opcode>,
    /// When it started and the byte counters' total then, for the fault
    /// hooks' `after_command` when it ends.
    started: std::time::Instant,
    bytes_before: u64,
}

/// What one slice of a job came to.
enum JobEnd {
    /// It completed with this response.
    Done(Response),
    /// It faulted, the fault was reported and the job is parked.
    Parked,
    /// The budget ran out; here is the job, to go on later.
    OutOfBudget(Job),
}

/// Why a command stopped before its end.
enum Stop {
    /// A device fault at `addr`.
    Fault { addr: u64, reason: u32 },
    /// Any other failure: this status.
    Failed(Status),
    /// The budget ran out (the progress says where).
    Budget,
}

impl From<Status> for Stop {
    fn from(status: Status) -> Self {
        Stop::Failed(status)
    }
}

/// What [`Engine::process_budgeted`] and [`Engine::continue_suspended`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The command completed or parked.
    Done(Executed),
    /// The budget ran out in the middle of the command; call
    /// [`Engine::continue_suspended`] (and take no other command) until it
    /// is done.
    Suspended,
}

/// The copy engine and device MMU of one device.
pub struct Engine {
    vram: Arc<Vram>,
    stats: Arc<Stats>,
    faults: Arc<dyn FaultHooks>,
    mmu: Mmu,
    parked: HashMap<ContextId, Job>,
    suspended: Option<Suspended>,
    /// Sequence number of the last event reported.
    last_seq: u64,
    /// The device timeline, when one is recorded ([`Engine::set_tracer`]).
    tracer: Option<Arc<Tracer>>,
    /// The command under way as the timeline will show it (at most one:
    /// commands run in order).
    traced: Option<CommandTrace>,
}

/// What the timeline records of the command under way.
struct CommandTrace {
    start: u64,
    request: Box<[u8]>,
    moved: Moved,
    slices: u32,
    /// REPLAY, CANCEL, CTX_DESTROY: the tag of the parked command taken.
    resumed_tag: Option<u64>,
}

impl Engine {
    /// An engine working on `vram`, counting into `stats`, asking `faults`
    /// before each COPY/FILL range, with an empty MMU.
    pub fn new(vram: Arc<Vram>, stats: Arc<Stats>, faults: Arc<dyn FaultHooks>) -> Self {
        Self::with_mmu(vram, stats, faults, Mmu::default())
    }

    /// Like [`Engine::new`] with the given MMU (e.g. a smaller entry cap).
    pub fn with_mmu(
        vram: Arc<Vram>,
        stats: Arc<Stats>,
        faults: Arc<dyn FaultHooks>,
        mmu: Mmu,
    ) -> Self {
        Self {
            vram,
            stats,
            faults,
            mmu,
            parked: HashMap::new(),
            suspended: None,
            last_seq: 0,
            tracer: None,
            traced: None,
        }
    }

    /// Records the device timeline into `tracer` from now on.
    pub fn set_tracer(&mut self, tracer: Arc<Tracer>) {
        self.tracer = Some(tracer);
    }

    /// The timeline's recorder, when one is recorded.
    pub fn tracer(&self) -> Option<&Arc<Tracer>> {
        self.tracer.as_ref()
    }

    /// The VRAM.
    pub fn vram(&self) -> &Arc<Vram> {
        &self.vram
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The device MMU.
    pub fn mmu(&self) -> &Mmu {
        &self.mmu
    }

    /// The fault hooks.
    pub fn faults(&self) -> &Arc<dyn FaultHooks> {
        &self.faults
    }

    /// Number of commands parked on device faults.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Whether a command is suspended (out of budget).
    pub fn has_suspended(&self) -> bool {
        self.suspended.is_some()
    }

    /// Device reset: drops every context, every parked command and the
    /// suspended one (whose chains the caller forgets too; they are never
    /// completed).
    pub fn reset(&mut self) {
        self.trace_forgotten();
        self.mmu.clear();
        self.parked.clear();
        self.suspended = None;
        self.faults.reset();
    }

    /// The command queue stopped (its ring is reset or paused): forgets the
    /// parked commands and the suspended one, whose chains the caller
    /// forgets too (never completed: a later REPLAY, CANCEL or CTX_DESTROY
    /// of their context finds nothing parked). Contexts and their mappings
    /// stay. Returns how many were forgotten.
    pub fn forget_parked(&mut self) -> usize {
        self.trace_forgotten();
        let n = self.parked.len() + usize::from(self.suspended.is_some());
        self.parked.clear();
        self.suspended = None;
        n
    }

    /// Posts a RESTARTED event (see [`event::RESTARTED`]); whether an event
    /// buffer took it.
    pub fn post_restarted(&mut self, events: &mut dyn EventSink) -> bool {
        let event = Event {
            kind: event::RESTARTED,
            seq: self.last_seq + 1,
            ..Event::default()
        };
        let posted = events.post(&event);
        if posted {
            self.last_seq += 1;
        }
        posted
    }

    /// Posts the injected events the fault hooks have waiting (ECC,
    /// spurious faults, storms), numbering them like device faults; those
    /// that find no buffer are dropped. Returns how many were posted.
    pub fn post_injected(&mut self, events: &mut dyn EventSink) -> u64 {
        let injected = self.faults.take_events(&self.mmu);
        if injected.is_empty() {
            return 0;
        }
        let (mut posted, mut dropped) = (0, 0);
        for mut event in injected {
            // After the first failure the queue has no buffer left: the
            // rest are dropped without trying.
            event.seq = self.last_seq + 1;
            let was_posted = dropped == 0 && events.post(&event);
            if was_posted {
                self.last_seq += 1;
                posted += 1;
            } else {
                dropped += 1;
            }
            if let Some(tracer) = &self.tracer {
                tracer.record(Record::InjectedEvent {
                    ts: trace::now(),
                    event,
                    posted: was_posted,
                });
            }
        }
        if dropped > 0 {
            warn!("{dropped} injected events dropped: no event buffer");
        }
        self.faults.events_posted(posted, dropped);
        posted
    }

    /// Bytes moved so far (the byte counters added up), for bandwidth caps.
    fn bytes_moved(&self) -> u64 {
        [
            counter::BYTES_GUEST_TO_VRAM,
            counter::BYTES_VRAM_TO_GUEST,
            counter::BYTES_VRAM_TO_VRAM,
            counter::BYTES_GUEST_TO_GUEST,
            counter::BYTES_FILLED,
            counter::BYTES_VREAD,
            counter::BYTES_VWRITE,
        ]
        .iter()
        .map(|&i| self.stats.get(i))
        .fold(0u64, u64::wrapping_add)
    }

    /// Executes the command encoded in `request` (a [`CmdHeader`] followed
    /// by its ranges; trailing bytes are ignored) to its end. `token` names
    /// it if it parks; `events` is where device faults are reported.
    pub fn process(
        &mut self,
        mem: &GuestRam,
        request: &[u8],
        token: u64,
        events: &mut dyn EventSink,
    ) -> Executed {
        let mut step = self.process_budgeted(mem, request, token, events, &mut Budget::unlimited());
        loop {
            match step {
                Step::Done(executed) => return executed,
                Step::Suspended => {
                    step = self.continue_suspended(mem, events, &mut Budget::unlimited());
                }
            }
        }
    }

    /// Executes a command when there is no event queue (so nothing parks)
    /// and returns its response: [`Engine::process`] with [`NoEventQueue`].
    pub fn execute(&mut self, mem: &GuestRam, request: &[u8]) -> Response {
        self.process(mem, request, 0, &mut NoEventQueue)
            .response
            .unwrap_or(Response::failed(Status::Fault, 0))
    }

    /// Starts the command in `request`, spending at most `budget`; when it
    /// runs out, the command is suspended ([`Step::Suspended`]).
    pub fn process_budgeted(
        &mut self,
        mem: &GuestRam,
        request: &[u8],
        token: u64,
        events: &mut dyn EventSink,
        budget: &mut Budget,
    ) -> Step {
        // The header only names the command in logs and for the fault
        // hooks; decode checks it.
        let header = CmdHeader::from_bytes(request);
        let tag = header.map_or(0, |header| header.tag);
        let op = header.and_then(|header| Opcode::try_from(header.opcode).ok());
        self.faults.before_command(op);
        if self.tracer.is_some() {
            self.traced = Some(CommandTrace {
                start: trace::now(),
                request: request.get(..MAX_COMMAND_LEN).unwrap_or(request).into(),
                moved: Moved::default(),
                slices: 1,
                resumed_tag: None,
            });
        }
        budget.spend(Budget::STEP_COST);
        let started = std::time::Instant::now();
        let bytes_before = self.bytes_moved();
        let step = match Command::decode(request) {
            Ok(command) => self.dispatch(mem, command, token, tag, op, events, budget),
            Err(rejected) => {
                let response = Response::failed(rejected.status, rejected.failed_index);
                self.finish(tag, response);
                Step::Done(Executed {
                    resumed: None,
                    response: Some(response),
                })
            }
        };
        self.end_slice(step, op, bytes_before, started, events);
        step
    }

    /// Goes on with the suspended command, spending at most `budget`.
    /// Without one, does nothing and says `Done` with nothing completed.
    pub fn continue_suspended(
        &mut self,
        mem: &GuestRam,
        events: &mut dyn EventSink,
        budget: &mut Budget,
    ) -> Step {
        let Some(Suspended {
            job,
            replay,
            op,
            started,
            bytes_before,
        }) = self.suspended.take()
        else {
            return Step::Done(Executed::default());
        };
        if let Some(traced) = &mut self.traced {
            traced.slices += 1;
        }
        let step = self.run(mem, job, replay, op, events, budget);
        self.end_slice(step, op, bytes_before, started, events);
        step
    }

    /// After each slice of work: the injected events; and when the command
    /// ended (completed or parked), the fault hooks' `after_command`
    /// (bandwidth cap, plan), once per command as without slices.
    fn end_slice(
        &mut self,
        step: Step,
        op: Option<Opcode>,
        bytes_before: u64,
        started: std::time::Instant,
        events: &mut dyn EventSink,
    ) {
        match (step, self.suspended.as_mut()) {
            (Step::Suspended, Some(suspended)) => {
                // Carried to the command's end.
                suspended.started = started;
                suspended.bytes_before = bytes_before;
            }
            _ => {
                let moved = self.bytes_moved().wrapping_sub(bytes_before);
                self.faults.after_command(op, moved, started.elapsed());
                if let Step::Done(executed) = step {
                    self.trace_command(executed);
                }
            }
        }
        self.post_injected(events);
    }

    /// Records the command that just ended (completed or parked).
    fn trace_command(&mut self, executed: Executed) {
        let (Some(tracer), Some(traced)) = (&self.tracer, self.traced.take()) else {
            return;
        };
        let outcome = executed
            .response
            .map_or(Outcome::Parked, Outcome::Completed);
        tracer.record(Record::Command(Box::new(CommandRecord {
            start: traced.start,
            end: trace::now(),
            request: traced.request,
            outcome,
            moved: traced.moved,
            slices: traced.slices,
            resumed: traced
                .resumed_tag
                .map(|tag| (tag, executed.resumed.map(|c| c.response))),
        })));
    }

    /// Records the parked commands and the suspended one that a reset or a
    /// queue stop is about to drop.
    fn trace_forgotten(&mut self) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        let ts = trace::now();
        for (ctx, job) in &self.parked {
            tracer.record(Record::Unparked {
                ts,
                ctx: ctx.get(),
                tag: job.tag,
                how: Unpark::Forgotten,
            });
        }
        if let Some(traced) = self.traced.take() {
            tracer.record(Record::Command(Box::new(CommandRecord {
                start: traced.start,
                end: ts,
                request: traced.request,
                outcome: Outcome::Forgotten,
                moved: traced.moved,
                slices: traced.slices,
                resumed: None,
            })));
        }
    }

    /// Records that the parked command `job` of `ctx` was taken by the
    /// command under way (`how`).
    fn trace_unpark(&mut self, ctx: ContextId, job: &Job, how: Unpark) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        tracer.record(Record::Unparked {
            ts: trace::now(),
            ctx: ctx.get(),
            tag: job.tag,
            how,
        });
        if let Some(traced) = &mut self.traced {
            traced.resumed_tag = Some(job.tag);
        }
    }

    /// Counts and logs a completion.
    fn finish(&self, tag: u64, response: Response) {
        self.stats.count_completion(response.status);
        if response.status == Status::Ok {
            debug!("command tag {tag:#x}: ok, {} bytes", response.bytes);
        } else {
            self.stats.guest_error(format_args!(
                "command tag {tag:#x}: {} at range {} after {} bytes",
                response.status.name(),
                response.failed_index,
                response.bytes
            ));
        }
    }

    /// Runs a slice of `job` (for `replay`, the REPLAY that resumed it) and
    /// settles what it came to.
    fn run(
        &mut self,
        mem: &GuestRam,
        job: Job,
        replay: Option<(u64, u64)>,
        op: Option<Opcode>,
        events: &mut dyn EventSink,
        budget: &mut Budget,
    ) -> Step {
        let (token, tag) = (job.token, job.tag);
        let end = self.run_job(mem, job, events, budget);
        let own = match end {
            JobEnd::OutOfBudget(job) => {
                // (`end_slice` sets when the command started.)
                self.suspended = Some(Suspended {
                    job,
                    replay,
                    op,
                    started: std::time::Instant::now(),
                    bytes_before: 0,
                });
                return Step::Suspended;
            }
            JobEnd::Done(response) => {
                self.finish(tag, response);
                Some(Completion { token, response })
            }
            JobEnd::Parked => {
                debug!("command tag {tag:#x}: parked on a device fault");
                None
            }
        };
        Step::Done(match replay {
            // The REPLAY completes once what it resumed completed or parked.
            Some((_, replay_tag)) => {
                let response = Response::ok(0);
                self.finish(replay_tag, response);
                Executed {
                    resumed: own,
                    response: Some(response),
                }
            }
            None => Executed {
                resumed: None,
                response: own.map(|c| c.response),
            },
        })
    }

    /// Executes a decoded command.
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &mut self,
        mem: &GuestRam,
        command: Command<'_>,
        token: u64,
        tag: u64,
        op: Option<Opcode>,
        events: &mut dyn EventSink,
        budget: &mut Budget,
    ) -> Step {
        let ok = Response::ok(0);
        let bad_context = Response::failed(Status::BadContext, 0);
        match command {
            // Completing in order is all a fence needs.
            Command::Nop => self.immediate(tag, ok, None),
            Command::Copy(ranges) => {
                let ranges = ranges.iter().map(PhysRange::from).collect();
                self.start_physical(mem, ranges, token, tag, op, events, budget)
            }
            Command::Fill(ranges) => {
                let ranges = ranges.iter().map(PhysRange::from).collect();
                self.start_physical(mem, ranges, token, tag, op, events, budget)
            }
            Command::Counters(range) => {
                let response = self.counters(mem, range).map_or_else(|e| e, Response::ok);
                self.immediate(tag, response, None)
            }
            Command::CtxCreate(ctx) => {
                let response = if self.mmu.create(ctx) {
                    ok
                } else {
                    bad_context
                };
                self.immediate(tag, response, None)
            }
            Command::CtxDestroy(ctx) => {
                if self.mmu.destroy(ctx) {
                    let resumed = self.cancel_parked(ctx, Opcode::CtxDestroy);
                    self.immediate(tag, ok, resumed)
                } else {
                    self.immediate(tag, bad_context, None)
                }
            }
            Command::Map(ctx, ranges) => {
                let response = self.map(mem, ctx, ranges).unwrap_or_else(|e| e);
                self.immediate(tag, response, None)
            }
            Command::Unmap(ctx, ranges) => {
                let response = self.unmap(ctx, ranges).unwrap_or_else(|e| e);
                self.immediate(tag, response, None)
            }
            Command::Vread(ctx, ranges) | Command::Vwrite(ctx, ranges) => {
                let write = matches!(command, Command::Vwrite(..));
                let work = VirtualWork::Transfer {
                    write,
                    ranges: ranges.iter().collect(),
                };
                self.start_virtual(mem, ctx, work, token, tag, op, events, budget)
            }
            Command::Atomic(ctx, range) => {
                let work = VirtualWork::Atomic(range);
                self.start_virtual(mem, ctx, work, token, tag, op, events, budget)
            }
            Command::Replay(ctx) => match self.parked.remove(&ctx) {
                Some(job) => {
                    self.trace_unpark(ctx, &job, Unpark::Replay);
                    self.stats.add(counter::REPLAYS, 1);
                    self.run(mem, job, Some((token, tag)), op, events, budget)
                }
                None => self.immediate(tag, bad_context, None),
            },
            Command::Cancel(ctx) => match self.cancel_parked(ctx, Opcode::Cancel) {
                Some(completion) => self.immediate(tag, ok, Some(completion)),
                None => self.immediate(tag, bad_context, None),
            },
        }
    }

    /// A command that completed at once.
    fn immediate(&self, tag: u64, response: Response, resumed: Option<Completion>) -> Step {
        self.finish(tag, response);
        Step::Done(Executed {
            resumed,
            response: Some(response),
        })
    }

    /// Completes the parked command of `ctx`, if any, with FAULT.
    fn cancel_parked(&mut self, ctx: ContextId, by: Opcode) -> Option<Completion> {
        let job = self.parked.remove(&ctx)?;
        self.trace_unpark(ctx, &job, Unpark::Cancel(by));
        let response = Response {
            status: Status::Fault,
            failed_index: job.progress.index,
            bytes: job.progress.bytes,
        };
        self.finish(job.tag, response);
        Some(Completion {
            token: job.token,
            response,
        })
    }

    /// Runs `job` from its progress until it completes, parks or the budget
    /// runs out.
    fn run_job(
        &mut self,
        mem: &GuestRam,
        mut job: Job,
        events: &mut dyn EventSink,
        budget: &mut Budget,
    ) -> JobEnd {
        let before = job.progress;
        let result = match &job.work {
            Work::Physical(ranges) => self
                .physical(mem, ranges, &mut job.progress, budget)
                .map(|()| job.progress.bytes),
            Work::Virtual(ctx, VirtualWork::Atomic(range)) => {
                budget.spend(Budget::STEP_COST);
                self.atomic(mem, *ctx, range)
            }
            Work::Virtual(ctx, VirtualWork::Transfer { write, ranges }) => self
                .transfer(mem, *ctx, *write, ranges, &mut job.progress, budget)
                .map(|()| job.progress.bytes),
        };
        let progress = job.progress;
        if let Some(traced) = &mut self.traced {
            traced
                .moved
                .add(&moved_between(&job.work, before, progress));
        }
        let stopped = |status| Response {
            status,
            failed_index: progress.index,
            bytes: progress.bytes,
        };
        match result {
            Ok(bytes) => JobEnd::Done(Response::ok(bytes)),
            Err(Stop::Budget) => JobEnd::OutOfBudget(job),
            Err(Stop::Failed(status)) => JobEnd::Done(stopped(status)),
            Err(Stop::Fault { addr, reason }) => {
                let Work::Virtual(ctx, work) = &job.work else {
                    // Physical commands translate nothing.
                    return JobEnd::Done(stopped(Status::Fault));
                };
                let ctx = *ctx;
                self.stats.add(counter::FAULTS, 1);
                let event = Event {
                    kind: event::FAULT,
                    ctx: ctx.get(),
                    addr,
                    access: work.access().bits(),
                    reason,
                    seq: self.last_seq + 1,
                };
                let posted = events.post(&event);
                if let Some(tracer) = &self.tracer {
                    tracer.record(Record::Fault {
                        ts: trace::now(),
                        event,
                        parked: posted.then_some(job.tag),
                    });
                }
                if posted {
                    self.last_seq += 1;
                    debug!("device fault reported: {event:?}");
                    self.parked.insert(ctx, job);
                    JobEnd::Parked
                } else {
                    self.stats.add(counter::EVENTS_DROPPED, 1);
                    self.stats.guest_error(format_args!(
                        "device fault {event:?} not reported: no event buffer"
                    ));
                    JobEnd::Done(stopped(Status::Fault))
                }
            }
        }
    }

    // -- Physical commands ---------------------------------------------------

    /// COPY or FILL: every range is checked against memory before any byte
    /// moves; then the ranges run as a job.
    #[allow(clippy::too_many_arguments)]
    fn start_physical(
        &mut self,
        mem: &GuestRam,
        ranges: Vec<PhysRange>,
        token: u64,
        tag: u64,
        op: Option<Opcode>,
        events: &mut dyn EventSink,
        budget: &mut Budget,
    ) -> Step {
        for (index, range) in ranges.iter().enumerate() {
            if let Err(status) = self.validate(mem, range) {
                return self.immediate(tag, Response::failed(status, index_u32(index)), None);
            }
        }
        let job = Job {
            token,
            tag,
            work: Work::Physical(ranges),
            progress: Progress::default(),
        };
        self.run(mem, job, None, op, events, budget)
    }

    /// Executes `ranges` from `progress` on, a piece of at most the budget
    /// at a time. A copy error (fault injection) is asked for when a range
    /// starts.
    fn physical(
        &self,
        mem: &GuestRam,
        ranges: &[PhysRange],
        progress: &mut Progress,
        budget: &mut Budget,
    ) -> Result<(), Stop> {
        while let Some(range) = ranges.get(progress.index as usize) {
            // Checked before the copy-error hook, so a range is asked about
            // once, not again when it resumes.
            if budget.exhausted() {
                return Err(Stop::Budget);
            }
            if progress.offset == 0 {
                let copy = CopyInfo {
                    index: progress.index,
                    src: (range.op == Op::Copy).then_some(range.src),
                    dst: range.dst,
                    len: u64::from(range.len),
                };
                if let Some(InjectedFault::CopyError) = self.faults.before_copy(&copy) {
                    return Err(Stop::Failed(Status::CopyError));
                }
            }
            while progress.offset < range.len {
                if budget.exhausted() {
                    return Err(Stop::Budget);
                }
                let rest = u64::from(range.len - progress.offset);
                // At most the rest of the range, which fits in u32.
                let n = u32::try_from(budget.grant(rest)).unwrap_or(u32::MAX);
                self.execute_piece(mem, range, progress.offset, n)?;
                budget.spend_piece(u64::from(n));
                progress.offset += n;
                progress.bytes += u64::from(n);
            }
            budget.spend(Budget::STEP_COST);
            progress.index += 1;
            progress.offset = 0;
        }
        Ok(())
    }

    /// Checks that `len` bytes at `side` are inside guest RAM or the VRAM.
    fn check_side(&self, mem: &GuestRam, side: Phys, len: u32) -> Result<(), Status> {
        match side {
            _ if len == 0 => Ok(()),
            Phys::Guest(addr) if !guest_contains(mem, addr, len) => Err(Status::BadGuestAddr),
            Phys::Vram(offset) if !self.vram.contains(offset, u64::from(len)) => {
                Err(Status::BadVramRange)
            }
            _ => Ok(()),
        }
    }

    /// Checks one range of a COPY or FILL against memory (a FILL has no
    /// source side; a COPY's source is checked first).
    fn validate(&self, mem: &GuestRam, range: &PhysRange) -> Result<(), Status> {
        if range.op == Op::Copy {
            self.check_side(mem, range.src, range.len)?;
        }
        self.check_side(mem, range.dst, range.len)
    }

    /// The volatile slices `[side, side + len)` consists of: one for VRAM,
    /// one per guest memory region crossed for guest RAM.
    fn slices<'a>(
        &'a self,
        mem: &'a GuestRam,
        side: Phys,
        len: u32,
    ) -> Result<Vec<VolatileSlice<'a>>, Status> {
        match side {
            Phys::Vram(offset) => self
                .vram
                .slice(offset, u64::from(len))
                .map(|slice| vec![slice])
                .map_err(|_| Status::BadVramRange),
            Phys::Guest(addr) => {
                GuestMemoryBackend::get_slices(mem, GuestAddress(addr), len as usize)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| Status::BadGuestAddr)
            }
        }
    }

    /// Executes `len` bytes of a validated range from `offset` on. Errors
    /// here would mean validation missed something: they are reported, not
    /// panicked on.
    fn execute_piece(
        &self,
        mem: &GuestRam,
        range: &PhysRange,
        offset: u32,
        len: u32,
    ) -> Result<(), Status> {
        if len == 0 {
            return Ok(());
        }
        let at = |side: Phys| side.offset(u64::from(offset)).ok_or(Status::CopyError);
        let dst = self.slices(mem, at(range.dst)?, len)?;
        match range.op {
            Op::Copy => copy_slices(&self.slices(mem, at(range.src)?, len)?, &dst)?,
            // The pattern's phase goes on from where the range is.
            Op::Fill => fill_slices(&dst, range.pattern, offset as usize)?,
        }
        self.stats
            .count_bytes(range.op, range.src, range.dst, u64::from(len));
        Ok(())
    }

    /// COUNTERS: writes the counter block to the range's guest buffer;
    /// returns the bytes written.
    fn counters(&self, mem: &GuestRam, range: CountersRange) -> Result<u64, Response> {
        if !guest_contains(mem, range.dst, range.len) {
            return Err(Response::failed(Status::BadGuestAddr, 0));
        }
        let block = self.stats.block();
        if let Err(e) = mem.write_slice(&block, GuestAddress(range.dst)) {
            error!("COUNTERS: writing the block after validation: {e}");
            return Err(Response::failed(Status::BadGuestAddr, 0));
        }
        Ok(counter::BLOCK_SIZE as u64)
    }

    // -- Device MMU ------------------------------------------------------------

    /// MAP: every range's physical side is checked before any is installed.
    fn map(
        &mut self,
        mem: &GuestRam,
        ctx: ContextId,
        ranges: Ranges<'_, MapRange>,
    ) -> Result<Response, Response> {
        if !self.mmu.exists(ctx) {
            return Err(Response::failed(Status::BadContext, 0));
        }
        let mut maps = Vec::with_capacity(ranges.len());
        for (index, m) in ranges.iter().enumerate() {
            // The length is at most u32::MAX (it came from a range).
            let len = u32::try_from(m.len).unwrap_or(u32::MAX);
            self.check_side(mem, m.phys, len)
                .map_err(|status| Response::failed(status, index_u32(index)))?;
            maps.push(m);
        }
        match self.mmu.map(ctx, &maps) {
            Ok(()) => Ok(Response::ok(0)),
            Err(Some(index)) => {
                warn!(
                    "MAP: more than {} translation entries refused",
                    mmu::MAX_ENTRIES
                );
                Err(Response::failed(Status::BadRequest, index_u32(index)))
            }
            Err(None) => Err(Response::failed(Status::BadContext, 0)),
        }
    }

    /// UNMAP: every overlapping translation goes.
    fn unmap(
        &mut self,
        ctx: ContextId,
        ranges: Ranges<'_, UnmapRange>,
    ) -> Result<Response, Response> {
        if !self.mmu.exists(ctx) {
            return Err(Response::failed(Status::BadContext, 0));
        }
        let mut removed = 0;
        for range in ranges.iter() {
            removed += self.mmu.unmap(ctx, range.va, range.len).unwrap_or(0);
        }
        debug!("UNMAP ctx {}: {removed} entries removed", ctx.get());
        self.stats.add(counter::INVALIDATIONS, ranges.len() as u64);
        Ok(Response::ok(0))
    }

    /// Starts VREAD, VWRITE or ATOMIC: the context must exist and have
    /// nothing parked, the guest buffers must be guest RAM.
    #[allow(clippy::too_many_arguments)]
    fn start_virtual(
        &mut self,
        mem: &GuestRam,
        ctx: ContextId,
        work: VirtualWork,
        token: u64,
        tag: u64,
        op: Option<Opcode>,
        events: &mut dyn EventSink,
        budget: &mut Budget,
    ) -> Step {
        if !self.mmu.exists(ctx) || self.parked.contains_key(&ctx) {
            return self.immediate(tag, Response::failed(Status::BadContext, 0), None);
        }
        if let VirtualWork::Transfer { ranges, .. } = &work {
            for (index, range) in ranges.iter().enumerate() {
                if let Err(status) = self.check_side(mem, Phys::Guest(range.buffer), range.len) {
                    return self.immediate(tag, Response::failed(status, index_u32(index)), None);
                }
            }
        }
        let job = Job {
            token,
            tag,
            work: Work::Virtual(ctx, work),
            progress: Progress::default(),
        };
        self.run(mem, job, None, op, events, budget)
    }

    /// The longest run from `va` (at most `len` bytes, at least one byte)
    /// that translates for `access` to physically contiguous memory.
    fn piece(
        &self,
        ctx: ContextId,
        va: u64,
        len: u64,
        access: Access,
    ) -> Result<(Phys, u64), Stop> {
        let first = self
            .mmu
            .translate(ctx, va, access)
            .map_err(|fault| Stop::Fault {
                addr: va,
                reason: fault.reason,
            })?;
        let mut n = min(first.len, len);
        while n < len {
            // va + n cannot overflow: decode checked the range fits.
            match self.mmu.translate(ctx, va + n, access) {
                Ok(next) if Some(next.phys) == first.phys.offset(n) => {
                    n += min(next.len, len - n);
                }
                _ => break,
            }
        }
        Ok((first.phys, n))
    }

    /// VREAD (`write` false) or VWRITE from `progress` on, updating it.
    fn transfer(
        &self,
        mem: &GuestRam,
        ctx: ContextId,
        write: bool,
        ranges: &[TransferRange],
        progress: &mut Progress,
        budget: &mut Budget,
    ) -> Result<(), Stop> {
        let access = if write { Access::WRITE } else { Access::READ };
        while let Some(range) = ranges.get(progress.index as usize) {
            while progress.offset < range.len {
                if budget.exhausted() {
                    return Err(Stop::Budget);
                }
                let done = u64::from(progress.offset);
                let rest = u64::from(range.len - progress.offset);
                let (phys, n) = self.piece(ctx, range.va + done, budget.grant(rest), access)?;
                // n <= the rest of the range, which fits in u32.
                let n32 = u32::try_from(n).unwrap_or(u32::MAX);
                let buffer = Phys::Guest(range.buffer + done);
                let (src, dst) = if write {
                    (buffer, phys)
                } else {
                    (phys, buffer)
                };
                let copy = CopyInfo {
                    index: progress.index,
                    src: Some(src),
                    dst,
                    len: n,
                };
                if let Some(InjectedFault::CopyError) = self.faults.before_copy(&copy) {
                    return Err(Stop::Failed(Status::CopyError));
                }
                let from = self.slices(mem, src, n32)?;
                let to = self.slices(mem, dst, n32)?;
                copy_slices(&from, &to)?;
                self.stats.add(
                    if write {
                        counter::BYTES_VWRITE
                    } else {
                        counter::BYTES_VREAD
                    },
                    n,
                );
                budget.spend_piece(n);
                progress.offset += n32;
                progress.bytes += n;
            }
            budget.spend(Budget::STEP_COST);
            progress.index += 1;
            progress.offset = 0;
        }
        Ok(())
    }

    /// ATOMIC on the word at the range's `va`; returns the old value.
    fn atomic(&self, mem: &GuestRam, ctx: ContextId, range: &AtomicRange) -> Result<u64, Stop> {
        let target = self
            .mmu
            .translate(ctx, range.va, Access::ATOMIC)
            .map_err(|fault| Stop::Fault {
                addr: range.va,
                reason: fault.reason,
            })?;
        // One slice: the word is 8-aligned and regions are page aligned.
        let slices = self.slices(mem, target.phys, 8)?;
        let [slice] = slices.as_slice() else {
            error!("ATOMIC: word at {:?} spans memory regions", target.phys);
            return Err(Stop::Failed(Status::CopyError));
        };
        let old = atomic_op(slice, range.op, range.operand)?;
        self.stats.add(counter::ATOMICS, 1);
        Ok(old)
    }
}

/// The bytes a job moved from progress `from` to `to`, by direction, as
/// the timeline reports them: worked out from its ranges (independently of
/// the counters, which count each piece as it is copied).
fn moved_between(work: &Work, from: Progress, to: Progress) -> Moved {
    let mut moved = Moved::default();
    match work {
        Work::Physical(ranges) => {
            for index in from.index..=to.index {
                let Some(range) = ranges.get(index as usize) else {
                    break;
                };
                let start = if index == from.index { from.offset } else { 0 };
                let end = if index == to.index {
                    to.offset
                } else {
                    range.len
                };
                let src = (range.op == Op::Copy).then_some(range.src);
                moved.add_copy(src, range.dst, u64::from(end.saturating_sub(start)));
            }
        }
        Work::Virtual(_, VirtualWork::Transfer { write, .. }) => {
            let bytes = to.bytes.saturating_sub(from.bytes);
            if *write {
                moved.bytes_vwrite += bytes;
            } else {
                moved.bytes_vread += bytes;
            }
        }
        Work::Virtual(_, VirtualWork::Atomic(_)) => {}
    }
    moved
}

/// Applies `op` with `operand` to the little-endian u64 in `slice` (8
/// bytes) as one host atomic instruction on the shared mapping (so it is
/// atomic against the guest's CPUs too), returning the old value.
/// vm-memory hands out the `&AtomicU64` after checking size and alignment.
fn atomic_op(slice: &VolatileSlice<'_>, op: AtomicOp, operand: u64) -> Result<u64, Status> {
    let word: &AtomicU64 = slice.get_atomic_ref(0).map_err(internal_error)?;
    let old = match op {
        AtomicOp::Xchg => word.swap(operand.to_le(), Ordering::SeqCst),
        AtomicOp::Add if cfg!(target_endian = "little") => {
            word.fetch_add(operand, Ordering::SeqCst)
        }
        // The word is little-endian in memory: add in host order.
        AtomicOp::Add => word
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(u64::from_le(v).wrapping_add(operand).to_le())
            })
            .unwrap_or_else(|v| v),
    };
    Ok(u64::from_le(old))
}

/// Copies the bytes of `src` (a list of slices read as one stream) to `dst`,
/// in as few memmoves as the region boundaries allow. Both lists hold the
/// same number of bytes (validation made sure).
fn copy_slices(src: &[VolatileSlice<'_>], dst: &[VolatileSlice<'_>]) -> Result<(), Status> {
    let (mut si, mut so, mut di, mut doff) = (0, 0, 0, 0);
    while let (Some(s), Some(d)) = (src.get(si), dst.get(di)) {
        let n = min(s.len() - so, d.len() - doff);
        let from = s.subslice(so, n).map_err(internal_error)?;
        let to = d.subslice(doff, n).map_err(internal_error)?;
        from.copy_to_volatile_slice(to);
        so += n;
        doff += n;
        if so == s.len() {
            si += 1;
            so = 0;
        }
        if doff == d.len() {
            di += 1;
            doff = 0;
        }
    }
    Ok(())
}

/// Writes the little-endian bytes of `pattern`, repeated, over the stream of
/// slices `dst`, which starts `start` bytes into its range; the pattern's
/// phase carries over slice boundaries, so the byte at range position `i`
/// is `pattern.to_le_bytes()[i % 8]`.
fn fill_slices(dst: &[VolatileSlice<'_>], pattern: u64, start: usize) -> Result<(), Status> {
    const PAT: usize = std::mem::size_of::<u64>();
    let total: usize = dst.iter().map(|slice| slice.len()).sum();
    // Only as big as this range needs: a command of many small ranges must
    // not build a 64 KiB buffer for each.
    let chunk_len = min(total, FILL_CHUNK) + PAT;
    let mut chunk = Vec::with_capacity(chunk_len.next_multiple_of(PAT));
    chunk.extend_from_slice(&pattern.to_le_bytes());
    // Doubling: a few copies, not one per 8 bytes (pieces are small under
    // a deadline, and this runs once per piece).
    while chunk.len() < chunk_len {
        let more = chunk
            .len()
            .min(chunk_len.next_multiple_of(PAT) - chunk.len());
        chunk.extend_from_within(..more);
    }
    let mut written = start % PAT;
    for slice in dst {
        let mut off = 0;
        while off < slice.len() {
            let n = min(slice.len() - off, FILL_CHUNK);
            let phase = written % PAT;
            let bytes = chunk.get(phase..phase + n).ok_or(Status::CopyError)?;
            slice
                .subslice(off, n)
                .map_err(internal_error)?
                .copy_from(bytes);
            off += n;
            written += n;
        }
    }
    Ok(())
}

fn internal_error(e: vm_memory::VolatileMemoryError) -> Status {
    error!("copy engine: slice arithmetic failed after validation: {e}");
    Status::CopyError
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmmgpu_abi::{RangeFlags, Status};

    use vm_memory::Bytes;

    const NONE: RangeFlags = RangeFlags::NONE;
    const DST_VRAM: RangeFlags = RangeFlags::DST_VRAM;
    const SRC_VRAM: RangeFlags = RangeFlags::SRC_VRAM;
    const OK: Response = Response::ok(0);
    const BAD_CONTEXT: Response = Response::failed(Status::BadContext, 0);

    const VRAM_SIZE: u64 = 2 << 20;
    /// Two adjacent regions, then a hole, then a third region.
    const RAM0: u64 = 0x10_0000;
    const RAM_LEN: usize = 0x10_0000;
    const RAM1: u64 = RAM0 + RAM_LEN as u64;
    const RAM2: u64 = 0x100_0000;

    struct Fixture {
        _dir: tempfile::TempDir,
        mem: GuestRam,
        engine: Engine,
        faults: Arc<FaultInjector>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vram = Arc::new(Vram::open(&dir.path().join("vram"), VRAM_SIZE).unwrap());
        let mem = GuestRam::from_ranges(&[
            (GuestAddress(RAM0), RAM_LEN),
            (GuestAddress(RAM1), RAM_LEN),
            (GuestAddress(RAM2), RAM_LEN),
        ])
        .unwrap();
        let faults = Arc::new(FaultInjector::default());
        let engine = Engine::new(vram, Arc::new(Stats::default()), faults.clone());
        Fixture {
            _dir: dir,
            mem,
            engine,
            faults,
        }
    }

    fn command(op: impl Into<u32>, ranges: &[Range]) -> Vec<u8> {
        let header = CmdHeader {
            opcode: op.into(),
            ctx: 0,
            tag: 0x7a9,
            count: ranges.len() as u32,
            reserved: 0,
        };
        let mut bytes = header.to_bytes().to_vec();
        for range in ranges {
            bytes.extend_from_slice(&range.to_bytes());
        }
        bytes
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn guest(mem: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn vram(f: &Fixture, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        f.engine.vram().read(offset, &mut buf).unwrap();
        buf
    }

    fn ok(bytes: u64) -> Response {
        Response::ok(bytes)
    }

    fn range(src: u64, dst: u64, len: u32, flags: RangeFlags) -> Range {
        Range::new(src, dst, len, flags)
    }

    /// Snapshot of all guest RAM and VRAM, to show a failed command changed nothing.
    fn everything(f: &Fixture) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        (
            guest(&f.mem, RAM0, 2 * RAM_LEN),
            guest(&f.mem, RAM2, RAM_LEN),
            vram(f, 0, VRAM_SIZE as usize),
        )
    }

    #[test]
    fn nop_completes() {
        let mut f = fixture();
        assert_eq!(f.engine.execute(&f.mem, &command(Opcode::Nop, &[])), ok(0));
        assert_eq!(f.engine.stats().snapshot().commands_ok, 1);
    }

    #[test]
    fn copies_in_all_four_directions() {
        let mut f = fixture();
        let data = pattern(10_000, 3);
        f.mem
            .write_slice(&data, GuestAddress(RAM0 + 0x100))
            .unwrap();
        let ranges = [
            range(RAM0 + 0x100, 0x2000, 10_000, DST_VRAM), // guest -> VRAM
            range(0x2000, 0x10_0000, 10_000, SRC_VRAM | DST_VRAM), // VRAM -> VRAM
            range(0x10_0000, RAM2 + 7, 10_000, SRC_VRAM),  // VRAM -> guest
            range(RAM2 + 7, RAM0 + 0x8000, 10_000, NONE),  // guest -> guest
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Copy, &ranges)),
            ok(40_000)
        );
        assert_eq!(vram(&f, 0x2000, 10_000), data);
        assert_eq!(vram(&f, 0x10_0000, 10_000), data);
        assert_eq!(guest(&f.mem, RAM2 + 7, 10_000), data);
        assert_eq!(guest(&f.mem, RAM0 + 0x8000, 10_000), data);
        let stats = f.engine.stats().snapshot();
        assert_eq!(
            stats,
            StatsSnapshot {
                commands_ok: 1,
                bytes_guest_to_vram: 10_000,
                bytes_vram_to_vram: 10_000,
                bytes_vram_to_guest: 10_000,
                bytes_guest_to_guest: 10_000,
                ..Default::default()
            }
        );
    }

    #[test]
    fn guest_range_may_span_adjacent_regions() {
        let mut f = fixture();
        let start = RAM1 - 1000;
        let data = pattern(3000, 9);
        f.mem.write_slice(&data, GuestAddress(start)).unwrap();
        let ranges = [
            range(start, 0, 3000, DST_VRAM),
            range(0, start + 5000 - 2000, 3000, SRC_VRAM), // back across the boundary, shifted
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Copy, &ranges)),
            ok(6000)
        );
        assert_eq!(vram(&f, 0, 3000), data);
        assert_eq!(guest(&f.mem, start + 3000, 3000), data);
    }

    #[test]
    fn fill_with_odd_length_and_phase_across_regions() {
        let mut f = fixture();
        let pat = 0x0807_0605_0403_0201u64;
        let expect = |len: usize| -> Vec<u8> { (0..len).map(|i| (i % 8) as u8 + 1).collect() };
        let start = RAM1 - 13; // crosses the region boundary at an odd phase
        let ranges = [
            range(pat, start, 77, NONE),
            range(pat, 3, 100_003, DST_VRAM),
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Fill, &ranges)),
            ok(100_080)
        );
        assert_eq!(guest(&f.mem, start, 77), expect(77));
        assert_eq!(
            guest(&f.mem, start + 77, 1),
            [0],
            "FILL wrote past its range"
        );
        assert_eq!(vram(&f, 3, 100_003), expect(100_003));
        assert_eq!(vram(&f, 0, 3), [0, 0, 0]);
        assert_eq!(vram(&f, 100_006, 1), [0]);
        assert_eq!(f.engine.stats().snapshot().bytes_filled, 100_080);
    }

    #[test]
    fn zero_length_ranges_are_allowed_anywhere() {
        let mut f = fixture();
        let ranges = [
            range(u64::MAX, u64::MAX, 0, NONE),
            range(u64::MAX, 0, 0, SRC_VRAM | DST_VRAM),
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Copy, &ranges)),
            ok(0)
        );
    }

    /// Runs `request` after a valid first range and checks that it fails
    /// with `status` at `failed_index` and that no memory changed.
    fn assert_rejected(f: &mut Fixture, request: &[u8], status: Status, failed_index: u32) {
        let before = everything(f);
        let failed_before = f.engine.stats().snapshot().commands_failed;
        let response = f.engine.execute(&f.mem, request);
        assert_eq!(
            response,
            Response {
                status,
                failed_index,
                bytes: 0
            },
            "{}",
            status.name()
        );
        assert!(
            everything(f) == before,
            "a rejected command modified memory"
        );
        assert_eq!(
            f.engine.stats().snapshot().commands_failed,
            failed_before + 1
        );
    }

    /// A valid range that would change memory if executed.
    fn good() -> Range {
        range(0x5a5a_5a5a_5a5a_5a5a, RAM0, 4096, NONE)
    }

    #[test]
    fn bad_guest_addresses_are_rejected_before_any_byte_moves() {
        let mut f = fixture();
        f.mem
            .write_slice(&pattern(4096, 1), GuestAddress(RAM0))
            .unwrap();
        let copy_good = range(RAM0, 0, 4096, DST_VRAM);
        for (bad, name) in [
            (range(0, 0, 16, DST_VRAM), "below guest RAM"),
            (
                range(RAM1 + RAM_LEN as u64 - 8, 0, 16, DST_VRAM),
                "runs into the hole",
            ),
            (range(RAM2 - 8, 0, 16, DST_VRAM), "starts in the hole"),
            (range(RAM2 + RAM_LEN as u64, 0, 1, DST_VRAM), "past the end"),
            (range(u64::MAX - 7, 0, 16, DST_VRAM), "wraps past u64::MAX"),
            (
                range(u64::MAX, 0, 1, DST_VRAM),
                "last byte of the address space",
            ),
            (range(0, u64::MAX - 7, 16, SRC_VRAM), "destination wraps"),
            (
                range(RAM0, RAM0 - 1, 16, NONE),
                "guest-to-guest destination below RAM",
            ),
        ] {
            eprintln!("case: {name}");
            assert_rejected(
                &mut f,
                &command(Opcode::Copy, &[copy_good, bad]),
                Status::BadGuestAddr,
                1,
            );
        }
        assert_rejected(
            &mut f,
            &command(Opcode::Fill, &[good(), range(7, u64::MAX - 3, 8, NONE)]),
            Status::BadGuestAddr,
            1,
        );
    }

    #[test]
    fn bad_vram_ranges_are_rejected_before_any_byte_moves() {
        let mut f = fixture();
        let copy_good = range(RAM0, 0, 4096, DST_VRAM);
        for bad in [
            range(RAM0, VRAM_SIZE - 8, 16, DST_VRAM),
            range(RAM0, VRAM_SIZE, 1, DST_VRAM),
            range(RAM0, u64::MAX - 7, 16, DST_VRAM),
            range(VRAM_SIZE - 1, RAM0, 2, SRC_VRAM),
            range(0, VRAM_SIZE, 4096, SRC_VRAM | DST_VRAM),
        ] {
            assert_rejected(
                &mut f,
                &command(Opcode::Copy, &[copy_good, bad]),
                Status::BadVramRange,
                1,
            );
        }
        assert_rejected(
            &mut f,
            &command(
                Opcode::Fill,
                &[good(), range(1, VRAM_SIZE - 4, 8, DST_VRAM)],
            ),
            Status::BadVramRange,
            1,
        );
    }

    #[test]
    fn malformed_commands_are_bad_requests() {
        let mut f = fixture();
        let header = |opcode: Opcode, ctx, count, reserved| {
            CmdHeader {
                opcode: opcode.bits(),
                ctx,
                tag: 1,
                count,
                reserved,
            }
            .to_bytes()
            .to_vec()
        };
        // Short header.
        assert_rejected(
            &mut f,
            &command(Opcode::Nop, &[])[..CmdHeader::SIZE - 1],
            Status::BadRequest,
            0,
        );
        assert_rejected(&mut f, &[], Status::BadRequest, 0);
        // A context on a physical opcode.
        assert_rejected(&mut f, &header(Opcode::Nop, 1, 0, 0), Status::BadContext, 0);
        // Reserved fields.
        assert_rejected(
            &mut f,
            &header(Opcode::Nop, 0, 0, 1 << 31),
            Status::BadRequest,
            0,
        );
        // NOP with ranges.
        assert_rejected(
            &mut f,
            &command(Opcode::Nop, &[good()]),
            Status::BadRequest,
            0,
        );
        // Unknown range flags, and SRC_VRAM on a FILL, at index 2.
        let good_copy = range(RAM0, RAM0 + 4096, 4096, NONE);
        let bad_flags = range(RAM0, RAM0 + 64, 8, RangeFlags::from_bits_retain(1 << 2));
        assert_rejected(
            &mut f,
            &command(Opcode::Copy, &[good_copy, good_copy, bad_flags]),
            Status::BadRequest,
            2,
        );
        let fill_from_vram = range(0, 0, 8, SRC_VRAM | DST_VRAM);
        assert_rejected(
            &mut f,
            &command(Opcode::Fill, &[good(), good(), fill_from_vram]),
            Status::BadRequest,
            2,
        );
        // Too many ranges: rejected from the header alone.
        let mut too_many = header(Opcode::Copy, 0, MAX_RANGES + 1, 0);
        for _ in 0..=MAX_RANGES {
            too_many.extend_from_slice(&good().to_bytes());
        }
        assert_rejected(&mut f, &too_many, Status::BadRequest, 0);
        // Truncated range list: 3 announced, 2 and a half present.
        let mut truncated = header(Opcode::Fill, 0, 3, 0);
        for _ in 0..3 {
            truncated.extend_from_slice(&good().to_bytes());
        }
        truncated.truncate(truncated.len() - Range::SIZE / 2);
        assert_rejected(&mut f, &truncated, Status::BadRequest, 2);
    }

    #[test]
    fn unknown_opcode_is_unsupported() {
        let mut f = fixture();
        assert_rejected(&mut f, &command(3u32, &[good()]), Status::Unsupported, 0);
        assert_rejected(&mut f, &command(u32::MAX, &[]), Status::Unsupported, 0);
    }

    #[test]
    fn max_ranges_is_accepted_and_trailing_bytes_ignored() {
        let mut f = fixture();
        let ranges: Vec<Range> = (0..MAX_RANGES)
            .map(|i| range(u64::from(i), RAM0 + u64::from(i), 1, NONE))
            .collect();
        let mut request = command(Opcode::Fill, &ranges);
        request.extend_from_slice(&[0xff; 100]);
        assert_eq!(
            f.engine.execute(&f.mem, &request),
            ok(u64::from(MAX_RANGES))
        );
        assert_eq!(guest(&f.mem, RAM0, 4), [0, 1, 2, 3]);
    }

    #[test]
    fn injected_copy_error_leaves_earlier_ranges_done() {
        let mut f = fixture();
        let data = pattern(4 * 4096, 5);
        f.mem.write_slice(&data, GuestAddress(RAM0)).unwrap();
        let ranges: Vec<Range> = (0..4u64)
            .map(|i| range(RAM0 + i * 4096, i * 4096, 4096, DST_VRAM))
            .collect();
        // Two ranges succeed, the third fails, the fourth never runs.
        f.faults.copy_error_next(2);
        let response = f.engine.execute(&f.mem, &command(Opcode::Copy, &ranges));
        assert_eq!(
            response,
            Response {
                status: Status::CopyError,
                failed_index: 2,
                bytes: 8192
            }
        );
        assert_eq!(vram(&f, 0, 8192), data[..8192]);
        assert_eq!(vram(&f, 8192, 8192), vec![0; 8192]);
        let stats = f.engine.stats().snapshot();
        assert_eq!(
            (stats.commands_failed, stats.bytes_guest_to_vram),
            (1, 8192)
        );
        // The fault was one-shot: the retry completes.
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Copy, &ranges)),
            ok(4 * 4096)
        );
        assert_eq!(vram(&f, 0, 4 * 4096), data);
        // Armed with 0, the very next range fails, even across commands.
        f.faults.copy_error_next(0);
        let response = f.engine.execute(&f.mem, &command(Opcode::Fill, &[good()]));
        assert_eq!(
            response,
            Response {
                status: Status::CopyError,
                failed_index: 0,
                bytes: 0
            }
        );
        f.faults.copy_error_next(5);
        f.faults.clear();
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Fill, &[good()])),
            ok(4096)
        );
    }

    // -- Device MMU ------------------------------------------------------------

    use hmmgpu_abi::event::{ACCESS_ATOMIC, ACCESS_READ, ACCESS_WRITE};
    use hmmgpu_abi::event::{REASON_NOT_MAPPED, REASON_PERMISSION};
    use hmmgpu_abi::{HUGE_PAGE_SIZE, MAX_CONTEXTS};

    const ATOMIC_ADD: RangeFlags = RangeFlags::ATOMIC_ADD;
    const ATOMIC_XCHG: RangeFlags = RangeFlags::ATOMIC_XCHG;
    const MAP_ATOMIC: RangeFlags = RangeFlags::MAP_ATOMIC;
    const MAP_HUGE: RangeFlags = RangeFlags::MAP_HUGE;
    const MAP_READ: RangeFlags = RangeFlags::MAP_READ;
    const MAP_WRITE: RangeFlags = RangeFlags::MAP_WRITE;
    const RW: RangeFlags = MAP_READ.union(MAP_WRITE);
    /// Device virtual addresses used below.
    const VA: u64 = 0x7f00_0000_0000;
    const HUGE_VA: u64 = 0x7f00_4000_0000;

    fn ctx_command(op: Opcode, ctx: u32, ranges: &[Range]) -> Vec<u8> {
        let mut bytes = command(op, ranges);
        bytes[4..8].copy_from_slice(&ctx.to_le_bytes());
        bytes
    }

    fn exec(f: &mut Fixture, op: Opcode, ctx: u32, ranges: &[Range]) -> Response {
        f.engine.execute(&f.mem, &ctx_command(op, ctx, ranges))
    }

    fn process(
        f: &mut Fixture,
        op: Opcode,
        ctx: u32,
        ranges: &[Range],
        token: u64,
        events: &mut dyn EventSink,
    ) -> Executed {
        f.engine
            .process(&f.mem, &ctx_command(op, ctx, ranges), token, events)
    }

    fn status_of(status: Status, failed_index: u32) -> Response {
        Response::failed(status, failed_index)
    }

    fn fault_event(ctx: u32, addr: u64, access: u32, reason: u32, seq: u64) -> Event {
        Event {
            kind: event::FAULT,
            ctx,
            addr,
            access,
            reason,
            seq,
        }
    }

    #[test]
    fn stats_report_every_counter_by_name_in_order() {
        let stats = Stats::default();
        for i in 0..counter::COUNT {
            stats.add(i, i as u64 + 1);
        }
        let json = serde_json::to_value(stats.snapshot()).unwrap();
        let object = json.as_object().unwrap();
        assert_eq!(object.len(), counter::COUNT);
        for (i, name) in counter::NAMES.iter().enumerate() {
            assert_eq!(object[*name], i as u64 + 1, "{name}");
        }
        let text = serde_json::to_string(&stats.snapshot()).unwrap();
        let mut last = 0;
        for name in counter::NAMES {
            let at = text.find(&format!("\"{name}\"")).unwrap();
            assert!(at >= last, "{name} out of order");
            last = at;
        }
    }

    #[test]
    fn contexts_and_bad_context_cases() {
        let mut f = fixture();
        let page = range(RAM0, VA, 4096, RW);
        // MMU opcodes need a valid context...
        for ctx in [0, MAX_CONTEXTS + 1, u32::MAX] {
            for op in [Opcode::CtxCreate, Opcode::Replay, Opcode::Cancel] {
                assert_eq!(exec(&mut f, op, ctx, &[]), BAD_CONTEXT, "{op:?} {ctx}");
            }
            assert_eq!(exec(&mut f, Opcode::Map, ctx, &[page]), BAD_CONTEXT);
        }
        // ... that exists.
        for op in [Opcode::CtxDestroy, Opcode::Replay, Opcode::Cancel] {
            assert_eq!(exec(&mut f, op, 7, &[]), BAD_CONTEXT, "{op:?}");
        }
        // (Each with a range that is well formed for it: decode rejects a
        // malformed one before the context is looked at.)
        let unmap = range(0, VA, 4096, NONE);
        let read = range(VA, RAM0, 4096, NONE);
        let write = range(RAM0, VA, 4096, NONE);
        for (op, r) in [
            (Opcode::Map, page),
            (Opcode::Unmap, unmap),
            (Opcode::Vread, read),
            (Opcode::Vwrite, write),
        ] {
            assert_eq!(exec(&mut f, op, 7, &[r]), BAD_CONTEXT, "{op:?}");
        }
        let atomic = range(1, VA, 8, ATOMIC_ADD);
        assert_eq!(exec(&mut f, Opcode::Atomic, 7, &[atomic]), BAD_CONTEXT);
        assert_eq!(exec(&mut f, Opcode::CtxCreate, 7, &[]), OK);
        assert_eq!(exec(&mut f, Opcode::CtxCreate, 7, &[]), BAD_CONTEXT);
        assert_eq!(exec(&mut f, Opcode::CtxCreate, MAX_CONTEXTS, &[]), OK);
        // Nothing parked.
        assert_eq!(exec(&mut f, Opcode::Replay, 7, &[]), BAD_CONTEXT);
        assert_eq!(exec(&mut f, Opcode::Cancel, 7, &[]), BAD_CONTEXT);
        // Physical opcodes need context 0.
        let counters = range(0, RAM0, 128, NONE);
        for (op, ranges) in [
            (Opcode::Nop, &[][..]),
            (Opcode::Copy, &[good()][..]),
            (Opcode::Fill, &[good()][..]),
            (Opcode::Counters, &[counters][..]),
        ] {
            assert_rejected(&mut f, &ctx_command(op, 7, ranges), Status::BadContext, 0);
        }
        // Range counts.
        assert_eq!(
            exec(&mut f, Opcode::CtxCreate, 8, &[page]),
            status_of(Status::BadRequest, 0)
        );
        assert_eq!(
            exec(&mut f, Opcode::Atomic, 7, &[atomic, atomic]),
            status_of(Status::BadRequest, 0)
        );
        assert_eq!(
            exec(&mut f, Opcode::Atomic, 7, &[]),
            status_of(Status::BadRequest, 0)
        );
        assert_eq!(exec(&mut f, Opcode::CtxDestroy, 7, &[]), OK);
        assert_eq!(exec(&mut f, Opcode::CtxDestroy, 7, &[]), BAD_CONTEXT);
        assert_eq!(exec(&mut f, Opcode::Map, 7, &[page]), BAD_CONTEXT);
    }

    #[test]
    fn vwrite_and_vread_across_small_and_huge_entries() {
        let mut f = fixture();
        assert_eq!(exec(&mut f, Opcode::CtxCreate, 1, &[]), OK);
        // VA: a guest page, a VRAM page, then two physically contiguous
        // guest pages (one piece), and a huge VRAM entry elsewhere.
        let maps = [
            range(RAM0 + 0x3000, VA, 4096, RW),
            range(0x5000, VA + 0x1000, 4096, RW | SRC_VRAM),
            range(RAM1 - 0x1000, VA + 0x2000, 0x2000, RW), // crosses a region boundary
            range(0, HUGE_VA, HUGE_PAGE_SIZE as u32, RW | SRC_VRAM | MAP_HUGE),
        ];
        assert_eq!(exec(&mut f, Opcode::Map, 1, &maps), OK);
        assert_eq!(f.engine.mmu().entries(), 5);
        let data = pattern(0x4000 - 100, 7);
        let buf = RAM2;
        f.mem.write_slice(&data, GuestAddress(buf)).unwrap();
        let huge_data = pattern(5000, 9);
        f.mem
            .write_slice(&huge_data, GuestAddress(buf + 0x8000))
            .unwrap();
        let writes = [
            range(buf, VA + 100, data.len() as u32, NONE),
            range(buf + 0x8000, HUGE_VA + 0x1f_f000, 4096, NONE), // last page of the huge entry
            range(buf + 0x9000, HUGE_VA + 0x1000, 5000 - 4096, NONE),
        ];
        assert_eq!(
            exec(&mut f, Opcode::Vwrite, 1, &writes),
            ok(data.len() as u64 + 5000)
        );
        // Where the bytes landed, physically.
        assert_eq!(guest(&f.mem, RAM0 + 0x3000 + 100, 4096 - 100), data[..3996]);
        assert_eq!(vram(&f, 0x5000, 4096), data[3996..3996 + 4096]);
        assert_eq!(guest(&f.mem, RAM1 - 0x1000, 0x2000), data[3996 + 4096..]);
        assert_eq!(vram(&f, 0x1f_f000, 4096), huge_data[..4096]);
        assert_eq!(vram(&f, 0x1000, 5000 - 4096), huge_data[4096..]);
        // And back through the MMU, into one buffer, in two ranges.
        let back = RAM2 + 0x1_0000;
        let reads = [
            range(VA + 100, back, data.len() as u32, NONE),
            range(HUGE_VA + 0x1f_f000, back + 0x4000, 4096, NONE),
        ];
        assert_eq!(
            exec(&mut f, Opcode::Vread, 1, &reads),
            ok(data.len() as u64 + 4096)
        );
        assert_eq!(guest(&f.mem, back, data.len()), data);
        assert_eq!(guest(&f.mem, back + 0x4000, 4096), huge_data[..4096]);
        let stats = f.engine.stats().snapshot();
        assert_eq!(stats.bytes_vwrite, data.len() as u64 + 5000);
        assert_eq!(stats.bytes_vread, data.len() as u64 + 4096);
        assert_eq!((stats.faults, stats.commands_failed), (0, 0));
    }

    #[test]
    fn virtual_buffers_and_ranges_are_validated_up_front() {
        let mut f = fixture();
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        exec(&mut f, Opcode::Map, 1, &[range(RAM0, VA, 4096, RW)]);
        let good = range(VA, RAM0 + 0x1000, 64, NONE);
        let before = everything(&f);
        for (op, bad, status) in [
            (
                Opcode::Vread,
                range(VA, RAM2 - 8, 16, NONE),
                Status::BadGuestAddr,
            ),
            (
                Opcode::Vwrite,
                range(RAM2 - 8, VA, 16, NONE),
                Status::BadGuestAddr,
            ),
            (
                Opcode::Vread,
                range(VA, RAM0, 16, DST_VRAM),
                Status::BadRequest,
            ),
            (
                Opcode::Vread,
                range(u64::MAX - 7, RAM0, 16, NONE),
                Status::BadRequest,
            ),
        ] {
            let good = if op == Opcode::Vwrite {
                range(RAM0 + 0x1000, VA, 64, NONE)
            } else {
                good
            };
            assert_eq!(
                exec(&mut f, op, 1, &[good, bad]),
                status_of(status, 1),
                "{op:?} {bad:?}"
            );
        }
        for bad in [
            range(1, VA + 4, 8, ATOMIC_ADD),                       // misaligned
            range(1, VA, 4, ATOMIC_ADD),                           // not 8 bytes
            range(1, VA, 8, NONE),                                 // no op
            range(1, VA, 8, RangeFlags::from_bits_retain(3 << 8)), // unknown op
            range(1, VA, 8, ATOMIC_ADD | MAP_READ),                // stray flag
        ] {
            assert_eq!(
                exec(&mut f, Opcode::Atomic, 1, &[bad]),
                status_of(Status::BadRequest, 0),
                "{bad:?}"
            );
        }
        assert!(everything(&f) == before);
        assert_eq!(f.engine.parked(), 0);
    }

    #[test]
    fn map_validates_every_range_before_installing_any() {
        let mut f = fixture();
        exec(&mut f, Opcode::CtxCreate, 2, &[]);
        let good = range(RAM0, VA, 0x2000, RW);
        for (bad, status) in [
            (
                range(RAM1 + RAM_LEN as u64 - 0x1000, VA + 0x10_0000, 0x2000, RW),
                Status::BadGuestAddr,
            ),
            (range(0, VA + 0x10_0000, 4096, RW), Status::BadGuestAddr),
            (
                range(VRAM_SIZE - 0x1000, VA + 0x10_0000, 0x2000, RW | SRC_VRAM),
                Status::BadVramRange,
            ),
            (
                range(!0xfff, VA + 0x10_0000, 0x1000, RW | SRC_VRAM),
                Status::BadVramRange,
            ),
            (
                range(0x20_0000, HUGE_VA, HUGE_PAGE_SIZE as u32, RW | MAP_HUGE),
                Status::BadGuestAddr,
            ),
            (
                range(RAM0, VA + 0x10_0000, 4096, RW | DST_VRAM),
                Status::BadRequest,
            ),
            (
                range(
                    RAM0,
                    VA + 0x10_0000,
                    4096,
                    RW | RangeFlags::from_bits_retain(1 << 9),
                ),
                Status::BadRequest,
            ),
            (range(RAM0, VA + 0x10_0000, 100, RW), Status::BadRequest),
            (
                range(RAM0 + 8, VA + 0x10_0000, 4096, RW),
                Status::BadRequest,
            ),
        ] {
            assert_eq!(
                exec(&mut f, Opcode::Map, 2, &[good, bad]),
                status_of(status, 1),
                "{bad:?}"
            );
            assert_eq!(f.engine.mmu().entries(), 0, "{bad:?} left entries");
        }
        assert_eq!(
            f.engine
                .mmu()
                .translate(ContextId::new(2).unwrap(), VA, Access::READ),
            Err(mmu::Fault {
                reason: REASON_NOT_MAPPED
            })
        );
        // UNMAP: flags and wrapping are bad requests; nothing is removed.
        assert_eq!(exec(&mut f, Opcode::Map, 2, &[good]), OK);
        for bad in [range(0, VA, 4096, SRC_VRAM), range(0, u64::MAX, 2, NONE)] {
            assert_eq!(
                exec(&mut f, Opcode::Unmap, 2, &[range(0, VA, 4096, NONE), bad]),
                status_of(Status::BadRequest, 1)
            );
            assert_eq!(f.engine.mmu().entries(), 2);
        }
        assert_eq!(f.engine.stats().snapshot().invalidations, 0);
    }

    #[test]
    fn the_entry_cap_refuses_maps_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        let vram = Arc::new(Vram::open(&dir.path().join("vram"), VRAM_SIZE).unwrap());
        let mut f = Fixture {
            mem: GuestRam::from_ranges(&[(GuestAddress(RAM0), RAM_LEN)]).unwrap(),
            engine: Engine::with_mmu(
                vram,
                Arc::new(Stats::default()),
                Arc::new(NoFaults),
                Mmu::with_cap(4),
            ),
            faults: Arc::new(FaultInjector::default()),
            _dir: dir,
        };
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        assert_eq!(
            exec(&mut f, Opcode::Map, 1, &[range(RAM0, VA, 0x3000, RW)]),
            OK
        );
        let two = [
            range(RAM0, VA + 0x10_0000, 4096, RW),
            range(RAM0, VA + 0x20_0000, 4096, RW),
        ];
        assert_eq!(
            exec(&mut f, Opcode::Map, 1, &two),
            status_of(Status::BadRequest, 1)
        );
        assert_eq!(f.engine.mmu().entries(), 3);
        assert_eq!(exec(&mut f, Opcode::Map, 1, &two[..1]), OK);
        assert_eq!(f.engine.mmu().entries(), 4);
        // Remapping needs no room; UNMAP makes some.
        assert_eq!(
            exec(&mut f, Opcode::Map, 1, &[range(RAM0, VA, 0x3000, MAP_READ)]),
            OK
        );
        assert_eq!(exec(&mut f, Opcode::Unmap, 1, &[range(0, VA, 1, NONE)]), OK);
        assert_eq!(exec(&mut f, Opcode::Map, 1, &two[1..]), OK);
        assert_eq!(f.engine.mmu().entries(), 4);
    }

    #[test]
    fn unmap_is_an_invalidation_fence() {
        let mut f = fixture();
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        let maps = [
            range(RAM0, VA, 0x2000, RW),
            range(0, HUGE_VA, HUGE_PAGE_SIZE as u32, RW | SRC_VRAM | MAP_HUGE),
        ];
        assert_eq!(exec(&mut f, Opcode::Map, 1, &maps), OK);
        let read = |va| range(va, RAM2, 16, NONE);
        assert_eq!(exec(&mut f, Opcode::Vread, 1, &[read(VA + 0x1000)]), ok(16));
        assert_eq!(
            exec(&mut f, Opcode::Vread, 1, &[read(HUGE_VA + 0x1000)]),
            ok(16)
        );
        let unmap = [
            range(0, VA + 0x1ff0, 1, NONE),
            range(0, HUGE_VA + 0x10_0000, 4096, NONE),
        ];
        assert_eq!(exec(&mut f, Opcode::Unmap, 1, &unmap), OK);
        // No event queue: the faults complete at once with FAULT.
        for va in [VA + 0x1000, HUGE_VA + 0x1000] {
            assert_eq!(
                exec(&mut f, Opcode::Vread, 1, &[read(va)]),
                status_of(Status::Fault, 0)
            );
        }
        assert_eq!(exec(&mut f, Opcode::Vread, 1, &[read(VA)]), ok(16));
        let stats = f.engine.stats().snapshot();
        assert_eq!(
            (stats.invalidations, stats.faults, stats.events_dropped),
            (2, 2, 2)
        );
    }

    #[test]
    fn a_fault_is_reported_parks_the_command_and_replay_finishes_it() {
        let mut f = fixture();
        let mut events = Vec::new();
        exec(&mut f, Opcode::CtxCreate, 5, &[]);
        exec(
            &mut f,
            Opcode::Map,
            5,
            &[range(RAM0 + 0x1_0000, VA, 4096, RW)],
        );
        let data = pattern(0x2000, 3);
        f.mem
            .write_slice(&data, GuestAddress(RAM0 + 0x1_0000))
            .unwrap();
        // Range 0 is mapped; range 1 runs from the mapped page into an
        // unmapped one.
        let reads = [
            range(VA, RAM2, 0x800, NONE),
            range(VA + 0xc00, RAM2 + 0x800, 0x800, NONE),
        ];
        let executed = process(&mut f, Opcode::Vread, 5, &reads, 77, &mut events);
        assert_eq!(executed, Executed::default(), "parked: no completion");
        assert_eq!(
            events,
            [fault_event(
                5,
                VA + 0x1000,
                ACCESS_READ,
                REASON_NOT_MAPPED,
                1
            )]
        );
        assert_eq!(f.engine.parked(), 1);
        // What came before the fault was done.
        assert_eq!(guest(&f.mem, RAM2, 0xc00), data[..0xc00]);
        assert_eq!(guest(&f.mem, RAM2 + 0xc00, 0x400), vec![0; 0x400]);
        // One parked command per context...
        let executed = process(&mut f, Opcode::Vread, 5, &reads, 78, &mut events);
        assert_eq!(executed.response, Some(BAD_CONTEXT));
        // ... while other contexts and physical commands run.
        exec(&mut f, Opcode::CtxCreate, 6, &[]);
        exec(
            &mut f,
            Opcode::Map,
            6,
            &[range(RAM0 + 0x1_0000, VA, 4096, RW)],
        );
        assert_eq!(
            exec(
                &mut f,
                Opcode::Vread,
                6,
                &[range(VA, RAM2 + 0x8000, 8, NONE)]
            ),
            ok(8)
        );
        assert_eq!(exec(&mut f, Opcode::Nop, 0, &[]), OK);
        // Resolve (read-only suffices) and replay.
        exec(
            &mut f,
            Opcode::Map,
            5,
            &[range(RAM0 + 0x1_1000, VA + 0x1000, 4096, MAP_READ)],
        );
        let executed = process(&mut f, Opcode::Replay, 5, &[], 79, &mut events);
        assert_eq!(
            executed,
            Executed {
                resumed: Some(Completion {
                    token: 77,
                    response: ok(0x1000)
                }),
                response: Some(OK),
            }
        );
        assert_eq!(guest(&f.mem, RAM2, 0x800), data[..0x800]);
        assert_eq!(guest(&f.mem, RAM2 + 0x800, 0x800), data[0xc00..0x1400]);
        assert_eq!(f.engine.parked(), 0);
        assert_eq!(events.len(), 1);
        let stats = f.engine.stats().snapshot();
        assert_eq!(
            (stats.faults, stats.replays, stats.events_dropped),
            (1, 1, 0)
        );
        assert_eq!(stats.bytes_vread, 0x1000 + 8);
        assert_eq!(stats.commands_failed, 1, "only the second VREAD failed");
    }

    #[test]
    fn a_replay_may_fault_again() {
        let mut f = fixture();
        let mut events = Vec::new();
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        let data = pattern(0x3000, 11);
        f.mem.write_slice(&data, GuestAddress(RAM2)).unwrap();
        // VWRITE of three pages, none mapped.
        let write = [range(RAM2, VA, 0x3000, NONE)];
        let executed = process(&mut f, Opcode::Vwrite, 1, &write, 1, &mut events);
        assert_eq!(executed.response, None);
        exec(&mut f, Opcode::Map, 1, &[range(RAM0, VA, 0x1000, RW)]);
        let executed = process(&mut f, Opcode::Replay, 1, &[], 2, &mut events);
        assert_eq!(
            executed,
            Executed {
                resumed: None,
                response: Some(OK)
            }
        );
        // A write fault on a read-only page: a permission fault.
        exec(
            &mut f,
            Opcode::Map,
            1,
            &[range(RAM0 + 0x1000, VA + 0x1000, 0x2000, MAP_READ)],
        );
        let executed = process(&mut f, Opcode::Replay, 1, &[], 3, &mut events);
        assert_eq!(
            executed,
            Executed {
                resumed: None,
                response: Some(OK)
            }
        );
        assert_eq!(
            events,
            [
                fault_event(1, VA, ACCESS_WRITE, REASON_NOT_MAPPED, 1),
                fault_event(1, VA + 0x1000, ACCESS_WRITE, REASON_NOT_MAPPED, 2),
                fault_event(1, VA + 0x1000, ACCESS_WRITE, REASON_PERMISSION, 3),
            ]
        );
        exec(
            &mut f,
            Opcode::Map,
            1,
            &[range(RAM0 + 0x1000, VA + 0x1000, 0x2000, RW)],
        );
        let executed = process(&mut f, Opcode::Replay, 1, &[], 4, &mut events);
        assert_eq!(
            executed.resumed,
            Some(Completion {
                token: 1,
                response: ok(0x3000)
            })
        );
        assert_eq!(guest(&f.mem, RAM0, 0x3000), data);
        assert_eq!(f.engine.stats().snapshot().replays, 3);
        assert_eq!(f.engine.stats().snapshot().bytes_vwrite, 0x3000);
    }

    #[test]
    fn cancel_and_ctx_destroy_complete_the_parked_command_with_fault() {
        let mut f = fixture();
        let mut events = Vec::new();
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        exec(&mut f, Opcode::Map, 1, &[range(RAM0, VA, 0x1000, RW)]);
        let reads = [
            range(VA, RAM2, 0x1000, NONE),
            range(VA + 0x800, RAM2 + 0x1000, 0x1000, NONE),
        ];
        assert_eq!(
            process(&mut f, Opcode::Vread, 1, &reads, 10, &mut events).response,
            None
        );
        let executed = process(&mut f, Opcode::Cancel, 1, &[], 11, &mut events);
        let fault = Response {
            status: Status::Fault,
            failed_index: 1,
            bytes: 0x1800,
        };
        assert_eq!(
            executed,
            Executed {
                resumed: Some(Completion {
                    token: 10,
                    response: fault
                }),
                response: Some(OK)
            }
        );
        assert_eq!(exec(&mut f, Opcode::Replay, 1, &[]), BAD_CONTEXT);
        // Park an atomic this time, then destroy the context.
        let atomic = [range(5, VA + 0x2000, 8, ATOMIC_ADD)];
        assert_eq!(
            process(&mut f, Opcode::Atomic, 1, &atomic, 12, &mut events).response,
            None
        );
        let executed = process(&mut f, Opcode::CtxDestroy, 1, &[], 13, &mut events);
        assert_eq!(
            executed,
            Executed {
                resumed: Some(Completion {
                    token: 12,
                    response: status_of(Status::Fault, 0)
                }),
                response: Some(OK)
            }
        );
        assert_eq!(f.engine.parked(), 0);
        assert_eq!(f.engine.mmu().entries(), 0);
        assert_eq!(exec(&mut f, Opcode::Cancel, 1, &[]), BAD_CONTEXT);
        assert_eq!(
            events[1],
            fault_event(1, VA + 0x2000, ACCESS_ATOMIC, REASON_NOT_MAPPED, 2)
        );
        let stats = f.engine.stats().snapshot();
        assert_eq!(
            stats.commands_failed, 4,
            "two FAULTs, the REPLAY and the CANCEL"
        );
    }

    #[test]
    fn without_an_event_buffer_a_fault_completes_at_once() {
        let mut f = fixture();
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        exec(&mut f, Opcode::Map, 1, &[range(RAM0, VA, 0x1000, RW)]);
        let reads = [range(VA + 0xf00, RAM2, 0x200, NONE)];
        let executed = process(&mut f, Opcode::Vread, 1, &reads, 3, &mut NoEventQueue);
        assert_eq!(
            executed,
            Executed {
                resumed: None,
                response: Some(Response {
                    status: Status::Fault,
                    failed_index: 0,
                    bytes: 0x100
                })
            }
        );
        assert_eq!(f.engine.parked(), 0);
        let stats = f.engine.stats().snapshot();
        assert_eq!(
            (stats.faults, stats.events_dropped, stats.commands_failed),
            (1, 1, 1)
        );
        // The next reported event still gets sequence number 1.
        let mut events = Vec::new();
        process(&mut f, Opcode::Vread, 1, &reads, 4, &mut events);
        assert_eq!(events[0].seq, 1);
    }

    #[test]
    fn atomics_add_and_exchange_and_return_the_old_value() {
        let mut f = fixture();
        let mut events = Vec::new();
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        let maps = [
            range(RAM0, VA, 0x1000, MAP_ATOMIC),
            range(0x3000, VA + 0x1000, 0x1000, MAP_ATOMIC | SRC_VRAM),
            range(RAM0 + 0x1000, VA + 0x2000, 0x1000, RW),
        ];
        assert_eq!(exec(&mut f, Opcode::Map, 1, &maps), OK);
        f.mem
            .write_slice(&(u64::MAX - 1).to_le_bytes(), GuestAddress(RAM0 + 0x18))
            .unwrap();
        f.engine
            .vram()
            .write(0x3ff8, &0x1122_3344_5566_7788u64.to_le_bytes())
            .unwrap();
        let mut run =
            |va, operand, flags| exec(&mut f, Opcode::Atomic, 1, &[range(operand, va, 8, flags)]);
        assert_eq!(run(VA + 0x18, 5, ATOMIC_ADD), ok(u64::MAX - 1));
        assert_eq!(run(VA + 0x18, 0, ATOMIC_ADD), ok(3), "the add wrapped");
        assert_eq!(run(VA + 0x18, 0xabcd, ATOMIC_XCHG), ok(3));
        assert_eq!(run(VA + 0x1ff8, 1, ATOMIC_ADD), ok(0x1122_3344_5566_7788));
        assert_eq!(run(VA + 0x1ff8, 7, ATOMIC_XCHG), ok(0x1122_3344_5566_7789));
        assert_eq!(guest(&f.mem, RAM0 + 0x18, 8), 0xabcdu64.to_le_bytes());
        assert_eq!(vram(&f, 0x3ff8, 8), 7u64.to_le_bytes());
        // Read/write permission is not atomic permission.
        let executed = process(
            &mut f,
            Opcode::Atomic,
            1,
            &[range(1, VA + 0x2008, 8, ATOMIC_ADD)],
            9,
            &mut events,
        );
        assert_eq!(executed.response, None);
        assert_eq!(
            events,
            [fault_event(
                1,
                VA + 0x2008,
                ACCESS_ATOMIC,
                REASON_PERMISSION,
                1
            )]
        );
        exec(
            &mut f,
            Opcode::Map,
            1,
            &[range(RAM0 + 0x1000, VA + 0x2000, 0x1000, MAP_ATOMIC)],
        );
        let executed = process(&mut f, Opcode::Replay, 1, &[], 10, &mut events);
        assert_eq!(
            executed.resumed,
            Some(Completion {
                token: 9,
                response: ok(0)
            })
        );
        assert_eq!(guest(&f.mem, RAM0 + 0x1008, 8), 1u64.to_le_bytes());
        assert_eq!(f.engine.stats().snapshot().atomics, 6);
    }

    /// Runs `request` with `per_call` bytes of budget per call until it is
    /// done; returns what it did and how many calls it took.
    fn run_in_slices(
        f: &mut Fixture,
        request: &[u8],
        token: u64,
        events: &mut dyn EventSink,
        per_call: u64,
    ) -> (Executed, usize) {
        let mut calls = 1;
        let mut step =
            f.engine
                .process_budgeted(&f.mem, request, token, events, &mut Budget::new(per_call));
        loop {
            match step {
                Step::Done(executed) => return (executed, calls),
                Step::Suspended => {
                    assert!(f.engine.has_suspended());
                    calls += 1;
                    step = f
                        .engine
                        .continue_suspended(&f.mem, events, &mut Budget::new(per_call));
                }
            }
        }
    }

    #[test]
    fn long_copies_and_fills_are_suspended_and_resumed_exactly() {
        // The same commands run whole and in slices of 5003 bytes (a piece
        // size prime to the pattern and the page) leave the same memory.
        let data = pattern(200_000, 17);
        let commands = [
            command(
                Opcode::Fill,
                &[
                    range(0x0102_0304_0506_0708, 3, 100_003, DST_VRAM),
                    range(0x1111_2222_3333_4444, RAM1 - 7777, 20_001, NONE),
                    range(5, RAM0, 0, NONE),
                ],
            ),
            command(
                Opcode::Copy,
                &[
                    range(RAM2, 0x10_0000, 200_000, DST_VRAM),
                    range(0x10_0000, RAM0 + 0x3_0000, 150_000, SRC_VRAM),
                ],
            ),
        ];
        let mut whole = fixture();
        let mut sliced = fixture();
        for f in [&mut whole, &mut sliced] {
            f.mem.write_slice(&data, GuestAddress(RAM2)).unwrap();
        }
        for request in &commands {
            let expect = whole.engine.execute(&whole.mem, request);
            let (executed, calls) = run_in_slices(&mut sliced, request, 1, &mut NoEventQueue, 5003);
            assert_eq!(executed.response, Some(expect));
            assert!(calls > 20, "{calls} calls: the budget was not applied");
            assert!(!sliced.engine.has_suspended());
        }
        assert!(
            everything(&whole) == everything(&sliced),
            "slicing changed the result"
        );
        assert_eq!(
            whole.engine.stats().snapshot(),
            sliced.engine.stats().snapshot()
        );
    }

    #[test]
    fn a_sliced_command_keeps_copy_errors_and_faults_where_they_were() {
        let mut f = fixture();
        let mut events = Vec::new();
        // A copy error at the third range after two sliced ones.
        let ranges: Vec<Range> = (0..4u64)
            .map(|i| range(RAM0 + i * 0x8000, i * 0x8000, 0x8000, DST_VRAM))
            .collect();
        f.faults.copy_error_next(2);
        let (executed, _) = run_in_slices(
            &mut f,
            &command(Opcode::Copy, &ranges),
            1,
            &mut events,
            5000,
        );
        assert_eq!(
            executed.response,
            Some(Response {
                status: Status::CopyError,
                failed_index: 2,
                bytes: 0x10000
            })
        );
        // A VREAD sliced across its mapped page, then faulting, parks; a
        // REPLAY that is itself sliced completes it.
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        exec(&mut f, Opcode::Map, 1, &[range(RAM0, VA, 0x4000, RW)]);
        let read = [range(VA, RAM2, 0x8000, NONE)];
        let (executed, calls) = run_in_slices(
            &mut f,
            &ctx_command(Opcode::Vread, 1, &read),
            7,
            &mut events,
            4096,
        );
        assert_eq!(executed, Executed::default(), "parked");
        // Taking the command uses up the first call's 4 KiB; then one call
        // per mapped page; the last finds the fault.
        assert_eq!(calls, 6);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].addr, VA + 0x4000);
        exec(
            &mut f,
            Opcode::Map,
            1,
            &[range(RAM1, VA + 0x4000, 0x4000, RW)],
        );
        let (executed, calls) = run_in_slices(
            &mut f,
            &ctx_command(Opcode::Replay, 1, &[]),
            8,
            &mut events,
            4096,
        );
        assert_eq!(
            executed,
            Executed {
                resumed: Some(Completion {
                    token: 7,
                    response: ok(0x8000)
                }),
                response: Some(OK)
            }
        );
        assert_eq!(calls, 5, "the REPLAY, then one call per page");
        assert_eq!(guest(&f.mem, RAM2, 0x4000), guest(&f.mem, RAM0, 0x4000));
        assert_eq!(
            guest(&f.mem, RAM2 + 0x4000, 0x4000),
            guest(&f.mem, RAM1, 0x4000)
        );
        // A reset forgets a suspended command.
        let fill = command(Opcode::Fill, &[range(1, 0, 0x10_0000, DST_VRAM)]);
        let step =
            f.engine
                .process_budgeted(&f.mem, &fill, 9, &mut NoEventQueue, &mut Budget::new(4096));
        assert_eq!(step, Step::Suspended);
        assert_eq!(f.engine.forget_parked(), 1);
        assert!(!f.engine.has_suspended());
    }

    #[test]
    fn guest_errors_are_counted_and_their_log_lines_limited() {
        let mut f = fixture();
        let bad = command(Opcode::Fill, &[range(1, u64::MAX, 8, NONE)]);
        for _ in 0..1000 {
            f.engine.execute(&f.mem, &bad);
        }
        let (errors, unlogged) = f.engine.stats().guest_errors();
        assert_eq!(errors, 1000);
        // All in well under a second: only the first few were logged.
        assert_eq!(unlogged, 1000 - GUEST_WARNINGS_PER_SEC);
        assert_eq!(f.engine.stats().snapshot().commands_failed, 1000);
    }

    #[test]
    fn counters_writes_the_block() {
        let mut f = fixture();
        assert_eq!(
            exec(&mut f, Opcode::Fill, 0, &[range(1, RAM0, 100, NONE)]),
            ok(100)
        );
        assert_eq!(exec(&mut f, Opcode::CtxCreate, 0, &[]), BAD_CONTEXT);
        exec(&mut f, Opcode::CtxCreate, 1, &[]);
        exec(&mut f, Opcode::Map, 1, &[range(RAM0, VA, 0x1000, RW)]);
        exec(&mut f, Opcode::Vread, 1, &[range(VA, RAM2, 40, NONE)]);
        exec(
            &mut f,
            Opcode::Vread,
            1,
            &[range(VA + 0x1000, RAM2, 40, NONE)],
        );
        exec(&mut f, Opcode::Unmap, 1, &[range(0, VA, 1, NONE)]);
        let expect = f.engine.stats().values();
        assert_eq!(expect[counter::COMMANDS_OK], 5);
        assert_eq!(expect[counter::COMMANDS_FAILED], 2);
        assert_eq!(expect[counter::BYTES_FILLED], 100);
        assert_eq!(expect[counter::BYTES_VREAD], 40);
        assert_eq!(expect[counter::FAULTS], 1);
        assert_eq!(expect[counter::EVENTS_DROPPED], 1);
        assert_eq!(expect[counter::INVALIDATIONS], 1);
        f.mem.write_slice(&[0xff; 200], GuestAddress(RAM2)).unwrap();
        assert_eq!(
            exec(&mut f, Opcode::Counters, 0, &[range(0, RAM2, 129, NONE)]),
            ok(counter::BLOCK_SIZE as u64)
        );
        let block = guest(&f.mem, RAM2, 200);
        for (i, value) in expect.iter().enumerate() {
            assert_eq!(
                block[i * 8..i * 8 + 8],
                value.to_le_bytes(),
                "{}",
                counter::NAMES[i]
            );
        }
        assert!(block[counter::COUNT * 8..128].iter().all(|&b| b == 0));
        assert!(
            block[128..].iter().all(|&b| b == 0xff),
            "wrote past the block"
        );
        for (bad, status) in [
            (range(0, RAM2, 127, NONE), Status::BadRequest),
            (range(0, 0, 128, DST_VRAM), Status::BadRequest),
            (
                range(0, RAM2 + RAM_LEN as u64 - 64, 128, NONE),
                Status::BadGuestAddr,
            ),
        ] {
            assert_rejected(&mut f, &command(Opcode::Counters, &[bad]), status, 0);
        }
        assert_rejected(
            &mut f,
            &command(Opcode::Counters, &[]),
            Status::BadRequest,
            0,
        );
    }
    // -- The device timeline ---------------------------------------------------

    /// The trace events of `path`, checked to be one JSON document.
    fn trace_events(path: &std::path::Path) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["traceEvents"].as_array().unwrap().clone()
    }

    #[test]
    fn the_timeline_has_every_command_and_adds_up_to_the_counters() {
        let mut f = fixture();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        let tracer = crate::trace::Tracer::create(&path).unwrap();
        f.engine.set_tracer(tracer.clone());
        let mut events = Vec::new();
        // Every copy direction and a fill, in one command.
        let mixed = [
            range(RAM0, 0, 0x3000, DST_VRAM),
            range(0, RAM1, 0x1000, SRC_VRAM),
            range(0, 0x10_0000, 0x800, RangeFlags::COPY_ALL),
            range(RAM0, RAM2, 0x200, NONE),
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Copy, &mixed)),
            ok(0x4a00)
        );
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Fill, &[good()])),
            ok(4096)
        );
        // A copy error half-way: only the first range moved.
        f.faults.copy_error_next(1);
        let two = [
            range(RAM0, 0, 0x1000, DST_VRAM),
            range(RAM0, 0x1000, 0x1000, DST_VRAM),
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(Opcode::Copy, &two)).bytes,
            0x1000
        );
        // A long copy in slices.
        let long = command(Opcode::Copy, &[range(RAM0, 0, 0x8_0000, DST_VRAM)]);
        let (executed, calls) = run_in_slices(&mut f, &long, 3, &mut events, 0x1_0000);
        assert_eq!(executed.response, Some(ok(0x8_0000)));
        assert!(calls > 4, "{calls}");
        // A device fault, parked, replayed.
        exec(&mut f, Opcode::CtxCreate, 5, &[]);
        let read = [range(VA, RAM2, 0x1000, NONE)];
        assert_eq!(
            process(&mut f, Opcode::Vread, 5, &read, 77, &mut events).response,
            None
        );
        exec(&mut f, Opcode::Map, 5, &[range(RAM0, VA, 4096, RW)]);
        let replayed = process(&mut f, Opcode::Replay, 5, &[], 78, &mut events);
        assert_eq!(replayed.resumed.map(|c| c.response), Some(ok(0x1000)));
        // An unknown opcode.
        assert_eq!(
            f.engine.execute(&f.mem, &command(0xeeu32, &[])).status,
            Status::Unsupported
        );
        let written = tracer.finish();
        assert_eq!(written.dropped, 0);

        let all = trace_events(&path);
        let commands: Vec<&serde_json::Value> = all.iter().filter(|e| e["ph"] == "X").collect();
        let stats = f.engine.stats().snapshot();
        // One event per command: the VREAD's ends where it parked, the
        // REPLAY's says how the VREAD completed.
        assert_eq!(
            commands.len() as u64,
            stats.commands_ok + stats.commands_failed,
            "{commands:#?}"
        );
        for (index, name) in counter::NAMES.iter().enumerate() {
            if !name.starts_with("bytes_") {
                continue;
            }
            let traced: u64 = commands
                .iter()
                .filter_map(|e| e["args"][*name].as_u64())
                .sum();
            assert_eq!(traced, stats.values()[index], "{name}");
        }
        assert_eq!(stats.bytes_guest_to_vram, 0x3000 + 0x1000 + 0x8_0000);
        let long_copy = commands
            .iter()
            .find(|e| e["args"]["slices"].as_u64().is_some_and(|n| n > 4))
            .unwrap();
        assert_eq!(long_copy["args"]["bytes_guest_to_vram"], 0x8_0000);
        // One after the other on the command track: none overlaps the next.
        for pair in commands.windows(2) {
            let end = pair[0]["ts"].as_f64().unwrap() + pair[0]["dur"].as_f64().unwrap();
            assert!(end <= pair[1]["ts"].as_f64().unwrap(), "{pair:#?}");
        }
        let parked = all
            .iter()
            .filter(|e| e["cat"] == "parked")
            .map(|e| e["ph"].as_str().unwrap())
            .collect::<Vec<_>>();
        assert_eq!(parked, ["b", "e"]);
        let replay = commands.iter().find(|e| e["name"] == "REPLAY").unwrap();
        assert_eq!(replay["args"]["resumed_status"], "ok");
        assert_eq!(replay["args"]["bytes_vread"], 0x1000);
        assert!(commands.iter().any(|e| e["name"] == "opcode 0xee"));
    }
}
