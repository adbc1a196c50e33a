// SPDX-License-Identifier: GPL-2.0

//! Mirroring a process address space: one `Mirror` per open file of the
//! uAPI. The device accesses the process's memory at the addresses
//! hmm_range_fault() resolves, under an mmu_interval_notifier so that an
//! invalidation never races with a device access.

use crate::abi::{Opcode, Range, RangeFlags, Status, PAGE_SIZE};
use crate::compat;
use crate::gpu::{Gpu, Replay};
use crate::migrate;
use crate::pages::{HmmPfn, PageKind, PageRef};
use crate::queue::{Command, Detached, RangeList};
use crate::shim::{self, c_const};
use crate::vram::{MemKind, Vram};
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::bindings;
use kernel::ffi::c_ulong;
use kernel::mm::{Mm, MmWithUser};
use kernel::new_mutex;
use kernel::prelude::*;
use kernel::sync::aref::ARef;
use kernel::sync::{Arc, Mutex};
use kernel::time::{Instant, Monotonic};
use kernel::types::Opaque;
use kernel::uaccess::{UserPtr, UserSlice};

/// Pages per hmm_range_fault() step.
const STEP_PAGES: usize = 64;

/// Per-mirror state protected by the mirror lock.
pub(crate) struct MirrorState {
    /// HMM_DMIRROR_FLAG_* set with HMM_DMIRROR_FLAGS.
    pub(crate) flags: u64,
    /// Bounds of every device MMU translation made since the last full
    /// invalidation: invalidations outside them need no UNMAP.
    mapped: Option<(u64, u64)>,
    /// Set while this mirror migrates pages to VRAM: the invalidation of
    /// that migration must keep existing translations (the pages it moves
    /// get new ones before their migration completes), as test_hmm does.
    migrating_to_device: bool,
    /// Pages mapped for device atomics by EXCLUSIVE (process virtual
    /// addresses), until an invalidation revokes them.
    atomic: KVec<u64>,
    /// The UNMAP command of invalidations, allocated at open (None while in
    /// use, or lost to a device that never completed it).
    unmap_cmd: Option<Command>,
    /// That command while the device runs it with nobody waiting: the UNMAP
    /// of a migration of this GPU's own pages (see `Mirror::invalidate`).
    unmap_pending: Option<Detached>,
}

/// Ranges of the preallocated UNMAP command (each up to 4 GiB).
const UNMAP_RANGES: usize = 16;

/// How often one chunk of a device access is run again after the device
/// completed it with an unreported fault (see `Mirror::access`).
const MAX_UNREPORTED_FAULTS: u32 = 64;

/// What a device access does when it faults.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultPolicy {
    /// Resolve with hmm_range_fault() (mmap lock held throughout).
    Resolve,
    /// Resolve with hmm_range_fault_unlocked_timeout() (READ_UNLOCKED).
    ResolveUnlocked,
    /// Fail with ENOENT: only what the device already maps is accessible.
    Refuse,
    /// As `Refuse`, except that this GPU's own VRAM pages are mapped again
    /// without faulting anything in: after a device reset recreated the
    /// context empty, what a migration moved and mapped is accessible still.
    RemapOwn,
}

impl MirrorState {
    fn note_mapped(&mut self, start: u64, end: u64) {
        self.mapped = Some(match self.mapped {
            Some((s, e)) => (core::cmp::min(s, start), core::cmp::max(e, end)),
            None => (start, end),
        });
    }

    fn overlaps_mapped(&self, start: u64, end: u64) -> bool {
        matches!(self.mapped, Some((s, e)) if start < e && s < end)
    }
}

/// Result counters of one uAPI command.
#[derive(Default)]
pub(crate) struct Counts {
    /// Pages processed.
    pub(crate) cpages: u64,
    /// Device faults (hmm_range_fault calls) needed.
    pub(crate) faults: u64,
}

/// A process address space mirrored by one GPU.
#[pin_data(PinnedDrop)]
pub(crate) struct Mirror {
    pub(crate) gpu: Arc<Gpu>,
    /// The personality (device-private or device-coherent VRAM).
    kind: MemKind,
    /// The device MMU context mirroring this address space.
    ctx: u32,
    /// The mmu_interval_notifier over the whole address space, inserted
    /// once the mirror is pinned (then `notifying`), removed on drop.
    #[pin]
    notifier: Notifier,
    notifying: AtomicBool,
    /// Held across every device access to the mirrored pages and by the
    /// invalidation callback: an invalidation waits for accesses in flight.
    #[pin]
    pub(crate) state: Mutex<MirrorState>,
}

/// A `struct mmu_interval_notifier`, filled by its insertion.
#[repr(transparent)]
struct Notifier(Opaque<bindings::mmu_interval_notifier>);

// SAFETY: the kernel's notifier may be used (removed, read) from any thread.
unsafe impl Send for Notifier {}
// SAFETY: as above; the kernel serializes its own use of it.
unsafe impl Sync for Notifier {}

/// A vmalloc'd, page-aligned buffer the device reads or writes page by page
/// at guest-physical addresses.
struct Bounce {
    buf: VVec<u8>,
}

impl Bounce {
    fn new(pages: usize) -> Result<Self> {
        let mut buf = VVec::with_capacity(pages * PAGE_SIZE as usize, GFP_KERNEL)?;
        buf.extend_with(pages * PAGE_SIZE as usize, 0u8, GFP_KERNEL)?;
        Ok(Self { buf })
    }

    /// The VREAD (device virtual -> here) or VWRITE (here -> device
    /// virtual) ranges of `npages` at `addr`, a page each.
    fn access_list(&mut self, op: Opcode, addr: u64, npages: u64) -> Result<RangeList> {
        let mut list = RangeList::new();
        for i in 0..npages as usize {
            let va = addr + i as u64 * PAGE_SIZE;
            let buf = self.phys(i);
            if op == Opcode::Vwrite {
                list.push(buf, va, PAGE_SIZE as u32, RangeFlags::NONE)?;
            } else {
                list.push(va, buf, PAGE_SIZE as u32, RangeFlags::NONE)?;
            }
        }
        Ok(list)
    }

    /// Copies the buffer out to user `ptr`.
    fn copy_out(&self, ptr: u64) -> Result {
        let mut out = UserSlice::new(UserPtr::from_addr(ptr as usize), self.buf.len()).writer();
        out.write_slice(&self.buf)
    }

    fn phys(&mut self, page: usize) -> u64 {
        let addr = self
            .buf
            .as_mut_ptr()
            .wrapping_add(page * PAGE_SIZE as usize);
        // SAFETY: `addr` is inside the vmalloc'd buffer.
        let pfn = unsafe { kernel::bindings::vmalloc_to_pfn(addr.cast()) };
        pfn as u64 * PAGE_SIZE + (addr as u64 & (PAGE_SIZE - 1))
    }
}

impl Mirror {
    /// Mirrors the calling process's address space for `gpu`.
    pub(crate) fn new(gpu: Arc<Gpu>, kind: MemKind) -> Result<Pin<KBox<Self>>> {
        gpu.check_alive()?;
        let current = kernel::current!();
        let mm = current.mm().ok_or(EINVAL)?;
        let unmap_cmd = Command::with_capacity(UNMAP_RANGES)?;
        let ctx = gpu.ctx_create()?;
        let gpu2 = gpu.clone();
        let mirror = KBox::pin_init(
            try_pin_init!(Mirror {
                gpu: gpu2,
                kind,
                ctx,
                notifier: Notifier(Opaque::uninit()),
                notifying: AtomicBool::new(false),
                state <- new_mutex!(MirrorState {
                    flags: 0,
                    mapped: None,
                    migrating_to_device: false,
                    atomic: KVec::new(),
                    unmap_cmd: Some(unmap_cmd),
                    unmap_pending: None,
                }),
            }),
            GFP_KERNEL,
        )
        .inspect_err(|_| gpu.ctx_destroy(ctx))?;
        // SAFETY: the notifier is pinned in `mirror`, which removes it
        // before it goes (drop); `mm` is the caller's, alive.
        let ret = unsafe {
            bindings::mmu_interval_notifier_insert(
                mirror.notifier(),
                mm.as_raw(),
                0,
                c_ulong::MAX & !(PAGE_SIZE as c_ulong - 1),
                &raw const shim::hmmgpu_notifier_ops,
            )
        };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        mirror.notifying.store(true, Ordering::Release);
        Ok(mirror)
    }

    /// This mirror's share of the VRAM.
    pub(crate) fn vram(&self) -> &Vram {
        self.gpu.vram(self.kind)
    }

    /// The mirror of the notifier the kernel calls back with.
    ///
    /// # Safety
    ///
    /// `notifier` is the `notifier` of a live `Mirror`.
    pub(crate) unsafe fn of_notifier<'a>(
        notifier: *mut bindings::mmu_interval_notifier,
    ) -> &'a Mirror {
        let notifier = Opaque::cast_from(notifier).cast::<Notifier>();
        // SAFETY: per this function's contract (`Notifier` is transparent).
        unsafe { &*kernel::container_of!(notifier, Mirror, notifier) }
    }

    fn notifier(&self) -> *mut bindings::mmu_interval_notifier {
        self.notifier.0.get()
    }

    /// The mirrored mm.
    fn mm(&self) -> &Mm {
        // SAFETY: the notifier is inserted for the mirror's whole life (a
        // mirror that failed to insert it is never used) and holds a
        // reference (mmgrab) on its mm.
        unsafe { Mm::from_raw((*self.notifier()).mm) }
    }

    /// Whether the CPU page tables of the range `seq` was taken for
    /// changed since (then its hmm_range_fault() result is stale).
    fn retry(&self, seq: c_ulong) -> bool {
        // SAFETY: the inserted notifier.
        unsafe { shim::hmmgpu_mmu_interval_read_retry(self.notifier(), seq) }
    }

    /// hmm_range_fault() of [start, start + pfns.len() pages): with
    /// `fault`, faulting pages in (`write`: writable), otherwise only a
    /// snapshot; device-private pages of this mirror's VRAM are reported,
    /// not faulted. `unlocked`: with hmm_range_fault_unlocked_timeout(),
    /// which may drop the mmap lock while faulting (needed for
    /// userfaultfd-backed ranges). Retries while the range is being
    /// invalidated, for up to HMM_RANGE_DEFAULT_TIMEOUT, then EBUSY. On
    /// success the notifier sequence to check with [`Mirror::retry`] under
    /// the mirror's lock.
    fn range_fault(
        &self,
        start: u64,
        pfns: &mut [HmmPfn],
        fault: bool,
        write: bool,
        unlocked: bool,
    ) -> Result<c_ulong> {
        let end = start + pfns.len() as u64 * PAGE_SIZE;
        let mut flags = 0;
        if fault {
            flags |= c_const!(hmmgpu_HMM_PFN_REQ_FAULT);
        }
        if write {
            flags |= c_const!(hmmgpu_HMM_PFN_REQ_WRITE);
        }
        let owner = self.vram().owner();
        let mut fault = |seq: &mut c_ulong, unlocked: bool| {
            // SAFETY: the inserted notifier; `pfns` has room for the range;
            // the caller holds the mmap lock unless `unlocked`.
            unsafe {
                shim::hmmgpu_hmm_range_fault(
                    self.notifier(),
                    start as c_ulong,
                    end as c_ulong,
                    pfns.as_mut_ptr().cast(),
                    flags,
                    owner,
                    seq,
                    unlocked,
                )
            }
        };
        if unlocked {
            if !compat::HAS_HMM_RANGE_FAULT_UNLOCKED {
                return Err(compat::eopnotsupp());
            }
            let mut seq = 0;
            let ret = fault(&mut seq, true);
            return if ret < 0 {
                Err(Error::from_errno(ret))
            } else {
                Ok(seq)
            };
        }
        let mm = self.mm_user()?;
        let timeout = i64::from(c_const!(hmmgpu_HMM_RANGE_DEFAULT_TIMEOUT));
        let started = Instant::<Monotonic>::now();
        loop {
            if started.elapsed().as_millis() > timeout {
                return Err(EBUSY);
            }
            // SAFETY: the inserted notifier.
            let mut seq = unsafe { bindings::mmu_interval_read_begin(self.notifier()) };
            let ret = {
                let _locked = mm.mmap_read_lock();
                fault(&mut seq, false)
            };
            match ret {
                0 => return Ok(seq),
                ret if ret == EBUSY.to_errno() => continue,
                ret => return Err(Error::from_errno(ret)),
            }
        }
    }

    /// A user reference (mmget) on the mirrored mm for the duration of a
    /// command; EFAULT once the process has exited.
    fn mm_user(&self) -> Result<ARef<MmWithUser>> {
        self.mm().mmget_not_zero().ok_or(EFAULT)
    }

    /// Resolves a device fault as `policy` says: faults [addr, end) of the
    /// process in with hmm_range_fault() and maps it into the device MMU,
    /// with write permission where the CPU has it (`RemapOwn`: maps this
    /// GPU's VRAM pages, ENOENT for anything else). The whole rest of the
    /// access is resolved at once, as test_hmm does, so one access faults
    /// once.
    fn resolve(
        &self,
        addr: u64,
        end: u64,
        write: bool,
        policy: FaultPolicy,
        mut replay: Option<&mut Replay>,
    ) -> Result {
        let (fault, unlocked) = match policy {
            FaultPolicy::Resolve => (true, false),
            FaultPolicy::ResolveUnlocked => (true, true),
            FaultPolicy::RemapOwn => (false, false),
            FaultPolicy::Refuse => return Err(ENOENT),
        };
        let own_only = policy == FaultPolicy::RemapOwn;
        let mut start = addr & !(PAGE_SIZE - 1);
        let mut pfns = [HmmPfn::default(); STEP_PAGES];
        while start < end {
            let step_end = core::cmp::min(end, start + STEP_PAGES as u64 * PAGE_SIZE);
            let n = ((step_end - start) / PAGE_SIZE) as usize;
            loop {
                let seq = self.range_fault(start, &mut pfns[..n], fault, write, unlocked)?;
                // Everything is allocated before the lock: the notifier
                // takes it, and memory reclaim can wait for the notifier.
                let mut map = RangeList::new();
                for (i, entry) in pfns[..n].iter().enumerate() {
                    let translated = self.translation(*entry);
                    let own = matches!(translated, Ok((_, f)) if f.contains(RangeFlags::SRC_VRAM));
                    if own_only && !own {
                        return Err(ENOENT);
                    }
                    let (target, flags) = translated?;
                    map.push(
                        target,
                        start + i as u64 * PAGE_SIZE,
                        PAGE_SIZE as u32,
                        flags,
                    )?;
                }
                let cmds = self.gpu.prepare(Opcode::Map, self.ctx, &map)?;
                let mut state = self.state.lock();
                if self.retry(seq) {
                    continue;
                }
                // The last step's MAP takes the REPLAY along.
                match replay.as_deref_mut().filter(|_| step_end == end) {
                    Some(replay) => replay.run_behind(&self.gpu, cmds)?,
                    None => self.gpu.run_prepared(cmds)?,
                };
                state.note_mapped(start, step_end);
                break;
            }
            start = step_end;
        }
        Ok(())
    }

    /// The device MMU target and MAP flags for an hmm_pfns entry.
    fn translation(&self, entry: HmmPfn) -> Result<(u64, RangeFlags)> {
        let page = entry.mapped(self.vram().owner()).ok_or(EFAULT)?;
        let mut flags = RangeFlags::MAP_READ;
        if page.writable {
            flags |= RangeFlags::MAP_WRITE;
        }
        // This GPU's pages (either personality) by VRAM offset; device-
        // private pages of other owners are faulted to RAM by hmm.
        if let Some(offset) = self.gpu.vram_offset_of_pfn(page.pfn) {
            return Ok((offset, flags | RangeFlags::SRC_VRAM));
        }
        if page.kind == PageKind::DevicePrivate {
            return Err(EFAULT);
        }
        Ok((page.pfn * PAGE_SIZE, flags))
    }

    /// Runs a VREAD or VWRITE of `npages` at `addr` against the bounce
    /// buffer, resolving device faults as they come.
    fn access(
        &self,
        op: Opcode,
        addr: u64,
        npages: u64,
        bounce: &mut Bounce,
        counts: &mut Counts,
        policy: FaultPolicy,
    ) -> Result {
        let end = addr + npages * PAGE_SIZE;
        let write = op == Opcode::Vwrite;
        let list = bounce.access_list(op, addr, npages)?;
        for chunk in list.chunks() {
            let mut unreported = 0;
            let resp = loop {
                let resp = self.gpu.execute_mmu(
                    op,
                    self.ctx,
                    chunk,
                    &mut counts.faults,
                    |fault, replay| self.resolve(fault.addr, end, write, policy, Some(replay)),
                )?;
                // A fault the device could not report (no free event buffer,
                // e.g. during an event storm) completes the command with
                // FAULT at once: resolve from the failing range on and run
                // the chunk again (VREAD/VWRITE are plain copies), a bounded
                // number of times.
                if resp.status != Status::Fault || unreported == MAX_UNREPORTED_FAULTS {
                    break resp;
                }
                if policy == FaultPolicy::Refuse {
                    return Err(ENOENT);
                }
                let failed = chunk.get(resp.failed_index as usize).ok_or(EIO)?;
                self.resolve(
                    if write { failed.dst } else { failed.src },
                    end,
                    write,
                    policy,
                    None,
                )?;
                counts.faults += 1;
                unreported += 1;
            };
            if resp.status != Status::Ok {
                gpu_err!(self.gpu, "device access failed: {}\n", resp.status.name());
                return Err(EIO);
            }
        }
        Ok(())
    }

    /// The preallocated UNMAP command, once the device is done with it.
    fn unmap_cmd(&self, state: &mut MirrorState) -> Result<Command> {
        if let Some(pending) = state.unmap_pending.take() {
            let (resp, cmd) = self.gpu.reap(pending)?;
            if resp.status != Status::Ok {
                gpu_warn!(self.gpu, "UNMAP failed: {}\n", resp.status.name());
            }
            return Ok(cmd);
        }
        state.unmap_cmd.take().ok_or(ENODEV)
    }

    /// Removes the device MMU translations of [start, end) with the
    /// preallocated UNMAP command, in rounds of [`UNMAP_RANGES`] ranges.
    /// `detach`: the last round is submitted and not waited for (the next
    /// user of the command waits), for a caller whose next command on this
    /// GPU's queue is waited for before the pages it unmaps can be freed:
    /// the device completes commands in order.
    fn unmap(&self, state: &mut MirrorState, start: u64, end: u64, detach: bool) -> Result {
        let max_len = u64::from(u32::MAX) & !(PAGE_SIZE - 1);
        let mut s = start;
        while s < end {
            let mut ranges = [Range::default(); UNMAP_RANGES];
            let mut n = 0;
            while n < UNMAP_RANGES && s < end {
                let len = core::cmp::min(end - s, max_len);
                ranges[n] = Range::new(0, s, len as u32, RangeFlags::NONE);
                n += 1;
                s += len;
            }
            let mut cmd = self.unmap_cmd(state)?;
            cmd.encode(Opcode::Unmap, self.ctx, self.gpu.tag(), &ranges[..n])?;
            if detach && s >= end {
                state.unmap_pending = Some(self.gpu.submit_detached(cmd)?);
                return Ok(());
            }
            let (resp, cmd) = self.gpu.execute_cmd(cmd)?;
            state.unmap_cmd = Some(cmd);
            if resp.status != Status::Ok {
                return Err(EIO);
            }
        }
        Ok(())
    }

    /// HMM_DMIRROR_READ: the device reads `npages` at `addr` into user `ptr`.
    pub(crate) fn read(
        &self,
        addr: u64,
        ptr: u64,
        npages: u64,
        policy: FaultPolicy,
    ) -> Result<Counts> {
        self.gpu.check_alive()?;
        let _mm = self.mm_user()?;
        let mut bounce = Bounce::new(npages as usize)?;
        let mut counts = Counts::default();
        self.access(
            Opcode::Vread,
            addr,
            npages,
            &mut bounce,
            &mut counts,
            policy,
        )?;
        bounce.copy_out(ptr)?;
        counts.cpages = npages;
        Ok(counts)
    }

    /// HMM_DMIRROR_WRITE: the device writes user `ptr` into `npages` at `addr`.
    pub(crate) fn write(&self, addr: u64, ptr: u64, npages: u64) -> Result<Counts> {
        self.gpu.check_alive()?;
        let _mm = self.mm_user()?;
        let mut bounce = Bounce::new(npages as usize)?;
        let mut input = UserSlice::new(
            UserPtr::from_addr(ptr as usize),
            (npages * PAGE_SIZE) as usize,
        )
        .reader();
        input.read_slice(&mut bounce.buf)?;
        let mut counts = Counts::default();
        self.access(
            Opcode::Vwrite,
            addr,
            npages,
            &mut bounce,
            &mut counts,
            FaultPolicy::Resolve,
        )?;
        counts.cpages = npages;
        Ok(counts)
    }

    /// HMM_DMIRROR_MIGRATE_TO_DEV: migrates the range to VRAM, maps what
    /// moved into the device MMU, and returns the range as the device sees
    /// it in user `ptr`; like test_hmm, ENOENT if a page is not accessible
    /// to the device without faulting (it was not migrated). EIO if the
    /// device's copy engine failed for some pages: those stay in system
    /// memory with their data, the others are in VRAM (SNAPSHOT tells).
    pub(crate) fn migrate_to_device(&self, addr: u64, ptr: u64, npages: u64) -> Result<Counts> {
        self.gpu.check_alive()?;
        let generation = self.gpu.reset_generation();
        let mm = self.mm_user()?;
        let end = addr + npages * PAGE_SIZE;
        // The read-back of a migration that fits one step and one command
        // is submitted right behind the last MAP, before
        // migrate_vma_finalize(): the device maps and reads in one round
        // trip (it executes commands in order; the VRAM holds the data
        // since the COPY).
        let max_early = core::cmp::min(migrate::max_pages(), crate::abi::MAX_RANGES as usize);
        let (early_bounce, mut early_read) = if npages as usize <= max_early {
            let mut bounce = Bounce::new(npages as usize)?;
            let list = bounce.access_list(Opcode::Vread, addr, npages)?;
            let ranges = list.chunks().next().ok_or(EINVAL)?;
            let read = self.gpu.prepare_mmu(Opcode::Vread, self.ctx, ranges)?;
            (Some(bounce), Some(read))
        } else {
            (None, None)
        };
        let mut submitted = None;
        let mut fail_alloc = {
            let mut state = self.state.lock();
            let fail = state.flags & crate::uapi::HMM_DMIRROR_FLAG_FAIL_ALLOC != 0;
            state.flags &= !crate::uapi::HMM_DMIRROR_FLAG_FAIL_ALLOC;
            state.migrating_to_device = true;
            fail
        };
        let result = migrate::to_device(
            &self.gpu,
            self.vram(),
            &mm,
            addr,
            end,
            &mut fail_alloc,
            |map, step_end| {
                let mut cmds = self.gpu.prepare(Opcode::Map, self.ctx, map)?;
                let mut state = self.state.lock();
                match early_read.take_if(|_| step_end == end && !cmds.is_empty()) {
                    Some(read) => {
                        let last = cmds.pop().ok_or(EINVAL)?;
                        self.gpu.run_prepared(cmds)?;
                        let map = self.gpu.submit_detached(last)?;
                        // Not submitted (e.g. a reset began): read after.
                        submitted = self.gpu.submit_mmu(read).ok();
                        let (resp, _) = self.gpu.reap(map)?;
                        self.gpu.check(&resp)?;
                    }
                    None => {
                        self.gpu.run_prepared(cmds)?;
                    }
                }
                state.note_mapped(addr, end);
                Ok(())
            },
        );
        self.state.lock().migrating_to_device = false;
        // A device reset during the migration recreated the context empty:
        // what moved is mapped again as the read touches it.
        let policy = if self.gpu.reset_generation() == generation {
            FaultPolicy::Refuse
        } else {
            FaultPolicy::RemapOwn
        };
        // Finished whatever happened: until then it holds the context.
        let early = submitted.map(|access| {
            let usable = matches!(result, Ok((_, 0)));
            self.gpu.finish_mmu(access, &mut 0, |fault, replay| {
                if usable {
                    self.resolve(fault.addr, end, false, policy, Some(replay))
                } else {
                    Err(ENOENT)
                }
            })
        });
        drop(mm);
        let (_, failed) = result?;
        // The device stopped answering during the migration: say so.
        self.gpu.check_alive()?;
        if failed > 0 {
            // Those pages stayed in system memory, data intact; the rest
            // moved. The caller learns which with SNAPSHOT.
            gpu_warn!(self.gpu, "copy engine failed for {} pages of a migration to VRAM: they stay in system memory\n", failed);
            return Err(EIO);
        }
        match (early, early_bounce.as_ref()) {
            (Some(Ok(resp)), Some(bounce)) if resp.status == Status::Ok => bounce.copy_out(ptr)?,
            (Some(Err(e)), _) => return Err(e),
            (Some(Ok(resp)), _) if resp.status != Status::Fault => {
                gpu_err!(self.gpu, "device access failed: {}\n", resp.status.name());
                return Err(EIO);
            }
            // No early read, or one that ended in a fault the device could
            // not report: the read handles that.
            _ => {
                self.read(addr, ptr, npages, policy)?;
            }
        }
        Ok(Counts {
            cpages: npages,
            faults: 0,
        })
    }

    /// HMM_DMIRROR_EXCLUSIVE: makes every page of the range exclusive to the
    /// device (make_device_exclusive()) and maps it for device atomics, then
    /// returns the data as the device reads it.
    pub(crate) fn exclusive(&self, addr: u64, ptr: u64, npages: u64) -> Result<Counts> {
        self.gpu.check_alive()?;
        {
            let mm = self.mm_user()?;
            let _locked = mm.mmap_read_lock();
            (0..npages).try_for_each(|i| self.map_exclusive(addr + i * PAGE_SIZE))?;
        }
        // The device's atomics go through these mappings: one atomic
        // (add 0) checks the path without changing the data.
        if npages > 0 {
            let atomic = Range::new(0, addr, 8, RangeFlags::ATOMIC_ADD);
            let resp =
                self.gpu
                    .execute_mmu(Opcode::Atomic, self.ctx, &[atomic], &mut 0, |_, _| {
                        Err(ENOENT)
                    })?;
            if resp.status != Status::Ok {
                return Err(EIO);
            }
        }
        self.read(addr, ptr, npages, FaultPolicy::Refuse)
    }

    /// make_device_exclusive() of the page at `va` (the caller holds the
    /// mmap lock): the CPU mapping is replaced by a device-exclusive entry.
    /// Returns the page's pfn and, taken while its folio is still locked,
    /// the notifier sequence to validate the device mapping against.
    fn make_exclusive(&self, va: u64) -> Result<(u64, c_ulong)> {
        let mut folio = core::ptr::null_mut();
        // SAFETY: the mirrored mm, its mmap lock held by the caller.
        let page = unsafe {
            shim::make_device_exclusive(
                self.mm().as_raw(),
                va as c_ulong,
                self.vram().owner(),
                &mut folio,
            )
        };
        let page = kernel::error::from_err_ptr(page)?;
        // SAFETY: the inserted notifier.
        let seq = unsafe { bindings::mmu_interval_read_begin(self.notifier()) };
        // SAFETY: the page make_device_exclusive() returned, its folio
        // locked and referenced for us.
        let pfn = unsafe { PageRef::from_raw(page) }.map_or(0, PageRef::pfn);
        // SAFETY: as above: we give up the lock and the reference.
        unsafe {
            bindings::folio_unlock(folio);
            shim::hmmgpu_folio_put(folio);
        }
        Ok((pfn, seq))
    }

    fn map_exclusive(&self, va: u64) -> Result {
        loop {
            let (pfn, seq) = self.make_exclusive(va)?;
            let flags = RangeFlags::MAP_READ | RangeFlags::MAP_WRITE | RangeFlags::MAP_ATOMIC;
            let mut map = RangeList::new();
            map.push(pfn * PAGE_SIZE, va, PAGE_SIZE as u32, flags)?;
            let cmds = self.gpu.prepare(Opcode::Map, self.ctx, &map)?;
            let mut state = self.state.lock();
            if self.retry(seq) {
                continue;
            }
            // Room for the entry without allocating under the lock: the
            // reservation is made unlocked, then checked again.
            if state.atomic.len() == state.atomic.capacity() {
                let want = state.atomic.len() + 64;
                drop(state);
                let mut spare = KVec::<u64>::with_capacity(want, GFP_KERNEL)?;
                let mut state = self.state.lock();
                if state.atomic.capacity() < want {
                    spare.extend_from_slice(&state.atomic, GFP_ATOMIC)?;
                    state.atomic = spare;
                }
                continue;
            }
            self.gpu.run_prepared(cmds)?;
            state.atomic.push(va, GFP_ATOMIC)?;
            state.note_mapped(va, va + PAGE_SIZE);
            return Ok(());
        }
    }

    /// HMM_DMIRROR_CHECK_EXCLUSIVE: EPERM while the device still holds an
    /// atomic mapping in the range.
    pub(crate) fn check_exclusive(&self, addr: u64, npages: u64) -> Result<Counts> {
        let end = addr + npages * PAGE_SIZE;
        if self
            .state
            .lock()
            .atomic
            .iter()
            .any(|va| (addr..end).contains(va))
        {
            return Err(EPERM);
        }
        Ok(Counts::default())
    }

    /// HMM_DMIRROR_MIGRATE_TO_SYS: migrates this GPU's pages in the range
    /// back to system memory.
    pub(crate) fn migrate_to_system(&self, addr: u64, npages: u64) -> Result<Counts> {
        self.gpu.check_alive()?;
        let mm = self.mm_user()?;
        let mut fail_alloc = {
            let mut state = self.state.lock();
            let fail = state.flags & crate::uapi::HMM_DMIRROR_FLAG_FAIL_ALLOC != 0;
            state.flags &= !crate::uapi::HMM_DMIRROR_FLAG_FAIL_ALLOC;
            fail
        };
        let end = addr + npages * PAGE_SIZE;
        let moved = migrate::to_system(&self.gpu, self.vram(), &mm, addr, end, &mut fail_alloc)?;
        Ok(Counts {
            cpages: moved,
            faults: 0,
        })
    }

    /// HMM_DMIRROR_SNAPSHOT: the state of every page of the range as the
    /// device would see it, one HMM_DMIRROR_PROT_* byte per page into `ptr`.
    pub(crate) fn snapshot(&self, addr: u64, ptr: u64, npages: u64) -> Result<Counts> {
        self.gpu.check_alive()?;
        let _mm = self.mm_user()?;
        let mut out = UserSlice::new(UserPtr::from_addr(ptr as usize), npages as usize).writer();
        let mut counts = Counts::default();
        let end = addr + npages * PAGE_SIZE;
        let mut start = addr;
        let mut pfns = [HmmPfn::default(); STEP_PAGES];
        let mut perms = [0u8; STEP_PAGES];
        while start < end {
            let step_end = core::cmp::min(end, start + STEP_PAGES as u64 * PAGE_SIZE);
            let n = ((step_end - start) / PAGE_SIZE) as usize;
            loop {
                let seq = self.range_fault(start, &mut pfns[..n], false, false, false)?;
                let _guard = self.state.lock();
                if self.retry(seq) {
                    continue;
                }
                let owner = self.vram().owner();
                for (p, entry) in perms[..n].iter_mut().zip(pfns[..n].iter()) {
                    *p = crate::uapi::snapshot_prot(*entry, owner);
                }
                break;
            }
            out.write_slice(&perms[..n])?;
            counts.cpages += n as u64;
            start = step_end;
        }
        Ok(counts)
    }

    /// Called from the mmu_interval_notifier: the CPU page tables of
    /// [start, end) change. Waits for device accesses in flight.
    pub(crate) fn invalidate(
        &self,
        start: u64,
        end: u64,
        blockable: bool,
        own_migrate: bool,
        seq: c_ulong,
    ) -> bool {
        let mut state = if blockable {
            self.state.lock()
        } else {
            match self.state.try_lock() {
                Some(g) => g,
                None => return false,
            }
        };
        state.atomic.retain(|va| !(start..end).contains(va));
        if own_migrate && state.migrating_to_device {
            // SAFETY: the notifier is valid while callbacks run.
            unsafe { shim::hmmgpu_mmu_interval_set_seq(self.notifier(), seq) };
            return true;
        }
        if let Some((ms, me)) = state.mapped.filter(|_| state.overlaps_mapped(start, end)) {
            if !blockable {
                // UNMAP waits for the device: not possible here.
                return false;
            }
            // Only the part that can hold translations (an exiting process
            // invalidates its whole address space), with the command
            // allocated at open: this runs under memory reclaim too.
            let (us, ue) = (core::cmp::max(start, ms), core::cmp::min(end, me));
            // A migration this GPU runs (its pagemap is the owner: a CPU
            // fault, MIGRATE_TO_SYS, eviction, another mirror's migration to
            // VRAM) copies on this GPU's queue and waits for that before any
            // page is freed; until then the pages are locked and out of the
            // CPU's tables. So its UNMAP need not be waited for here: the
            // device completes it before that COPY.
            match self.unmap(&mut state, us, ue, own_migrate) {
                // The device is gone (removed, e.g. hot-unplugged, or lost):
                // its translations went with it, and it accesses nothing.
                Ok(()) => {}
                Err(e) if e == ENODEV => {}
                Err(e) => gpu_warn!(self.gpu, "UNMAP failed: {:?}\n", e),
            }
            if start <= ms && me <= end {
                state.mapped = None;
            }
        }
        // SAFETY: the notifier is valid while callbacks run.
        unsafe { shim::hmmgpu_mmu_interval_set_seq(self.notifier(), seq) };
        drop(state);
        true
    }
}

#[pinned_drop]
impl PinnedDrop for Mirror {
    fn drop(self: Pin<&mut Self>) {
        if self.notifying.load(Ordering::Acquire) {
            // SAFETY: inserted in `new`; removal waits for running callbacks.
            unsafe { bindings::mmu_interval_notifier_remove(self.notifier()) };
        }
        let pending = self.state.lock().unmap_pending.take();
        if let Some(pending) = pending {
            // Best effort, as the context's destruction below.
            let _ = self.gpu.reap(pending);
        }
        self.gpu.ctx_destroy(self.ctx);
    }
}
