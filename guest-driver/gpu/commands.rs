// SPDX-License-Identifier: GPL-2.0

//! Running commands on the device: submission (waiting for a reset under
//! way), waiting (resetting a stalled device, see reset.rs), resubmission
//! of a command a reset gave back, and the command kinds built on them.

use super::reset::ResetCause;
use super::Gpu;
use crate::abi::{self, Opcode, Range, RangeFlags, Response, Status};
use crate::pages::PageRef;
use crate::queue::{Command, Detached, InFlight, RangeList, Wait, COMMAND_TIMEOUT_MS};
use core::sync::atomic::Ordering;
use kernel::page::Page;
use kernel::prelude::*;

/// How long a submission waits for a reset under way: the reset ends with
/// its first command answered, or with the device declared lost once that
/// command timed out ([`COMMAND_TIMEOUT_MS`], plus the time to get there).
const RESET_WAIT_MS: u32 = 2 * COMMAND_TIMEOUT_MS;

impl Gpu {
    /// Submits a prepared command unless the queues are gone, waiting for
    /// a reset under way to end. Allocates nothing: callable under the
    /// mirror lock (which memory reclaim can wait for through the MMU
    /// notifier; a reset never enters reclaim, see [`Gpu::request_reset`]).
    /// Returns the reset generation the command runs in.
    pub(super) fn submit(
        &self,
        mut cmd: Command,
    ) -> core::result::Result<(InFlight<'_>, u64), (Error, Command)> {
        loop {
            match self.queues.submit(cmd, false) {
                Ok(flight) => return Ok((flight, self.resets.load(Ordering::Acquire))),
                Err((e, back)) if e == EAGAIN => cmd = back,
                Err(other) => return Err(other),
            }
            if !self.queues.wait_settled(RESET_WAIT_MS) {
                return Err((ENODEV, cmd));
            }
        }
    }

    /// Waits for a submitted command. A timeout resets the device (see
    /// [`Gpu::request_reset`]), which finishes the command: completed, or
    /// given back ([`Wait::GivenBack`]). Never returns [`Wait::TimedOut`]: a
    /// command the reset did not finish either makes the device lost.
    pub(super) fn wait(&self, flight: &mut InFlight<'_>, generation: u64) -> Result<Wait> {
        match flight.wait()? {
            Wait::TimedOut => {
                self.request_reset(generation, ResetCause::NoAnswer);
                // The reset finishes the command; still nothing: give up.
                loop {
                    match flight.wait()? {
                        Wait::TimedOut => return Err(self.hung()),
                        Wait::Woken => continue,
                        other => return Ok(other),
                    }
                }
            }
            other => Ok(other),
        }
    }

    /// Executes a prepared command and waits for its response; hands the
    /// command back for reuse when the device is done with it. A command a
    /// device reset gave back is submitted once more if that is harmless
    /// ([`Command::can_resubmit`]), else fails with EIO.
    pub(crate) fn execute_cmd(&self, cmd: Command) -> Result<(Response, Command)> {
        let mut cmd = cmd;
        let mut resubmitted = false;
        loop {
            let (mut flight, generation) = self.submit(cmd).map_err(|(e, _)| e)?;
            if let Some(resp) = self.settle(&mut flight, generation)? {
                let cmd = flight.into_command().ok_or(EINVAL)?;
                return Ok((resp, cmd));
            }
            cmd = flight.into_command().ok_or(EIO)?;
            if resubmitted || !cmd.can_resubmit() {
                return Err(EIO);
            }
            resubmitted = true;
        }
    }

    /// Submits a prepared command without waiting for it: [`Gpu::reap`]
    /// waits later. For a command whose completion only matters once a
    /// later command on the same queue completes (the device executes and
    /// completes them in order).
    pub(crate) fn submit_detached(&self, cmd: Command) -> Result<Detached> {
        let (flight, generation) = self.submit(cmd).map_err(|(e, _)| e)?;
        Ok(flight.detach(generation))
    }

    /// Waits for a command [`Gpu::submit_detached`] submitted, as
    /// [`Gpu::execute_cmd`] would have.
    pub(crate) fn reap(&self, detached: Detached) -> Result<(Response, Command)> {
        let generation = detached.generation;
        let mut flight = self.queues.attach(detached);
        if let Some(resp) = self.settle(&mut flight, generation)? {
            return Ok((resp, flight.into_command().ok_or(EINVAL)?));
        }
        match flight.into_command() {
            Some(cmd) if cmd.can_resubmit() => self.execute_cmd(cmd),
            _ => Err(EIO),
        }
    }

    /// Waits until the device answers a submitted command (`Some`), or a
    /// device reset gives it back unexecuted (`None`).
    fn settle(&self, flight: &mut InFlight<'_>, generation: u64) -> Result<Option<Response>> {
        loop {
            match self.wait(flight, generation)? {
                Wait::Done(resp) => return Ok(Some(resp)),
                Wait::GivenBack => return Ok(None),
                Wait::Woken | Wait::TimedOut => continue,
            }
        }
    }

    /// Executes one command on the device and waits for its response.
    /// Allocates: not under the mirror lock (see [`Gpu::prepare`]).
    pub(crate) fn execute(&self, opcode: Opcode, ctx: u32, ranges: &[Range]) -> Result<Response> {
        let cmd = Command::new(opcode, ctx, self.tag(), ranges)?;
        self.execute_cmd(cmd).map(|(resp, _)| resp)
    }

    /// Builds the commands that run `list` as `opcode` of context `ctx`, to
    /// run later with [`Gpu::run_prepared`] without allocating.
    pub(crate) fn prepare(
        &self,
        opcode: Opcode,
        ctx: u32,
        list: &RangeList,
    ) -> Result<KVec<Command>> {
        let mut cmds = KVec::new();
        for chunk in list.chunks() {
            cmds.push(Command::new(opcode, ctx, self.tag(), chunk)?, GFP_KERNEL)?;
        }
        Ok(cmds)
    }

    /// Runs commands built by [`Gpu::prepare`]; EIO if the device reports
    /// an error for any of them.
    pub(crate) fn run_prepared(&self, cmds: KVec<Command>) -> Result<u64> {
        let mut bytes = 0;
        for cmd in cmds {
            let (resp, _) = self.execute_cmd(cmd)?;
            self.check(&resp)?;
            bytes += resp.bytes;
        }
        Ok(bytes)
    }

    /// [`Gpu::run_prepared`], with `tail` submitted right behind the last
    /// command before either is waited for: the device completes both in
    /// one round trip (it executes commands in order, so `tail` sees what
    /// they did). Returns the commands' outcome, and the tail's once it was
    /// submitted: its response, or `None` if a device reset gave it back.
    /// If the commands failed before the tail was submitted, that is `None`.
    pub(crate) fn run_prepared_then(
        &self,
        mut cmds: KVec<Command>,
        tail: Command,
    ) -> (Result<u64>, Option<Result<Option<Response>>>) {
        let Some(last) = cmds.pop() else {
            return (Ok(0), Some(self.run_tail(tail)));
        };
        let bytes = match self.run_prepared(cmds) {
            Ok(bytes) => bytes,
            Err(e) => return (Err(e), None),
        };
        let (mut flight, generation) = match self.submit(last) {
            Ok(submitted) => submitted,
            Err((e, _)) => return (Err(e), None),
        };
        let tail = self.submit(tail);
        // Both are waited for before anything returns: the device owns
        // their buffers until then.
        let last = self.settle(&mut flight, generation);
        let tail = tail
            .map_err(|(e, _)| e)
            .and_then(|(mut tail, generation)| self.settle(&mut tail, generation));
        let last = match last {
            Ok(Some(resp)) => Ok(resp),
            // A reset gave it back: the same as run_prepared would.
            Ok(None) => match flight.into_command() {
                Some(cmd) if cmd.can_resubmit() => self.execute_cmd(cmd).map(|(resp, _)| resp),
                _ => Err(EIO),
            },
            Err(e) => Err(e),
        };
        let last = last.and_then(|resp| self.check(&resp).map(|()| bytes + resp.bytes));
        (last, Some(tail))
    }

    /// The tail of [`Gpu::run_prepared_then`] when there is nothing before it.
    fn run_tail(&self, tail: Command) -> Result<Option<Response>> {
        let (mut flight, generation) = self.submit(tail).map_err(|(e, _)| e)?;
        self.settle(&mut flight, generation)
    }

    /// EIO, logged, if the device reported an error for a command.
    pub(crate) fn check(&self, resp: &Response) -> Result {
        if resp.status == Status::Ok {
            return Ok(());
        }
        self.note_failure(resp);
        gpu_err!(
            self,
            "command failed: {} at range {}\n",
            resp.status.name(),
            resp.failed_index
        );
        Err(EIO)
    }

    /// Counts a failed command's status.
    fn note_failure(&self, resp: &Response) {
        if resp.status == Status::CopyError {
            self.counters.copy_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs every range of `list` as `opcode` (COPY or FILL) until one
    /// fails. Returns how many ranges, from the start of the list, were done
    /// in full, and EIO if the device failed one (with COPY_ERROR: the
    /// ranges before its `failed_index` were done, the rest were not), or
    /// the error that stopped the submission.
    pub(crate) fn run_partial(&self, opcode: Opcode, list: &RangeList) -> (usize, Result) {
        let cmds = match self.prepare(opcode, 0, list) {
            Ok(cmds) => cmds,
            Err(e) => return (0, Err(e)),
        };
        let mut done = 0;
        for (cmd, chunk) in cmds.into_iter().zip(list.chunks()) {
            let resp = match self.execute_cmd(cmd) {
                Ok((resp, _)) => resp,
                Err(e) => return (done, Err(e)),
            };
            if resp.status == Status::Ok {
                done += chunk.len();
                continue;
            }
            self.note_failure(&resp);
            let what = if opcode == Opcode::Fill {
                "FILL"
            } else {
                "COPY"
            };
            gpu_warn!(
                self,
                "{} failed: {} at range {} of {}\n",
                what,
                resp.status.name(),
                resp.failed_index,
                chunk.len()
            );
            if resp.status == Status::CopyError {
                done += core::cmp::min(resp.failed_index as usize, chunk.len());
            }
            return (done, Err(EIO));
        }
        (done, Ok(()))
    }

    /// Runs every range of `list` as `opcode` (COPY or FILL); fails with EIO
    /// if the device reports an error for any of them.
    pub(crate) fn run(&self, opcode: Opcode, list: &RangeList) -> Result<u64> {
        self.run_ctx(opcode, 0, list)
    }

    /// [`Gpu::run`] for an opcode of context `ctx` (MAP, UNMAP).
    /// Allocates: not under the mirror lock (see [`Gpu::prepare`]).
    pub(crate) fn run_ctx(&self, opcode: Opcode, ctx: u32, list: &RangeList) -> Result<u64> {
        self.run_prepared(self.prepare(opcode, ctx, list)?)
    }

    /// Reads the device's counters (COUNTERS command).
    pub(crate) fn counters(&self) -> Result<[u64; abi::counter::COUNT]> {
        let page = Page::alloc_page(GFP_KERNEL)?;
        // SAFETY: our page.
        let phys = unsafe { PageRef::from_raw(page.as_ptr()) }
            .ok_or(ENOMEM)?
            .phys();
        let range = Range::new(0, phys, abi::counter::BLOCK_SIZE as u32, RangeFlags::NONE);
        let resp = self.execute(Opcode::Counters, 0, &[range])?;
        if resp.status != Status::Ok {
            return Err(EIO);
        }
        let mut buf = [0u8; abi::counter::BLOCK_SIZE];
        // SAFETY: `buf` has room for the bytes read; the device is done
        // writing the page.
        unsafe { page.read_raw(buf.as_mut_ptr(), 0, buf.len())? };
        let mut out = [0u64; abi::counter::COUNT];
        for (v, b) in out.iter_mut().zip(buf.chunks_exact(8)) {
            *v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        }
        Ok(out)
    }
}
