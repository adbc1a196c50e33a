// SPDX-License-Identifier: GPL-2.0

//! Device resets: after a command got no answer (a stalled queue) and
//! around a transport (PCI) reset. The queue side (stopping the rings,
//! giving commands back, restarting) is queue.rs; this is the policy and
//! what else a reset redoes (contexts, the link canary).

use super::Gpu;
use crate::abi::{Opcode, Response, Status};
use crate::migrate;
use crate::queue::{Command, Wait, COMMAND_TIMEOUT_MS};
use crate::shim;
use core::sync::atomic::Ordering;
use kernel::prelude::*;

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

    /// Resets the device after a command of reset generation `generation`
    /// got no answer in [`COMMAND_TIMEOUT_MS`] (even by polling: not a lost
    /// interrupt but a stalled queue). Unless another reset came since: the
    /// virtio reset stops the device, every command in the queue is
    /// finished (completed or given back), the queues restart and every
    /// context is recreated empty, since the device may hold mappings
    /// that an UNMAP refused during the reset should have removed. VRAM is
    /// untouched: this resets the queues, not the memory. The device is
    /// declared lost (ENODEV) if it does not come back.
    pub(super) fn recover(&self, generation: u64) -> Result {
        let _serialized = self.reset_lock.lock();
        if self.resets.load(Ordering::Acquire) != generation {
            return Ok(()); // another waiter's reset finished our command too
        }
        if self.lifecycle().is_gone() {
            return Err(ENODEV);
        }
        gpu_warn!(
            self,
            "a command got no answer in {} ms; resetting the device\n",
            COMMAND_TIMEOUT_MS
        );
        self.queues.stop();
        let contexts = self.restart(true)?;
        gpu_notice!(
            self,
            "reset done ({} contexts recreated); commands in flight were retried\n",
            contexts
        );
        Ok(())
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
        // Before resuming, so a command submitted after it gets the new one.
        self.resets.fetch_add(1, Ordering::AcqRel);
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
