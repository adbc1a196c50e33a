// SPDX-License-Identifier: GPL-2.0

//! Device MMU contexts and the events the device reports about them: an
//! MMU access (VREAD, VWRITE, ATOMIC) runs in a context, and a FAULT event
//! for it is resolved and the access replayed.

use super::reset::ResetCause;
use super::Gpu;
use crate::abi::{self, Event, Opcode, Range, Response, Status};
use crate::queue::{Command, Detached, Token, Wait};
use core::ptr;
use core::sync::atomic::Ordering;
use kernel::prelude::*;
use kernel::sync::ArcBorrow;

/// One device MMU context's slot: who waits on its command, and the fault
/// the device reported for it.
pub(super) struct CtxSlot {
    pub(super) used: bool,
    waiter: *const Token,
    /// The device virtual range [start, end) of the access (VREAD, VWRITE,
    /// ATOMIC) being submitted or in flight; None: no access, so every
    /// FAULT event for this context is spurious.
    access: Option<(u64, u64)>,
    /// The pending FAULT event in `access` (the lowest address if several
    /// came before the waiter took it).
    fault: Option<Event>,
}

impl CtxSlot {
    pub(super) const fn new(used: bool) -> Self {
        CtxSlot {
            used,
            waiter: ptr::null(),
            access: None,
            fault: None,
        }
    }
}

/// The device virtual range an MMU access command touches (VREAD reads
/// through `src`, VWRITE and ATOMIC write through `dst`).
fn access_span(opcode: Opcode, ranges: &[Range]) -> (u64, u64) {
    let va = |r: &Range| {
        if opcode == Opcode::Vread {
            r.src
        } else {
            r.dst
        }
    };
    let start = ranges.iter().map(va).min().unwrap_or(0);
    let end = ranges
        .iter()
        .map(|r| va(r).saturating_add(u64::from(r.len)))
        .max()
        .unwrap_or(0);
    (start, end)
}

/// A command a device reset gave back unexecuted, to submit again.
struct Resubmit(Command);

/// An MMU access [`Gpu::prepare_mmu`] built.
pub(crate) struct PreparedAccess {
    ctx: u32,
    span: (u64, u64),
    cmd: Command,
}

/// An MMU access [`Gpu::submit_mmu`] submitted, which
/// [`Gpu::finish_mmu`] must finish.
pub(crate) struct SubmittedAccess {
    ctx: u32,
    span: (u64, u64),
    cmd: Detached,
}

/// The REPLAY that ends a device fault's resolution. The resolver submits
/// it right behind its last MAP ([`Replay::run_behind`]), so the device
/// maps, resumes the parked access and completes all three in one round
/// trip; if the resolver does not, [`Gpu::execute_mmu`] runs it alone.
pub(crate) struct Replay {
    cmd: Option<Command>,
    /// Once submitted: the device's answer (`None`: a reset gave it back).
    answer: Option<Result<Option<Response>>>,
}

impl Replay {
    fn new(gpu: &Gpu, ctx: u32) -> Result<Self> {
        Ok(Replay {
            cmd: Some(Command::new(Opcode::Replay, ctx, gpu.tag(), &[])?),
            answer: None,
        })
    }

    /// Runs the MAP commands `cmds` with the REPLAY behind them (see
    /// [`Gpu::run_prepared_then`]); the MAPs' outcome. Once only: later
    /// calls run `cmds` alone.
    pub(crate) fn run_behind(&mut self, gpu: &Gpu, cmds: KVec<Command>) -> Result<u64> {
        let Some(cmd) = self.cmd.take() else {
            return gpu.run_prepared(cmds);
        };
        let (maps, answer) = gpu.run_prepared_then(cmds, cmd);
        self.answer = answer;
        maps
    }
}

/// The contexts in use; `slots[i]` is context `i + 1`.
pub(super) struct Contexts {
    pub(super) slots: KVec<CtxSlot>,
}

// SAFETY: only touched under its lock; `waiter` is a command's token.
unsafe impl Send for Contexts {}

impl Gpu {
    /// Executes a device MMU access (VREAD, VWRITE, ATOMIC) of context
    /// `ctx`. Each device fault it raises is handed to `resolve`; on success
    /// the command is replayed (by `resolve`, behind its MAP, or after it),
    /// on error it is cancelled and the error returned. A FAULT event that
    /// turns out not to be this command's (the REPLAY or CANCEL finds
    /// nothing parked: BAD_CONTEXT) is counted as spurious and changes
    /// nothing; the command keeps running. `faults` counts the device
    /// faults resolved and replayed (not spurious ones).
    pub(crate) fn execute_mmu(
        &self,
        opcode: Opcode,
        ctx: u32,
        ranges: &[Range],
        faults: &mut u64,
        resolve: impl FnMut(&Event, &mut Replay) -> Result,
    ) -> Result<Response> {
        let access = self.prepare_mmu(opcode, ctx, ranges)?;
        let access = self.submit_mmu(access)?;
        self.finish_mmu(access, faults, resolve)
    }

    /// Builds an MMU access of [`Gpu::execute_mmu`], to submit later with
    /// [`Gpu::submit_mmu`] without allocating.
    pub(crate) fn prepare_mmu(
        &self,
        opcode: Opcode,
        ctx: u32,
        ranges: &[Range],
    ) -> Result<PreparedAccess> {
        Ok(PreparedAccess {
            ctx,
            span: access_span(opcode, ranges),
            cmd: Command::new(opcode, ctx, self.tag(), ranges)?,
        })
    }

    /// Submits a prepared access, to be finished by [`Gpu::finish_mmu`]
    /// (always: until then the context's access slot is taken). Allocates
    /// nothing: callable under the mirror lock.
    pub(crate) fn submit_mmu(&self, access: PreparedAccess) -> Result<SubmittedAccess> {
        let PreparedAccess { ctx, span, cmd } = access;
        Ok(SubmittedAccess {
            ctx,
            span,
            cmd: self.submit_access(cmd, ctx, span)?,
        })
    }

    /// The last part of [`Gpu::execute_mmu`]: waits for the access,
    /// resolving its faults, and submits it once more if a device reset
    /// gave it back.
    pub(crate) fn finish_mmu(
        &self,
        access: SubmittedAccess,
        faults: &mut u64,
        mut resolve: impl FnMut(&Event, &mut Replay) -> Result,
    ) -> Result<Response> {
        let SubmittedAccess { ctx, span, mut cmd } = access;
        let mut resubmitted = false;
        loop {
            match self.drive_access(cmd, ctx, faults, &mut resolve) {
                Err(Resubmit(back)) if !resubmitted && back.can_resubmit() => {
                    // A device reset gave it back; the context is empty now,
                    // so the access faults its pages in again.
                    cmd = self.submit_access(back, ctx, span)?;
                    resubmitted = true;
                }
                Err(Resubmit(_)) => return Err(EIO),
                Ok(result) => return result,
            }
        }
    }

    /// Submits an MMU access of [span.0, span.1) on `ctx`.
    fn submit_access(&self, cmd: Command, ctx: u32, span: (u64, u64)) -> Result<Detached> {
        // Before the submission: the device may report a fault before the
        // waiter is set, and on_event must know the access by then.
        self.begin_access(ctx, span);
        self.submit_detached(cmd)
            .inspect_err(|_| self.end_access(ctx))
    }

    /// Waits for a submitted MMU access for [`Gpu::finish_mmu`], resolving
    /// its faults; gives the command back if a device reset returned it
    /// unexecuted.
    fn drive_access(
        &self,
        cmd: Detached,
        ctx: u32,
        faults: &mut u64,
        resolve: &mut impl FnMut(&Event, &mut Replay) -> Result,
    ) -> core::result::Result<Result<Response>, Resubmit> {
        let generation = cmd.generation;
        let mut flight = self.queues.attach(cmd);
        self.set_waiter(ctx, flight.token());
        let mut failure = None;
        let result = loop {
            if let Some(fault) = self.take_fault(ctx) {
                let mut replay = match Replay::new(self, ctx) {
                    Ok(replay) => replay,
                    Err(e) => break Err(e),
                };
                // A resolution that failed after its REPLAY ran: the access
                // fails, and its next fault is cancelled, not resolved.
                let resolved = match failure {
                    Some(e) => Err(e),
                    None => resolve(&fault, &mut replay),
                };
                let answer = match (replay.answer.take(), &resolved) {
                    (Some(answer), _) => answer,
                    (None, Ok(())) => self.execute(Opcode::Replay, ctx, &[]).map(Some),
                    (None, Err(_)) => self.execute(Opcode::Cancel, ctx, &[]).map(Some),
                };
                match answer {
                    Err(e) => break Err(e),
                    // Given back by a reset, as the access will be.
                    Ok(None) => {}
                    // Nothing parked: the event was spurious.
                    Ok(Some(r)) if r.status == Status::BadContext => self.note_spurious(&fault),
                    Ok(Some(_)) => match resolved {
                        Ok(()) => *faults += 1,
                        Err(e) => failure = Some(e),
                    },
                }
                continue;
            }
            // `None`: a device reset gave the command back.
            match self.wait(&mut flight, generation) {
                Ok(Wait::Done(resp)) => break Ok(Some(resp)),
                Ok(Wait::Woken | Wait::TimedOut) => continue,
                Ok(Wait::GivenBack) => break Ok(None),
                Err(e) => break Err(e),
            }
        };
        self.end_access(ctx);
        match (result, failure) {
            (Ok(None), _) => match flight.into_command() {
                Some(cmd) => Err(Resubmit(cmd)),
                None => Ok(Err(EIO)),
            },
            (Ok(Some(_)), Some(e)) => Ok(Err(e)),
            (Ok(Some(resp)), None) => Ok(Ok(resp)),
            (Err(e), _) => Ok(Err(e)),
        }
    }

    /// Allocates a device MMU context and creates it on the device.
    pub(crate) fn ctx_create(&self) -> Result<u32> {
        let ctx = {
            let mut contexts = self.contexts.lock();
            let free = contexts.slots.iter().position(|s| !s.used);
            let index = match free {
                Some(i) => i,
                None => {
                    if contexts.slots.len() >= abi::MAX_CONTEXTS as usize {
                        return Err(EBUSY);
                    }
                    contexts.slots.push(CtxSlot::new(false), GFP_ATOMIC)?;
                    contexts.slots.len() - 1
                }
            };
            contexts.slots[index] = CtxSlot::new(true);
            index as u32 + 1
        };
        let mut result = self.execute(Opcode::CtxCreate, ctx, &[]);
        if matches!(result, Ok(r) if r.status == Status::BadContext) {
            // Left over from a previous driver instance (the device keeps
            // contexts until it is reset): recreate it empty.
            let _ = self.execute(Opcode::CtxDestroy, ctx, &[]);
            result = self.execute(Opcode::CtxCreate, ctx, &[]);
        }
        match result {
            Ok(r) if r.status == Status::Ok => Ok(ctx),
            other => {
                self.contexts.lock().slots[ctx as usize - 1].used = false;
                gpu_err!(
                    self,
                    "CTX_CREATE {} failed: {:?}\n",
                    ctx,
                    other.map(|r| r.status)
                );
                Err(EIO)
            }
        }
    }

    /// Destroys a context created by [`Gpu::ctx_create`].
    pub(crate) fn ctx_destroy(&self, ctx: u32) {
        // Best effort: a dead device has no contexts to destroy.
        let _ = self.execute(Opcode::CtxDestroy, ctx, &[]);
        self.contexts.lock().slots[ctx as usize - 1] = CtxSlot::new(false);
    }

    /// Marks an access of [span.0, span.1) in flight on `ctx`, dropping any
    /// stale fault.
    fn begin_access(&self, ctx: u32, span: (u64, u64)) {
        if let Some(slot) = self.contexts.lock().slots.get_mut(ctx as usize - 1) {
            slot.access = Some(span);
            slot.fault = None;
        }
    }

    fn set_waiter(&self, ctx: u32, waiter: *const Token) {
        if let Some(slot) = self.contexts.lock().slots.get_mut(ctx as usize - 1) {
            slot.waiter = waiter;
        }
    }

    /// The access of `ctx` is over: later FAULT events for it are spurious.
    fn end_access(&self, ctx: u32) {
        if let Some(slot) = self.contexts.lock().slots.get_mut(ctx as usize - 1) {
            slot.waiter = ptr::null();
            slot.access = None;
            slot.fault = None;
        }
    }

    /// Counts a FAULT event no command was parked on (logged once: a fault
    /// storm would flood the console).
    fn note_spurious(&self, event: &Event) {
        self.counters
            .spurious_faults
            .fetch_add(1, Ordering::Relaxed);
        if !self.spurious_logged.swap(true, Ordering::Relaxed) {
            gpu_info!(self, "ignoring a FAULT event no command waits on (context {}, address {:#x}); further ones are only counted (debugfs counters)\n", event.ctx,
                event.addr);
        }
    }

    fn take_fault(&self, ctx: u32) -> Option<Event> {
        self.contexts
            .lock()
            .slots
            .get_mut(ctx as usize - 1)?
            .fault
            .take()
    }

    /// An event from the device (interrupt context). A FAULT event counts
    /// only if an access of its context is in flight and the address is in
    /// it; it then wakes the waiter, which resolves and replays. Anything
    /// else is counted as spurious and dropped: O(1) work per event, so a
    /// storm of them cannot livelock the driver.
    /// The command queue's interrupt: finishes the completed commands.
    pub(crate) fn cmd_interrupt(&self) {
        self.queues.cmd_interrupt();
    }

    /// The event queue's interrupt: handles every event.
    pub(crate) fn event_interrupt(gpu: ArcBorrow<'_, Gpu>) {
        gpu.queues
            .event_interrupt(|bytes| Gpu::on_event(gpu, bytes));
    }

    fn on_event(gpu: ArcBorrow<'_, Gpu>, bytes: &[u8]) {
        let Some(event) = Event::from_bytes(bytes) else {
            gpu_warn!(gpu, "short event ({} bytes)\n", bytes.len());
            return;
        };
        if event.kind == abi::event::ECC {
            Gpu::on_ecc_event(gpu, &event);
            return;
        }
        if event.kind == abi::event::RESTARTED {
            // A new backend took over and executes nothing until the reset,
            // which gives every command in flight back to be submitted
            // again.
            gpu.request_reset(gpu.reset_generation(), ResetCause::Restarted);
            return;
        }
        if event.kind != abi::event::FAULT {
            gpu_warn!(gpu, "unknown event kind {}\n", event.kind);
            return;
        }
        gpu.on_fault_event(event);
    }

    /// A FAULT event (see [`Gpu::on_event`]).
    fn on_fault_event(&self, event: Event) {
        self.counters.fault_events.fetch_add(1, Ordering::Relaxed);
        let mut contexts = self.contexts.lock();
        let slot = (event.ctx as usize)
            .checked_sub(1)
            .and_then(|i| contexts.slots.get_mut(i));
        let Some(slot) =
            slot.filter(|s| matches!(s.access, Some((a, b)) if a <= event.addr && event.addr < b))
        else {
            drop(contexts);
            self.note_spurious(&event);
            return;
        };
        match &slot.fault {
            // Already pending: the waiter resolves from the lower address.
            Some(pending) => {
                if event.addr < pending.addr {
                    slot.fault = Some(event);
                }
            }
            None => {
                slot.fault = Some(event);
                if !slot.waiter.is_null() {
                    // SAFETY: the waiter's command is in flight until it
                    // clears itself under this lock.
                    unsafe { &*slot.waiter }.wake();
                }
            }
        }
    }
}
