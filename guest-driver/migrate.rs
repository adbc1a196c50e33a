// SPDX-License-Identifier: GPL-2.0

//! Migration between system memory and VRAM with migrate_vma_* and
//! migrate_device_*, every byte moved by the device's copy engine.

use crate::abi::{self, Opcode, RangeFlags, PAGE_SIZE};
use crate::gpu::Gpu;
use crate::pages::{self, MigratePfn, PageRef};
use crate::queue::RangeList;
use crate::shim::{self, c_const, MigrateVmaRaw};
use crate::vram::{MemKind, Vram, HUGE_ORDER};
use core::ptr::{self, NonNull};
use kernel::bindings;
use kernel::ffi::c_ulong;
use kernel::mm::{virt::VmaRef, MmWithUser};
use kernel::prelude::*;

/// Most pages one migrate_vma step covers (2 MiB: one PMD, one THP).
pub(crate) fn max_pages() -> usize {
    c_const!(hmmgpu_MIGRATE_MAX_PAGES)
}

/// Whether a PMD maps 2 MiB (4 KiB pages; on ppc64, the radix MMU), which
/// the device's huge pages and [`max_pages`] assume.
pub(crate) fn pmd_is_2m() -> bool {
    // SAFETY: reads a kernel constant.
    unsafe { shim::hmmgpu_pmd_is_2m() }
}

/// Pages of a THP.
const HUGE_PAGES: usize = 1 << HUGE_ORDER;

/// Which pages a migrate_vma selects.
#[derive(Clone, Copy)]
enum Select {
    /// System memory (to VRAM).
    System,
    /// The device pages of one VRAM share (back to system memory).
    Device(MemKind),
}

impl Select {
    /// The MIGRATE_VMA_SELECT_* flags, `compound` for THPs whole.
    fn flags(self, compound: bool) -> c_ulong {
        let select = match self {
            Select::System => c_const!(hmmgpu_MIGRATE_VMA_SELECT_SYSTEM),
            Select::Device(MemKind::Private) => c_const!(hmmgpu_MIGRATE_VMA_SELECT_DEVICE_PRIVATE),
            Select::Device(MemKind::Coherent) => {
                c_const!(hmmgpu_MIGRATE_VMA_SELECT_DEVICE_COHERENT)
            }
        };
        if compound {
            select | c_const!(hmmgpu_MIGRATE_VMA_SELECT_COMPOUND)
        } else {
            select
        }
    }
}

/// A `struct migrate_vma` and its src/dst arrays of [`max_pages`] entries.
pub(crate) struct MigrateArgs {
    args: NonNull<MigrateVmaRaw>,
    src: KVec<MigratePfn>,
    dst: KVec<MigratePfn>,
}

impl MigrateArgs {
    pub(crate) fn new() -> Result<Self> {
        let mut src = KVec::with_capacity(max_pages(), GFP_KERNEL)?;
        let mut dst = KVec::with_capacity(max_pages(), GFP_KERNEL)?;
        src.extend_with(max_pages(), MigratePfn::NONE, GFP_KERNEL)?;
        dst.extend_with(max_pages(), MigratePfn::NONE, GFP_KERNEL)?;
        // SAFETY: plain allocation, freed on drop.
        let args = NonNull::new(unsafe { shim::hmmgpu_migrate_vma_alloc() }).ok_or(ENOMEM)?;
        Ok(Self { args, src, dst })
    }

    /// The first `n` entries of the src and dst arrays.
    fn src_dst(&mut self, n: usize) -> (&mut [MigratePfn], &mut [MigratePfn]) {
        let n = core::cmp::min(n, max_pages());
        (&mut self.src[..n], &mut self.dst[..n])
    }

    /// migrate_vma_setup() for [start, end) of `vma` (at most
    /// `max_pages()` pages), selecting `select` pages of `vram`'s owner;
    /// `fault_page` is the page of a migrate_to_ram() fault.
    ///
    /// # Safety
    ///
    /// `vma` must be locked for the whole migration (mmap lock, or the fault
    /// handler's lock) and [start, end) inside it; `fault_page` is NULL or
    /// the page of the migrate_to_ram() fault being handled.
    #[allow(clippy::too_many_arguments)]
    unsafe fn setup(
        &mut self,
        vma: *mut bindings::vm_area_struct,
        start: u64,
        end: u64,
        vram: &Vram,
        select: Select,
        compound: bool,
        fault_page: *mut bindings::page,
    ) -> Result {
        if (end - start) / PAGE_SIZE > max_pages() as u64 {
            return Err(EINVAL);
        }
        self.dst.fill(MigratePfn::NONE);
        // SAFETY: per this function's contract; the arrays have room for
        // the range and stay put until the migration is finalized (they
        // are only reached through `&mut self`).
        let ret = unsafe {
            shim::hmmgpu_migrate_vma_setup(
                self.args.as_ptr(),
                vma,
                start as c_ulong,
                end as c_ulong,
                self.src.as_mut_ptr().cast(),
                self.dst.as_mut_ptr().cast(),
                vram.owner(),
                select.flags(compound),
                fault_page,
            )
        };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(())
    }

    /// migrate_vma_pages() then migrate_vma_finalize(), after a setup.
    fn pages_and_finalize(&mut self) {
        self.pages();
        self.finalize();
    }

    /// migrate_vma_pages(): migrates the entries with a dst page.
    fn pages(&mut self) {
        // SAFETY: called after a successful setup (every caller does).
        unsafe { shim::migrate_vma_pages(self.args.as_ptr()) }
    }

    /// migrate_vma_finalize(): ends the migration, unlocking the pages.
    fn finalize(&mut self) {
        // SAFETY: called after a successful setup (every caller does).
        unsafe { shim::migrate_vma_finalize(self.args.as_ptr()) }
    }

    /// [`device_range`] into the src array.
    fn device_range(&mut self, start_pfn: u64, n: usize) -> Result {
        device_range(self.src_dst(n).0, start_pfn)
    }

    /// [`device_finish`] of a [`MigrateArgs::device_range`] of `n` pages.
    fn device_finish(&mut self, n: usize) {
        let (src, dst) = self.src_dst(n);
        device_finish(src, dst);
    }
}

impl Drop for MigrateArgs {
    fn drop(&mut self) {
        // SAFETY: allocated (kzalloc) by `hmmgpu_migrate_vma_alloc`.
        unsafe { bindings::kfree(self.args.as_ptr().cast()) };
    }
}

/// migrate_device_range(): collects our device pages [start_pfn,
/// start_pfn + src.len()), whichever process owns them, into `src`.
/// Callers only pass ranges of their own device pages.
fn device_range(src: &mut [MigratePfn], start_pfn: u64) -> Result {
    // SAFETY: `src` has room for its length in entries.
    let ret = unsafe {
        shim::migrate_device_range(src.as_mut_ptr().cast(), start_pfn as c_ulong, src.len())
    };
    if ret < 0 {
        return Err(Error::from_errno(ret));
    }
    Ok(())
}

/// migrate_device_pages() and migrate_device_finalize() of a
/// [`device_range`] into `src` (a NONE dst leaves its page where it is).
fn device_finish(src: &mut [MigratePfn], dst: &mut [MigratePfn]) {
    let n = core::cmp::min(src.len(), dst.len());
    // SAFETY: the arrays of a migrate_device_range() call, `n` entries.
    unsafe {
        shim::migrate_device_pages(src.as_mut_ptr().cast(), dst.as_mut_ptr().cast(), n);
        shim::migrate_device_finalize(src.as_mut_ptr().cast(), dst.as_mut_ptr().cast(), n);
    }
}

/// Gives back a device folio prepared for a migration that did not happen.
fn discard_device_folio(entry: MigratePfn) {
    if let Some(page) = entry.page() {
        // SAFETY: `entry` holds a device page or THP we prepared (locked,
        // referenced) that the migration did not take.
        unsafe { page.unlock_put() };
    }
}

/// Fills `dst` with freshly allocated VRAM pages for every migrating entry
/// of `src` and copies (or zero-fills) the data into them with the device.
/// A THP source (MIGRATE_PFN_COMPOUND) gets a 2 MiB VRAM THP, or 512 single
/// pages if that allocation fails (HMM_DMIRROR_FLAG_FAIL_ALLOC fails it
/// once, as in test_hmm; for a single page it leaves the page behind).
///
/// Entries whose copy failed (COPY_ERROR: the failing range and every later
/// one; or the device stopped) get their VRAM page back and a NONE `dst`, so
/// migrate_vma_pages() leaves those pages in system memory, data intact.
/// Returns the number of pages whose copy failed.
fn alloc_and_copy_to_vram(
    gpu: &Gpu,
    vram: &Vram,
    src: &[MigratePfn],
    dst: &mut [MigratePfn],
    fail_alloc: &mut bool,
) -> u64 {
    let mut copies = RangeList::new();
    let mut zeroes = RangeList::new();
    let mut result = Ok(());
    dst.fill(MigratePfn::NONE);
    // Which range moves each prepared entry: (dst index, FILL?, range index).
    let Ok(mut placed) = KVec::<(usize, bool, usize)>::with_capacity(src.len(), GFP_KERNEL) else {
        return 0;
    };
    // Single pages come from one batch allocation (falling back to one by
    // one if the VRAM is too fragmented for the whole batch).
    let singles = src
        .iter()
        .filter(|s| s.is_migrating() && !s.is_compound())
        .count();
    let mut batch = match vram.alloc_batch(singles) {
        Ok(b) => b,
        Err(_) => return 0,
    };
    let mut single = |vram: &Vram| batch.take().map_or_else(|| vram.alloc_page(false), Ok);
    let mut i = 0;
    while i < src.len() && result.is_ok() {
        let s = src[i];
        if !s.is_migrating() {
            i += 1;
            continue;
        }
        // No page: not populated, zero.
        let spage = s.page();
        if spage.is_some_and(|p| p.is_zone_device()) {
            i += 1;
            continue;
        }
        let sphys = spage.map(|p| p.phys());
        let writable = s.is_writable();
        let mut place = |idx: usize,
                         page: PageRef,
                         compound: bool,
                         dst_off: u64,
                         src_off: u64,
                         len: u64|
         -> Result {
            // Set first: on an error below the page is discarded with the rest.
            dst[idx] = MigratePfn::new(page, writable, compound);
            let (fill, range) = match sphys {
                Some(p) => copies
                    .push(p + src_off, dst_off, len as u32, RangeFlags::DST_VRAM)
                    .map(|()| (false, copies.len() - 1))?,
                None => zeroes
                    .push_fill(0, dst_off, len as u32, RangeFlags::DST_VRAM)
                    .map(|()| (true, zeroes.len() - 1))?,
            };
            // Within the capacity reserved above: never allocates.
            placed.push((idx, fill, range), GFP_ATOMIC)?;
            Ok(())
        };
        if s.is_compound() {
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
                result = place(i, page, true, offset, 0, abi::HUGE_PAGE_SIZE);
            } else {
                for j in 0..nr {
                    let Ok((page, offset)) = single(vram) else {
                        break;
                    };
                    result = place(i + j, page, false, offset, j as u64 * PAGE_SIZE, PAGE_SIZE);
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
            result = place(i, page, false, offset, 0, PAGE_SIZE);
        }
        i += 1;
    }
    if result.is_err() {
        // Out of memory preparing the copy: nothing is migrated.
        for d in dst.iter_mut().filter(|d| !d.is_none()) {
            discard_device_folio(*d);
            *d = MigratePfn::NONE;
        }
        return 0;
    }
    // Ranges done in full by each list.
    let copied = gpu.run_partial(Opcode::Copy, &copies).0;
    let filled = gpu.run_partial(Opcode::Fill, &zeroes).0;
    let mut failed = 0;
    for &(idx, fill, range) in placed.iter() {
        if range < if fill { filled } else { copied } {
            continue;
        }
        // Not copied: give the VRAM back, leave the page where it is.
        failed += dst[idx].pages() as u64;
        discard_device_folio(dst[idx]);
        dst[idx] = MigratePfn::NONE;
    }
    failed
}

/// Allocates system pages for every migrating device page of `src` and
/// copies the data back from VRAM. A device THP gets a system THP, or 512
/// single pages if that allocation fails (or `fail_alloc` fails it once).
/// `vma`/`start` place the new pages (NULL for eviction). Returns the number
/// of entries prepared, or an error after which no entry is migrated.
///
/// # Safety
///
/// `vma` is NULL or the VMA being migrated, locked by the caller.
unsafe fn alloc_and_copy_to_ram(
    gpu: &Gpu,
    vram: &Vram,
    vma: *mut bindings::vm_area_struct,
    start: u64,
    src: &[MigratePfn],
    dst: &mut [MigratePfn],
    fail_alloc: &mut bool,
) -> Result<usize> {
    let mut copies = RangeList::new();
    let mut result = Ok(());
    dst.fill(MigratePfn::NONE);
    let mut i = 0;
    while i < src.len() && result.is_ok() {
        let s = src[i];
        let Some(spage) = s.page().filter(|_| s.is_migrating()) else {
            i += 1;
            continue;
        };
        let Some(offset) = vram.offset_of_pfn(spage.pfn()) else {
            i += 1;
            continue;
        };
        let addr = start + i as u64 * PAGE_SIZE;
        let writable = s.is_writable();
        let nr = if s.is_compound() {
            core::cmp::min(HUGE_PAGES, src.len() - i)
        } else {
            1
        };
        if nr > 1 && !core::mem::take(fail_alloc) {
            // SAFETY: `vma` is NULL or locked, per this function's contract.
            if let Some(thp) = unsafe { PageRef::alloc_locked(vma, addr, HUGE_ORDER) } {
                dst[i] = MigratePfn::new(thp, writable, true);
                result = copies.push(
                    offset,
                    thp.phys(),
                    abi::HUGE_PAGE_SIZE as u32,
                    RangeFlags::SRC_VRAM,
                );
                i += nr;
                continue;
            }
        }
        for j in 0..nr {
            let a = addr + j as u64 * PAGE_SIZE;
            // SAFETY: as above.
            let Some(page) = (unsafe { PageRef::alloc_locked(vma, a, 0) }) else {
                result = Err(ENOMEM);
                break;
            };
            dst[i + j] = MigratePfn::new(page, writable, false);
            result = copies.push(
                offset + j as u64 * PAGE_SIZE,
                page.phys(),
                PAGE_SIZE as u32,
                RangeFlags::SRC_VRAM,
            );
            if result.is_err() {
                break;
            }
        }
        i += nr;
    }
    let result = result.and_then(|()| gpu.run(Opcode::Copy, &copies).map(|_| ()));
    let prepared = dst.iter().filter(|d| !d.is_none()).count();
    if let Err(e) = result {
        for d in dst.iter_mut().filter(|d| !d.is_none()) {
            if let Some(page) = d.page() {
                // SAFETY: a locked system page or THP allocated above.
                unsafe { page.unlock_put() };
            }
            *d = MigratePfn::NONE;
        }
        return Err(e);
    }
    Ok(prepared)
}

/// Counts the entries the core actually migrated.
fn migrated(src: &[MigratePfn]) -> u64 {
    src.iter()
        .filter(|s| s.is_valid() && s.is_migrating())
        .count() as u64
}

/// Walks the VMAs of [start, end) of `mm` in page-table-sized steps, under
/// the mmap read lock: `step` gets each readable VMA and the part of the
/// range in it (at most `max_pages()` pages). EINVAL at a hole or an
/// unreadable VMA.
fn for_each_step(
    mm: &MmWithUser,
    start: u64,
    end: u64,
    mut step: impl FnMut(&VmaRef, u64, u64) -> Result,
) -> Result {
    let guard = mm.mmap_read_lock();
    let mut addr = start;
    while addr < end {
        let vma = guard
            .vma_lookup(addr as usize)
            .filter(|vma| vma.flags() & kernel::mm::virt::flags::READ != 0)
            .ok_or(EINVAL)?;
        let next = core::cmp::min(end, addr + max_pages() as u64 * PAGE_SIZE);
        let next = core::cmp::min(next, vma.end() as u64);
        step(vma, addr, next)?;
        addr = next;
    }
    Ok(())
}

/// Migrates the pages of [start, end) of `mm` to VRAM. Pages that cannot be
/// migrated (no VRAM, copy failed, pinned) stay in system memory. Returns the
/// number of pages now in VRAM and the number whose copy failed.
///
/// `map` gets the MAP ranges (device virtual = process virtual) of the pages
/// migrated by each step and the step's end, called before
/// migrate_vma_finalize() while the
/// pages are still locked, so the device mapping is in place before any CPU
/// access can move them again.
pub(crate) fn to_device(
    gpu: &Gpu,
    vram: &Vram,
    mm: &MmWithUser,
    start: u64,
    end: u64,
    fail_alloc: &mut bool,
    mut map: impl FnMut(&RangeList, u64) -> Result,
) -> Result<(u64, u64)> {
    let mut args = MigrateArgs::new()?;
    let mut moved = 0;
    let mut failed = 0;
    for_each_step(mm, start, end, |vma, s, e| {
        let n = ((e - s) / PAGE_SIZE) as usize;
        // SAFETY: `vma` is locked by `for_each_step`; [s, e) is in it.
        unsafe {
            args.setup(
                vma.as_ptr(),
                s,
                e,
                vram,
                Select::System,
                true,
                ptr::null_mut(),
            )?
        };
        let (src, dst) = args.src_dst(n);
        failed += alloc_and_copy_to_vram(gpu, vram, src, dst, fail_alloc);
        args.pages();
        let (src, dst) = args.src_dst(n);
        let mut list = RangeList::new();
        let mut result = Ok(());
        for (i, (sp, dp)) in src.iter().zip(dst.iter()).enumerate() {
            let Some(page) = dp.page().filter(|_| sp.is_migrating()) else {
                continue;
            };
            moved += 1;
            let Some(offset) = vram.offset_of_pfn(page.pfn()) else {
                continue;
            };
            let mut flags = RangeFlags::SRC_VRAM | RangeFlags::MAP_READ;
            if sp.is_writable() {
                flags |= RangeFlags::MAP_WRITE;
            }
            // A THP is mapped by one huge device MMU entry.
            let len = if dp.is_compound() {
                flags |= RangeFlags::MAP_HUGE;
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
            result = map(&list, e);
        }
        args.finalize();
        result
    })?;
    Ok((moved, failed))
}

/// Migrates this GPU's pages in [start, end) of `mm` back to system memory.
pub(crate) fn to_system(
    gpu: &Gpu,
    vram: &Vram,
    mm: &MmWithUser,
    start: u64,
    end: u64,
    fail_alloc: &mut bool,
) -> Result<u64> {
    let mut args = MigrateArgs::new()?;
    let mut moved = 0;
    for_each_step(mm, start, end, |vma, s, e| {
        let n = ((e - s) / PAGE_SIZE) as usize;
        // SAFETY: `vma` is locked by `for_each_step`; [s, e) is in it.
        unsafe {
            args.setup(
                vma.as_ptr(),
                s,
                e,
                vram,
                Select::Device(vram.kind()),
                true,
                ptr::null_mut(),
            )?
        };
        let (src, dst) = args.src_dst(n);
        // SAFETY: `vma` is locked by `for_each_step`.
        let copied =
            unsafe { alloc_and_copy_to_ram(gpu, vram, vma.as_ptr(), s, src, dst, fail_alloc) };
        // On a failed copy every dst is NONE and the pages stay where they are.
        args.pages();
        moved += migrated(args.src_dst(n).0);
        args.finalize();
        copied.map(|_| ())
    })?;
    Ok(moved)
}

/// `dev_pagemap_ops.migrate_to_ram` (see ffi.rs): a CPU touched a page of
/// `vram` in VRAM. Migrates it (a PMD-mapped THP whole, as test_hmm does)
/// back to system memory.
///
/// # Safety
///
/// `vmf` is the fault being handled, on one of `vram`'s device pages.
pub(crate) unsafe fn migrate_to_ram(
    gpu: &Gpu,
    vram: &Vram,
    vmf: *mut bindings::vm_fault,
) -> bindings::vm_fault_t {
    let mut addr = 0;
    // SAFETY: `vmf` is the fault being handled.
    let vma = unsafe { shim::hmmgpu_vm_fault_vma(vmf, &mut addr) };
    // SAFETY: as above.
    let (page, pte) = unsafe { ((*vmf).page, (*vmf).pte) };
    // SAFETY: the faulting device page, held by the fault handler.
    let Some(fault_page) = (unsafe { PageRef::from_raw(page) }) else {
        return bindings::vm_fault_reason_VM_FAULT_SIGBUS as bindings::vm_fault_t;
    };
    // A THP mapped by a PMD comes back whole; one mapped by PTEs per page.
    let order = if pte.is_null() {
        fault_page.folio_nr_pages().trailing_zeros()
    } else {
        0
    };
    let addr = addr as u64 & !(PAGE_SIZE - 1);
    let span = PAGE_SIZE << order;
    let addr = addr & !(span - 1);
    let n = 1usize << order;
    let sigbus = bindings::vm_fault_reason_VM_FAULT_SIGBUS as bindings::vm_fault_t;
    let oom = bindings::vm_fault_reason_VM_FAULT_OOM as bindings::vm_fault_t;
    let Ok(mut args) = MigrateArgs::new() else {
        return oom;
    };
    // SAFETY: the fault handler holds the VMA's lock; one page or one THP.
    if unsafe {
        args.setup(
            vma,
            addr,
            addr + span,
            vram,
            Select::Device(vram.kind()),
            order > 0,
            page,
        )
    }
    .is_err()
    {
        return sigbus;
    }
    let (src, dst) = args.src_dst(n);
    // SAFETY: the fault handler holds the VMA's lock.
    let result = unsafe { alloc_and_copy_to_ram(gpu, vram, vma, addr, src, dst, &mut false) };
    args.pages_and_finalize();
    match result {
        Ok(_) => 0,
        Err(ENOMEM) => oom,
        Err(_) => {
            gpu_err!(gpu, "copy from VRAM failed in a CPU fault at {:#x}\n", addr);
            sigbus
        }
    }
}

/// Migrates every page still in this share of the GPU's VRAM back to system
/// memory, whichever process owns it. Returns the number of pages evicted.
pub(crate) fn evict_all(gpu: &Gpu, vram: &Vram) -> u64 {
    let Ok(mut args) = MigrateArgs::new() else {
        gpu_err!(gpu, "no memory to evict VRAM\n");
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

/// Poisons every page of the system pages (or THPs) in `dst` that now stand
/// for migrating entries of `src`, so their owners get SIGBUS rather than a
/// page of 0xff (see [`LOST_FILL`]).
fn poison_stand_ins(gpu: &Gpu, src: &[MigratePfn], dst: &[MigratePfn]) {
    for (s, d) in src.iter().zip(dst.iter()) {
        let Some(page) = d.page().filter(|_| s.is_migrating()) else {
            continue;
        };
        let first = page.pfn();
        for pfn in first..first + d.pages() as u64 {
            // A system page of ours, now mapped by its owner
            // (memory_failure splits a THP first).
            if let Err(e) = pages::poison_pfn(pfn) {
                gpu_err!(gpu, "poisoning pfn {:#x} failed: {}\n", pfn, e.to_errno());
            }
        }
    }
}

/// Migrates the device pages [start_pfn, start_pfn + n) of `vram` (n at most
/// `max_pages()`) to system memory, whichever process owns them, copied by
/// the device. If the copy fails: with `must_leave` (removal) or once the
/// device is lost, as [`evict_without_device`] does, poisoning what is
/// lost; otherwise nothing moves. `args` keeps the src/dst arrays.
fn evict_pfns(
    gpu: &Gpu,
    vram: &Vram,
    args: &mut MigrateArgs,
    start_pfn: u64,
    n: usize,
    must_leave: bool,
) -> Eviction {
    if let Err(e) = args.device_range(start_pfn, n) {
        gpu_err!(gpu, "migrate_device_range failed: {}\n", e.to_errno());
        return Eviction {
            pages: 0,
            lost: false,
        };
    }
    let (src, dst) = args.src_dst(n);
    let mut lost = false;
    // SAFETY: no VMA: eviction allocates anywhere.
    let copied =
        unsafe { alloc_and_copy_to_ram(gpu, vram, ptr::null_mut(), 0, src, dst, &mut false) };
    if let Err(e) = copied {
        if must_leave || gpu.is_lost() {
            // Through a failed link the CPU would copy all-ones, not VRAM.
            let cpu_reads_vram = vram.kind() == MemKind::Coherent && !gpu.is_link_down();
            let (saved, gone) = evict_without_device(vram, cpu_reads_vram, src, dst);
            gpu_err!(gpu, "eviction copy failed ({:?}): {} {} pages copied by the CPU, {} pages lost with the device\n", e,
                saved,
                vram.kind().name(),
                gone);
            lost = gone > 0;
        }
    }
    args.device_finish(n);
    let (src, dst) = args.src_dst(n);
    let pages = dst
        .iter()
        .filter(|d| !d.is_none())
        .map(|d| d.pages() as u64)
        .sum::<u64>();
    if lost {
        // Now mapped where the VRAM pages were.
        poison_stand_ins(gpu, src, dst);
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
pub(crate) fn evict_corrupt_folio(
    gpu: &Gpu,
    vram: &Vram,
    head: u64,
    nr: usize,
    pfn: u64,
) -> Result<CorruptFolio> {
    let idx = pfn
        .checked_sub(head)
        .map(|i| i as usize)
        .filter(|i| *i < nr && nr <= max_pages())
        .ok_or(EINVAL)?;
    let mut args = MigrateArgs::new()?;
    let eviction = evict_pfns(gpu, vram, &mut args, head, nr, false);
    if eviction.lost {
        return Ok(CorruptFolio::Lost);
    }
    let (src, dst) = args.src_dst(nr);
    // A THP moves whole (entry 0, compound), single pages each on their own.
    let entry = if src[0].is_compound() { 0 } else { idx };
    let Some(sys) = dst[entry].page().filter(|_| src[entry].is_migrating()) else {
        return Ok(CorruptFolio::NotMoved);
    };
    // The system page (or the page of the THP) that now holds the data.
    let sys = sys.pfn() + (idx - entry) as u64;
    if let Err(e) = pages::poison_pfn(sys) {
        gpu_err!(gpu, "poisoning pfn {:#x} failed: {}\n", sys, e.to_errno());
    }
    Ok(CorruptFolio::Moved)
}

/// What a page standing in for lost VRAM holds until it is poisoned: not
/// zero, or splitting its THP (memory_failure does) would map the shared
/// zero page in its place and the loss would read as zeroes instead of
/// raising SIGBUS.
const LOST_FILL: u8 = 0xff;

/// A system page (`order` 0, never `None`) or THP standing in for VRAM
/// whose data is lost, filled with [`LOST_FILL`], locked for the migration.
fn lost_stand_in(order: u32) -> Option<PageRef> {
    // SAFETY: no VMA: anywhere; order 0 does not fail.
    let page = unsafe { PageRef::alloc_locked(ptr::null_mut(), 0, order) }?;
    // SAFETY: a page (or THP) we just allocated.
    unsafe { page.fill(order, LOST_FILL) };
    Some(page)
}

/// Eviction once the device cannot copy (it is lost): device-coherent pages
/// are copied by the CPU through the BAR if `cpu_reads_vram` (the link is
/// up); otherwise their data, like device-private data, is gone with the
/// device, and the pages get fresh system pages that the caller poisons
/// after the migration. Fills `dst`; returns (pages copied, pages lost).
fn evict_without_device(
    vram: &Vram,
    cpu_reads_vram: bool,
    src: &[MigratePfn],
    dst: &mut [MigratePfn],
) -> (u64, u64) {
    let coherent = vram.kind() == MemKind::Coherent;
    let (mut saved, mut gone) = (0, 0);
    let mut i = 0;
    while i < src.len() {
        let s = src[i];
        let Some(spage) = s
            .page()
            .filter(|p| s.is_migrating() && vram.offset_of_pfn(p.pfn()).is_some())
        else {
            i += 1;
            continue;
        };
        if s.is_compound() && !coherent {
            // A device THP needs a system THP: eviction (no VMA) cannot
            // split it into small pages.
            let nr = core::cmp::min(HUGE_PAGES, src.len() - i);
            if let Some(thp) = lost_stand_in(HUGE_ORDER) {
                dst[i] = MigratePfn::new(thp, s.is_writable(), true);
                gone += nr as u64;
            }
            i += nr;
            continue;
        }
        let page = if cpu_reads_vram {
            // SAFETY: no VMA: eviction allocates anywhere.
            unsafe { PageRef::alloc_locked(ptr::null_mut(), 0, 0) }
        } else {
            lost_stand_in(0)
        };
        // No page: it stays in VRAM (unmapping the memory waits for it).
        if let Some(page) = page {
            if cpu_reads_vram {
                // SAFETY: a coherent page is in the direct map; `page` is ours.
                unsafe { page.copy_from(spage) };
                saved += 1;
            } else {
                gone += 1;
            }
            dst[i] = MigratePfn::new(page, s.is_writable(), false);
        }
        i += 1;
    }
    (saved, gone)
}

/// `dev_pagemap_ops.memory_failure` of device-coherent VRAM (see ffi.rs): a
/// machine check on BAR pages (the kernel's generic handler does nothing for
/// MEMORY_DEVICE_COHERENT), or an ECC error the ECC work hands over
/// (ecc.rs). Their data is corrupt: each mapped page moves to a fresh system
/// page filled with [`LOST_FILL`], which is then poisoned, so its owners get
/// SIGBUS on their next touch instead of reading anything; other pages are
/// untouched. The poisoning is queued: this runs inside memory_failure(),
/// which holds its mutex. The VRAM pages are retired. Runs in process
/// context.
pub(crate) fn memory_failure(gpu: &Gpu, vram: &Vram, pfn: u64, nr_pages: u64) {
    let mut moved = 0;
    for p in pfn..pfn + nr_pages {
        let Some(offset) = vram.offset_of_pfn(p) else {
            continue;
        };
        let (mut src, mut dst) = ([MigratePfn::NONE; 1], [MigratePfn::NONE; 1]);
        if let Err(e) = device_range(&mut src, p) {
            gpu_err!(
                gpu,
                "memory failure at pfn {:#x}: cannot unmap it: {}\n",
                p,
                e.to_errno()
            );
        } else {
            let mut stand_in = None;
            if src[0].is_migrating() && src[0].page().is_some() {
                stand_in = lost_stand_in(0);
                if let Some(page) = stand_in {
                    dst[0] = MigratePfn::new(page, src[0].is_writable(), false);
                }
            }
            // A NONE dst: nothing moves.
            device_finish(&mut src, &mut dst);
            if let Some(page) = stand_in.filter(|_| src[0].is_migrating()) {
                // Now mapped where the VRAM page was.
                pages::poison_pfn_later(page.pfn());
                moved += 1;
            }
        }
        // Whether or not its data moved: the page must not be used again.
        vram.retire_and_log(offset, "memory failure");
    }
    gpu_err!(gpu, "memory failure on {} device-coherent page(s) at pfn {:#x}: {} moved to poisoned system pages\n", nr_pages,
        pfn,
        moved);
}
