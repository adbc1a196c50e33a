// SPDX-License-Identifier: GPL-2.0

//! VRAM: the allocator (the kernel's GPU buddy allocator) and the ZONE_DEVICE
//! pages that stand for it.
//!
//! A GPU's VRAM is split in two halves, one per personality: the first half
//! is MEMORY_DEVICE_PRIVATE (struct pages in a free physical range, not CPU
//! addressable), the second MEMORY_DEVICE_COHERENT (struct pages over the
//! BAR itself, CPU addressable). Each half is one `Vram`.
//!
//! Device page `pfn_first + n` is VRAM page `base / PAGE_SIZE + n`: the
//! mapping is fixed, so a device page's VRAM offset is computed, never
//! stored. What a page stores (in `zone_device_data`) is its buddy
//! allocation, returned when the kernel frees the page.
//!
//! A page whose VRAM went bad (an ECC error, a machine check) is retired:
//! taken out of the buddy allocator for good, at once if it is free, or
//! when the allocation it belongs to is freed (see [`Retired`]).

use crate::abi;
use crate::compat::{new_spinlock_irq, SpinLockIrq};
use crate::log::GpuName;
use crate::pages::PageRef;
use crate::shim;
use core::ptr;
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::bindings;
use kernel::device::Device;
use kernel::ffi::c_void;
use kernel::gpu::buddy::{
    AllocatedBlocks, GpuBuddy, GpuBuddyAllocFlag, GpuBuddyAllocFlags, GpuBuddyAllocMode,
    GpuBuddyParams,
};
use kernel::new_mutex;
use kernel::prelude::*;
use kernel::ptr::Alignment;
use kernel::sizes::{SZ_2M, SZ_4K};
use kernel::sync::aref::ARef;
use kernel::sync::Mutex;

/// Order of a THP (2 MiB of 4 KiB pages).
pub(crate) const HUGE_ORDER: u32 = 9;

/// One allocation of VRAM (a page or a 2 MiB THP), owned by its device
/// pages while in use. A THP split by the kernel shares it among the new
/// folios; it is freed when all of its pages are.
struct VramAlloc {
    _blocks: Pin<KBox<AllocatedBlocks>>,
    /// Pages of this allocation not freed yet.
    pages: AtomicU64,
    /// Next entry of the deferred-free list.
    next: *mut VramAlloc,
}

/// Allocations released by `folio_free`, which may run in atomic context
/// where the buddy allocator's mutex cannot be taken; they are returned to
/// the allocator from process context (the next allocation, or removal).
struct FreeList {
    head: *mut VramAlloc,
}

// SAFETY: the list is only touched under its `SpinLock`.
unsafe impl Send for FreeList {}

/// Pages of one [`Vram::alloc_batch`], handed out one at a time.
pub(crate) struct PageBatch<'a> {
    vram: &'a Vram,
    /// The shared allocation; NULL for an empty batch.
    alloc: *mut VramAlloc,
    offsets: KVec<u64>,
    next: usize,
}

impl PageBatch<'_> {
    /// The next page, initialized and locked for `migrate_vma_pages()`,
    /// with its VRAM offset; `None` when the batch is used up.
    pub(crate) fn take(&mut self) -> Option<(PageRef, u64)> {
        let offset = *self.offsets.get(self.next)?;
        self.next += 1;
        let pfn = self.vram.pfn_first() + (offset - self.vram.base) / abi::PAGE_SIZE;
        // SAFETY: `pfn` is inside our registered range and its VRAM was
        // just allocated, so the page is free.
        unsafe {
            let page = PageRef::from_pfn(pfn);
            page.init_device_folio(0);
            page.set_zone_device_data(self.alloc.cast());
            Some((page, offset))
        }
    }
}

impl Drop for PageBatch<'_> {
    fn drop(&mut self) {
        // Pages never handed out are given back now.
        let unused = (self.offsets.len() - self.next) as u64;
        if self.alloc.is_null() || unused == 0 {
            return;
        }
        // SAFETY: `alloc` lives until all its pages are released.
        if unsafe { (*self.alloc).pages.fetch_sub(unused, Ordering::AcqRel) } == unused {
            // SAFETY: no page refers to it any more.
            self.vram.release(unsafe { KBox::from_raw(self.alloc) });
        }
    }
}

/// The retired VRAM pages of a [`Vram`] (by VRAM offset). Its lock also
/// serializes every allocation from and every return to the buddy
/// allocator, so a retired page whose allocation is freed is held before
/// anyone else can allocate it.
struct Retired {
    /// Retired pages still inside a live allocation (in use, or sharing a
    /// batch or THP allocation with pages in use): held when it is freed.
    pending: KVec<u64>,
    /// Retired pages held out of the allocator, one 4 KiB block each. They
    /// go back with the allocator itself (the blocks keep it alive), so its
    /// teardown finds everything returned.
    held: KVec<Pin<KBox<AllocatedBlocks>>>,
}

impl Retired {
    fn contains(&self, offset: u64) -> bool {
        self.pending.contains(&offset)
            || self
                .held
                .iter()
                .any(|b| b.iter().any(|b| b.offset() == offset))
    }
}

/// What [`Vram::retire`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retirement {
    /// The page was retired before.
    Already,
    /// The page was free: it is out of the allocator now.
    Held,
    /// The page's VRAM is allocated: it leaves the allocator when that
    /// allocation is freed.
    Pending,
}

/// Which kind of ZONE_DEVICE memory a `Vram` is registered as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemKind {
    /// MEMORY_DEVICE_PRIVATE.
    Private,
    /// MEMORY_DEVICE_COHERENT.
    Coherent,
}

impl MemKind {
    /// Name for logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            MemKind::Private => "device-private",
            MemKind::Coherent => "device-coherent",
        }
    }
}

/// One personality's share of a GPU's VRAM.
#[pin_data]
pub(crate) struct Vram {
    kind: MemKind,
    /// VRAM offset of this share.
    base: u64,
    size: u64,
    buddy: GpuBuddy,
    /// First pfn of the device-private range; 0 until registered.
    pfn_first: AtomicU64,
    #[pin]
    deferred: SpinLockIrq<FreeList>,
    /// The retired pages; its lock is the allocator's (see [`Retired`]).
    #[pin]
    retired: Mutex<Retired>,
    /// Pages retired (held or pending), for the counters.
    retired_pages: AtomicU64,
    /// The GPU's device and index, for logs.
    dev: ARef<Device>,
    gpu: u32,
}

impl GpuName for Vram {
    fn device(&self) -> &Device {
        &self.dev
    }

    fn gpu_index(&self) -> u32 {
        self.gpu
    }
}

impl Vram {
    /// An allocator for `size` bytes of VRAM at offset `base` of GPU `gpu`,
    /// in pages of [`abi::PAGE_SIZE`].
    pub(crate) fn new(
        dev: ARef<Device>,
        gpu: u32,
        kind: MemKind,
        base: u64,
        size: u64,
    ) -> Result<impl PinInit<Self, Error>> {
        let buddy = GpuBuddy::new(GpuBuddyParams {
            base_offset: base,
            size,
            chunk_size: Alignment::new::<SZ_4K>(),
        })?;
        Ok(try_pin_init!(Self {
            kind,
            base,
            size,
            buddy,
            pfn_first: AtomicU64::new(0),
            deferred <- new_spinlock_irq!(FreeList { head: ptr::null_mut() }),
            retired <- new_mutex!(Retired { pending: KVec::new(), held: KVec::new() }),
            retired_pages: AtomicU64::new(0),
            dev,
            gpu,
        }))
    }

    /// VRAM size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The kind of device memory.
    pub(crate) fn kind(&self) -> MemKind {
        self.kind
    }

    /// This share as the pgmap owner: the identity migrate_vma_*() and
    /// hmm_range_fault() match device pages against.
    pub(crate) fn owner(&self) -> *mut c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    /// Number of VRAM pages.
    pub(crate) fn pages(&self) -> u64 {
        self.size / abi::PAGE_SIZE
    }

    /// Creates the struct pages (devm on `dev`): device-private ones in a
    /// free physical range, or device-coherent ones over the VRAM BAR at
    /// guest-physical `bar`. `gpu` is handed back to the page callbacks.
    pub(crate) fn register(
        &self,
        dev: *mut bindings::device,
        bar: u64,
        gpu: *mut c_void,
    ) -> Result {
        let (kind, start, end) = match self.kind {
            MemKind::Private => {
                // SAFETY: `dev` is the bound virtio device; the region is
                // released with it (devm).
                let res = unsafe {
                    bindings::devm_request_free_mem_region(
                        dev,
                        &raw mut bindings::iomem_resource,
                        self.size as usize,
                    )
                };
                let res = kernel::error::from_err_ptr(res).inspect_err(|e| {
                    gpu_err!(
                        self,
                        "no free physical range for {} bytes of VRAM: {}\n",
                        self.size,
                        e.to_errno()
                    )
                })?;
                // SAFETY: a region just granted to us.
                let res = unsafe { &*res };
                (
                    bindings::memory_type_MEMORY_DEVICE_PRIVATE,
                    res.start,
                    res.end,
                )
            }
            MemKind::Coherent => {
                let start = bar + self.base;
                (
                    bindings::memory_type_MEMORY_DEVICE_COHERENT,
                    start,
                    start + self.size - 1,
                )
            }
        };
        // SAFETY: `dev` is the bound virtio device; `gpu` and `self` outlive
        // the mapping (a devm action registered before it holds a reference).
        let pfn = unsafe { shim::hmmgpu_memremap_pages(dev, kind, start, end, gpu, self.owner()) };
        if pfn < 0 {
            gpu_err!(
                self,
                "devm_memremap_pages ({}) failed: {}\n",
                match self.kind {
                    MemKind::Private => "private",
                    MemKind::Coherent => "coherent",
                },
                pfn
            );
            return Err(Error::from_errno(pfn as i32));
        }
        self.pfn_first.store(pfn as u64, Ordering::Release);
        Ok(())
    }

    /// First device pfn.
    pub(crate) fn pfn_first(&self) -> u64 {
        self.pfn_first.load(Ordering::Acquire)
    }

    /// The VRAM offset of device page `pfn`, if it is one of ours.
    pub(crate) fn offset_of_pfn(&self, pfn: u64) -> Option<u64> {
        let first = self.pfn_first();
        if first == 0 || pfn < first || pfn >= first + self.pages() {
            return None;
        }
        Some(self.base + (pfn - first) * abi::PAGE_SIZE)
    }

    /// Whether VRAM offset `offset` is in this share.
    pub(crate) fn contains(&self, offset: u64) -> bool {
        offset >= self.base && offset - self.base < self.size
    }

    /// The device page pfn of VRAM offset `offset` (in this share), if the
    /// pages are registered.
    pub(crate) fn pfn_of_offset(&self, offset: u64) -> Option<u64> {
        let first = self.pfn_first();
        (first != 0 && self.contains(offset)).then(|| first + (offset - self.base) / abi::PAGE_SIZE)
    }

    /// VRAM offset of this share.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// Bytes free in the allocator.
    pub(crate) fn avail(&self) -> u64 {
        self.buddy.avail()
    }

    /// Pages retired so far.
    pub(crate) fn retired_pages(&self) -> u64 {
        self.retired_pages.load(Ordering::Relaxed)
    }

    /// Retires the VRAM page at `offset` (page aligned, in this share): it
    /// is never allocated again. A free page leaves the allocator at once;
    /// one whose VRAM is allocated when its allocation is freed (the caller
    /// moves its data away first, if it has any).
    pub(crate) fn retire(&self, offset: u64) -> Result<Retirement> {
        let mut retired = self.retired.lock();
        if retired.contains(offset) {
            return Ok(Retirement::Already);
        }
        // Room to hold every pending page, so holding one never fails for
        // want of it.
        let room = retired.pending.len() + 1;
        retired.held.reserve(room, GFP_KERNEL)?;
        retired.pending.push(offset, GFP_KERNEL)?;
        self.retired_pages.fetch_add(1, Ordering::Relaxed);
        // Freed pages of the deferred list may include it.
        self.reclaim_locked(&mut retired);
        self.hold_pending(&mut retired);
        Ok(if retired.pending.contains(&offset) {
            Retirement::Pending
        } else {
            Retirement::Held
        })
    }

    /// [`Vram::retire`] for a cause that handles the page's data itself
    /// (`why`, e.g. memory_failure()); logs a page retired for the first
    /// time.
    pub(crate) fn retire_and_log(&self, offset: u64, why: &str) {
        match self.retire(offset) {
            Ok(Retirement::Already) => {}
            Ok(_) => gpu_warn!(self, "VRAM page {:#x} retired ({})\n", offset, why),
            Err(e) => gpu_err!(self, "cannot retire VRAM page {:#x}: {:?}\n", offset, e),
        }
    }

    /// Takes every pending retired page that is free out of the allocator.
    /// Under the `retired` lock, right after anything was returned to the
    /// allocator: nobody can have allocated the page in between.
    fn hold_pending(&self, retired: &mut Retired) {
        let Retired { pending, held } = retired;
        pending.retain(|offset| !self.try_hold(*offset, held));
    }

    /// Allocates the page at `offset` into `held` if it is free; false if
    /// it is still allocated (or cannot be held, which is logged).
    fn try_hold(&self, offset: u64, held: &mut KVec<Pin<KBox<AllocatedBlocks>>>) -> bool {
        let start = offset - self.base;
        let blocks = KBox::pin_init(
            self.buddy.alloc_blocks(
                GpuBuddyAllocMode::Range(start..start + abi::PAGE_SIZE),
                abi::PAGE_SIZE,
                Alignment::new::<SZ_4K>(),
                GpuBuddyAllocFlags::default(),
            ),
            GFP_KERNEL,
        );
        let result = blocks.and_then(|b| held.push(b, GFP_KERNEL).map_err(Error::from));
        match result {
            Ok(()) => true,
            // Allocated: held once its allocation is freed.
            Err(e) if e == ENOSPC => false,
            Err(e) => {
                // Out of memory for the block: the page stays pending and
                // free, so it may be handed out before a later return
                // holds it.
                gpu_err!(self, "cannot take retired VRAM page {:#x} out of the allocator ({:?}): it may be allocated again\n", offset,
                    e);
                false
            }
        }
    }

    /// Returns an allocation to the buddy allocator (see [`Retired`]).
    fn release(&self, alloc: KBox<VramAlloc>) {
        let mut retired = self.retired.lock();
        drop(alloc);
        self.hold_pending(&mut retired);
    }

    /// Allocates one VRAM page (`huge`: a 2 MiB THP) and returns its device
    /// page (the THP's head), initialized and locked for
    /// `migrate_vma_pages()`, with its VRAM offset.
    pub(crate) fn alloc_page(&self, huge: bool) -> Result<(PageRef, u64)> {
        let mut retired = self.retired.lock();
        self.reclaim_locked(&mut retired);
        let (size, align, order) = if huge {
            (abi::HUGE_PAGE_SIZE, Alignment::new::<SZ_2M>(), HUGE_ORDER)
        } else {
            (abi::PAGE_SIZE, Alignment::new::<SZ_4K>(), 0)
        };
        let blocks = KBox::pin_init(
            self.buddy.alloc_blocks(
                GpuBuddyAllocMode::Simple,
                size,
                align,
                GpuBuddyAllocFlags::from(GpuBuddyAllocFlag::Contiguous),
            ),
            GFP_KERNEL,
        )?;
        let offset = blocks.iter().next().ok_or(ENOMEM)?.offset();
        let pfn = self.pfn_first() + (offset - self.base) / abi::PAGE_SIZE;
        let alloc = KBox::new(
            VramAlloc {
                _blocks: blocks,
                pages: AtomicU64::new(1 << order),
                next: ptr::null_mut(),
            },
            GFP_KERNEL,
        )?;
        // SAFETY: `pfn` is inside our registered range; the pages are free
        // (their VRAM was just allocated) and ours.
        unsafe {
            let page = PageRef::from_pfn(pfn);
            page.init_device_folio(order);
            page.set_zone_device_data(KBox::into_raw(alloc).cast());
            Ok((page, offset))
        }
    }

    /// Allocates up to `n` single VRAM pages in one buddy allocation (few
    /// large blocks instead of `n` splits down to 4 KiB, which dominate the
    /// cost of page-by-page allocation). The pages share the allocation:
    /// its VRAM returns to the buddy allocator when the last of them is
    /// freed. Returns an empty batch if the VRAM cannot hold `n` pages.
    pub(crate) fn alloc_batch(&self, n: usize) -> Result<PageBatch<'_>> {
        let mut batch = PageBatch {
            vram: self,
            alloc: ptr::null_mut(),
            offsets: KVec::new(),
            next: 0,
        };
        if n == 0 {
            return Ok(batch);
        }
        let mut retired = self.retired.lock();
        self.reclaim_locked(&mut retired);
        let Ok(blocks) = KBox::pin_init(
            self.buddy.alloc_blocks(
                GpuBuddyAllocMode::Simple,
                n as u64 * abi::PAGE_SIZE,
                Alignment::new::<SZ_4K>(),
                GpuBuddyAllocFlags::default(),
            ),
            GFP_KERNEL,
        ) else {
            return Ok(batch);
        };
        batch.offsets.reserve(n, GFP_KERNEL)?;
        for block in blocks.iter() {
            let mut offset = block.offset();
            let end = offset + block.size();
            while offset < end && batch.offsets.len() < n {
                batch.offsets.push(offset, GFP_KERNEL)?;
                offset += abi::PAGE_SIZE;
            }
        }
        let alloc = KBox::new(
            VramAlloc {
                _blocks: blocks,
                pages: AtomicU64::new(batch.offsets.len() as u64),
                next: ptr::null_mut(),
            },
            GFP_KERNEL,
        )?;
        batch.alloc = KBox::into_raw(alloc);
        Ok(batch)
    }

    /// Called when the kernel frees a device folio (`page` is its head):
    /// once every page of its allocation is free, the VRAM is. May run in
    /// atomic context.
    pub(crate) fn page_freed(&self, page: PageRef) {
        let alloc = page.zone_device_data().cast::<VramAlloc>();
        if alloc.is_null() {
            return;
        }
        // SAFETY: one of our device pages, being freed.
        unsafe { page.set_zone_device_data(ptr::null_mut()) };
        let nr = page.folio_nr_pages() as u64;
        // SAFETY: `alloc` lives until its last page is freed (below).
        if unsafe { (*alloc).pages.fetch_sub(nr, Ordering::AcqRel) } != nr {
            return;
        }
        let mut list = self.deferred.lock();
        // SAFETY: `alloc` came from `KBox::into_raw` in `alloc_page` and is
        // owned by the list from now on.
        unsafe { (*alloc).next = list.head };
        list.head = alloc;
    }

    /// Returns the allocations of freed pages to the buddy allocator.
    pub(crate) fn reclaim_deferred(&self) {
        let mut retired = self.retired.lock();
        self.reclaim_locked(&mut retired);
    }

    /// [`Vram::reclaim_deferred`] under the `retired` lock.
    fn reclaim_locked(&self, retired: &mut Retired) {
        let mut head = {
            let mut list = self.deferred.lock();
            core::mem::replace(&mut list.head, ptr::null_mut())
        };
        if head.is_null() {
            return;
        }
        while !head.is_null() {
            // SAFETY: every list entry came from `KBox::into_raw`.
            let alloc = unsafe { KBox::from_raw(head) };
            head = alloc.next;
            drop(alloc);
        }
        self.hold_pending(retired);
    }
}
