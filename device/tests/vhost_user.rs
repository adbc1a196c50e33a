// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The backend driven through a real vhost-user socket, with this test
//! playing QEMU (vhost's `Frontend`) and the guest driver (writing split
//! virtqueue rings into file-backed guest memory), no VM involved.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hmmgpu_abi::{
    counter, event, CmdHeader, DeviceConfig, Event, Opcode, Range, RangeFlags, Response, Status,
    ABI_VERSION, CONFIG_MAGIC, MAX_CONTEXTS, MAX_RANGES, QUEUE_COMMAND, QUEUE_EVENT, QUEUE_SIZE,
};
use hmmgpu_device::backend::register_wakeups;
use hmmgpu_device::{Engine, FaultInjector, HmmGpuBackend, Stats, Vram};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, Le16,
    Le32, Le64,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Range flags as the wire's `Range::flags` holds them.
const DST_VRAM: u32 = RangeFlags::DST_VRAM.bits();
const SRC_VRAM: u32 = RangeFlags::SRC_VRAM.bits();
const MAP_READ: u32 = RangeFlags::MAP_READ.bits();
const MAP_WRITE: u32 = RangeFlags::MAP_WRITE.bits();

const VRAM_SIZE: u64 = 4 << 20;
/// Guest RAM: one memfd region at a GPA unlike its host address, so any
/// confusion of the two shows.
const RAM_BASE: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 2 << 20;
/// Where the test driver keeps its rings and buffers in guest RAM: room for
/// rings of up to 1024 entries (a 16 KiB descriptor table, an 8 KiB used
/// ring).
const DESC_TABLE: u64 = RAM_BASE;
const AVAIL_RING: u64 = RAM_BASE + 0x4000;
const USED_RING: u64 = RAM_BASE + 0x5000;
/// An indirect descriptor table.
const INDIRECT_TABLE: u64 = RAM_BASE + 0x8000;
const CMD_BUF: u64 = RAM_BASE + 0x9000;
const RESP_BUF: u64 = RAM_BASE + 0x3f000;
/// A second command and response buffer, for a command left parked.
const CMD_BUF2: u64 = RAM_BASE + 0x3e000;
const RESP_BUF2: u64 = RAM_BASE + 0x3f100;
/// The event queue's rings and its 32-byte buffers (descriptor i uses
/// buffer i).
const EV_DESC_TABLE: u64 = RAM_BASE + 0x10000;
const EV_AVAIL_RING: u64 = RAM_BASE + 0x14000;
const EV_USED_RING: u64 = RAM_BASE + 0x15000;
const EV_BUFS: u64 = RAM_BASE + 0x18000;
const _: () = assert!(
    QUEUE_SIZE as u64 <= 1024,
    "the ring layout above has room for 1024 entries"
);
const DATA: u64 = RAM_BASE + 0x40000;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One device-visible buffer of a descriptor chain.
#[derive(Clone, Copy)]
struct Buf {
    addr: u64,
    len: u32,
    writable: bool,
}

fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: false,
    }
}

fn wo(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: true,
    }
}

/// The VMM and guest driver rolled into one.
struct Vm {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    next_desc: u16,
    last_used: u16,
    ev_kick: EventFd,
    ev_call: EventFd,
    ev_next_avail: u16,
    ev_last_used: u16,
    /// `publish` makes chains available without kicking the device (a
    /// driver whose kick went to a backend that died).
    no_kick: bool,
}

/// Guest RAM's backing file: an unlinked temporary file the backend maps
/// through the descriptor SET_MEM_TABLE passes (QEMU uses a memfd; any
/// shareable file does).
fn ram_file(size: u64) -> File {
    let file = tempfile::tempfile().unwrap();
    file.set_len(size).unwrap();
    file
}

impl Vm {
    /// Connects to the backend at `socket` and brings the command queue up
    /// the way QEMU does, acking every offered feature.
    fn connect(socket: &Path) -> Vm {
        Self::connect_without(socket, 0)
    }

    /// Like `connect`, but does not ack the features in `refused`.
    fn connect_without(socket: &Path, refused: u64) -> Vm {
        Self::connect_at(socket, refused, 0)
    }

    /// Like `connect_without`, but hands the command ring over at index
    /// `base`, as QEMU does to a backend restarted under a running guest
    /// (its avail and used indices, and SET_VRING_BASE, all at `base`).
    fn connect_at(socket: &Path, refused: u64, base: u16) -> Vm {
        let mut frontend = Frontend::connect(socket, 1).expect("connect to the backend");
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_eq!(features & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
        assert_eq!(features & VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(
            features & VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_INDIRECT_DESC
        );
        frontend.set_features(features & !refused).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        assert!(protocol.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
        frontend.set_protocol_features(protocol).unwrap();
        // Every message from now on waits for the backend's ack, so the
        // queue is fully set up before the first kick.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert_eq!(frontend.get_queue_num().unwrap(), 2);

        let file = ram_file(RAM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(RAM_BASE),
            RAM_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        // The region's memfd goes along with SET_MEM_TABLE, as QEMU sends it.
        let region = mem.find_region(GuestAddress(RAM_BASE)).unwrap();
        let region = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        frontend.set_mem_table(&[region]).unwrap();

        // Ring addresses are the VMM's virtual addresses, as with QEMU.
        let mut start_queue = |index: u16, desc: u64, avail: u64, used: u64| {
            let base = if index == QUEUE_COMMAND { base } else { 0 };
            for idx in [avail + 2, used + 2] {
                mem.write_obj(Le16::from(base), GuestAddress(idx)).unwrap();
            }
            let index = usize::from(index);
            frontend.set_vring_num(index, QUEUE_SIZE).unwrap();
            let rings = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: host(desc),
                used_ring_addr: host(used),
                avail_ring_addr: host(avail),
                log_addr: None,
            };
            frontend.set_vring_addr(index, &rings).unwrap();
            frontend.set_vring_base(index, base).unwrap();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            frontend.set_vring_kick(index, &kick).unwrap();
            frontend.set_vring_call(index, &call).unwrap();
            frontend.set_vring_enable(index, true).unwrap();
            (kick, call)
        };
        let (kick, call) = start_queue(QUEUE_COMMAND, DESC_TABLE, AVAIL_RING, USED_RING);
        let (ev_kick, ev_call) =
            start_queue(QUEUE_EVENT, EV_DESC_TABLE, EV_AVAIL_RING, EV_USED_RING);
        Vm {
            frontend,
            mem,
            kick,
            call,
            next_avail: base,
            next_desc: 0,
            last_used: base,
            ev_kick,
            ev_call,
            ev_next_avail: 0,
            ev_last_used: 0,
            no_kick: false,
        }
    }

    fn config(&mut self) -> DeviceConfig {
        let (_, bytes) = self
            .frontend
            .get_config(
                0,
                DeviceConfig::SIZE as u32,
                VhostUserConfigFlags::empty(),
                &[0; DeviceConfig::SIZE],
            )
            .unwrap();
        DeviceConfig::from_bytes(&bytes).unwrap()
    }

    fn write_desc(&self, index: u16, buf: Buf, flags: u16, next: u16) {
        let at = DESC_TABLE + 16 * u64::from(index);
        self.mem
            .write_obj(Le64::from(buf.addr), GuestAddress(at))
            .unwrap();
        self.mem
            .write_obj(Le32::from(buf.len), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(Le16::from(flags), GuestAddress(at + 12))
            .unwrap();
        self.mem
            .write_obj(Le16::from(next), GuestAddress(at + 14))
            .unwrap();
    }

    /// Writes `bufs` as a chain in the descriptor table, returning its head.
    fn write_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, buf) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
            let mut flags = if buf.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(index, *buf, flags, self.next_desc);
        }
        head
    }

    /// Makes the chain at `head` available and kicks the device.
    fn publish(&mut self, head: u16) {
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.next_avail % QUEUE_SIZE);
        self.mem
            .write_obj(Le16::from(head), GuestAddress(slot))
            .unwrap();
        // EVENT_IDX: ask for an interrupt as soon as anything new is used.
        let used_event = AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem
            .write_obj(Le16::from(self.last_used), GuestAddress(used_event))
            .unwrap();
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(Le16::from(self.next_avail), GuestAddress(AVAIL_RING + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        if !self.no_kick {
            self.kick.write(1).unwrap();
        }
    }

    /// Waits for the device's interrupt (the call eventfd) and returns the
    /// next used element (id, len). Each test command gets its own
    /// interrupt: `publish` set used_event to ask for exactly that.
    fn wait_used(&mut self) -> (u16, u32) {
        wait_interrupt(&self.call);
        self.take_used().expect("interrupt without a used buffer")
    }

    /// The next used element of the command queue, if there is one, without
    /// waiting.
    fn take_used(&mut self) -> Option<(u16, u32)> {
        let used = take_used(&self.mem, USED_RING, self.last_used)?;
        self.last_used = self.last_used.wrapping_add(1);
        Some(used)
    }

    /// Posts event buffer `index` (32 bytes at EV_BUFS + 32 * index, with
    /// descriptor `index`) to the event queue and kicks it.
    fn post_event_buffer(&mut self, index: u16, len: u32) {
        let at = EV_DESC_TABLE + 16 * u64::from(index);
        let addr = EV_BUFS + 32 * u64::from(index);
        self.mem
            .write_slice(&[0xee; 32], GuestAddress(addr))
            .unwrap();
        self.mem
            .write_obj(Le64::from(addr), GuestAddress(at))
            .unwrap();
        self.mem
            .write_obj(Le32::from(len), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(Le16::from(VIRTQ_DESC_F_WRITE), GuestAddress(at + 12))
            .unwrap();
        let slot = EV_AVAIL_RING + 4 + 2 * u64::from(self.ev_next_avail % QUEUE_SIZE);
        self.mem
            .write_obj(Le16::from(index), GuestAddress(slot))
            .unwrap();
        let used_event = EV_AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem
            .write_obj(Le16::from(self.ev_last_used), GuestAddress(used_event))
            .unwrap();
        fence(Ordering::SeqCst);
        self.ev_next_avail = self.ev_next_avail.wrapping_add(1);
        self.mem
            .write_obj(
                Le16::from(self.ev_next_avail),
                GuestAddress(EV_AVAIL_RING + 2),
            )
            .unwrap();
        fence(Ordering::SeqCst);
        self.ev_kick.write(1).unwrap();
    }

    /// Waits for the event queue's interrupt and returns the next used
    /// event buffer: its index, used length and the event in it.
    fn wait_event(&mut self) -> (u16, u32, Event) {
        wait_interrupt(&self.ev_call);
        let (id, len) = take_used(&self.mem, EV_USED_RING, self.ev_last_used)
            .expect("event interrupt without a used buffer");
        self.ev_last_used = self.ev_last_used.wrapping_add(1);
        // Re-arm (EVENT_IDX): interrupt for the next used buffer too.
        let used_event = EV_AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem
            .write_obj(Le16::from(self.ev_last_used), GuestAddress(used_event))
            .unwrap();
        fence(Ordering::SeqCst);
        let bytes = self.read(EV_BUFS + 32 * u64::from(id), Event::SIZE);
        (id, len, Event::from_bytes(&bytes).unwrap())
    }

    /// Whether the event queue has a used buffer not taken yet.
    fn event_pending(&self) -> bool {
        take_used(&self.mem, EV_USED_RING, self.ev_last_used).is_some()
    }

    /// Submits `bufs` as one chain and waits for its completion; returns the
    /// used length.
    fn submit(&mut self, bufs: &[Buf]) -> u32 {
        let head = self.write_chain(bufs);
        self.publish(head);
        let (id, len) = self.wait_used();
        assert_eq!(id, head, "commands complete in order");
        len
    }

    /// Sends a command (header and ranges in two readable descriptors, as a
    /// driver with a separate range array would) and returns its response.
    fn command(&mut self, op: Opcode, ranges: &[Range]) -> Response {
        self.command_ctx(op, 0, ranges)
    }

    /// `command` with a device MMU context.
    fn command_ctx(&mut self, op: Opcode, ctx: u32, ranges: &[Range]) -> Response {
        let head = self.post_command(op, ctx, ranges, CMD_BUF, RESP_BUF);
        assert_eq!(self.wait_used(), (head, Response::SIZE as u32));
        self.response()
    }

    /// Makes a command available (header at `cmd_at`, ranges 0x100 after
    /// it, response at `resp_at`, prefilled with 0xee) without waiting for
    /// it; returns its head.
    fn post_command(
        &mut self,
        op: Opcode,
        ctx: u32,
        ranges: &[Range],
        cmd_at: u64,
        resp_at: u64,
    ) -> u16 {
        let header = CmdHeader::new(op, ctx, 42, ranges.len() as u32);
        let ranges_at = cmd_at + 0x100;
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(cmd_at))
            .unwrap();
        let bytes: Vec<u8> = ranges.iter().flat_map(|r| r.to_bytes()).collect();
        self.mem
            .write_slice(&bytes, GuestAddress(ranges_at))
            .unwrap();
        self.mem
            .write_slice(&[0xee; Response::SIZE], GuestAddress(resp_at))
            .unwrap();
        let mut chain = vec![ro(cmd_at, CmdHeader::SIZE as u32)];
        if !bytes.is_empty() {
            chain.push(ro(ranges_at, bytes.len() as u32));
        }
        chain.push(wo(resp_at, Response::SIZE as u32));
        let head = self.write_chain(&chain);
        self.publish(head);
        head
    }

    fn response(&self) -> Response {
        self.response_at(RESP_BUF)
    }

    fn response_at(&self, at: u64) -> Response {
        Response::from_bytes(&self.read(at, Response::SIZE)).unwrap()
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf
    }
}

/// Waits for an interrupt on `call` and consumes it.
fn wait_interrupt(call: &EventFd) {
    assert!(
        interrupt_within(call, TIMEOUT),
        "no interrupt within {TIMEOUT:?}"
    );
}

/// Element `last_used` of the used ring at `ring`, if the device has
/// written it.
fn take_used(mem: &GuestMemoryMmap, ring: u64, last_used: u16) -> Option<(u16, u32)> {
    let used_idx: Le16 = mem.read_obj(GuestAddress(ring + 2)).unwrap();
    if u16::from(used_idx) == last_used {
        return None;
    }
    fence(Ordering::SeqCst);
    let elem = ring + 4 + 8 * u64::from(last_used % QUEUE_SIZE);
    let id: Le32 = mem.read_obj(GuestAddress(elem)).unwrap();
    let len: Le32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
    Some((u32::from(id) as u16, u32::from(len)))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 8) as u8)
        .collect()
}

fn ok(bytes: u64) -> Response {
    Response::ok(bytes)
}

/// A backend daemon serving one session on a thread of this process.
struct InProcess {
    dir: tempfile::TempDir,
    socket: PathBuf,
    stats: Arc<Stats>,
    faults: Arc<FaultInjector>,
    session: JoinHandle<Result<(), String>>,
}

impl InProcess {
    fn start() -> InProcess {
        Self::start_with_poll(Duration::ZERO)
    }

    /// A backend whose worker busy-polls a ring that ran dry for `poll`.
    fn start_with_poll(poll: Duration) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost.sock");
        let vram = Arc::new(Vram::open(&dir.path().join("vram"), VRAM_SIZE).unwrap());
        let stats = Arc::new(Stats::default());
        let faults = Arc::new(FaultInjector::with_vram(vram.clone()));
        faults.capture_log();
        let engine = Engine::new(vram, stats.clone(), faults.clone());
        let mut backend = HmmGpuBackend::new(engine);
        backend.set_poll_window(poll);
        let resume = backend.resume_fd();
        let backend = Arc::new(RwLock::new(backend));
        let mut daemon = VhostUserDaemon::new(
            "hmmgpu-test".to_owned(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        register_wakeups(&daemon, &faults, resume).unwrap();
        // Bound before the thread starts, so the front end can connect at once.
        let mut listener = Listener::new(&socket, true).unwrap();
        let session = thread::spawn(move || {
            daemon.start(&mut listener).map_err(|e| e.to_string())?;
            // A front end hanging up is how a session ends (VhostUserDaemon::serve
            // treats it the same way).
            match daemon.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected,
                )) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        });
        InProcess {
            dir,
            socket,
            stats,
            faults,
            session,
        }
    }

    fn vram_file(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("vram")).unwrap()
    }

    /// Waits for the session to end after the front end hung up.
    fn join(self) -> Result<(), String> {
        let deadline = Instant::now() + TIMEOUT;
        while !self.session.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the backend did not notice the disconnect"
            );
            thread::sleep(Duration::from_millis(10));
        }
        self.session.join().unwrap()
    }
}

#[test]
fn config_space_and_copies_through_the_vram() {
    let backend = InProcess::start();
    let mut vm = Vm::connect(&backend.socket);

    let config = vm.config();
    assert_eq!(config.magic, CONFIG_MAGIC);
    assert_eq!(config.version, ABI_VERSION);
    assert_eq!(config.vram_size, VRAM_SIZE);
    assert_eq!(config.page_size, 4096);
    assert_eq!(config.max_ranges, MAX_RANGES);

    assert_eq!(vm.command(Opcode::Nop, &[]), ok(0));

    // Guest -> VRAM: three scattered 4 KiB pages into one contiguous block,
    // as a migration to device memory does.
    let data = pattern(3 * 4096, 0x5c);
    let pages = [DATA + 0x2000, DATA + 0x9000, DATA + 0x4000];
    for (i, page) in pages.iter().enumerate() {
        vm.mem
            .write_slice(&data[i * 4096..(i + 1) * 4096], GuestAddress(*page))
            .unwrap();
    }
    let vram_at = 0x20_0000u64;
    let to_vram: Vec<Range> = pages
        .iter()
        .enumerate()
        .map(|(i, page)| Range {
            src: *page,
            dst: vram_at + i as u64 * 4096,
            len: 4096,
            flags: DST_VRAM,
        })
        .collect();
    assert_eq!(vm.command(Opcode::Copy, &to_vram), ok(3 * 4096));
    // The bytes are in the VRAM file itself, where QEMU's BAR maps them.
    let file = backend.vram_file();
    assert_eq!(
        &file[vram_at as usize..vram_at as usize + data.len()],
        &data[..]
    );

    // VRAM -> guest, somewhere else, in one range.
    let back = DATA + 0x10_0000;
    let from_vram = Range {
        src: vram_at,
        dst: back,
        len: data.len() as u32,
        flags: SRC_VRAM,
    };
    assert_eq!(
        vm.command(Opcode::Copy, &[from_vram]),
        ok(data.len() as u64)
    );
    assert_eq!(vm.read(back, data.len()), data);

    // FILL of VRAM with an odd length, checked in the file.
    let fill = Range {
        src: 0x1122_3344_5566_7788,
        dst: 5,
        len: 21,
        flags: DST_VRAM,
    };
    assert_eq!(vm.command(Opcode::Fill, &[fill]), ok(21));
    let file = backend.vram_file();
    let expect: Vec<u8> = (0..21)
        .map(|i| 0x1122_3344_5566_7788u64.to_le_bytes()[i % 8])
        .collect();
    assert_eq!(&file[5..26], &expect[..]);
    assert_eq!((file[4], file[26]), (0, 0));

    let stats = backend.stats.snapshot();
    assert_eq!(stats.commands_ok, 4);
    assert_eq!(stats.commands_failed, 0);
    assert_eq!(stats.bytes_guest_to_vram, 3 * 4096);
    assert_eq!(stats.bytes_vram_to_guest, 3 * 4096);
    assert_eq!(stats.bytes_filled, 21);

    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

#[test]
fn indirect_descriptors_and_many_commands_without_event_idx() {
    let backend = InProcess::start();
    // Without EVENT_IDX the device interrupts after every batch.
    let mut vm = Vm::connect_without(&backend.socket, VIRTIO_RING_F_EVENT_IDX);
    // More commands than the ring has slots, so indices wrap.
    for round in 0..300u32 {
        let data = pattern(64, round as u8);
        vm.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let range = Range {
            src: DATA,
            dst: u64::from(round) * 64,
            len: 64,
            flags: DST_VRAM,
        };
        assert_eq!(vm.command(Opcode::Copy, &[range]), ok(64));
    }
    // One command through an indirect table: header, ranges and response
    // buffers all described by a table in guest RAM.
    let table = INDIRECT_TABLE;
    let data = pattern(512, 0xa1);
    vm.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let header = CmdHeader {
        opcode: Opcode::Copy.bits(),
        ctx: 0,
        tag: 7,
        count: 1,
        reserved: 0,
    };
    let range = Range {
        src: DATA,
        dst: 0x1000,
        len: 512,
        flags: DST_VRAM,
    };
    let mut request = header.to_bytes().to_vec();
    request.extend_from_slice(&range.to_bytes());
    vm.mem.write_slice(&request, GuestAddress(CMD_BUF)).unwrap();
    let entries = [
        (ro(CMD_BUF, 30), VIRTQ_DESC_F_NEXT), // split mid-range on purpose
        (
            ro(CMD_BUF + 30, request.len() as u32 - 30),
            VIRTQ_DESC_F_NEXT,
        ),
        (wo(RESP_BUF, Response::SIZE as u32), VIRTQ_DESC_F_WRITE),
    ];
    for (i, (buf, flags)) in entries.iter().enumerate() {
        let at = table + 16 * i as u64;
        vm.mem
            .write_obj(Le64::from(buf.addr), GuestAddress(at))
            .unwrap();
        vm.mem
            .write_obj(Le32::from(buf.len), GuestAddress(at + 8))
            .unwrap();
        vm.mem
            .write_obj(Le16::from(*flags), GuestAddress(at + 12))
            .unwrap();
        vm.mem
            .write_obj(Le16::from(i as u16 + 1), GuestAddress(at + 14))
            .unwrap();
    }
    let head = vm.next_desc;
    vm.next_desc = (vm.next_desc + 1) % QUEUE_SIZE;
    vm.write_desc(
        head,
        ro(table, 16 * entries.len() as u32),
        VIRTQ_DESC_F_INDIRECT,
        0,
    );
    vm.publish(head);
    assert_eq!(vm.wait_used(), (head, Response::SIZE as u32));
    assert_eq!(vm.response(), ok(512));
    assert_eq!(&backend.vram_file()[0x1000..0x1200], &data[..]);
    assert_eq!(backend.stats.snapshot().commands_ok, 301);
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

#[test]
fn bad_commands_fail_and_the_queue_keeps_serving() {
    let backend = InProcess::start();
    let mut vm = Vm::connect(&backend.socket);
    let good = Range {
        src: DATA,
        dst: 0,
        len: 4096,
        flags: DST_VRAM,
    };
    vm.mem
        .write_slice(&pattern(4096, 3), GuestAddress(DATA))
        .unwrap();

    // A range whose guest address is outside guest RAM, after a valid one:
    // nothing moves, the bad range is named.
    let outside = Range {
        src: RAM_BASE + RAM_SIZE - 8,
        dst: 0x1000,
        len: 16,
        flags: DST_VRAM,
    };
    let response = vm.command(Opcode::Copy, &[good, outside]);
    assert_eq!(
        response,
        Response {
            status: Status::BadGuestAddr,
            failed_index: 1,
            bytes: 0
        }
    );
    assert!(
        backend.vram_file()[..4096].iter().all(|&b| b == 0),
        "a rejected command moved bytes"
    );

    // A VRAM range past the end.
    let past = Range {
        src: DATA,
        dst: VRAM_SIZE - 8,
        len: 16,
        flags: DST_VRAM,
    };
    assert_eq!(
        vm.command(Opcode::Copy, &[past]).status,
        Status::BadVramRange
    );

    // An injected copy-engine error: the first range is done, the second not.
    backend.faults.copy_error_next(1);
    let second = Range {
        src: DATA,
        dst: 0x2000,
        len: 4096,
        flags: DST_VRAM,
    };
    let response = vm.command(Opcode::Copy, &[good, second]);
    assert_eq!(
        response,
        Response {
            status: Status::CopyError,
            failed_index: 1,
            bytes: 4096
        }
    );
    let file = backend.vram_file();
    assert_eq!(&file[..4096], &pattern(4096, 3)[..]);
    assert!(file[0x2000..0x3000].iter().all(|&b| b == 0));

    // The command's readable descriptor points outside guest memory: the
    // device cannot read it and says so in the response.
    vm.mem
        .write_slice(&[0xee; Response::SIZE], GuestAddress(RESP_BUF))
        .unwrap();
    let len = vm.submit(&[
        ro(RAM_BASE + RAM_SIZE + 0x1000, 48),
        wo(RESP_BUF, Response::SIZE as u32),
    ]);
    assert_eq!(len, Response::SIZE as u32);
    assert_eq!(vm.response().status, Status::BadRequest);

    // A readable part cut short of its announced ranges.
    let header = CmdHeader {
        opcode: Opcode::Copy.bits(),
        ctx: 0,
        tag: 1,
        count: 2,
        reserved: 0,
    };
    vm.mem
        .write_slice(&header.to_bytes(), GuestAddress(CMD_BUF))
        .unwrap();
    vm.mem
        .write_slice(&good.to_bytes(), GuestAddress(CMD_BUF + 24))
        .unwrap();
    let len = vm.submit(&[
        ro(CMD_BUF, 24 + 24 + 10),
        wo(RESP_BUF, Response::SIZE as u32),
    ]);
    assert_eq!(len, Response::SIZE as u32);
    assert_eq!(
        vm.response(),
        Response {
            status: Status::BadRequest,
            failed_index: 1,
            bytes: 0
        }
    );

    // The response buffer points outside guest memory: dropped, used len 0.
    let header = CmdHeader {
        opcode: Opcode::Nop.bits(),
        ..Default::default()
    };
    vm.mem
        .write_slice(&header.to_bytes(), GuestAddress(CMD_BUF))
        .unwrap();
    assert_eq!(
        vm.submit(&[ro(CMD_BUF, 24), wo(u64::MAX - 7, Response::SIZE as u32)]),
        0
    );
    // No writable buffer at all, and one too small: dropped too.
    assert_eq!(vm.submit(&[ro(CMD_BUF, 24)]), 0);
    assert_eq!(vm.submit(&[ro(CMD_BUF, 24), wo(RESP_BUF, 8)]), 0);

    // The device keeps serving.
    assert_eq!(vm.command(Opcode::Copy, &[second]), ok(4096));
    assert_eq!(&backend.vram_file()[0x2000..0x3000], &pattern(4096, 3)[..]);

    let stats = backend.stats.snapshot();
    assert_eq!((stats.commands_ok, stats.commands_failed), (1, 8));
    assert_eq!(stats.bytes_guest_to_vram, 2 * 4096);
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

#[test]
fn device_mmu_faults_are_reported_parked_and_replayed() {
    device_mmu_flow(0);
}

#[test]
fn device_mmu_faults_without_event_idx() {
    device_mmu_flow(VIRTIO_RING_F_EVENT_IDX);
}

/// Contexts, MAP, VWRITE/VREAD, a fault without event buffer, a reported
/// fault that parks and is replayed, one that is cancelled, COUNTERS; with
/// the features in `refused` not acked.
fn device_mmu_flow(refused: u64) {
    let backend = InProcess::start();
    let mut vm = Vm::connect_without(&backend.socket, refused);
    assert_eq!(vm.config().max_contexts, MAX_CONTEXTS);
    const CTX: u32 = 3;
    const VA: u64 = 0x7f12_3400_0000;
    let rw = MAP_READ | MAP_WRITE;
    let (page, other, buf) = (DATA, DATA + 0x1000, DATA + 0x1_0000);
    let r = |src, dst, len, flags| Range {
        src,
        dst,
        len,
        flags,
    };

    assert_eq!(vm.command_ctx(Opcode::CtxCreate, CTX, &[]), ok(0));
    assert_eq!(
        vm.command_ctx(Opcode::Map, CTX, &[r(page, VA, 4096, rw)]),
        ok(0)
    );
    // VWRITE, then VREAD back part of it.
    let data = pattern(4096, 0x33);
    vm.mem.write_slice(&data, GuestAddress(buf)).unwrap();
    assert_eq!(
        vm.command_ctx(Opcode::Vwrite, CTX, &[r(buf, VA, 4096, 0)]),
        ok(4096)
    );
    assert_eq!(vm.read(page, 4096), data);
    assert_eq!(
        vm.command_ctx(Opcode::Vread, CTX, &[r(VA + 100, buf + 0x2000, 1000, 0)]),
        ok(1000)
    );
    assert_eq!(vm.read(buf + 0x2000, 1000), data[100..1100]);

    // No event buffer posted yet: a fault fails the command at once.
    let unmapped = r(VA + 0x1008, buf, 16, 0);
    assert_eq!(
        vm.command_ctx(Opcode::Vread, CTX, &[unmapped]),
        Response {
            status: Status::Fault,
            failed_index: 0,
            bytes: 0
        }
    );
    assert_eq!(backend.stats.snapshot().events_dropped, 1);
    assert!(!vm.event_pending());

    // With event buffers: a VREAD from the mapped page into the unmapped
    // one faults, is reported, and parks.
    vm.post_event_buffer(0, Event::SIZE as u32);
    vm.post_event_buffer(1, Event::SIZE as u32);
    let parked = vm.post_command(
        Opcode::Vread,
        CTX,
        &[r(VA + 0x800, buf + 0x4000, 0x1000, 0)],
        CMD_BUF2,
        RESP_BUF2,
    );
    let (id, len, fault) = vm.wait_event();
    assert_eq!((id, len), (0, Event::SIZE as u32));
    assert_eq!(
        fault,
        Event {
            kind: event::FAULT,
            ctx: CTX,
            addr: VA + 0x1000,
            access: event::ACCESS_READ,
            reason: event::REASON_NOT_MAPPED,
            seq: 1,
        }
    );
    // It did not complete: a NOP sent after it completes alone.
    assert_eq!(vm.command(Opcode::Nop, &[]), ok(0));
    assert_eq!(vm.take_used(), None);
    assert_eq!(vm.read(RESP_BUF2, Response::SIZE), [0xee; Response::SIZE]);
    assert_eq!(vm.read(buf + 0x4000, 0x800), data[0x800..]);

    // Resolve the fault and replay: the parked VREAD completes first, then
    // the REPLAY, with one interrupt.
    let other_data = pattern(4096, 0x44);
    vm.mem
        .write_slice(&other_data, GuestAddress(other))
        .unwrap();
    assert_eq!(
        vm.command_ctx(Opcode::Map, CTX, &[r(other, VA + 0x1000, 4096, MAP_READ)]),
        ok(0)
    );
    let replay = vm.post_command(Opcode::Replay, CTX, &[], CMD_BUF, RESP_BUF);
    assert_eq!(vm.wait_used(), (parked, Response::SIZE as u32));
    assert_eq!(vm.take_used(), Some((replay, Response::SIZE as u32)));
    assert_eq!(vm.response_at(RESP_BUF2), ok(0x1000));
    assert_eq!(vm.response(), ok(0));
    assert_eq!(vm.read(buf + 0x4000, 0x800), data[0x800..]);
    assert_eq!(vm.read(buf + 0x4800, 0x800), other_data[..0x800]);

    // A write to the read-only page: a permission fault; CANCEL fails it.
    let parked = vm.post_command(
        Opcode::Vwrite,
        CTX,
        &[r(buf, VA + 0xff8, 16, 0)],
        CMD_BUF2,
        RESP_BUF2,
    );
    let (id, _, fault) = vm.wait_event();
    assert_eq!(id, 1);
    assert_eq!(
        (fault.addr, fault.access, fault.reason, fault.seq),
        (
            VA + 0x1000,
            event::ACCESS_WRITE,
            event::REASON_PERMISSION,
            2
        )
    );
    let cancel = vm.post_command(Opcode::Cancel, CTX, &[], CMD_BUF, RESP_BUF);
    assert_eq!(vm.wait_used(), (parked, Response::SIZE as u32));
    assert_eq!(vm.take_used(), Some((cancel, Response::SIZE as u32)));
    assert_eq!(
        vm.response_at(RESP_BUF2),
        Response {
            status: Status::Fault,
            failed_index: 0,
            bytes: 8
        }
    );
    assert_eq!(vm.response(), ok(0));
    assert_eq!(vm.read(page + 0xff8, 8), data[..8]);
    assert_eq!(
        vm.command_ctx(Opcode::Replay, CTX, &[]).status,
        Status::BadContext
    );

    // COUNTERS agrees with the backend's counters (which include the
    // COUNTERS command itself once it completed).
    let block_at = DATA + 0x8000;
    assert_eq!(
        vm.command(
            Opcode::Counters,
            &[r(0, block_at, counter::BLOCK_SIZE as u32, 0)]
        ),
        ok(counter::BLOCK_SIZE as u64)
    );
    let block = vm.read(block_at, counter::BLOCK_SIZE);
    let mut expect = backend.stats.values();
    expect[counter::COMMANDS_OK] -= 1;
    for (i, value) in expect.iter().enumerate() {
        assert_eq!(
            block[i * 8..i * 8 + 8],
            value.to_le_bytes(),
            "{}",
            counter::NAMES[i]
        );
    }
    let stats = backend.stats.snapshot();
    assert_eq!(
        (stats.faults, stats.events_dropped, stats.replays),
        (3, 1, 1)
    );
    assert_eq!(
        (stats.bytes_vread, stats.bytes_vwrite),
        (1000 + 0x1000, 4096 + 8)
    );
    assert_eq!(
        stats.commands_failed, 3,
        "dropped fault, CANCELed VWRITE, REPLAY"
    );

    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

// ---------------------------------------------------------------------------
// The real binary.
// ---------------------------------------------------------------------------

/// The backend binary. `cargo xtask cross-test` runs these tests under
/// qemu-user, where a PowerPC binary cannot be exec'd directly: it sets
/// HMMGPU_TEST_RUNNER (e.g. "qemu-ppc64le -L /usr/powerpc64le-linux-gnu") and
/// the binary runs through that.
fn device_binary() -> Command {
    let bin = env!("CARGO_BIN_EXE_hmmgpu-device");
    let runner = std::env::var("HMMGPU_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(prog) => {
            let mut c = Command::new(prog);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// The backend binary with a socket, a 4 MiB VRAM file and a control
/// socket in `dir` (`vhost.sock`, `vram`, `control.sock`), its stderr
/// piped; callers add arguments and spawn it.
fn backend_in(dir: &Path, log_level: &str) -> Command {
    let mut c = device_binary();
    c.args(["--socket".as_ref(), dir.join("vhost.sock").as_os_str()])
        .args(["--vram-path".as_ref(), dir.join("vram").as_os_str()])
        .args(["--vram-size", "4M", "--log-level", log_level])
        .args(["--control".as_ref(), dir.join("control.sock").as_os_str()])
        .stderr(Stdio::piped());
    c
}

fn wait_for_path(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + TIMEOUT;
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("hmmgpu-device exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn wait_with_timeout(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hmmgpu-device did not exit after the front end disconnected");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn daemon_exits_cleanly_when_the_front_end_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let control = dir.path().join("control.sock");
    let mut child = backend_in(dir.path(), "warn").spawn().unwrap();
    wait_for_path(&socket, &mut child);
    let mut vm = Vm::connect(&socket);
    assert_eq!(vm.config().vram_size, VRAM_SIZE);
    vm.mem
        .write_slice(&pattern(100, 9), GuestAddress(DATA))
        .unwrap();
    let range = Range {
        src: DATA,
        dst: 0x3000,
        len: 100,
        flags: DST_VRAM,
    };
    assert_eq!(vm.command(Opcode::Copy, &[range]), ok(100));

    // The control socket reports the same counters.
    let mut stream = UnixStream::connect(&control).unwrap();
    stream.write_all(b"{\"cmd\":\"stats\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["stats"]["bytes_guest_to_vram"], 100);
    for name in counter::NAMES {
        let expect = match name {
            "commands_ok" => 1,
            "bytes_guest_to_vram" => 100,
            _ => 0,
        };
        assert_eq!(reply["stats"][name], expect, "{name}");
    }

    drop(vm);
    let status = wait_with_timeout(&mut child);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    let json = stderr
        .lines()
        .find_map(|l| l.strip_prefix("hmmgpu-device: stats: "))
        .unwrap_or_else(|| panic!("no stats line in stderr:\n{stderr}"));
    let stats: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(stats["commands_ok"], 1);
    assert_eq!(stats["bytes_guest_to_vram"], 100);
    assert!(!control.exists(), "the control socket was left behind");
}

/// A backend process that is killed if the test fails before it exits
/// (it would keep the test's output open, and `cargo test` waiting).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Under umask 0 the backend's files are still private: the VRAM file it
/// creates, the vhost-user socket and the control socket are 0600 and the
/// sockets go when it exits.
#[test]
fn files_and_sockets_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let control = dir.path().join("control.sock");
    let backend = backend_in(dir.path(), "warn");
    let mut wrapped = Command::new("sh");
    wrapped
        .args(["-c", "umask 000; exec \"$@\"", "sh"])
        .arg(backend.get_program())
        .args(backend.get_args())
        .stderr(Stdio::piped());
    let mut child = wrapped.spawn().unwrap();
    wait_for_path(&socket, &mut child);
    wait_for_path(&control, &mut child);
    for path in [&socket, &control, &dir.path().join("vram")] {
        let mode = std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
    let vm = Vm::connect(&socket);
    drop(vm);
    let status = wait_with_timeout(&mut child);
    assert!(status.success(), "exit {status}");
    assert!(!socket.exists(), "the vhost-user socket was left behind");
    assert!(!control.exists(), "the control socket was left behind");
}

/// RESET_DEVICE (offered) drops every MMU context: a context made before
/// can be made again after, which would be BAD_CONTEXT had it survived.
#[test]
fn reset_device_drops_the_contexts() {
    let backend = InProcess::start();
    let mut vm = Vm::connect(&backend.socket);
    let page = Range {
        src: DATA,
        dst: 0x7f00_0000_0000,
        len: 4096,
        flags: MAP_READ,
    };
    assert_eq!(vm.command_ctx(Opcode::CtxCreate, 9, &[]), ok(0));
    assert_eq!(vm.command_ctx(Opcode::Map, 9, &[page]), ok(0));
    assert_eq!(
        vm.command_ctx(Opcode::CtxCreate, 9, &[]).status,
        Status::BadContext
    );
    vm.frontend.reset_device().unwrap();
    // The front end brings the device up again: features, then the ring.
    let features = vm.frontend.get_features().unwrap();
    vm.frontend.set_features(features).unwrap();
    vm.frontend.set_vring_enable(0, true).unwrap();
    assert_eq!(vm.command_ctx(Opcode::CtxCreate, 9, &[]), ok(0));
    let read = Range {
        src: 0x7f00_0000_0000,
        dst: DATA + 0x1000,
        len: 8,
        flags: 0,
    };
    assert_eq!(
        vm.command_ctx(Opcode::Vread, 9, &[read]).status,
        Status::Fault,
        "the mapping survived the reset"
    );
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

/// A backend that copied `data` to VRAM offset 0x10_0000 and created
/// context 2, killed with SIGKILL, and a new one started on the same socket
/// and VRAM file, listening. Returns the new one, its stderr lines, and
/// where the dead one left the command ring.
fn restart_after_sigkill(dir: &Path, data: &[u8]) -> (Reaped, Lines, u16) {
    let socket = dir.join("vhost.sock");
    let mut first = Reaped(backend_in(dir, "error").spawn().unwrap());
    wait_for_path(&socket, &mut first.0);
    let mut vm = Vm::connect(&socket);
    vm.mem.write_slice(data, GuestAddress(DATA)).unwrap();
    let to_vram = Range {
        src: DATA,
        dst: 0x10_0000,
        len: data.len() as u32,
        flags: DST_VRAM,
    };
    assert_eq!(vm.command(Opcode::Copy, &[to_vram]), ok(data.len() as u64));
    assert_eq!(vm.command_ctx(Opcode::CtxCreate, 2, &[]), ok(0));
    let base = vm.next_avail;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(vm);
    // The dead one's socket file is still there: the new one replaces it,
    // and says so on stderr when it listens.
    assert!(socket.exists());
    let mut second = Reaped(backend_in(dir, "info").spawn().unwrap());
    let stderr = second.0.stderr.take().unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let lines = Lines(seen);
    lines.wait_for("listening on");
    (second, lines, base)
}

/// A backend's stderr, line by line.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    /// The next line containing `what` (panics after [`TIMEOUT`]).
    fn wait_for(&self, what: &str) -> String {
        loop {
            let line = self
                .0
                .recv_timeout(TIMEOUT)
                .unwrap_or_else(|_| panic!("no {what:?} line"));
            if line.contains(what) {
                return line;
            }
        }
    }
}

/// A backend killed with SIGKILL under a connected front end, and a new
/// one started on the same socket and VRAM file: the front end connects
/// again (QEMU's chardev reconnect) and finds the VRAM as it was; MMU
/// contexts are gone (as after a reset).
#[test]
fn a_new_backend_on_the_same_socket_and_vram_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let data = pattern(8192, 0x3c);
    let (mut second, _, _) = restart_after_sigkill(dir.path(), &data);
    let mut vm = Vm::connect(&socket);
    let back = Range {
        src: 0x10_0000,
        dst: DATA + 0x4000,
        len: 8192,
        flags: SRC_VRAM,
    };
    assert_eq!(vm.command(Opcode::Copy, &[back]), ok(8192));
    assert!(
        vm.read(DATA + 0x4000, 8192) == data,
        "the VRAM did not survive"
    );
    assert_eq!(
        vm.command_ctx(Opcode::CtxCreate, 2, &[]),
        ok(0),
        "a context survived"
    );
    drop(vm);
    let status = wait_with_timeout(&mut second.0);
    assert!(status.success(), "exit {status}");
}

/// A backend restarted under a running guest gets the command ring from the
/// index the dead one left it at (QEMU's chardev reconnect hands it over at
/// the used index), with commands the guest queued meanwhile and never
/// kicked for. It executes none of them, since the driver's contexts died
/// with the old process (and commands the old one completed may be there
/// again): it leaves the ring alone and posts a RESTARTED event, found
/// without a kick. Once the driver reset the device, it serves the new
/// ring, and the VRAM holds what the old backend left in it.
#[test]
fn a_ring_handed_over_by_a_dead_backend_gets_a_restarted_event_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let data = pattern(8192, 0x5a);
    let (mut second, lines, base) = restart_after_sigkill(dir.path(), &data);
    let mut vm = Vm::connect_at(&socket, 0, base);
    vm.no_kick = true;
    let back = Range {
        src: 0x10_0000,
        dst: DATA + 0x4000,
        len: 8192,
        flags: SRC_VRAM,
    };
    vm.mem
        .write_slice(&[0xee; 8192], GuestAddress(DATA + 0x4000))
        .unwrap();
    vm.post_command(Opcode::Copy, 0, &[back], CMD_BUF, RESP_BUF);
    vm.post_event_buffer(0, 32);
    let (_, len, event) = vm.wait_event();
    assert_eq!((len, event.kind), (Event::SIZE as u32, event::RESTARTED));
    let handed_over = lines.wait_for("handed over");
    assert!(
        handed_over.contains(&format!("at index {base} (used {base})")),
        "{handed_over}"
    );
    // The command queue is left alone: nothing used, nothing written.
    assert!(!interrupt_within(&vm.call, Duration::from_millis(200)));
    assert_eq!(
        vm.take_used(),
        None,
        "a command of the inherited ring was completed"
    );
    assert!(
        vm.read(DATA + 0x4000, 8192) == [0xee; 8192],
        "a command of the inherited ring was executed"
    );
    // The driver resets the device and sets up a new ring.
    vm.no_kick = false;
    vm.reset_with_new_ring();
    assert_eq!(vm.command_ctx(Opcode::CtxCreate, 2, &[]), ok(0));
    assert_eq!(vm.command(Opcode::Copy, &[back]), ok(8192));
    assert!(
        vm.read(DATA + 0x4000, 8192) == data,
        "the VRAM did not survive the restart"
    );
    drop(vm);
    let status = wait_with_timeout(&mut second.0);
    assert!(status.success(), "exit {status}");
}

impl Vm {
    /// Resets the device as QEMU does when the guest driver resets it: the
    /// command ring stops (GET_VRING_BASE), RESET_DEVICE, the features
    /// again, then the driver's new ring from index 0.
    fn reset_with_new_ring(&mut self) {
        self.frontend.get_vring_base(0).unwrap();
        self.frontend.reset_device().unwrap();
        let features = self.frontend.get_features().unwrap();
        self.frontend.set_features(features).unwrap();
        for idx in [AVAIL_RING + 2, USED_RING + 2] {
            self.mem
                .write_obj(Le16::from(0), GuestAddress(idx))
                .unwrap();
        }
        self.next_avail = 0;
        self.last_used = 0;
        let host = |gpa: u64| self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let rings = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: host(DESC_TABLE),
            used_ring_addr: host(USED_RING),
            avail_ring_addr: host(AVAIL_RING),
            log_addr: None,
        };
        self.frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        self.frontend.set_vring_addr(0, &rings).unwrap();
        self.frontend.set_vring_base(0, 0).unwrap();
        self.kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.frontend.set_vring_call(0, &self.call).unwrap();
        self.frontend.set_vring_kick(0, &self.kick).unwrap();
        self.frontend.set_vring_enable(0, true).unwrap();
    }
}

/// With a poll window the worker keeps looking at a command ring that ran
/// dry: a command made available within it runs without a kick (the driver
/// is not asked for one meanwhile); once the window is over, one made
/// available without a kick waits for the kick.
#[test]
fn a_poll_window_takes_commands_made_available_without_a_kick() {
    let backend = InProcess::start_with_poll(Duration::from_millis(500));
    let mut vm = Vm::connect(&backend.socket);
    assert_eq!(vm.command(Opcode::Nop, &[]), ok(0));
    vm.no_kick = true;
    assert_eq!(
        vm.command(Opcode::Nop, &[]),
        ok(0),
        "the worker polling the ring did not take the command"
    );
    // Past the window (and the one the first command's kick, taken late
    // because the worker was polling, opens again).
    thread::sleep(Duration::from_millis(1500));
    let head = vm.post_command(Opcode::Nop, 0, &[], CMD_BUF, RESP_BUF);
    assert!(
        !interrupt_within(&vm.call, Duration::from_millis(300)),
        "a command without a kick ran after the poll window"
    );
    vm.kick.write(1).unwrap();
    assert_eq!(vm.wait_used(), (head, Response::SIZE as u32));
    assert_eq!(vm.response(), ok(0));
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

/// Waits until the control socket's `session` says `connected` is `want`.
fn wait_for_session(control: &Path, want: bool) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reply = control_request(control, serde_json::json!({"cmd": "session"}));
        if reply["session"]["connected"] == want {
            return reply["session"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "session never became connected={want}: {reply}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A hot-unplug ends the session (QEMU hangs up); with `serve_next` armed
/// the same process serves the re-plugged device, a fresh session on the
/// same VRAM, then exits with counters covering both.
#[test]
fn a_re_plugged_front_end_gets_a_new_session_on_the_same_vram() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let control = dir.path().join("control.sock");
    let mut child = backend_in(dir.path(), "warn").spawn().unwrap();
    wait_for_path(&socket, &mut child);
    wait_for_path(&control, &mut child);
    let mut vm = Vm::connect(&socket);
    vm.mem
        .write_slice(&pattern(4096, 21), GuestAddress(DATA))
        .unwrap();
    let to_vram = Range {
        src: DATA,
        dst: 0x3000,
        len: 4096,
        flags: DST_VRAM,
    };
    assert_eq!(vm.command(Opcode::Copy, &[to_vram]), ok(4096));
    assert_eq!(
        control_request(
            &control,
            serde_json::json!({"cmd": "session", "serve_next": true})
        ),
        serde_json::json!({"ok": true, "session": {"started": 1, "connected": true, "serve_next": true}})
    );

    drop(vm); // the unplug
    let session = wait_for_session(&control, false);
    assert_eq!(session["started"], 1);
    assert_eq!(session["serve_next"], false, "one re-plug per request");
    assert!(child.try_wait().unwrap().is_none(), "the backend exited");

    let mut vm = Vm::connect(&socket); // the re-plug: SET_OWNER works again
    assert_eq!(vm.config().vram_size, VRAM_SIZE);
    assert_eq!(wait_for_session(&control, true)["started"], 2);
    let back = Range {
        src: 0x3000,
        dst: DATA + 0x2000,
        len: 4096,
        flags: SRC_VRAM,
    };
    assert_eq!(vm.command(Opcode::Copy, &[back]), ok(4096));
    let mut got = vec![0u8; 4096];
    vm.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert!(
        got == pattern(4096, 21),
        "the VRAM did not survive the re-plug"
    );

    drop(vm); // nothing armed: the backend exits
    let status = wait_with_timeout(&mut child);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    let json = stderr
        .lines()
        .find_map(|l| l.strip_prefix("hmmgpu-device: stats: "))
        .unwrap_or_else(|| panic!("no stats line in stderr:\n{stderr}"));
    let stats: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(stats["sessions"], 2);
    assert_eq!(stats["commands_ok"], 2, "counters cover both sessions");
    assert_eq!(stats["bytes_guest_to_vram"], 4096);
    assert_eq!(stats["bytes_vram_to_guest"], 4096);
}

#[test]
fn bad_command_lines_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vram = dir.path().join("vram");
    let vram_arg = vram.to_str().unwrap();
    // Unknown flag and bad size: clap's usage error, status 2.
    for args in [
        vec![
            "--socket",
            "/nonexistent/s",
            "--vram-path",
            vram_arg,
            "--vram-size",
            "4M",
            "--bogus",
        ],
        vec![
            "--socket",
            "/nonexistent/s",
            "--vram-path",
            vram_arg,
            "--vram-size",
            "4Q",
        ],
        vec!["--vram-path", vram_arg, "--vram-size", "4M"],
    ] {
        let out = device_binary().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    // A VRAM file of another size: a clear error, status 1, file untouched.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&vram)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let out = device_binary()
        .args([
            "--socket",
            "/nonexistent/s",
            "--vram-path",
            vram_arg,
            "--vram-size",
            "4M",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2097152 bytes") && stderr.contains("--vram-size"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&vram).unwrap().len(), 2 << 20);
    // The same file readable by others: refused, untouched.
    std::fs::set_permissions(&vram, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = device_binary()
        .args([
            "--socket",
            "/nonexistent/s",
            "--vram-path",
            vram_arg,
            "--vram-size",
            "2M",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("other users"), "{stderr}");
    // Not a power of two.
    let out = device_binary()
        .args([
            "--socket",
            "/nonexistent/s",
            "--vram-path",
            vram_arg,
            "--vram-size",
            "3M",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

// ---------------------------------------------------------------------------
// Fault injection through the control socket and the real queues.
// ---------------------------------------------------------------------------

/// Sends one request line to a control socket and returns the reply.
fn control_request(path: &Path, request: serde_json::Value) -> serde_json::Value {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    writeln!(stream, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// A control socket on an in-process backend's counters and injector.
fn control_for(backend: &InProcess) -> (hmmgpu_device::control::ControlServer, PathBuf) {
    let path = backend.dir.path().join("control.sock");
    let control = hmmgpu_device::control::Control {
        stats: backend.stats.clone(),
        faults: Some(backend.faults.clone()),
        sessions: None,
    };
    let server = hmmgpu_device::control::ControlServer::start(&path, control).unwrap();
    (server, path)
}

/// Whether `call` fires within `wait`.
fn interrupt_within(call: &EventFd, wait: Duration) -> bool {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            call.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    let mut ready = [EpollEvent::default()];
    let timeout = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    let n = loop {
        match epoll.wait(timeout, &mut ready) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other.unwrap(),
        }
    };
    n == 1 && call.read().is_ok()
}

impl Vm {
    /// Stops the command queue the way QEMU does when the guest resets the
    /// device (GET_VRING_BASE), then starts it again where it was.
    fn restart_command_queue(&mut self) {
        let base = self.frontend.get_vring_base(0).unwrap();
        self.frontend.set_vring_base(0, base as u16).unwrap();
        self.kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // Call first, as QEMU does: the kick starts the ring, and the
        // device may complete what is pending at once.
        self.frontend.set_vring_call(0, &self.call).unwrap();
        self.frontend.set_vring_kick(0, &self.kick).unwrap();
        self.frontend.set_vring_enable(0, true).unwrap();
    }
}

/// A device reset (GET_VRING_BASE) forgets a parked command: its chain is
/// never completed, so nothing stale lands in the ring the driver sets up
/// afterwards; the context and its mappings stay.
#[test]
fn stopping_the_command_queue_forgets_parked_commands() {
    let backend = InProcess::start();
    let mut vm = Vm::connect(&backend.socket);
    const CTX: u32 = 5;
    const VA: u64 = 0x7f00_0000_0000;
    let data = pattern(4096, 0x21);
    vm.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(vm.command_ctx(Opcode::CtxCreate, CTX, &[]), ok(0));
    let mapped = Range {
        src: DATA,
        dst: VA,
        len: 4096,
        flags: MAP_READ,
    };
    assert_eq!(vm.command_ctx(Opcode::Map, CTX, &[mapped]), ok(0));
    vm.post_event_buffer(0, Event::SIZE as u32);
    let unmapped = Range {
        src: VA + 0x1000,
        dst: DATA + 0x8000,
        len: 16,
        flags: 0,
    };
    vm.post_command(Opcode::Vread, CTX, &[unmapped], CMD_BUF2, RESP_BUF2);
    let (_, _, fault) = vm.wait_event();
    assert_eq!(fault.addr, VA + 0x1000);

    vm.restart_command_queue();
    // Nothing parked any more: REPLAY finds nothing, and only its own
    // completion is used.
    assert_eq!(
        vm.command_ctx(Opcode::Replay, CTX, &[]),
        Response {
            status: Status::BadContext,
            failed_index: 0,
            bytes: 0
        }
    );
    assert_eq!(vm.take_used(), None);
    assert_eq!(vm.read(RESP_BUF2, Response::SIZE), [0xee; Response::SIZE]);
    // The mapping survived.
    let read_back = Range {
        src: VA,
        dst: DATA + 0x4000,
        len: 4096,
        flags: 0,
    };
    assert_eq!(vm.command_ctx(Opcode::Vread, CTX, &[read_back]), ok(4096));
    assert_eq!(vm.read(DATA + 0x4000, 4096), data);
}

#[test]
fn injected_copy_error_on_a_range_through_the_control_socket() {
    let backend = InProcess::start();
    let (_server, control) = control_for(&backend);
    let mut vm = Vm::connect(&backend.socket);
    vm.mem
        .write_slice(&pattern(8192, 5), GuestAddress(DATA))
        .unwrap();
    let reply = control_request(
        &control,
        serde_json::json!({"cmd":"inject","fault":{"kind":"copy_error",
            "range":{"space":"vram","start":0x2000,"len":0x1000},"count":1}}),
    );
    assert_eq!(reply, serde_json::json!({"ok": true, "id": 1}));
    let first = Range {
        src: DATA,
        dst: 0,
        len: 4096,
        flags: DST_VRAM,
    };
    let second = Range {
        src: DATA + 4096,
        dst: 0x2000,
        len: 4096,
        flags: DST_VRAM,
    };
    assert_eq!(
        vm.command(Opcode::Copy, &[first, second]),
        Response {
            status: Status::CopyError,
            failed_index: 1,
            bytes: 4096
        }
    );
    let file = backend.vram_file();
    assert_eq!(&file[..4096], &pattern(8192, 5)[..4096]);
    assert!(file[0x2000..0x3000].iter().all(|&b| b == 0));
    // Spent: the retry goes through.
    assert_eq!(vm.command(Opcode::Copy, &[second]), ok(4096));
    let stats = control_request(&control, serde_json::json!({"cmd":"stats"}));
    assert_eq!(stats["stats"]["injected"]["copy_errors"], 1);
    assert_eq!(stats["stats"]["commands_failed"], 1);
    assert_eq!(
        backend.faults.log_lines(),
        ["fault #1: copy_error range=1 src=guest:0x40041000 dst=vram:0x2000 len=0x1000 at command 1"]
    );
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

#[test]
fn injected_ecc_error_flips_the_bit_and_reaches_the_event_queue() {
    let backend = InProcess::start();
    let (_server, control) = control_for(&backend);
    let mut vm = Vm::connect(&backend.socket);
    vm.post_event_buffer(0, 32);
    let before = backend.vram_file();
    let reply = control_request(
        &control,
        serde_json::json!({"cmd":"inject","fault":{"kind":"ecc","offset":0x3005,"bit":6}}),
    );
    assert_eq!(reply["ok"], true);
    // No command needed: the injector wakes the queue worker.
    let (id, len, event) = vm.wait_event();
    assert_eq!((id, len), (0, Event::SIZE as u32));
    assert_eq!(
        event,
        Event {
            kind: event::ECC,
            ctx: 0,
            addr: 0x3005,
            access: 0,
            reason: 6,
            seq: 1
        }
    );
    let after = backend.vram_file();
    let changed: Vec<usize> = (0..after.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert_eq!(changed, [0x3005]);
    assert_eq!(before[0x3005] ^ after[0x3005], 1 << 6);
    // No buffer left: the next one is dropped, and the device keeps going.
    control_request(
        &control,
        serde_json::json!({"cmd":"inject","fault":{"kind":"ecc","offset":0,"bit":0}}),
    );
    assert_eq!(vm.command(Opcode::Nop, &[]), ok(0));
    let stats = control_request(&control, serde_json::json!({"cmd":"stats"}));
    assert_eq!(stats["stats"]["injected"]["events_posted"], 1);
    assert_eq!(stats["stats"]["injected"]["events_dropped"], 1);
    assert_eq!(stats["stats"]["injected"]["ecc_flips"], 2);
    assert!(!vm.event_pending());
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

#[test]
fn a_stalled_or_slow_queue_leaves_the_control_socket_responsive() {
    let backend = InProcess::start();
    let (_server, control) = control_for(&backend);
    let mut vm = Vm::connect(&backend.socket);
    assert_eq!(vm.command(Opcode::Nop, &[]), ok(0));
    let reply = control_request(
        &control,
        serde_json::json!({"cmd":"inject","fault":{"kind":"stall_queue"}}),
    );
    assert_eq!(reply["ok"], true);
    let head = vm.post_command(Opcode::Nop, 0, &[], CMD_BUF, RESP_BUF);
    assert!(!interrupt_within(&vm.call, Duration::from_millis(300)));
    assert_eq!(vm.take_used(), None, "a stalled queue takes no command");
    // Control answers while the queue is stalled.
    let asked = Instant::now();
    let stats = control_request(&control, serde_json::json!({"cmd":"stats"}));
    assert_eq!(stats["stats"]["commands_ok"], 1);
    let list = control_request(&control, serde_json::json!({"cmd":"list"}));
    assert_eq!(list["stalled"], true);
    assert_eq!(list["faults"][0]["fault"]["kind"], "stall_queue");
    assert!(asked.elapsed() < Duration::from_secs(5));
    // Kicks do not help; a device reset does: the front end stopping and
    // restarting the command queue, as QEMU does when the guest resets it.
    vm.kick.write(1).unwrap();
    assert!(!interrupt_within(&vm.call, Duration::from_millis(100)));
    vm.restart_command_queue();
    let list = control_request(&control, serde_json::json!({"cmd":"list"}));
    assert_eq!(list["stalled"], false);
    assert_eq!(list["faults"], serde_json::json!([]));
    vm.kick.write(1).unwrap();
    assert_eq!(vm.wait_used(), (head, Response::SIZE as u32));
    assert_eq!(vm.response(), ok(0));

    // A latency of a minute: control still answers, and `clear` ends it.
    let reply = control_request(
        &control,
        serde_json::json!({"cmd":"inject","fault":{"kind":"latency","us":60_000_000u64}}),
    );
    assert_eq!(reply["ok"], true);
    let fill = Range {
        src: 0x5a,
        dst: DATA,
        len: 64,
        flags: 0,
    };
    let head = vm.post_command(Opcode::Fill, 0, &[fill], CMD_BUF, RESP_BUF);
    assert!(!interrupt_within(&vm.call, Duration::from_millis(200)));
    let asked = Instant::now();
    let stats = control_request(&control, serde_json::json!({"cmd":"stats"}));
    assert_eq!(stats["stats"]["injected"]["delayed_commands"], 1);
    let list = control_request(&control, serde_json::json!({"cmd":"list"}));
    assert_eq!(list["faults"][0]["fault"]["kind"], "latency");
    let clear = control_request(&control, serde_json::json!({"cmd":"clear"}));
    assert_eq!(clear, serde_json::json!({"ok": true, "cleared": 1}));
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert_eq!(vm.wait_used(), (head, Response::SIZE as u32));
    assert_eq!(vm.response(), ok(64));
    assert!(asked.elapsed() < TIMEOUT);
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

#[test]
fn a_dropped_interrupt_leaves_the_used_entry_unsignalled() {
    let backend = InProcess::start();
    let mut vm = Vm::connect(&backend.socket);
    backend
        .faults
        .inject(hmmgpu_device::Fault::DropInterrupts { count: 1 })
        .unwrap();
    let head = vm.post_command(Opcode::Nop, 0, &[], CMD_BUF, RESP_BUF);
    assert!(!interrupt_within(&vm.call, Duration::from_millis(300)));
    // The device did complete it: the used ring has the entry.
    assert_eq!(vm.take_used(), Some((head, Response::SIZE as u32)));
    assert_eq!(vm.response(), ok(0));
    // The next completion is signalled again.
    assert_eq!(vm.command(Opcode::Nop, &[]), ok(0));
    // A delayed one arrives, late.
    backend
        .faults
        .inject(hmmgpu_device::Fault::DelayInterrupts { ms: 300, count: 1 })
        .unwrap();
    let start = Instant::now();
    let head = vm.post_command(Opcode::Nop, 0, &[], CMD_BUF, RESP_BUF);
    assert_eq!(vm.wait_used(), (head, Response::SIZE as u32));
    assert!(start.elapsed() >= Duration::from_millis(300));
    let stats = backend.faults.injected_stats();
    assert_eq!((stats.interrupts_dropped, stats.interrupts_delayed), (1, 1));
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}

#[test]
fn fault_plans_logs_and_the_client_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let control = dir.path().join("control.sock");
    let plan = dir.path().join("plan.json");
    let log = dir.path().join("faults.log");
    std::fs::write(
        &plan,
        r#"{"seed": 1, "faults": [
            {"after_commands": 1, "fault": {"kind": "copy_error"}},
            {"after_commands": 3, "fault": {"kind": "spurious_faults", "ctx": 4, "addr": 8192}}
        ]}"#,
    )
    .unwrap();
    let mut child = backend_in(dir.path(), "error")
        .args(["--fault-plan".as_ref(), plan.as_os_str()])
        .args(["--fault-log".as_ref(), log.as_os_str()])
        .spawn()
        .unwrap();
    wait_for_path(&socket, &mut child);
    wait_for_path(&control, &mut child);
    let mut vm = Vm::connect(&socket);
    vm.post_event_buffer(0, 32);
    let copy = Range {
        src: DATA,
        dst: 0,
        len: 64,
        flags: DST_VRAM,
    };
    assert_eq!(vm.command(Opcode::Copy, &[copy]), ok(64));
    assert_eq!(vm.command(Opcode::Copy, &[copy]).status, Status::CopyError);
    assert_eq!(vm.command(Opcode::Copy, &[copy]), ok(64));
    let (_, _, event) = vm.wait_event();
    assert_eq!((event.kind, event.ctx, event.addr), (event::FAULT, 4, 8192));

    let ctl = |args: &[&str]| {
        let out = device_binary().args(args).output().unwrap();
        let reply = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.code(), reply)
    };
    let path = control.to_str().unwrap();
    let (code, reply) = ctl(&["inject", "--control", path, "drop_interrupts", "count=2"]);
    assert_eq!((code, reply.as_str()), (Some(0), r#"{"id":3,"ok":true}"#));
    let (code, reply) = ctl(&["inject", "--control", path, r#"{"kind":"latency","us":10}"#]);
    assert_eq!(code, Some(0), "{reply}");
    let (code, reply) = ctl(&["ctl", "--control", path, r#"{"cmd":"list"}"#]);
    assert_eq!(code, Some(0));
    let list: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(list["faults"].as_array().unwrap().len(), 2);
    let (code, reply) = ctl(&["ctl", "--control", path, r#"{"cmd":"clear","id":99}"#]);
    assert_eq!(code, Some(1), "{reply}");
    assert!(reply.contains("\"ok\":false"));
    assert_eq!(ctl(&["inject", "--control", path, "nonsense"]).0, Some(1));
    assert_eq!(
        ctl(&["inject", "--control", path, "copy_error", "count"]).0,
        Some(2)
    );
    assert_eq!(ctl(&["ctl", "--control", path, "not json"]).0, Some(2));
    assert_eq!(ctl(&["ctl", "--bogus"]).0, Some(2));
    let missing = dir.path().join("nope.sock");
    let (code, _) = ctl(&[
        "ctl",
        "--control",
        missing.to_str().unwrap(),
        "{\"cmd\":\"ping\"}",
    ]);
    assert_eq!(code, Some(1));

    drop(vm);
    let status = wait_with_timeout(&mut child);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    let expect = [
        "fault #1: copy_error range=0 src=guest:0x40040000 dst=vram:0x0 len=0x40 at command 2",
        "fault #2: spurious_faults ctx=4 addr=0x2000 count=1 at command 3",
    ];
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.lines().collect::<Vec<_>>(), expect);
    for line in expect {
        assert!(
            stderr.lines().any(|l| l == line),
            "{line} not in:\n{stderr}"
        );
    }
    let json = stderr
        .lines()
        .find_map(|l| l.strip_prefix("hmmgpu-device: stats: "))
        .unwrap();
    let stats: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(stats["commands_failed"], 1);
    assert_eq!(stats["injected"]["copy_errors"], 1);
    assert_eq!(stats["injected"]["events_posted"], 1);
}

// ---------------------------------------------------------------------------
// A hostile guest cannot freeze the backend.
// ---------------------------------------------------------------------------

/// Longest a config-space read (GET_CONFIG, which QEMU sends from a vCPU
/// thread holding its big lock) may wait while the device is busy: 100 ms
/// on the host; 1 s when the test and the backend run emulated under
/// qemu-user (`cargo xtask cross-test`, HMMGPU_TEST_RUNNER), where every
/// thread is tens of times slower and only the function is checked.
fn config_read_limit() -> Duration {
    if std::env::var_os("HMMGPU_TEST_RUNNER").is_some() {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(100)
    }
}

/// A FILL of the whole VRAM 4096 times (16 GiB) keeps the device busy for
/// seconds; config-space reads are answered within [`config_read_limit`]
/// all along. Where it completes within [`BUSY_FOR`] (a fast host), the
/// NOP queued behind it completes after it, in order, and the VRAM holds
/// the pattern; elsewhere (qemu-user), a queue reset forgets it and the
/// device serves the next command.
#[test]
fn a_huge_fill_does_not_hold_up_config_space_reads() {
    /// How long the reads go on at most.
    const BUSY_FOR: Duration = Duration::from_secs(5);
    let backend = InProcess::start();
    let mut vm = Vm::connect(&backend.socket);
    let pattern = 0x0807_0605_0403_0201u64;
    let whole_vram = Range {
        src: pattern,
        dst: 0,
        len: VRAM_SIZE as u32,
        flags: DST_VRAM,
    };
    let ranges = vec![whole_vram; MAX_RANGES as usize];
    let started = Instant::now();
    let fill = vm.post_command(Opcode::Fill, 0, &ranges, CMD_BUF, RESP_BUF);
    let nop = vm.post_command(Opcode::Nop, 0, &[], CMD_BUF2, RESP_BUF2);
    let mut worst = Duration::ZERO;
    let mut reads = 0u32;
    let mut completed = Vec::new();
    while completed.len() < 2 && started.elapsed() < BUSY_FOR {
        let asked = Instant::now();
        assert_eq!(vm.config().vram_size, VRAM_SIZE);
        worst = worst.max(asked.elapsed());
        reads += 1;
        while let Some(used) = vm.take_used() {
            completed.push(used);
        }
        thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    eprintln!(
        "FILL of {MAX_RANGES} x {} MiB: {} after {took:?}; {reads} config-space reads, the slowest {worst:?}",
        VRAM_SIZE >> 20,
        if completed.len() == 2 { "done" } else { "still running" }
    );
    assert!(
        worst < config_read_limit(),
        "a config-space read waited {worst:?} while the FILL ran"
    );
    assert!(
        reads >= 10,
        "only {reads} reads during the FILL: it was too short to tell"
    );
    if completed.len() == 2 {
        assert_eq!(
            completed,
            [(fill, Response::SIZE as u32), (nop, Response::SIZE as u32)]
        );
        assert_eq!(vm.response(), ok(u64::from(MAX_RANGES) * VRAM_SIZE));
        assert_eq!(vm.response_at(RESP_BUF2), ok(0));
        let file = backend.vram_file();
        assert!(file
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern.to_le_bytes()[i % 8]));
    } else {
        // A reset (the front end stopping the queue) forgets the FILL; the
        // ring restarts past it and the NOP, which were taken.
        assert!(completed.is_empty(), "{completed:?}");
        vm.restart_command_queue();
        let again = vm.post_command(Opcode::Nop, 0, &[], CMD_BUF, RESP_BUF);
        let deadline = Instant::now() + TIMEOUT;
        while completed.len() < 2 && Instant::now() < deadline {
            match vm.take_used() {
                Some(used) => completed.push(used),
                None => thread::sleep(Duration::from_millis(5)),
            }
        }
        let len = Response::SIZE as u32;
        assert_eq!(
            completed,
            [(nop, len), (again, len)],
            "the FILL completed after all"
        );
        assert_eq!(vm.response(), ok(0));
    }
    drop(vm);
    assert_eq!(backend.join(), Ok(()));
}
