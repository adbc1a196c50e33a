// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! `guest-driver/hmmgpu_abi.h`, the constants the driver's C shim needs,
//! rendered from the definitions in `abi.rs` so the two languages cannot
//! disagree. The test fails when the checked-in header differs from the
//! rendering; `HMMGPU_BLESS=1 cargo test -p hmmgpu-abi` rewrites it.

extern crate std;

use std::fmt::Write as _;
use std::string::String;

use super::*;

/// Where the header lives, from this crate's directory.
const HEADER: &str = "../../guest-driver/hmmgpu_abi.h";

/// The header's text.
pub fn render() -> String {
    let mut defines: std::vec::Vec<(String, String, &str)> = std::vec![
        def("VIRTIO_ID", VIRTIO_ID_HMMGPU, "virtio device id"),
        def(
            "PCI_DEVICE_ID",
            PCI_DEVICE_ID_HMMGPU,
            "modern virtio-pci device id"
        ),
        def(
            "SHM_ID_VRAM",
            SHM_ID_VRAM,
            "virtio shared memory region of the VRAM"
        ),
        def("QUEUE_COMMAND", QUEUE_COMMAND, "command virtqueue index"),
        def("QUEUE_EVENT", QUEUE_EVENT, "event virtqueue index"),
        def("NUM_QUEUES", NUM_QUEUES, "virtqueues"),
        def("QUEUE_SIZE", QUEUE_SIZE, "most descriptors per virtqueue"),
        def("PAGE_SIZE", PAGE_SIZE, "device page size"),
        def("HUGE_PAGE_SIZE", HUGE_PAGE_SIZE, "huge device MMU entry"),
        (
            "CONFIG_MAGIC".into(),
            std::format!("0x{CONFIG_MAGIC:08x}u"),
            "DeviceConfig.magic (\"HMMG\")",
        ),
        def("ABI_VERSION", ABI_VERSION, "DeviceConfig.version"),
        def("MAX_RANGES", MAX_RANGES, "most ranges per command"),
        def(
            "MAX_CONTEXTS",
            MAX_CONTEXTS,
            "device MMU contexts are 1..=this"
        ),
        def(
            "CONFIG_SIZE",
            DeviceConfig::SIZE,
            "bytes of the config space"
        ),
        def("CONFIG_OFF_MAGIC", DeviceConfig::OFF_MAGIC, ""),
        def("CONFIG_OFF_VERSION", DeviceConfig::OFF_VERSION, ""),
        def("CONFIG_OFF_VRAM_SIZE", DeviceConfig::OFF_VRAM_SIZE, ""),
        def("CONFIG_OFF_PAGE_SIZE", DeviceConfig::OFF_PAGE_SIZE, ""),
        def("CONFIG_OFF_MAX_RANGES", DeviceConfig::OFF_MAX_RANGES, ""),
        def(
            "CONFIG_OFF_MAX_CONTEXTS",
            DeviceConfig::OFF_MAX_CONTEXTS,
            ""
        ),
        def(
            "CMD_HEADER_SIZE",
            CmdHeader::SIZE,
            "bytes of a command header"
        ),
        def("CMD_OFF_OPCODE", CmdHeader::OFF_OPCODE, ""),
        def("CMD_OFF_CTX", CmdHeader::OFF_CTX, ""),
        def("CMD_OFF_TAG", CmdHeader::OFF_TAG, ""),
        def("CMD_OFF_COUNT", CmdHeader::OFF_COUNT, ""),
        def("CMD_OFF_RESERVED", CmdHeader::OFF_RESERVED, ""),
        def("RANGE_SIZE", Range::SIZE, "bytes of a range"),
        def("RANGE_OFF_SRC", Range::OFF_SRC, ""),
        def("RANGE_OFF_DST", Range::OFF_DST, ""),
        def("RANGE_OFF_LEN", Range::OFF_LEN, ""),
        def("RANGE_OFF_FLAGS", Range::OFF_FLAGS, ""),
        def("RANGE_SRC_VRAM", RangeFlags::SRC_VRAM.bits(), "Range.flags"),
        def("RANGE_DST_VRAM", RangeFlags::DST_VRAM.bits(), "Range.flags"),
        def("RANGE_MAP_READ", RangeFlags::MAP_READ.bits(), "Range.flags"),
        def(
            "RANGE_MAP_WRITE",
            RangeFlags::MAP_WRITE.bits(),
            "Range.flags"
        ),
        def(
            "RANGE_MAP_ATOMIC",
            RangeFlags::MAP_ATOMIC.bits(),
            "Range.flags"
        ),
        def("RANGE_MAP_HUGE", RangeFlags::MAP_HUGE.bits(), "Range.flags"),
        def(
            "RANGE_ATOMIC_ADD",
            RangeFlags::ATOMIC_ADD.bits(),
            "Range.flags"
        ),
        def(
            "RANGE_ATOMIC_XCHG",
            RangeFlags::ATOMIC_XCHG.bits(),
            "Range.flags"
        ),
        def("RESPONSE_SIZE", Response::SIZE, "bytes of a response"),
        def("RESPONSE_OFF_STATUS", Response::OFF_STATUS, ""),
        def("RESPONSE_OFF_FAILED_INDEX", Response::OFF_FAILED_INDEX, ""),
        def("RESPONSE_OFF_BYTES", Response::OFF_BYTES, ""),
        def("EVENT_SIZE", Event::SIZE, "bytes of an event buffer"),
        def("EVENT_FAULT", event::FAULT, "Event.kind"),
        def("EVENT_ECC", event::ECC, "Event.kind"),
        def("EVENT_RESTARTED", event::RESTARTED, "Event.kind"),
        def(
            "COUNTERS_SIZE",
            counter::BLOCK_SIZE,
            "bytes COUNTERS writes"
        ),
    ];
    for op in Opcode::ALL {
        defines.push(def(&std::format!("OP_{}", op.name()), op.bits(), ""));
    }
    for status in Status::ALL {
        let name = status.name().to_uppercase().replace('-', "_");
        defines.push(def(&std::format!("STATUS_{name}"), status.bits(), ""));
    }
    let mut out = String::new();
    out.push_str(
        "/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */\n\
         /*\n \
         * The hmmgpu device interface for C: generated from device/abi/src/abi.rs\n \
         * by the hmmgpu-abi crate's tests (HMMGPU_BLESS=1 cargo test -p hmmgpu-abi\n \
         * rewrites it). Do not edit; see docs/device-spec.md.\n \
         */\n\
         #ifndef HMMGPU_ABI_H\n\
         #define HMMGPU_ABI_H\n\n",
    );
    let width = defines.iter().map(|(n, _, _)| n.len()).max().unwrap_or(0) + "HMMGPU_".len();
    for (name, value, comment) in defines {
        let name = std::format!("HMMGPU_{name}");
        let _ = write!(out, "#define {name:<width$} {value}");
        if !comment.is_empty() {
            let _ = write!(out, "\t/* {comment} */");
        }
        out.push('\n');
    }
    out.push_str("\n#endif /* HMMGPU_ABI_H */\n");
    out
}

/// One `#define`: unsigned values get a `u` (`ULL` past 32 bits).
fn def(
    name: &str,
    value: impl TryInto<u64>,
    comment: &'static str,
) -> (String, String, &'static str) {
    // Every constant here fits in 64 bits.
    let value: u64 = value.try_into().unwrap_or(u64::MAX);
    let suffix = if u32::try_from(value).is_ok() {
        "u"
    } else {
        "ull"
    };
    (name.into(), std::format!("{value}{suffix}"), comment)
}

#[test]
fn checked_in_header_matches_the_abi() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(HEADER);
    let want = render();
    if std::env::var_os("HMMGPU_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} is out of date with abi.rs; regenerate it with \
         HMMGPU_BLESS=1 cargo test -p hmmgpu-abi\n--- rendered ---\n{want}",
        path.display()
    );
}
