// SPDX-License-Identifier: GPL-2.0

//! The queues: encodes commands of the device interface (abi.rs), submits
//! them on the command virtqueue and waits for their completion; several
//! may be in flight at once.

use crate::abi::{self, CmdHeader, Range, Response};
use crate::shim;
use core::ffi::{c_long, c_void};
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

    /// Submits one command; the returned [`InFlight`] waits for it.
    pub(crate) fn submit(&self, opcode: u32, ctx: u32, tag: u64, ranges: &[Range]) -> Result<InFlight> {
        let count = u32::try_from(ranges.len()).map_err(|_| EINVAL)?;
        if count > abi::MAX_RANGES {
            return Err(EINVAL);
        }
        let header = CmdHeader {
            opcode,
            ctx,
            tag,
            count,
            reserved: 0,
        };
        let len = CmdHeader::SIZE + ranges.len() * Range::SIZE;
        // kmalloc'd: the virtqueue needs buffers in the direct map.
        let mut out = KVec::<u8>::with_capacity(len, GFP_KERNEL)?;
        out.extend_from_slice(&header.to_bytes(), GFP_KERNEL)?;
        for r in ranges {
            out.extend_from_slice(&r.to_bytes(), GFP_KERNEL)?;
        }
        let resp = KBox::new([0u8; Response::SIZE], GFP_KERNEL)?;
        // SAFETY: plain allocation.
        let cmd = unsafe { shim::hmmgpu_shim_cmd_alloc() };
        if cmd.is_null() {
            return Err(ENOMEM);
        }
        let mut flight = InFlight {
            cmd,
            out,
            resp,
            finished: true,
        };
        // SAFETY: the buffers and `cmd` live in `flight`, which keeps them
        // until the command completed (or leaks them if it never does).
        let ret = unsafe {
            shim::hmmgpu_shim_cmd_submit(
                self.0,
                cmd,
                flight.out.as_mut_ptr().cast(),
                len as u32,
                flight.resp.as_mut_ptr().cast(),
                Response::SIZE as u32,
            )
        };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        flight.finished = false;
        Ok(flight)
    }
}

/// What waiting for a command gave.
pub(crate) enum Wait {
    /// The command completed with this response.
    Done(Response),
    /// The waiter was woken before completion (a device fault to resolve).
    Woken,
}

/// A submitted command and its buffers.
pub(crate) struct InFlight {
    cmd: *mut shim::Cmd,
    out: KVec<u8>,
    resp: KBox<[u8; Response::SIZE]>,
    /// Whether the device is done with the buffers.
    finished: bool,
}

// SAFETY: the shim's command token may be waited on from any thread.
unsafe impl Send for InFlight {}

impl InFlight {
    /// The shim token, for `hmmgpu_shim_cmd_wake`.
    pub(crate) fn token(&self) -> *mut shim::Cmd {
        self.cmd
    }

    /// Waits for completion or a wake-up. `Err(ETIMEDOUT)`: the device did
    /// not answer in time; `Err(EIO)`: it dropped the command.
    pub(crate) fn wait(&mut self) -> Result<Wait> {
        if self.finished {
            return Err(EINVAL);
        }
        // SAFETY: `cmd` was submitted and is still ours.
        let used = unsafe { shim::hmmgpu_shim_cmd_wait(self.cmd, COMMAND_TIMEOUT_MS) };
        if used == -(bindings::EAGAIN as c_long) {
            return Ok(Wait::Woken);
        }
        if used < 0 {
            return Err(Error::from_errno(used as i32));
        }
        self.finished = true;
        if (used as usize) < Response::SIZE {
            return Err(EIO);
        }
        Ok(Wait::Done(Response::from_bytes(&self.resp[..]).ok_or(EIO)?))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            // The device may still write these: never free them.
            pr_err!("hmmgpu: abandoning a command the device never completed\n");
            core::mem::forget(core::mem::take(&mut self.out));
            return;
        }
        // SAFETY: allocated in `submit`, no longer in the ring.
        unsafe { shim::hmmgpu_shim_cmd_free(self.cmd) };
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

    /// The ranges, in chunks that each fit in one command.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = &[Range]> {
        self.ranges.chunks(abi::MAX_RANGES as usize)
    }
}
