// SPDX-License-Identifier: GPL-2.0

//! Every function C calls into Rust: the virtio driver's callbacks, the
//! virtqueue interrupts, the ZONE_DEVICE pagemap's operations and the
//! mirrors' MMU notifier. Each is an `unsafe extern "C" fn` whose `# Safety`
//! section says what the C caller guarantees.
//!
//! The GPU is handed to C as one [`ForeignOwnable`] reference: probe turns
//! an `Arc<Gpu>` into a foreign pointer owned by a devm action, which gives
//! it back ([`hmmgpu_rust_gpu_release`]) after the device's pagemaps are
//! unmapped, so every callback below that gets that pointer may borrow the
//! `Gpu` from it.

use crate::gpu::Gpu;
use crate::mirror::Mirror;
use crate::pages::PageRef;
use crate::shim::VirtioDeviceRaw as RawVirtioDevice;
use crate::virtio::VirtioDevice;
use kernel::bindings;
use kernel::ffi::{c_int, c_uint, c_ulong, c_void};
use kernel::prelude::*;
use kernel::sync::Arc;
use kernel::types::ForeignOwnable;

/// Borrows the GPU C holds.
///
/// # Safety
///
/// `gpu` is the foreign pointer of a bound GPU (see the module doc): its
/// devm action has not run yet and does not run while the borrow lives.
unsafe fn borrow_gpu<'a>(gpu: *mut c_void) -> <Arc<Gpu> as ForeignOwnable>::Borrowed<'a> {
    // SAFETY: per this function's contract.
    unsafe { <Arc<Gpu> as ForeignOwnable>::borrow(gpu) }
}

/// The GPU of a bound device, from its drvdata.
///
/// # Safety
///
/// `vdev` is a device [`hmmgpu_rust_probe`] bound, still bound while the
/// borrow lives.
unsafe fn gpu_of<'a>(vdev: *mut RawVirtioDevice) -> <Arc<Gpu> as ForeignOwnable>::Borrowed<'a> {
    // SAFETY: per this function's contract.
    let vdev = unsafe { VirtioDevice::from_raw(vdev) };
    let foreign = vdev.map_or(core::ptr::null_mut(), VirtioDevice::drvdata);
    // SAFETY: probe set the drvdata to the GPU's foreign pointer (its devm
    // action runs after remove).
    unsafe { borrow_gpu(foreign) }
}

/// `virtio_driver.probe`: binds a device.
///
/// # Safety
///
/// `vdev` is a virtio device being probed by the virtio core.
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_probe(vdev: *mut RawVirtioDevice) -> c_int {
    // SAFETY: `vdev` is being probed; the `Gpu` holding the handle goes
    // before it is unbound.
    let Some(vdev) = (unsafe { VirtioDevice::from_raw(vdev) }) else {
        return EINVAL.to_errno();
    };
    let dev = vdev.dev();
    let gpu = match Gpu::probe(vdev) {
        Ok(gpu) => gpu,
        Err(e) => return e.to_errno(),
    };
    // The GPU's C side (drvdata, pagemaps) borrows it from the one
    // foreign reference the devm action owns.
    let foreign = gpu.clone().into_foreign();
    // SAFETY: `dev` is being probed; the action gives the reference back on
    // unbind (or at once, if registering fails).
    let ret =
        unsafe { bindings::devm_add_action_or_reset(dev, Some(hmmgpu_rust_gpu_release), foreign) };
    if ret < 0 {
        gpu.abandon();
        return ret;
    }
    // The virtqueue callbacks and remove get it as the drvdata; it stays
    // valid until after remove (the devm action runs after it).
    vdev.set_drvdata(foreign);
    match gpu.start(foreign) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// The devm action of [`hmmgpu_rust_probe`]: gives the GPU's foreign
/// reference back, after remove and after the pagemaps are unmapped.
///
/// # Safety
///
/// `gpu` is the pointer probe registered; the devm core calls this once.
pub(crate) unsafe extern "C" fn hmmgpu_rust_gpu_release(gpu: *mut c_void) {
    // SAFETY: the reference probe made with `into_foreign`, given back once.
    drop(unsafe { <Arc<Gpu> as ForeignOwnable>::from_foreign(gpu) });
}

/// `virtio_driver.remove`.
///
/// # Safety
///
/// `vdev` is a device [`hmmgpu_rust_probe`] bound, being removed.
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_remove(vdev: *mut RawVirtioDevice) {
    // SAFETY: bound until remove returns.
    unsafe { gpu_of(vdev) }.remove();
}

/// `virtio_driver.reset_prepare`: a PCI function or bus reset is coming.
///
/// # Safety
///
/// `vdev` is a device [`hmmgpu_rust_probe`] bound; the PCI core holds the
/// device lock, so it stays bound.
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_reset_prepare(vdev: *mut RawVirtioDevice) -> c_int {
    // SAFETY: bound throughout, per this function's contract.
    unsafe { gpu_of(vdev) }.reset_prepare();
    0
}

/// `virtio_driver.reset_done`: the transport reset is over.
///
/// # Safety
///
/// As for [`hmmgpu_rust_reset_prepare`].
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_reset_done(vdev: *mut RawVirtioDevice) -> c_int {
    // SAFETY: bound throughout, per this function's contract.
    match unsafe { gpu_of(vdev) }.reset_done() {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// The virtqueues' callback (interrupt context): `index` is the queue's
/// (command or event).
///
/// # Safety
///
/// `gpu` is the device's drvdata, the GPU's foreign pointer: probe sets it
/// before it creates the virtqueues, which removal deletes before the devm
/// action runs.
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_vq_interrupt(gpu: *mut c_void, index: c_uint) {
    // SAFETY: per this function's contract.
    let gpu = unsafe { borrow_gpu(gpu) };
    match u16::try_from(index) {
        Ok(crate::abi::QUEUE_COMMAND) => gpu.cmd_interrupt(),
        Ok(crate::abi::QUEUE_EVENT) => Gpu::event_interrupt(gpu),
        _ => {}
    }
}

/// `dev_pagemap_ops.folio_free` of our device pages.
///
/// # Safety
///
/// `gpu` is the foreign pointer of the GPU whose pagemap, of owner `owner`,
/// holds `page`, the head of a folio being freed.
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_folio_free(
    gpu: *mut c_void,
    owner: *mut c_void,
    page: *mut bindings::page,
) {
    // SAFETY: per this function's contract (the pages go before the GPU).
    let gpu = unsafe { borrow_gpu(gpu) };
    // SAFETY: per this function's contract.
    let Some(page) = (unsafe { PageRef::from_raw(page) }) else {
        return;
    };
    if let Some(vram) = gpu.vram_of_owner(owner) {
        vram.page_freed(page);
    }
}

/// `dev_pagemap_ops.migrate_to_ram`: a CPU touched a page in VRAM.
///
/// # Safety
///
/// As for [`hmmgpu_rust_folio_free`]; `vmf` is the fault being handled, on
/// one of the pagemap's pages.
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_migrate_to_ram(
    gpu: *mut c_void,
    owner: *mut c_void,
    vmf: *mut bindings::vm_fault,
) -> bindings::vm_fault_t {
    // SAFETY: per this function's contract.
    let gpu = unsafe { borrow_gpu(gpu) };
    match gpu.vram_of_owner(owner) {
        // SAFETY: per this function's contract.
        Some(vram) => unsafe { crate::migrate::migrate_to_ram(&gpu, vram, vmf) },
        None => bindings::vm_fault_reason_VM_FAULT_SIGBUS as bindings::vm_fault_t,
    }
}

/// `dev_pagemap_ops.memory_failure` of device-coherent VRAM.
///
/// # Safety
///
/// As for [`hmmgpu_rust_folio_free`]; called in process context by
/// memory_failure() for pages of the pagemap.
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_memory_failure(
    gpu: *mut c_void,
    owner: *mut c_void,
    pfn: c_ulong,
    nr_pages: c_ulong,
) -> c_int {
    // SAFETY: per this function's contract.
    let gpu = unsafe { borrow_gpu(gpu) };
    if let Some(vram) = gpu.vram_of_owner(owner) {
        crate::migrate::memory_failure(&gpu, vram, pfn as u64, nr_pages as u64);
    }
    0
}

/// The invalidate callback of a mirror's mmu_interval_notifier: the CPU
/// page tables of [start, end) change; `migrate_owner` is the pgmap owner
/// of the migration that changes them, NULL for any other change.
///
/// # Safety
///
/// `notifier` is the notifier of a live `Mirror` (it removes the notifier,
/// waiting for running callbacks, before it is freed).
#[no_mangle]
pub(crate) unsafe extern "C" fn hmmgpu_rust_invalidate(
    notifier: *mut bindings::mmu_interval_notifier,
    start: c_ulong,
    end: c_ulong,
    blockable: bool,
    migrate_owner: *mut c_void,
    cur_seq: c_ulong,
) -> bool {
    // SAFETY: per this function's contract.
    let mirror = unsafe { Mirror::of_notifier(notifier) };
    // Our own migration to VRAM (see `Mirror::invalidate`).
    let own_migrate = !migrate_owner.is_null() && migrate_owner == mirror.vram().owner();
    mirror.invalidate(start as u64, end as u64, blockable, own_migrate, cur_seq)
}
