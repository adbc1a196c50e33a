// SPDX-License-Identifier: GPL-2.0

//! /sys/kernel/debug/hmmgpu<N>: `counters` and `vram`.

use super::Gpu;
use crate::abi;
use crate::vram::MemKind;
use core::fmt;
use core::sync::atomic::Ordering;
use kernel::ffi::c_void;
use kernel::prelude::*;
use kernel::str::CString;
use kernel::sync::Arc;

impl Gpu {
    /// Creates /sys/kernel/debug/hmmgpu<index>: `counters` and `vram`. A
    /// GPU without it works: the failure is logged.
    pub(super) fn create_debugfs(&self, foreign: *mut c_void) {
        let created = CString::try_from_fmt(fmt!("hmmgpu{}", self.index)).and_then(|name| {
            let gpu: Result<Arc<Gpu>> = Ok(self.arc(foreign));
            let scope = kernel::debugfs::Scope::dir(gpu, &name, |gpu, dir| {
                dir.read_callback_file(c"counters", gpu, &|gpu: &Arc<Gpu>, f| {
                    gpu.write_counters(f)
                });
                dir.read_callback_file(c"vram", gpu, &|gpu: &Arc<Gpu>, f| gpu.write_vram(f));
            });
            KBox::pin_init(scope, GFP_KERNEL)
        });
        match created {
            Ok(scope) => *self.debugfs.lock() = Some(scope),
            Err(e) => gpu_warn!(self, "no debugfs directory: {:?}\n", e),
        }
    }

    /// debugfs `counters`: the device's counters, read with COUNTERS, then
    /// the driver's, one `name value` line each. A device that does not
    /// answer COUNTERS shows the driver's alone.
    fn write_counters(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Ok(counters) = self.counters() {
            for (name, value) in abi::counter::NAMES.iter().zip(counters.iter()) {
                writeln!(f, "{} {}", name, value)?;
            }
        }
        let c = &self.counters;
        let driver = [
            (
                "driver_fault_events",
                c.fault_events.load(Ordering::Relaxed),
            ),
            (
                "driver_spurious_faults",
                c.spurious_faults.load(Ordering::Relaxed),
            ),
            ("driver_copy_errors", c.copy_errors.load(Ordering::Relaxed)),
            (
                "driver_polled_completions",
                self.queues.polled_completions(),
            ),
            ("driver_resets", self.resets.load(Ordering::Relaxed)),
            ("driver_ecc_events", c.ecc_events.load(Ordering::Relaxed)),
            ("driver_ecc_dropped", c.ecc_dropped.load(Ordering::Relaxed)),
            (
                "driver_retired_pages",
                self.private.retired_pages() + self.coherent.retired_pages(),
            ),
        ];
        for (name, value) in driver {
            writeln!(f, "{} {}", name, value)?;
        }
        Ok(())
    }

    /// debugfs `vram`: per half of the VRAM its offset, size, first device
    /// pfn, free bytes and retired pages, then the link canary's VRAM
    /// offset. Tests use it to tell a page's VRAM offset from its pfn
    /// (/proc/self/pagemap).
    fn write_vram(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for vram in [&self.private, &self.coherent] {
            // Pages freed by now count as free.
            vram.reclaim_deferred();
            writeln!(
                f,
                "{} base {:#x} size {:#x} pfn_first {:#x} free {:#x} retired {}",
                match vram.kind() {
                    MemKind::Private => "private",
                    MemKind::Coherent => "coherent",
                },
                vram.base(),
                vram.size(),
                vram.pfn_first(),
                vram.avail(),
                vram.retired_pages()
            )?;
        }
        match self
            .canary_pfn()
            .and_then(|pfn| self.coherent.offset_of_pfn(pfn))
        {
            Some(offset) => writeln!(f, "canary {:#x}", offset),
            None => writeln!(f, "canary none"),
        }
    }
}
