// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The device MMU (docs/device-spec.md, "Device MMU"): per-context page
//! tables that translate device virtual addresses to guest-physical
//! addresses or VRAM offsets, with read/write/atomic permissions.
//!
//! Each context has two tables, one of 4 KiB entries and one of 2 MiB (huge)
//! entries, both `BTreeMap`s keyed by virtual page number, so UNMAP of a huge
//! virtual range costs only the entries it actually removes. A 4 KiB entry
//! takes precedence over a huge entry covering the same address (a MAP of
//! 4 KiB "replaces" that one page of the huge translation; the rest of the
//! huge entry stays); a huge MAP replaces every 4 KiB entry inside it.
//!
//! This module knows nothing about memory: the engine checks that a MAP's
//! physical side is inside guest RAM or the VRAM before calling [`Mmu::map`],
//! so a translation can never point outside them.
//!
//! The total number of entries of a device (4 KiB and huge entries alike,
//! across all contexts) is capped at [`MAX_ENTRIES`]: the table lives in
//! host memory and the guest must not be able to grow it without bound.

use std::collections::{BTreeMap, HashMap};

use hmmgpu_abi::{event, HUGE_PAGE_SIZE, PAGE_SIZE};
pub use hmmgpu_abi::{fits, Access, ContextId, MapRange, Phys};

/// Most translation entries one device holds (4 KiB and huge entries count
/// one each, summed over all contexts): 4 Mi entries, 16 GiB of memory
/// mapped with 4 KiB entries, about 200 MiB of host memory at most. A MAP
/// that would go beyond it fails with BAD_REQUEST and changes nothing.
pub const MAX_ENTRIES: usize = 1 << 22;

const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();
const HUGE_SHIFT: u32 = HUGE_PAGE_SIZE.trailing_zeros();

/// One translation: where the page starts and what it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    base: Phys,
    perms: Access,
}

/// Entries a MAP range installs.
fn entries_of(m: &MapRange) -> u64 {
    if m.huge {
        1
    } else {
        m.len >> PAGE_SHIFT
    }
}

/// A successful translation of one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Where the address is.
    pub phys: Phys,
    /// Bytes from the address to the end of its entry (at least 1).
    pub len: u64,
}

/// Why a translation failed: `event::REASON_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// `event::REASON_NOT_MAPPED` or `event::REASON_PERMISSION`.
    pub reason: u32,
}

/// The page tables of one context.
#[derive(Debug, Default)]
struct Context {
    /// 4 KiB entries by virtual page number (va >> 12).
    small: BTreeMap<u64, Entry>,
    /// 2 MiB entries by virtual huge page number (va >> 21).
    huge: BTreeMap<u64, Entry>,
}

impl Context {
    fn len(&self) -> usize {
        self.small.len() + self.huge.len()
    }
}

/// The device MMU: every context's page tables.
#[derive(Debug)]
pub struct Mmu {
    contexts: HashMap<ContextId, Context>,
    /// Entries in all contexts.
    entries: usize,
    cap: usize,
}

impl Default for Mmu {
    fn default() -> Self {
        Self::with_cap(MAX_ENTRIES)
    }
}

impl Mmu {
    /// An MMU holding at most `cap` entries.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            contexts: HashMap::new(),
            entries: 0,
            cap,
        }
    }

    /// Entries installed, over all contexts.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Whether context `ctx` was created.
    pub fn exists(&self, ctx: ContextId) -> bool {
        self.contexts.contains_key(&ctx)
    }

    /// Creates `ctx` with empty tables; false if it exists.
    pub fn create(&mut self, ctx: ContextId) -> bool {
        if self.exists(ctx) {
            return false;
        }
        self.contexts.insert(ctx, Context::default());
        true
    }

    /// Destroys `ctx` and its translations; false if it does not exist.
    pub fn destroy(&mut self, ctx: ContextId) -> bool {
        match self.contexts.remove(&ctx) {
            Some(context) => {
                self.entries -= context.len();
                true
            }
            None => false,
        }
    }

    /// Device virtual addresses of up to `limit` pages `ctx` maps (4 KiB
    /// entries first, then huge ones, each in address order).
    pub fn mapped_pages(&self, ctx: ContextId, limit: usize) -> Vec<u64> {
        let Some(context) = self.contexts.get(&ctx) else {
            return Vec::new();
        };
        let small = context.small.keys().map(|vpn| vpn << PAGE_SHIFT);
        let huge = context.huge.keys().map(|hpn| hpn << HUGE_SHIFT);
        small.chain(huge).take(limit).collect()
    }

    /// Drops every context (device reset).
    pub fn clear(&mut self) {
        self.contexts.clear();
        self.entries = 0;
    }

    /// Installs `maps` (already checked against memory) in `ctx`, in order,
    /// replacing existing translations. Either all are installed or, when
    /// `ctx` does not exist (`Err(None)`) or the entry cap would be exceeded
    /// (`Err(Some(index))` of the mapping that crosses it), none.
    ///
    /// The cap check counts every entry that is not installed yet as new
    /// (two ranges of one command mapping the same new page count twice),
    /// and a command may not install more than the cap in total, so the
    /// work one MAP does is bounded too.
    pub fn map(&mut self, ctx: ContextId, maps: &[MapRange]) -> Result<(), Option<usize>> {
        let context = self.contexts.get_mut(&ctx).ok_or(None)?;
        let room = self.cap.saturating_sub(self.entries) as u64;
        let (mut total, mut new) = (0u64, 0u64);
        for (index, m) in maps.iter().enumerate() {
            total += entries_of(m);
            if total > self.cap as u64 {
                return Err(Some(index));
            }
            let existing = if m.huge {
                u64::from(context.huge.contains_key(&(m.va >> HUGE_SHIFT)))
            } else {
                let first = m.va >> PAGE_SHIFT;
                context.small.range(first..first + entries_of(m)).count() as u64
            };
            new += entries_of(m) - existing;
            if new > room {
                return Err(Some(index));
            }
        }
        for m in maps {
            let mut entry = Entry {
                base: m.phys,
                perms: m.perms,
            };
            if m.huge {
                let first = m.va >> PAGE_SHIFT;
                let inside: Vec<u64> = context
                    .small
                    .range(first..first + (HUGE_PAGE_SIZE >> PAGE_SHIFT))
                    .map(|(&k, _)| k)
                    .collect();
                for k in &inside {
                    context.small.remove(k);
                }
                self.entries -= inside.len();
                if context.huge.insert(m.va >> HUGE_SHIFT, entry).is_none() {
                    self.entries += 1;
                }
            } else {
                let first = m.va >> PAGE_SHIFT;
                for page in 0..entries_of(m) {
                    if context.small.insert(first + page, entry).is_none() {
                        self.entries += 1;
                    }
                    // Cannot overflow: from_range checked the range fits.
                    entry.base = entry.base.offset(PAGE_SIZE).unwrap_or(entry.base);
                }
            }
        }
        Ok(())
    }

    /// Removes every translation of `ctx` overlapping `[va, va + len)` (a
    /// huge entry is removed whole). Returns the number of entries removed,
    /// `None` if `ctx` does not exist. The caller checked the range fits.
    pub fn unmap(&mut self, ctx: ContextId, va: u64, len: u64) -> Option<usize> {
        let context = self.contexts.get_mut(&ctx)?;
        if len == 0 {
            return Some(0);
        }
        let last = va.saturating_add(len - 1);
        let small: Vec<u64> = context
            .small
            .range(va >> PAGE_SHIFT..=last >> PAGE_SHIFT)
            .map(|(&k, _)| k)
            .collect();
        let huge: Vec<u64> = context
            .huge
            .range(va >> HUGE_SHIFT..=last >> HUGE_SHIFT)
            .map(|(&k, _)| k)
            .collect();
        for k in &small {
            context.small.remove(k);
        }
        for k in &huge {
            context.huge.remove(k);
        }
        let removed = small.len() + huge.len();
        self.entries -= removed;
        Some(removed)
    }

    /// Translates `va` of `ctx` for `access` (one kind of access). A
    /// missing context translates nothing (NOT_MAPPED).
    pub fn translate(&self, ctx: ContextId, va: u64, access: Access) -> Result<Translation, Fault> {
        let not_mapped = Fault {
            reason: event::REASON_NOT_MAPPED,
        };
        let context = self.contexts.get(&ctx).ok_or(not_mapped)?;
        let (entry, size) = if let Some(e) = context.small.get(&(va >> PAGE_SHIFT)) {
            (e, PAGE_SIZE)
        } else if let Some(e) = context.huge.get(&(va >> HUGE_SHIFT)) {
            (e, HUGE_PAGE_SIZE)
        } else {
            return Err(not_mapped);
        };
        if !entry.perms.contains(access) {
            return Err(Fault {
                reason: event::REASON_PERMISSION,
            });
        }
        let within = va & (size - 1);
        Ok(Translation {
            phys: entry.base.offset(within).ok_or(not_mapped)?,
            len: size - within,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmmgpu_abi::{RangeFlags, MAX_CONTEXTS};

    const MAP_READ: RangeFlags = RangeFlags::MAP_READ;
    const MAP_WRITE: RangeFlags = RangeFlags::MAP_WRITE;
    const MAP_ATOMIC: RangeFlags = RangeFlags::MAP_ATOMIC;
    const MAP_HUGE: RangeFlags = RangeFlags::MAP_HUGE;
    const SRC_VRAM: RangeFlags = RangeFlags::SRC_VRAM;
    const RW: RangeFlags = RangeFlags::MAP_READ.union(RangeFlags::MAP_WRITE);
    const ACCESS_READ: Access = Access::READ;
    const ACCESS_WRITE: Access = Access::WRITE;
    const ACCESS_ATOMIC: Access = Access::ATOMIC;

    /// A MAP range as decode makes it (the checks are decode's).
    fn mapping(src: u64, dst: u64, len: u32, flags: RangeFlags) -> MapRange {
        MapRange {
            va: dst,
            phys: Phys::new(src, flags.contains(SRC_VRAM)),
            len: u64::from(len),
            perms: Access::from_map_flags(flags),
            huge: flags.contains(MAP_HUGE),
        }
    }

    fn ctx(id: u32) -> ContextId {
        ContextId::new(id).unwrap()
    }

    fn t(phys: Phys, len: u64) -> Result<Translation, Fault> {
        Ok(Translation { phys, len })
    }

    const NOT_MAPPED: Result<Translation, Fault> = Err(Fault {
        reason: event::REASON_NOT_MAPPED,
    });
    const PERMISSION: Result<Translation, Fault> = Err(Fault {
        reason: event::REASON_PERMISSION,
    });

    #[test]
    fn contexts_are_created_once() {
        let mut mmu = Mmu::default();
        assert!(mmu.create(ctx(MAX_CONTEXTS)));
        assert!(!mmu.create(ctx(MAX_CONTEXTS)));
        assert!(mmu.create(ctx(1)));
        assert_eq!(mmu.map(ctx(2), &[mapping(0, 0, 4096, RW)]), Err(None));
        assert_eq!(mmu.unmap(ctx(2), 0, 4096), None);
        mmu.map(ctx(1), &[mapping(0, 0, 8192, RW)]).unwrap();
        assert_eq!(mmu.entries(), 2);
        assert!(mmu.destroy(ctx(1)));
        assert!(!mmu.destroy(ctx(1)));
        assert_eq!(mmu.entries(), 0);
        assert_eq!(mmu.translate(ctx(1), 0, ACCESS_READ), NOT_MAPPED);
    }

    #[test]
    fn translates_small_and_huge_entries() {
        let mut mmu = Mmu::default();
        mmu.create(ctx(3));
        let huge = HUGE_PAGE_SIZE as u32;
        mmu.map(
            ctx(3),
            &[
                mapping(0x10_0000, 0x7000_0000, 0x3000, MAP_READ | MAP_WRITE),
                mapping(0x40_0000, 0x8000_0000, huge, SRC_VRAM | MAP_HUGE | MAP_READ),
            ],
        )
        .unwrap();
        assert_eq!(mmu.entries(), 4);
        assert_eq!(
            mmu.translate(ctx(3), 0x7000_1234, ACCESS_WRITE),
            t(Phys::Guest(0x10_1234), 0x1000 - 0x234)
        );
        assert_eq!(
            mmu.translate(ctx(3), 0x7000_2fff, ACCESS_READ),
            t(Phys::Guest(0x10_2fff), 1)
        );
        assert_eq!(mmu.translate(ctx(3), 0x7000_3000, ACCESS_READ), NOT_MAPPED);
        assert_eq!(mmu.translate(ctx(3), 0x6fff_ffff, ACCESS_READ), NOT_MAPPED);
        assert_eq!(
            mmu.translate(ctx(3), 0x7000_0000, ACCESS_ATOMIC),
            PERMISSION
        );
        assert_eq!(
            mmu.translate(ctx(3), 0x8012_3456, ACCESS_READ),
            t(Phys::Vram(0x52_3456), HUGE_PAGE_SIZE - 0x12_3456)
        );
        assert_eq!(mmu.translate(ctx(3), 0x8012_3456, ACCESS_WRITE), PERMISSION);
        assert_eq!(mmu.translate(ctx(3), 0x8020_0000, ACCESS_READ), NOT_MAPPED);
        // Another context sees nothing.
        mmu.create(ctx(4));
        assert_eq!(mmu.translate(ctx(4), 0x7000_0000, ACCESS_READ), NOT_MAPPED);

        // A 4 KiB entry inside a huge one overrides that page only.
        mmu.map(ctx(3), &[mapping(0x20_0000, 0x8000_1000, 4096, MAP_ATOMIC)])
            .unwrap();
        assert_eq!(
            mmu.translate(ctx(3), 0x8000_1008, ACCESS_ATOMIC),
            t(Phys::Guest(0x20_0008), 0xff8)
        );
        assert_eq!(mmu.translate(ctx(3), 0x8000_1008, ACCESS_READ), PERMISSION);
        assert_eq!(
            mmu.translate(ctx(3), 0x8000_2000, ACCESS_READ),
            t(Phys::Vram(0x40_2000), HUGE_PAGE_SIZE - 0x2000)
        );
        // A huge MAP replaces the 4 KiB entries inside it.
        mmu.map(
            ctx(3),
            &[mapping(0, 0x8000_0000, huge, MAP_HUGE | MAP_READ)],
        )
        .unwrap();
        assert_eq!(mmu.entries(), 4);
        assert_eq!(
            mmu.translate(ctx(3), 0x8000_1008, ACCESS_READ),
            t(Phys::Guest(0x1008), HUGE_PAGE_SIZE - 0x1008)
        );
        // Remapping a page replaces it.
        mmu.map(ctx(3), &[mapping(0x90_0000, 0x7000_1000, 4096, MAP_READ)])
            .unwrap();
        assert_eq!(mmu.entries(), 4);
        assert_eq!(
            mmu.translate(ctx(3), 0x7000_1000, ACCESS_READ),
            t(Phys::Guest(0x90_0000), 4096)
        );
    }

    #[test]
    fn unmap_removes_overlapping_entries_and_whole_huge_ones() {
        let mut mmu = Mmu::default();
        mmu.create(ctx(1));
        let huge = HUGE_PAGE_SIZE as u32;
        mmu.map(
            ctx(1),
            &[
                mapping(0, 0x1000_0000, 0x4000, RW),
                mapping(0, 0x2000_0000, huge, MAP_HUGE | RW),
            ],
        )
        .unwrap();
        // One byte in the middle of the second page removes that page.
        assert_eq!(mmu.unmap(ctx(1), 0x1000_1fff, 1), Some(1));
        assert_eq!(mmu.translate(ctx(1), 0x1000_1000, ACCESS_READ), NOT_MAPPED);
        mmu.translate(ctx(1), 0x1000_0fff, ACCESS_READ).unwrap();
        mmu.translate(ctx(1), 0x1000_2000, ACCESS_READ).unwrap();
        // Overlapping the last page and beyond.
        assert_eq!(mmu.unmap(ctx(1), 0x1000_3000, 0x10_0000), Some(1));
        // One page of the huge entry removes it whole.
        assert_eq!(mmu.unmap(ctx(1), 0x2010_0000, 4096), Some(1));
        assert_eq!(mmu.translate(ctx(1), 0x2000_0000, ACCESS_READ), NOT_MAPPED);
        assert_eq!(mmu.unmap(ctx(1), 0x2010_0000, 4096), Some(0));
        assert_eq!(mmu.unmap(ctx(1), 0, 0), Some(0));
        // Everything, up to the top of the address space.
        assert_eq!(mmu.unmap(ctx(1), 0, u64::MAX), Some(2));
        assert_eq!(mmu.entries(), 0);
    }

    #[test]
    fn entry_cap_is_enforced_without_partial_maps() {
        let mut mmu = Mmu::with_cap(8);
        mmu.create(ctx(1));
        mmu.create(ctx(2));
        mmu.map(ctx(1), &[mapping(0, 0, 5 * 4096, RW)]).unwrap();
        // 3 more fit, 4 do not; the command is refused whole.
        let too_many = [
            mapping(0, 0x10_0000, 2 * 4096, RW),
            mapping(0, 0x20_0000, 2 * 4096, RW),
        ];
        assert_eq!(mmu.map(ctx(2), &too_many), Err(Some(1)));
        assert_eq!(mmu.entries(), 5);
        assert_eq!(mmu.translate(ctx(2), 0x10_0000, ACCESS_READ), NOT_MAPPED);
        // Replacing existing entries needs no room.
        mmu.map(ctx(1), &[mapping(0x1000, 0, 5 * 4096, MAP_READ)])
            .unwrap();
        assert_eq!(mmu.entries(), 5);
        mmu.map(ctx(2), &[mapping(0, 0x10_0000, 3 * 4096, RW)])
            .unwrap();
        assert_eq!(mmu.entries(), 8);
        assert_eq!(
            mmu.map(ctx(2), &[mapping(0, 0, HUGE_PAGE_SIZE as u32, MAP_HUGE)]),
            Err(Some(0))
        );
        // A command may not install more than the cap even as replacements.
        assert_eq!(
            mmu.map(ctx(1), &[mapping(0, 0, 9 * 4096, RW)]),
            Err(Some(0))
        );
        // Destroying a context frees its entries.
        mmu.destroy(ctx(2));
        assert_eq!(mmu.entries(), 5);
        mmu.map(ctx(1), &[mapping(0, 0x40_0000, 3 * 4096, RW)])
            .unwrap();
        mmu.clear();
        assert_eq!(mmu.entries(), 0);
        assert!(!mmu.exists(ctx(1)));
    }
}
