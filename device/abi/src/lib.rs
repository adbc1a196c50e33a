// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The hmmgpu device interface (see docs/device-spec.md).
//!
//! The definitions live in `abi.rs` so that the guest driver can compile the
//! very same file as a module of its own crate (`#[path]`); this root only
//! makes it a `no_std` crate for the backend. The driver's C shim gets the
//! constants it needs from `guest-driver/hmmgpu_abi.h`, which the tests here
//! render from the same definitions and compare with the checked-in file.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

include!("abi.rs");

#[cfg(test)]
mod c_header;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_round_trip() {
        let c = DeviceConfig {
            magic: CONFIG_MAGIC,
            version: ABI_VERSION,
            vram_size: 0x1234_5678_9abc,
            page_size: 4096,
            max_ranges: MAX_RANGES,
            max_contexts: MAX_CONTEXTS,
            reserved: 0,
        };
        assert_eq!(DeviceConfig::from_bytes(&c.to_bytes()), Some(c));
        let h = CmdHeader::new(Opcode::Map, 3, u64::MAX - 1, 7);
        assert_eq!(CmdHeader::from_bytes(&h.to_bytes()), Some(h));
        let r = Range::new(1 << 40, 3, 4096, RangeFlags::DST_VRAM);
        assert_eq!(Range::from_bytes(&r.to_bytes()), Some(r));
        let s = Response {
            status: Status::CopyError,
            failed_index: 9,
            bytes: 1 << 33,
        };
        assert_eq!(Response::from_bytes(&s.to_bytes()), Some(s));
        let e = Event {
            kind: event::FAULT,
            ctx: 9,
            addr: u64::MAX - 5,
            access: event::ACCESS_ATOMIC,
            reason: event::REASON_PERMISSION,
            seq: 1 << 40,
        };
        assert_eq!(Event::from_bytes(&e.to_bytes()), Some(e));
    }

    #[test]
    fn sizes_and_counter_names() {
        assert_eq!(DeviceConfig::SIZE, 32);
        assert_eq!(Event::SIZE, 32);
        const { assert!(counter::COUNT * 8 <= counter::BLOCK_SIZE) };
        assert_eq!(counter::NAMES[counter::EVENTS_DROPPED], "events_dropped");
        assert!(!RangeFlags::MAP_ALL.contains(RangeFlags::ATOMIC_ADD));
        assert!(!RangeFlags::MAP_ALL.contains(RangeFlags::ATOMIC_XCHG));
        let c = DeviceConfig {
            max_contexts: 0x0102_0304,
            ..Default::default()
        };
        assert_eq!(&c.to_bytes()[24..28], &[4, 3, 2, 1]);
    }

    #[test]
    fn wire_format_is_little_endian() {
        let h = CmdHeader {
            opcode: 0x0102_0304,
            ..Default::default()
        };
        assert_eq!(&h.to_bytes()[..4], &[4, 3, 2, 1]);
        assert_eq!(&CONFIG_MAGIC.to_le_bytes(), b"HMMG");
        assert_eq!(PCI_DEVICE_ID_HMMGPU, 0x107f);
    }

    #[test]
    fn short_input_is_rejected() {
        assert_eq!(CmdHeader::from_bytes(&[0; CmdHeader::SIZE - 1]), None);
        assert_eq!(Range::from_bytes(&[]), None);
        assert_eq!(Response::from_bytes(&[0; 15]), None);
        assert_eq!(DeviceConfig::from_bytes(&[0; DeviceConfig::SIZE - 1]), None);
        assert_eq!(Event::from_bytes(&[0; Event::SIZE - 1]), None);
        // A response with a status this side does not know is no response.
        let mut unknown = Response::ok(0).to_bytes();
        unknown[0] = 8;
        assert_eq!(Response::from_bytes(&unknown), None);
    }

    #[test]
    fn enums_round_trip_through_their_wire_values() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::try_from(op.bits()), Ok(op));
        }
        for status in Status::ALL {
            assert_eq!(Status::try_from(status.bits()), Ok(status));
        }
        // The wire values the spec gives.
        assert_eq!(Opcode::Counters.bits(), 26);
        assert_eq!(Status::BadContext.bits(), 7);
        for bad in [3, 15, 23, 27, u32::MAX] {
            assert_eq!(Opcode::try_from(bad), Err(UnknownOpcode(bad)));
        }
        assert_eq!(Status::try_from(8), Err(UnknownStatus(8)));
        assert_eq!(AtomicOp::try_from(1 << 8), Ok(AtomicOp::Add));
        assert_eq!(AtomicOp::try_from(2 << 8), Ok(AtomicOp::Xchg));
        for bad in [0, 3 << 8, (1 << 8) | 1] {
            assert_eq!(AtomicOp::try_from(bad), Err(UnknownAtomicOp(bad)));
        }
        assert_eq!(RangeFlags::MAP_ALL.bits(), 0xf1);
        assert_eq!(ContextId::new(0), None);
        assert_eq!(ContextId::new(MAX_CONTEXTS + 1), None);
        assert_eq!(
            ContextId::new(MAX_CONTEXTS).map(ContextId::get),
            Some(MAX_CONTEXTS)
        );
    }

    /// The bytes of a command: header then ranges, in a fixed buffer (no
    /// allocation in this crate).
    struct Request {
        bytes: [u8; CmdHeader::SIZE + 4 * Range::SIZE],
        len: usize,
    }

    impl Request {
        fn new(opcode: u32, ctx: u32, ranges: &[Range]) -> Self {
            let header = CmdHeader {
                opcode,
                ctx,
                tag: 5,
                count: ranges.len() as u32,
                reserved: 0,
            };
            let mut bytes = [0u8; CmdHeader::SIZE + 4 * Range::SIZE];
            bytes[..CmdHeader::SIZE].copy_from_slice(&header.to_bytes());
            for (i, r) in ranges.iter().enumerate() {
                let at = CmdHeader::SIZE + i * Range::SIZE;
                bytes[at..at + Range::SIZE].copy_from_slice(&r.to_bytes());
            }
            Self {
                bytes,
                len: CmdHeader::SIZE + ranges.len() * Range::SIZE,
            }
        }

        fn bytes(&self) -> &[u8] {
            &self.bytes[..self.len]
        }
    }

    fn raw(src: u64, dst: u64, len: u32, flags: RangeFlags) -> Range {
        Range::new(src, dst, len, flags)
    }

    fn rejected(status: Status, failed_index: u32) -> Result<(), Rejected> {
        Err(Rejected {
            status,
            failed_index,
        })
    }

    fn decode(opcode: Opcode, ctx: u32, ranges: &[Range]) -> Result<(), Rejected> {
        Command::decode(Request::new(opcode.bits(), ctx, ranges).bytes()).map(drop)
    }

    #[test]
    fn decode_types_every_opcode() {
        let ctx = ContextId::new(3).unwrap();
        let copy = raw(0x1000, 0x2000, 64, RangeFlags::DST_VRAM);
        let request = Request::new(Opcode::Copy.bits(), 0, &[copy, copy]);
        let Ok(Command::Copy(ranges)) = Command::decode(request.bytes()) else {
            panic!("not a COPY");
        };
        assert_eq!(ranges.len(), 2);
        let first = ranges.iter().next().unwrap();
        assert_eq!(
            first,
            CopyRange {
                src: Phys::Guest(0x1000),
                dst: Phys::Vram(0x2000),
                len: 64
            }
        );
        let map = raw(
            0x20_0000,
            0x40_0000,
            HUGE_PAGE_SIZE as u32,
            RangeFlags::SRC_VRAM | RangeFlags::MAP_READ | RangeFlags::MAP_HUGE,
        );
        let request = Request::new(Opcode::Map.bits(), 3, &[map]);
        let Ok(Command::Map(got_ctx, ranges)) = Command::decode(request.bytes()) else {
            panic!("not a MAP");
        };
        assert_eq!(got_ctx, ctx);
        assert_eq!(
            ranges.iter().next(),
            Some(MapRange {
                va: 0x40_0000,
                phys: Phys::Vram(0x20_0000),
                len: HUGE_PAGE_SIZE,
                perms: Access::READ,
                huge: true
            })
        );
        let request = Request::new(
            Opcode::Vwrite.bits(),
            3,
            &[raw(7, 0x9000, 5, RangeFlags::NONE)],
        );
        let Ok(Command::Vwrite(_, ranges)) = Command::decode(request.bytes()) else {
            panic!("not a VWRITE");
        };
        assert_eq!(
            ranges.iter().next(),
            Some(TransferRange {
                va: 0x9000,
                buffer: 7,
                len: 5
            })
        );
        let request = Request::new(
            Opcode::Atomic.bits(),
            3,
            &[raw(9, 0x8, 8, RangeFlags::ATOMIC_XCHG)],
        );
        assert!(matches!(
            Command::decode(request.bytes()),
            Ok(Command::Atomic(c, AtomicRange { va: 8, op: AtomicOp::Xchg, operand: 9 })) if c == ctx
        ));
        for op in Opcode::ALL {
            let ctx = u32::from(op.takes_context());
            let range = match op {
                Opcode::Atomic => raw(0, 0, 8, RangeFlags::ATOMIC_ADD),
                Opcode::Counters => raw(0, 0, 128, RangeFlags::NONE),
                Opcode::Map => raw(0, 0, 4096, RangeFlags::MAP_READ),
                _ => raw(0, 0, 0, RangeFlags::NONE),
            };
            let ranges = match op.range_count() {
                RangeCount::None => &[][..],
                _ => core::slice::from_ref(&range),
            };
            let request = Request::new(op.bits(), ctx, ranges);
            let command = Command::decode(request.bytes()).unwrap();
            assert_eq!(command.opcode(), op);
        }
    }

    #[test]
    fn decode_checks_the_header_in_order() {
        let nop = Request::new(Opcode::Nop.bits(), 0, &[]);
        assert_eq!(
            Command::decode(&nop.bytes()[..CmdHeader::SIZE - 1]).map(drop),
            rejected(Status::BadRequest, 0)
        );
        // Unknown opcode wins over every other defect.
        let mut bad = Request::new(99, 7, &[]);
        bad.bytes[20] = 1;
        assert_eq!(
            Command::decode(bad.bytes()).map(drop),
            rejected(Status::Unsupported, 0)
        );
        let mut reserved = Request::new(Opcode::Nop.bits(), 7, &[]);
        reserved.bytes[23] = 0x80;
        assert_eq!(
            Command::decode(reserved.bytes()).map(drop),
            rejected(Status::BadRequest, 0)
        );
        assert_eq!(decode(Opcode::Nop, 1, &[]), rejected(Status::BadContext, 0));
        for ctx in [0, MAX_CONTEXTS + 1] {
            assert_eq!(
                decode(Opcode::Replay, ctx, &[]),
                rejected(Status::BadContext, 0)
            );
        }
        let any = raw(0, 0, 0, RangeFlags::NONE);
        assert_eq!(
            decode(Opcode::Nop, 0, &[any]),
            rejected(Status::BadRequest, 0)
        );
        assert_eq!(
            decode(Opcode::Atomic, 1, &[]),
            rejected(Status::BadRequest, 0)
        );
        assert_eq!(
            decode(Opcode::Cancel, 1, &[any]),
            rejected(Status::BadRequest, 0)
        );
        // Too many ranges, from the header alone.
        let mut many = Request::new(Opcode::Copy.bits(), 0, &[]);
        many.bytes[16..20].copy_from_slice(&(MAX_RANGES + 1).to_le_bytes());
        assert_eq!(
            Command::decode(many.bytes()).map(drop),
            rejected(Status::BadRequest, 0)
        );
        // Three announced, two and a half present.
        let three = Request::new(Opcode::Fill.bits(), 0, &[any, any, any]);
        let cut = &three.bytes()[..three.len - Range::SIZE / 2];
        assert_eq!(
            Command::decode(cut).map(drop),
            rejected(Status::BadRequest, 2)
        );
        // Trailing bytes are ignored.
        let mut trailing = Request::new(Opcode::Nop.bits(), 0, &[]);
        trailing.len += 7;
        assert!(matches!(
            Command::decode(trailing.bytes()),
            Ok(Command::Nop)
        ));
    }

    #[test]
    fn decode_checks_each_range_for_its_opcode() {
        let ok = raw(0, 0, 4096, RangeFlags::NONE);
        let cases: [(Opcode, Range); 20] = [
            (
                Opcode::Copy,
                raw(0, 0, 8, RangeFlags::from_bits_retain(1 << 2)),
            ),
            (Opcode::Fill, raw(0, 0, 8, RangeFlags::SRC_VRAM)),
            (Opcode::Map, raw(0, 0, 4096, RangeFlags::DST_VRAM)),
            (
                Opcode::Map,
                raw(0, 0, 4096, RangeFlags::from_bits_retain(1 << 8)),
            ),
            (Opcode::Map, raw(0, 0, 4095, RangeFlags::MAP_READ)),
            (Opcode::Map, raw(0x800, 0, 4096, RangeFlags::MAP_READ)),
            (Opcode::Map, raw(0, 0x800, 4096, RangeFlags::MAP_READ)),
            (Opcode::Map, raw(0, 0, 4096, RangeFlags::MAP_HUGE)),
            (Opcode::Map, raw(0x1000, 0, 2 << 20, RangeFlags::MAP_HUGE)),
            (Opcode::Map, raw(0, !0xfff, 0x2000, RangeFlags::MAP_READ)),
            (Opcode::Map, raw(!0xfff, 0, 0x2000, RangeFlags::MAP_READ)),
            (Opcode::Unmap, raw(0, 0, 1, RangeFlags::SRC_VRAM)),
            (Opcode::Unmap, raw(0, u64::MAX, 2, RangeFlags::NONE)),
            (Opcode::Vread, raw(u64::MAX - 7, 0, 16, RangeFlags::NONE)),
            (Opcode::Vread, raw(0, 0, 16, RangeFlags::DST_VRAM)),
            (Opcode::Vwrite, raw(0, u64::MAX - 7, 16, RangeFlags::NONE)),
            (Opcode::Atomic, raw(1, 4, 8, RangeFlags::ATOMIC_ADD)),
            (Opcode::Atomic, raw(1, 0, 4, RangeFlags::ATOMIC_ADD)),
            (
                Opcode::Atomic,
                raw(1, 0, 8, RangeFlags::ATOMIC_ADD | RangeFlags::MAP_READ),
            ),
            (Opcode::Counters, raw(0, 0, 127, RangeFlags::NONE)),
        ];
        for (op, bad) in cases {
            let ctx = u32::from(op.takes_context());
            let index = match op.range_count() {
                RangeCount::Any => {
                    let good = if op == Opcode::Map {
                        raw(0, 0, 4096, RangeFlags::MAP_READ)
                    } else {
                        ok
                    };
                    assert_eq!(
                        decode(op, ctx, &[good, bad]),
                        rejected(Status::BadRequest, 1),
                        "{op:?} {bad:?}"
                    );
                    continue;
                }
                _ => 0,
            };
            assert_eq!(
                decode(op, ctx, &[bad]),
                rejected(Status::BadRequest, index),
                "{op:?} {bad:?}"
            );
        }
        // Edges that are fine: a range ending exactly at 2^64, empty MAP.
        let top = raw(0, u64::MAX, 1, RangeFlags::NONE);
        assert_eq!(decode(Opcode::Unmap, 1, &[top]), Ok(()));
        let empty = raw(0, 0, 0, RangeFlags::MAP_READ);
        assert_eq!(decode(Opcode::Map, 1, &[empty]), Ok(()));
        let nothing = raw(u64::MAX, u64::MAX, 0, RangeFlags::NONE);
        assert_eq!(decode(Opcode::Copy, 0, &[nothing]), Ok(()));
    }
}
