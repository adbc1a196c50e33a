// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//
// The hmmgpu device interface: the one source of truth for both sides.
//
// docs/device-spec.md describes these in prose; this file is what the backend
// (device/) and the guest driver (guest-driver/, through `#[path]`) compile.
// It has no dependencies, no `unsafe` and no allocation, and nothing in it
// panics on any input, so it builds in the kernel too. Every multi-byte
// field on the wire is little-endian; structs are encoded and decoded field
// by field, never by casting memory, so big-endian hosts and guests work
// unchanged.
//
// Two layers: the wire structs ([`CmdHeader`], [`Range`], [`Response`],
// [`Event`], [`DeviceConfig`]) hold the raw fields as they are on the wire;
// [`Command::decode`] turns the bytes of a command into a typed [`Command`]
// once, checking everything that depends neither on memory nor on device
// state, so whoever executes it never checks those again.

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
/// Size of a huge device MMU entry ([`RangeFlags::MAP_HUGE`]).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// The little-endian u32 at `off` of `b`; 0 when `b` is too short (callers
/// check the length first: this only keeps the decoders panic-free).
fn le32(b: &[u8], off: usize) -> u32 {
    match b.get(off..off.wrapping_add(4)) {
        Some(&[b0, b1, b2, b3]) => u32::from_le_bytes([b0, b1, b2, b3]),
        _ => 0,
    }
}

/// The little-endian u64 at `off` of `b`; 0 when `b` is too short.
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off.wrapping_add(4))) << 32)
}

/// Writes `v` little-endian at `off` of `b` (a buffer of the struct's size).
fn put32(b: &mut [u8], off: usize, v: u32) {
    if let Some(dst) = b.get_mut(off..off.wrapping_add(4)) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes `v` little-endian at `off` of `b`.
fn put64(b: &mut [u8], off: usize, v: u64) {
    if let Some(dst) = b.get_mut(off..off.wrapping_add(8)) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
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
    /// Byte offset of `reserved`.
    pub const OFF_RESERVED: usize = 28;

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put32(&mut b, Self::OFF_MAGIC, self.magic);
        put32(&mut b, Self::OFF_VERSION, self.version);
        put64(&mut b, Self::OFF_VRAM_SIZE, self.vram_size);
        put32(&mut b, Self::OFF_PAGE_SIZE, self.page_size);
        put32(&mut b, Self::OFF_MAX_RANGES, self.max_ranges);
        put32(&mut b, Self::OFF_MAX_CONTEXTS, self.max_contexts);
        put32(&mut b, Self::OFF_RESERVED, self.reserved);
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
            reserved: le32(b, Self::OFF_RESERVED),
        })
    }
}

/// A command's operation ([`CmdHeader::opcode`] on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Opcode {
    /// Does nothing; completes with [`Status::Ok`]. A fence: the device
    /// completes commands in order.
    Nop = 0,
    /// Copies every range from its source to its destination.
    Copy = 1,
    /// Fills every range's destination with the 8-byte pattern in its `src`.
    Fill = 2,
    /// Creates context `ctx` with an empty page table.
    CtxCreate = 16,
    /// Destroys context `ctx`: drops its translations and cancels its
    /// parked command (which completes with FAULT).
    CtxDestroy = 17,
    /// Maps device virtual `dst` (+`len`) to physical `src` (guest-physical,
    /// or a VRAM offset with SRC_VRAM) with the MAP_* permissions; replaces
    /// any existing translation. `len` is a multiple of PAGE_SIZE, or
    /// HUGE_PAGE_SIZE with MAP_HUGE (both sides 2 MiB aligned).
    Map = 18,
    /// Removes every translation overlapping `dst`..`dst+len` (a huge entry
    /// is removed whole). When it completes no later device access uses
    /// the old translations.
    Unmap = 19,
    /// Reads device virtual `src` (+`len`) into guest-physical `dst`.
    Vread = 20,
    /// Writes guest-physical `src` (+`len`) to device virtual `dst`.
    Vwrite = 21,
    /// Atomic on the 8-byte little-endian word at device virtual `dst`
    /// (8-aligned, `len` 8): the [`AtomicOp`] in `flags` with operand `src`.
    /// The response's `bytes` is the old value.
    Atomic = 22,
    /// Resumes the command of `ctx` parked on a device fault.
    Replay = 24,
    /// Fails the command of `ctx` parked on a device fault (status FAULT).
    Cancel = 25,
    /// Writes the device counters ([`counter`]) to guest-physical `dst` of
    /// the one range (`len` >= [`counter::BLOCK_SIZE`]).
    Counters = 26,
}

/// How many ranges an opcode takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeCount {
    /// None (`count` 0).
    None,
    /// Exactly one.
    One,
    /// Any number up to [`MAX_RANGES`].
    Any,
}

impl Opcode {
    /// Every opcode, in wire order.
    pub const ALL: [Opcode; 13] = [
        Opcode::Nop,
        Opcode::Copy,
        Opcode::Fill,
        Opcode::CtxCreate,
        Opcode::CtxDestroy,
        Opcode::Map,
        Opcode::Unmap,
        Opcode::Vread,
        Opcode::Vwrite,
        Opcode::Atomic,
        Opcode::Replay,
        Opcode::Cancel,
        Opcode::Counters,
    ];

    /// The wire value.
    pub const fn bits(self) -> u32 {
        self as u32
    }

    /// Upper-case name, as the spec spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Opcode::Nop => "NOP",
            Opcode::Copy => "COPY",
            Opcode::Fill => "FILL",
            Opcode::CtxCreate => "CTX_CREATE",
            Opcode::CtxDestroy => "CTX_DESTROY",
            Opcode::Map => "MAP",
            Opcode::Unmap => "UNMAP",
            Opcode::Vread => "VREAD",
            Opcode::Vwrite => "VWRITE",
            Opcode::Atomic => "ATOMIC",
            Opcode::Replay => "REPLAY",
            Opcode::Cancel => "CANCEL",
            Opcode::Counters => "COUNTERS",
        }
    }

    /// Whether the command names a device MMU context (`ctx` in
    /// 1..=[`MAX_CONTEXTS`]); the others are physical and take `ctx` 0.
    pub const fn takes_context(self) -> bool {
        !matches!(
            self,
            Opcode::Nop | Opcode::Copy | Opcode::Fill | Opcode::Counters
        )
    }

    /// How many ranges the opcode takes.
    pub const fn range_count(self) -> RangeCount {
        match self {
            Opcode::Nop
            | Opcode::CtxCreate
            | Opcode::CtxDestroy
            | Opcode::Replay
            | Opcode::Cancel => RangeCount::None,
            Opcode::Atomic | Opcode::Counters => RangeCount::One,
            Opcode::Copy | Opcode::Fill | Opcode::Map | Opcode::Unmap | Opcode::Vread
            | Opcode::Vwrite => RangeCount::Any,
        }
    }

    /// Whether the command moves data (latency and bandwidth faults apply).
    pub const fn moves_data(self) -> bool {
        matches!(
            self,
            Opcode::Copy | Opcode::Fill | Opcode::Vread | Opcode::Vwrite | Opcode::Atomic
        )
    }
}

impl From<Opcode> for u32 {
    fn from(op: Opcode) -> u32 {
        op.bits()
    }
}

/// A u32 that is no [`Opcode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownOpcode(pub u32);

impl TryFrom<u32> for Opcode {
    type Error = UnknownOpcode;

    fn try_from(value: u32) -> Result<Self, UnknownOpcode> {
        let mut i = 0;
        while i < Opcode::ALL.len() {
            if Opcode::ALL[i].bits() == value {
                return Ok(Opcode::ALL[i]);
            }
            i += 1;
        }
        Err(UnknownOpcode(value))
    }
}

/// A command's completion status ([`Response::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// The command completed.
    Ok = 0,
    /// Unknown opcode.
    Unsupported = 1,
    /// Malformed command: short header or range list, too many ranges,
    /// unknown flags or nonzero reserved fields, a range misaligned for its
    /// opcode. (A chain without room for a response is not answered at all.)
    BadRequest = 2,
    /// A range's guest address is not in guest RAM.
    BadGuestAddr = 3,
    /// A range's VRAM offset plus length is beyond the VRAM.
    BadVramRange = 4,
    /// The copy engine failed (an injected fault): the range at
    /// `failed_index` and those after it were not copied.
    CopyError = 5,
    /// A device fault was not resolved (CANCEL, CTX_DESTROY, or no event
    /// buffer to report it): the access at `failed_index`, `bytes` into the
    /// command, and everything after it were not done.
    Fault = 6,
    /// `ctx` is 0, out of range, not created (or already created for
    /// CTX_CREATE), has a command parked already, or has none for REPLAY.
    BadContext = 7,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 8] = [
        Status::Ok,
        Status::Unsupported,
        Status::BadRequest,
        Status::BadGuestAddr,
        Status::BadVramRange,
        Status::CopyError,
        Status::Fault,
        Status::BadContext,
    ];

    /// The wire value.
    pub const fn bits(self) -> u32 {
        self as u32
    }

    /// Short name, for logs.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Unsupported => "unsupported",
            Status::BadRequest => "bad-request",
            Status::BadGuestAddr => "bad-guest-addr",
            Status::BadVramRange => "bad-vram-range",
            Status::CopyError => "copy-error",
            Status::Fault => "fault",
            Status::BadContext => "bad-context",
        }
    }
}

/// A u32 that is no [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownStatus(pub u32);

impl TryFrom<u32> for Status {
    type Error = UnknownStatus;

    fn try_from(value: u32) -> Result<Self, UnknownStatus> {
        let mut i = 0;
        while i < Status::ALL.len() {
            if Status::ALL[i].bits() == value {
                return Ok(Status::ALL[i]);
            }
            i += 1;
        }
        Err(UnknownStatus(value))
    }
}

/// The operation of an ATOMIC range, in its `flags` (nothing else may be
/// set there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AtomicOp {
    /// Adds the operand (wrapping).
    Add = 1 << 8,
    /// Exchanges with the operand.
    Xchg = 2 << 8,
}

impl AtomicOp {
    /// The wire value (the range's whole `flags`).
    pub const fn bits(self) -> u32 {
        self as u32
    }
}

/// Range flags that are no [`AtomicOp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownAtomicOp(pub u32);

impl TryFrom<u32> for AtomicOp {
    type Error = UnknownAtomicOp;

    fn try_from(value: u32) -> Result<Self, UnknownAtomicOp> {
        match value {
            v if v == AtomicOp::Add.bits() => Ok(AtomicOp::Add),
            v if v == AtomicOp::Xchg.bits() => Ok(AtomicOp::Xchg),
            v => Err(UnknownAtomicOp(v)),
        }
    }
}

/// [`Range::flags`]: which bits an opcode allows is checked by
/// [`Command::decode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeFlags(u32);

impl RangeFlags {
    /// No flag.
    pub const NONE: Self = Self(0);
    /// `src` is a VRAM offset (otherwise a guest-physical address).
    pub const SRC_VRAM: Self = Self(1 << 0);
    /// `dst` is a VRAM offset (otherwise a guest-physical address).
    pub const DST_VRAM: Self = Self(1 << 1);
    /// Every flag of COPY ranges (FILL: only `DST_VRAM`).
    pub const COPY_ALL: Self = Self(Self::SRC_VRAM.0 | Self::DST_VRAM.0);
    /// MAP: the device may read through this translation.
    pub const MAP_READ: Self = Self(1 << 4);
    /// MAP: the device may write through this translation.
    pub const MAP_WRITE: Self = Self(1 << 5);
    /// MAP: the device may do atomics through this translation.
    pub const MAP_ATOMIC: Self = Self(1 << 6);
    /// MAP: one huge (2 MiB) entry.
    pub const MAP_HUGE: Self = Self(1 << 7);
    /// Every flag of MAP ranges.
    pub const MAP_ALL: Self = Self(
        Self::SRC_VRAM.0 | Self::MAP_READ.0 | Self::MAP_WRITE.0 | Self::MAP_ATOMIC.0 | Self::MAP_HUGE.0,
    );
    /// ATOMIC: [`AtomicOp::Add`].
    pub const ATOMIC_ADD: Self = Self(AtomicOp::Add.bits());
    /// ATOMIC: [`AtomicOp::Xchg`].
    pub const ATOMIC_XCHG: Self = Self(AtomicOp::Xchg.bits());

    /// The flags with these wire bits, known or not.
    pub const fn from_bits_retain(bits: u32) -> Self {
        Self(bits)
    }

    /// The wire bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether every flag set is one of `allowed`.
    pub const fn is_within(self, allowed: Self) -> bool {
        self.0 & !allowed.0 == 0
    }

    /// Both sets of flags.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl core::ops::BitOr for RangeFlags {
    type Output = Self;

    fn bitor(self, other: Self) -> Self {
        self.union(other)
    }
}

impl core::ops::BitOrAssign for RangeFlags {
    fn bitor_assign(&mut self, other: Self) {
        *self = self.union(other);
    }
}

/// Kinds of device access, as a set: the permissions of a translation and
/// [`Event::access`] of a fault (one bit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Access(u32);

impl Access {
    /// No access.
    pub const NONE: Self = Self(0);
    /// A read.
    pub const READ: Self = Self(event::ACCESS_READ);
    /// A write.
    pub const WRITE: Self = Self(event::ACCESS_WRITE);
    /// An atomic.
    pub const ATOMIC: Self = Self(event::ACCESS_ATOMIC);

    /// The wire bits ([`Event::access`]).
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every access of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The permissions a MAP range's flags grant.
    pub const fn from_map_flags(flags: RangeFlags) -> Self {
        let mut bits = 0;
        if flags.contains(RangeFlags::MAP_READ) {
            bits |= event::ACCESS_READ;
        }
        if flags.contains(RangeFlags::MAP_WRITE) {
            bits |= event::ACCESS_WRITE;
        }
        if flags.contains(RangeFlags::MAP_ATOMIC) {
            bits |= event::ACCESS_ATOMIC;
        }
        Self(bits)
    }
}

/// A device MMU context id, 1..=[`MAX_CONTEXTS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextId(u32);

impl ContextId {
    /// `id` if it is a valid context id.
    pub const fn new(id: u32) -> Option<Self> {
        if id >= 1 && id <= MAX_CONTEXTS {
            Some(Self(id))
        } else {
            None
        }
    }

    /// The id.
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// A physical address: a guest-physical address or a VRAM offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phys {
    /// Guest-physical address.
    Guest(u64),
    /// Offset into the VRAM.
    Vram(u64),
}

impl Phys {
    /// `addr` as a VRAM offset if `is_vram`, else as a guest-physical address.
    pub const fn new(addr: u64, is_vram: bool) -> Self {
        if is_vram {
            Phys::Vram(addr)
        } else {
            Phys::Guest(addr)
        }
    }

    /// The same kind of address `by` bytes further, `None` on overflow.
    pub const fn offset(self, by: u64) -> Option<Self> {
        match self {
            Phys::Guest(a) => match a.checked_add(by) {
                Some(a) => Some(Phys::Guest(a)),
                None => None,
            },
            Phys::Vram(a) => match a.checked_add(by) {
                Some(a) => Some(Phys::Vram(a)),
                None => None,
            },
        }
    }
}

/// Whether `[start, start + len)` fits in the 64-bit address space (it may
/// end exactly at 2^64).
pub const fn fits(start: u64, len: u64) -> bool {
    len == 0 || start.checked_add(len - 1).is_some()
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
/// descriptor chain. `count` [`Range`]s follow it. The raw wire fields;
/// [`Command::decode`] checks them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdHeader {
    /// An [`Opcode`]'s wire value (or garbage, from a broken driver).
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
    /// Byte offset of `opcode`.
    pub const OFF_OPCODE: usize = 0;
    /// Byte offset of `ctx`.
    pub const OFF_CTX: usize = 4;
    /// Byte offset of `tag`.
    pub const OFF_TAG: usize = 8;
    /// Byte offset of `count`.
    pub const OFF_COUNT: usize = 16;
    /// Byte offset of `reserved`.
    pub const OFF_RESERVED: usize = 20;

    /// The header of a command of `opcode` on context `ctx` (0 for the
    /// physical opcodes) with `count` ranges.
    pub const fn new(opcode: Opcode, ctx: u32, tag: u64, count: u32) -> Self {
        Self {
            opcode: opcode.bits(),
            ctx,
            tag,
            count,
            reserved: 0,
        }
    }

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put32(&mut b, Self::OFF_OPCODE, self.opcode);
        put32(&mut b, Self::OFF_CTX, self.ctx);
        put64(&mut b, Self::OFF_TAG, self.tag);
        put32(&mut b, Self::OFF_COUNT, self.count);
        put32(&mut b, Self::OFF_RESERVED, self.reserved);
        b
    }

    /// Decodes from the wire format; `None` if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Self {
            opcode: le32(b, Self::OFF_OPCODE),
            ctx: le32(b, Self::OFF_CTX),
            tag: le64(b, Self::OFF_TAG),
            count: le32(b, Self::OFF_COUNT),
            reserved: le32(b, Self::OFF_RESERVED),
        })
    }
}

/// One range of a command, as on the wire. What `src`, `dst`, `len` and
/// `flags` mean depends on the opcode ([`Command`] holds the typed ranges).
///
/// COPY: `len` bytes from `src` to `dst`. FILL: `dst` gets `len` bytes of the
/// little-endian 8-byte pattern held in `src` (repeated; `len` need not be a
/// multiple of 8). [`RangeFlags`] say whether each side is a VRAM offset or a
/// guest-physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// Source address or offset (COPY), or the pattern (FILL).
    pub src: u64,
    /// Destination address or offset.
    pub dst: u64,
    /// Length in bytes; zero is allowed and copies nothing.
    pub len: u32,
    /// [`RangeFlags`] bits.
    pub flags: u32,
}

impl Range {
    /// Encoded size in bytes.
    pub const SIZE: usize = 24;
    /// Byte offset of `src`.
    pub const OFF_SRC: usize = 0;
    /// Byte offset of `dst`.
    pub const OFF_DST: usize = 8;
    /// Byte offset of `len`.
    pub const OFF_LEN: usize = 16;
    /// Byte offset of `flags`.
    pub const OFF_FLAGS: usize = 20;

    /// A range with these fields.
    pub const fn new(src: u64, dst: u64, len: u32, flags: RangeFlags) -> Self {
        Self {
            src,
            dst,
            len,
            flags: flags.bits(),
        }
    }

    /// The flags, typed.
    pub const fn range_flags(&self) -> RangeFlags {
        RangeFlags::from_bits_retain(self.flags)
    }

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put64(&mut b, Self::OFF_SRC, self.src);
        put64(&mut b, Self::OFF_DST, self.dst);
        put32(&mut b, Self::OFF_LEN, self.len);
        put32(&mut b, Self::OFF_FLAGS, self.flags);
        b
    }

    /// Decodes from the wire format; `None` if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Self {
            src: le64(b, Self::OFF_SRC),
            dst: le64(b, Self::OFF_DST),
            len: le32(b, Self::OFF_LEN),
            flags: le32(b, Self::OFF_FLAGS),
        })
    }
}

/// The completion the device writes into the device-writable part of the
/// descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// How the command ended.
    pub status: Status,
    /// Index of the first range that failed (0 when `status` is OK or the
    /// command failed before any range).
    pub failed_index: u32,
    /// Bytes the command moved or wrote (ATOMIC: the old value).
    pub bytes: u64,
}

impl Default for Response {
    fn default() -> Self {
        Self::ok(0)
    }
}

impl Response {
    /// Encoded size in bytes.
    pub const SIZE: usize = 16;
    /// Byte offset of `status`.
    pub const OFF_STATUS: usize = 0;
    /// Byte offset of `failed_index`.
    pub const OFF_FAILED_INDEX: usize = 4;
    /// Byte offset of `bytes`.
    pub const OFF_BYTES: usize = 8;

    /// A successful completion that moved `bytes`.
    pub const fn ok(bytes: u64) -> Self {
        Self {
            status: Status::Ok,
            failed_index: 0,
            bytes,
        }
    }

    /// A command that failed with `status` at range `failed_index` before
    /// moving anything.
    pub const fn failed(status: Status, failed_index: u32) -> Self {
        Self {
            status,
            failed_index,
            bytes: 0,
        }
    }

    /// Encodes to the wire format.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put32(&mut b, Self::OFF_STATUS, self.status.bits());
        put32(&mut b, Self::OFF_FAILED_INDEX, self.failed_index);
        put64(&mut b, Self::OFF_BYTES, self.bytes);
        b
    }

    /// Decodes from the wire format; `None` if `b` is too short or the
    /// status is unknown (a device this driver does not understand).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        Some(Self {
            status: Status::try_from(le32(b, Self::OFF_STATUS)).ok()?,
            failed_index: le32(b, Self::OFF_FAILED_INDEX),
            bytes: le64(b, Self::OFF_BYTES),
        })
    }
}

// ---------------------------------------------------------------------------
// Decoded commands.
// ---------------------------------------------------------------------------

/// Why [`Command::decode`] refused a command: the response it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// [`Status::Unsupported`], [`Status::BadRequest`] or
    /// [`Status::BadContext`].
    pub status: Status,
    /// The range at fault (0 for the header).
    pub failed_index: u32,
}

impl Rejected {
    const fn header(status: Status) -> Self {
        Self {
            status,
            failed_index: 0,
        }
    }
}

/// A COPY range: `len` bytes from `src` to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyRange {
    /// Where the bytes come from.
    pub src: Phys,
    /// Where they go.
    pub dst: Phys,
    /// Bytes.
    pub len: u32,
}

/// A FILL range: `len` bytes of `pattern` (little-endian, repeated) at `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillRange {
    /// The 8-byte pattern.
    pub pattern: u64,
    /// Where it goes.
    pub dst: Phys,
    /// Bytes.
    pub len: u32,
}

/// A MAP range: flags known, both sides aligned, the length one huge page
/// (`huge`) or a multiple of [`PAGE_SIZE`], both sides inside the address
/// space. Whether `phys` is inside guest RAM or the VRAM is the device's to
/// check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRange {
    /// First device virtual address.
    pub va: u64,
    /// Physical start.
    pub phys: Phys,
    /// Bytes.
    pub len: u64,
    /// Accesses the translation allows.
    pub perms: Access,
    /// One 2 MiB entry rather than 4 KiB ones.
    pub huge: bool,
}

/// An UNMAP range: device virtual `[va, va + len)`, inside the address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapRange {
    /// First device virtual address.
    pub va: u64,
    /// Bytes.
    pub len: u64,
}

/// A VREAD or VWRITE range: `len` bytes between device virtual `va` and the
/// guest-physical `buffer` (VREAD: `src` is `va`; VWRITE: `dst` is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferRange {
    /// Device virtual address (the range fits in the address space).
    pub va: u64,
    /// Guest-physical buffer.
    pub buffer: u64,
    /// Bytes.
    pub len: u32,
}

/// The one range of an ATOMIC: `op` with `operand` on the 8-aligned word
/// at device virtual `va`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtomicRange {
    /// Device virtual address, 8-aligned.
    pub va: u64,
    /// The operation.
    pub op: AtomicOp,
    /// Its operand.
    pub operand: u64,
}

/// The one range of a COUNTERS: the guest-physical buffer, at least
/// [`counter::BLOCK_SIZE`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountersRange {
    /// Guest-physical address.
    pub dst: u64,
    /// Its length.
    pub len: u32,
}

/// The ranges of a decoded command: checked by [`Command::decode`], turned
/// into `T` as they are read.
#[derive(Clone, Copy)]
pub struct Ranges<'a, T> {
    /// Exactly the command's ranges, [`Range::SIZE`] bytes each.
    bytes: &'a [u8],
    decode: fn(&Range) -> Option<T>,
}

impl<T> core::fmt::Debug for Ranges<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ranges").field("len", &self.len()).finish()
    }
}

impl<'a, T: 'a> Ranges<'a, T> {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.bytes.len() / Range::SIZE
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The ranges in order. (Every one was checked by decode: none is
    /// skipped.)
    pub fn iter(&self) -> impl Iterator<Item = T> + 'a {
        let decode = self.decode;
        self.bytes
            .chunks_exact(Range::SIZE)
            .filter_map(Range::from_bytes)
            .filter_map(move |r| decode(&r))
    }
}

/// A command, decoded and checked as far as it can be without memory or
/// device state: a known opcode, zero reserved field, a context valid for
/// the opcode, the right number of ranges, all present, and each with flags
/// the opcode allows and the alignment and length it needs.
#[derive(Clone, Copy, Debug)]
pub enum Command<'a> {
    /// NOP.
    Nop,
    /// COPY.
    Copy(Ranges<'a, CopyRange>),
    /// FILL.
    Fill(Ranges<'a, FillRange>),
    /// COUNTERS.
    Counters(CountersRange),
    /// CTX_CREATE.
    CtxCreate(ContextId),
    /// CTX_DESTROY.
    CtxDestroy(ContextId),
    /// MAP.
    Map(ContextId, Ranges<'a, MapRange>),
    /// UNMAP.
    Unmap(ContextId, Ranges<'a, UnmapRange>),
    /// VREAD.
    Vread(ContextId, Ranges<'a, TransferRange>),
    /// VWRITE.
    Vwrite(ContextId, Ranges<'a, TransferRange>),
    /// ATOMIC.
    Atomic(ContextId, AtomicRange),
    /// REPLAY.
    Replay(ContextId),
    /// CANCEL.
    Cancel(ContextId),
}

fn copy_range(r: &Range) -> Option<CopyRange> {
    let flags = r.range_flags();
    if !flags.is_within(RangeFlags::COPY_ALL) {
        return None;
    }
    Some(CopyRange {
        src: Phys::new(r.src, flags.contains(RangeFlags::SRC_VRAM)),
        dst: Phys::new(r.dst, flags.contains(RangeFlags::DST_VRAM)),
        len: r.len,
    })
}

fn fill_range(r: &Range) -> Option<FillRange> {
    // A FILL's `src` is the pattern, not an address: no SRC_VRAM.
    let flags = r.range_flags();
    if !flags.is_within(RangeFlags::DST_VRAM) {
        return None;
    }
    Some(FillRange {
        pattern: r.src,
        dst: Phys::new(r.dst, flags.contains(RangeFlags::DST_VRAM)),
        len: r.len,
    })
}

fn map_range(r: &Range) -> Option<MapRange> {
    let flags = r.range_flags();
    if !flags.is_within(RangeFlags::MAP_ALL) {
        return None;
    }
    let huge = flags.contains(RangeFlags::MAP_HUGE);
    let len = u64::from(r.len);
    let align = if huge { HUGE_PAGE_SIZE } else { PAGE_SIZE };
    let aligned = r.src.is_multiple_of(align) && r.dst.is_multiple_of(align);
    let sized = if huge {
        len == HUGE_PAGE_SIZE
    } else {
        len.is_multiple_of(PAGE_SIZE)
    };
    if !aligned || !sized || !fits(r.dst, len) || !fits(r.src, len) {
        return None;
    }
    Some(MapRange {
        va: r.dst,
        phys: Phys::new(r.src, flags.contains(RangeFlags::SRC_VRAM)),
        len,
        perms: Access::from_map_flags(flags),
        huge,
    })
}

fn unmap_range(r: &Range) -> Option<UnmapRange> {
    let len = u64::from(r.len);
    (r.flags == 0 && fits(r.dst, len)).then_some(UnmapRange { va: r.dst, len })
}

fn vread_range(r: &Range) -> Option<TransferRange> {
    (r.flags == 0 && fits(r.src, u64::from(r.len))).then_some(TransferRange {
        va: r.src,
        buffer: r.dst,
        len: r.len,
    })
}

fn vwrite_range(r: &Range) -> Option<TransferRange> {
    (r.flags == 0 && fits(r.dst, u64::from(r.len))).then_some(TransferRange {
        va: r.dst,
        buffer: r.src,
        len: r.len,
    })
}

fn atomic_range(r: &Range) -> Option<AtomicRange> {
    let op = AtomicOp::try_from(r.flags).ok()?;
    (r.len == 8 && r.dst.is_multiple_of(8)).then_some(AtomicRange {
        va: r.dst,
        op,
        operand: r.src,
    })
}

fn counters_range(r: &Range) -> Option<CountersRange> {
    (r.flags == 0 && r.len as usize >= counter::BLOCK_SIZE).then_some(CountersRange {
        dst: r.dst,
        len: r.len,
    })
}

/// Checks every range of `body` with `decode`; the first that fails is
/// named in the rejection.
fn ranges<T>(body: &[u8], decode: fn(&Range) -> Option<T>) -> Result<Ranges<'_, T>, Rejected> {
    for (index, chunk) in body.chunks_exact(Range::SIZE).enumerate() {
        if Range::from_bytes(chunk).and_then(|r| decode(&r)).is_none() {
            return Err(Rejected {
                status: Status::BadRequest,
                // index < MAX_RANGES: fits in u32.
                failed_index: u32::try_from(index).unwrap_or(u32::MAX),
            });
        }
    }
    Ok(Ranges {
        bytes: body,
        decode,
    })
}

/// The one range of `body`, checked with `decode`.
fn one<T>(body: &[u8], decode: fn(&Range) -> Option<T>) -> Result<T, Rejected> {
    Range::from_bytes(body)
        .and_then(|r| decode(&r))
        .ok_or(Rejected::header(Status::BadRequest))
}

impl<'a> Command<'a> {
    /// Decodes the readable part of a command chain (a [`CmdHeader`] and its
    /// ranges; bytes after them are ignored). The checks, in this order,
    /// and the rejection each gives:
    ///
    /// 1. a header is there (BAD_REQUEST) with a known opcode (UNSUPPORTED);
    /// 2. `reserved` is 0 and `count` at most [`MAX_RANGES`] (BAD_REQUEST);
    /// 3. `ctx` is 0 for a physical opcode, a valid [`ContextId`] for the
    ///    others (BAD_CONTEXT);
    /// 4. `count` suits the opcode (BAD_REQUEST);
    /// 5. every range is there (BAD_REQUEST at the first missing one);
    /// 6. each range has only the flags its opcode allows and the alignment
    ///    and length it needs (BAD_REQUEST at the first bad one).
    pub fn decode(request: &'a [u8]) -> Result<Self, Rejected> {
        let header =
            CmdHeader::from_bytes(request).ok_or(Rejected::header(Status::BadRequest))?;
        let opcode = Opcode::try_from(header.opcode)
            .map_err(|_| Rejected::header(Status::Unsupported))?;
        if header.reserved != 0 || header.count > MAX_RANGES {
            return Err(Rejected::header(Status::BadRequest));
        }
        let ctx = if opcode.takes_context() {
            Some(ContextId::new(header.ctx).ok_or(Rejected::header(Status::BadContext))?)
        } else if header.ctx == 0 {
            None
        } else {
            return Err(Rejected::header(Status::BadContext));
        };
        match (opcode.range_count(), header.count) {
            (RangeCount::None, 0) | (RangeCount::One, 1) | (RangeCount::Any, _) => {}
            _ => return Err(Rejected::header(Status::BadRequest)),
        }
        let body = request.get(CmdHeader::SIZE..).unwrap_or(&[]);
        let wanted = header.count as usize * Range::SIZE;
        let Some(body) = body.get(..wanted) else {
            // `failed_index` names the first range that is missing or cut short.
            return Err(Rejected {
                status: Status::BadRequest,
                failed_index: u32::try_from(body.len() / Range::SIZE).unwrap_or(u32::MAX),
            });
        };
        Ok(match (opcode, ctx) {
            (Opcode::Nop, _) => Command::Nop,
            (Opcode::Copy, _) => Command::Copy(ranges(body, copy_range)?),
            (Opcode::Fill, _) => Command::Fill(ranges(body, fill_range)?),
            (Opcode::Counters, _) => Command::Counters(one(body, counters_range)?),
            // Every other opcode takes a context, checked above.
            (_, None) => return Err(Rejected::header(Status::BadContext)),
            (Opcode::CtxCreate, Some(ctx)) => Command::CtxCreate(ctx),
            (Opcode::CtxDestroy, Some(ctx)) => Command::CtxDestroy(ctx),
            (Opcode::Replay, Some(ctx)) => Command::Replay(ctx),
            (Opcode::Cancel, Some(ctx)) => Command::Cancel(ctx),
            (Opcode::Map, Some(ctx)) => Command::Map(ctx, ranges(body, map_range)?),
            (Opcode::Unmap, Some(ctx)) => Command::Unmap(ctx, ranges(body, unmap_range)?),
            (Opcode::Vread, Some(ctx)) => Command::Vread(ctx, ranges(body, vread_range)?),
            (Opcode::Vwrite, Some(ctx)) => Command::Vwrite(ctx, ranges(body, vwrite_range)?),
            (Opcode::Atomic, Some(ctx)) => Command::Atomic(ctx, one(body, atomic_range)?),
        })
    }

    /// The command's opcode.
    pub const fn opcode(&self) -> Opcode {
        match self {
            Command::Nop => Opcode::Nop,
            Command::Copy(_) => Opcode::Copy,
            Command::Fill(_) => Opcode::Fill,
            Command::Counters(_) => Opcode::Counters,
            Command::CtxCreate(_) => Opcode::CtxCreate,
            Command::CtxDestroy(_) => Opcode::CtxDestroy,
            Command::Map(..) => Opcode::Map,
            Command::Unmap(..) => Opcode::Unmap,
            Command::Vread(..) => Opcode::Vread,
            Command::Vwrite(..) => Opcode::Vwrite,
            Command::Atomic(..) => Opcode::Atomic,
            Command::Replay(_) => Opcode::Replay,
            Command::Cancel(_) => Opcode::Cancel,
        }
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
    /// The device restarted under the driver: a new backend process took
    /// over the rings of one that died. The VRAM is intact; the contexts,
    /// parked commands and commands in flight are gone, and the device
    /// executes nothing (it leaves the command queue alone) until the
    /// driver resets it. Only `kind` and `seq` mean anything.
    pub const RESTARTED: u32 = 3;

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
