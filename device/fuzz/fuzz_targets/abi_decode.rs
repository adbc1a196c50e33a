// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The device interface's decoders on any bytes: no panic, wire structs
//! round-trip, and what `Command::decode` accepts satisfies every rule it
//! claims to check (docs/device-spec.md, "Commands").
#![no_main]

use hmmgpu_abi::{
    CmdHeader, Command, DeviceConfig, Event, Opcode, Range, RangeCount, Response, Status,
    HUGE_PAGE_SIZE, MAX_RANGES, PAGE_SIZE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    round_trips(data);
    let header = CmdHeader::from_bytes(data);
    match Command::decode(data) {
        Ok(command) => {
            let header = header.expect("decode accepted a short header");
            accepted(data, &header, &command);
        }
        Err(rejected) => {
            assert!(matches!(
                rejected.status,
                Status::Unsupported | Status::BadRequest | Status::BadContext
            ));
            if let Some(header) = header {
                assert!(rejected.failed_index <= header.count.min(MAX_RANGES));
            } else {
                assert_eq!(rejected.failed_index, 0);
            }
        }
    }
});

fn round_trips(data: &[u8]) {
    if let Some(h) = CmdHeader::from_bytes(data) {
        assert_eq!(h.to_bytes()[..], data[..CmdHeader::SIZE]);
    }
    if let Some(r) = Range::from_bytes(data) {
        assert_eq!(r.to_bytes()[..], data[..Range::SIZE]);
    }
    if let Some(e) = Event::from_bytes(data) {
        assert_eq!(e.to_bytes()[..], data[..Event::SIZE]);
    }
    if let Some(c) = DeviceConfig::from_bytes(data) {
        assert_eq!(c.to_bytes()[..], data[..DeviceConfig::SIZE]);
    }
    match Response::from_bytes(data) {
        Some(r) => assert_eq!(r.to_bytes()[..], data[..Response::SIZE]),
        None if data.len() >= Response::SIZE => {
            let status = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            assert!(Status::try_from(status).is_err(), "a known status refused");
        }
        None => {}
    }
}

/// `command` was decoded from `data` (header `header`).
fn accepted(data: &[u8], header: &CmdHeader, command: &Command<'_>) {
    let op = command.opcode();
    assert_eq!(op.bits(), header.opcode);
    assert_eq!(header.reserved, 0);
    assert!(header.count <= MAX_RANGES);
    assert_eq!(op.takes_context(), header.ctx != 0);
    match op.range_count() {
        RangeCount::None => assert_eq!(header.count, 0),
        RangeCount::One => assert_eq!(header.count, 1),
        RangeCount::Any => {}
    }
    assert!(data.len() >= CmdHeader::SIZE + header.count as usize * Range::SIZE);
    let count = header.count as usize;
    // Every range decode let through is yielded, and obeys its opcode.
    let fits = |start: u64, len: u64| len == 0 || start.checked_add(len - 1).is_some();
    match command {
        Command::Copy(ranges) => assert_eq!(ranges.iter().count(), count),
        Command::Fill(ranges) => assert_eq!(ranges.iter().count(), count),
        Command::Map(_, ranges) => {
            assert_eq!(ranges.iter().count(), count);
            for m in ranges.iter() {
                let align = if m.huge { HUGE_PAGE_SIZE } else { PAGE_SIZE };
                assert!(m.va % align == 0 && m.len % PAGE_SIZE == 0);
                assert!(!m.huge || m.len == HUGE_PAGE_SIZE);
                assert!(fits(m.va, m.len));
            }
        }
        Command::Unmap(_, ranges) => {
            assert_eq!(ranges.iter().count(), count);
            assert!(ranges.iter().all(|r| fits(r.va, r.len)));
        }
        Command::Vread(_, ranges) | Command::Vwrite(_, ranges) => {
            assert_eq!(ranges.iter().count(), count);
            assert!(ranges.iter().all(|r| fits(r.va, u64::from(r.len))));
        }
        Command::Atomic(_, range) => assert_eq!(range.va % 8, 0),
        Command::Counters(range) => assert!(range.len >= 128),
        _ => assert!(matches!(
            op,
            Opcode::Nop | Opcode::CtxCreate | Opcode::CtxDestroy | Opcode::Replay | Opcode::Cancel
        )),
    }
}
