// SPDX-License-Identifier: GPL-2.0

//! Device resets: after a command got no answer (a stalled queue) or the
//! device said it restarted (a RESTARTED event: a new backend took over),
//! and around a transport (PCI) reset. The queue side (stopping the rings,
//! giving commands back, restarting) is queue.rs; this is the policy and
//! what else a reset redoes (contexts, the link canary).
//!
//! A waiter never resets the device itself: it may hold a mirror lock,
//! which the MMU notifiers take from memory reclaim, while a reset tears the
//! interrupts down and sets them up again (taking the PCI MSI descriptors'
//! lock, under which others allocate). It asks for a reset
//! ([`Gpu::request_reset`]), which the reset work runs on a workqueue of
//! the GPU's own that makes progress under reclaim, and waits for its
//! command as before: the reset completes it or gives it back.

use super::{Gpu, RESET_WORK};
use crate::abi::{Opcode, Response, Status};
use crate::migrate;
use crate::queue::{Command, Wait, COMMAND_TIMEOUT_MS};
use crate::shim;
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::bindings;
use kernel::prelude::*;
use kernel::sync::{Arc, ArcBorrow};
use kernel::workqueue::{impl_has_work, Queue, WorkItem};

/// Why the driver resets the device ([`Gpu::request_reset`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResetCause {
    /// A command got no answer in [`COMMAND_TIMEOUT_MS`].
    NoAnswer,
    /// A RESTARTED event: a new backend process took the device over from
    /// one that died, and executes nothing until the device is reset
    /// (docs/device-spec.md).
    Restarted,
}

/// A reset asked for and not run yet.
#[derive(Clone, Copy)]
struct ResetRequest {
    /// The reset generation it is for: a reset since makes it moot.
    generation: u64,
    why: ResetCause,
}

/// The reset the work is to run. Under its lock, too, a reset's generation
/// ends ([`Gpu::restart`]), so a request is never made for a generation
/// that just ended.
pub(super) struct ResetSlot {
    pending: Option<ResetRequest>,
    /// Removal: no reset is queued any more ([`Gpu::close_resets`]).
    closed: bool,
}

impl ResetSlot {
    pub(super) const fn new() -> Self {
        Self {
            pending: None,
            closed: false,
        }
    }
}

/// The reset work's queue: ordered, with a rescuer thread (WQ_MEM_RECLAIM,
/// mm.c): a reset must make progress while memory reclaim waits for it (an
/// MMU notifier's command waiting on the reset). Destroyed by
/// [`Gpu::close_resets`] (or when dropped unused).
pub(super) struct ResetQueue(AtomicPtr<bindings::workqueue_struct>);

impl ResetQueue {
    pub(super) fn new(index: u32) -> Result<Self> {
        // SAFETY: plain allocation; NULL on failure.
        let wq = unsafe { shim::hmmgpu_alloc_reset_wq(index) };
        if wq.is_null() {
            return Err(ENOMEM);
        }
        Ok(Self(AtomicPtr::new(wq)))
    }

    /// Runs the queued work, then frees the queue. Idempotent.
    fn destroy(&self) {
        let wq = self.0.swap(ptr::null_mut(), Ordering::AcqRel);
        if !wq.is_null() {
            // SAFETY: ours, allocated in `new`, destroyed once (swapped out).
            unsafe { bindings::destroy_workqueue(wq) };
        }
    }
}

impl Drop for ResetQueue {
    fn drop(&mut self) {
        self.destroy();
    }
}

impl_has_work! {
    impl HasWork<Self, RESET_WORK> for Gpu { self.reset_work }
}

impl WorkItem<RESET_WORK> for Gpu {
    type Pointer = Arc<Gpu>;

    fn run(gpu: Arc<Gpu>) {
        gpu.run_reset();
    }
}

impl Gpu {
    /// Executes a command while the queues restart after a reset (only the
    /// resetter may): no waiting for the reset, no recovery.
    fn execute_privileged(&self, opcode: Opcode, ctx: u32) -> Result<Response> {
        let cmd = Command::new(opcode, ctx, self.tag(), &[])?;
        let mut flight = self.queues.submit(cmd, true).map_err(|(e, _)| e)?;
        loop {
            match flight.wait()? {
                Wait::Done(resp) => return Ok(resp),
                Wait::Woken => continue,
                Wait::GivenBack => return Err(EIO),
                Wait::TimedOut => return Err(ETIMEDOUT),
            }
        }
    }

    /// Asks for a device reset because a command of reset generation
    /// `generation` got no answer in [`COMMAND_TIMEOUT_MS`] (even by
    /// polling: not a lost interrupt but a stalled queue), or because the
    /// device restarted in that generation (`why`). Unless a reset came
    /// since, or one is under way (which finishes the command too):
    /// submissions wait from now on, and the reset work runs the reset
    /// ([`Gpu::run_reset`]). Never sleeps; callable under any lock of the
    /// driver and from the event interrupt.
    pub(super) fn request_reset(&self, generation: u64, why: ResetCause) {
        let mut slot = self.reset_request.lock();
        if slot.closed
            || slot.pending.is_some()
            || self.resets.load(Ordering::Acquire) != generation
            || !self.queues.begin_reset()
        {
            return;
        }
        slot.pending = Some(ResetRequest { generation, why });
        let wq = self.reset_wq.0.load(Ordering::Acquire);
        // SAFETY: every `Gpu` is made in an `Arc` (`Gpu::create`) and pinned
        // there; the caller's `&self` keeps its count above zero.
        let gpu: Arc<Gpu> = unsafe { ArcBorrow::from_raw(ptr::from_ref(self)) }.into();
        // SAFETY: not closed, so `close_resets` has not destroyed the queue
        // (it closes the slot first, under this lock).
        let queue = unsafe { Queue::from_raw(wq) };
        // Only one request is pending at a time, and the work takes it
        // before it runs: never already queued.
        let _ = queue.enqueue::<Arc<Gpu>, RESET_WORK>(gpu);
    }

    /// The reset work: resets the device for the request pending, unless
    /// the device is gone. The virtio reset stops the device, every
    /// command in the queue is finished (completed or given back), the
    /// queues restart and every context is recreated empty, since the
    /// device may hold mappings that an UNMAP refused during the reset
    /// should have removed (or, restarted, holds no context at all). VRAM
    /// is untouched: this resets the queues, not the memory. The device is
    /// declared lost (ENODEV) if it does not come back.
    fn run_reset(&self) {
        let _serialized = self.reset_lock.lock();
        let Some(request) = self.reset_request.lock().pending.take() else {
            return;
        };
        if self.resets.load(Ordering::Acquire) != request.generation {
            return; // a transport reset came since, and finished it
        }
        if self.lifecycle().is_gone() {
            return;
        }
        match request.why {
            ResetCause::NoAnswer => gpu_warn!(
                self,
                "a command got no answer in {} ms; resetting the device\n",
                COMMAND_TIMEOUT_MS
            ),
            ResetCause::Restarted => gpu_warn!(
                self,
                "the device restarted under the driver (its contexts are gone); resetting it\n"
            ),
        }
        self.queues.stop();
        if let Ok(contexts) = self.restart(true) {
            gpu_notice!(
                self,
                "reset done ({} contexts recreated); commands in flight were retried\n",
                contexts
            );
        }
    }

    /// Removal: no reset is asked for any more, and one asked for runs to
    /// its end before the reset queue goes.
    pub(super) fn close_resets(&self) {
        self.reset_request.lock().closed = true;
        self.reset_wq.destroy();
    }

    /// Restarts stopped queues (`negotiate`: the features too, which the
    /// virtio core does itself after a transport reset), recreates every
    /// context in use empty and lets submissions resume, with reclaim off
    /// (submitters wait for this, some under the mirror lock that reclaim's
    /// notifiers take). Returns how many contexts were recreated. On
    /// failure the queues stay dead and the device is lost: ENODEV.
    fn restart(&self, negotiate: bool) -> Result<usize> {
        // SAFETY: plain flag save; restored below on this task.
        let flags = unsafe { shim::hmmgpu_memalloc_noreclaim_save() };
        let result = self.restart_queues(negotiate);
        // Before resuming, so a command submitted after it gets the new one;
        // under the request slot's lock, so no request is made for the
        // generation ending (see `request_reset`).
        {
            let _slot = self.reset_request.lock();
            self.resets.fetch_add(1, Ordering::AcqRel);
        }
        if result.is_ok() {
            self.queues.resume();
        }
        // SAFETY: saved above.
        unsafe { shim::hmmgpu_memalloc_noreclaim_restore(flags) };
        result.map_err(|e| {
            gpu_err!(
                self,
                "the device did not come back from its reset: {:?}\n",
                e
            );
            self.hung()
        })
    }

    fn restart_queues(&self, negotiate: bool) -> Result<usize> {
        self.queues.restart(negotiate)?;
        let mut recreated = 0;
        let mut index = 0;
        loop {
            let used = {
                let contexts = self.contexts.lock();
                match contexts.slots.get(index) {
                    None => break,
                    Some(slot) => slot.used,
                }
            };
            index += 1;
            if !used {
                continue;
            }
            let ctx = index as u32;
            // Whatever the destroy answers, the create must succeed.
            self.execute_privileged(Opcode::CtxDestroy, ctx)?;
            let resp = self.execute_privileged(Opcode::CtxCreate, ctx)?;
            if resp.status != Status::Ok {
                gpu_err!(self, "recreating context {}: {}\n", ctx, resp.status.name());
                return Err(EIO);
            }
            recreated += 1;
        }
        Ok(recreated)
    }

    /// `virtio_driver.reset_prepare`: a transport reset (PCI function
    /// reset, bus reset) is coming, which on a real GPU loses VRAM. While
    /// the device still works, every page in VRAM is migrated to system
    /// memory (as on removal); then the queues stop.
    pub(crate) fn reset_prepare(&self) {
        gpu_notice!(
            self,
            "device reset requested: evicting VRAM, then stopping\n"
        );
        if !self.is_lost() && self.link_ok() {
            let evicted =
                migrate::evict_all(self, &self.private) + migrate::evict_all(self, &self.coherent);
            self.private.reclaim_deferred();
            self.coherent.reclaim_deferred();
            gpu_notice!(
                self,
                "{} pages evicted to system memory before the reset\n",
                evicted
            );
        }
        // Not held while evicting: the eviction's MMU notifiers take mirror
        // locks, under which a timed-out command takes this lock to recover.
        let _serialized = self.reset_lock.lock();
        self.queues.stop();
    }

    /// `virtio_driver.reset_done`: the virtio core reset the device and
    /// renegotiated its features; the queues restart and the device is used
    /// again (its VRAM holds nothing of anyone's but the link canary).
    pub(crate) fn reset_done(&self) -> Result {
        let _serialized = self.reset_lock.lock();
        if self.is_lost() {
            gpu_err!(
                self,
                "the device was lost before its reset; it stays dead\n"
            );
            return Err(ENODEV);
        }
        let contexts = self.restart(false)?;
        self.write_canary();
        gpu_notice!(
            self,
            "reset done ({} contexts recreated); the device is back\n",
            contexts
        );
        Ok(())
    }
}
