// SPDX-License-Identifier: GPL-2.0

//! The device's queues and where the device is in its life.
//!
//! Commands go on the command virtqueue, several in flight at once; they
//! complete out of order (a command parked on a device fault completes
//! after later ones). Each carries a [`Token`] that the interrupt handler
//! (or a waiter polling for a lost interrupt) finishes. Events arrive in
//! buffers the driver keeps posted on the event virtqueue.
//!
//! The queue side of a device reset lives here too: [`Queues::stop`] ends
//! every command in the ring (completed, or given back unexecuted),
//! [`Queues::restart`] brings new virtqueues up for the resetter alone, and
//! [`Queues::resume`] lets everyone in again. When to reset, and what else
//! a reset redoes, is `gpu/reset.rs`.

use crate::abi::{self, CmdHeader, Event, Opcode, Range, RangeFlags, Response};
use crate::compat::{new_spinlock_irq, SpinLockIrq};
use crate::virtio::{VirtioDevice, Virtqueue};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use kernel::bindings;
use kernel::device::Device;
use kernel::ffi::c_void;
use kernel::prelude::*;
use kernel::sync::aref::ARef;
use kernel::time::{msecs_to_jiffies, Instant, Monotonic};
use kernel::types::Opaque;

/// How long a command may take before the driver declares the device hung.
pub(crate) const COMMAND_TIMEOUT_MS: u32 = 10_000;

/// A waiter that sees no completion for this long polls the used ring
/// itself: the device may have completed the command without an interrupt
/// (a lost interrupt; with VIRTIO_RING_F_EVENT_IDX none comes until the
/// driver moves used_event on).
const POLL_MS: u32 = 250;

/// Event buffers kept posted on the event queue.
const EVENT_BUFS: usize = 64;

/// Where the device is in its life. One value, changed under the command
/// queue's lock, so a submission sees a consistent answer; docs/driver.md
/// ("Device errors", "Removal") tells the transitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Bound and working.
    Running,
    /// A device reset is under way: no virtqueues; submitters wait for it
    /// (EAGAIN from [`Queues::submit`]). It ends in `then`, or lost.
    Resetting { then: Settled },
    /// The reset made new virtqueues: only the resetter submits (it
    /// recreates the contexts) until [`Queues::resume`].
    Restarting { then: Settled },
    /// The device is gone (see [`Loss`]): nothing is submitted any more,
    /// everything fails with ENODEV.
    Lost(Loss),
    /// Removal began: uAPI calls fail with ENODEV; commands still run (the
    /// eviction needs them) unless the device was lost, before or since.
    Removing(Option<Loss>),
    /// Removed: the virtqueues are gone for good.
    Removed,
}

/// Where a reset returns to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// [`Lifecycle::Running`].
    Running,
    /// [`Lifecycle::Removing`] (of a device not lost).
    Removing,
}

/// How a device was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loss {
    /// It stopped answering: a command timed out, a reset failed.
    Unresponsive,
    /// The VRAM BAR reads all-ones: its link is down, and what the CPU
    /// reads through the BAR is not the VRAM either.
    LinkDown,
}

impl Lifecycle {
    /// Whether uAPI calls are served (they wait for a reset under way).
    pub(crate) fn serves_uapi(self) -> bool {
        matches!(
            self,
            Lifecycle::Running
                | Lifecycle::Resetting {
                    then: Settled::Running
                }
                | Lifecycle::Restarting {
                    then: Settled::Running
                }
        )
    }

    /// How the device was lost, if it was.
    pub(crate) fn loss(self) -> Option<Loss> {
        match self {
            Lifecycle::Lost(loss) | Lifecycle::Removing(Some(loss)) => Some(loss),
            _ => None,
        }
    }

    /// Whether removal began (or is done).
    pub(crate) fn removal_began(self) -> bool {
        matches!(
            self,
            Lifecycle::Removing(_)
                | Lifecycle::Resetting {
                    then: Settled::Removing
                }
                | Lifecycle::Restarting {
                    then: Settled::Removing
                }
                | Lifecycle::Removed
        )
    }

    /// Whether nothing is submitted any more.
    pub(crate) fn is_gone(self) -> bool {
        self.loss().is_some() || self == Lifecycle::Removed
    }

    /// Where a device in use (running, or being removed) goes when a
    /// reset begins; `None` for any other lifecycle.
    fn resetting(self) -> Option<Lifecycle> {
        match self {
            Lifecycle::Running => Some(Lifecycle::Resetting {
                then: Settled::Running,
            }),
            Lifecycle::Removing(None) => Some(Lifecycle::Resetting {
                then: Settled::Removing,
            }),
            _ => None,
        }
    }

    /// Whether a reset is under way.
    fn is_resetting(self) -> bool {
        matches!(
            self,
            Lifecycle::Resetting { .. } | Lifecycle::Restarting { .. }
        )
    }

    /// The lifecycle once the device is lost with `loss` (a link that went
    /// down is worse than no answer).
    fn lost(self, loss: Loss) -> Self {
        let worse = |old: Option<Loss>| {
            if old == Some(Loss::LinkDown) {
                Loss::LinkDown
            } else {
                loss
            }
        };
        match self {
            Lifecycle::Running
            | Lifecycle::Resetting {
                then: Settled::Running,
            }
            | Lifecycle::Restarting {
                then: Settled::Running,
            } => Lifecycle::Lost(loss),
            Lifecycle::Resetting {
                then: Settled::Removing,
            }
            | Lifecycle::Restarting {
                then: Settled::Removing,
            } => Lifecycle::Removing(Some(loss)),
            Lifecycle::Lost(old) => Lifecycle::Lost(worse(Some(old))),
            Lifecycle::Removing(old) => Lifecycle::Removing(Some(worse(old))),
            Lifecycle::Removed => Lifecycle::Removed,
        }
    }
}

/// A completion (`struct completion`) for a command's waiter, with the
/// timed wait and reinit the waits here need (`kernel::sync::Completion`
/// offers neither in 7.2 or 7.3).
#[pin_data]
struct Signal {
    #[pin]
    inner: Opaque<bindings::completion>,
}

// SAFETY: a `struct completion` is made for use from any thread.
unsafe impl Send for Signal {}
// SAFETY: as above.
unsafe impl Sync for Signal {}

impl Signal {
    fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            // SAFETY: `slot` is a `struct completion` to initialize.
            inner <- Opaque::ffi_init(|slot| unsafe { bindings::init_completion(slot) }),
        })
    }

    /// Wakes one waiter (or the next one to wait).
    fn complete(&self) {
        // SAFETY: an initialized completion.
        unsafe { bindings::complete(self.inner.get()) }
    }

    /// Wakes every waiter, now and later, until [`Signal::reinit`].
    fn complete_all(&self) {
        // SAFETY: an initialized completion.
        unsafe { bindings::complete_all(self.inner.get()) }
    }

    /// Forgets completions (waiters keep waiting).
    fn reinit(&self) {
        // SAFETY: an initialized completion.
        unsafe { crate::shim::hmmgpu_reinit_completion(self.inner.get()) }
    }

    /// Waits up to `ms` milliseconds (uninterruptibly); whether it was
    /// completed.
    fn wait_timeout(&self, ms: u32) -> bool {
        // SAFETY: an initialized completion.
        unsafe {
            bindings::wait_for_completion_timeout(self.inner.get(), msecs_to_jiffies(ms)) != 0
        }
    }
}

/// What became of a submitted command ([`Token::state`]).
const PENDING: u32 = 0;
const COMPLETED: u32 = 1;
/// Given back by a device reset, not executed.
const ABORTED: u32 = 2;

/// A command's token in the virtqueue: the interrupt handler finishes it
/// and wakes its waiter.
#[pin_data]
pub(crate) struct Token {
    #[pin]
    done: Signal,
    /// PENDING, COMPLETED or ABORTED (release on finish, acquire to read).
    state: AtomicU32,
    /// The used length, set before `state`.
    len: AtomicU32,
}

impl Token {
    fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            done <- Signal::new(),
            state: AtomicU32::new(PENDING),
            len: AtomicU32::new(0),
        })
    }

    /// Marks the command finished (under the command queue's lock).
    fn finish(&self, len: u32, aborted: bool) {
        self.len.store(len, Ordering::Relaxed);
        self.state
            .store(if aborted { ABORTED } else { COMPLETED }, Ordering::Release);
        self.done.complete();
    }

    fn is_finished(&self) -> bool {
        self.state.load(Ordering::Acquire) != PENDING
    }

    /// Wakes the waiter without finishing the command (a device fault for
    /// it to resolve).
    pub(crate) fn wake(&self) {
        self.done.complete();
    }

    /// The token of a buffer the virtqueue hands back.
    ///
    /// # Safety
    ///
    /// `ptr` is a token [`Queues::submit`] queued: its command is not
    /// freed while the device may hand it back (an abandoned command is
    /// leaked, see [`InFlight`]).
    unsafe fn from_vq<'a>(ptr: *mut c_void) -> &'a Token {
        // SAFETY: per this function's contract.
        unsafe { &*ptr.cast::<Token>() }
    }
}

/// The command queue under its lock: the virtqueue (none while a reset has
/// deleted it) and the lifecycle.
struct CmdQueue {
    vq: Option<Virtqueue>,
    lifecycle: Lifecycle,
}

/// The event queue under its lock.
struct EventQueue {
    vq: Option<Virtqueue>,
}

/// The device's queues.
#[pin_data]
pub(crate) struct Queues {
    vdev: VirtioDevice,
    /// Its `struct device`, for logs.
    dev: ARef<Device>,
    #[pin]
    cmd: SpinLockIrq<CmdQueue>,
    #[pin]
    events: SpinLockIrq<EventQueue>,
    /// Completed (all) whenever a reset ends, so its waiters go on.
    #[pin]
    settled: Signal,
    /// Completions found by polling, their interrupt lost or late.
    polled: AtomicU64,
    /// How long waits for a command took, averaged (see [`Queues::spin`]).
    service_ns: AtomicU64,
    /// The event buffers.
    event_bufs: EventBufs,
}

/// The event buffers: the device writes them (DMA) while they are posted;
/// the CPU reads one only after the device handed it back, under the event
/// queue's lock. Allocated with the `Gpu` (kmalloc), so in the direct map.
struct EventBufs(Opaque<[[u8; Event::SIZE]; EVENT_BUFS]>);

// SAFETY: accessed as described above, never through a reference.
unsafe impl Send for EventBufs {}
// SAFETY: as above.
unsafe impl Sync for EventBufs {}

/// What waiting for a command gave.
pub(crate) enum Wait {
    /// The command completed with this response.
    Done(Response),
    /// The waiter was woken before completion (a device fault to resolve).
    Woken,
    /// A device reset gave the command back unexecuted: it may be
    /// submitted again.
    GivenBack,
    /// No answer in [`COMMAND_TIMEOUT_MS`], polling included: a stalled
    /// queue, not a lost interrupt. The command may still complete later.
    TimedOut,
}

/// What [`Queues::wait`] saw.
enum Outcome {
    Completed,
    Woken,
    GivenBack,
    TimedOut,
}

impl Queues {
    /// Queues of `vdev`, without virtqueues until [`Queues::start`].
    pub(crate) fn new(vdev: VirtioDevice, dev: ARef<Device>) -> impl PinInit<Self> {
        pin_init!(Self {
            vdev,
            dev,
            cmd <- new_spinlock_irq!(CmdQueue { vq: None, lifecycle: Lifecycle::Running }),
            events <- new_spinlock_irq!(EventQueue { vq: None }),
            settled <- Signal::new(),
            polled: AtomicU64::new(0),
            service_ns: AtomicU64::new(0),
            event_bufs: EventBufs(Opaque::uninit()),
        })
    }

    /// Creates the virtqueues, sets DRIVER_OK and posts the event buffers
    /// (probe). The virtqueue callbacks get the device's drvdata: set it first.
    pub(crate) fn start(&self) -> Result {
        self.create_vqs()?;
        self.vdev.ready();
        self.post_events()
    }

    fn create_vqs(&self) -> Result {
        let (cmd, event) = self.vdev.find_vqs()?;
        self.cmd.lock().vq = Some(cmd);
        self.events.lock().vq = Some(event);
        Ok(())
    }

    /// Posts every event buffer.
    fn post_events(&self) -> Result {
        let mut events = self.events.lock();
        let vq = events.vq.as_mut().ok_or(ENODEV)?;
        let mut result = Ok(());
        for i in 0..EVENT_BUFS {
            // SAFETY: buffer `i` of ours, in the direct map, not in the
            // ring (every buffer was taken out, or never posted).
            result = unsafe { vq.add_inbuf(self.event_buf(i), Event::SIZE) };
            if result.is_err() {
                break;
            }
        }
        vq.kick();
        result
    }

    fn event_buf(&self, i: usize) -> *mut u8 {
        self.event_bufs
            .0
            .get()
            .cast::<[u8; Event::SIZE]>()
            .wrapping_add(i)
            .cast()
    }

    /// Where the device is in its life.
    pub(crate) fn lifecycle(&self) -> Lifecycle {
        self.cmd.lock().lifecycle
    }

    /// Completions the driver found by polling.
    pub(crate) fn polled_completions(&self) -> u64 {
        self.polled.load(Ordering::Relaxed)
    }

    /// Submits a prepared command; the returned [`InFlight`] waits for it.
    /// Allocates nothing (GFP_ATOMIC inside virtio at most), so it may be
    /// called under locks that memory reclaim can wait for. While a reset
    /// is under way it fails with EAGAIN, except for the resetter's own
    /// `privileged` commands; once the device is gone with ENODEV.
    pub(crate) fn submit(
        &self,
        mut cmd: Command,
        privileged: bool,
    ) -> core::result::Result<InFlight<'_>, (Error, Command)> {
        cmd.token.state.store(PENDING, Ordering::Relaxed);
        cmd.token.len.store(0, Ordering::Relaxed);
        cmd.token.done.reinit();
        let token = core::ptr::from_ref::<Token>(&cmd.token)
            .cast_mut()
            .cast::<c_void>();
        let mut queue = self.cmd.lock();
        let result = match (queue.lifecycle, queue.vq.as_mut()) {
            (lifecycle, _) if lifecycle.is_gone() => Err(ENODEV),
            (Lifecycle::Resetting { .. }, _) => Err(EAGAIN),
            (Lifecycle::Restarting { .. }, _) if !privileged => Err(EAGAIN),
            // Not started (probe), or stopped for good.
            (_, None) => Err(ENODEV),
            (_, Some(vq)) => {
                let (out, resp) = (&cmd.out, &mut *cmd.resp);
                // SAFETY: `out` and `resp` are kmalloc'd and live in `cmd`,
                // which the returned `InFlight` keeps until the device is
                // done with them (or leaks).
                let added = unsafe { vq.add_cmd(out, resp, token) };
                // Notified under the lock: a reset may delete the virtqueue
                // once it is dropped. A failed notification broke the
                // virtqueue: the command, in the ring now, times out and a
                // reset gives it back.
                if added.is_ok() && !vq.kick() {
                    dev_err!(self.dev, "notifying the command queue failed\n");
                }
                added
            }
        };
        drop(queue);
        match result {
            Ok(()) => Ok(InFlight {
                queues: self,
                cmd: Some(cmd),
            }),
            Err(e) => Err((e, cmd)),
        }
    }

    /// Waits for `token`'s command: completed, woken, given back, or timed
    /// out after `timeout_ms`. Polls the used ring after every
    /// [`POLL_MS`] without an answer, so a lost interrupt costs that much.
    fn wait(&self, token: &Token, timeout_ms: u32) -> Outcome {
        let start = Instant::<Monotonic>::now();
        let spin_us = i64::from(crate::compat::param(&crate::module_parameters::spin_us));
        if spin_us > 0 {
            self.spin(token, spin_us);
        }
        while !token.done.wait_timeout(POLL_MS) {
            self.poll();
            if token.is_finished() {
                break;
            }
            if start.elapsed().as_millis() >= i64::from(timeout_ms) {
                return Outcome::TimedOut;
            }
        }
        if spin_us > 0 {
            // An average of how long commands take, recent ones weighing most.
            let waited = start.elapsed().as_nanos().max(0) as u64;
            let average = self.service_ns.load(Ordering::Relaxed);
            self.service_ns
                .store(average - average / 8 + waited / 8, Ordering::Relaxed);
        }
        match token.state.load(Ordering::Acquire) {
            PENDING => Outcome::Woken,
            ABORTED => Outcome::GivenBack,
            _ => Outcome::Completed,
        }
    }

    /// Spins up to `budget` µs (module parameter `spin_us`) for `token`'s
    /// command to be finished, while commands complete within that on
    /// average: a fast answer then costs no sleep and wakeup. Only the
    /// interrupt handler finishes the command (nothing is taken from the
    /// used ring here), so a broken interrupt path shows as before.
    fn spin(&self, token: &Token, budget: i64) {
        if self.service_ns.load(Ordering::Relaxed) > budget as u64 * 1000 {
            return;
        }
        let start = Instant::<Monotonic>::now();
        while !token.is_finished() && start.elapsed().as_micros_ceil() < budget {
            core::hint::spin_loop();
        }
    }

    /// Finishes every command the device completed; under the lock.
    /// Returns how many.
    fn harvest(vq: &mut Virtqueue) -> u64 {
        let mut n = 0;
        loop {
            vq.disable_cb();
            while let Some((token, len)) = vq.get_buf() {
                // SAFETY: every buffer of the command queue carries a token.
                unsafe { Token::from_vq(token) }.finish(len, false);
                n += 1;
            }
            if vq.enable_cb() {
                return n;
            }
        }
    }

    /// The command queue's interrupt.
    pub(crate) fn cmd_interrupt(&self) {
        if let Some(vq) = self.cmd.lock().vq.as_mut() {
            Self::harvest(vq);
        }
    }

    /// What the interrupt would have done, for a waiter that got none.
    fn poll(&self) {
        if let Some(vq) = self.cmd.lock().vq.as_mut() {
            self.polled.fetch_add(Self::harvest(vq), Ordering::Relaxed);
        }
    }

    /// The event queue's interrupt: hands every event to `on_event` (under
    /// the event queue's lock, interrupts off) and posts its buffer again.
    pub(crate) fn event_interrupt(&self, mut on_event: impl FnMut(&[u8])) {
        let mut events = self.events.lock();
        let Some(vq) = events.vq.as_mut() else {
            return;
        };
        loop {
            vq.disable_cb();
            while let Some((buf, len)) = vq.get_buf() {
                let buf = buf.cast::<u8>();
                let len = core::cmp::min(len as usize, Event::SIZE);
                // SAFETY: the token is one of our event buffers, which the
                // device is done with until it is posted again below.
                on_event(unsafe { core::slice::from_raw_parts(buf, len) });
                // SAFETY: as in `post_events`. The buffer came from the
                // ring, so there is room.
                let reposted = unsafe { vq.add_inbuf(buf, Event::SIZE) };
                kernel::warn_on!(reposted.is_err());
            }
            if vq.enable_cb() {
                break;
            }
        }
        vq.kick();
    }

    /// Waits up to `timeout_ms` for a reset under way to end; whether
    /// commands may be submitted again.
    pub(crate) fn wait_settled(&self, timeout_ms: u32) -> bool {
        if self.lifecycle().is_resetting() {
            self.settled.wait_timeout(timeout_ms);
        }
        let lifecycle = self.lifecycle();
        !lifecycle.is_gone() && !lifecycle.is_resetting()
    }

    /// Announces a reset that will run later ([`Queues::stop`] on the reset
    /// work): submissions wait for it (EAGAIN) from now on; commands in
    /// flight still complete. Whether the device was in use (running, or
    /// being removed) and not resetting already, i.e. whether a reset must
    /// now run to end the wait.
    pub(crate) fn begin_reset(&self) -> bool {
        let mut queue = self.cmd.lock();
        let Some(resetting) = queue.lifecycle.resetting() else {
            return false;
        };
        queue.lifecycle = resetting;
        self.settled.reinit();
        true
    }

    /// Starts a reset: resets the device and deletes the virtqueues. Every
    /// command still in the command queue is finished: completed if the
    /// device got to it, otherwise given back ([`Wait::GivenBack`]), and the
    /// device no longer owns its buffers. Submissions fail with EAGAIN
    /// until the reset ends ([`Queues::resume`]). Idempotent.
    pub(crate) fn stop(&self) {
        {
            let mut queue = self.cmd.lock();
            queue.lifecycle = match queue.lifecycle {
                Lifecycle::Restarting { then } => Lifecycle::Resetting { then },
                other => other.resetting().unwrap_or(other),
            };
            if queue.lifecycle.is_resetting() {
                self.settled.reinit();
            }
            if queue.vq.is_none() {
                return;
            }
        }
        self.vdev.reset();
        {
            let mut queue = self.cmd.lock();
            if let Some(mut vq) = queue.vq.take() {
                while let Some((token, len)) = vq.get_buf() {
                    // SAFETY: every buffer of the command queue carries a token.
                    unsafe { Token::from_vq(token) }.finish(len, false);
                }
                while let Some(token) = vq.detach_unused_buf() {
                    // SAFETY: as above.
                    unsafe { Token::from_vq(token) }.finish(0, true);
                }
            }
        }
        {
            let mut events = self.events.lock();
            if let Some(mut vq) = events.vq.take() {
                // Our own event buffers: nothing to free.
                while vq.detach_unused_buf().is_some() {}
            }
        }
        // SAFETY: reset above; the handles were dropped.
        unsafe { self.vdev.del_vqs() };
    }

    /// After [`Queues::stop`]: renegotiates the features if `negotiate`
    /// (the virtio core did it already after a transport reset), creates
    /// the virtqueues, posts the event buffers and sets DRIVER_OK. Only
    /// privileged submissions (the resetter's) are accepted until
    /// [`Queues::resume`].
    pub(crate) fn restart(&self, negotiate: bool) -> Result {
        if negotiate {
            self.vdev.renegotiate()?;
        }
        self.create_vqs()?;
        self.post_events()?;
        {
            let mut queue = self.cmd.lock();
            if let Lifecycle::Resetting { then } = queue.lifecycle {
                queue.lifecycle = Lifecycle::Restarting { then };
            }
        }
        self.vdev.ready();
        Ok(())
    }

    /// Ends a reset that worked: submissions resume.
    pub(crate) fn resume(&self) {
        {
            let mut queue = self.cmd.lock();
            queue.lifecycle = match queue.lifecycle {
                Lifecycle::Resetting { then } | Lifecycle::Restarting { then } => match then {
                    Settled::Running => Lifecycle::Running,
                    Settled::Removing => Lifecycle::Removing(None),
                },
                other => other,
            };
        }
        self.settled.complete_all();
    }

    /// Changes the lifecycle with `change` and ends a reset's waits (the
    /// reset will not end them: the device is gone). Whether it changed.
    fn give_up(&self, change: impl FnOnce(Lifecycle) -> Lifecycle) -> bool {
        let changed = {
            let mut queue = self.cmd.lock();
            let old = queue.lifecycle;
            queue.lifecycle = change(old);
            queue.lifecycle != old
        };
        self.settled.complete_all();
        changed
    }

    /// The device stopped answering: nothing is submitted any more. Whether
    /// it was not lost before.
    pub(crate) fn mark_lost(&self) -> bool {
        let mut newly = false;
        self.give_up(|l| {
            newly = l.loss().is_none() && l != Lifecycle::Removed;
            l.lost(Loss::Unresponsive)
        });
        newly
    }

    /// The VRAM BAR's link is down. Whether it was not down before.
    pub(crate) fn mark_link_down(&self) -> bool {
        let mut newly = false;
        self.give_up(|l| {
            newly = l.loss() != Some(Loss::LinkDown) && l != Lifecycle::Removed;
            l.lost(Loss::LinkDown)
        });
        newly
    }

    /// Removal began: uAPI calls fail from now on; commands still run.
    pub(crate) fn begin_removal(&self) {
        let mut queue = self.cmd.lock();
        queue.lifecycle = match queue.lifecycle {
            Lifecycle::Running => Lifecycle::Removing(None),
            Lifecycle::Resetting { .. } => Lifecycle::Resetting {
                then: Settled::Removing,
            },
            Lifecycle::Restarting { .. } => Lifecycle::Restarting {
                then: Settled::Removing,
            },
            Lifecycle::Lost(loss) => Lifecycle::Removing(Some(loss)),
            other => other,
        };
    }

    /// Removal (or a failed probe): the device stops for good.
    pub(crate) fn shut_down(&self) {
        self.stop();
        self.give_up(|_| Lifecycle::Removed);
    }
}

/// A command with its buffers, ready to submit; reusable once completed.
pub(crate) struct Command {
    token: Pin<KBox<Token>>,
    /// The opcode last encoded.
    opcode: Opcode,
    /// Header and ranges (kmalloc'd: the virtqueue needs the direct map).
    out: KVec<u8>,
    resp: KBox<[u8; Response::SIZE]>,
}

impl Command {
    /// Allocates a command for up to `capacity` ranges.
    pub(crate) fn with_capacity(capacity: usize) -> Result<Self> {
        if capacity > abi::MAX_RANGES as usize {
            return Err(EINVAL);
        }
        let out = KVec::<u8>::with_capacity(CmdHeader::SIZE + capacity * Range::SIZE, GFP_KERNEL)?;
        let resp = KBox::new([0u8; Response::SIZE], GFP_KERNEL)?;
        let token = KBox::pin_init(Token::new(), GFP_KERNEL)?;
        Ok(Self {
            token,
            opcode: Opcode::Nop,
            out,
            resp,
        })
    }

    /// A command for exactly these ranges.
    pub(crate) fn new(opcode: Opcode, ctx: u32, tag: u64, ranges: &[Range]) -> Result<Self> {
        let mut cmd = Self::with_capacity(ranges.len())?;
        cmd.encode(opcode, ctx, tag, ranges)?;
        Ok(cmd)
    }

    /// (Re)writes the command without allocating: ENOSPC if the ranges do
    /// not fit the capacity it was made with.
    pub(crate) fn encode(
        &mut self,
        opcode: Opcode,
        ctx: u32,
        tag: u64,
        ranges: &[Range],
    ) -> Result {
        let len = CmdHeader::SIZE + ranges.len() * Range::SIZE;
        if len > self.out.capacity() {
            return Err(ENOSPC);
        }
        let header = CmdHeader::new(opcode, ctx, tag, ranges.len() as u32);
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

    /// Whether running the command a second time, after a reset gave it
    /// back, does no harm: not for ATOMIC, which the device may have
    /// executed before its completion was lost.
    pub(crate) fn can_resubmit(&self) -> bool {
        self.opcode != Opcode::Atomic
    }
}

/// A submitted command.
pub(crate) struct InFlight<'a> {
    queues: &'a Queues,
    /// `None` once completed and handed back.
    cmd: Option<Command>,
}

impl InFlight<'_> {
    /// The token, for [`Token::wake`].
    pub(crate) fn token(&self) -> *const Token {
        self.cmd.as_ref().map_or(core::ptr::null(), |c| {
            core::ptr::from_ref::<Token>(&c.token)
        })
    }

    /// Waits for completion or a wake-up (see [`Wait`]). EIO if the device
    /// completed it without a whole response.
    pub(crate) fn wait(&mut self) -> Result<Wait> {
        let cmd = self.cmd.as_ref().ok_or(EINVAL)?;
        Ok(match self.queues.wait(&cmd.token, COMMAND_TIMEOUT_MS) {
            Outcome::Completed => {
                if (cmd.token.len.load(Ordering::Relaxed) as usize) < Response::SIZE {
                    return Err(EIO);
                }
                Wait::Done(Response::from_bytes(&cmd.resp[..]).ok_or(EIO)?)
            }
            Outcome::Woken => Wait::Woken,
            Outcome::GivenBack => Wait::GivenBack,
            Outcome::TimedOut => Wait::TimedOut,
        })
    }

    /// The command back for reuse, once `wait` returned `Done` or
    /// `GivenBack` (the device no longer owns its buffers).
    pub(crate) fn into_command(mut self) -> Option<Command> {
        self.cmd.take()
    }
}

/// A submitted command nobody waits on yet ([`InFlight::detach`]), with
/// the reset generation it was submitted in; [`Queues::attach`] gives the
/// [`InFlight`] back to wait on.
pub(crate) struct Detached {
    cmd: Option<Command>,
    pub(crate) generation: u64,
}

impl InFlight<'_> {
    /// Stops borrowing the queues, to be waited on later.
    pub(crate) fn detach(mut self, generation: u64) -> Detached {
        Detached {
            cmd: self.cmd.take(),
            generation,
        }
    }
}

impl Queues {
    /// The [`InFlight`] of a detached command.
    pub(crate) fn attach(&self, mut detached: Detached) -> InFlight<'_> {
        InFlight {
            queues: self,
            cmd: detached.cmd.take(),
        }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(cmd) = self.cmd.take() {
            if !cmd.token.is_finished() {
                // The device may still write these: never free them.
                pr_err!("hmmgpu: abandoning a detached command the device never completed\n");
                core::mem::forget(cmd);
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(cmd) = self.cmd.take() {
            if !cmd.token.is_finished() {
                // The device may still write these: never free them.
                dev_err!(
                    self.queues.dev,
                    "abandoning a command the device never completed\n"
                );
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
        Self {
            ranges: KVec::new(),
        }
    }

    /// Appends a range, merging it with the previous one when both sides
    /// are contiguous.
    pub(crate) fn push(&mut self, src: u64, dst: u64, len: u32, flags: RangeFlags) -> Result {
        if let Some(last) = self.ranges.last_mut() {
            if last.range_flags() == flags
                && last.src + u64::from(last.len) == src
                && last.dst + u64::from(last.len) == dst
                && last.len.checked_add(len).is_some()
            {
                last.len += len;
                return Ok(());
            }
        }
        self.ranges
            .push(Range::new(src, dst, len, flags), GFP_KERNEL)?;
        Ok(())
    }

    /// Appends a FILL range (`src` holds the pattern), merging it with the
    /// previous one when the destinations are contiguous.
    pub(crate) fn push_fill(
        &mut self,
        pattern: u64,
        dst: u64,
        len: u32,
        flags: RangeFlags,
    ) -> Result {
        if let Some(last) = self.ranges.last_mut() {
            if last.range_flags() == flags
                && last.src == pattern
                && last.dst + u64::from(last.len) == dst
                && last.len.checked_add(len).is_some()
            {
                last.len += len;
                return Ok(());
            }
        }
        self.ranges
            .push(Range::new(pattern, dst, len, flags), GFP_KERNEL)?;
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
