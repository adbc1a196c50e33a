// SPDX-License-Identifier: GPL-2.0

//! The virtio calls the driver makes, on typed handles. `kernel::bindings`
//! has no virtio: the exported functions are declared here (virtio.c checks
//! their prototypes), the static inlines and config ops go through
//! virtio.c.

use crate::abi;
use core::ptr::NonNull;
use kernel::bindings;
use kernel::ffi::{c_int, c_uint, c_void};
use kernel::prelude::*;

/// `struct virtio_device` (not in `kernel::bindings`).
#[repr(C)]
pub(crate) struct RawVirtioDevice {
    _private: [u8; 0],
}

/// `struct virtqueue` (not in `kernel::bindings`).
#[repr(C)]
pub(crate) struct RawVirtqueue {
    _private: [u8; 0],
}

// bindgen's structs end in zero-sized array markers that rustc does not call
// FFI-safe; pointers to them are (kernel::bindings allows the lint too).
#[allow(improper_ctypes)]
extern "C" {
    // virtio.c
    pub(crate) fn hmmgpu_register_driver() -> c_int;
    pub(crate) fn hmmgpu_unregister_driver();
    static hmmgpu_VIRTIO_F_ACCESS_PLATFORM: c_uint;
    static hmmgpu_VIRTIO_S_ACKNOWLEDGE: u8;
    static hmmgpu_VIRTIO_S_DRIVER: u8;
    static hmmgpu_VIRTIO_S_FEATURES_OK: u8;
    fn hmmgpu_virtio_find_vqs(vdev: *mut RawVirtioDevice, vqs: *mut *mut RawVirtqueue) -> c_int;
    fn hmmgpu_virtio_dev(vdev: *mut RawVirtioDevice) -> *mut bindings::device;
    fn hmmgpu_virtio_set_priv(vdev: *mut RawVirtioDevice, data: *mut c_void);
    fn hmmgpu_virtio_priv(vdev: *mut RawVirtioDevice) -> *mut c_void;
    fn hmmgpu_virtio_has_feature(vdev: *mut RawVirtioDevice, fbit: c_uint) -> bool;
    fn hmmgpu_virtio_read_config(vdev: *mut RawVirtioDevice, offset: c_uint, buf: *mut c_void, len: usize);
    fn hmmgpu_virtio_shm_region(vdev: *mut RawVirtioDevice, id: u8, addr: *mut u64, len: *mut u64) -> bool;
    fn hmmgpu_virtio_ready(vdev: *mut RawVirtioDevice);
    fn hmmgpu_virtio_finalize_features(vdev: *mut RawVirtioDevice) -> c_int;
    fn hmmgpu_virtio_status(vdev: *mut RawVirtioDevice) -> u8;
    fn hmmgpu_virtio_del_vqs(vdev: *mut RawVirtioDevice);

    // The kernel's exported virtio functions (include/linux/virtio.h).
    fn virtqueue_add_sgs(
        vq: *mut RawVirtqueue,
        sgs: *mut *mut bindings::scatterlist,
        out_sgs: c_uint,
        in_sgs: c_uint,
        data: *mut c_void,
        gfp: bindings::gfp_t,
    ) -> c_int;
    fn virtqueue_add_inbuf(
        vq: *mut RawVirtqueue,
        sg: *mut bindings::scatterlist,
        num: c_uint,
        data: *mut c_void,
        gfp: bindings::gfp_t,
    ) -> c_int;
    fn virtqueue_kick_prepare(vq: *mut RawVirtqueue) -> bool;
    fn virtqueue_notify(vq: *mut RawVirtqueue) -> bool;
    fn virtqueue_get_buf(vq: *mut RawVirtqueue, len: *mut c_uint) -> *mut c_void;
    fn virtqueue_disable_cb(vq: *mut RawVirtqueue);
    fn virtqueue_enable_cb(vq: *mut RawVirtqueue) -> bool;
    fn virtqueue_detach_unused_buf(vq: *mut RawVirtqueue) -> *mut c_void;
    fn virtio_reset_device(vdev: *mut RawVirtioDevice);
    fn virtio_add_status(vdev: *mut RawVirtioDevice, status: c_uint);
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
        unsafe { hmmgpu_virtio_dev(self.raw()) }
    }

    /// The driver's pointer (`vdev->priv`), NULL until set.
    pub(crate) fn priv_data(self) -> *mut c_void {
        // SAFETY: a live device by the type invariant.
        unsafe { hmmgpu_virtio_priv(self.raw()) }
    }

    /// Sets the driver's pointer, which the virtqueue callbacks get.
    pub(crate) fn set_priv_data(self, data: *mut c_void) {
        // SAFETY: a live device by the type invariant.
        unsafe { hmmgpu_virtio_set_priv(self.raw(), data) }
    }

    /// Whether the transport offers VIRTIO_F_ACCESS_PLATFORM (an IOMMU
    /// between the device and guest memory).
    pub(crate) fn has_access_platform(self) -> bool {
        // SAFETY: a live device by the type invariant; a constant.
        unsafe { hmmgpu_virtio_has_feature(self.raw(), hmmgpu_VIRTIO_F_ACCESS_PLATFORM) }
    }

    /// Reads the device-specific config space from offset 0 into `buf`.
    pub(crate) fn read_config(self, buf: &mut [u8]) {
        // SAFETY: a live device by the type invariant; `buf` is writable.
        unsafe { hmmgpu_virtio_read_config(self.raw(), 0, buf.as_mut_ptr().cast(), buf.len()) }
    }

    /// The (guest-physical address, length) of shared memory region `id`.
    pub(crate) fn shm_region(self, id: u8) -> Option<(u64, u64)> {
        let (mut addr, mut len) = (0, 0);
        // SAFETY: a live device by the type invariant; valid out-pointers.
        unsafe { hmmgpu_virtio_shm_region(self.raw(), id, &mut addr, &mut len) }.then_some((addr, len))
    }

    /// Creates the command and event virtqueues.
    pub(crate) fn find_vqs(self) -> Result<(Virtqueue, Virtqueue)> {
        let mut vqs = [core::ptr::null_mut(); abi::NUM_QUEUES];
        // SAFETY: a live device by the type invariant; room for its queues.
        let ret = unsafe { hmmgpu_virtio_find_vqs(self.raw(), vqs.as_mut_ptr()) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        let vq = |i: u16| NonNull::new(vqs[usize::from(i)]).map(Virtqueue).ok_or(ENODEV);
        // INVARIANT: fresh virtqueues of this device.
        Ok((vq(abi::QUEUE_COMMAND)?, vq(abi::QUEUE_EVENT)?))
    }

    /// Sets DRIVER_OK: the device may use its queues.
    pub(crate) fn ready(self) {
        // SAFETY: a live device by the type invariant.
        unsafe { hmmgpu_virtio_ready(self.raw()) }
    }

    /// Resets the device: it stops using its queues (QEMU stops the rings).
    pub(crate) fn reset(self) {
        // SAFETY: a live device by the type invariant.
        unsafe { virtio_reset_device(self.raw()) }
    }

    /// Deletes the virtqueues.
    ///
    /// # Safety
    ///
    /// The device was reset, and no handle of its virtqueues is used again.
    pub(crate) unsafe fn del_vqs(self) {
        // SAFETY: a live device by the type invariant; per the contract.
        unsafe { hmmgpu_virtio_del_vqs(self.raw()) }
    }

    /// Negotiates the features again after our own reset (the virtio core
    /// does it itself after a transport reset): ACKNOWLEDGE, DRIVER, the
    /// features, FEATURES_OK, which the device must keep.
    pub(crate) fn renegotiate(self) -> Result {
        // SAFETY: a live device by the type invariant; constants.
        unsafe {
            virtio_add_status(self.raw(), c_uint::from(hmmgpu_VIRTIO_S_ACKNOWLEDGE));
            virtio_add_status(self.raw(), c_uint::from(hmmgpu_VIRTIO_S_DRIVER));
            let ret = hmmgpu_virtio_finalize_features(self.raw());
            if ret < 0 {
                return Err(Error::from_errno(ret));
            }
            virtio_add_status(self.raw(), c_uint::from(hmmgpu_VIRTIO_S_FEATURES_OK));
            if hmmgpu_virtio_status(self.raw()) & hmmgpu_VIRTIO_S_FEATURES_OK == 0 {
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
    pub(crate) unsafe fn add_cmd(&mut self, out: &[u8], inb: &mut [u8], token: *mut c_void) -> Result {
        // SAFETY: plain structs, initialized by `sg_init_one` below.
        let mut sg: [bindings::scatterlist; 2] = unsafe { core::mem::zeroed() };
        let [sg_out, sg_in] = &mut sg;
        // SAFETY: valid scatterlists; the buffers are in the direct map.
        unsafe {
            bindings::sg_init_one(sg_out, out.as_ptr().cast(), out.len() as c_uint);
            bindings::sg_init_one(sg_in, inb.as_mut_ptr().cast(), inb.len() as c_uint);
        }
        let mut sgs = [sg_out as *mut _, sg_in as *mut _];
        // SAFETY: a live virtqueue, serialized by `&mut`; per the contract.
        let ret = unsafe { virtqueue_add_sgs(self.raw(), sgs.as_mut_ptr(), 1, 1, token, bindings::GFP_ATOMIC) };
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
        let ret = unsafe { virtqueue_add_inbuf(self.raw(), &mut sg, 1, buf.cast(), bindings::GFP_ATOMIC) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(())
    }

    /// Tells the device about new buffers if it wants to know; false if
    /// the notification failed (the device is broken).
    pub(crate) fn kick(&mut self) -> bool {
        // SAFETY: a live virtqueue, serialized by `&mut`.
        unsafe { !virtqueue_kick_prepare(self.raw()) || virtqueue_notify(self.raw()) }
    }

    /// The token and used length of the next buffer the device is done
    /// with.
    pub(crate) fn get_buf(&mut self) -> Option<(*mut c_void, u32)> {
        let mut len = 0;
        // SAFETY: a live virtqueue, serialized by `&mut`.
        let token = unsafe { virtqueue_get_buf(self.raw(), &mut len) };
        (!token.is_null()).then_some((token, len))
    }

    /// The token of a buffer the device never used, after a reset.
    pub(crate) fn detach_unused_buf(&mut self) -> Option<*mut c_void> {
        // SAFETY: a live virtqueue, serialized by `&mut`.
        let token = unsafe { virtqueue_detach_unused_buf(self.raw()) };
        (!token.is_null()).then_some(token)
    }

    /// Turns interrupts for this queue off.
    pub(crate) fn disable_cb(&mut self) {
        // SAFETY: a live virtqueue, serialized by `&mut`.
        unsafe { virtqueue_disable_cb(self.raw()) }
    }

    /// Turns interrupts back on; false if buffers were used meanwhile (the
    /// caller harvests again).
    pub(crate) fn enable_cb(&mut self) -> bool {
        // SAFETY: a live virtqueue, serialized by `&mut`.
        unsafe { virtqueue_enable_cb(self.raw()) }
    }
}
