// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The backend's queue handler on hostile rings: the fuzzer writes the
//! descriptor table, the avail ring and the buffers' bytes; the worker is
//! called until it has nothing left to do. No panic, no hang (libFuzzer's
//! -timeout makes a freeze a finding), and only used elements the driver
//! made available.
#![no_main]

use std::sync::{Arc, OnceLock};

use hmmgpu_abi::{QUEUE_COMMAND, QUEUE_SIZE};
use hmmgpu_device::engine::GuestRam;
use hmmgpu_device::{Engine, HmmGpuBackend, NoFaults, Stats, Vram};
use libfuzzer_sys::fuzz_target;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

/// Guest RAM: 1 MiB at 0 (rings at 0, buffers after), and 64 KiB after a
/// hole.
const RAM_LEN: usize = 1 << 20;
const RING: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const BUFFERS: u64 = 0x1000;

fn vram() -> Arc<Vram> {
    static VRAM: OnceLock<(tempfile::TempDir, Arc<Vram>)> = OnceLock::new();
    VRAM.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let vram = Arc::new(Vram::open(&dir.path().join("vram"), 2 << 20).expect("vram"));
        (dir, vram)
    })
    .1
    .clone()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mem = GuestRam::from_ranges(&[
        (GuestAddress(0), RAM_LEN),
        (GuestAddress(0x20_0000), 0x1_0000),
    ])
    .expect("guest ram");
    // The first bytes: how many chains are available and the descriptor
    // table; the rest fills the buffers.
    let (head, rest) = data.split_at(2);
    let table_len = usize::from(RING) * 16;
    let (table, buffers) = rest.split_at(rest.len().min(table_len));
    mem.write_slice(table, GuestAddress(DESC)).expect("table");
    mem.write_slice(
        &buffers[..buffers.len().min(RAM_LEN - BUFFERS as usize)],
        GuestAddress(BUFFERS),
    )
    .expect("buffers");
    // The avail ring: heads taken from the input too (may be out of range).
    let avail_idx = u16::from(head[0] % 40);
    for i in 0..avail_idx {
        let entry = u16::from(head[1].wrapping_add((i as u8).wrapping_mul(7))) % (RING + 4);
        mem.write_obj(
            entry.to_le(),
            GuestAddress(AVAIL + 4 + 2 * u64::from(i % RING)),
        )
        .expect("avail");
    }
    mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2))
        .expect("avail idx");

    let atomic = GuestMemoryAtomic::new(mem.clone());
    let engine = Engine::new(vram(), Arc::new(Stats::default()), Arc::new(NoFaults));
    let mut backend = HmmGpuBackend::new(engine);
    backend.update_memory(atomic.clone()).expect("memory");
    let command = VringRwLock::new(atomic.clone(), QUEUE_SIZE).expect("vring");
    command.set_queue_size(RING);
    command
        .set_queue_info(DESC, AVAIL, USED)
        .expect("queue info");
    command.set_queue_ready(true);
    command.set_enabled(true);
    let event = VringRwLock::new(atomic, QUEUE_SIZE).expect("vring");
    let vrings = [command, event];
    backend
        .handle_event(QUEUE_COMMAND, EventSet::IN, &vrings, 0)
        .expect("handle_event");
    // Calls again, as the worker does when its resume timer fires (a kick
    // goes on the same way, without the timer's 1 ms), until nothing is
    // left (bounded: 16 chains of at most 4096 ranges of VRAM).
    for _ in 0..100_000 {
        if !backend.engine().has_suspended() {
            break;
        }
        backend
            .handle_event(QUEUE_COMMAND, EventSet::IN, &vrings, 0)
            .expect("handle_event");
    }
    // Used elements name only heads below the ring size, at most one per
    // available chain.
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
    let used_idx = u16::from_le(used_idx);
    assert!(
        used_idx <= avail_idx,
        "{used_idx} used of {avail_idx} available"
    );
    for i in 0..used_idx.min(RING) {
        let id: u32 = mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(i)))
            .expect("used elem");
        assert!(u32::from_le(id) < u32::from(RING), "used id {id}");
    }
});
