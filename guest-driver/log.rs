// SPDX-License-Identifier: GPL-2.0

//! Logging: `dev_*!` on a GPU's device, each line naming the GPU as
//! `hmmgpu<N>: ` (the name of its debugfs directory; its uAPI devices are
//! /dev/hmm_dmirror<N> and <N + 2>), which users and the tests grep for.
//! `gpu_err!(gpu, "...", args)` logs `hmmgpu virtio1: hmmgpu0: ...`.

use kernel::device::Device;

/// What the `gpu_*!` macros log about: a GPU, or a part of one.
pub(crate) trait GpuName {
    /// The device the lines are logged on.
    fn device(&self) -> &Device;
    /// The GPU's index `N`, as in `hmmgpu<N>`.
    fn gpu_index(&self) -> u32;
}

/// `kernel::dev_<level>!` on `$gpu`'s device, prefixed with its name.
macro_rules! gpu_log {
    ($level:ident, $gpu:expr, $($arg:tt)+) => {{
        use $crate::log::GpuName as _;
        let gpu = &$gpu;
        ::kernel::$level!(gpu.device(), "hmmgpu{}: {}", gpu.gpu_index(), ::core::format_args!($($arg)+))
    }};
}

/// An error about a GPU (see [`GpuName`]).
macro_rules! gpu_err {
    ($gpu:expr, $($arg:tt)+) => { gpu_log!(dev_err, $gpu, $($arg)+) };
}

/// A warning about a GPU.
macro_rules! gpu_warn {
    ($gpu:expr, $($arg:tt)+) => { gpu_log!(dev_warn, $gpu, $($arg)+) };
}

/// A notice about a GPU.
macro_rules! gpu_notice {
    ($gpu:expr, $($arg:tt)+) => { gpu_log!(dev_notice, $gpu, $($arg)+) };
}

/// Information about a GPU.
macro_rules! gpu_info {
    ($gpu:expr, $($arg:tt)+) => { gpu_log!(dev_info, $gpu, $($arg)+) };
}
