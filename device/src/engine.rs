// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The device model: the copy engine that executes one decoded command
//! (docs/device-spec.md, "Commands") against guest RAM and the VRAM.
//!
//! It knows nothing of virtqueues: [`Engine::execute`] takes the bytes of a
//! command (header and ranges) and returns the [`Response`], so it is tested
//! here with plain guest memory and no vhost-user at all.
//!
//! Execution has two passes. The first decodes and validates every range
//! (flags, guest ranges entirely inside guest RAM, VRAM ranges entirely
//! inside the VRAM, all with checked arithmetic); only when the whole command
//! is valid does the second pass move bytes. So BAD_REQUEST, BAD_GUEST_ADDR
//! and BAD_VRAM_RANGE never leave memory half-modified; only an injected
//! COPY_ERROR ([`FaultHooks`]) does, as the spec allows.

use std::cmp::min;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use hmmgpu_abi::{opcode, range_flags, status, CmdHeader, Range, Response, MAX_RANGES};
use log::{debug, error, warn};
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::vram::Vram;

/// Guest RAM as the vhost-user daemon maps it (no dirty-page bitmap).
pub type GuestRam = GuestMemoryMmap<()>;

/// Longest command the device reads: a header and [`MAX_RANGES`] ranges.
/// Bytes after that in a chain's readable part are ignored.
pub const MAX_COMMAND_LEN: usize = CmdHeader::SIZE + MAX_RANGES as usize * Range::SIZE;

/// FILL writes its pattern from a buffer of this many bytes (plus one
/// pattern's worth, so every start phase has a full chunk).
const FILL_CHUNK: usize = 64 * 1024;

/// The device's counters. Updated by the copy engine, read by the control
/// socket and printed when the daemon exits.
#[derive(Debug, Default)]
pub struct Stats {
    commands_ok: AtomicU64,
    commands_failed: AtomicU64,
    bytes_guest_to_vram: AtomicU64,
    bytes_vram_to_guest: AtomicU64,
    bytes_vram_to_vram: AtomicU64,
    bytes_guest_to_guest: AtomicU64,
    bytes_filled: AtomicU64,
}

/// A copy of [`Stats`] at one moment, as the control socket reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Commands completed with status OK.
    pub commands_ok: u64,
    /// Commands completed with any other status, plus chains dropped for
    /// having no room for a response.
    pub commands_failed: u64,
    /// Bytes copied from guest RAM to VRAM.
    pub bytes_guest_to_vram: u64,
    /// Bytes copied from VRAM to guest RAM.
    pub bytes_vram_to_guest: u64,
    /// Bytes copied within the VRAM.
    pub bytes_vram_to_vram: u64,
    /// Bytes copied within guest RAM.
    pub bytes_guest_to_guest: u64,
    /// Bytes written by FILL, to guest RAM or VRAM.
    pub bytes_filled: u64,
}

impl Stats {
    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            commands_ok: get(&self.commands_ok),
            commands_failed: get(&self.commands_failed),
            bytes_guest_to_vram: get(&self.bytes_guest_to_vram),
            bytes_vram_to_guest: get(&self.bytes_vram_to_guest),
            bytes_vram_to_vram: get(&self.bytes_vram_to_vram),
            bytes_guest_to_guest: get(&self.bytes_guest_to_guest),
            bytes_filled: get(&self.bytes_filled),
        }
    }

    /// Counts a command that failed before the engine could execute it (a
    /// chain without room for a response, or whose command is unreadable).
    pub fn count_failed(&self) {
        self.commands_failed.fetch_add(1, Ordering::Relaxed);
    }

    fn count_completion(&self, status: u32) {
        let counter = if status == status::OK {
            &self.commands_ok
        } else {
            &self.commands_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn count_bytes(&self, op: Op, src: Side, dst: Side, bytes: u64) {
        let counter = match (op, src, dst) {
            (Op::Fill, _, _) => &self.bytes_filled,
            (Op::Copy, Side::Guest(_), Side::Vram(_)) => &self.bytes_guest_to_vram,
            (Op::Copy, Side::Vram(_), Side::Guest(_)) => &self.bytes_vram_to_guest,
            (Op::Copy, Side::Vram(_), Side::Vram(_)) => &self.bytes_vram_to_vram,
            (Op::Copy, Side::Guest(_), Side::Guest(_)) => &self.bytes_guest_to_guest,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Fault injection hook point.
//
// The engine asks its `FaultHooks` before executing each range. Today the
// only fault is a one-shot copy-engine error; the control plane that arms
// faults (and adds latency, stalls, ...) builds on this trait.
// ---------------------------------------------------------------------------

/// A fault the copy engine should suffer instead of executing a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// The range fails with COPY_ERROR; it and the ranges after it are not
    /// executed, those before it were.
    CopyError,
}

/// Consulted by the engine before it executes each range of a valid command.
pub trait FaultHooks: Send + Sync {
    /// Called before range `index` (0-based within its command) is executed;
    /// `None` lets it run. An implementation may also block here to model
    /// latency.
    fn before_range(&self, index: u32, range: &Range) -> Option<InjectedFault>;
}

/// No faults: the default.
#[derive(Debug, Default)]
pub struct NoFaults;

impl FaultHooks for NoFaults {
    fn before_range(&self, _index: u32, _range: &Range) -> Option<InjectedFault> {
        None
    }
}

/// Faults armed at run time (by tests now, by the control socket later).
#[derive(Debug)]
pub struct FaultInjector {
    /// Range executions still to succeed before the armed copy error fires;
    /// negative when no copy error is armed.
    copy_error_countdown: AtomicI64,
}

impl Default for FaultInjector {
    fn default() -> Self {
        Self {
            copy_error_countdown: AtomicI64::new(-1),
        }
    }
}

impl FaultInjector {
    /// Arms one copy-engine error: the next `n` range executions (across
    /// commands) succeed and the one after them fails with COPY_ERROR. With
    /// `n` = 0 the very next range fails. Re-arming replaces the count.
    pub fn copy_error_next(&self, n: u32) {
        self.copy_error_countdown
            .store(i64::from(n), Ordering::SeqCst);
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        self.copy_error_countdown.store(-1, Ordering::SeqCst);
    }
}

impl FaultHooks for FaultInjector {
    fn before_range(&self, _index: u32, _range: &Range) -> Option<InjectedFault> {
        // Counts down to 0, fires at 0 and then disarms to -1.
        let previous = self
            .copy_error_countdown
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n >= 0).then_some(n - 1)
            })
            .ok()?;
        (previous == 0).then_some(InjectedFault::CopyError)
    }
}

// ---------------------------------------------------------------------------
// Decoding and validation.
// ---------------------------------------------------------------------------

/// What a (validated) command does with each range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Copy,
    Fill,
}

/// One end of a range: a guest-physical address or a VRAM offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Guest(u64),
    Vram(u64),
}

impl Side {
    fn new(addr: u64, is_vram: bool) -> Self {
        if is_vram {
            Side::Vram(addr)
        } else {
            Side::Guest(addr)
        }
    }
}

/// A command whose header is well formed.
struct Command {
    header: CmdHeader,
    ranges: Vec<Range>,
}

fn failure(status: u32, failed_index: u32) -> Response {
    Response {
        status,
        failed_index,
        bytes: 0,
    }
}

/// Decodes a command's header and range list, checking everything that does
/// not depend on memory.
fn decode(request: &[u8]) -> Result<Command, Response> {
    let header = CmdHeader::from_bytes(request).ok_or(failure(status::BAD_REQUEST, 0))?;
    if !matches!(header.opcode, opcode::NOP | opcode::COPY | opcode::FILL) {
        return Err(failure(status::UNSUPPORTED, 0));
    }
    if header.flags != 0 || header.reserved != 0 || header.count > MAX_RANGES {
        return Err(failure(status::BAD_REQUEST, 0));
    }
    if header.opcode == opcode::NOP && header.count != 0 {
        return Err(failure(status::BAD_REQUEST, 0));
    }
    let body = &request[CmdHeader::SIZE..];
    let complete = body.len() / Range::SIZE;
    if complete < header.count as usize {
        // `failed_index` names the first range that is missing or cut short.
        return Err(failure(status::BAD_REQUEST, complete as u32));
    }
    let ranges = body
        .chunks_exact(Range::SIZE)
        .take(header.count as usize)
        .filter_map(Range::from_bytes)
        .collect();
    Ok(Command { header, ranges })
}

/// Whether guest-physical `[addr, addr + len)` is entirely guest RAM. It may
/// span several adjacent memory regions, but no hole.
fn guest_contains(mem: &GuestRam, addr: u64, len: u32) -> bool {
    addr.checked_add(u64::from(len)).is_some()
        && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize)
}

// ---------------------------------------------------------------------------
// The engine.
// ---------------------------------------------------------------------------

/// The copy engine of one device.
pub struct Engine {
    vram: Arc<Vram>,
    stats: Arc<Stats>,
    faults: Arc<dyn FaultHooks>,
}

impl Engine {
    /// An engine working on `vram`, counting into `stats`, asking `faults`
    /// before each range.
    pub fn new(vram: Arc<Vram>, stats: Arc<Stats>, faults: Arc<dyn FaultHooks>) -> Self {
        Self {
            vram,
            stats,
            faults,
        }
    }

    /// The VRAM.
    pub fn vram(&self) -> &Arc<Vram> {
        &self.vram
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Executes the command encoded in `request` (a [`CmdHeader`] followed by
    /// its ranges; trailing bytes are ignored) and returns its response.
    pub fn execute(&self, mem: &GuestRam, request: &[u8]) -> Response {
        let response = match decode(request) {
            Ok(command) => self.run(mem, &command),
            Err(response) => response,
        };
        let tag = CmdHeader::from_bytes(request).map_or(0, |header| header.tag);
        self.stats.count_completion(response.status);
        if response.status == status::OK {
            debug!("command tag {tag:#x}: ok, {} bytes", response.bytes);
        } else {
            warn!(
                "command tag {tag:#x}: {} at range {} after {} bytes",
                status::name(response.status),
                response.failed_index,
                response.bytes
            );
        }
        response
    }

    fn run(&self, mem: &GuestRam, command: &Command) -> Response {
        let op = match command.header.opcode {
            opcode::COPY => Op::Copy,
            opcode::FILL => Op::Fill,
            // NOP: decode() made sure it has no ranges; completing in order
            // is all a fence needs. (Response::default() is OK, 0 bytes.)
            _ => return Response::default(),
        };
        for (index, range) in command.ranges.iter().enumerate() {
            if let Err(status) = self.validate(mem, op, range) {
                return failure(status, index as u32);
            }
        }
        let mut bytes = 0u64;
        for (index, range) in command.ranges.iter().enumerate() {
            let index = index as u32;
            let partial = |status| Response {
                status,
                failed_index: index,
                bytes,
            };
            if let Some(InjectedFault::CopyError) = self.faults.before_range(index, range) {
                return partial(status::COPY_ERROR);
            }
            if let Err(status) = self.execute_range(mem, op, range) {
                return partial(status);
            }
            bytes += u64::from(range.len);
        }
        Response {
            status: status::OK,
            failed_index: 0,
            bytes,
        }
    }

    /// Checks one range of a COPY or FILL; `Err` holds the status.
    fn validate(&self, mem: &GuestRam, op: Op, range: &Range) -> Result<(), u32> {
        if range.flags & !range_flags::ALL != 0 {
            return Err(status::BAD_REQUEST);
        }
        let src_vram = range.flags & range_flags::SRC_VRAM != 0;
        if op == Op::Fill && src_vram {
            // A FILL's `src` is the pattern, not an address.
            return Err(status::BAD_REQUEST);
        }
        if range.len == 0 {
            // An empty range touches nothing, wherever it points.
            return Ok(());
        }
        // A FILL has no source side; a COPY's source is checked first.
        let src = (op == Op::Copy).then(|| Side::new(range.src, src_vram));
        let dst = Side::new(range.dst, range.flags & range_flags::DST_VRAM != 0);
        for side in src.into_iter().chain([dst]) {
            match side {
                Side::Guest(addr) if !guest_contains(mem, addr, range.len) => {
                    return Err(status::BAD_GUEST_ADDR)
                }
                Side::Vram(offset) if !self.vram.contains(offset, u64::from(range.len)) => {
                    return Err(status::BAD_VRAM_RANGE)
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The volatile slices `[side, side + len)` consists of: one for VRAM,
    /// one per guest memory region crossed for guest RAM.
    fn slices<'a>(
        &'a self,
        mem: &'a GuestRam,
        side: Side,
        len: u32,
    ) -> Result<Vec<VolatileSlice<'a>>, u32> {
        match side {
            Side::Vram(offset) => self
                .vram
                .slice(offset, u64::from(len))
                .map(|slice| vec![slice])
                .map_err(|_| status::BAD_VRAM_RANGE),
            Side::Guest(addr) => {
                GuestMemoryBackend::get_slices(mem, GuestAddress(addr), len as usize)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| status::BAD_GUEST_ADDR)
            }
        }
    }

    /// Executes one validated range; `Err` holds the status. Errors here
    /// would mean validation missed something: they are reported, not
    /// panicked on.
    fn execute_range(&self, mem: &GuestRam, op: Op, range: &Range) -> Result<(), u32> {
        let dst_side = Side::new(range.dst, range.flags & range_flags::DST_VRAM != 0);
        let src_side = Side::new(range.src, range.flags & range_flags::SRC_VRAM != 0);
        if range.len == 0 {
            return Ok(());
        }
        let dst = self.slices(mem, dst_side, range.len)?;
        match op {
            Op::Copy => copy_slices(&self.slices(mem, src_side, range.len)?, &dst)?,
            Op::Fill => fill_slices(&dst, range.src)?,
        }
        self.stats
            .count_bytes(op, src_side, dst_side, u64::from(range.len));
        Ok(())
    }
}

/// Copies the bytes of `src` (a list of slices read as one stream) to `dst`,
/// in as few memmoves as the region boundaries allow. Both lists hold the
/// same number of bytes (validation made sure).
fn copy_slices(src: &[VolatileSlice<'_>], dst: &[VolatileSlice<'_>]) -> Result<(), u32> {
    let (mut si, mut so, mut di, mut doff) = (0, 0, 0, 0);
    while si < src.len() && di < dst.len() {
        let (s, d) = (&src[si], &dst[di]);
        let n = min(s.len() - so, d.len() - doff);
        let from = s.subslice(so, n).map_err(internal_error)?;
        let to = d.subslice(doff, n).map_err(internal_error)?;
        from.copy_to_volatile_slice(to);
        so += n;
        doff += n;
        if so == s.len() {
            si += 1;
            so = 0;
        }
        if doff == d.len() {
            di += 1;
            doff = 0;
        }
    }
    Ok(())
}

/// Writes the little-endian bytes of `pattern`, repeated, over the stream of
/// slices `dst`; the pattern's phase carries over slice boundaries, so the
/// byte at stream position `i` is `pattern.to_le_bytes()[i % 8]`.
fn fill_slices(dst: &[VolatileSlice<'_>], pattern: u64) -> Result<(), u32> {
    const PAT: usize = std::mem::size_of::<u64>();
    let total: usize = dst.iter().map(|slice| slice.len()).sum();
    // Only as big as this range needs: a command of many small ranges must
    // not build a 64 KiB buffer for each.
    let chunk_len = min(total, FILL_CHUNK) + PAT;
    let mut chunk = Vec::with_capacity(chunk_len.next_multiple_of(PAT));
    while chunk.len() < chunk_len {
        chunk.extend_from_slice(&pattern.to_le_bytes());
    }
    let mut written = 0usize;
    for slice in dst {
        let mut off = 0;
        while off < slice.len() {
            let n = min(slice.len() - off, FILL_CHUNK);
            let phase = written % PAT;
            slice
                .subslice(off, n)
                .map_err(internal_error)?
                .copy_from(&chunk[phase..phase + n]);
            off += n;
            written += n;
        }
    }
    Ok(())
}

fn internal_error(e: vm_memory::VolatileMemoryError) -> u32 {
    error!("copy engine: slice arithmetic failed after validation: {e}");
    status::COPY_ERROR
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmmgpu_abi::range_flags::{DST_VRAM, SRC_VRAM};
    use vm_memory::Bytes;

    const VRAM_SIZE: u64 = 2 << 20;
    /// Two adjacent regions, then a hole, then a third region.
    const RAM0: u64 = 0x10_0000;
    const RAM_LEN: usize = 0x10_0000;
    const RAM1: u64 = RAM0 + RAM_LEN as u64;
    const RAM2: u64 = 0x100_0000;

    struct Fixture {
        _dir: tempfile::TempDir,
        mem: GuestRam,
        engine: Engine,
        faults: Arc<FaultInjector>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vram = Arc::new(Vram::open(&dir.path().join("vram"), VRAM_SIZE).unwrap());
        let mem = GuestRam::from_ranges(&[
            (GuestAddress(RAM0), RAM_LEN),
            (GuestAddress(RAM1), RAM_LEN),
            (GuestAddress(RAM2), RAM_LEN),
        ])
        .unwrap();
        let faults = Arc::new(FaultInjector::default());
        let engine = Engine::new(vram, Arc::new(Stats::default()), faults.clone());
        Fixture {
            _dir: dir,
            mem,
            engine,
            faults,
        }
    }

    fn command(op: u32, ranges: &[Range]) -> Vec<u8> {
        let header = CmdHeader {
            opcode: op,
            flags: 0,
            tag: 0x7a9,
            count: ranges.len() as u32,
            reserved: 0,
        };
        let mut bytes = header.to_bytes().to_vec();
        for range in ranges {
            bytes.extend_from_slice(&range.to_bytes());
        }
        bytes
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn guest(mem: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn vram(f: &Fixture, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        f.engine.vram().read(offset, &mut buf).unwrap();
        buf
    }

    fn ok(bytes: u64) -> Response {
        Response {
            status: status::OK,
            failed_index: 0,
            bytes,
        }
    }

    fn range(src: u64, dst: u64, len: u32, flags: u32) -> Range {
        Range {
            src,
            dst,
            len,
            flags,
        }
    }

    /// Snapshot of all guest RAM and VRAM, to show a failed command changed nothing.
    fn everything(f: &Fixture) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        (
            guest(&f.mem, RAM0, 2 * RAM_LEN),
            guest(&f.mem, RAM2, RAM_LEN),
            vram(f, 0, VRAM_SIZE as usize),
        )
    }

    #[test]
    fn nop_completes() {
        let f = fixture();
        assert_eq!(f.engine.execute(&f.mem, &command(opcode::NOP, &[])), ok(0));
        assert_eq!(f.engine.stats().snapshot().commands_ok, 1);
    }

    #[test]
    fn copies_in_all_four_directions() {
        let f = fixture();
        let data = pattern(10_000, 3);
        f.mem
            .write_slice(&data, GuestAddress(RAM0 + 0x100))
            .unwrap();
        let ranges = [
            range(RAM0 + 0x100, 0x2000, 10_000, DST_VRAM), // guest -> VRAM
            range(0x2000, 0x10_0000, 10_000, SRC_VRAM | DST_VRAM), // VRAM -> VRAM
            range(0x10_0000, RAM2 + 7, 10_000, SRC_VRAM),  // VRAM -> guest
            range(RAM2 + 7, RAM0 + 0x8000, 10_000, 0),     // guest -> guest
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(opcode::COPY, &ranges)),
            ok(40_000)
        );
        assert_eq!(vram(&f, 0x2000, 10_000), data);
        assert_eq!(vram(&f, 0x10_0000, 10_000), data);
        assert_eq!(guest(&f.mem, RAM2 + 7, 10_000), data);
        assert_eq!(guest(&f.mem, RAM0 + 0x8000, 10_000), data);
        let stats = f.engine.stats().snapshot();
        assert_eq!(
            stats,
            StatsSnapshot {
                commands_ok: 1,
                bytes_guest_to_vram: 10_000,
                bytes_vram_to_vram: 10_000,
                bytes_vram_to_guest: 10_000,
                bytes_guest_to_guest: 10_000,
                ..Default::default()
            }
        );
    }

    #[test]
    fn guest_range_may_span_adjacent_regions() {
        let f = fixture();
        let start = RAM1 - 1000;
        let data = pattern(3000, 9);
        f.mem.write_slice(&data, GuestAddress(start)).unwrap();
        let ranges = [
            range(start, 0, 3000, DST_VRAM),
            range(0, start + 5000 - 2000, 3000, SRC_VRAM), // back across the boundary, shifted
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(opcode::COPY, &ranges)),
            ok(6000)
        );
        assert_eq!(vram(&f, 0, 3000), data);
        assert_eq!(guest(&f.mem, start + 3000, 3000), data);
    }

    #[test]
    fn fill_with_odd_length_and_phase_across_regions() {
        let f = fixture();
        let pat = 0x0807_0605_0403_0201u64;
        let expect = |len: usize| -> Vec<u8> { (0..len).map(|i| (i % 8) as u8 + 1).collect() };
        let start = RAM1 - 13; // crosses the region boundary at an odd phase
        let ranges = [range(pat, start, 77, 0), range(pat, 3, 100_003, DST_VRAM)];
        assert_eq!(
            f.engine.execute(&f.mem, &command(opcode::FILL, &ranges)),
            ok(100_080)
        );
        assert_eq!(guest(&f.mem, start, 77), expect(77));
        assert_eq!(
            guest(&f.mem, start + 77, 1),
            [0],
            "FILL wrote past its range"
        );
        assert_eq!(vram(&f, 3, 100_003), expect(100_003));
        assert_eq!(vram(&f, 0, 3), [0, 0, 0]);
        assert_eq!(vram(&f, 100_006, 1), [0]);
        assert_eq!(f.engine.stats().snapshot().bytes_filled, 100_080);
    }

    #[test]
    fn zero_length_ranges_are_allowed_anywhere() {
        let f = fixture();
        let ranges = [
            range(u64::MAX, u64::MAX, 0, 0),
            range(u64::MAX, 0, 0, SRC_VRAM | DST_VRAM),
        ];
        assert_eq!(
            f.engine.execute(&f.mem, &command(opcode::COPY, &ranges)),
            ok(0)
        );
    }

    /// Runs `request` after a valid first range and checks that it fails
    /// with `status` at `failed_index` and that no memory changed.
    fn assert_rejected(f: &Fixture, request: &[u8], status: u32, failed_index: u32) {
        let before = everything(f);
        let failed_before = f.engine.stats().snapshot().commands_failed;
        let response = f.engine.execute(&f.mem, request);
        assert_eq!(
            response,
            Response {
                status,
                failed_index,
                bytes: 0
            },
            "{}",
            status::name(status)
        );
        assert!(
            everything(f) == before,
            "a rejected command modified memory"
        );
        assert_eq!(
            f.engine.stats().snapshot().commands_failed,
            failed_before + 1
        );
    }

    /// A valid range that would change memory if executed.
    fn good() -> Range {
        range(0x5a5a_5a5a_5a5a_5a5a, RAM0, 4096, 0)
    }

    #[test]
    fn bad_guest_addresses_are_rejected_before_any_byte_moves() {
        let f = fixture();
        f.mem
            .write_slice(&pattern(4096, 1), GuestAddress(RAM0))
            .unwrap();
        let copy_good = range(RAM0, 0, 4096, DST_VRAM);
        for (bad, name) in [
            (range(0, 0, 16, DST_VRAM), "below guest RAM"),
            (
                range(RAM1 + RAM_LEN as u64 - 8, 0, 16, DST_VRAM),
                "runs into the hole",
            ),
            (range(RAM2 - 8, 0, 16, DST_VRAM), "starts in the hole"),
            (range(RAM2 + RAM_LEN as u64, 0, 1, DST_VRAM), "past the end"),
            (range(u64::MAX - 7, 0, 16, DST_VRAM), "wraps past u64::MAX"),
            (
                range(u64::MAX, 0, 1, DST_VRAM),
                "last byte of the address space",
            ),
            (range(0, u64::MAX - 7, 16, SRC_VRAM), "destination wraps"),
            (
                range(RAM0, RAM0 - 1, 16, 0),
                "guest-to-guest destination below RAM",
            ),
        ] {
            eprintln!("case: {name}");
            assert_rejected(
                &f,
                &command(opcode::COPY, &[copy_good, bad]),
                status::BAD_GUEST_ADDR,
                1,
            );
        }
        assert_rejected(
            &f,
            &command(opcode::FILL, &[good(), range(7, u64::MAX - 3, 8, 0)]),
            status::BAD_GUEST_ADDR,
            1,
        );
    }

    #[test]
    fn bad_vram_ranges_are_rejected_before_any_byte_moves() {
        let f = fixture();
        let copy_good = range(RAM0, 0, 4096, DST_VRAM);
        for bad in [
            range(RAM0, VRAM_SIZE - 8, 16, DST_VRAM),
            range(RAM0, VRAM_SIZE, 1, DST_VRAM),
            range(RAM0, u64::MAX - 7, 16, DST_VRAM),
            range(VRAM_SIZE - 1, RAM0, 2, SRC_VRAM),
            range(0, VRAM_SIZE, 4096, SRC_VRAM | DST_VRAM),
        ] {
            assert_rejected(
                &f,
                &command(opcode::COPY, &[copy_good, bad]),
                status::BAD_VRAM_RANGE,
                1,
            );
        }
        assert_rejected(
            &f,
            &command(
                opcode::FILL,
                &[good(), range(1, VRAM_SIZE - 4, 8, DST_VRAM)],
            ),
            status::BAD_VRAM_RANGE,
            1,
        );
    }

    #[test]
    fn malformed_commands_are_bad_requests() {
        let f = fixture();
        let header = |opcode, flags, count, reserved| {
            CmdHeader {
                opcode,
                flags,
                tag: 1,
                count,
                reserved,
            }
            .to_bytes()
            .to_vec()
        };
        // Short header.
        assert_rejected(
            &f,
            &command(opcode::NOP, &[])[..CmdHeader::SIZE - 1],
            status::BAD_REQUEST,
            0,
        );
        assert_rejected(&f, &[], status::BAD_REQUEST, 0);
        // Reserved fields.
        assert_rejected(&f, &header(opcode::NOP, 1, 0, 0), status::BAD_REQUEST, 0);
        assert_rejected(
            &f,
            &header(opcode::NOP, 0, 0, 1 << 31),
            status::BAD_REQUEST,
            0,
        );
        // NOP with ranges.
        assert_rejected(&f, &command(opcode::NOP, &[good()]), status::BAD_REQUEST, 0);
        // Unknown range flags, and SRC_VRAM on a FILL, at index 2.
        let good_copy = range(RAM0, RAM0 + 4096, 4096, 0);
        let bad_flags = range(RAM0, RAM0 + 64, 8, 1 << 2);
        assert_rejected(
            &f,
            &command(opcode::COPY, &[good_copy, good_copy, bad_flags]),
            status::BAD_REQUEST,
            2,
        );
        let fill_from_vram = range(0, 0, 8, SRC_VRAM | DST_VRAM);
        assert_rejected(
            &f,
            &command(opcode::FILL, &[good(), good(), fill_from_vram]),
            status::BAD_REQUEST,
            2,
        );
        // Too many ranges: rejected from the header alone.
        let mut too_many = header(opcode::COPY, 0, MAX_RANGES + 1, 0);
        for _ in 0..=MAX_RANGES {
            too_many.extend_from_slice(&good().to_bytes());
        }
        assert_rejected(&f, &too_many, status::BAD_REQUEST, 0);
        // Truncated range list: 3 announced, 2 and a half present.
        let mut truncated = header(opcode::FILL, 0, 3, 0);
        for _ in 0..3 {
            truncated.extend_from_slice(&good().to_bytes());
        }
        truncated.truncate(truncated.len() - Range::SIZE / 2);
        assert_rejected(&f, &truncated, status::BAD_REQUEST, 2);
    }

    #[test]
    fn unknown_opcode_is_unsupported() {
        let f = fixture();
        assert_rejected(&f, &command(3, &[good()]), status::UNSUPPORTED, 0);
        assert_rejected(&f, &command(u32::MAX, &[]), status::UNSUPPORTED, 0);
    }

    #[test]
    fn max_ranges_is_accepted_and_trailing_bytes_ignored() {
        let f = fixture();
        let ranges: Vec<Range> = (0..MAX_RANGES)
            .map(|i| range(u64::from(i), RAM0 + u64::from(i), 1, 0))
            .collect();
        let mut request = command(opcode::FILL, &ranges);
        request.extend_from_slice(&[0xff; 100]);
        assert_eq!(
            f.engine.execute(&f.mem, &request),
            ok(u64::from(MAX_RANGES))
        );
        assert_eq!(guest(&f.mem, RAM0, 4), [0, 1, 2, 3]);
    }

    #[test]
    fn injected_copy_error_leaves_earlier_ranges_done() {
        let f = fixture();
        let data = pattern(4 * 4096, 5);
        f.mem.write_slice(&data, GuestAddress(RAM0)).unwrap();
        let ranges: Vec<Range> = (0..4u64)
            .map(|i| range(RAM0 + i * 4096, i * 4096, 4096, DST_VRAM))
            .collect();
        // Two ranges succeed, the third fails, the fourth never runs.
        f.faults.copy_error_next(2);
        let response = f.engine.execute(&f.mem, &command(opcode::COPY, &ranges));
        assert_eq!(
            response,
            Response {
                status: status::COPY_ERROR,
                failed_index: 2,
                bytes: 8192
            }
        );
        assert_eq!(vram(&f, 0, 8192), data[..8192]);
        assert_eq!(vram(&f, 8192, 8192), vec![0; 8192]);
        let stats = f.engine.stats().snapshot();
        assert_eq!(
            (stats.commands_failed, stats.bytes_guest_to_vram),
            (1, 8192)
        );
        // The fault was one-shot: the retry completes.
        assert_eq!(
            f.engine.execute(&f.mem, &command(opcode::COPY, &ranges)),
            ok(4 * 4096)
        );
        assert_eq!(vram(&f, 0, 4 * 4096), data);
        // Armed with 0, the very next range fails, even across commands.
        f.faults.copy_error_next(0);
        let response = f.engine.execute(&f.mem, &command(opcode::FILL, &[good()]));
        assert_eq!(
            response,
            Response {
                status: status::COPY_ERROR,
                failed_index: 0,
                bytes: 0
            }
        );
        f.faults.copy_error_next(5);
        f.faults.clear();
        assert_eq!(
            f.engine.execute(&f.mem, &command(opcode::FILL, &[good()])),
            ok(4096)
        );
    }
}
