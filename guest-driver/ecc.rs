// SPDX-License-Identifier: GPL-2.0

//! VRAM ECC errors (the device's `ECC` events): the interrupt handler queues
//! them, a work item retires each bad page and takes its data away from its
//! owner (docs/driver.md, "Device errors").

use crate::abi::{Event, PAGE_SIZE};
use crate::gpu::{Gpu, ECC_WORK};
use crate::migrate::{self, CorruptFolio};
use crate::pages::{self, PageRef};
use crate::vram::{MemKind, Retirement, Vram};
use core::sync::atomic::Ordering;
use kernel::sync::{Arc, ArcBorrow};
use kernel::time::Delta;
use kernel::workqueue::{self, impl_has_work, WorkItem};

/// ECC errors the interrupt handler can queue before the work takes them;
/// more are counted (`driver_ecc_dropped`) and their pages not retired.
const ECC_QUEUE_LEN: usize = 64;

/// One ECC event: the VRAM byte offset and the bit that flipped.
#[derive(Clone, Copy, Default)]
struct EccError {
    offset: u64,
    bit: u32,
}

/// A fixed ring of ECC errors: filled in interrupt context, so no allocation.
pub(crate) struct EccQueue {
    errors: [EccError; ECC_QUEUE_LEN],
    head: usize,
    len: usize,
}

impl EccQueue {
    pub(crate) const fn new() -> Self {
        EccQueue {
            errors: [EccError { offset: 0, bit: 0 }; ECC_QUEUE_LEN],
            head: 0,
            len: 0,
        }
    }

    /// Queues `e`; false if the ring is full.
    fn push(&mut self, e: EccError) -> bool {
        if self.len == ECC_QUEUE_LEN {
            return false;
        }
        self.errors[(self.head + self.len) % ECC_QUEUE_LEN] = e;
        self.len += 1;
        true
    }

    fn pop(&mut self) -> Option<EccError> {
        if self.len == 0 {
            return None;
        }
        let e = self.errors[self.head];
        self.head = (self.head + 1) % ECC_QUEUE_LEN;
        self.len -= 1;
        Some(e)
    }
}

impl_has_work! {
    impl HasWork<Self, ECC_WORK> for Gpu { self.ecc_work }
}

impl WorkItem<ECC_WORK> for Gpu {
    type Pointer = Arc<Gpu>;

    fn run(gpu: Arc<Gpu>) {
        gpu.handle_ecc_errors();
    }
}

/// How often the work tries to move data off a bad page that is busy (a
/// migration in flight holds its lock), and how long it waits in between.
const MOVE_TRIES: u32 = 10;
const MOVE_RETRY_MS: i64 = 100;

/// What became of the data on a bad VRAM page.
enum DataOnPage {
    /// Nothing uses the page.
    None,
    /// Moved to system memory; the corrupt 4 KiB is poisoned there.
    Moved,
    /// A device-coherent page: its owners now map a poisoned system page
    /// instead (memory_failure()), as after a machine check.
    Replaced,
    /// The device could not copy it: the whole folio's data is poisoned.
    Lost,
    /// It held the link canary, which moved to another page.
    Canary,
    /// Still on the page: it could not be moved.
    Stuck,
}

impl Gpu {
    /// An ECC event (interrupt context): queued for the ECC work. O(1), no
    /// allocation.
    pub(crate) fn on_ecc_event(gpu: ArcBorrow<'_, Gpu>, event: &Event) {
        let error = EccError {
            offset: event.addr,
            bit: event.reason,
        };
        let queued = gpu.ecc_queue.lock().push(error);
        if !queued {
            gpu.counters.ecc_dropped.fetch_add(1, Ordering::Relaxed);
        }
        // Already queued: that run takes this error too.
        let _ = workqueue::system_long().enqueue::<Arc<Gpu>, ECC_WORK>(Arc::from(gpu));
    }

    /// Waits until no ECC work is queued or running. After
    /// [`Gpu::begin_removal`] and the device reset (no more events), none
    /// is queued again, so the module can go.
    pub(crate) fn flush_ecc_work(&self) {
        // SAFETY: `ecc_work` is an initialized work item of this live Gpu.
        unsafe { kernel::bindings::flush_work(kernel::workqueue::Work::raw_get(&self.ecc_work)) };
    }

    /// The ECC work: handles every queued error, in order.
    fn handle_ecc_errors(&self) {
        let running = self.ecc_lock.lock();
        if self.lifecycle().removal_began() {
            return;
        }
        loop {
            // Its own statement: the queue's lock (interrupts off) must be
            // dropped before the error is handled, which sleeps.
            let next = self.ecc_queue.lock().pop();
            let Some(error) = next else {
                break;
            };
            self.handle_ecc_error(error);
            self.counters.ecc_events.fetch_add(1, Ordering::Relaxed);
        }
        let dropped = self.counters.ecc_dropped.load(Ordering::Relaxed);
        if dropped > 0 && !self.ecc_dropped_logged.swap(true, Ordering::Relaxed) {
            gpu_err!(self, "ECC events came faster than they were handled: {} dropped, their pages not retired (debugfs counters: driver_ecc_dropped)\n", dropped);
        }
        drop(running);
    }

    /// One ECC error: retires its page and takes any data on it away from
    /// its owner, who gets SIGBUS for that page alone.
    fn handle_ecc_error(&self, error: EccError) {
        if error.offset >= self.vram_size() {
            gpu_err!(self, "ECC event for VRAM offset {:#x} (bit {}), beyond the {:#x} bytes of VRAM: ignored\n", error.offset,
                error.bit,
                self.vram_size());
            return;
        }
        let page = error.offset & !(PAGE_SIZE - 1);
        let vram = if self.private.contains(page) {
            &self.private
        } else {
            &self.coherent
        };
        gpu_warn!(
            self,
            "ECC error at VRAM offset {:#x} (bit {}): retiring the {} page at {:#x}\n",
            error.offset,
            error.bit,
            vram.kind().name(),
            page
        );
        let retirement = match vram.retire(page) {
            Ok(r) => r,
            Err(e) => {
                gpu_err!(self, "cannot retire VRAM page {:#x}: {:?}\n", page, e);
                return;
            }
        };
        let data = match (retirement, vram.pfn_of_offset(page)) {
            (Retirement::Held, _) | (_, None) => DataOnPage::None,
            (_, Some(pfn)) => self.move_data_off(vram, pfn),
        };
        let before = if retirement == Retirement::Already {
            " (retired before)"
        } else {
            ""
        };
        match data {
            DataOnPage::None if retirement == Retirement::Held => {
                gpu_warn!(self, "VRAM page {:#x} retired: it was free\n", page)
            }
            DataOnPage::None if retirement == Retirement::Pending => gpu_warn!(self, "VRAM page {:#x} retired: no data on it; it leaves the allocator when the allocation it belongs to is freed\n", page),
            DataOnPage::None => gpu_warn!(self, "VRAM page {:#x} retired before: no data on it\n", page),
            DataOnPage::Moved => gpu_warn!(self, "VRAM page {:#x} retired{}: its data moved to system memory, the corrupt page poisoned (its owner gets SIGBUS there)\n", page, before),
            DataOnPage::Replaced => gpu_warn!(self, "VRAM page {:#x} retired{}: its owners now map a poisoned system page instead (SIGBUS on their next touch)\n", page, before),
            DataOnPage::Lost => gpu_err!(self, "VRAM page {:#x} retired{}: the device could not copy its data: lost and poisoned\n", page, before),
            DataOnPage::Canary => gpu_warn!(self, "VRAM page {:#x} retired{}: it held the link canary, now at VRAM page {:#x}\n", page,
                before,
                self.canary_pfn().and_then(|pfn| self.coherent.offset_of_pfn(pfn)).unwrap_or(0)),
            DataOnPage::Stuck => gpu_err!(self, "VRAM page {:#x} retired{}, but its data could not be moved off it: its owner may read the corrupt data\n", page, before),
        }
    }

    /// Moves whatever uses device page `pfn` of `vram` off it: a
    /// device-private folio to system memory (the device copies it; the
    /// corrupt page is poisoned there), a device-coherent page through
    /// memory_failure() (our pgmap's handler gives its owners a poisoned
    /// page), the link canary to another page. Retries while the page is
    /// busy.
    fn move_data_off(&self, vram: &Vram, pfn: u64) -> DataOnPage {
        for attempt in 0..MOVE_TRIES {
            if attempt > 0 {
                kernel::time::delay::fsleep(Delta::from_millis(MOVE_RETRY_MS));
            }
            let Some((head, nr)) = owner_folio(pfn) else {
                // Gone since the last try: freed, or moved by our handler.
                return match (attempt, vram.kind()) {
                    (0, _) => DataOnPage::None,
                    (_, MemKind::Private) => DataOnPage::Moved,
                    (_, MemKind::Coherent) => DataOnPage::Replaced,
                };
            };
            if self.canary_pfn() == Some(pfn) {
                match self.move_canary() {
                    Ok(()) => return DataOnPage::Canary,
                    Err(e) => {
                        gpu_err!(self, "cannot move the link canary: {:?}\n", e);
                        continue;
                    }
                }
            }
            match vram.kind() {
                MemKind::Private => match migrate::evict_corrupt_folio(self, vram, head, nr, pfn) {
                    Ok(CorruptFolio::Moved) => return DataOnPage::Moved,
                    Ok(CorruptFolio::Lost) => return DataOnPage::Lost,
                    Ok(CorruptFolio::NotMoved) => {}
                    Err(e) => {
                        gpu_err!(self, "cannot evict the folio at pfn {:#x}: {:?}\n", head, e)
                    }
                },
                MemKind::Coherent => {
                    // memory_failure() calls our pgmap's handler
                    // (migrate::memory_failure); its result shows in
                    // whether the page is still used.
                    let _ = pages::poison_pfn(pfn);
                    if owner_folio(pfn).is_none() {
                        return DataOnPage::Replaced;
                    }
                }
            }
        }
        match (owner_folio(pfn), vram.kind()) {
            (Some(_), _) => DataOnPage::Stuck,
            (None, MemKind::Private) => DataOnPage::Moved,
            (None, MemKind::Coherent) => DataOnPage::Replaced,
        }
    }
}

/// The folio (head pfn, pages) that uses device page `pfn`, if any.
fn owner_folio(pfn: u64) -> Option<(u64, usize)> {
    // SAFETY: `pfn` is one of our device pages (its struct page exists for
    // as long as the Gpu does); reading a free page's folio is harmless.
    let head = unsafe { PageRef::from_pfn(pfn) }.folio_head();
    if head.folio_ref_count() <= 0 {
        return None;
    }
    let (head_pfn, nr) = (head.pfn(), head.folio_nr_pages());
    // A free page may point at a folio it is no longer part of.
    (pfn >= head_pfn && pfn - head_pfn < nr as u64).then_some((head_pfn, nr))
}
