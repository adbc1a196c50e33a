// SPDX-License-Identifier: GPL-2.0

//! One hmmgpu device: probe (config space, VRAM region, queue, memory
//! registration, uAPI) and removal (evict VRAM, then tear down).

use crate::abi::{self, opcode, DeviceConfig, Event, Range, Response};
use crate::ecc::EccQueue;
use crate::migrate;
use crate::pages::PageRef;
use crate::queue::{Command, InFlight, Lifecycle, Loss, Queues, RangeList, Token, Wait, COMMAND_TIMEOUT_MS};
use crate::shim;
use crate::virtio::VirtioDevice;
use crate::uapi::MirrorDevice;
use crate::vram::{MemKind, Vram};
use kernel::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use core::fmt;
use kernel::bindings;
use kernel::debugfs;
use kernel::page::Page;
use kernel::prelude::*;
use kernel::str::CString;
use crate::compat::{new_spinlock_irq, SpinLockIrq};
use kernel::sync::{Arc, ArcBorrow, Mutex};
use kernel::workqueue::Work;
use kernel::{new_mutex, new_work};

/// One device MMU context's slot: who waits on its command, and the fault
/// the device reported for it.
struct CtxSlot {
    used: bool,
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
    const fn new(used: bool) -> Self {
        CtxSlot { used, waiter: ptr::null(), access: None, fault: None }
    }
}

/// The device virtual range an MMU access command touches (VREAD reads
/// through `src`, VWRITE and ATOMIC write through `dst`).
fn access_span(opcode: u32, ranges: &[Range]) -> (u64, u64) {
    let va = |r: &Range| if opcode == opcode::VREAD { r.src } else { r.dst };
    let start = ranges.iter().map(va).min().unwrap_or(0);
    let end = ranges.iter().map(|r| va(r).saturating_add(u64::from(r.len))).max().unwrap_or(0);
    (start, end)
}

/// A command a device reset gave back unexecuted, to submit again.
struct Resubmit(Command);

/// Counters of the driver's own, shown after the device's in debugfs.
#[derive(Default)]
pub(crate) struct DriverCounters {
    /// FAULT events received from the event queue.
    fault_events: AtomicU64,
    /// FAULT events no command was parked on: for a context with no access
    /// in flight or an address outside it, or answered BAD_CONTEXT by the
    /// REPLAY/CANCEL they led to. Ignored (bounded work each).
    spurious_faults: AtomicU64,
    /// Commands that completed with COPY_ERROR.
    copy_errors: AtomicU64,
    /// ECC events handled (counted when the ECC work is done with one).
    pub(crate) ecc_events: AtomicU64,
    /// ECC events dropped because the ECC queue was full.
    pub(crate) ecc_dropped: AtomicU64,
}

/// The contexts in use; `slots[i]` is context `i + 1`.
struct Contexts {
    slots: KVec<CtxSlot>,
}

// SAFETY: only touched under its lock; `waiter` is a command's token.
unsafe impl Send for Contexts {}

/// GPU indices in use (bit n: GPU n), which name the uAPI devices.
static GPU_INDICES: AtomicU32 = AtomicU32::new(0);

/// Most GPUs one guest can have (GPU n gets /dev/hmm_dmirror<n> and
/// /dev/hmm_dmirror<n + MAX_GPUS>, as test_hmm numbers its devices).
pub(crate) const MAX_GPUS: u32 = 2;

/// Smallest VRAM the driver can use.
const MIN_VRAM: u64 = 4 << 20;
/// The link canary's mark ("HMMGPU-L"); a failed link reads all-ones instead.
const LINK_CANARY: u64 = u64::from_le_bytes(*b"HMMGPU-L");

/// A bound hmmgpu device.
#[pin_data]
pub(crate) struct Gpu {
    vdev: VirtioDevice,
    index: u32,
    config: DeviceConfig,
    /// Guest-physical address of the VRAM BAR (the shared memory region).
    vram_bar: u64,
    /// The queues and the device's [`Lifecycle`].
    #[pin]
    queues: Queues,
    /// Serializes device resets (see [`Gpu::recover`]).
    #[pin]
    reset_lock: Mutex<()>,
    /// Device resets done; a command submitted in generation N that times
    /// out asks for a reset only if no other reset came since.
    resets: AtomicU64,
    #[pin]
    contexts: SpinLockIrq<Contexts>,
    /// The device-private half of the VRAM (/dev/hmm_dmirror<index>).
    #[pin]
    pub(crate) private: Vram,
    /// The device-coherent half, over the BAR (/dev/hmm_dmirror<index + 2>).
    #[pin]
    pub(crate) coherent: Vram,
    /// A device-coherent page the driver keeps as the link canary: its first
    /// word holds [`LINK_CANARY`] while the VRAM BAR works. Null without
    /// device-coherent VRAM (then a failed link goes unnoticed). Replaced
    /// only by the ECC work, which removal stops before it frees the page.
    canary: AtomicPtr<bindings::page>,
    tags: AtomicU64,
    pub(crate) counters: DriverCounters,
    /// Set once the first spurious FAULT event was logged.
    spurious_logged: AtomicBool,
    /// Set once dropped ECC events were logged.
    pub(crate) ecc_dropped_logged: AtomicBool,
    /// /sys/kernel/debug/hmmgpu<index>; its files hold a reference to
    /// the GPU, dropped (the directory removed) on removal.
    #[pin]
    debugfs: Mutex<Option<Pin<KBox<debugfs::Scope<Arc<Gpu>>>>>>,
    /// The uAPI devices (private, coherent); taken (deregistered) on removal.
    #[pin]
    mirror_devs: Mutex<KVec<Pin<KBox<MirrorDevice>>>>,
    /// ECC errors from the event queue, waiting for `ecc_work` (ecc.rs).
    #[pin]
    pub(crate) ecc_queue: SpinLockIrq<EccQueue>,
    /// Handles `ecc_queue` in process context.
    #[pin]
    pub(crate) ecc_work: Work<Gpu>,
    /// Held by the ECC work while it runs, and by removal when it begins:
    /// a work that runs later sees the removal and does nothing (see
    /// [`Gpu::begin_removal`]).
    #[pin]
    pub(crate) ecc_lock: Mutex<()>,
}


impl Gpu {
    /// GPU index (0 for the first one probed).
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// VRAM size in bytes.
    pub(crate) fn vram_size(&self) -> u64 {
        self.config.vram_size
    }

    /// The VRAM share of a personality.
    pub(crate) fn vram(&self, kind: MemKind) -> &Vram {
        match kind {
            MemKind::Private => &self.private,
            MemKind::Coherent => &self.coherent,
        }
    }

    /// The VRAM share whose pgmap owner is `owner` (see [`Vram::owner`]).
    pub(crate) fn vram_of_owner(&self, owner: *mut c_void) -> Option<&Vram> {
        [&self.private, &self.coherent].into_iter().find(|v| v.owner() == owner)
    }

    /// The link canary's page, if there is one.
    fn canary(&self) -> Option<PageRef> {
        // SAFETY: the canary is a coherent page we hold (locked and
        // referenced) until it is replaced or removal frees it.
        unsafe { PageRef::from_raw(self.canary.load(Ordering::Acquire)) }
    }

    /// The VRAM offset of `pfn` if it is one of this GPU's device pages.
    pub(crate) fn vram_offset_of_pfn(&self, pfn: u64) -> Option<u64> {
        self.private.offset_of_pfn(pfn).or_else(|| self.coherent.offset_of_pfn(pfn))
    }

    /// Where the device is in its life.
    pub(crate) fn lifecycle(&self) -> Lifecycle {
        self.queues.lifecycle()
    }

    /// Begins removal: uAPI calls fail with ENODEV from now on, and the ECC
    /// work stops for good (this waits for a run in progress, under
    /// `ecc_lock`; later runs see the removal and return at once).
    fn begin_removal(&self) {
        let _ecc_idle = self.ecc_lock.lock();
        self.queues.begin_removal();
    }

    /// Fails with ENODEV once uAPI calls are no longer served (removal, a
    /// lost device; and checks the link).
    pub(crate) fn check_alive(&self) -> Result {
        if !self.lifecycle().serves_uapi() || !self.link_ok() {
            Err(ENODEV)
        } else {
            Ok(())
        }
    }

    /// Whether the VRAM BAR's link is down (see [`Gpu::link_ok`]).
    pub(crate) fn is_link_down(&self) -> bool {
        self.lifecycle().loss() == Some(Loss::LinkDown)
    }

    /// Reads the link canary: a PCIe link that failed makes the BAR read
    /// all-ones, as real hardware does; the driver then stops using the
    /// device ([`Loss::LinkDown`]). Checked at every uAPI operation
    /// and at removal.
    fn link_ok(&self) -> bool {
        if self.is_link_down() {
            return false;
        }
        let Some(page) = self.canary() else {
            return true; // no canary: nothing to tell by
        };
        // Volatile: it is device memory that can change.
        if page.read_u64_volatile() != u64::MAX {
            return true;
        }
        if self.queues.mark_link_down() {
            pr_err!(
                "hmmgpu{}: the VRAM BAR reads all-ones: the link is down; the device is dead\n",
                self.index
            );
        }
        false
    }

    /// A fresh device-coherent page with the link canary's mark, locked
    /// and held until it is freed with [`PageRef::unlock_put`].
    fn new_canary(&self) -> Result<PageRef> {
        let (page, _) = self.coherent.alloc_page(false)?;
        // SAFETY: a page we just allocated.
        unsafe { page.write_u64_volatile(LINK_CANARY) };
        Ok(page)
    }

    /// Takes a device-coherent page as the link canary and writes its mark.
    fn set_canary(&self) {
        match self.new_canary() {
            Ok(page) => self.canary.store(page.as_ptr(), Ordering::Release),
            Err(e) => pr_warn!(
                "hmmgpu{}: no VRAM for the link canary ({:?}): a failed link will not be noticed\n",
                self.index,
                e
            ),
        }
    }

    /// Writes the link canary's mark (at setup, and after a device reset,
    /// which on real hardware would have lost it with the rest of VRAM).
    fn write_canary(&self) {
        if let Some(page) = self.canary() {
            // SAFETY: the canary is a coherent page we hold.
            unsafe { page.write_u64_volatile(LINK_CANARY) };
        }
    }

    /// The pfn of the link canary's page, if there is one.
    pub(crate) fn canary_pfn(&self) -> Option<u64> {
        self.canary().map(PageRef::pfn)
    }

    /// Moves the link canary to a fresh device-coherent page (its page went
    /// bad) and frees the old one. Only the ECC work calls this, and
    /// removal stops that work before it frees the canary. A reader still
    /// on the old page reads retired VRAM, which stays mapped and is never
    /// reused, so its answer is as good as before.
    pub(crate) fn move_canary(&self) -> Result {
        let page = self.new_canary()?;
        let old = self.canary.swap(page.as_ptr(), Ordering::AcqRel);
        // SAFETY: the old canary page, locked since its allocation and ours
        // alone now: this unlocks it and drops the last reference.
        unsafe {
            if let Some(old) = PageRef::from_raw(old) {
                old.unlock_put();
            }
        }
        Ok(())
    }

    /// Whether the device stopped answering or its link is down.
    pub(crate) fn is_lost(&self) -> bool {
        self.lifecycle().loss().is_some()
    }

    /// Marks the device lost after it failed to complete a command, or to
    /// come back from a reset: ENODEV from now on.
    fn hung(&self) -> Error {
        if self.queues.mark_lost() {
            pr_err!("hmmgpu{}: the device stopped answering; it is dead\n", self.index);
        }
        ENODEV
    }

    /// A fresh tag for a command.
    pub(crate) fn tag(&self) -> u64 {
        self.tags.fetch_add(1, Ordering::Relaxed)
    }

    /// Submits a prepared command unless the queues are gone, waiting for
    /// a reset under way to end. Allocates nothing: callable under the
    /// mirror lock (which memory reclaim can wait for through the MMU
    /// notifier; a reset never enters reclaim, see [`Gpu::recover`]).
    /// Returns the reset generation the command runs in.
    fn submit(&self, mut cmd: Command) -> core::result::Result<(InFlight<'_>, u64), (Error, Command)> {
        loop {
            match self.queues.submit(cmd, false) {
                Ok(flight) => return Ok((flight, self.resets.load(Ordering::Acquire))),
                Err((e, back)) if e == EAGAIN => cmd = back,
                Err(other) => return Err(other),
            }
            if !self.queues.wait_settled(COMMAND_TIMEOUT_MS) {
                return Err((ENODEV, cmd));
            }
        }
    }

    /// Waits for a submitted command. A timeout resets the device (see
    /// [`Gpu::recover`]), which finishes the command: completed, or given
    /// back ([`Wait::GivenBack`]). Never returns [`Wait::TimedOut`]: a
    /// command the reset did not finish either makes the device lost.
    fn wait(&self, flight: &mut InFlight<'_>, generation: u64) -> Result<Wait> {
        match flight.wait()? {
            Wait::TimedOut => {
                self.recover(generation)?;
                // The reset finished the command; still nothing: give up.
                match flight.wait()? {
                    Wait::TimedOut => Err(self.hung()),
                    other => Ok(other),
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
            loop {
                match self.wait(&mut flight, generation)? {
                    Wait::Done(resp) => {
                        let cmd = flight.into_command().ok_or(EINVAL)?;
                        return Ok((resp, cmd));
                    }
                    Wait::GivenBack => break,
                    Wait::Woken | Wait::TimedOut => continue,
                }
            }
            cmd = flight.into_command().ok_or(EIO)?;
            if resubmitted || !cmd.can_resubmit() {
                return Err(EIO);
            }
            resubmitted = true;
        }
    }

    /// Executes a command while the queues restart after a reset (only the
    /// resetter may): no waiting for the reset, no recovery.
    fn execute_privileged(&self, opcode: u32, ctx: u32) -> Result<Response> {
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
    fn recover(&self, generation: u64) -> Result {
        let _serialized = self.reset_lock.lock();
        if self.resets.load(Ordering::Acquire) != generation {
            return Ok(()); // another waiter's reset finished our command too
        }
        if self.lifecycle().is_gone() {
            return Err(ENODEV);
        }
        pr_warn!(
            "hmmgpu{}: a command got no answer in {} ms; resetting the device\n",
            self.index,
            COMMAND_TIMEOUT_MS
        );
        self.queues.stop();
        let contexts = self.restart(true)?;
        pr_notice!(
            "hmmgpu{}: reset done ({} contexts recreated); commands in flight were retried\n",
            self.index,
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
            pr_err!("hmmgpu{}: the device did not come back from its reset: {:?}\n", self.index, e);
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
            self.execute_privileged(opcode::CTX_DESTROY, ctx)?;
            let resp = self.execute_privileged(opcode::CTX_CREATE, ctx)?;
            if resp.status != abi::status::OK {
                pr_err!("hmmgpu{}: recreating context {}: {}\n", self.index, ctx, abi::status::name(resp.status));
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
        pr_notice!("hmmgpu{}: device reset requested: evicting VRAM, then stopping\n", self.index);
        if !self.is_lost() && self.link_ok() {
            let evicted = migrate::evict_all(self, &self.private) + migrate::evict_all(self, &self.coherent);
            self.private.reclaim_deferred();
            self.coherent.reclaim_deferred();
            pr_notice!("hmmgpu{}: {} pages evicted to system memory before the reset\n", self.index, evicted);
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
            pr_err!("hmmgpu{}: the device was lost before its reset; it stays dead\n", self.index);
            return Err(ENODEV);
        }
        let contexts = self.restart(false)?;
        self.write_canary();
        pr_notice!("hmmgpu{}: reset done ({} contexts recreated); the device is back\n", self.index, contexts);
        Ok(())
    }

    /// Executes one command on the device and waits for its response.
    /// Allocates: not under the mirror lock (see [`Gpu::prepare`]).
    pub(crate) fn execute(&self, opcode: u32, ctx: u32, ranges: &[Range]) -> Result<Response> {
        let cmd = Command::new(opcode, ctx, self.tag(), ranges)?;
        self.execute_cmd(cmd).map(|(resp, _)| resp)
    }

    /// Builds the commands that run `list` as `opcode` of context `ctx`, to
    /// run later with [`Gpu::run_prepared`] without allocating.
    pub(crate) fn prepare(&self, opcode: u32, ctx: u32, list: &RangeList) -> Result<KVec<Command>> {
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
            if resp.status != abi::status::OK {
                self.note_failure(&resp);
                pr_err!(
                    "hmmgpu{}: command failed: {} at range {}\n",
                    self.index,
                    abi::status::name(resp.status),
                    resp.failed_index
                );
                return Err(EIO);
            }
            bytes += resp.bytes;
        }
        Ok(bytes)
    }

    /// Counts a failed command's status.
    fn note_failure(&self, resp: &Response) {
        if resp.status == abi::status::COPY_ERROR {
            self.counters.copy_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs every range of `list` as `opcode` (COPY or FILL) until one
    /// fails. Returns how many ranges, from the start of the list, were done
    /// in full, and EIO if the device failed one (with COPY_ERROR: the
    /// ranges before its `failed_index` were done, the rest were not), or
    /// the error that stopped the submission.
    pub(crate) fn run_partial(&self, opcode: u32, list: &RangeList) -> (usize, Result) {
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
            if resp.status == abi::status::OK {
                done += chunk.len();
                continue;
            }
            self.note_failure(&resp);
            let what = if opcode == opcode::FILL { "FILL" } else { "COPY" };
            pr_warn!(
                "hmmgpu{}: {} failed: {} at range {} of {}\n",
                self.index,
                what,
                abi::status::name(resp.status),
                resp.failed_index,
                chunk.len()
            );
            if resp.status == abi::status::COPY_ERROR {
                done += core::cmp::min(resp.failed_index as usize, chunk.len());
            }
            return (done, Err(EIO));
        }
        (done, Ok(()))
    }

    /// Executes a device MMU access (VREAD, VWRITE, ATOMIC) of context
    /// `ctx`. Each device fault it raises is handed to `resolve`; on success
    /// the command is replayed, on error it is cancelled and the error
    /// returned. A FAULT event that turns out not to be this command's (the
    /// REPLAY or CANCEL finds nothing parked: BAD_CONTEXT) is counted as
    /// spurious and changes nothing; the command keeps running. `faults`
    /// counts the device faults resolved and replayed (not spurious ones).
    pub(crate) fn execute_mmu(
        &self,
        opcode: u32,
        ctx: u32,
        ranges: &[Range],
        faults: &mut u64,
        mut resolve: impl FnMut(&Event) -> Result,
    ) -> Result<Response> {
        let span = access_span(opcode, ranges);
        let mut cmd = Command::new(opcode, ctx, self.tag(), ranges)?;
        let mut resubmitted = false;
        loop {
            match self.execute_access(cmd, ctx, span, faults, &mut resolve) {
                Err(Resubmit(back)) if !resubmitted && back.can_resubmit() => {
                    // A device reset gave it back; the context is empty now,
                    // so the access faults its pages in again.
                    cmd = back;
                    resubmitted = true;
                }
                Err(Resubmit(_)) => return Err(EIO),
                Ok(result) => return result,
            }
        }
    }

    /// One submission of an MMU access for [`Gpu::execute_mmu`]; gives the
    /// command back if a device reset returned it unexecuted.
    fn execute_access(
        &self,
        cmd: Command,
        ctx: u32,
        span: (u64, u64),
        faults: &mut u64,
        resolve: &mut impl FnMut(&Event) -> Result,
    ) -> core::result::Result<Result<Response>, Resubmit> {
        // Before the submission: the device may report a fault before the
        // waiter is set, and on_event must know the access by then.
        self.begin_access(ctx, span);
        let (mut flight, generation) = match self.submit(cmd) {
            Ok(submitted) => submitted,
            Err((e, _)) => {
                self.end_access(ctx);
                return Ok(Err(e));
            }
        };
        self.set_waiter(ctx, flight.token());
        let mut failure = None;
        let result = loop {
            if let Some(fault) = self.take_fault(ctx) {
                let (next, error) = match resolve(&fault) {
                    Ok(()) => (opcode::REPLAY, None),
                    Err(e) => (opcode::CANCEL, Some(e)),
                };
                match self.execute(next, ctx, &[]) {
                    Err(e) => break Err(e),
                    // Nothing parked: the event was spurious.
                    Ok(r) if r.status == abi::status::BAD_CONTEXT => self.note_spurious(&fault),
                    Ok(_) => {
                        if error.is_some() {
                            failure = error;
                        } else {
                            *faults += 1;
                        }
                    }
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
        let mut result = self.execute(opcode::CTX_CREATE, ctx, &[]);
        if matches!(result, Ok(r) if r.status == abi::status::BAD_CONTEXT) {
            // Left over from a previous driver instance (the device keeps
            // contexts until it is reset): recreate it empty.
            let _ = self.execute(opcode::CTX_DESTROY, ctx, &[]);
            result = self.execute(opcode::CTX_CREATE, ctx, &[]);
        }
        match result {
            Ok(r) if r.status == abi::status::OK => Ok(ctx),
            other => {
                self.contexts.lock().slots[ctx as usize - 1].used = false;
                pr_err!("hmmgpu{}: CTX_CREATE {} failed: {:?}\n", self.index, ctx, other.map(|r| r.status));
                Err(EIO)
            }
        }
    }

    /// Destroys a context created by [`Gpu::ctx_create`].
    pub(crate) fn ctx_destroy(&self, ctx: u32) {
        // Best effort: a dead device has no contexts to destroy.
        let _ = self.execute(opcode::CTX_DESTROY, ctx, &[]);
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
        self.counters.spurious_faults.fetch_add(1, Ordering::Relaxed);
        if !self.spurious_logged.swap(true, Ordering::Relaxed) {
            pr_info!(
                "hmmgpu{}: ignoring a FAULT event no command waits on (context {}, address {:#x}); further ones are only counted (debugfs counters)\n",
                self.index,
                event.ctx,
                event.addr
            );
        }
    }

    fn take_fault(&self, ctx: u32) -> Option<Event> {
        self.contexts.lock().slots.get_mut(ctx as usize - 1)?.fault.take()
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
        gpu.queues.event_interrupt(|bytes| Gpu::on_event(gpu, bytes));
    }

    fn on_event(gpu: ArcBorrow<'_, Gpu>, bytes: &[u8]) {
        let Some(event) = Event::from_bytes(bytes) else {
            pr_warn!("hmmgpu{}: short event ({} bytes)\n", gpu.index, bytes.len());
            return;
        };
        if event.kind == abi::event::ECC {
            Gpu::on_ecc_event(gpu, &event);
            return;
        }
        if event.kind != abi::event::FAULT {
            pr_warn!("hmmgpu{}: unknown event kind {}\n", gpu.index, event.kind);
            return;
        }
        gpu.on_fault_event(event);
    }

    /// A FAULT event (see [`Gpu::on_event`]).
    fn on_fault_event(&self, event: Event) {
        self.counters.fault_events.fetch_add(1, Ordering::Relaxed);
        let mut contexts = self.contexts.lock();
        let slot = (event.ctx as usize).checked_sub(1).and_then(|i| contexts.slots.get_mut(i));
        let Some(slot) = slot.filter(|s| matches!(s.access, Some((a, b)) if a <= event.addr && event.addr < b)) else {
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

    /// Reads the device's counters (COUNTERS command).
    pub(crate) fn counters(&self) -> Result<[u64; abi::counter::COUNT]> {
        let page = Page::alloc_page(GFP_KERNEL)?;
        // SAFETY: our page.
        let phys = unsafe { PageRef::from_raw(page.as_ptr()) }.ok_or(ENOMEM)?.phys();
        let range = Range { src: 0, dst: phys, len: abi::counter::BLOCK_SIZE as u32, flags: 0 };
        let resp = self.execute(opcode::COUNTERS, 0, &[range])?;
        if resp.status != abi::status::OK {
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

    /// Runs every range of `list` as `opcode` (COPY or FILL); fails with EIO
    /// if the device reports an error for any of them.
    pub(crate) fn run(&self, opcode: u32, list: &RangeList) -> Result<u64> {
        self.run_ctx(opcode, 0, list)
    }

    /// [`Gpu::run`] for an opcode of context `ctx` (MAP, UNMAP).
    /// Allocates: not under the mirror lock (see [`Gpu::prepare`]).
    pub(crate) fn run_ctx(&self, opcode: u32, ctx: u32, list: &RangeList) -> Result<u64> {
        self.run_prepared(self.prepare(opcode, ctx, list)?)
    }

    /// Reads and checks the device's configuration and creates its GPU
    /// object; [`Gpu::start`] starts it.
    pub(crate) fn probe(vdev: VirtioDevice) -> Result<Arc<Gpu>> {
        // Commands carry guest-physical addresses: no IOMMU in between.
        if vdev.has_access_platform() {
            pr_err!("hmmgpu: VIRTIO_F_ACCESS_PLATFORM is not supported\n");
            return Err(EINVAL);
        }
        let mut raw = [0u8; DeviceConfig::SIZE];
        vdev.read_config(&mut raw);
        let config = DeviceConfig::from_bytes(&raw).ok_or(EINVAL)?;
        if config.magic != abi::CONFIG_MAGIC || config.version != abi::ABI_VERSION {
            pr_err!(
                "hmmgpu: unsupported device (magic {:#x}, version {})\n",
                config.magic,
                config.version
            );
            return Err(ENODEV);
        }
        // Two halves (private, coherent), each a whole number of the 2 MiB
        // subsections memremap_pages() works in.
        if config.page_size as u64 != abi::PAGE_SIZE
            || config.vram_size < MIN_VRAM
            || config.vram_size % MIN_VRAM != 0
        {
            pr_err!(
                "hmmgpu: unusable config: page size {} (need 4096), VRAM {} bytes (need a multiple of 4 MiB)\n",
                config.page_size,
                config.vram_size
            );
            return Err(EINVAL);
        }
        // SAFETY: reads a kernel constant.
        if !migrate::pmd_is_2m() {
            pr_err!("hmmgpu: needs 2 MiB PMDs (4 KiB pages; on ppc64, the radix MMU)\n");
            return Err(ENODEV);
        }
        let Some((bar, bar_len)) = vdev.shm_region(abi::SHM_ID_VRAM) else {
            pr_err!("hmmgpu: the device has no VRAM shared memory region\n");
            return Err(ENODEV);
        };
        if bar_len != config.vram_size {
            pr_err!(
                "hmmgpu: VRAM region is {} bytes but config says {}\n",
                bar_len,
                config.vram_size
            );
            return Err(EINVAL);
        }

        let index = claim_index()?;
        let gpu = Self::create(vdev, index, config, bar).inspect_err(|_| release_index(index))?;
        Ok(gpu)
    }

    /// Creates the GPU object; [`Gpu::start`] starts its device.
    fn create(vdev: VirtioDevice, index: u32, config: DeviceConfig, vram_bar: u64) -> Result<Arc<Gpu>> {
        let half = config.vram_size / 2;
        let private = Vram::new(index, MemKind::Private, 0, half)?;
        let coherent = Vram::new(index, MemKind::Coherent, half, half)?;
        let queues = Queues::new(vdev);
        Arc::pin_init(
            try_pin_init!(Gpu {
                vdev,
                index,
                config,
                vram_bar,
                queues <- queues,
                reset_lock <- new_mutex!(()),
                resets: AtomicU64::new(0),
                contexts <- new_spinlock_irq!(Contexts { slots: KVec::new() }),
                private <- private,
                coherent <- coherent,
                canary: AtomicPtr::new(ptr::null_mut()),
                tags: AtomicU64::new(0),
                counters: DriverCounters::default(),
                spurious_logged: AtomicBool::new(false),
                ecc_dropped_logged: AtomicBool::new(false),
                debugfs <- new_mutex!(None),
                mirror_devs <- new_mutex!(KVec::new()),
                ecc_queue <- new_spinlock_irq!(EccQueue::new()),
                ecc_work <- new_work!("hmmgpu::ecc_work"),
                ecc_lock <- new_mutex!(()),
            }),
            GFP_KERNEL,
        )
    }

    /// Starts a GPU [`Gpu::probe`] made, once C holds its `foreign`
    /// reference (see ffi.rs) and the device's priv is set: the queues
    /// start, the VRAM is registered as device memory and the uAPI devices
    /// and debugfs directory are created. On failure the device is stopped
    /// again (see [`Gpu::abandon`]).
    pub(crate) fn start(&self, foreign: *mut c_void) -> Result {
        let dev = self.vdev.dev();
        let result = self.queues.start().and_then(|()| {
            self.private.register(dev, self.vram_bar, foreign)?;
            let md = MirrorDevice::register(self.arc(foreign), MemKind::Private)?;
            self.mirror_devs.lock().push(md, GFP_KERNEL)?;
            Ok(())
        });
        if let Err(e) = result {
            self.abandon();
            return Err(e);
        }
        self.log_registered(&self.private);
        self.create_debugfs(foreign);
        // The coherent personality needs memremap_pages() to accept the BAR;
        // without it the private one still works, and the log says why.
        let coherent = self.coherent.register(dev, self.vram_bar, foreign).and_then(|()| {
            let md = MirrorDevice::register(self.arc(foreign), MemKind::Coherent)?;
            self.mirror_devs.lock().push(md, GFP_KERNEL)?;
            Ok(())
        });
        match coherent {
            Ok(()) => {
                self.log_registered(&self.coherent);
                self.set_canary();
            }
            Err(e) => pr_err!(
                "hmmgpu{}: device-coherent VRAM not registered ({:?}): /dev/hmm_dmirror{} is not available\n",
                self.index,
                e,
                self.index + MAX_GPUS
            ),
        }
        Ok(())
    }

    /// A new `Arc` of this GPU from its foreign reference.
    fn arc(&self, foreign: *mut c_void) -> Arc<Gpu> {
        // SAFETY: `foreign` is this GPU's foreign reference, alive while it
        // is bound (its devm action runs after remove).
        let gpu = unsafe { <Arc<Gpu> as kernel::types::ForeignOwnable>::borrow(foreign) };
        Arc::from(gpu)
    }

    /// Undoes a probe that failed after [`Gpu::probe`]: nothing runs on
    /// the device any more and its GPU index is free again.
    pub(crate) fn abandon(&self) {
        self.begin_removal();
        self.queues.shut_down();
        self.flush_ecc_work();
        release_index(self.index);
    }

    fn log_registered(&self, vram: &Vram) {
        let minor = match vram.kind() {
            MemKind::Private => self.index,
            MemKind::Coherent => self.index + MAX_GPUS,
        };
        pr_info!(
            "hmmgpu{}: registered {} MiB VRAM (BAR at {:#x}) as {} memory, pfns {:#x}..{:#x}, uAPI /dev/hmm_dmirror{}\n",
            self.index,
            vram.size() >> 20,
            self.vram_bar,
            vram.kind().name(),
            vram.pfn_first(),
            vram.pfn_first() + vram.pages(),
            minor
        );
    }

    pub(crate) fn remove(&self) {
        // Before the canary and the VRAM go: the ECC work touches both.
        self.begin_removal();
        // Removing the files waits for readers in progress.
        let debugfs = self.debugfs.lock().take();
        drop(debugfs);
        // No new opens; open files see ENODEV from now on, except the
        // eviction below which still needs the device.
        let devs = core::mem::take(&mut *self.mirror_devs.lock());
        drop(devs);
        // A link that went down since the last operation is noticed here.
        self.link_ok();
        let canary = self.canary.swap(ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: the canary page, locked since its allocation and ours
        // alone now: this unlocks it and drops the last reference (its VRAM
        // is freed).
        unsafe {
            if let Some(canary) = PageRef::from_raw(canary) {
                canary.unlock_put();
            }
        }
        // Commands still run while removing, so the eviction can copy VRAM
        // back.
        let evicted = migrate::evict_all(self, &self.private) + migrate::evict_all(self, &self.coherent);
        self.private.reclaim_deferred();
        self.coherent.reclaim_deferred();
        match self.counters() {
            Ok(c) => {
                pr_info!("hmmgpu{}: device counters:\n", self.index);
                for (name, value) in abi::counter::NAMES.iter().zip(c.iter()) {
                    pr_info!("hmmgpu{}:   {} {}\n", self.index, name, value);
                }
            }
            Err(e) => pr_warn!("hmmgpu{}: cannot read device counters: {:?}\n", self.index, e),
        }
        pr_info!(
            "hmmgpu{}: removed; {} pages evicted to system memory, {} of {} KiB VRAM free, {} KiB retired\n",
            self.index,
            evicted,
            (self.private.avail() + self.coherent.avail()) >> 10,
            self.config.vram_size >> 10,
            ((self.private.retired_pages() + self.coherent.retired_pages()) * abi::PAGE_SIZE) >> 10
        );
        self.queues.shut_down();
        // No more events: an ECC work queued until now finds it stopped.
        self.flush_ecc_work();
        release_index(self.index);
    }
}

impl Gpu {
    /// Creates /sys/kernel/debug/hmmgpu<index>: `counters` and `vram`. A
    /// GPU without it works: the failure is logged.
    fn create_debugfs(&self, foreign: *mut c_void) {
        let created = CString::try_from_fmt(fmt!("hmmgpu{}", self.index)).and_then(|name| {
            let gpu: Result<Arc<Gpu>> = Ok(self.arc(foreign));
            let scope = debugfs::Scope::dir(gpu, &name, |gpu, dir| {
                dir.read_callback_file(c"counters", gpu, &|gpu: &Arc<Gpu>, f| gpu.write_counters(f));
                dir.read_callback_file(c"vram", gpu, &|gpu: &Arc<Gpu>, f| gpu.write_vram(f));
            });
            KBox::pin_init(scope, GFP_KERNEL)
        });
        match created {
            Ok(scope) => *self.debugfs.lock() = Some(scope),
            Err(e) => pr_warn!("hmmgpu{}: no debugfs directory: {:?}\n", self.index, e),
        }
    }

    /// debugfs `counters`: the device's counters, read with COUNTERS, then
    /// the driver's, one `name value` line each. A device that does not
    /// answer COUNTERS shows the driver's alone.
    fn write_counters(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Ok(counters) = self.counters() {
            for (name, value) in abi::counter::NAMES.iter().zip(counters.iter()) {
                writeln!(f, "{} {}", name, value)?;
            }
        }
        let c = &self.counters;
        let driver = [
            ("driver_fault_events", c.fault_events.load(Ordering::Relaxed)),
            ("driver_spurious_faults", c.spurious_faults.load(Ordering::Relaxed)),
            ("driver_copy_errors", c.copy_errors.load(Ordering::Relaxed)),
            ("driver_polled_completions", self.queues.polled_completions()),
            ("driver_resets", self.resets.load(Ordering::Relaxed)),
            ("driver_ecc_events", c.ecc_events.load(Ordering::Relaxed)),
            ("driver_ecc_dropped", c.ecc_dropped.load(Ordering::Relaxed)),
            (
                "driver_retired_pages",
                self.private.retired_pages() + self.coherent.retired_pages(),
            ),
        ];
        for (name, value) in driver {
            writeln!(f, "{} {}", name, value)?;
        }
        Ok(())
    }

    /// debugfs `vram`: per half of the VRAM its offset, size, first device
    /// pfn, free bytes and retired pages, then the link canary's VRAM
    /// offset. Tests use it to tell a page's VRAM offset from its pfn
    /// (/proc/self/pagemap).
    fn write_vram(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for vram in [&self.private, &self.coherent] {
            // Pages freed by now count as free.
            vram.reclaim_deferred();
            writeln!(
                f,
                "{} base {:#x} size {:#x} pfn_first {:#x} free {:#x} retired {}",
                match vram.kind() {
                    MemKind::Private => "private",
                    MemKind::Coherent => "coherent",
                },
                vram.base(),
                vram.size(),
                vram.pfn_first(),
                vram.avail(),
                vram.retired_pages()
            )?;
        }
        match self.canary_pfn().and_then(|pfn| self.coherent.offset_of_pfn(pfn)) {
            Some(offset) => writeln!(f, "canary {:#x}", offset),
            None => writeln!(f, "canary none"),
        }
    }
}

fn claim_index() -> Result<u32> {
    loop {
        let used = GPU_INDICES.load(Ordering::Acquire);
        let index = (!used).trailing_zeros();
        if index >= MAX_GPUS {
            pr_err!("hmmgpu: at most {} GPUs are supported\n", MAX_GPUS);
            return Err(EBUSY);
        }
        if GPU_INDICES
            .compare_exchange(used, used | (1 << index), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Ok(index);
        }
    }
}

fn release_index(index: u32) {
    GPU_INDICES.fetch_and(!(1 << index), Ordering::AcqRel);
}
