// SPDX-License-Identifier: GPL-2.0

//! One hmmgpu device: the [`Gpu`] object, its lifecycle and its link
//! canary. The rest is split by concern:
//! - `probe`: probe and removal;
//! - `commands`: running commands on the device;
//! - `reset`: device resets (a stalled queue, a PCI reset) and recovery;
//! - `contexts`: device MMU contexts, MMU accesses, the events;
//! - `debugfs`: /sys/kernel/debug/hmmgpu<N>.

mod commands;
mod contexts;
mod debugfs;
mod probe;
mod reset;

use crate::abi::DeviceConfig;
use crate::compat::SpinLockIrq;
use crate::ecc::EccQueue;
use crate::log::GpuName;
use crate::pages::PageRef;
use crate::queue::{Lifecycle, Loss, Queues};
use crate::uapi::MirrorDevice;
use crate::virtio::VirtioDevice;
use crate::vram::{MemKind, Vram};
use contexts::Contexts;
pub(crate) use contexts::Replay;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use kernel::bindings;
use kernel::device::Device;
use kernel::ffi::c_void;
use kernel::prelude::*;
use kernel::sync::aref::ARef;
use kernel::sync::{Arc, Mutex};
use kernel::workqueue::Work;

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

/// The work items of a [`Gpu`] (their `Work` ids).
pub(crate) const ECC_WORK: u64 = 0;
const RESET_WORK: u64 = 1;

/// Most GPUs one guest can have (GPU n gets /dev/hmm_dmirror<n> and
/// /dev/hmm_dmirror<n + MAX_GPUS>, as test_hmm numbers its devices).
pub(crate) const MAX_GPUS: u32 = 2;

/// The link canary's mark ("HMMGPU-L"); a failed link reads all-ones instead.
const LINK_CANARY: u64 = u64::from_le_bytes(*b"HMMGPU-L");

/// /sys/kernel/debug/hmmgpu<N>, its files reading through the GPU.
type DebugfsDir = Pin<KBox<kernel::debugfs::Scope<Arc<Gpu>>>>;

/// A bound hmmgpu device.
#[pin_data]
pub(crate) struct Gpu {
    vdev: VirtioDevice,
    /// The virtio device's `struct device`, which the driver logs on.
    dev: ARef<Device>,
    index: u32,
    config: DeviceConfig,
    /// Guest-physical address of the VRAM BAR (the shared memory region).
    vram_bar: u64,
    /// The queues and the device's [`Lifecycle`].
    #[pin]
    queues: Queues,
    /// Serializes device resets (the reset work's, a transport reset's).
    #[pin]
    reset_lock: Mutex<()>,
    /// Device resets done; a command submitted in generation N that times
    /// out asks for a reset only if no other reset came since.
    resets: AtomicU64,
    /// The reset asked for ([`Gpu::request_reset`]), for the reset work.
    #[pin]
    reset_request: SpinLockIrq<reset::ResetSlot>,
    /// Runs the reset asked for, on `reset_wq` (reset.rs).
    #[pin]
    reset_work: Work<Gpu, RESET_WORK>,
    reset_wq: reset::ResetQueue,
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
    debugfs: Mutex<Option<DebugfsDir>>,
    /// The uAPI devices (private, coherent); taken (deregistered) on removal.
    #[pin]
    mirror_devs: Mutex<KVec<Pin<KBox<MirrorDevice>>>>,
    /// ECC errors from the event queue, waiting for `ecc_work` (ecc.rs).
    #[pin]
    pub(crate) ecc_queue: SpinLockIrq<EccQueue>,
    /// Handles `ecc_queue` in process context.
    #[pin]
    pub(crate) ecc_work: Work<Gpu, ECC_WORK>,
    /// Held by the ECC work while it runs, and by removal when it begins:
    /// a work that runs later sees the removal and does nothing (see
    /// [`Gpu::begin_removal`]).
    #[pin]
    pub(crate) ecc_lock: Mutex<()>,
}

impl GpuName for Gpu {
    fn device(&self) -> &Device {
        &self.dev
    }

    fn gpu_index(&self) -> u32 {
        self.index
    }
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
        [&self.private, &self.coherent]
            .into_iter()
            .find(|v| v.owner() == owner)
    }

    /// The link canary's page, if there is one.
    fn canary(&self) -> Option<PageRef> {
        // SAFETY: the canary is a coherent page we hold (locked and
        // referenced) until it is replaced or removal frees it.
        unsafe { PageRef::from_raw(self.canary.load(Ordering::Acquire)) }
    }

    /// The VRAM offset of `pfn` if it is one of this GPU's device pages.
    pub(crate) fn vram_offset_of_pfn(&self, pfn: u64) -> Option<u64> {
        self.private
            .offset_of_pfn(pfn)
            .or_else(|| self.coherent.offset_of_pfn(pfn))
    }

    /// Where the device is in its life.
    pub(crate) fn lifecycle(&self) -> Lifecycle {
        self.queues.lifecycle()
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
            gpu_err!(
                self,
                "the VRAM BAR reads all-ones: the link is down; the device is dead\n"
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
            Err(e) => gpu_warn!(
                self,
                "no VRAM for the link canary ({:?}): a failed link will not be noticed\n",
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
            gpu_err!(self, "the device stopped answering; it is dead\n");
        }
        ENODEV
    }

    /// Device resets done so far: a change tells a caller a reset came in
    /// between (the contexts were recreated empty).
    pub(crate) fn reset_generation(&self) -> u64 {
        self.resets.load(Ordering::Acquire)
    }

    /// A fresh tag for a command.
    pub(crate) fn tag(&self) -> u64 {
        self.tags.fetch_add(1, Ordering::Relaxed)
    }

    /// A new `Arc` of this GPU from its foreign reference.
    fn arc(&self, foreign: *mut c_void) -> Arc<Gpu> {
        // SAFETY: `foreign` is this GPU's foreign reference, alive while it
        // is bound (its devm action runs after remove).
        let gpu = unsafe { <Arc<Gpu> as kernel::types::ForeignOwnable>::borrow(foreign) };
        Arc::from(gpu)
    }
}
