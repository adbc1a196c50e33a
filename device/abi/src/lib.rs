// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The hmmgpu device interface (see docs/device-spec.md).
//!
//! The definitions live in `abi.rs` so that the guest driver can compile the
//! very same file as a module of its own crate (`#[path]`); this root only
//! makes it a `no_std` crate for the backend.
#![no_std]
#![deny(missing_docs)]

include!("abi.rs");

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
        let h = CmdHeader {
            opcode: opcode::MAP,
            ctx: 3,
            tag: u64::MAX - 1,
            count: 7,
            reserved: 0,
        };
        assert_eq!(CmdHeader::from_bytes(&h.to_bytes()), Some(h));
        let r = Range {
            src: 1 << 40,
            dst: 3,
            len: 4096,
            flags: range_flags::DST_VRAM,
        };
        assert_eq!(Range::from_bytes(&r.to_bytes()), Some(r));
        let s = Response {
            status: status::COPY_ERROR,
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
        assert_eq!(
            range_flags::MAP_ALL & (range_flags::ATOMIC_ADD | range_flags::ATOMIC_XCHG),
            0
        );
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
    }
}
