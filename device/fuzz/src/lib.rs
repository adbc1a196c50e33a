// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! What the fuzz targets share: a reference device MMU, written for
//! obviousness rather than speed, that the real one is compared with.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use hmmgpu_abi::{event, Access, ContextId, MapRange, Phys, HUGE_PAGE_SIZE, PAGE_SIZE};

/// One translation of the reference: where the page starts, what it allows.
type Entry = (Phys, Access);

/// The page tables of one context: 4 KiB entries by va / 4 KiB, huge ones
/// by va / 2 MiB.
#[derive(Clone, Debug, Default)]
struct Tables {
    small: BTreeMap<u64, Entry>,
    huge: BTreeMap<u64, Entry>,
}

/// The device MMU as docs/device-spec.md describes it.
#[derive(Clone, Debug)]
pub struct RefMmu {
    contexts: BTreeMap<ContextId, Tables>,
    cap: usize,
}

const SMALL_PER_HUGE: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;

impl RefMmu {
    /// An MMU of at most `cap` entries.
    pub fn new(cap: usize) -> Self {
        Self {
            contexts: BTreeMap::new(),
            cap,
        }
    }

    /// Entries over all contexts.
    pub fn entries(&self) -> usize {
        self.contexts
            .values()
            .map(|t| t.small.len() + t.huge.len())
            .sum()
    }

    /// Whether `ctx` exists.
    pub fn exists(&self, ctx: ContextId) -> bool {
        self.contexts.contains_key(&ctx)
    }

    /// CTX_CREATE.
    pub fn create(&mut self, ctx: ContextId) -> bool {
        if self.exists(ctx) {
            return false;
        }
        self.contexts.insert(ctx, Tables::default());
        true
    }

    /// CTX_DESTROY.
    pub fn destroy(&mut self, ctx: ContextId) -> bool {
        self.contexts.remove(&ctx).is_some()
    }

    /// MAP: all or nothing; `Err(None)` for a missing context,
    /// `Err(Some(i))` when range `i` takes the entries past the cap, counting
    /// each entry not installed before the command as new.
    pub fn map(&mut self, ctx: ContextId, maps: &[MapRange]) -> Result<(), Option<usize>> {
        let before = self.entries();
        let tables = self.contexts.get(&ctx).ok_or(None)?;
        let (mut total, mut new) = (0usize, 0usize);
        for (i, m) in maps.iter().enumerate() {
            let pages = if m.huge {
                1
            } else {
                (m.len / PAGE_SIZE) as usize
            };
            total += pages;
            let existing = if m.huge {
                usize::from(tables.huge.contains_key(&(m.va / HUGE_PAGE_SIZE)))
            } else {
                (0..m.len / PAGE_SIZE)
                    .filter(|p| tables.small.contains_key(&(m.va / PAGE_SIZE + p)))
                    .count()
            };
            new += pages - existing;
            if total > self.cap || before + new > self.cap {
                return Err(Some(i));
            }
        }
        let tables = self.contexts.get_mut(&ctx).ok_or(None)?;
        for m in maps {
            if m.huge {
                let first = m.va / PAGE_SIZE;
                for p in first..first + SMALL_PER_HUGE {
                    tables.small.remove(&p);
                }
                tables.huge.insert(m.va / HUGE_PAGE_SIZE, (m.phys, m.perms));
            } else {
                for p in 0..m.len / PAGE_SIZE {
                    let phys = m.phys.offset(p * PAGE_SIZE).unwrap_or(m.phys);
                    tables.small.insert(m.va / PAGE_SIZE + p, (phys, m.perms));
                }
            }
        }
        Ok(())
    }

    /// UNMAP of `[va, va + len)`: every entry overlapping it; how many.
    pub fn unmap(&mut self, ctx: ContextId, va: u64, len: u64) -> Option<usize> {
        let tables = self.contexts.get_mut(&ctx)?;
        if len == 0 {
            return Some(0);
        }
        let last = va + (len - 1);
        let before = tables.small.len() + tables.huge.len();
        tables
            .small
            .retain(|&p, _| p < va / PAGE_SIZE || p > last / PAGE_SIZE);
        tables
            .huge
            .retain(|&h, _| h < va / HUGE_PAGE_SIZE || h > last / HUGE_PAGE_SIZE);
        Some(before - tables.small.len() - tables.huge.len())
    }

    /// Where `va` goes for `access`, and how many bytes its entry has left;
    /// or the fault reason.
    pub fn translate(&self, ctx: ContextId, va: u64, access: Access) -> Result<(Phys, u64), u32> {
        let tables = self.contexts.get(&ctx).ok_or(event::REASON_NOT_MAPPED)?;
        let (entry, size) = match tables.small.get(&(va / PAGE_SIZE)) {
            Some(e) => (e, PAGE_SIZE),
            None => match tables.huge.get(&(va / HUGE_PAGE_SIZE)) {
                Some(e) => (e, HUGE_PAGE_SIZE),
                None => return Err(event::REASON_NOT_MAPPED),
            },
        };
        if !entry.1.contains(access) {
            return Err(event::REASON_PERMISSION);
        }
        let within = va % size;
        let phys = entry.0.offset(within).ok_or(event::REASON_NOT_MAPPED)?;
        Ok((phys, size - within))
    }

    /// Every page of physical memory `ctx` maps with `access`: (start, len).
    pub fn targets(&self, ctx: ContextId, access: Access) -> Vec<(Phys, u64)> {
        let Some(tables) = self.contexts.get(&ctx) else {
            return Vec::new();
        };
        let small = tables.small.values().map(|e| (e, PAGE_SIZE));
        let huge = tables.huge.values().map(|e| (e, HUGE_PAGE_SIZE));
        small
            .chain(huge)
            .filter(|((_, perms), _)| perms.contains(access))
            .map(|((phys, _), len)| (*phys, len))
            .collect()
    }
}
