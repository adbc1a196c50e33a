// SPDX-License-Identifier: GPL-2.0

//! hmmgpu: the guest driver of the hmmgpu virtual GPU.
//!
//! Binds the virtio device (id 63), registers its VRAM as ZONE_DEVICE memory,
//! migrates process memory to and from VRAM with the device's copy engine and
//! offers the dmirror uAPI of lib/test_hmm_uapi.h. Layout:
//! - `gpu`: probe/remove and the device's state
//! - `ecc`: VRAM ECC errors: retiring pages, moving their data away
//! - `queue`: the command and event virtqueues, commands' completion,
//!   polling and timeouts, the queue side of resets, the device's lifecycle
//! - `virtio`: the virtio calls, on typed handles
//! - `vram`: the VRAM allocator (GPU buddy) and its device pages
//! - `migrate`: migrate_vma_* / migrate_device_* and migrate_to_ram
//! - `mirror`: hmm_range_fault + mmu_interval_notifier per open file
//! - `uapi`: /dev/hmm_dmirrorN and its ioctls
//! - `pages`: typed handles for struct pages, migrate and hmm_pfns entries
//! - `ffi`: every function C calls into Rust
//! - `shim`: the declarations of the C files and of the exported kernel
//!   functions `kernel::bindings` lacks
//! - `compat`: what differs between the kernels it builds on (7.2, 7.3)

use kernel::prelude::*;

#[macro_use]
mod log;

// The device interface, shared verbatim with the backend: its items are `pub`
// for the backend's crate and not all of them are used here.
#[rustfmt::skip]
#[path = "../device/abi/src/abi.rs"]
// Clippy asks for by-value `to_bytes` in a private module; abi.rs is the
// backend's public API, where it does not.
#[allow(dead_code, unreachable_pub, clippy::wrong_self_convention)]
mod abi;
mod compat;
mod ecc;
mod ffi;
mod gpu;
mod migrate;
mod mirror;
mod pages;
mod queue;
mod shim;
mod uapi;
mod virtio;
mod vram;

module! {
    type: HmmGpuModule,
    name: "hmmgpu",
    authors: ["hmmgpu developers"],
    description: "Driver for the hmmgpu virtual GPU (HMM / ZONE_DEVICE test device)",
    license: "GPL",
    params: {
        spin_us: u32 {
            default: 0,
            description: "Microseconds a waiter spins for its command before sleeping, while commands complete that fast (0: never)",
        },
    },
}

struct HmmGpuModule;

impl kernel::Module for HmmGpuModule {
    fn init(module: &'static ThisModule) -> Result<Self> {
        virtio::register_driver(module)?;
        Ok(HmmGpuModule)
    }
}

impl Drop for HmmGpuModule {
    fn drop(&mut self) {
        // SAFETY: registered in `init`.
        unsafe { virtio::unregister_driver() };
    }
}
