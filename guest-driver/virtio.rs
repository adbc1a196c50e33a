// SPDX-License-Identifier: GPL-2.0

//! The virtio calls the driver makes, on typed handles (`kernel::bindings`
//! has no virtio; the declarations are in shim.rs).

use crate::abi;
use crate::shim::{
    self, c_const, VirtioDeviceRaw as RawVirtioDevice, VirtqueueRaw as RawVirtqueue,
};
use core::ptr::NonNull;
use kernel::bindings;
use kernel::ffi::{c_uint, c_void};
use kernel::prelude::*;

/// Registers the driver (virtio.c's `virtio_driver`) for `module`.
pub(crate) fn register_driver(module: &'static ThisModule) -> Result {
    // SAFETY: the static driver, registered once (module init).
    let ret = unsafe {
        shim::__register_virtio_driver(&raw mut shim::hmmgpu_virtio_driver, module.as_ptr())
    };
    if ret < 0 {
        return Err(Error::from_errno(ret));
    }
    Ok(())
}

/// Unregisters the driver: removes every device bound to it first.
///
/// # Safety
///
/// [`register_driver`] succeeded (module exit).
pub(crate) unsafe fn unregister_driver() {
    // SAFETY: registered, per this function's contract.
    unsafe { shim::unregister_virtio_driver(&raw mut shim::hmmgpu_virtio_driver) }
}

/// A virtio device bound to this driver.
///
/// # Invariants
///
/// Points to a `struct virtio_device` that is being probed or is bound to
/// this driver while the handle is used (the `Gpu` holding it goes before
/// the device does).
#[derive(Clone, Copy)]
pub(crate) struct VirtioDevice(NonNull<RawVirtioDevice>);

// SAFETY: the virtio core allows these calls from any thread of a bound
// device; the queue calls are serialized by their owners (see `Virtqueue`).
unsafe impl Send for VirtioDevice {}
// SAFETY: as above.
unsafe impl Sync for VirtioDevice {}

impl VirtioDevice {
    /// Wraps the device the virtio core hands to a driver callback.
    ///
    /// # Safety
    ///
    /// `vdev` is a virtio device being probed by, or bound to, this driver
    /// for as long as the handle is used.
    pub(crate) unsafe fn from_raw(vdev: *mut RawVirtioDevice) -> Option<Self> {
        // INVARIANT: per this function's contract.
        NonNull::new(vdev).map(Self)
    }

    fn raw(self) -> *mut RawVirtioDevice {
        self.0.as_ptr()
    }

    /// Its `struct device`.
    pub(crate) fn dev(self) -> *mut bindings::device {
        // SAFETY: a live device by the type invariant.
        unsafe { shim::hmmgpu_virtio_dev(self.raw()) }
    }

    /// The driver's data (the device's drvdata), NULL until set.
    pub(crate) fn drvdata(self) -> *mut c_void {
        // SAFETY: a live device by the type invariant.
        unsafe { bindings::dev_get_drvdata(self.dev()) }
    }

    /// Sets the driver's data, which the virtqueue callbacks get.
    pub(crate) fn set_drvdata(self, data: *mut c_void) {
        // SAFETY: a live device by the type invariant.
        unsafe { bindings::dev_set_drvdata(self.dev(), data) }
    }

    /// Whether the transport offers VIRTIO_F_ACCESS_PLATFORM (an IOMMU
    /// between the device and guest memory).
    pub(crate) fn has_access_platform(self) -> bool {
        // SAFETY: a live device by the type invariant.
        unsafe { shim::hmmgpu_virtio_has_access_platform(self.raw()) }
    }

    /// Reads the device-specific config space from offset 0 into `buf`.
    pub(crate) fn read_config(self, buf: &mut [u8]) {
        // SAFETY: a live device by the type invariant; `buf` is writable.
        unsafe {
            shim::hmmgpu_virtio_read_config(self.raw(), 0, buf.as_mut_ptr().cast(), buf.len())
        }
    }

    /// The (guest-physical address, length) of shared memory region `id`.
    pub(crate) fn shm_region(self, id: u8) -> Option<(u64, u64)> {
        let (mut addr, mut len) = (0, 0);
        // SAFETY: a live device by the type invariant; valid out-pointers.
        unsafe { shim::hmmgpu_virtio_shm_region(self.raw(), id, &mut addr, &mut len) }
            .then_some((addr, len))
    }

    /// Creates the command and event virtqueues.
    pub(crate) fn find_vqs(self) -> Result<(Virtqueue, Virtqueue)> {
        let mut vqs = [core::ptr::null_mut(); abi::NUM_QUEUES];
        // SAFETY: a live device by the type invariant; room for its queues.
        let ret = unsafe { shim::hmmgpu_virtio_find_vqs(self.raw(), vqs.as_mut_ptr()) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        let vq = |i: u16| {
            NonNull::new(vqs[usize::from(i)])
                .map(Virtqueue)
                .ok_or(ENODEV)
        };
        // INVARIANT: fresh virtqueues of this device.
        Ok((vq(abi::QUEUE_COMMAND)?, vq(abi::QUEUE_EVENT)?))
    }

    /// Sets DRIVER_OK: the device may use its queues.
    pub(crate) fn ready(self) {
        // SAFETY: a live device by the type invariant.
        unsafe { shim::hmmgpu_virtio_ready(self.raw()) }
    }

    /// Resets the device: it stops using its queues (QEMU stops the rings).
    pub(crate) fn reset(self) {
        // SAFETY: a live device by the type invariant.
        unsafe { shim::virtio_reset_device(self.raw()) }
    }

    /// Deletes the virtqueues.
    ///
    /// # Safety
    ///
    /// The device was reset, and no handle of its virtqueues is used again.
    pub(crate) unsafe fn del_vqs(self) {
        // SAFETY: a live device by the type invariant; per the contract.
        unsafe { shim::hmmgpu_virtio_del_vqs(self.raw()) }
    }

    /// Negotiates the features again after our own reset (the virtio core
    /// does it itself after a transport reset): ACKNOWLEDGE, DRIVER, the
    /// features, FEATURES_OK, which the device must keep.
    pub(crate) fn renegotiate(self) -> Result {
        let acknowledge = c_const!(hmmgpu_VIRTIO_S_ACKNOWLEDGE);
        let driver = c_const!(hmmgpu_VIRTIO_S_DRIVER);
        let features_ok = c_const!(hmmgpu_VIRTIO_S_FEATURES_OK);
        // SAFETY: a live device by the type invariant.
        unsafe {
            shim::virtio_add_status(self.raw(), c_uint::from(acknowledge));
            shim::virtio_add_status(self.raw(), c_uint::from(driver));
            let ret = shim::hmmgpu_virtio_finalize_features(self.raw());
            if ret < 0 {
                return Err(Error::from_errno(ret));
            }
            shim::virtio_add_status(self.raw(), c_uint::from(features_ok));
            if shim::hmmgpu_virtio_status(self.raw()) & features_ok == 0 {
                return Err(ENODEV);
            }
        }
        Ok(())
    }
}

/// A virtqueue. Its operations take `&mut self`: virtio wants them
/// serialized, and the queue keeps the handle under its lock.
///
/// # Invariants
///
/// Points to a live virtqueue of a bound device (deleted only after the
/// handle is dropped, see [`VirtioDevice::del_vqs`]).
pub(crate) struct Virtqueue(NonNull<RawVirtqueue>);

// SAFETY: a virtqueue may be used from any thread, one at a time (`&mut`).
unsafe impl Send for Virtqueue {}

impl Virtqueue {
    fn raw(&mut self) -> *mut RawVirtqueue {
        self.0.as_ptr()
    }

    /// Queues a command: `out` (device-readable) then `inb`
    /// (device-writable), with `token` handed back by [`Virtqueue::get_buf`].
    /// Allocates nothing (GFP_ATOMIC inside virtio at most).
    ///
    /// # Safety
    ///
    /// Both buffers are in the direct map (kmalloc'd) and stay allocated,
    /// and untouched by the CPU, until the device is done with them
    /// ([`Virtqueue::get_buf`] or [`Virtqueue::detach_unused_buf`] handed
    /// `token` back).
    pub(crate) unsafe fn add_cmd(
        &mut self,
        out: &[u8],
        inb: &mut [u8],
        token: *mut c_void,
    ) -> Result {
        // SAFETY: plain structs, initialized by `sg_init_one` below.
        let mut sg: [bindings::scatterlist; 2] = unsafe { core::mem::zeroed() };
        let [sg_out, sg_in] = &mut sg;
        // SAFETY: valid scatterlists; the buffers are in the direct map.
        unsafe {
            bindings::sg_init_one(sg_out, out.as_ptr().cast(), out.len() as c_uint);
            bindings::sg_init_one(sg_in, inb.as_mut_ptr().cast(), inb.len() as c_uint);
        }
        let mut sgs = [core::ptr::from_mut(sg_out), core::ptr::from_mut(sg_in)];
        // SAFETY: a live virtqueue, serialized by `&mut`; per the contract.
        let ret = unsafe {
            shim::virtqueue_add_sgs(
                self.raw(),
                sgs.as_mut_ptr(),
                1,
                1,
                token,
                bindings::GFP_ATOMIC,
            )
        };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(())
    }

    /// Queues a device-writable buffer (an event buffer).
    ///
    /// # Safety
    ///
    /// As for [`Virtqueue::add_cmd`], for `buf` and the token `buf` itself.
    pub(crate) unsafe fn add_inbuf(&mut self, buf: *mut u8, len: usize) -> Result {
        // SAFETY: a plain struct, initialized by `sg_init_one` below.
        let mut sg: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: a valid scatterlist; per the contract.
        unsafe { bindings::sg_init_one(&mut sg, buf.cast(), len as c_uint) };
        // SAFETY: a live virtqueue, serialized by `&mut`; per the contract.
        let ret = unsafe {
            shim::virtqueue_add_inbuf(self.raw(), &mut sg, 1, buf.cast(), bindings::GFP_ATOMIC)
        };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(())
    }

    /// Tells the device about new buffers if it wants to know; false if
    /// the notification failed (the device is broken).
    pub(crate) fn kick(&mut self) -> bool {
        // SAFETY: a live virtqueue, serialized by `&mut`.
        unsafe { !shim::virtqueue_kick_prepare(self.raw()) || shim::virtqueue_notify(self.raw()) }
    }

    /// The token and used length of the next buffer the device is done
    /// with.
    pub(crate) fn get_buf(&mut self) -> Option<(*mut c_void, u32)> {
        let mut len = 0;
        // SAFETY: a live virtqueue, serialized by `&mut`.
        let token = unsafe { shim::virtqueue_get_buf(self.raw(), &mut len) };
        (!token.is_null()).then_some((token, len))
    }

    /// The token of a buffer the device never used, after a reset.
    pub(crate) fn detach_unused_buf(&mut self) -> Option<*mut c_void> {
        // SAFETY: a live virtqueue, serialized by `&mut`.
        let token = unsafe { shim::virtqueue_detach_unused_buf(self.raw()) };
        (!token.is_null()).then_some(token)
    }

    /// Turns interrupts for this queue off.
    pub(crate) fn disable_cb(&mut self) {
        // SAFETY: a live virtqueue, serialized by `&mut`.
        unsafe { shim::virtqueue_disable_cb(self.raw()) }
    }

    /// Turns interrupts back on; false if buffers were used meanwhile (the
    /// caller harvests again).
    pub(crate) fn enable_cb(&mut self) -> bool {
        // SAFETY: a live virtqueue, serialized by `&mut`.
        unsafe { shim::virtqueue_enable_cb(self.raw()) }
    }
}
