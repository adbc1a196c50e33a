// SPDX-License-Identifier: GPL-2.0

//! Declarations of the C shim (shim.c, hmmgpu.h). Kernel structs come from
//! `kernel::bindings`; only the shim's own structs are opaque here (virtio
//! is in virtio.rs). The Rust functions C calls are in ffi.rs.

use kernel::ffi::{c_int, c_uint, c_ulong, c_void};
use kernel::bindings;

macro_rules! opaque {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        $( $(#[$m])* #[repr(C)] pub(crate) struct $name { _private: [u8; 0] } )*
    };
}

opaque!(
    /// The shim's `struct hmmgpu_migrate` (a migrate_vma with its arrays).
    Migrate,
    /// The shim's `struct hmmgpu_notifier` (an mmu_interval_notifier).
    Notifier,
);

pub(crate) type Device = bindings::device;
pub(crate) type Page = bindings::page;
pub(crate) type Vma = bindings::vm_area_struct;
pub(crate) type VmFault = bindings::vm_fault;
pub(crate) type Mm = bindings::mm_struct;
pub(crate) type Dentry = bindings::dentry;

/// `HMMGPU_MEM_SYSTEM` of shim.h: migrate_vma selects system pages.
pub(crate) const SELECT_SYSTEM: c_int = 0;


// hmmgpu_shim_hmm_pfn_info() result bits: must match HMMGPU_PFN_* in shim.h.
pub(crate) const PFN_VALID: u32 = 1 << 0;
pub(crate) const PFN_WRITE: u32 = 1 << 1;
pub(crate) const PFN_ERROR: u32 = 1 << 2;
pub(crate) const PFN_DEVICE_PRIVATE: u32 = 1 << 3;
pub(crate) const PFN_DEVICE_COHERENT: u32 = 1 << 4;
pub(crate) const PFN_OWNED: u32 = 1 << 5;
pub(crate) const PFN_ZERO: u32 = 1 << 6;
pub(crate) const PFN_ORDER_SHIFT: u32 = 8;

// bindgen's structs end in zero-sized array markers that rustc does not call
// FFI-safe; pointers to them are (kernel::bindings allows the lint too).
#[allow(improper_ctypes)]
extern "C" {
    pub(crate) static hmmgpu_MIGRATE_PFN_VALID: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_PFN_MIGRATE: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_PFN_WRITE: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_PFN_COMPOUND: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_MAX_PAGES: c_ulong;

    pub(crate) fn hmmgpu_shim_pmd_is_2m() -> bool;
    pub(crate) fn hmmgpu_shim_copy_page(dst: *mut Page, src: *mut Page);
    pub(crate) fn hmmgpu_shim_poison_pfn(pfn: c_ulong) -> c_int;
    pub(crate) fn hmmgpu_shim_poison_pfn_later(pfn: c_ulong);
    pub(crate) fn hmmgpu_shim_page_address(page: *mut Page) -> *mut c_void;
    pub(crate) fn hmmgpu_shim_fill_pages(page: *mut Page, order: c_uint, c: c_int);
    pub(crate) fn hmmgpu_shim_noreclaim_save() -> c_uint;
    pub(crate) fn hmmgpu_shim_noreclaim_restore(flags: c_uint);

    pub(crate) fn hmmgpu_shim_memremap(
        dev: *mut Device,
        kind: c_int,
        phys: u64,
        size: u64,
        gpu: *mut c_void,
        owner: *mut c_void,
    ) -> c_ulong;
    pub(crate) fn hmmgpu_shim_pfn_to_page(pfn: c_ulong) -> *mut Page;
    pub(crate) fn hmmgpu_shim_page_to_pfn(page: *mut Page) -> c_ulong;
    pub(crate) fn hmmgpu_shim_virt_to_phys(addr: *mut c_void) -> u64;
    pub(crate) fn hmmgpu_shim_page_get_data(page: *mut Page) -> *mut c_void;
    pub(crate) fn hmmgpu_shim_page_set_data(page: *mut Page, data: *mut c_void);
    pub(crate) fn hmmgpu_shim_device_page_init(page: *mut Page, order: c_uint);
    pub(crate) fn hmmgpu_shim_folio_nr_pages(page: *mut Page) -> c_ulong;
    pub(crate) fn hmmgpu_shim_folio_head(page: *mut Page) -> *mut Page;
    pub(crate) fn hmmgpu_shim_folio_ref_count(page: *mut Page) -> c_int;
    pub(crate) fn hmmgpu_shim_alloc_sys_page(vma: *mut Vma, addr: c_ulong, order: c_uint) -> *mut Page;
    pub(crate) fn hmmgpu_shim_free_sys_page(page: *mut Page);
    pub(crate) fn hmmgpu_shim_migrate_pfn(pfn: c_ulong) -> c_ulong;
    pub(crate) fn hmmgpu_shim_migrate_pfn_to_page(mpfn: c_ulong) -> *mut Page;
    pub(crate) fn hmmgpu_shim_is_zone_device_page(page: *mut Page) -> bool;
    pub(crate) fn hmmgpu_shim_vmf_info(
        vmf: *mut VmFault,
        vma: *mut *mut Vma,
        addr: *mut c_ulong,
        page: *mut *mut Page,
        order: *mut c_uint,
    );

    pub(crate) fn hmmgpu_shim_migrate_alloc() -> *mut Migrate;
    pub(crate) fn hmmgpu_shim_migrate_free(m: *mut Migrate);
    pub(crate) fn hmmgpu_shim_migrate_src(m: *mut Migrate) -> *mut c_ulong;
    pub(crate) fn hmmgpu_shim_migrate_dst(m: *mut Migrate) -> *mut c_ulong;
    pub(crate) fn hmmgpu_shim_migrate_setup(
        m: *mut Migrate,
        vma: *mut Vma,
        start: c_ulong,
        end: c_ulong,
        owner: *mut c_void,
        select: c_int,
        compound: bool,
        fault_page: *mut Page,
    ) -> c_int;
    pub(crate) fn hmmgpu_shim_migrate_pages(m: *mut Migrate);
    pub(crate) fn hmmgpu_shim_migrate_finalize(m: *mut Migrate);
    pub(crate) fn hmmgpu_shim_evict_range(
        src: *mut c_ulong,
        start_pfn: c_ulong,
        npages: c_ulong,
    ) -> c_int;
    pub(crate) fn hmmgpu_shim_evict_finish(src: *mut c_ulong, dst: *mut c_ulong, npages: c_ulong);


    pub(crate) fn hmmgpu_shim_notifier_create(mirror: *mut c_void, owner: *mut c_void)
        -> *mut Notifier;
    pub(crate) fn hmmgpu_shim_notifier_destroy(n: *mut Notifier);
    pub(crate) fn hmmgpu_shim_notifier_get_mm(n: *mut Notifier) -> *mut Mm;
    pub(crate) fn hmmgpu_shim_notifier_set_seq(n: *mut Notifier, seq: c_ulong);
    pub(crate) fn hmmgpu_shim_notifier_retry(n: *mut Notifier, seq: c_ulong) -> bool;
    pub(crate) fn hmmgpu_shim_range_fault(
        n: *mut Notifier,
        start: c_ulong,
        end: c_ulong,
        pfns: *mut c_ulong,
        fault: bool,
        write: bool,
        unlocked: bool,
        seq: *mut c_ulong,
    ) -> c_int;
    pub(crate) fn hmmgpu_shim_make_exclusive(
        n: *mut Notifier,
        addr: c_ulong,
        pfn: *mut c_ulong,
        seq: *mut c_ulong,
    ) -> c_int;
    pub(crate) fn hmmgpu_shim_debugfs_create(index: c_uint, gpu: *mut c_void) -> *mut Dentry;
    pub(crate) fn hmmgpu_shim_debugfs_remove(dir: *mut Dentry);
    pub(crate) fn hmmgpu_shim_hmm_pfn_info(entry: c_ulong, owner: *mut c_void, pfn: *mut c_ulong)
        -> c_uint;
}

/// `IS_ERR()` for pointers returned by the shim.
pub(crate) fn is_err<T>(ptr: *mut T) -> bool {
    (ptr as usize) >= (-4095isize) as usize
}

/// `PTR_ERR()` for pointers returned by the shim.
pub(crate) fn ptr_err<T>(ptr: *mut T) -> kernel::error::Error {
    kernel::error::Error::from_errno(ptr as isize as i32)
}
