// SPDX-License-Identifier: GPL-2.0

//! Typed handles for what the driver passes to and from the kernel's page
//! APIs: a [`PageRef`] for a `struct page`, a [`MigratePfn`] for an entry of
//! a migrate_vma / migrate_device src or dst array. They replace chains of
//! raw shim calls (`page_to_pfn(migrate_pfn_to_page(x))`) with methods.

use crate::shim;
use kernel::ffi::c_ulong;
use core::ptr::NonNull;
use kernel::bindings;
use kernel::prelude::*;

/// The size of a base page, as a `u64` like the device's addresses.
const PAGE_SIZE: u64 = bindings::PAGE_SIZE as u64;

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
        let page = unsafe { shim::hmmgpu_shim_pfn_to_page(pfn as c_ulong) };
        // SAFETY: the memory map's address of a pfn that has a page is not
        // NULL. INVARIANT: per this function's contract.
        Self(unsafe { NonNull::new_unchecked(page) })
    }

    /// The raw pointer, for the shim.
    pub(crate) fn as_ptr(self) -> *mut bindings::page {
        self.0.as_ptr()
    }

    /// The page frame number.
    pub(crate) fn pfn(self) -> u64 {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_shim_page_to_pfn(self.as_ptr()) as u64 }
    }

    /// The guest-physical address.
    pub(crate) fn phys(self) -> u64 {
        self.pfn() * PAGE_SIZE
    }

    /// Whether this is a ZONE_DEVICE page (of any driver).
    pub(crate) fn is_zone_device(self) -> bool {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_shim_is_zone_device_page(self.as_ptr()) }
    }

    /// The head page of the folio this page belongs to. For a free device
    /// page it may be stale (a folio freed since): check that the folio
    /// covers this page.
    pub(crate) fn folio_head(self) -> PageRef {
        // SAFETY: a valid page by the type invariant.
        let head = unsafe { shim::hmmgpu_shim_folio_head(self.as_ptr()) };
        // SAFETY: the head of a page is a page of the same memory map, not
        // NULL. INVARIANT: it is as valid as this one.
        Self(unsafe { NonNull::new_unchecked(head) })
    }

    /// The number of base pages of the folio this page heads.
    pub(crate) fn folio_nr_pages(self) -> usize {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_shim_folio_nr_pages(self.as_ptr()) as usize }
    }

    /// References to this page's folio: 0 while a device page is free.
    pub(crate) fn folio_ref_count(self) -> i32 {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_shim_folio_ref_count(self.as_ptr()) }
    }

    /// The driver's data of a device page (`zone_device_data`).
    pub(crate) fn zone_device_data(self) -> *mut kernel::ffi::c_void {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_shim_page_get_data(self.as_ptr()) }
    }

    /// Sets the driver's data of a device page of ours.
    ///
    /// # Safety
    ///
    /// The page is one of this driver's device pages, not used by anyone
    /// else for its data (free, or being freed).
    pub(crate) unsafe fn set_zone_device_data(self, data: *mut kernel::ffi::c_void) {
        // SAFETY: per this function's contract.
        unsafe { shim::hmmgpu_shim_page_set_data(self.as_ptr(), data) }
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
        unsafe { shim::hmmgpu_shim_device_page_init(self.as_ptr(), order) }
    }

    /// Unlocks this folio and drops our reference: a device folio prepared
    /// for a migration that did not happen, or a system page or THP
    /// allocated for one (or for the link canary).
    ///
    /// # Safety
    ///
    /// The caller holds the folio's lock and a reference it gives up.
    pub(crate) unsafe fn unlock_put(self) {
        // SAFETY: per this function's contract.
        unsafe { shim::hmmgpu_shim_free_sys_page(self.as_ptr()) }
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
    pub(crate) unsafe fn alloc_locked(vma: *mut bindings::vm_area_struct, addr: u64, order: u32) -> Option<Self> {
        // SAFETY: per this function's contract.
        let page = unsafe { shim::hmmgpu_shim_alloc_sys_page(vma, addr as c_ulong, order) };
        // INVARIANT: a page we just allocated stays valid until we release it.
        NonNull::new(page).map(Self)
    }

    /// Fills the `1 << order` pages from this one with `byte`.
    ///
    /// # Safety
    ///
    /// The pages are ours to write (allocated by us, not mapped anywhere).
    pub(crate) unsafe fn fill(self, order: u32, byte: u8) {
        // SAFETY: per this function's contract.
        unsafe { shim::hmmgpu_shim_fill_pages(self.as_ptr(), order, kernel::ffi::c_int::from(byte)) }
    }

    /// Copies `src` into this page with the CPU.
    ///
    /// # Safety
    ///
    /// Both are in the direct map (a device-coherent page is); this page is
    /// ours to write.
    pub(crate) unsafe fn copy_from(self, src: PageRef) {
        // SAFETY: per this function's contract.
        unsafe { shim::hmmgpu_shim_copy_page(self.as_ptr(), src.as_ptr()) }
    }

    /// The kernel address of a page in the direct map (device-coherent VRAM
    /// is).
    pub(crate) fn address(self) -> *mut u8 {
        // SAFETY: a valid page by the type invariant.
        unsafe { shim::hmmgpu_shim_page_address(self.as_ptr()).cast() }
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
    let ret = unsafe { shim::hmmgpu_shim_poison_pfn(pfn as c_ulong) };
    if ret < 0 {
        return Err(Error::from_errno(ret));
    }
    Ok(())
}

/// [`poison_pfn`] from inside memory_failure() (its mutex is held): queued.
pub(crate) fn poison_pfn_later(pfn: u64) {
    // SAFETY: memory_failure_queue() checks the pfn when it runs.
    unsafe { shim::hmmgpu_shim_poison_pfn_later(pfn as c_ulong) }
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
        // SAFETY: constant conversion of a valid pfn.
        let mut entry = unsafe { shim::hmmgpu_shim_migrate_pfn(page.pfn() as c_ulong) };
        if writable {
            entry |= flag_write();
        }
        if compound {
            entry |= flag_compound();
        }
        Self(entry)
    }

    /// Views the kernel's array `entries` of `n` entries.
    ///
    /// # Safety
    ///
    /// `entries` points to `n` entries, not accessed otherwise while the
    /// slice lives.
    pub(crate) unsafe fn slice_mut<'a>(entries: *mut c_ulong, n: usize) -> &'a mut [MigratePfn] {
        // SAFETY: `MigratePfn` is a transparent `c_ulong`; per the contract.
        unsafe { core::slice::from_raw_parts_mut(entries.cast(), n) }
    }

    /// Whether this is [`MigratePfn::NONE`].
    pub(crate) fn is_none(self) -> bool {
        self.0 == 0
    }

    /// MIGRATE_PFN_VALID: the entry holds a page.
    pub(crate) fn is_valid(self) -> bool {
        self.0 & flag_valid() != 0
    }

    /// MIGRATE_PFN_MIGRATE: the core selected the page for migration.
    pub(crate) fn is_migrating(self) -> bool {
        self.0 & flag_migrate() != 0
    }

    /// MIGRATE_PFN_WRITE: the page was mapped writable.
    pub(crate) fn is_writable(self) -> bool {
        self.0 & flag_write() != 0
    }

    /// MIGRATE_PFN_COMPOUND: one entry for a whole THP.
    pub(crate) fn is_compound(self) -> bool {
        self.0 & flag_compound() != 0
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
        // SAFETY: a migrate pfn names a page with a `struct page` or none.
        let page = unsafe { shim::hmmgpu_shim_migrate_pfn_to_page(self.0) };
        // SAFETY: the core holds the pages of a migration until it is
        // finalized; the caller uses the handle within it.
        unsafe { PageRef::from_raw(page) }
    }
}

fn flag_valid() -> c_ulong {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_PFN_VALID }
}

fn flag_migrate() -> c_ulong {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_PFN_MIGRATE }
}

fn flag_write() -> c_ulong {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_PFN_WRITE }
}

fn flag_compound() -> c_ulong {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_PFN_COMPOUND }
}
