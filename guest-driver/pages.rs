// SPDX-License-Identifier: GPL-2.0

//! Typed handles for what the driver passes to and from the kernel's page
//! APIs: a [`PageRef`] for a `struct page`, a [`MigratePfn`] for an entry of
//! a migrate_vma / migrate_device src or dst array, an [`HmmPfn`] for an
//! entry hmm_range_fault() filled. They replace chains of raw calls
//! (`page_to_pfn(migrate_pfn_to_page(x))`) with methods.

use crate::shim::{self, c_const};
use core::ptr::NonNull;
use kernel::bindings;
use kernel::ffi::{c_ulong, c_void};
use kernel::prelude::*;

/// The size of a base page.
const PAGE_SIZE: usize = bindings::PAGE_SIZE;

/// A `struct page`.
///
/// # Invariants
///
/// Points to a `struct page` that stays valid while the handle is used:
/// a page of system memory, or one of a GPU's device pages (which exist
/// until the GPU's pagemap is unmapped, after its removal).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRef(NonNull<bindings::page>);

// SAFETY: a `struct page` may be used from any thread; the handle is a
// pointer, what it allows is documented per method.
unsafe impl Send for PageRef {}

impl PageRef {
    /// Wraps a page pointer the kernel handed over; `None` for NULL.
    ///
    /// # Safety
    ///
    /// `page` is NULL or a `struct page` valid while the handle is used.
    pub(crate) unsafe fn from_raw(page: *mut bindings::page) -> Option<Self> {
        // INVARIANT: per this function's contract.
        NonNull::new(page).map(Self)
    }

    /// The page of page frame `pfn`.
    ///
    /// # Safety
    ///
    /// `pfn` has a `struct page` (system memory, or a device page of ours)
    /// valid while the handle is used.
    pub(crate) unsafe fn from_pfn(pfn: u64) -> Self {
        // SAFETY: `pfn_to_page` is arithmetic on the memory map.
        let page = unsafe { shim::hmmgpu_pfn_to_page(pfn as c_ulong) };
        // SAFETY: the memory map's address of a pfn that has a page is not
        // NULL. INVARIANT: per this function's contract.
        Self(unsafe { NonNull::new_unchecked(page) })
    }

    /// The raw pointer, for C.
    pub(crate) fn as_ptr(self) -> *mut bindings::page {
        self.0.as_ptr()
    }

    /// The page frame number.
    pub(crate) fn pfn(self) -> u64 {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_page_to_pfn(self.as_ptr()) as u64 }
    }

    /// The guest-physical address.
    pub(crate) fn phys(self) -> u64 {
        self.pfn() * PAGE_SIZE as u64
    }

    /// The memory type and pgmap owner of a ZONE_DEVICE page (of any
    /// driver); `None` for other pages.
    pub(crate) fn pgmap(self) -> Option<(bindings::memory_type, *mut c_void)> {
        // SAFETY: a valid page by the type invariant.
        let pgmap = unsafe { shim::hmmgpu_page_pgmap(self.as_ptr()) };
        // SAFETY: a device page's pagemap lives as long as the page.
        unsafe { pgmap.as_ref() }.map(|p| (p.type_, p.owner))
    }

    /// Whether this is a ZONE_DEVICE page (of any driver).
    pub(crate) fn is_zone_device(self) -> bool {
        self.pgmap().is_some()
    }

    /// The folio this page belongs to. For a free device page it may be
    /// stale (a folio freed since): check that the folio covers this page.
    fn folio(self) -> *mut bindings::folio {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_page_folio(self.as_ptr()) }
    }

    /// The head page of the folio this page belongs to (see
    /// [`PageRef::folio`] for free device pages).
    pub(crate) fn folio_head(self) -> PageRef {
        // INVARIANT: a folio starts with its head page, of the same memory
        // map as this valid page.
        Self(NonNull::new(self.folio().cast()).unwrap_or(self.0))
    }

    /// The number of base pages of this page's folio.
    pub(crate) fn folio_nr_pages(self) -> usize {
        // SAFETY: the folio of a valid page.
        unsafe { shim::hmmgpu_folio_nr_pages(self.folio()) }
    }

    /// References to this page's folio: 0 while a device page is free.
    pub(crate) fn folio_ref_count(self) -> i32 {
        // SAFETY: the folio of a valid page.
        unsafe { shim::hmmgpu_folio_ref_count(self.folio()) }
    }

    /// The driver's data of a device page (`zone_device_data`).
    pub(crate) fn zone_device_data(self) -> *mut c_void {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_zone_device_data(self.as_ptr()) }
    }

    /// Sets the driver's data of a device page of ours.
    ///
    /// # Safety
    ///
    /// The page is one of this driver's device pages, not used by anyone
    /// else for its data (free, or being freed).
    pub(crate) unsafe fn set_zone_device_data(self, data: *mut c_void) {
        // SAFETY: per this function's contract.
        unsafe { shim::hmmgpu_set_zone_device_data(self.as_ptr(), data) }
    }

    /// Prepares a free device page (`order` 0) or folio (`order` > 0, a
    /// THP) to be handed to migrate_vma_pages(): referenced and locked.
    ///
    /// # Safety
    ///
    /// The page (and the `1 << order` pages from it) is a free device page
    /// of ours whose VRAM was just allocated.
    pub(crate) unsafe fn init_device_folio(self, order: u32) {
        // SAFETY: per this function's contract.
        unsafe { shim::hmmgpu_zone_device_folio_init(self.as_ptr(), order) }
    }

    /// Unlocks this page's folio and drops our reference: a device folio
    /// prepared for a migration that did not happen, or a system page or
    /// THP allocated for one (or for the link canary).
    ///
    /// # Safety
    ///
    /// The caller holds the folio's lock and a reference it gives up.
    pub(crate) unsafe fn unlock_put(self) {
        let folio = self.folio();
        // SAFETY: per this function's contract.
        unsafe {
            bindings::folio_unlock(folio);
            shim::hmmgpu_folio_put(folio);
        }
    }

    /// A locked system page (`order` 0) or THP (`order` > 0) for data
    /// coming back from VRAM, placed for `vma` at `addr`, or anywhere
    /// (eviction) without a VMA. Order-0 allocations without a VMA do not
    /// fail. Released with [`PageRef::unlock_put`] unless a migration took
    /// it.
    ///
    /// # Safety
    ///
    /// `vma` is NULL or a VMA locked by the caller.
    pub(crate) unsafe fn alloc_locked(
        vma: *mut bindings::vm_area_struct,
        addr: u64,
        order: u32,
    ) -> Option<Self> {
        // SAFETY: per this function's contract.
        let folio = unsafe {
            if vma.is_null() {
                shim::hmmgpu_folio_alloc(order)
            } else {
                shim::hmmgpu_vma_alloc_folio(vma, addr as c_ulong, order)
            }
        };
        if folio.is_null() {
            return None;
        }
        // SAFETY: a folio we just allocated: ours to lock.
        unsafe { shim::hmmgpu_folio_lock(folio) };
        // INVARIANT: its head page, valid until we release it.
        NonNull::new(folio.cast()).map(Self)
    }

    /// Runs `f` on this page mapped into the kernel's address space.
    fn with_mapped<R>(self, f: impl FnOnce(*mut u8) -> R) -> R {
        // SAFETY: a valid page by the type invariant.
        let addr = unsafe { bindings::kmap_local_page(self.as_ptr()) };
        let result = f(addr.cast());
        // SAFETY: mapped above, on this task.
        unsafe { bindings::kunmap_local(addr) };
        result
    }

    /// Fills the `1 << order` pages from this one with `byte`.
    ///
    /// # Safety
    ///
    /// The pages are ours to write (allocated by us, not mapped anywhere).
    pub(crate) unsafe fn fill(self, order: u32, byte: u8) {
        for i in 0..1u64 << order {
            // SAFETY: the pages of an allocation of ours.
            let page = unsafe { PageRef::from_pfn(self.pfn() + i) };
            // SAFETY: a whole page, ours to write per the contract.
            page.with_mapped(|p| unsafe { core::ptr::write_bytes(p, byte, PAGE_SIZE) });
        }
    }

    /// Copies `src` into this page with the CPU.
    ///
    /// # Safety
    ///
    /// This page is ours to write; `src` is readable memory (a
    /// device-coherent page is).
    pub(crate) unsafe fn copy_from(self, src: PageRef) {
        src.with_mapped(|from| {
            self.with_mapped(|to| {
                // SAFETY: two whole, distinct pages; per the contract.
                unsafe { core::ptr::copy_nonoverlapping(from, to, PAGE_SIZE) }
            })
        })
    }

    /// Reads the first `u64` of the page, volatile (device memory).
    pub(crate) fn read_u64_volatile(self) -> u64 {
        // SAFETY: a mapped, aligned page.
        self.with_mapped(|p| unsafe { core::ptr::read_volatile(p.cast::<u64>()) })
    }

    /// Writes the first `u64` of the page, volatile (device memory).
    ///
    /// # Safety
    ///
    /// The page is ours to write.
    pub(crate) unsafe fn write_u64_volatile(self, value: u64) {
        // SAFETY: a mapped, aligned page, ours per the contract.
        self.with_mapped(|p| unsafe { core::ptr::write_volatile(p.cast::<u64>(), value) })
    }
}

/// Poisons the system page at `pfn` that took the place of VRAM whose data
/// was lost (with the device, or to an ECC error): memory_failure() unmaps
/// it from its owners with hwpoison entries (splitting a THP first, so only
/// that page goes), so a later touch gets SIGBUS (BUS_MCEERR_AR) instead of
/// reading made-up data. The page is retired. On a device-coherent pfn it
/// calls our pgmap's memory_failure op.
pub(crate) fn poison_pfn(pfn: u64) -> Result {
    // SAFETY: memory_failure() checks the pfn itself.
    let ret = unsafe { bindings::memory_failure(pfn as c_ulong, 0) };
    if ret < 0 {
        return Err(Error::from_errno(ret));
    }
    Ok(())
}

/// [`poison_pfn`] from inside memory_failure() (its mutex is held): queued.
pub(crate) fn poison_pfn_later(pfn: u64) {
    // SAFETY: memory_failure_queue() checks the pfn when it runs.
    unsafe { bindings::memory_failure_queue(pfn as c_ulong, 0) }
}

/// One entry of a migrate_vma / migrate_device src or dst array: a pfn
/// and the MIGRATE_PFN_* flags.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct MigratePfn(c_ulong);

impl MigratePfn {
    /// No page: in dst, "do not migrate this entry".
    pub(crate) const NONE: Self = Self(0);

    /// The dst entry for `page`, `writable` if the source was, `compound`
    /// for a THP (one entry for all its pages).
    pub(crate) fn new(page: PageRef, writable: bool, compound: bool) -> Self {
        // SAFETY: arithmetic on a valid pfn.
        let mut entry = unsafe { shim::hmmgpu_migrate_pfn(page.pfn() as c_ulong) };
        if writable {
            entry |= c_const!(hmmgpu_MIGRATE_PFN_WRITE);
        }
        if compound {
            entry |= c_const!(hmmgpu_MIGRATE_PFN_COMPOUND);
        }
        Self(entry)
    }

    /// Whether this is [`MigratePfn::NONE`].
    pub(crate) fn is_none(self) -> bool {
        self.0 == 0
    }

    /// MIGRATE_PFN_VALID: the entry holds a page.
    pub(crate) fn is_valid(self) -> bool {
        self.0 & c_const!(hmmgpu_MIGRATE_PFN_VALID) != 0
    }

    /// MIGRATE_PFN_MIGRATE: the core selected the page for migration.
    pub(crate) fn is_migrating(self) -> bool {
        self.0 & c_const!(hmmgpu_MIGRATE_PFN_MIGRATE) != 0
    }

    /// MIGRATE_PFN_WRITE: the page was mapped writable.
    pub(crate) fn is_writable(self) -> bool {
        self.0 & c_const!(hmmgpu_MIGRATE_PFN_WRITE) != 0
    }

    /// MIGRATE_PFN_COMPOUND: one entry for a whole THP.
    pub(crate) fn is_compound(self) -> bool {
        self.0 & c_const!(hmmgpu_MIGRATE_PFN_COMPOUND) != 0
    }

    /// The 4 KiB pages this entry moves: a THP is one entry, its head's.
    pub(crate) fn pages(self) -> usize {
        if self.is_compound() {
            1 << crate::vram::HUGE_ORDER
        } else {
            1
        }
    }

    /// The page of the entry; `None` if there is none (a src entry of an
    /// unpopulated address, or an empty dst).
    pub(crate) fn page(self) -> Option<PageRef> {
        // SAFETY: decodes the entry; a migrate pfn names a page or none.
        let page = unsafe { shim::hmmgpu_migrate_pfn_to_page(self.0) };
        // SAFETY: the core holds the pages of a migration until it is
        // finalized; the caller uses the handle within it.
        unsafe { PageRef::from_raw(page) }
    }
}

/// What kind of memory a mapped page is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageKind {
    /// A page of system memory.
    System,
    /// The shared zero page.
    Zero,
    /// A MEMORY_DEVICE_PRIVATE page.
    DevicePrivate,
    /// A MEMORY_DEVICE_COHERENT page.
    DeviceCoherent,
}

/// A page as an hmm_pfns entry describes it.
#[derive(Clone, Copy)]
pub(crate) struct Mapped {
    pub(crate) pfn: u64,
    pub(crate) writable: bool,
    pub(crate) kind: PageKind,
    /// A device page whose pgmap owner is the one asked about.
    pub(crate) owned: bool,
    /// The order of the CPU mapping (9: a PMD, 18: a PUD).
    pub(crate) order: u32,
}

/// One entry of the array hmm_range_fault() fills: a pfn and the
/// HMM_PFN_* flags.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub(crate) struct HmmPfn(c_ulong);

impl HmmPfn {
    /// Whether the range fault could not get at the page.
    pub(crate) fn is_error(self) -> bool {
        self.0 & c_const!(hmmgpu_HMM_PFN_ERROR) != 0
    }

    /// The page the entry maps, if valid, with device pages of pgmap owner
    /// `owner` marked owned.
    pub(crate) fn mapped(self, owner: *mut c_void) -> Option<Mapped> {
        if self.is_error() || self.0 & c_const!(hmmgpu_HMM_PFN_VALID) == 0 {
            return None;
        }
        // SAFETY: decodes a valid entry.
        let page = unsafe { PageRef::from_raw(shim::hmmgpu_hmm_pfn_to_page(self.0)) }?;
        let pfn = page.pfn();
        let pgmap = page.pgmap();
        let kind = match pgmap.map(|(kind, _)| kind) {
            Some(bindings::memory_type_MEMORY_DEVICE_PRIVATE) => PageKind::DevicePrivate,
            Some(bindings::memory_type_MEMORY_DEVICE_COHERENT) => PageKind::DeviceCoherent,
            // SAFETY: a comparison with the zero page's pfn.
            _ if unsafe { shim::hmmgpu_is_zero_pfn(pfn as c_ulong) } => PageKind::Zero,
            _ => PageKind::System,
        };
        Some(Mapped {
            pfn,
            writable: self.0 & c_const!(hmmgpu_HMM_PFN_WRITE) != 0,
            kind,
            owned: pgmap.is_some_and(|(_, o)| o == owner),
            // SAFETY: decodes a valid entry.
            order: unsafe { shim::hmmgpu_hmm_pfn_to_map_order(self.0) },
        })
    }
}
