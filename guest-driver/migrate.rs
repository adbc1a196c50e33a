// SPDX-License-Identifier: GPL-2.0

//! Migration between system memory and VRAM with migrate_vma_* and
//! migrate_device_*, every byte moved by the device's copy engine.

use crate::abi::{self, opcode, range_flags, PAGE_SIZE};
use crate::gpu::Gpu;
use crate::queue::RangeList;
use crate::shim::{self, Migrate};
use crate::vram::{MemKind, Vram, HUGE_ORDER};
use core::ffi::c_ulong;
use core::ptr;
use kernel::prelude::*;

fn mpfn_valid() -> c_ulong {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_PFN_VALID }
}

fn mpfn_migrate() -> c_ulong {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_PFN_MIGRATE }
}

fn mpfn_write() -> c_ulong {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_PFN_WRITE }
}

/// Most pages one migrate_vma step covers (2 MiB: one PMD, one THP).
pub(crate) fn max_pages() -> usize {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_MAX_PAGES as usize }
}

fn page_phys(page: *mut shim::Page) -> u64 {
    // SAFETY: `page` is a valid struct page.
    (unsafe { shim::hmmgpu_shim_page_to_pfn(page) } as u64) * PAGE_SIZE
}

/// A `struct hmmgpu_migrate` (migrate_vma plus its pfn arrays), freed on drop.
pub(crate) struct MigrateArgs(*mut Migrate);

impl MigrateArgs {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: plain allocation.
        let m = unsafe { shim::hmmgpu_shim_migrate_alloc() };
        if m.is_null() {
            return Err(ENOMEM);
        }
        Ok(Self(m))
    }

    fn src(&mut self, n: usize) -> &mut [c_ulong] {
        // SAFETY: the array has `max_pages()` entries; `n` is at most that.
        unsafe { core::slice::from_raw_parts_mut(shim::hmmgpu_shim_migrate_src(self.0), n) }
    }

    fn src_dst(&mut self, n: usize) -> (&[c_ulong], &mut [c_ulong]) {
        // SAFETY: as for `src`; the two arrays do not overlap.
        unsafe {
            (
                core::slice::from_raw_parts(shim::hmmgpu_shim_migrate_src(self.0), n),
                core::slice::from_raw_parts_mut(shim::hmmgpu_shim_migrate_dst(self.0), n),
            )
        }
    }
}

impl MigrateArgs {
    /// migrate_vma_setup() for [start, end) of `vma`, selecting `select`
    /// pages (`shim::SELECT_SYSTEM` or a `MemKind` code) of `vram`'s owner.
    ///
    /// # Safety
    ///
    /// `vma` must be locked for the whole migration (mmap lock, or the fault
    /// handler's lock), [start, end) inside it and at most `max_pages()`
    /// pages; `fault_page` is NULL or the page of a migrate_to_ram() fault.
    unsafe fn setup(
        &mut self,
        vma: *mut shim::Vma,
        start: u64,
        end: u64,
        vram: &Vram,
        select: core::ffi::c_int,
        compound: bool,
        fault_page: *mut shim::Page,
    ) -> Result {
        // SAFETY: per this function's contract.
        let ret = unsafe {
            shim::hmmgpu_shim_migrate_setup(
                self.0,
                vma,
                start as c_ulong,
                end as c_ulong,
                vram.owner(),
                select,
                compound,
                fault_page,
            )
        };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(())
    }
}

impl Drop for MigrateArgs {
    fn drop(&mut self) {
        // SAFETY: allocated by `hmmgpu_shim_migrate_alloc`.
        unsafe { shim::hmmgpu_shim_migrate_free(self.0) };
    }
}

fn mpfn_compound() -> c_ulong {
    // SAFETY: constant exported by the shim.
    unsafe { shim::hmmgpu_MIGRATE_PFN_COMPOUND }
}

/// Pages of a THP.
const HUGE_PAGES: usize = 1 << HUGE_ORDER;

/// The 4 KiB pages a migrate entry moves: a THP is one entry, its head's,
/// marked compound.
fn entry_pages(entry: c_ulong) -> usize {
    if entry & mpfn_compound() != 0 {
        HUGE_PAGES
    } else {
        1
    }
}

fn page_pfn(page: *mut shim::Page) -> c_ulong {
    // SAFETY: `page` is a valid struct page.
    unsafe { shim::hmmgpu_shim_page_to_pfn(page) }
}

/// The migrate pfn entry for `page`.
fn mpfn(page: *mut shim::Page) -> c_ulong {
    // SAFETY: constant conversion of a valid pfn.
    unsafe { shim::hmmgpu_shim_migrate_pfn(page_pfn(page)) }
}

/// Fills `dst` with freshly allocated VRAM pages for every migrating entry
/// of `src` and copies (or zero-fills) the data into them with the device.
/// A THP source (MIGRATE_PFN_COMPOUND) gets a 2 MiB VRAM THP, or 512 single
/// pages if that allocation fails (HMM_DMIRROR_FLAG_FAIL_ALLOC fails it
/// once, as in test_hmm; for a single page it leaves the page behind).
///
/// Entries whose copy failed (COPY_ERROR: the failing range and every later
/// one; or the device stopped) get their VRAM page back and a zero `dst`, so
/// migrate_vma_pages() leaves those pages in system memory, data intact.
/// Returns the number of pages whose copy failed.
fn alloc_and_copy_to_vram(
    gpu: &Gpu,
    vram: &Vram,
    src: &[c_ulong],
    dst: &mut [c_ulong],
    fail_alloc: &mut bool,
) -> u64 {
    let mut copies = RangeList::new();
    let mut zeroes = RangeList::new();
    let mut result = Ok(());
    dst.iter_mut().for_each(|d| *d = 0);
    // Which range moves each prepared entry: (dst index, FILL?, range index).
    let Ok(mut placed) = KVec::<(usize, bool, usize)>::with_capacity(src.len(), GFP_KERNEL) else {
        return 0;
    };
    // Single pages come from one batch allocation (falling back to one by
    // one if the VRAM is too fragmented for the whole batch).
    let singles = src
        .iter()
        .filter(|s| **s & mpfn_migrate() != 0 && **s & mpfn_compound() == 0)
        .count();
    let mut batch = match vram.alloc_batch(singles) {
        Ok(b) => b,
        Err(_) => return 0,
    };
    let mut single = |vram: &Vram| batch.take().map_or_else(|| vram.alloc_page(false), Ok);
    let mut i = 0;
    while i < src.len() && result.is_ok() {
        let s = src[i];
        if s & mpfn_migrate() == 0 {
            i += 1;
            continue;
        }
        // SAFETY: `s` is a migrate pfn from migrate_vma_setup().
        let spage = unsafe { shim::hmmgpu_shim_migrate_pfn_to_page(s) };
        // SAFETY: as above; a NULL page means "not populated, zero".
        if !spage.is_null() && unsafe { shim::hmmgpu_shim_is_zone_device_page(spage) } {
            i += 1;
            continue;
        }
        let sphys = (!spage.is_null()).then(|| page_phys(spage));
        let write = s & mpfn_write();
        let mut place = |idx: usize, page: *mut shim::Page, flags: c_ulong, dst_off: u64, src_off: u64, len: u64| -> Result {
            // Set first: on an error below the page is discarded with the rest.
            dst[idx] = mpfn(page) | write | flags;
            let (fill, range) = match sphys {
                Some(p) => copies
                    .push(p + src_off, dst_off, len as u32, range_flags::DST_VRAM)
                    .map(|()| (false, copies.len() - 1))?,
                None => zeroes
                    .push_fill(0, dst_off, len as u32, range_flags::DST_VRAM)
                    .map(|()| (true, zeroes.len() - 1))?,
            };
            // Within the capacity reserved above: never allocates.
            placed.push((idx, fill, range), GFP_ATOMIC)?;
            Ok(())
        };
        if s & mpfn_compound() != 0 {
            let nr = core::cmp::min(HUGE_PAGES, src.len() - i);
            // No device-coherent THPs: the kernel migrates a PMD-mapped
            // coherent folio back only with MIGRATE_VMA_SELECT_SYSTEM (see
            // migrate_vma_collect_huge_pmd()), so it could never leave VRAM.
            // The source THP is split into single coherent pages instead.
            let huge = if core::mem::take(fail_alloc) || vram.kind() == MemKind::Coherent {
                Err(ENOMEM)
            } else {
                vram.alloc_page(true)
            };
            if let Ok((page, offset)) = huge {
                result = place(i, page, mpfn_compound(), offset, 0, abi::HUGE_PAGE_SIZE);
            } else {
                for j in 0..nr {
                    let Ok((page, offset)) = single(vram) else {
                        break;
                    };
                    result = place(i + j, page, 0, offset, j as u64 * PAGE_SIZE, PAGE_SIZE);
                    if result.is_err() {
                        break;
                    }
                }
            }
            i += nr;
            continue;
        }
        if core::mem::take(fail_alloc) {
            i += 1;
            continue;
        }
        // VRAM full: this page stays in system memory.
        if let Ok((page, offset)) = single(vram) {
            result = place(i, page, 0, offset, 0, PAGE_SIZE);
        }
        i += 1;
    }
    if result.is_err() {
        // Out of memory preparing the copy: nothing is migrated.
        for d in dst.iter_mut().filter(|d| **d != 0) {
            // SAFETY: `*d` holds a device page or THP prepared above.
            unsafe { shim::hmmgpu_shim_device_page_discard(shim::hmmgpu_shim_migrate_pfn_to_page(*d)) };
            *d = 0;
        }
        return 0;
    }
    // Ranges done in full by each list.
    let copied = gpu.run_partial(opcode::COPY, &copies).0;
    let filled = gpu.run_partial(opcode::FILL, &zeroes).0;
    let mut failed = 0;
    for &(idx, fill, range) in placed.iter() {
        if range < if fill { filled } else { copied } {
            continue;
        }
        // Not copied: give the VRAM back, leave the page where it is.
        failed += entry_pages(dst[idx]) as u64;
        // SAFETY: `dst[idx]` holds a device page or THP prepared above.
        unsafe { shim::hmmgpu_shim_device_page_discard(shim::hmmgpu_shim_migrate_pfn_to_page(dst[idx])) };
        dst[idx] = 0;
    }
    failed
}

/// Allocates system pages for every migrating device page of `src` and
/// copies the data back from VRAM. A device THP gets a system THP, or 512
/// single pages if that allocation fails (or `fail_alloc` fails it once).
/// `vma`/`start` place the new pages (NULL for eviction). Returns the number
/// of entries prepared, or an error after which no entry is migrated.
fn alloc_and_copy_to_ram(
    gpu: &Gpu,
    vram: &Vram,
    vma: *mut shim::Vma,
    start: u64,
    src: &[c_ulong],
    dst: &mut [c_ulong],
    fail_alloc: &mut bool,
) -> Result<usize> {
    let mut copies = RangeList::new();
    let mut result = Ok(());
    dst.iter_mut().for_each(|d| *d = 0);
    let mut i = 0;
    while i < src.len() && result.is_ok() {
        let s = src[i];
        // SAFETY: `s` is a migrate pfn from the setup call.
        let spage = unsafe { shim::hmmgpu_shim_migrate_pfn_to_page(s) };
        if s & mpfn_migrate() == 0 || spage.is_null() {
            i += 1;
            continue;
        }
        let Some(offset) = vram.offset_of_pfn(page_pfn(spage) as u64) else {
            i += 1;
            continue;
        };
        let addr = start + i as u64 * PAGE_SIZE;
        let write = s & mpfn_write();
        let nr = if s & mpfn_compound() != 0 {
            core::cmp::min(HUGE_PAGES, src.len() - i)
        } else {
            1
        };
        if nr > 1 && !core::mem::take(fail_alloc) {
            // SAFETY: `vma` is NULL or the VMA being migrated, locked by the caller.
            let thp = unsafe { shim::hmmgpu_shim_alloc_sys_page(vma, addr as c_ulong, HUGE_ORDER) };
            if !thp.is_null() {
                dst[i] = mpfn(thp) | write | mpfn_compound();
                result = copies.push(offset, page_phys(thp), abi::HUGE_PAGE_SIZE as u32, range_flags::SRC_VRAM);
                i += nr;
                continue;
            }
        }
        for j in 0..nr {
            let a = addr + j as u64 * PAGE_SIZE;
            // SAFETY: as above.
            let page = unsafe { shim::hmmgpu_shim_alloc_sys_page(vma, a as c_ulong, 0) };
            if page.is_null() {
                result = Err(ENOMEM);
                break;
            }
            dst[i + j] = mpfn(page) | write;
            result = copies.push(offset + j as u64 * PAGE_SIZE, page_phys(page), PAGE_SIZE as u32, range_flags::SRC_VRAM);
            if result.is_err() {
                break;
            }
        }
        i += nr;
    }
    let result = result.and_then(|()| gpu.run(opcode::COPY, &copies).map(|_| ()));
    let prepared = dst.iter().filter(|d| **d != 0).count();
    if let Err(e) = result {
        for d in dst.iter_mut().filter(|d| **d != 0) {
            // SAFETY: `*d` holds a locked system page or THP allocated above.
            unsafe { shim::hmmgpu_shim_free_sys_page(shim::hmmgpu_shim_migrate_pfn_to_page(*d)) };
            *d = 0;
        }
        return Err(e);
    }
    Ok(prepared)
}

/// Counts the entries the core actually migrated.
fn migrated(src: &[c_ulong]) -> u64 {
    src.iter()
        .filter(|s| **s & mpfn_valid() != 0 && **s & mpfn_migrate() != 0)
        .count() as u64
}

/// Walks the VMAs of [start, end) of `mm` in page-table-sized steps.
fn for_each_step(
    mm: *mut shim::Mm,
    start: u64,
    end: u64,
    mut step: impl FnMut(*mut shim::Vma, u64, u64) -> Result,
) -> Result {
    // SAFETY: `mm` is the mirrored mm; the caller holds a reference.
    unsafe { shim::hmmgpu_shim_mmap_read_lock(mm) };
    let mut addr = start;
    let mut result = Ok(());
    while addr < end {
        let mut next = core::cmp::min(end, addr + max_pages() as u64 * PAGE_SIZE) as c_ulong;
        // SAFETY: the mmap lock is held.
        let vma = unsafe { shim::hmmgpu_shim_vma_lookup(mm, addr as c_ulong, &mut next) };
        if vma.is_null() {
            result = Err(EINVAL);
            break;
        }
        if let Err(e) = step(vma, addr, next as u64) {
            result = Err(e);
            break;
        }
        addr = next as u64;
    }
    // SAFETY: locked above.
    unsafe { shim::hmmgpu_shim_mmap_read_unlock(mm) };
    result
}

/// Migrates the pages of [start, end) of `mm` to VRAM. Pages that cannot be
/// migrated (no VRAM, copy failed, pinned) stay in system memory. Returns the
/// number of pages now in VRAM and the number whose copy failed.
///
/// `map` gets the MAP ranges (device virtual = process virtual) of the pages
/// migrated by each step, called before migrate_vma_finalize() while the
/// pages are still locked, so the device mapping is in place before any CPU
/// access can move them again.
pub(crate) fn to_device(
    gpu: &Gpu,
    vram: &Vram,
    mm: *mut shim::Mm,
    start: u64,
    end: u64,
    fail_alloc: &mut bool,
    mut map: impl FnMut(&RangeList) -> Result,
) -> Result<(u64, u64)> {
    let mut args = MigrateArgs::new()?;
    let mut moved = 0;
    let mut failed = 0;
    for_each_step(mm, start, end, |vma, s, e| {
        let n = ((e - s) / PAGE_SIZE) as usize;
        // SAFETY: `vma` is locked by `for_each_step`; `n` <= max_pages().
        unsafe { args.setup(vma, s, e, vram, shim::SELECT_SYSTEM, true, ptr::null_mut())? };
        let (src, dst) = args.src_dst(n);
        failed += alloc_and_copy_to_vram(gpu, vram, src, dst, fail_alloc);
        // SAFETY: set up above.
        unsafe { shim::hmmgpu_shim_migrate_pages(args.0) };
        let (src, dst) = args.src_dst(n);
        let mut list = RangeList::new();
        let mut result = Ok(());
        for (i, (sp, dp)) in src.iter().zip(dst.iter()).enumerate() {
            if *dp == 0 || *sp & mpfn_migrate() == 0 {
                continue;
            }
            moved += 1;
            // SAFETY: `*dp` is one of our device pages, migrated.
            let pfn = unsafe { shim::hmmgpu_shim_page_to_pfn(shim::hmmgpu_shim_migrate_pfn_to_page(*dp)) };
            let Some(offset) = vram.offset_of_pfn(pfn as u64) else {
                continue;
            };
            let mut flags = range_flags::SRC_VRAM | range_flags::MAP_READ;
            if *sp & mpfn_write() != 0 {
                flags |= range_flags::MAP_WRITE;
            }
            // A THP is mapped by one huge device MMU entry.
            let len = if *dp & mpfn_compound() != 0 {
                flags |= range_flags::MAP_HUGE;
                abi::HUGE_PAGE_SIZE
            } else {
                PAGE_SIZE
            };
            if let Err(e) = list.push(offset, s + i as u64 * PAGE_SIZE, len as u32, flags) {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            result = map(&list);
        }
        // SAFETY: as above.
        unsafe { shim::hmmgpu_shim_migrate_finalize(args.0) };
        result
    })?;
    Ok((moved, failed))
}

/// Migrates this GPU's pages in [start, end) of `mm` back to system memory.
pub(crate) fn to_system(
    gpu: &Gpu,
    vram: &Vram,
    mm: *mut shim::Mm,
    start: u64,
    end: u64,
    fail_alloc: &mut bool,
) -> Result<u64> {
    let mut args = MigrateArgs::new()?;
    let mut moved = 0;
    for_each_step(mm, start, end, |vma, s, e| {
        let n = ((e - s) / PAGE_SIZE) as usize;
        // SAFETY: `vma` is locked by `for_each_step`; `n` <= max_pages().
        unsafe { args.setup(vma, s, e, vram, vram.kind().code(), true, ptr::null_mut())? };
        let (src, dst) = args.src_dst(n);
        let copied = alloc_and_copy_to_ram(gpu, vram, vma, s, src, dst, fail_alloc);
        // SAFETY: set up above; on a failed copy every dst is 0 and the
        // pages stay where they are.
        unsafe { shim::hmmgpu_shim_migrate_pages(args.0) };
        moved += migrated(args.src(n));
        // SAFETY: as above.
        unsafe { shim::hmmgpu_shim_migrate_finalize(args.0) };
        copied.map(|_| ())
    })?;
    Ok(moved)
}

/// `dev_pagemap_ops.migrate_to_ram`: a CPU touched a page in VRAM.
#[no_mangle]
pub(crate) extern "C" fn hmmgpu_rust_migrate_to_ram(
    gpu: *mut core::ffi::c_void,
    vram: *mut core::ffi::c_void,
    vmf: *mut shim::VmFault,
) -> shim::VmFaultT {
    // SAFETY: the pgmap's cookies are a `Gpu` kept alive by the devm
    // action and the `Vram` inside it that owns the page.
    let (gpu, vram) = unsafe { (&*gpu.cast::<Gpu>(), &*vram.cast::<Vram>()) };
    let (mut vma, mut addr, mut page, mut order) = (ptr::null_mut(), 0, ptr::null_mut(), 0);
    // SAFETY: `vmf` is the fault being handled.
    unsafe { shim::hmmgpu_shim_vmf_info(vmf, &mut vma, &mut addr, &mut page, &mut order) };
    // A PMD-mapped THP comes back whole (as test_hmm does).
    let span = PAGE_SIZE << order;
    let addr = addr as u64 & !(span - 1);
    let n = 1usize << order;
    // SAFETY: constants exported by the shim.
    let (sigbus, oom) = unsafe { (shim::hmmgpu_VM_FAULT_SIGBUS, shim::hmmgpu_VM_FAULT_OOM) };
    let Ok(mut args) = MigrateArgs::new() else {
        return oom;
    };
    // SAFETY: the fault handler holds the mm/VMA lock; one page or one THP.
    if unsafe { args.setup(vma, addr, addr + span, vram, vram.kind().code(), order > 0, page) }.is_err() {
        return sigbus;
    }
    let (src, dst) = args.src_dst(n);
    let result = alloc_and_copy_to_ram(gpu, vram, vma, addr, src, dst, &mut false);
    // SAFETY: set up above.
    unsafe {
        shim::hmmgpu_shim_migrate_pages(args.0);
        shim::hmmgpu_shim_migrate_finalize(args.0);
    }
    match result {
        Ok(_) => 0,
        Err(ENOMEM) => oom,
        Err(_) => {
            pr_err!("hmmgpu{}: copy from VRAM failed in a CPU fault at {:#x}\n", gpu.index(), addr);
            sigbus
        }
    }
}

/// Migrates every page still in this share of the GPU's VRAM back to system
/// memory, whichever process owns it. Returns the number of pages evicted.
pub(crate) fn evict_all(gpu: &Gpu, vram: &Vram) -> u64 {
    let Ok(mut args) = MigrateArgs::new() else {
        pr_err!("hmmgpu{}: no memory to evict VRAM\n", gpu.index());
        return 0;
    };
    let total = vram.pages() as usize;
    let first = vram.pfn_first();
    if first == 0 {
        return 0;
    }
    let mut evicted = 0;
    let mut done = 0;
    while done < total {
        let n = core::cmp::min(max_pages(), total - done);
        evicted += evict_pfns(gpu, vram, &mut args, first + done as u64, n, true).pages;
        done += n;
    }
    evicted
}

/// What [`evict_pfns`] did.
struct Eviction {
    /// Pages given a system page (evicted, or poisoned if `lost`).
    pages: u64,
    /// The device could not copy: the data of those pages is lost and
    /// their system pages are poisoned.
    lost: bool,
}

/// Migrates the device pages [start_pfn, start_pfn + n) of `vram` (n at most
/// `max_pages()`) to system memory, whichever process owns them, copied by
/// the device. If the copy fails: with `must_leave` (removal) or once the
/// device is lost, as [`evict_without_device`] does, poisoning what is
/// lost; otherwise nothing moves. `args` keeps the src/dst arrays.
fn evict_pfns(gpu: &Gpu, vram: &Vram, args: &mut MigrateArgs, start_pfn: u64, n: usize, must_leave: bool) -> Eviction {
    let (src, dst) = args.src_dst(n);
    // SAFETY: [start_pfn, start_pfn + n) is in our device page range.
    let ret = unsafe { shim::hmmgpu_shim_evict_range(src.as_ptr().cast_mut(), start_pfn as c_ulong, n as c_ulong) };
    if ret < 0 {
        pr_err!("hmmgpu{}: migrate_device_range failed: {}\n", gpu.index(), ret);
        return Eviction { pages: 0, lost: false };
    }
    let mut lost = false;
    if let Err(e) = alloc_and_copy_to_ram(gpu, vram, ptr::null_mut(), 0, src, dst, &mut false) {
        if must_leave || gpu.is_lost() {
            // Through a failed link the CPU would copy all-ones, not VRAM.
            let cpu_reads_vram = vram.kind() == MemKind::Coherent && !gpu.is_link_down();
            let (saved, gone) = evict_without_device(vram, cpu_reads_vram, src, dst);
            pr_err!(
                "hmmgpu{}: eviction copy failed ({:?}): {} {} pages copied by the CPU, {} pages lost with the device\n",
                gpu.index(),
                e,
                saved,
                vram.kind().name(),
                gone
            );
            lost = gone > 0;
        }
    }
    // SAFETY: `src`/`dst` are the arrays filled above, `n` entries (a
    // zero `dst` leaves its page in VRAM).
    unsafe { shim::hmmgpu_shim_evict_finish(src.as_ptr().cast_mut(), dst.as_mut_ptr(), n as c_ulong) };
    let pages = dst.iter().filter(|d| **d != 0).map(|d| entry_pages(*d) as u64).sum::<u64>();
    if lost {
        // Now mapped where the VRAM pages were: poison them, so their
        // owners get SIGBUS rather than a page of zeroes.
        for (s, d) in src.iter().zip(dst.iter()) {
            if *d == 0 || *s & mpfn_migrate() == 0 {
                continue;
            }
            // SAFETY: `*d` is the migrate pfn of a page we allocated.
            let first = unsafe { shim::hmmgpu_shim_page_to_pfn(shim::hmmgpu_shim_migrate_pfn_to_page(*d)) };
            for pfn in first..first + entry_pages(*d) as c_ulong {
                // SAFETY: `pfn` is a system page of ours, now mapped by
                // its owner (memory_failure splits a THP first).
                let ret = unsafe { shim::hmmgpu_shim_poison_pfn(pfn) };
                if ret < 0 {
                    pr_err!("hmmgpu{}: poisoning pfn {:#x} failed: {}\n", gpu.index(), pfn, ret);
                }
            }
        }
    }
    Eviction { pages, lost }
}

/// What [`evict_corrupt_folio`] did with a device-private folio.
pub(crate) enum CorruptFolio {
    /// Copied to system memory; its corrupt page is poisoned there.
    Moved,
    /// The device could not copy it (it is lost): all of its pages are
    /// poisoned.
    Lost,
    /// Not migrated (locked by a migration in flight, or the copy failed):
    /// it is still in VRAM.
    NotMoved,
}

/// An ECC error corrupted device page `pfn` of the device-private folio
/// [head, head + nr) of `vram`: copies the folio to system memory with the
/// device (the rest of its data is good), whichever process owns it, then
/// poisons the system page that got `pfn`'s data, so its owner gets SIGBUS
/// there and nowhere else (memory_failure() splits a THP first).
pub(crate) fn evict_corrupt_folio(gpu: &Gpu, vram: &Vram, head: u64, nr: usize, pfn: u64) -> Result<CorruptFolio> {
    let idx = pfn.checked_sub(head).map(|i| i as usize).filter(|i| *i < nr && nr <= max_pages()).ok_or(EINVAL)?;
    let mut args = MigrateArgs::new()?;
    let eviction = evict_pfns(gpu, vram, &mut args, head, nr, false);
    if eviction.lost {
        return Ok(CorruptFolio::Lost);
    }
    let (src, dst) = args.src_dst(nr);
    // A THP moves whole (entry 0, compound), single pages each on their own.
    let entry = if src[0] & mpfn_compound() != 0 { 0 } else { idx };
    if src[entry] & mpfn_migrate() == 0 || dst[entry] == 0 {
        return Ok(CorruptFolio::NotMoved);
    }
    // SAFETY: `dst[entry]` is the migrate pfn of the system page (or THP)
    // that now holds the data.
    let sys = unsafe { shim::hmmgpu_shim_page_to_pfn(shim::hmmgpu_shim_migrate_pfn_to_page(dst[entry])) };
    let sys = sys + (idx - entry) as c_ulong;
    // SAFETY: a system page of ours, now mapped by the folio's owners.
    let ret = unsafe { shim::hmmgpu_shim_poison_pfn(sys) };
    if ret < 0 {
        pr_err!("hmmgpu{}: poisoning pfn {:#x} failed: {}\n", gpu.index(), sys, ret);
    }
    Ok(CorruptFolio::Moved)
}

/// What a page standing in for lost VRAM holds until it is poisoned (see
/// hmmgpu_shim_fill_pages: not zero).
const LOST_FILL: core::ffi::c_int = 0xff;

/// A system page (`order` 0, never null) or THP standing in for VRAM whose
/// data is lost, filled with [`LOST_FILL`], locked for the migration.
fn lost_stand_in(order: u32) -> *mut shim::Page {
    // SAFETY: no VMA: anywhere; order 0 does not fail.
    let page = unsafe { shim::hmmgpu_shim_alloc_sys_page(ptr::null_mut(), 0, order) };
    if !page.is_null() {
        // SAFETY: a page (or THP) we just allocated.
        unsafe { shim::hmmgpu_shim_fill_pages(page, order, LOST_FILL) };
    }
    page
}

/// Eviction once the device cannot copy (it is lost): device-coherent pages
/// are copied by the CPU through the BAR if `cpu_reads_vram` (the link is
/// up); otherwise their data, like device-private data, is gone with the
/// device, and the pages get fresh system pages that the caller poisons
/// after the migration. Fills `dst`; returns (pages copied, pages lost).
fn evict_without_device(vram: &Vram, cpu_reads_vram: bool, src: &[c_ulong], dst: &mut [c_ulong]) -> (u64, u64) {
    let coherent = vram.kind() == MemKind::Coherent;
    let (mut saved, mut gone) = (0, 0);
    let mut i = 0;
    while i < src.len() {
        let s = src[i];
        // SAFETY: `s` is a migrate pfn from migrate_device_range().
        let spage = unsafe { shim::hmmgpu_shim_migrate_pfn_to_page(s) };
        if s & mpfn_migrate() == 0 || spage.is_null() || vram.offset_of_pfn(page_pfn(spage) as u64).is_none() {
            i += 1;
            continue;
        }
        if s & mpfn_compound() != 0 && !coherent {
            // A device THP needs a system THP: eviction (no VMA) cannot
            // split it into small pages.
            let nr = core::cmp::min(HUGE_PAGES, src.len() - i);
            let thp = lost_stand_in(HUGE_ORDER);
            if !thp.is_null() {
                dst[i] = mpfn(thp) | (s & mpfn_write()) | mpfn_compound();
                gone += nr as u64;
            }
            i += nr;
            continue;
        }
        let page = if cpu_reads_vram {
            // SAFETY: no VMA: eviction allocates on the local node.
            unsafe { shim::hmmgpu_shim_alloc_sys_page(ptr::null_mut(), 0, 0) }
        } else {
            lost_stand_in(0)
        };
        // A null page stays in VRAM (unmapping the memory waits for it).
        if !page.is_null() {
            if cpu_reads_vram {
                // SAFETY: both are valid pages; a coherent page is in the direct map.
                unsafe { shim::hmmgpu_shim_copy_page(page, spage) };
                saved += 1;
            } else {
                gone += 1;
            }
            dst[i] = mpfn(page) | (s & mpfn_write());
        }
        i += 1;
    }
    (saved, gone)
}

/// `dev_pagemap_ops.memory_failure` of device-coherent VRAM: a machine check
/// on BAR pages (the kernel's generic handler does nothing for
/// MEMORY_DEVICE_COHERENT), or an ECC error the ECC work hands over
/// (ecc.rs). Their data is corrupt: each mapped page moves to a fresh system
/// page filled with 0xff (see [`LOST_FILL`]), which is then poisoned, so its
/// owners get SIGBUS on their next touch instead of reading anything; other
/// pages are untouched. The poisoning is queued: this runs inside
/// memory_failure(), which holds its mutex. The VRAM pages are retired.
/// Runs in process context.
#[no_mangle]
pub(crate) extern "C" fn hmmgpu_rust_memory_failure(
    gpu: *mut core::ffi::c_void,
    vram: *mut core::ffi::c_void,
    pfn: c_ulong,
    nr_pages: c_ulong,
) -> core::ffi::c_int {
    // SAFETY: the pgmap's cookies are a `Gpu` kept alive by the devm action
    // and the `Vram` inside it that owns the pages.
    let (gpu, vram) = unsafe { (&*gpu.cast::<Gpu>(), &*vram.cast::<Vram>()) };
    let mut moved = 0;
    for p in pfn..pfn + nr_pages {
        let Some(offset) = vram.offset_of_pfn(p as u64) else {
            continue;
        };
        let (mut src, mut dst) = ([0 as c_ulong; 1], [0 as c_ulong; 1]);
        // SAFETY: `p` is one of our device pages.
        let ret = unsafe { shim::hmmgpu_shim_evict_range(src.as_mut_ptr(), p, 1) };
        if ret < 0 {
            pr_err!("hmmgpu{}: memory failure at pfn {:#x}: cannot unmap it: {}\n", gpu.index(), p, ret);
        } else {
            // SAFETY: `src[0]` is a migrate pfn from migrate_device_range().
            let spage = unsafe { shim::hmmgpu_shim_migrate_pfn_to_page(src[0]) };
            let mut page = ptr::null_mut();
            if src[0] & mpfn_migrate() != 0 && !spage.is_null() {
                page = lost_stand_in(0);
                dst[0] = mpfn(page) | (src[0] & mpfn_write());
            }
            // SAFETY: the arrays of the call above, one entry (dst 0: nothing moves).
            unsafe { shim::hmmgpu_shim_evict_finish(src.as_mut_ptr(), dst.as_mut_ptr(), 1) };
            if !page.is_null() && src[0] & mpfn_migrate() != 0 {
                // SAFETY: a system page of ours, now mapped where the VRAM page was.
                unsafe { shim::hmmgpu_shim_poison_pfn_later(page_pfn(page)) };
                moved += 1;
            }
        }
        // Whether or not its data moved: the page must not be used again.
        vram.retire_and_log(offset, "memory failure");
    }
    pr_err!(
        "hmmgpu{}: memory failure on {} device-coherent page(s) at pfn {:#x}: {} moved to poisoned system pages\n",
        gpu.index(),
        nr_pages,
        pfn,
        moved
    );
    0
}
