// SPDX-License-Identifier: GPL-2.0

//! The queues: encodes commands of the device interface (abi.rs), submits
//! them on the command virtqueue and waits for their completion; several
//! may be in flight at once.

use crate::abi::{self, CmdHeader, Range, Response};
use crate::shim;
use kernel::ffi::{c_long, c_void};
use kernel::bindings;
use kernel::prelude::*;

/// How long a command may take before the driver declares the device hung.
pub(crate) const COMMAND_TIMEOUT_MS: u32 = 10_000;

/// The device's queues (command and event), created by the shim.
pub(crate) struct Queues(*mut shim::Queues);

// SAFETY: the shim serializes queue operations with its own locks.
unsafe impl Send for Queues {}
// SAFETY: as above.
unsafe impl Sync for Queues {}

impl Queues {
    /// Wraps queues created by `hmmgpu_shim_queues_create`.
    pub(crate) fn new(queues: *mut shim::Queues) -> Self {
        Self(queues)
    }

    /// Posts the event buffers; events go to `hmmgpu_rust_event(cookie)`.
    pub(crate) fn start_events(&self, cookie: *mut c_void) -> Result {
        // SAFETY: the queues are live; `cookie` outlives them.
        let ret = unsafe { shim::hmmgpu_shim_events_start(self.0, cookie) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(())
    }

    /// Submits a prepared command; the returned [`InFlight`] waits for it.
    /// Allocates nothing (GFP_ATOMIC inside the virtqueue at most), so it
    /// may be called under locks that memory reclaim can wait for. While a
    /// reset is under way it fails with EAGAIN, except for the resetter's
    /// own `privileged` commands; after a failed reset with ENODEV.
    pub(crate) fn submit(
        &self,
        mut cmd: Command,
        privileged: bool,
    ) -> core::result::Result<InFlight, (Error, Command)> {
        // SAFETY: the buffers and token live in `cmd`, which the returned
        // `InFlight` keeps until the command completed (or leaks).
        let ret = unsafe {
            shim::hmmgpu_shim_cmd_submit(
                self.0,
                cmd.token,
                cmd.out.as_mut_ptr().cast(),
                cmd.out.len() as u32,
                cmd.resp.as_mut_ptr().cast(),
                Response::SIZE as u32,
                privileged,
            )
        };
        if ret < 0 {
            return Err((Error::from_errno(ret), cmd));
        }
        Ok(InFlight {
            queues: self.0,
            cmd: Some(cmd),
        })
    }

    /// Waits (up to `timeout_ms`) for a reset under way to end; whether
    /// commands may be submitted again.
    pub(crate) fn wait_running(&self, timeout_ms: u32) -> bool {
        // SAFETY: the queues are live.
        unsafe { shim::hmmgpu_shim_queues_wait_running(self.0, timeout_ms) }
    }

    /// Completions the driver found by polling, their interrupt lost or late.
    pub(crate) fn polled_completions(&self) -> u64 {
        // SAFETY: the queues are live.
        unsafe { shim::hmmgpu_shim_polled_completions(self.0) as u64 }
    }

    /// Ends a reset: commands run again, or (`false`) never again.
    pub(crate) fn set_running(&self, running: bool) {
        // SAFETY: the queues are live.
        unsafe { shim::hmmgpu_shim_queues_set_running(self.0, running) }
    }
}

/// A command with its buffers, ready to submit; reusable once completed.
pub(crate) struct Command {
    token: *mut shim::Cmd,
    /// The opcode last encoded.
    opcode: u32,
    /// Header and ranges (kmalloc'd: the virtqueue needs the direct map).
    out: KVec<u8>,
    resp: KBox<[u8; Response::SIZE]>,
}

// SAFETY: the shim's command token may be used from any thread.
unsafe impl Send for Command {}

impl Command {
    /// Allocates a command for up to `capacity` ranges.
    pub(crate) fn with_capacity(capacity: usize) -> Result<Self> {
        if capacity > abi::MAX_RANGES as usize {
            return Err(EINVAL);
        }
        let out = KVec::<u8>::with_capacity(CmdHeader::SIZE + capacity * Range::SIZE, GFP_KERNEL)?;
        let resp = KBox::new([0u8; Response::SIZE], GFP_KERNEL)?;
        // SAFETY: plain allocation.
        let token = unsafe { shim::hmmgpu_shim_cmd_alloc() };
        if token.is_null() {
            return Err(ENOMEM);
        }
        Ok(Self { token, opcode: abi::opcode::NOP, out, resp })
    }

    /// A command for exactly these ranges.
    pub(crate) fn new(opcode: u32, ctx: u32, tag: u64, ranges: &[Range]) -> Result<Self> {
        let mut cmd = Self::with_capacity(ranges.len())?;
        cmd.encode(opcode, ctx, tag, ranges)?;
        Ok(cmd)
    }

    /// (Re)writes the command without allocating: ENOSPC if the ranges do
    /// not fit the capacity it was made with.
    pub(crate) fn encode(&mut self, opcode: u32, ctx: u32, tag: u64, ranges: &[Range]) -> Result {
        let len = CmdHeader::SIZE + ranges.len() * Range::SIZE;
        if len > self.out.capacity() {
            return Err(ENOSPC);
        }
        let header = CmdHeader {
            opcode,
            ctx,
            tag,
            count: ranges.len() as u32,
            reserved: 0,
        };
        self.opcode = opcode;
        self.out.clear();
        // Within capacity: these never allocate.
        self.out.extend_from_slice(&header.to_bytes(), GFP_ATOMIC)?;
        for r in ranges {
            self.out.extend_from_slice(&r.to_bytes(), GFP_ATOMIC)?;
        }
        *self.resp = [0u8; Response::SIZE];
        Ok(())
    }
}

impl Command {
    /// Whether running the command a second time, after a reset gave it
    /// back, does no harm: not for ATOMIC, which the device may have
    /// executed before its completion was lost.
    pub(crate) fn can_resubmit(&self) -> bool {
        self.opcode != abi::opcode::ATOMIC
    }
}

impl Drop for Command {
    fn drop(&mut self) {
        // SAFETY: allocated in `with_capacity`; not in the ring (an
        // abandoned in-flight command is leaked, never dropped).
        unsafe { shim::hmmgpu_shim_cmd_free(self.token) };
    }
}

/// What waiting for a command gave.
pub(crate) enum Wait {
    /// The command completed with this response.
    Done(Response),
    /// The waiter was woken before completion (a device fault to resolve).
    Woken,
}

/// A submitted command.
pub(crate) struct InFlight {
    queues: *mut shim::Queues,
    /// `None` once completed and handed back.
    cmd: Option<Command>,
}

impl InFlight {
    /// The shim token, for `hmmgpu_shim_cmd_wake`.
    pub(crate) fn token(&self) -> *mut shim::Cmd {
        self.cmd.as_ref().map_or(core::ptr::null_mut(), |c| c.token)
    }

    /// Waits for completion or a wake-up. `Err(ETIMEDOUT)`: the device did
    /// not answer in time; `Err(ECANCELED)`: a device reset gave the
    /// command back unexecuted (it may be resubmitted); `Err(EIO)`: the
    /// device dropped it.
    pub(crate) fn wait(&mut self) -> Result<Wait> {
        let token = self.token();
        if token.is_null() {
            return Err(EINVAL);
        }
        // SAFETY: `token` was submitted and is still ours.
        let used = unsafe { shim::hmmgpu_shim_cmd_wait(self.queues, token, COMMAND_TIMEOUT_MS) };
        if used == -(bindings::EAGAIN as c_long) {
            return Ok(Wait::Woken);
        }
        if used < 0 {
            return Err(Error::from_errno(used as i32));
        }
        if (used as usize) < Response::SIZE {
            return Err(EIO);
        }
        let cmd = self.cmd.as_ref().ok_or(EINVAL)?;
        Ok(Wait::Done(Response::from_bytes(&cmd.resp[..]).ok_or(EIO)?))
    }

    /// The command back for reuse, once `wait` returned `Done` or
    /// `Err(ECANCELED)` (the device no longer owns its buffers).
    pub(crate) fn into_command(mut self) -> Option<Command> {
        self.cmd.take()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(cmd) = self.cmd.take() {
            // SAFETY: `cmd.token` is ours.
            let done = unsafe { shim::hmmgpu_shim_cmd_completed(cmd.token) };
            if done {
                drop(cmd);
            } else {
                // The device may still write these: never free them.
                pr_err!("hmmgpu: abandoning a command the device never completed\n");
                core::mem::forget(cmd);
            }
        }
    }
}

/// Builds the [`Range`] list of a COPY or FILL, to be split into commands of
/// at most [`abi::MAX_RANGES`] ranges.
pub(crate) struct RangeList {
    ranges: KVec<Range>,
}

impl RangeList {
    /// An empty list.
    pub(crate) fn new() -> Self {
        Self { ranges: KVec::new() }
    }

    /// Appends a range, merging it with the previous one when both sides
    /// are contiguous.
    pub(crate) fn push(&mut self, src: u64, dst: u64, len: u32, flags: u32) -> Result {
        if let Some(last) = self.ranges.last_mut() {
            if last.flags == flags
                && last.src + u64::from(last.len) == src
                && last.dst + u64::from(last.len) == dst
                && last.len.checked_add(len).is_some()
            {
                last.len += len;
                return Ok(());
            }
        }
        self.ranges.push(Range { src, dst, len, flags }, GFP_KERNEL)?;
        Ok(())
    }

    /// Appends a FILL range (`src` holds the pattern), merging it with the
    /// previous one when the destinations are contiguous.
    pub(crate) fn push_fill(&mut self, pattern: u64, dst: u64, len: u32, flags: u32) -> Result {
        if let Some(last) = self.ranges.last_mut() {
            if last.flags == flags
                && last.src == pattern
                && last.dst + u64::from(last.len) == dst
                && last.len.checked_add(len).is_some()
            {
                last.len += len;
                return Ok(());
            }
        }
        self.ranges.push(Range { src: pattern, dst, len, flags }, GFP_KERNEL)?;
        Ok(())
    }

    /// Number of ranges; the last range pushed (or merged into) is
    /// `len() - 1`.
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The ranges, in chunks that each fit in one command.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = &[Range]> {
        self.ranges.chunks(abi::MAX_RANGES as usize)
    }
}
