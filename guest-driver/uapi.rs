// SPDX-License-Identifier: GPL-2.0

//! The dmirror uAPI of lib/test_hmm_uapi.h on /dev/hmm_dmirrorN: same ioctl
//! numbers, struct and semantics as the kernel's test_hmm, so the kernel's
//! hmm-tests run unmodified against real device memory.

use crate::gpu::{Gpu, MAX_GPUS};
use crate::mirror::{Counts, FaultPolicy, Mirror};
use crate::pages::{HmmPfn, PageKind};
use crate::vram::MemKind;
use kernel::alloc::flags::__GFP_ZERO;
use kernel::container_of;
use kernel::fs::File;
use kernel::ioctl::_IOWR;
use kernel::miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration};
use kernel::mm::virt::VmaNew;
use kernel::page::Page;
use kernel::prelude::*;
use kernel::sync::Arc;
use kernel::transmute::{AsBytes, FromBytes};
use kernel::uaccess::{UserPtr, UserSlice};

/// `struct hmm_dmirror_cmd`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct DmirrorCmd {
    addr: u64,
    ptr: u64,
    npages: u64,
    cpages: u64,
    faults: u64,
}

// SAFETY: plain integers, any bit pattern is valid, no padding.
unsafe impl FromBytes for DmirrorCmd {}
// SAFETY: as above.
unsafe impl AsBytes for DmirrorCmd {}

const fn dmirror_ioc(nr: u32) -> u32 {
    _IOWR::<DmirrorCmd>(b'H' as u32, nr)
}

const HMM_DMIRROR_READ: u32 = dmirror_ioc(0x00);
const HMM_DMIRROR_WRITE: u32 = dmirror_ioc(0x01);
const HMM_DMIRROR_MIGRATE_TO_DEV: u32 = dmirror_ioc(0x02);
const HMM_DMIRROR_MIGRATE_TO_SYS: u32 = dmirror_ioc(0x03);
const HMM_DMIRROR_SNAPSHOT: u32 = dmirror_ioc(0x04);
const HMM_DMIRROR_EXCLUSIVE: u32 = dmirror_ioc(0x05);
const HMM_DMIRROR_CHECK_EXCLUSIVE: u32 = dmirror_ioc(0x06);
const HMM_DMIRROR_RELEASE: u32 = dmirror_ioc(0x07);
const HMM_DMIRROR_FLAGS: u32 = dmirror_ioc(0x08);
const HMM_DMIRROR_READ_UNLOCKED: u32 = dmirror_ioc(0x09);

/// Fail the next VRAM allocation of a migration.
pub(crate) const HMM_DMIRROR_FLAG_FAIL_ALLOC: u64 = 1 << 0;

// HMM_DMIRROR_PROT_* values of SNAPSHOT.
const PROT_ERROR: u8 = 0xff;
const PROT_NONE: u8 = 0x00;
const PROT_READ: u8 = 0x01;
const PROT_WRITE: u8 = 0x02;
const PROT_PMD: u8 = 0x04;
const PROT_PUD: u8 = 0x08;
const PROT_ZERO: u8 = 0x10;
const PROT_DEV_PRIVATE_LOCAL: u8 = 0x20;
const PROT_DEV_PRIVATE_REMOTE: u8 = 0x30;
const PROT_DEV_COHERENT_LOCAL: u8 = 0x40;
const PROT_DEV_COHERENT_REMOTE: u8 = 0x50;

const PMD_ORDER: u32 = 9;
const PUD_ORDER: u32 = 18;

/// The SNAPSHOT byte for an hmm_pfns entry, device pages of pgmap owner
/// `owner` being local.
pub(crate) fn snapshot_prot(entry: HmmPfn, owner: *mut kernel::ffi::c_void) -> u8 {
    if entry.is_error() {
        return PROT_ERROR;
    }
    let Some(page) = entry.mapped(owner) else {
        return PROT_NONE;
    };
    let mut prot = match (page.kind, page.owned) {
        (PageKind::DevicePrivate, true) => PROT_DEV_PRIVATE_LOCAL,
        (PageKind::DevicePrivate, false) => PROT_DEV_PRIVATE_REMOTE,
        (PageKind::DeviceCoherent, true) => PROT_DEV_COHERENT_LOCAL,
        (PageKind::DeviceCoherent, false) => PROT_DEV_COHERENT_REMOTE,
        (PageKind::Zero, _) => PROT_ZERO,
        (PageKind::System, _) => PROT_NONE,
    };
    prot |= if page.writable { PROT_WRITE } else { PROT_READ };
    match page.order {
        PMD_ORDER => prot |= PROT_PMD,
        PUD_ORDER => prot |= PROT_PUD,
        _ => {}
    }
    prot
}

/// Names of the uAPI devices: private ones by GPU index, then coherent ones.
const NAMES: [&CStr; 2 * MAX_GPUS as usize] = [
    c"hmm_dmirror0",
    c"hmm_dmirror1",
    c"hmm_dmirror2",
    c"hmm_dmirror3",
];

/// The registered /dev/hmm_dmirrorN of one GPU.
#[pin_data]
pub(crate) struct MirrorDevice {
    gpu: Arc<Gpu>,
    kind: MemKind,
    #[pin]
    registration: MiscDeviceRegistration<Mirror>,
}

impl MirrorDevice {
    /// Registers the uAPI device of `gpu`.
    pub(crate) fn register(gpu: Arc<Gpu>, kind: MemKind) -> Result<Pin<KBox<Self>>> {
        let minor = match kind {
            MemKind::Private => gpu.index(),
            MemKind::Coherent => gpu.index() + MAX_GPUS,
        };
        let name = NAMES[minor as usize];
        KBox::try_pin_init(
            try_pin_init!(MirrorDevice {
                gpu,
                kind,
                registration <- MiscDeviceRegistration::register(MiscDeviceOptions { name }),
            }),
            GFP_KERNEL,
        )
    }
}

#[vtable]
impl MiscDevice for Mirror {
    type Ptr = Pin<KBox<Mirror>>;

    fn open(_file: &File, misc: &MiscDeviceRegistration<Self>) -> Result<Pin<KBox<Mirror>>> {
        // SAFETY: every registration of `Mirror` is the `registration` field
        // of a pinned `MirrorDevice`, alive while the device is registered.
        let md = unsafe { &*container_of!(core::ptr::from_ref(misc), MirrorDevice, registration) };
        Mirror::new(md.gpu.clone(), md.kind)
    }

    /// Maps zeroed driver pages (VM_MIXEDMAP), as test_hmm does, so the
    /// selftest can snapshot a driver mapping.
    fn mmap(_mirror: Pin<&Mirror>, _file: &File, vma: &VmaNew) -> Result {
        let mixed = vma.set_mixedmap();
        let mut addr = vma.start();
        while addr < vma.end() {
            let page = Page::alloc_page(GFP_KERNEL | __GFP_ZERO)?;
            // The mapping takes its own reference; ours goes with `page`.
            mixed.vm_insert_page(addr, &page)?;
            addr += crate::abi::PAGE_SIZE as usize;
        }
        Ok(())
    }

    fn ioctl(mirror: Pin<&Mirror>, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        let (mut reader, mut writer) =
            UserSlice::new(UserPtr::from_addr(arg), core::mem::size_of::<DmirrorCmd>())
                .reader_writer();
        let mut c: DmirrorCmd = reader.read()?;
        // Same argument checks as test_hmm.
        if c.addr & (crate::abi::PAGE_SIZE - 1) != 0 {
            return Err(EINVAL);
        }
        let size = c.npages.checked_mul(crate::abi::PAGE_SIZE).ok_or(EINVAL)?;
        if c.addr.checked_add(size).is_none_or(|end| end <= c.addr) {
            return Err(EINVAL);
        }
        let counts: Counts = match cmd {
            HMM_DMIRROR_READ => mirror.read(c.addr, c.ptr, c.npages, FaultPolicy::Resolve)?,
            HMM_DMIRROR_READ_UNLOCKED => {
                crate::compat::unlocked_range_fault(|| {
                    gpu_warn!(mirror.gpu, "HMM_DMIRROR_READ_UNLOCKED is not supported: this kernel has no hmm_range_fault_unlocked_timeout()\n")
                })?;
                mirror.read(c.addr, c.ptr, c.npages, FaultPolicy::ResolveUnlocked)?
            }
            HMM_DMIRROR_EXCLUSIVE => mirror.exclusive(c.addr, c.ptr, c.npages)?,
            HMM_DMIRROR_CHECK_EXCLUSIVE => mirror.check_exclusive(c.addr, c.npages)?,
            HMM_DMIRROR_WRITE => mirror.write(c.addr, c.ptr, c.npages)?,
            HMM_DMIRROR_MIGRATE_TO_DEV => mirror.migrate_to_device(c.addr, c.ptr, c.npages)?,
            HMM_DMIRROR_MIGRATE_TO_SYS => mirror.migrate_to_system(c.addr, c.npages)?,
            HMM_DMIRROR_SNAPSHOT => mirror.snapshot(c.addr, c.ptr, c.npages)?,
            HMM_DMIRROR_RELEASE => {
                mirror.gpu.check_alive()?;
                crate::migrate::evict_all(&mirror.gpu, mirror.vram());
                Counts::default()
            }
            HMM_DMIRROR_FLAGS => {
                mirror.state.lock().flags = c.npages;
                Counts::default()
            }
            _ => return Err(EINVAL),
        };
        c.cpages = counts.cpages;
        c.faults = counts.faults;
        writer.write(&c)?;
        Ok(0)
    }
}
