// SPDX-License-Identifier: GPL-2.0

//! Probe (config space, VRAM region, queues, memory registration, uAPI)
//! and removal (evict VRAM, then tear down).

use super::reset::{ResetQueue, ResetSlot};
use super::{contexts::Contexts, DriverCounters, Gpu, MAX_GPUS};
use crate::abi::{self, DeviceConfig};
use crate::compat::new_spinlock_irq;
use crate::ecc::EccQueue;
use crate::migrate;
use crate::pages::PageRef;
use crate::queue::Queues;
use crate::uapi::MirrorDevice;
use crate::virtio::VirtioDevice;
use crate::vram::{MemKind, Vram};
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use kernel::device::Device;
use kernel::ffi::c_void;
use kernel::prelude::*;
use kernel::sync::aref::ARef;
use kernel::sync::Arc;
use kernel::{new_mutex, new_work};

/// GPU indices in use (bit n: GPU n), which name the uAPI devices.
static GPU_INDICES: AtomicU32 = AtomicU32::new(0);

/// Smallest VRAM the driver can use.
const MIN_VRAM: u64 = 4 << 20;

impl Gpu {
    /// Reads and checks the device's configuration and creates its GPU
    /// object; [`Gpu::start`] starts it.
    pub(crate) fn probe(vdev: VirtioDevice) -> Result<Arc<Gpu>> {
        // SAFETY: the device being probed, alive; the reference keeps it.
        let dev = unsafe { Device::get_device(vdev.dev()) };
        // Commands carry guest-physical addresses: no IOMMU in between.
        if vdev.has_access_platform() {
            dev_err!(dev, "VIRTIO_F_ACCESS_PLATFORM is not supported\n");
            return Err(EINVAL);
        }
        let mut raw = [0u8; DeviceConfig::SIZE];
        vdev.read_config(&mut raw);
        let config = DeviceConfig::from_bytes(&raw).ok_or(EINVAL)?;
        if config.magic != abi::CONFIG_MAGIC || config.version != abi::ABI_VERSION {
            dev_err!(
                dev,
                "unsupported device (magic {:#x}, version {})\n",
                config.magic,
                config.version
            );
            return Err(ENODEV);
        }
        // Two halves (private, coherent), each a whole number of the 2 MiB
        // subsections memremap_pages() works in.
        if u64::from(config.page_size) != abi::PAGE_SIZE
            || config.vram_size < MIN_VRAM
            || config.vram_size % MIN_VRAM != 0
        {
            dev_err!(
                dev,
                "unusable config: page size {} (need 4096), VRAM {} bytes (need a multiple of 4 MiB)\n",
                config.page_size,
                config.vram_size
            );
            return Err(EINVAL);
        }
        if !migrate::pmd_is_2m() {
            dev_err!(
                dev,
                "needs 2 MiB PMDs (4 KiB pages; on ppc64, the radix MMU)\n"
            );
            return Err(ENODEV);
        }
        let Some((bar, bar_len)) = vdev.shm_region(abi::SHM_ID_VRAM) else {
            dev_err!(dev, "the device has no VRAM shared memory region\n");
            return Err(ENODEV);
        };
        if bar_len != config.vram_size {
            dev_err!(
                dev,
                "VRAM region is {} bytes but config says {}\n",
                bar_len,
                config.vram_size
            );
            return Err(EINVAL);
        }

        let index = claim_index(&dev)?;
        let gpu =
            Self::create(vdev, dev, index, config, bar).inspect_err(|_| release_index(index))?;
        Ok(gpu)
    }

    /// Creates the GPU object; [`Gpu::start`] starts its device.
    fn create(
        vdev: VirtioDevice,
        dev: ARef<Device>,
        index: u32,
        config: DeviceConfig,
        vram_bar: u64,
    ) -> Result<Arc<Gpu>> {
        let half = config.vram_size / 2;
        let private = Vram::new(dev.clone(), index, MemKind::Private, 0, half)?;
        let coherent = Vram::new(dev.clone(), index, MemKind::Coherent, half, half)?;
        let queues = Queues::new(vdev, dev.clone());
        let reset_wq = ResetQueue::new(index)?;
        Arc::pin_init(
            try_pin_init!(Gpu {
                vdev,
                dev,
                index,
                config,
                vram_bar,
                queues <- queues,
                reset_lock <- new_mutex!(()),
                resets: AtomicU64::new(0),
                reset_request <- new_spinlock_irq!(ResetSlot::new()),
                reset_work <- new_work!("hmmgpu::reset_work"),
                reset_wq,
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
    /// reference (see ffi.rs) and set it as the drvdata: the queues
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
        let coherent = self
            .coherent
            .register(dev, self.vram_bar, foreign)
            .and_then(|()| {
                let md = MirrorDevice::register(self.arc(foreign), MemKind::Coherent)?;
                self.mirror_devs.lock().push(md, GFP_KERNEL)?;
                Ok(())
            });
        match coherent {
            Ok(()) => {
                self.log_registered(&self.coherent);
                self.set_canary();
            }
            Err(e) => gpu_err!(
                self,
                "device-coherent VRAM not registered ({:?}): /dev/hmm_dmirror{} is not available\n",
                e,
                self.index + MAX_GPUS
            ),
        }
        Ok(())
    }

    /// Undoes a probe that failed after [`Gpu::probe`]: nothing runs on
    /// the device any more and its GPU index is free again.
    pub(crate) fn abandon(&self) {
        self.begin_removal();
        self.close_resets();
        self.queues.shut_down();
        self.flush_ecc_work();
        release_index(self.index);
    }

    fn log_registered(&self, vram: &Vram) {
        let minor = match vram.kind() {
            MemKind::Private => self.index,
            MemKind::Coherent => self.index + MAX_GPUS,
        };
        gpu_info!(self, "registered {} MiB VRAM (BAR at {:#x}) as {} memory, pfns {:#x}..{:#x}, uAPI /dev/hmm_dmirror{}\n", vram.size() >> 20,
            self.vram_bar,
            vram.kind().name(),
            vram.pfn_first(),
            vram.pfn_first() + vram.pages(),
            minor);
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
        let evicted =
            migrate::evict_all(self, &self.private) + migrate::evict_all(self, &self.coherent);
        self.private.reclaim_deferred();
        self.coherent.reclaim_deferred();
        match self.counters() {
            Ok(c) => {
                gpu_info!(self, "device counters:\n");
                for (name, value) in abi::counter::NAMES.iter().zip(c.iter()) {
                    gpu_info!(self, "  {} {}\n", name, value);
                }
            }
            Err(e) => gpu_warn!(self, "cannot read device counters: {:?}\n", e),
        }
        gpu_info!(
            self,
            "removed; {} pages evicted to system memory, {} of {} KiB VRAM free, {} KiB retired\n",
            evicted,
            (self.private.avail() + self.coherent.avail()) >> 10,
            self.config.vram_size >> 10,
            ((self.private.retired_pages() + self.coherent.retired_pages()) * abi::PAGE_SIZE) >> 10
        );
        // A reset asked for runs to its end first; none is asked for after.
        self.close_resets();
        self.queues.shut_down();
        // No more events: an ECC work queued until now finds it stopped.
        self.flush_ecc_work();
        release_index(self.index);
    }

    /// Begins removal: uAPI calls fail with ENODEV from now on, and the ECC
    /// work stops for good (this waits for a run in progress, under
    /// `ecc_lock`; later runs see the removal and return at once).
    fn begin_removal(&self) {
        let _ecc_idle = self.ecc_lock.lock();
        self.queues.begin_removal();
    }
}

fn claim_index(dev: &Device) -> Result<u32> {
    loop {
        let used = GPU_INDICES.load(Ordering::Acquire);
        let index = (!used).trailing_zeros();
        if index >= MAX_GPUS {
            dev_err!(dev, "at most {} GPUs are supported\n", MAX_GPUS);
            return Err(EBUSY);
        }
        if GPU_INDICES
            .compare_exchange(
                used,
                used | (1 << index),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            return Ok(index);
        }
    }
}

fn release_index(index: u32) {
    GPU_INDICES.fetch_and(!(1 << index), Ordering::AcqRel);
}
