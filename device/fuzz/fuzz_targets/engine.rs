// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The engine executing command sequences, checked against a model of
//! guest RAM, the VRAM and the device MMU:
//!
//! - a command refused before it ran (BAD_REQUEST, BAD_GUEST_ADDR,
//!   BAD_VRAM_RANGE, UNSUPPORTED, BAD_CONTEXT) changed no byte;
//! - a command changed only bytes it may write: the destinations of its
//!   COPY/FILL ranges or VREAD buffers, the pages the context maps writable
//!   (VWRITE) or atomic (ATOMIC), the COUNTERS buffer;
//! - a COPY or FILL that completed OK wrote exactly what the model says;
//! - every parked command completes exactly once (REPLAY, CANCEL,
//!   CTX_DESTROY), no completion names a command that was not parked;
//! - the engine's MMU agrees with the model's after every command;
//! - without fault injection no command fails with COPY_ERROR (which would
//!   mean validation let through a range the copy engine then could not do).
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use hmmgpu_abi::{
    Access, CmdHeader, Command, ContextId, Event, MapRange, Opcode, Phys, Range, Response, Status,
    PAGE_SIZE,
};
use hmmgpu_device::engine::{Budget, EventSink, GuestRam, Step};
use hmmgpu_device::{Engine, NoFaults, Stats, Vram};
use hmmgpu_fuzz::RefMmu;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: two adjacent regions, a hole, a third region.
const RAM0: u64 = 0x10_0000;
const RAM_LEN: u64 = 0x1_0000;
const RAM1: u64 = RAM0 + RAM_LEN;
const RAM2: u64 = 0x40_0000;
const VRAM_SIZE: u64 = 2 << 20;

/// The VRAM file lives as long as the process.
fn vram() -> &'static (tempfile::TempDir, Arc<Vram>) {
    static VRAM: OnceLock<(tempfile::TempDir, Arc<Vram>)> = OnceLock::new();
    VRAM.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let vram = Arc::new(Vram::open(&dir.path().join("vram"), VRAM_SIZE).expect("vram"));
        (dir, vram)
    })
}

#[derive(Arbitrary, Debug)]
struct Cmd {
    op: u8,
    ctx: u8,
    ranges: Vec<Spec>,
    /// Whether the event queue has a buffer for a fault of this command.
    event_buffer: bool,
    /// Budget per call, in 4 KiB steps (0: unlimited).
    slices: u8,
}

/// An address near one of the interesting places, and a length.
#[derive(Arbitrary, Debug)]
struct Spec {
    src: (u8, u16),
    dst: (u8, u16),
    len: u16,
    long: bool,
    flags: u8,
}

/// Places addresses are picked around (and the offset from them).
fn place(sel: (u8, u16)) -> u64 {
    let base = match sel.0 % 12 {
        0 => RAM0,
        1 => RAM1,
        2 => RAM1 + RAM_LEN,
        3 => RAM2,
        4 => RAM2 + RAM_LEN,
        5 => 0,
        6 => VRAM_SIZE,
        7 => 0x7f00_0000_0000,
        8 => u64::MAX - 0xffff,
        9 => PAGE_SIZE,
        10 => 0x20_0000,
        _ => RAM0 + 0x8000,
    };
    let off = u64::from(sel.1);
    // Mostly page-aligned, so MAP ranges are valid often enough.
    if sel.1 & 1 == 0 {
        base.wrapping_add(off & !0xfff)
    } else {
        base.wrapping_add(off)
    }
}

fn opcode(n: u8) -> u32 {
    match Opcode::ALL.get(usize::from(n % 14)) {
        Some(op) => op.bits(),
        None => u32::from(n), // unknown ones too
    }
}

/// Flag sets that make sense for some opcode, and some that do not.
fn flags(n: u8) -> u32 {
    const SETS: [u32; 12] = [0, 1, 2, 3, 0x10, 0x30, 0x70, 0x31, 0xb0, 0x100, 0x200, 0x4];
    SETS[usize::from(n % 12)]
}

fn encode(c: &Cmd) -> Vec<u8> {
    let ranges: Vec<Range> = c
        .ranges
        .iter()
        .take(6)
        .map(|s| Range {
            src: place(s.src),
            dst: place(s.dst),
            len: if s.long {
                u32::from(s.len) << 6
            } else {
                u32::from(s.len % 0x2100)
            },
            flags: flags(s.flags),
        })
        .collect();
    let header = CmdHeader {
        opcode: opcode(c.op),
        ctx: u32::from(c.ctx % 5), // 0..=4: invalid and valid contexts
        tag: 1,
        count: ranges.len() as u32,
        reserved: 0,
    };
    let mut bytes = header.to_bytes().to_vec();
    for r in &ranges {
        bytes.extend_from_slice(&r.to_bytes());
    }
    bytes
}

/// An event queue with or without a buffer for the next event.
struct Sink {
    room: bool,
    posted: Vec<Event>,
}

impl EventSink for Sink {
    fn post(&mut self, event: &Event) -> bool {
        if self.room {
            self.posted.push(*event);
        }
        self.room
    }
}

/// All of memory: guest RAM then the VRAM.
fn snapshot(mem: &GuestRam) -> Vec<u8> {
    let mut bytes = vec![0u8; (3 * RAM_LEN + VRAM_SIZE) as usize];
    let (ram, vram_bytes) = bytes.split_at_mut(3 * RAM_LEN as usize);
    mem.read_slice(&mut ram[..2 * RAM_LEN as usize], GuestAddress(RAM0))
        .expect("ram");
    mem.read_slice(&mut ram[2 * RAM_LEN as usize..], GuestAddress(RAM2))
        .expect("ram");
    vram().1.read(0, vram_bytes).expect("vram");
    bytes
}

/// The snapshot index of `len` bytes at `at`, if all of them are memory.
fn index(at: Phys, len: u64) -> Option<std::ops::Range<usize>> {
    let end = |start: u64| start.checked_add(len);
    let start = match at {
        Phys::Vram(off) if end(off)? <= VRAM_SIZE => 3 * RAM_LEN + off,
        Phys::Guest(a) if a >= RAM0 && end(a)? <= RAM1 + RAM_LEN => a - RAM0,
        Phys::Guest(a) if a >= RAM2 && end(a)? <= RAM2 + RAM_LEN => 2 * RAM_LEN + a - RAM2,
        _ => return None,
    };
    Some(start as usize..(start + len) as usize)
}

/// Bytes a command may write.
struct Writable(Vec<std::ops::Range<usize>>);

impl Writable {
    fn add(&mut self, at: Phys, len: u64) {
        if let Some(r) = index(at, len) {
            self.0.push(r);
        }
    }

    fn allows(&self, i: usize) -> bool {
        self.0.iter().any(|r| r.contains(&i))
    }
}

fn run(
    engine: &mut Engine,
    mem: &GuestRam,
    request: &[u8],
    token: u64,
    sink: &mut Sink,
    slices: u8,
) -> hmmgpu_device::Executed {
    let budget = |n: u8| {
        if n == 0 {
            Budget::unlimited()
        } else {
            // Odd sizes, so pieces end anywhere in a range.
            Budget::new(u64::from(n) * 997)
        }
    };
    let mut step = engine.process_budgeted(mem, request, token, sink, &mut budget(slices));
    let mut calls = 0u32;
    loop {
        match step {
            Step::Done(executed) => return executed,
            Step::Suspended => {
                calls += 1;
                assert!(calls < 1 << 20, "a command never finished");
                step = engine.continue_suspended(mem, sink, &mut budget(slices));
            }
        }
    }
}

fuzz_target!(|cmds: Vec<Cmd>| {
    let mem = GuestRam::from_ranges(&[
        (GuestAddress(RAM0), RAM_LEN as usize),
        (GuestAddress(RAM1), RAM_LEN as usize),
        (GuestAddress(RAM2), RAM_LEN as usize),
    ])
    .expect("guest ram");
    // A known pattern everywhere, so any write shows. (Made once: the
    // harness's own loops are instrumented too, and slow.)
    static PATTERNS: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (fill, pattern) = PATTERNS.get_or_init(|| {
        (
            (0..RAM_LEN as usize).map(|i| (i * 7 + 3) as u8).collect(),
            (0..VRAM_SIZE as usize)
                .map(|i| (i * 13 + 5) as u8)
                .collect(),
        )
    });
    for base in [RAM0, RAM1, RAM2] {
        mem.write_slice(fill, GuestAddress(base)).expect("ram");
    }
    let vram = vram().1.clone();
    vram.write(0, pattern).expect("vram");
    let mut engine = Engine::new(vram, Arc::new(Stats::default()), Arc::new(NoFaults));
    let mut model = RefMmu::new(hmmgpu_device::mmu::MAX_ENTRIES);
    // Parked commands by context: their tokens.
    let mut parked: BTreeMap<ContextId, u64> = BTreeMap::new();
    let mut completed: BTreeSet<u64> = BTreeSet::new();
    for (token, c) in cmds.iter().take(24).enumerate() {
        let token = token as u64 + 100;
        let request = encode(c);
        let before = snapshot(&mem);
        let mut sink = Sink {
            room: c.event_buffer,
            posted: Vec::new(),
        };
        let decoded = Command::decode(&request).ok();
        // What the command may write, from the model before it runs.
        let mut writable = Writable(Vec::new());
        if let Some(command) = &decoded {
            may_write(command, &model, &parked, &mut writable);
        }
        let executed = run(&mut engine, &mem, &request, token, &mut sink, c.slices);
        let after = snapshot(&mem);
        let response = executed.response;
        // Nothing injects faults here: the copy engine never fails.
        for r in response
            .iter()
            .chain(executed.resumed.as_ref().map(|c| &c.response))
        {
            assert_ne!(r.status, Status::CopyError, "{decoded:?}");
        }
        // Writes only where allowed; none at all when refused up front.
        let refused = response.is_some_and(|r| {
            matches!(
                r.status,
                Status::BadRequest
                    | Status::BadGuestAddr
                    | Status::BadVramRange
                    | Status::Unsupported
                    | Status::BadContext
            ) && executed.resumed.is_none()
        });
        // (Slice equality is a memcmp, outside the instrumentation: only
        // memory that changed is walked byte by byte.)
        if before != after {
            assert!(!refused, "refused command {response:?} wrote memory");
            let blocks = before.chunks(4096).zip(after.chunks(4096)).enumerate();
            for (block, (a, b)) in blocks.filter(|(_, (a, b))| a != b) {
                for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                    let i = block * 4096 + i;
                    assert!(
                        x == y || writable.allows(i),
                        "{decoded:?} wrote byte {i:#x} it may not"
                    );
                }
            }
        }
        // Completed COPY/FILL without overlap: exactly the model's result.
        if let (Some(Command::Copy(_) | Command::Fill(_)), Some(r)) = (&decoded, response) {
            if r.status == Status::Ok {
                if let Some(expect) = physical_model(decoded.as_ref(), &before) {
                    assert!(expect == after, "COPY/FILL result differs from the model");
                }
            }
        }
        // Parking and completions, exactly once.
        if let Some(done) = executed.resumed {
            assert!(
                completed.insert(done.token),
                "token {} completed twice",
                done.token
            );
            let ctx = parked
                .iter()
                .find(|(_, &t)| t == done.token)
                .map(|(c, _)| *c);
            let ctx =
                ctx.unwrap_or_else(|| panic!("completion of {} that was not parked", done.token));
            parked.remove(&ctx);
        }
        match (&decoded, response) {
            (
                Some(Command::Vread(ctx, _) | Command::Vwrite(ctx, _) | Command::Atomic(ctx, _)),
                None,
            ) => {
                assert!(c.event_buffer, "parked without reporting the fault");
                assert!(
                    parked.insert(*ctx, token).is_none(),
                    "two parked on one context"
                );
                assert_eq!(sink.posted.len(), 1);
            }
            (Some(Command::Replay(ctx)), None) => panic!("REPLAY of {ctx:?} did not complete"),
            (Some(Command::Replay(ctx)), Some(r)) if r.status == Status::Ok => {
                // What it resumed completed, or parked again under its
                // first token.
                if executed.resumed.is_none() {
                    assert!(
                        !sink.posted.is_empty(),
                        "REPLAY neither completed nor re-faulted"
                    );
                    assert!(parked.contains_key(ctx));
                }
            }
            (_, None) => panic!("{decoded:?} completed with no response and did not park"),
            _ => {}
        }
        // The MMU model follows the commands that changed it.
        if let (Some(command), Some(r)) = (&decoded, response) {
            if r.status == Status::Ok {
                apply_to_model(command, &mut model, &mut parked);
            }
        }
        assert_eq!(engine.mmu().entries(), model.entries(), "after {decoded:?}");
        assert_eq!(engine.parked(), parked.len());
    }
});

/// Adds what `command` may write to `w`.
fn may_write(
    command: &Command<'_>,
    model: &RefMmu,
    parked: &BTreeMap<ContextId, u64>,
    w: &mut Writable,
) {
    let mut by_access = |ctx: ContextId, access: Access| {
        for (phys, len) in model.targets(ctx, access) {
            w.add(phys, len);
        }
    };
    match command {
        Command::Copy(ranges) => ranges.iter().for_each(|r| w.add(r.dst, u64::from(r.len))),
        Command::Fill(ranges) => ranges.iter().for_each(|r| w.add(r.dst, u64::from(r.len))),
        Command::Counters(r) => w.add(Phys::Guest(r.dst), 128),
        Command::Vread(_, ranges) => ranges
            .iter()
            .for_each(|r| w.add(Phys::Guest(r.buffer), u64::from(r.len))),
        Command::Vwrite(ctx, _) => by_access(*ctx, Access::WRITE),
        Command::Atomic(ctx, _) => by_access(*ctx, Access::ATOMIC),
        // A REPLAY resumes whatever is parked on its context: any write
        // that command may do. (Its guest buffers are not known here: any
        // VREAD destination in guest RAM, and every mapping.)
        Command::Replay(ctx) if parked.contains_key(ctx) => {
            by_access(*ctx, Access::WRITE);
            by_access(*ctx, Access::ATOMIC);
            w.add(Phys::Guest(RAM0), 2 * RAM_LEN);
            w.add(Phys::Guest(RAM2), RAM_LEN);
        }
        _ => {}
    }
}

/// The memory a completed COPY or FILL leaves, or `None` when its ranges
/// overlap (their order of bytes is not specified).
fn physical_model(command: Option<&Command<'_>>, before: &[u8]) -> Option<Vec<u8>> {
    let mut mem = before.to_vec();
    let mut touched: Vec<std::ops::Range<usize>> = Vec::new();
    let overlaps =
        |a: &std::ops::Range<usize>, b: &std::ops::Range<usize>| a.start < b.end && b.start < a.end;
    match command? {
        Command::Copy(ranges) => {
            for r in ranges.iter() {
                let (Some(src), Some(dst)) = (
                    index(r.src, u64::from(r.len)),
                    index(r.dst, u64::from(r.len)),
                ) else {
                    return None;
                };
                if touched
                    .iter()
                    .any(|t| overlaps(t, &src) || overlaps(t, &dst))
                    || overlaps(&src, &dst)
                {
                    return None;
                }
                let bytes = mem[src.clone()].to_vec();
                mem[dst.clone()].copy_from_slice(&bytes);
                touched.push(src);
                touched.push(dst);
            }
        }
        Command::Fill(ranges) => {
            for r in ranges.iter() {
                let dst = index(r.dst, u64::from(r.len))?;
                if touched.iter().any(|t| overlaps(t, &dst)) {
                    return None;
                }
                let pattern = r.pattern.to_le_bytes();
                for (i, b) in mem[dst.clone()].iter_mut().enumerate() {
                    *b = pattern[i % 8];
                }
                touched.push(dst);
            }
        }
        _ => return None,
    }
    Some(mem)
}

/// Applies a command that completed OK to the MMU model.
fn apply_to_model(
    command: &Command<'_>,
    model: &mut RefMmu,
    parked: &mut BTreeMap<ContextId, u64>,
) {
    match command {
        Command::CtxCreate(ctx) => assert!(model.create(*ctx)),
        Command::CtxDestroy(ctx) => {
            assert!(model.destroy(*ctx));
            assert!(
                !parked.contains_key(ctx),
                "CTX_DESTROY left a command parked"
            );
        }
        Command::Map(ctx, ranges) => {
            let maps: Vec<MapRange> = ranges.iter().collect();
            assert_eq!(model.map(*ctx, &maps), Ok(()));
        }
        Command::Unmap(ctx, ranges) => {
            for r in ranges.iter() {
                model.unmap(*ctx, r.va, r.len);
            }
        }
        _ => {}
    }
}

#[allow(dead_code)]
fn _unused(_: Response) {}
