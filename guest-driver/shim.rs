// SPDX-License-Identifier: GPL-2.0

//! Declarations of the driver's C functions (virtio.c, mm.c, pagemap.c,
//! migrate.c, hmm.c; hmmgpu.h declares them for C, keep the two in sync)
//! and of the exported kernel functions `kernel::bindings` lacks (the C
//! files check their prototypes). Kernel structs come from
//! `kernel::bindings`; only those it lacks are opaque here. The typed
//! wrappers around these are virtio.rs, pages.rs, migrate.rs and mirror.rs;
//! the Rust functions C calls are in ffi.rs.

use kernel::bindings::{
    completion, dev_pagemap, device, folio, gfp_t, memory_type, mm_struct, mmu_interval_notifier,
    mmu_interval_notifier_ops, module, page, scatterlist, vm_area_struct, vm_fault,
    workqueue_struct,
};
use kernel::ffi::{c_int, c_long, c_uint, c_ulong, c_void};

macro_rules! opaque {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        $( $(#[$m])* #[repr(C)] pub(crate) struct $name { _private: [u8; 0] } )*
    };
}

opaque!(
    /// `struct virtio_device`.
    VirtioDeviceRaw,
    /// `struct virtqueue`.
    VirtqueueRaw,
    /// `struct virtio_driver`.
    VirtioDriverRaw,
    /// `struct migrate_vma`.
    MigrateVmaRaw,
);

// bindgen's structs end in zero-sized array markers that rustc does not call
// FFI-safe; pointers to them are (kernel::bindings allows the lint too).
#[allow(improper_ctypes)]
extern "C" {
    // virtio.c
    pub(crate) static mut hmmgpu_virtio_driver: VirtioDriverRaw;
    pub(crate) static hmmgpu_VIRTIO_S_ACKNOWLEDGE: u8;
    pub(crate) static hmmgpu_VIRTIO_S_DRIVER: u8;
    pub(crate) static hmmgpu_VIRTIO_S_FEATURES_OK: u8;
    pub(crate) fn hmmgpu_virtio_find_vqs(
        vdev: *mut VirtioDeviceRaw,
        vqs: *mut *mut VirtqueueRaw,
    ) -> c_int;
    pub(crate) fn hmmgpu_virtio_dev(vdev: *mut VirtioDeviceRaw) -> *mut device;
    pub(crate) fn hmmgpu_virtio_has_access_platform(vdev: *mut VirtioDeviceRaw) -> bool;
    pub(crate) fn hmmgpu_virtio_read_config(
        vdev: *mut VirtioDeviceRaw,
        offset: c_uint,
        buf: *mut c_void,
        len: usize,
    );
    pub(crate) fn hmmgpu_virtio_shm_region(
        vdev: *mut VirtioDeviceRaw,
        id: u8,
        addr: *mut u64,
        len: *mut u64,
    ) -> bool;
    pub(crate) fn hmmgpu_virtio_ready(vdev: *mut VirtioDeviceRaw);
    pub(crate) fn hmmgpu_virtio_finalize_features(vdev: *mut VirtioDeviceRaw) -> c_int;
    pub(crate) fn hmmgpu_virtio_status(vdev: *mut VirtioDeviceRaw) -> u8;
    pub(crate) fn hmmgpu_virtio_del_vqs(vdev: *mut VirtioDeviceRaw);

    // The kernel's exported virtio functions (include/linux/virtio.h).
    pub(crate) fn __register_virtio_driver(drv: *mut VirtioDriverRaw, owner: *mut module) -> c_int;
    pub(crate) fn unregister_virtio_driver(drv: *mut VirtioDriverRaw);
    pub(crate) fn virtqueue_add_sgs(
        vq: *mut VirtqueueRaw,
        sgs: *mut *mut scatterlist,
        out_sgs: c_uint,
        in_sgs: c_uint,
        data: *mut c_void,
        gfp: gfp_t,
    ) -> c_int;
    pub(crate) fn virtqueue_add_inbuf(
        vq: *mut VirtqueueRaw,
        sg: *mut scatterlist,
        num: c_uint,
        data: *mut c_void,
        gfp: gfp_t,
    ) -> c_int;
    pub(crate) fn virtqueue_kick_prepare(vq: *mut VirtqueueRaw) -> bool;
    pub(crate) fn virtqueue_notify(vq: *mut VirtqueueRaw) -> bool;
    pub(crate) fn virtqueue_get_buf(vq: *mut VirtqueueRaw, len: *mut c_uint) -> *mut c_void;
    pub(crate) fn virtqueue_disable_cb(vq: *mut VirtqueueRaw);
    pub(crate) fn virtqueue_enable_cb(vq: *mut VirtqueueRaw) -> bool;
    pub(crate) fn virtqueue_detach_unused_buf(vq: *mut VirtqueueRaw) -> *mut c_void;
    pub(crate) fn virtio_reset_device(vdev: *mut VirtioDeviceRaw);
    pub(crate) fn virtio_add_status(vdev: *mut VirtioDeviceRaw, status: c_uint);

    // mm.c
    pub(crate) fn hmmgpu_pfn_to_page(pfn: c_ulong) -> *mut page;
    pub(crate) fn hmmgpu_page_to_pfn(page: *mut page) -> c_ulong;
    pub(crate) fn hmmgpu_page_folio(page: *mut page) -> *mut folio;
    pub(crate) fn hmmgpu_folio_nr_pages(folio: *mut folio) -> c_ulong;
    pub(crate) fn hmmgpu_folio_ref_count(folio: *mut folio) -> c_int;
    pub(crate) fn hmmgpu_folio_lock(folio: *mut folio);
    pub(crate) fn hmmgpu_folio_put(folio: *mut folio);
    pub(crate) fn hmmgpu_page_pgmap(page: *mut page) -> *mut dev_pagemap;
    pub(crate) fn hmmgpu_zone_device_data(page: *mut page) -> *mut c_void;
    pub(crate) fn hmmgpu_set_zone_device_data(page: *mut page, data: *mut c_void);
    pub(crate) fn hmmgpu_zone_device_folio_init(page: *mut page, order: c_uint);
    pub(crate) fn hmmgpu_vma_alloc_folio(
        vma: *mut vm_area_struct,
        addr: c_ulong,
        order: c_uint,
    ) -> *mut folio;
    pub(crate) fn hmmgpu_folio_alloc(order: c_uint) -> *mut folio;
    pub(crate) fn hmmgpu_memalloc_noreclaim_save() -> c_uint;
    pub(crate) fn hmmgpu_memalloc_noreclaim_restore(flags: c_uint);
    pub(crate) fn hmmgpu_alloc_reset_wq(index: c_uint) -> *mut workqueue_struct;
    pub(crate) fn hmmgpu_reinit_completion(x: *mut completion);

    // pagemap.c
    pub(crate) fn hmmgpu_memremap_pages(
        dev: *mut device,
        type_: memory_type,
        start: u64,
        end: u64,
        gpu: *mut c_void,
        owner: *mut c_void,
    ) -> c_long;

    // migrate.c
    pub(crate) static hmmgpu_MIGRATE_MAX_PAGES: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_PFN_VALID: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_PFN_MIGRATE: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_PFN_WRITE: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_PFN_COMPOUND: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_VMA_SELECT_SYSTEM: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_VMA_SELECT_DEVICE_PRIVATE: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_VMA_SELECT_DEVICE_COHERENT: c_ulong;
    pub(crate) static hmmgpu_MIGRATE_VMA_SELECT_COMPOUND: c_ulong;
    pub(crate) fn hmmgpu_pmd_is_2m() -> bool;
    pub(crate) fn hmmgpu_migrate_vma_alloc() -> *mut MigrateVmaRaw;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn hmmgpu_migrate_vma_setup(
        args: *mut MigrateVmaRaw,
        vma: *mut vm_area_struct,
        start: c_ulong,
        end: c_ulong,
        src: *mut c_ulong,
        dst: *mut c_ulong,
        owner: *mut c_void,
        flags: c_ulong,
        fault_page: *mut page,
    ) -> c_int;
    pub(crate) fn hmmgpu_migrate_pfn(pfn: c_ulong) -> c_ulong;
    pub(crate) fn hmmgpu_migrate_pfn_to_page(mpfn: c_ulong) -> *mut page;
    pub(crate) fn hmmgpu_vm_fault_vma(
        vmf: *mut vm_fault,
        addr: *mut c_ulong,
    ) -> *mut vm_area_struct;

    // The kernel's exported migrate functions (include/linux/migrate.h).
    pub(crate) fn migrate_vma_pages(args: *mut MigrateVmaRaw);
    pub(crate) fn migrate_vma_finalize(args: *mut MigrateVmaRaw);
    pub(crate) fn migrate_device_range(src: *mut c_ulong, start: c_ulong, npages: c_ulong)
        -> c_int;
    pub(crate) fn migrate_device_pages(src: *mut c_ulong, dst: *mut c_ulong, npages: c_ulong);
    pub(crate) fn migrate_device_finalize(src: *mut c_ulong, dst: *mut c_ulong, npages: c_ulong);

    // hmm.c
    pub(crate) static hmmgpu_HMM_PFN_VALID: c_ulong;
    pub(crate) static hmmgpu_HMM_PFN_WRITE: c_ulong;
    pub(crate) static hmmgpu_HMM_PFN_ERROR: c_ulong;
    pub(crate) static hmmgpu_HMM_PFN_REQ_FAULT: c_ulong;
    pub(crate) static hmmgpu_HMM_PFN_REQ_WRITE: c_ulong;
    pub(crate) static hmmgpu_HMM_RANGE_DEFAULT_TIMEOUT: c_uint;
    pub(crate) static hmmgpu_notifier_ops: mmu_interval_notifier_ops;
    pub(crate) fn hmmgpu_mmu_interval_set_seq(mni: *mut mmu_interval_notifier, seq: c_ulong);
    pub(crate) fn hmmgpu_mmu_interval_read_retry(
        mni: *mut mmu_interval_notifier,
        seq: c_ulong,
    ) -> bool;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn hmmgpu_hmm_range_fault(
        mni: *mut mmu_interval_notifier,
        start: c_ulong,
        end: c_ulong,
        pfns: *mut c_ulong,
        default_flags: c_ulong,
        owner: *mut c_void,
        seq: *mut c_ulong,
        unlocked: bool,
    ) -> c_int;
    pub(crate) fn hmmgpu_hmm_pfn_to_page(entry: c_ulong) -> *mut page;
    pub(crate) fn hmmgpu_hmm_pfn_to_map_order(entry: c_ulong) -> c_uint;
    pub(crate) fn hmmgpu_is_zero_pfn(pfn: c_ulong) -> bool;

    // The kernel's exported rmap function (include/linux/rmap.h).
    pub(crate) fn make_device_exclusive(
        mm: *mut mm_struct,
        addr: c_ulong,
        owner: *mut c_void,
        foliop: *mut *mut folio,
    ) -> *mut page;
}

/// Reads a constant the C side exports.
macro_rules! c_const {
    ($name:ident) => {
        // SAFETY: an immutable constant C defines.
        unsafe { $crate::shim::$name }
    };
}
pub(crate) use c_const;
