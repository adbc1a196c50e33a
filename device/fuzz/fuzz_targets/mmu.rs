// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The device MMU against the reference model: the same operations give
//! the same answers, translations and entry counts.
#![no_main]

use arbitrary::Arbitrary;
use hmmgpu_abi::{Access, ContextId, MapRange, Phys, RangeFlags, HUGE_PAGE_SIZE, PAGE_SIZE};
use hmmgpu_device::Mmu;
use hmmgpu_fuzz::RefMmu;
use libfuzzer_sys::fuzz_target;

/// A small entry cap, so the fuzzer reaches it.
const CAP: usize = 96;

#[derive(Arbitrary, Debug)]
enum Op {
    Create(u8),
    Destroy(u8),
    Map(u8, Vec<Spec>),
    Unmap(u8, u16, u16),
    Translate(u8, u32, u8),
}

/// A MAP range in page units of a small window (plus the top of the
/// address space), so ranges collide.
#[derive(Arbitrary, Debug)]
struct Spec {
    va_page: u16,
    pages: u8,
    phys_page: u16,
    vram: bool,
    huge: bool,
    perms: u8,
    top: bool,
}

fn ctx(n: u8) -> ContextId {
    // 1..=4: few contexts, so operations meet.
    ContextId::new(u32::from(n % 4) + 1).unwrap_or_else(|| unreachable!())
}

fn va_of(page: u64, top: bool) -> u64 {
    if top {
        u64::MAX - ((page % 8 + 1) * HUGE_PAGE_SIZE) + 1
    } else {
        page * PAGE_SIZE
    }
}

fn access(bits: u8) -> Access {
    match bits % 3 {
        0 => Access::READ,
        1 => Access::WRITE,
        _ => Access::ATOMIC,
    }
}

fn map_range(s: &Spec) -> MapRange {
    // MAP_READ, MAP_WRITE, MAP_ATOMIC are bits 4, 5, 6.
    let perms = Access::from_map_flags(RangeFlags::from_bits_retain(u32::from(s.perms & 7) << 4));
    let (va, len, phys) = if s.huge {
        let va = va_of(
            u64::from(s.va_page % 32) * (HUGE_PAGE_SIZE / PAGE_SIZE),
            s.top,
        ) & !(HUGE_PAGE_SIZE - 1);
        (
            va,
            HUGE_PAGE_SIZE,
            u64::from(s.phys_page % 64) * HUGE_PAGE_SIZE,
        )
    } else {
        let va = va_of(u64::from(s.va_page % 2048), s.top);
        let pages = u64::from(s.pages % 40);
        let len = if s.top {
            (pages * PAGE_SIZE).min(u64::MAX - va + 1)
        } else {
            pages * PAGE_SIZE
        };
        (va, len, u64::from(s.phys_page) * PAGE_SIZE)
    };
    MapRange {
        va,
        phys: Phys::new(phys, s.vram),
        len,
        perms,
        huge: s.huge,
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut mmu = Mmu::with_cap(CAP);
    let mut model = RefMmu::new(CAP);
    for op in &ops {
        match op {
            Op::Create(c) => assert_eq!(mmu.create(ctx(*c)), model.create(ctx(*c))),
            Op::Destroy(c) => assert_eq!(mmu.destroy(ctx(*c)), model.destroy(ctx(*c))),
            Op::Map(c, specs) => {
                let maps: Vec<MapRange> = specs.iter().take(8).map(map_range).collect();
                assert_eq!(
                    mmu.map(ctx(*c), &maps),
                    model.map(ctx(*c), &maps),
                    "{maps:?}"
                );
            }
            Op::Unmap(c, page, pages) => {
                let va = u64::from(*page) * PAGE_SIZE / 2;
                let len = u64::from(*pages) * 1024;
                assert_eq!(mmu.unmap(ctx(*c), va, len), model.unmap(ctx(*c), va, len));
            }
            Op::Translate(c, va, a) => {
                let va = u64::from(*va) * 61;
                let got = mmu
                    .translate(ctx(*c), va, access(*a))
                    .map(|t| (t.phys, t.len))
                    .map_err(|f| f.reason);
                assert_eq!(got, model.translate(ctx(*c), va, access(*a)), "va {va:#x}");
            }
        }
        assert_eq!(mmu.entries(), model.entries());
    }
});
