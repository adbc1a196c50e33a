// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//
// The hmmgpu device interface: the one source of truth for both sides.
//
// docs/device-spec.md describes these in prose; this file is what the backend
// (device/) and the guest driver (guest-driver/, through `#[path]`) compile.
// It has no dependencies and no `unsafe`, so it builds in the kernel too.
// Every multi-byte field on the wire is little-endian; structs are encoded
// and decoded field by field, never by casting memory, so big-endian hosts
// and guests work unchanged.

/// Virtio device id of hmmgpu (virtio-pci device id 0x1040 + 63 = 0x107f,
/// the last one Linux's modern virtio-pci accepts).
pub const VIRTIO_ID_HMMGPU: u32 = 63;
/// PCI device id of the modern virtio-pci function.
pub const PCI_DEVICE_ID_HMMGPU: u16 = 0x1040 + VIRTIO_ID_HMMGPU as u16;

/// Virtio shared memory region id of the VRAM.
pub const SHM_ID_VRAM: u8 = 0;

/// Queue index of the command queue (driver -> device work).
pub const QUEUE_COMMAND: u16 = 0;
/// Queue index of the event queue (device -> driver: faults and errors, in
/// device-writable buffers of [`Event::SIZE`] bytes the driver posts).
pub const QUEUE_EVENT: u16 = 1;
/// Number of virtqueues the device has.
pub const NUM_QUEUES: usize = 2;
/// Maximum size of each virtqueue. (QEMU 10.0.13 as Debian ships it sizes
/// every virtqueue at 1024, its maximum.)
pub const QUEUE_SIZE: u16 = 1024;

/// The device's page size: VRAM is managed, and migrations are done, in
/// units of this size.
pub const PAGE_SIZE: u64 = 4096;

/// Magic value in [`DeviceConfig::magic`]: "HMMG" read as a little-endian u32.
pub const CONFIG_MAGIC: u32 = u32::from_le_bytes(*b"HMMG");
/// Interface version in [`DeviceConfig::version`].
pub const ABI_VERSION: u32 = 1;
/// Most ranges one command may carry.
pub const MAX_RANGES: u32 = 4096;
/// Device MMU contexts are numbered 1..=MAX_CONTEXTS (0 means "physical").
pub const MAX_CONTEXTS: u32 = 4096;
/// Size of a huge device MMU entry ([`range_flags::MAP_HUGE`]).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Reads a little-endian u32 at `off` of `b` (caller checked the length).
const fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Reads a little-endian u64 at `off` of `b` (caller checked the length).
const fn le64(b: &[u8], off: usize) -> u64 {
    (le32(b, off) as u64) | ((le32(b, off + 4) as u64) << 32)
}

/// Writes `v` little-endian at `off` of `b`.
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at `off` of `b`.
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The device-specific virtio config space (read-only for the driver).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// [`CONFIG_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub version: u32,
    /// Size of the VRAM in bytes; equals the length of shared memory region
    /// [`SHM_ID_VRAM`].
    pub vram_size: u64,
    /// [`PAGE_SIZE`].
    pub page_size: u32,
    /// [`MAX_RANGES`]: most ranges a command may carry.
    pub max_ranges: u32,
    /// [`MAX_CONTEXTS`]: highest device MMU context id.
    pub max_contexts: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl DeviceConfig {
    /// Encoded size in bytes.
    pub const SIZE: usize = 32;
    /// Byte offset of `magic` in the config space.
    pub const OFF_MAGIC: usize = 0;
    /// Byte offset of `version`.
    pub const OFF_VERSION: usize = 4;
    /// Byte offset of `vram_size`.
    pub const OFF_VRAM_SIZE: usize = 8;
    /// Byte offset of `page_size`.
    pub const OFF_PAGE_SIZE: usize = 16;
    /// Byte offset of `max_ranges`.
    pub const OFF_MAX_RANGES: usize = 20;
    /// Byte offset of `max_contexts`.
    pub const OFF_MAX_CONTEXTS: usize = 24;

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put32(&mut b, Self::OFF_MAGIC, self.magic);
        put32(&mut b, Self::OFF_VERSION, self.version);
        put64(&mut b, Self::OFF_VRAM_SIZE, self.vram_size);
        put32(&mut b, Self::OFF_PAGE_SIZE, self.page_size);
        put32(&mut b, Self::OFF_MAX_RANGES, self.max_ranges);
        put32(&mut b, Self::OFF_MAX_CONTEXTS, self.max_contexts);
        put32(&mut b, Self::OFF_MAX_CONTEXTS + 4, self.reserved);
        b
    }

    /// Decodes from the wire format; `None` if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Self {
            magic: le32(b, Self::OFF_MAGIC),
            version: le32(b, Self::OFF_VERSION),
            vram_size: le64(b, Self::OFF_VRAM_SIZE),
            page_size: le32(b, Self::OFF_PAGE_SIZE),
            max_ranges: le32(b, Self::OFF_MAX_RANGES),
            max_contexts: le32(b, Self::OFF_MAX_CONTEXTS),
            reserved: le32(b, Self::OFF_MAX_CONTEXTS + 4),
        })
    }
}

/// Command opcodes ([`CmdHeader::opcode`]).
pub mod opcode {
    /// Does nothing; completes with [`super::status::OK`]. A fence: the
    /// device completes commands in order.
    pub const NOP: u32 = 0;
    /// Copies every range from its source to its destination.
    pub const COPY: u32 = 1;
    /// Fills every range's destination with the 8-byte pattern in its `src`.
    pub const FILL: u32 = 2;

    // Device MMU (header `ctx` is the context, 1..=MAX_CONTEXTS).

    /// Creates context `ctx` with an empty page table.
    pub const CTX_CREATE: u32 = 16;
    /// Destroys context `ctx`: drops its translations and cancels its
    /// parked command (which completes with FAULT).
    pub const CTX_DESTROY: u32 = 17;
    /// Maps device virtual `dst` (+`len`) to physical `src` (guest-physical,
    /// or a VRAM offset with SRC_VRAM) with the MAP_* permissions; replaces
    /// any existing translation. `len` is a multiple of PAGE_SIZE, or
    /// HUGE_PAGE_SIZE with MAP_HUGE (both sides 2 MiB aligned).
    pub const MAP: u32 = 18;
    /// Removes every translation overlapping `dst`..`dst+len` (a huge entry
    /// is removed whole). When it completes no later device access uses
    /// the old translations.
    pub const UNMAP: u32 = 19;
    /// Reads device virtual `src` (+`len`) into guest-physical `dst`.
    pub const VREAD: u32 = 20;
    /// Writes guest-physical `src` (+`len`) to device virtual `dst`.
    pub const VWRITE: u32 = 21;
    /// Atomic on the 8-byte little-endian word at device virtual `dst`
    /// (8-aligned, `len` 8): the ATOMIC_* op in `flags` with operand `src`.
    /// The response's `bytes` is the old value.
    pub const ATOMIC: u32 = 22;
    /// Resumes the command of `ctx` parked on a device fault.
    pub const REPLAY: u32 = 24;
    /// Fails the command of `ctx` parked on a device fault (status FAULT).
    pub const CANCEL: u32 = 25;
    /// Writes the device counters ([`super::counter`]) to guest-physical
    /// `dst` of the one range (`len` >= COUNTERS_SIZE).
    pub const COUNTERS: u32 = 26;
}

/// Completion status codes ([`Response::status`]).
pub mod status {
    /// The command completed.
    pub const OK: u32 = 0;
    /// Unknown opcode.
    pub const UNSUPPORTED: u32 = 1;
    /// Malformed command: short header or range list, too many ranges,
    /// unknown flags or nonzero reserved fields, a range misaligned for its
    /// opcode. (A chain without room for a response is not answered at all.)
    pub const BAD_REQUEST: u32 = 2;
    /// A range's guest address is not in guest RAM.
    pub const BAD_GUEST_ADDR: u32 = 3;
    /// A range's VRAM offset plus length is beyond the VRAM.
    pub const BAD_VRAM_RANGE: u32 = 4;
    /// The copy engine failed (an injected fault): the range at
    /// `failed_index` and those after it were not copied.
    pub const COPY_ERROR: u32 = 5;
    /// A device fault was not resolved (CANCEL, CTX_DESTROY, or no event
    /// buffer to report it): the access at `failed_index`, `bytes` into the
    /// command, and everything after it were not done.
    pub const FAULT: u32 = 6;
    /// `ctx` is 0, out of range, not created (or already created for
    /// CTX_CREATE), has a command parked already, or has none for REPLAY.
    pub const BAD_CONTEXT: u32 = 7;

    /// Short name of a status, for logs.
    pub const fn name(status: u32) -> &'static str {
        match status {
            OK => "ok",
            UNSUPPORTED => "unsupported",
            BAD_REQUEST => "bad-request",
            BAD_GUEST_ADDR => "bad-guest-addr",
            BAD_VRAM_RANGE => "bad-vram-range",
            COPY_ERROR => "copy-error",
            FAULT => "fault",
            BAD_CONTEXT => "bad-context",
            _ => "unknown",
        }
    }
}

/// Range flags ([`Range::flags`]).
pub mod range_flags {
    /// `src` is a VRAM offset (otherwise a guest-physical address).
    pub const SRC_VRAM: u32 = 1 << 0;
    /// `dst` is a VRAM offset (otherwise a guest-physical address).
    pub const DST_VRAM: u32 = 1 << 1;
    /// Every flag of COPY and FILL ranges.
    pub const ALL: u32 = SRC_VRAM | DST_VRAM;

    /// MAP: the device may read through this translation.
    pub const MAP_READ: u32 = 1 << 4;
    /// MAP: the device may write through this translation.
    pub const MAP_WRITE: u32 = 1 << 5;
    /// MAP: the device may do atomics through this translation.
    pub const MAP_ATOMIC: u32 = 1 << 6;
    /// MAP: one huge (2 MiB) entry.
    pub const MAP_HUGE: u32 = 1 << 7;
    /// Every flag of MAP ranges.
    pub const MAP_ALL: u32 = SRC_VRAM | MAP_READ | MAP_WRITE | MAP_ATOMIC | MAP_HUGE;

    /// ATOMIC: add the operand (wrapping).
    pub const ATOMIC_ADD: u32 = 1 << 8;
    /// ATOMIC: exchange with the operand.
    pub const ATOMIC_XCHG: u32 = 2 << 8;
}

/// Indices of the u64 counters COUNTERS writes (and the control socket's
/// `stats` reports under the same names).
pub mod counter {
    /// Commands completed with OK.
    pub const COMMANDS_OK: usize = 0;
    /// Commands completed with an error status (or dropped).
    pub const COMMANDS_FAILED: usize = 1;
    /// Copy engine bytes, guest RAM to VRAM.
    pub const BYTES_GUEST_TO_VRAM: usize = 2;
    /// Copy engine bytes, VRAM to guest RAM.
    pub const BYTES_VRAM_TO_GUEST: usize = 3;
    /// Copy engine bytes, VRAM to VRAM.
    pub const BYTES_VRAM_TO_VRAM: usize = 4;
    /// Copy engine bytes, guest RAM to guest RAM.
    pub const BYTES_GUEST_TO_GUEST: usize = 5;
    /// Bytes written by FILL.
    pub const BYTES_FILLED: usize = 6;
    /// Device faults raised.
    pub const FAULTS: usize = 7;
    /// Ranges invalidated by UNMAP.
    pub const INVALIDATIONS: usize = 8;
    /// Bytes read through the device MMU (VREAD).
    pub const BYTES_VREAD: usize = 9;
    /// Bytes written through the device MMU (VWRITE).
    pub const BYTES_VWRITE: usize = 10;
    /// Atomics executed.
    pub const ATOMICS: usize = 11;
    /// Parked commands replayed.
    pub const REPLAYS: usize = 12;
    /// Faults that could not be reported (no event buffer).
    pub const EVENTS_DROPPED: usize = 13;
    /// Number of counters; the rest of the block is zero.
    pub const COUNT: usize = 14;
    /// Bytes COUNTERS writes.
    pub const BLOCK_SIZE: usize = 128;
    /// Names, by index.
    pub const NAMES: [&str; COUNT] = [
        "commands_ok",
        "commands_failed",
        "bytes_guest_to_vram",
        "bytes_vram_to_guest",
        "bytes_vram_to_vram",
        "bytes_guest_to_guest",
        "bytes_filled",
        "faults",
        "invalidations",
        "bytes_vread",
        "bytes_vwrite",
        "atomics",
        "replays",
        "events_dropped",
    ];
}

/// The header that starts every command, in the device-readable part of a
/// descriptor chain. `count` [`Range`]s follow it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdHeader {
    /// One of [`opcode`].
    pub opcode: u32,
    /// Device MMU context of MMU opcodes; 0 for NOP, COPY, FILL, COUNTERS.
    pub ctx: u32,
    /// Driver-chosen tag, echoed in nothing but useful in device logs.
    pub tag: u64,
    /// Number of ranges that follow.
    pub count: u32,
    /// Reserved, must be zero.
    pub reserved: u32,
}

impl CmdHeader {
    /// Encoded size in bytes.
    pub const SIZE: usize = 24;

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put32(&mut b, 0, self.opcode);
        put32(&mut b, 4, self.ctx);
        put64(&mut b, 8, self.tag);
        put32(&mut b, 16, self.count);
        put32(&mut b, 20, self.reserved);
        b
    }

    /// Decodes from the wire format; `None` if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Self {
            opcode: le32(b, 0),
            ctx: le32(b, 4),
            tag: le64(b, 8),
            count: le32(b, 16),
            reserved: le32(b, 20),
        })
    }
}

/// One range of a COPY or FILL command.
///
/// COPY: `len` bytes from `src` to `dst`. FILL: `dst` gets `len` bytes of the
/// little-endian 8-byte pattern held in `src` (repeated; `len` need not be a
/// multiple of 8). [`range_flags`] say whether each side is a VRAM offset or a
/// guest-physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// Source address or offset (COPY), or the pattern (FILL).
    pub src: u64,
    /// Destination address or offset.
    pub dst: u64,
    /// Length in bytes; zero is allowed and copies nothing.
    pub len: u32,
    /// [`range_flags`].
    pub flags: u32,
}

impl Range {
    /// Encoded size in bytes.
    pub const SIZE: usize = 24;

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put64(&mut b, 0, self.src);
        put64(&mut b, 8, self.dst);
        put32(&mut b, 16, self.len);
        put32(&mut b, 20, self.flags);
        b
    }

    /// Decodes from the wire format; `None` if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Self {
            src: le64(b, 0),
            dst: le64(b, 8),
            len: le32(b, 16),
            flags: le32(b, 20),
        })
    }
}

/// The completion the device writes into the device-writable part of the
/// descriptor chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// One of [`status`].
    pub status: u32,
    /// Index of the first range that failed (0 when `status` is OK or the
    /// command failed before any range).
    pub failed_index: u32,
    /// Bytes the command moved or wrote.
    pub bytes: u64,
}

impl Response {
    /// Encoded size in bytes.
    pub const SIZE: usize = 16;

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put32(&mut b, 0, self.status);
        put32(&mut b, 4, self.failed_index);
        put64(&mut b, 8, self.bytes);
        b
    }

    /// Decodes from the wire format; `None` if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Self {
            status: le32(b, 0),
            failed_index: le32(b, 4),
            bytes: le64(b, 8),
        })
    }
}

/// Event kinds ([`Event::kind`]).
pub mod event {
    /// A device access faulted; its command is parked until REPLAY/CANCEL.
    pub const FAULT: u32 = 1;
    /// An uncorrectable VRAM error (fault injection): `addr` is the VRAM
    /// byte offset, `reason` the index (0..=7) of the flipped bit in that
    /// byte; `ctx` and `access` are 0. No command is parked.
    pub const ECC: u32 = 2;

    /// [`super::Event::access`]: a read.
    pub const ACCESS_READ: u32 = 1 << 0;
    /// [`super::Event::access`]: a write.
    pub const ACCESS_WRITE: u32 = 1 << 1;
    /// [`super::Event::access`]: an atomic.
    pub const ACCESS_ATOMIC: u32 = 1 << 2;

    /// [`super::Event::reason`]: no translation for the address.
    pub const REASON_NOT_MAPPED: u32 = 1;
    /// [`super::Event::reason`]: the translation lacks the permission.
    pub const REASON_PERMISSION: u32 = 2;
}

/// A record the device writes into a buffer of the event queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// One of [`event`]'s kinds.
    pub kind: u32,
    /// Context of the faulting access.
    pub ctx: u32,
    /// Faulting device virtual address (exact, not page aligned).
    pub addr: u64,
    /// [`event`]`::ACCESS_*`.
    pub access: u32,
    /// [`event`]`::REASON_*`.
    pub reason: u32,
    /// Sequence number of the event (counts from 1 per device).
    pub seq: u64,
}

impl Event {
    /// Encoded size in bytes.
    pub const SIZE: usize = 32;

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put32(&mut b, 0, self.kind);
        put32(&mut b, 4, self.ctx);
        put64(&mut b, 8, self.addr);
        put32(&mut b, 16, self.access);
        put32(&mut b, 20, self.reason);
        put64(&mut b, 24, self.seq);
        b
    }

    /// Decodes from the wire format; `None` if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Self {
            kind: le32(b, 0),
            ctx: le32(b, 4),
            addr: le64(b, 8),
            access: le32(b, 16),
            reason: le32(b, 20),
            seq: le64(b, 24),
        })
    }
}
