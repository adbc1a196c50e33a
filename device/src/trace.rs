// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The device timeline (`hmmgpu-device --trace FILE`): every command, device
//! fault, replay, invalidation, interrupt, injected fault and reset of one
//! GPU, as a Chrome trace-event JSON file (the Trace Event Format, which
//! ui.perfetto.dev and chrome://tracing open).
//!
//! Recording is cheap: the queue worker puts a [`Record`] into a bounded
//! ring (a `sync_channel` of [`RING_CAPACITY`]) and never waits; a writer
//! thread drains it every [`DRAIN_PERIOD`] and formats the JSON. A record
//! that finds the ring full is dropped and counted ([`TraceStats`], also in
//! the file's metadata and the backend's exit line). Without `--trace` no
//! tracer exists and each hook point costs one branch.
//!
//! Timestamps are CLOCK_MONOTONIC read with `clock_gettime`, in the format's
//! microseconds with nanosecond decimals, so they line up with any other
//! reading of that clock on the host (`cargo xtask run --trace` puts the
//! guest console's markers on it).
//!
//! The file is the JSON Object Format with one event per line, each line
//! after the first starting with a comma, and the metadata last: a reader
//! can recover the events of a file cut short (a backend killed).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use hmmgpu_abi::{event, Command, Event, Opcode, Phys, Response, Status};
use log::warn;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::engine::InterruptAction;

/// Records the ring holds; a record that finds it full is dropped.
pub const RING_CAPACITY: usize = 1 << 16;

/// How often the writer thread drains the ring. It polls rather than
/// blocks, so putting a record never has to wake it (no system call on the
/// queue worker's path).
pub const DRAIN_PERIOD: Duration = Duration::from_millis(10);

/// What the file's metadata says about its clock.
pub const CLOCK: &str = "CLOCK_MONOTONIC";

/// The tracks (trace-event `tid`s) of a GPU's process, with their names.
pub mod track {
    /// Every command, in queue order (complete events).
    pub const COMMANDS: u32 = 1;
    /// Device faults, replays, cancels; commands parked on a fault.
    pub const FAULTS: u32 = 2;
    /// Interrupts of the command and event queues.
    pub const INTERRUPTS: u32 = 3;
    /// Fault injection: the fault log and injected events.
    pub const INJECTED: u32 = 4;
    /// Sessions, resets, queue stops, dropped chains.
    pub const DEVICE: u32 = 5;
    /// `(tid, name)` of every track.
    pub const NAMES: [(u32, &str); 5] = [
        (COMMANDS, "commands"),
        (FAULTS, "device faults"),
        (INTERRUPTS, "interrupts"),
        (INJECTED, "injected faults"),
        (DEVICE, "device"),
    ];
}

/// Now, on CLOCK_MONOTONIC, in nanoseconds.
pub fn now() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// Bytes a command moved, by direction: the names are the device counters'
/// ([`hmmgpu_abi::counter::NAMES`]), so a reader can add them up and compare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// COPY from guest RAM to VRAM.
    pub bytes_guest_to_vram: u64,
    /// COPY from VRAM to guest RAM.
    pub bytes_vram_to_guest: u64,
    /// COPY within the VRAM.
    pub bytes_vram_to_vram: u64,
    /// COPY within guest RAM.
    pub bytes_guest_to_guest: u64,
    /// FILL.
    pub bytes_filled: u64,
    /// VREAD.
    pub bytes_vread: u64,
    /// VWRITE.
    pub bytes_vwrite: u64,
}

impl Moved {
    /// Adds `bytes` copied from `src` to `dst` (`None`: a FILL).
    pub fn add_copy(&mut self, src: Option<Phys>, dst: Phys, bytes: u64) {
        let field = match (src, dst) {
            (None, _) => &mut self.bytes_filled,
            (Some(Phys::Guest(_)), Phys::Vram(_)) => &mut self.bytes_guest_to_vram,
            (Some(Phys::Vram(_)), Phys::Guest(_)) => &mut self.bytes_vram_to_guest,
            (Some(Phys::Vram(_)), Phys::Vram(_)) => &mut self.bytes_vram_to_vram,
            (Some(Phys::Guest(_)), Phys::Guest(_)) => &mut self.bytes_guest_to_guest,
        };
        *field += bytes;
    }

    /// Adds another command slice's bytes.
    pub fn add(&mut self, other: &Moved) {
        self.bytes_guest_to_vram += other.bytes_guest_to_vram;
        self.bytes_vram_to_guest += other.bytes_vram_to_guest;
        self.bytes_vram_to_vram += other.bytes_vram_to_vram;
        self.bytes_guest_to_guest += other.bytes_guest_to_guest;
        self.bytes_filled += other.bytes_filled;
        self.bytes_vread += other.bytes_vread;
        self.bytes_vwrite += other.bytes_vwrite;
    }

    fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("bytes_guest_to_vram", self.bytes_guest_to_vram),
            ("bytes_vram_to_guest", self.bytes_vram_to_guest),
            ("bytes_vram_to_vram", self.bytes_vram_to_vram),
            ("bytes_guest_to_guest", self.bytes_guest_to_guest),
            ("bytes_filled", self.bytes_filled),
            ("bytes_vread", self.bytes_vread),
            ("bytes_vwrite", self.bytes_vwrite),
        ]
    }
}

/// How a command ended, as the timeline shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It completed with this response.
    Completed(Response),
    /// It faulted and is parked until REPLAY, CANCEL or CTX_DESTROY.
    Parked,
    /// A reset or a queue stop dropped it before it completed.
    Forgotten,
}

/// One command, from when the device took it to when it completed, parked
/// or was forgotten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRecord {
    /// When the device took it (ns, CLOCK_MONOTONIC).
    pub start: u64,
    /// When it ended.
    pub end: u64,
    /// The command as the driver wrote it (header and ranges, at most
    /// `engine::MAX_COMMAND_LEN` bytes); decoded by the writer thread.
    pub request: Box<[u8]>,
    /// How it ended.
    pub outcome: Outcome,
    /// What it moved (for REPLAY: what the command it resumed moved).
    pub moved: Moved,
    /// Worker calls it took (more than one when it ran out of budget).
    pub slices: u32,
    /// For REPLAY, CANCEL and CTX_DESTROY: the tag of the parked command it
    /// took, and that command's response if it completed.
    pub resumed: Option<(u64, Option<Response>)>,
}

/// What ended a command's stay parked on a device fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unpark {
    /// REPLAY resumed it.
    Replay,
    /// CANCEL or CTX_DESTROY completed it with FAULT.
    Cancel(Opcode),
    /// A reset or a queue stop dropped it.
    Forgotten,
}

/// One thing on the timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A command ([`track::COMMANDS`]).
    Command(Box<CommandRecord>),
    /// A device fault; `parked` names the command (by tag) parked on it,
    /// `None` when the fault found no event buffer and its command failed.
    Fault {
        /// When.
        ts: u64,
        /// The event (as posted, or as it would have been).
        event: Event,
        /// The parked command's tag.
        parked: Option<u64>,
    },
    /// A parked command left the parked state.
    Unparked {
        /// When.
        ts: u64,
        /// Its context.
        ctx: u32,
        /// Its tag.
        tag: u64,
        /// Why.
        how: Unpark,
    },
    /// An event fault injection offered (ECC, spurious fault, storm).
    InjectedEvent {
        /// When.
        ts: u64,
        /// The event.
        event: Event,
        /// Whether it found a buffer.
        posted: bool,
    },
    /// A fault log line (`fault #N: KIND ARGS at command M`).
    InjectedFault {
        /// When.
        ts: u64,
        /// The line.
        line: String,
    },
    /// A queue's interrupt: signalled, dropped or delayed.
    Interrupt {
        /// When.
        ts: u64,
        /// The queue ([`hmmgpu_abi::QUEUE_COMMAND`] or `QUEUE_EVENT`).
        queue: u16,
        /// What was done with it.
        action: InterruptAction,
    },
    /// A session began or ended, a reset, a queue stop, a dropped chain.
    Device {
        /// When.
        ts: u64,
        /// What (the event's name).
        what: &'static str,
        /// More about it.
        detail: String,
    },
}

/// What a trace came to, reported in the backend's stats (`"trace"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStats {
    /// Records written to the file.
    pub written: u64,
    /// Records lost: the ring was full, or the file could not be written.
    pub dropped: u64,
}

/// Why a trace cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file.
    #[error("trace file {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The writer thread.
    #[error("starting the trace writer thread: {0}")]
    Thread(io::Error),
}

/// A GPU's timeline being recorded into a file.
pub struct Tracer {
    ring: SyncSender<Record>,
    /// Records that found the ring full (or the writer gone).
    dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    writer: Mutex<Option<JoinHandle<TraceStats>>>,
    /// Set once the writer is done.
    finished: Mutex<Option<TraceStats>>,
    path: PathBuf,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("path", &self.path).finish()
    }
}

impl Tracer {
    /// Starts a trace into `path` (created mode 0600 or truncated; a
    /// symlink, FIFO or device is refused).
    pub fn create(path: &Path) -> Result<Arc<Tracer>, TraceError> {
        Self::with_capacity(path, RING_CAPACITY)
    }

    /// [`Tracer::create`] with a ring of `capacity` records (tests).
    pub fn with_capacity(path: &Path, capacity: usize) -> Result<Arc<Tracer>, TraceError> {
        let file_error = |source| TraceError::File {
            path: path.to_owned(),
            source,
        };
        // O_NONBLOCK: opening a FIFO nobody reads fails instead of hanging.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(file_error)?;
        if !file.metadata().map_err(file_error)?.is_file() {
            return Err(file_error(io::Error::other("not a regular file")));
        }
        let (ring, rx) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            out: BufWriter::new(file),
            pid: std::process::id(),
            written: 0,
            failed: 0,
            error: None,
        };
        let (d, s) = (dropped.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("hmmgpu-trace".into())
            .spawn(move || writer.run(&rx, &d, &s))
            .map_err(TraceError::Thread)?;
        Ok(Arc::new(Tracer {
            ring,
            dropped,
            stop,
            writer: Mutex::new(Some(handle)),
            finished: Mutex::new(None),
            path: path.to_owned(),
        }))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts `record` into the ring, or counts it dropped if the ring is full.
    pub fn record(&self, record: Record) {
        match self.ring.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records a [`Record::Device`] event now.
    pub fn device(&self, what: &'static str, detail: String) {
        self.record(Record::Device {
            ts: now(),
            what,
            detail,
        });
    }

    /// Writes what the ring still holds and the file's end; returns what
    /// the trace came to. Later calls return the same.
    pub fn finish(&self) -> TraceStats {
        let mut finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stats) = *finished {
            return stats;
        }
        self.stop.store(true, Ordering::Release);
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let stats = match handle.map(JoinHandle::join) {
            Some(Ok(stats)) => stats,
            _ => TraceStats {
                written: 0,
                dropped: self.dropped.load(Ordering::Relaxed),
            },
        };
        *finished = Some(stats);
        stats
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The writer thread's state.
struct Writer {
    out: BufWriter<File>,
    pid: u32,
    written: u64,
    /// Records lost to write errors.
    failed: u64,
    error: Option<io::Error>,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Record>, dropped: &AtomicU64, stop: &AtomicBool) -> TraceStats {
        self.header();
        loop {
            // Read before draining: a record sent before the stop is seen.
            let stopping = stop.load(Ordering::Acquire);
            let mut any = false;
            while let Ok(record) = rx.try_recv() {
                self.event_lines(&record);
                any = true;
            }
            if stopping {
                break;
            }
            if any {
                self.flush();
            }
            std::thread::sleep(DRAIN_PERIOD);
        }
        let stats = TraceStats {
            written: self.written,
            dropped: dropped.load(Ordering::Relaxed) + self.failed,
        };
        self.trailer(stats);
        if let Some(e) = &self.error {
            warn!(
                "trace: writing the file failed ({e}); {} records lost",
                self.failed
            );
        }
        stats
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        if self.error.is_some() {
            return Err(io::Error::other("an earlier write failed"));
        }
        let result = self.out.write_all(line.as_bytes());
        if let Err(e) = &result {
            self.error = Some(io::Error::new(e.kind(), e.to_string()));
        }
        result
    }

    fn flush(&mut self) {
        if self.error.is_none() {
            if let Err(e) = self.out.flush() {
                self.error = Some(e);
            }
        }
    }

    fn header(&mut self) {
        let mut lines = vec![json!({
            "ph": "M", "pid": self.pid, "tid": 0, "name": "process_name",
            "args": {"name": format!("hmmgpu-device (pid {})", self.pid)},
        })];
        for (tid, name) in track::NAMES {
            lines.push(json!({
                "ph": "M", "pid": self.pid, "tid": tid, "name": "thread_name",
                "args": {"name": name},
            }));
            lines.push(json!({
                "ph": "M", "pid": self.pid, "tid": tid, "name": "thread_sort_index",
                "args": {"sort_index": tid},
            }));
        }
        let mut text = String::from("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&line.to_string());
            text.push('\n');
        }
        // Metadata events are not records: neither written nor dropped.
        let _ = self.write_line(&text);
    }

    fn trailer(&mut self, stats: TraceStats) {
        let metadata = json!({
            "clock": CLOCK,
            "clock-domain": "LINUX_CLOCK_MONOTONIC",
            "ts_unit": "microseconds (CLOCK_MONOTONIC / 1000, nanosecond decimals)",
            "producer": "hmmgpu-device",
            "pid": self.pid,
            "records_written": stats.written,
            "records_dropped": stats.dropped,
            "ring_capacity": RING_CAPACITY,
        });
        let _ = self.write_line(&format!("],\n\"metadata\":{metadata}}}\n"));
        self.flush();
    }

    /// Writes the trace events of one record, one per line.
    fn event_lines(&mut self, record: &Record) {
        let events = events_of(self.pid, record);
        let mut text = String::new();
        for e in &events {
            text.push(',');
            text.push_str(&e.to_string());
            text.push('\n');
        }
        if self.write_line(&text).is_ok() {
            self.written += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// A CLOCK_MONOTONIC nanosecond reading as the format's microseconds.
fn micros(ns: u64) -> Value {
    // Below 2^53 for any uptime under a hundred days: exact.
    #[allow(clippy::cast_precision_loss)]
    let us = ns as f64 / 1000.0;
    json!(us)
}

fn hex(n: u64) -> String {
    format!("{n:#x}")
}

fn side(p: Phys) -> String {
    match p {
        Phys::Guest(a) => format!("guest:{a:#x}"),
        Phys::Vram(a) => format!("vram:{a:#x}"),
    }
}

fn access_name(access: u32) -> String {
    let mut names = Vec::new();
    for (bit, name) in [
        (event::ACCESS_READ, "read"),
        (event::ACCESS_WRITE, "write"),
        (event::ACCESS_ATOMIC, "atomic"),
    ] {
        if access & bit != 0 {
            names.push(name);
        }
    }
    names.join("|")
}

fn event_args(e: &Event) -> Map<String, Value> {
    let mut args = Map::new();
    args.insert(
        "kind".into(),
        json!(match e.kind {
            event::FAULT => "fault",
            event::ECC => "ecc",
            _ => "unknown",
        }),
    );
    args.insert("ctx".into(), json!(e.ctx));
    args.insert("addr".into(), json!(hex(e.addr)));
    args.insert("access".into(), json!(access_name(e.access)));
    args.insert(
        "reason".into(),
        json!(match e.reason {
            event::REASON_NOT_MAPPED => "not-mapped".to_string(),
            event::REASON_PERMISSION => "permission".to_string(),
            r => r.to_string(),
        }),
    );
    args.insert("seq".into(), json!(e.seq));
    args
}

/// The decoded ranges of a command, compactly (every one of them).
fn ranges_of(command: &Command<'_>) -> Value {
    let v: Vec<Value> = match command {
        Command::Copy(r) => r
            .iter()
            .map(|r| json!([side(r.src), side(r.dst), r.len]))
            .collect(),
        Command::Fill(r) => r
            .iter()
            .map(|r| json!([format!("pattern:{:#018x}", r.pattern), side(r.dst), r.len]))
            .collect(),
        Command::Map(_, r) => r
            .iter()
            .map(|r| {
                json!([
                    format!("va:{:#x}", r.va),
                    side(r.phys),
                    r.len,
                    format!(
                        "{}{}",
                        access_name(r.perms.bits()),
                        if r.huge { "|huge" } else { "" }
                    )
                ])
            })
            .collect(),
        Command::Unmap(_, r) => r
            .iter()
            .map(|r| json!([format!("va:{:#x}", r.va), r.len]))
            .collect(),
        Command::Vread(_, r) => r
            .iter()
            .map(|r| {
                json!([
                    format!("va:{:#x}", r.va),
                    format!("guest:{:#x}", r.buffer),
                    r.len
                ])
            })
            .collect(),
        Command::Vwrite(_, r) => r
            .iter()
            .map(|r| {
                json!([
                    format!("guest:{:#x}", r.buffer),
                    format!("va:{:#x}", r.va),
                    r.len
                ])
            })
            .collect(),
        Command::Atomic(_, r) => vec![json!([
            format!("va:{:#x}", r.va),
            format!("{:?}", r.op),
            hex(r.operand)
        ])],
        Command::Counters(r) => vec![json!([format!("guest:{:#x}", r.dst), r.len])],
        Command::Nop
        | Command::CtxCreate(_)
        | Command::CtxDestroy(_)
        | Command::Replay(_)
        | Command::Cancel(_) => Vec::new(),
    };
    Value::Array(v)
}

fn status_value(response: &Response) -> Value {
    json!(response.status.name())
}

/// The trace events (one or more) of `record`, in process `pid`.
pub fn events_of(pid: u32, record: &Record) -> Vec<Value> {
    let instant = |tid: u32, ts: u64, name: &str, cat: &str, args: Map<String, Value>| {
        json!({"ph": "i", "s": "t", "pid": pid, "tid": tid, "ts": micros(ts),
               "name": name, "cat": cat, "args": Value::Object(args)})
    };
    match record {
        Record::Command(c) => vec![command_event(pid, c)],
        Record::Fault { ts, event, parked } => {
            let mut args = event_args(event);
            args.insert("reported".into(), json!(parked.is_some()));
            let mut out = Vec::new();
            if let Some(tag) = parked {
                args.insert("tag".into(), json!(hex(*tag)));
                out.push(json!({"ph": "b", "pid": pid, "tid": track::FAULTS,
                    "ts": micros(*ts), "cat": "parked", "id": hex(*tag),
                    "name": format!("parked (ctx {})", event.ctx),
                    "args": {"tag": hex(*tag), "addr": hex(event.addr)}}));
            }
            out.insert(
                0,
                instant(track::FAULTS, *ts, "device fault", "fault", args),
            );
            out
        }
        Record::Unparked { ts, ctx, tag, how } => {
            let how_name = match how {
                Unpark::Replay => "replay".to_string(),
                Unpark::Cancel(op) => format!("completed with FAULT by {}", op.name()),
                Unpark::Forgotten => "forgotten (reset or queue stop)".to_string(),
            };
            let mut args = Map::new();
            args.insert("tag".into(), json!(hex(*tag)));
            args.insert("ctx".into(), json!(ctx));
            args.insert("how".into(), json!(how_name));
            let name = match how {
                Unpark::Replay => "replay",
                Unpark::Cancel(_) => "cancel",
                Unpark::Forgotten => "forgotten",
            };
            vec![
                instant(track::FAULTS, *ts, name, "fault", args),
                json!({"ph": "e", "pid": pid, "tid": track::FAULTS, "ts": micros(*ts),
                       "cat": "parked", "id": hex(*tag),
                       "name": format!("parked (ctx {ctx})"), "args": {"how": how_name}}),
            ]
        }
        Record::InjectedEvent { ts, event, posted } => {
            let mut args = event_args(event);
            args.insert("posted".into(), json!(posted));
            vec![instant(
                track::INJECTED,
                *ts,
                "injected event",
                "injected",
                args,
            )]
        }
        Record::InjectedFault { ts, line } => {
            // "fault #N: KIND ARGS at command M": named by its kind.
            let kind = line
                .split_once(": ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("fault");
            let mut args = Map::new();
            args.insert("log".into(), json!(line));
            vec![instant(
                track::INJECTED,
                *ts,
                &format!("injected {kind}"),
                "injected",
                args,
            )]
        }
        Record::Interrupt { ts, queue, action } => {
            let mut args = Map::new();
            args.insert(
                "queue".into(),
                json!(if *queue == hmmgpu_abi::QUEUE_EVENT {
                    "event"
                } else {
                    "command"
                }),
            );
            let name = match action {
                InterruptAction::Signal => "interrupt",
                InterruptAction::Drop => "interrupt dropped (injected)",
                InterruptAction::Delay(d) => {
                    args.insert("delay_us".into(), json!(d.as_micros()));
                    "interrupt delayed (injected)"
                }
            };
            vec![instant(track::INTERRUPTS, *ts, name, "interrupt", args)]
        }
        Record::Device { ts, what, detail } => {
            let mut args = Map::new();
            if !detail.is_empty() {
                args.insert("detail".into(), json!(detail));
            }
            vec![instant(track::DEVICE, *ts, what, "device", args)]
        }
    }
}

fn command_event(pid: u32, c: &CommandRecord) -> Value {
    let header = hmmgpu_abi::CmdHeader::from_bytes(&c.request);
    let op = header.and_then(|h| Opcode::try_from(h.opcode).ok());
    let name = match (header, op) {
        (_, Some(op)) => op.name().to_string(),
        (Some(h), None) => format!("opcode {:#x}", h.opcode),
        (None, None) => "short command".to_string(),
    };
    let mut args = Map::new();
    if let Some(h) = header {
        args.insert("tag".into(), json!(hex(h.tag)));
        if op.is_some_and(Opcode::takes_context) {
            args.insert("ctx".into(), json!(h.ctx));
        }
    }
    match c.outcome {
        Outcome::Completed(response) => {
            args.insert("status".into(), status_value(&response));
            args.insert("bytes".into(), json!(response.bytes));
            if response.status != Status::Ok {
                args.insert("failed_index".into(), json!(response.failed_index));
            }
        }
        Outcome::Parked => {
            args.insert("status".into(), json!("parked on a device fault"));
        }
        Outcome::Forgotten => {
            args.insert("status".into(), json!("forgotten (reset or queue stop)"));
        }
    }
    for (key, bytes) in c.moved.fields() {
        if bytes != 0 {
            args.insert(key.into(), json!(bytes));
        }
    }
    if c.slices > 1 {
        args.insert("slices".into(), json!(c.slices));
    }
    if let Some((tag, response)) = c.resumed {
        args.insert("resumed_tag".into(), json!(hex(tag)));
        if let Some(r) = response {
            args.insert("resumed_status".into(), status_value(&r));
            args.insert("resumed_bytes".into(), json!(r.bytes));
        }
    }
    match Command::decode(&c.request) {
        Ok(command) => {
            let ranges = ranges_of(&command);
            if ranges.as_array().is_some_and(|r| !r.is_empty()) {
                args.insert("ranges".into(), ranges);
            }
        }
        Err(rejected) => {
            args.insert("rejected".into(), json!(rejected.status.name()));
        }
    }
    let cat = match op {
        Some(Opcode::Unmap) => "invalidation",
        _ => "command",
    };
    json!({
        "ph": "X", "pid": pid, "tid": track::COMMANDS,
        "ts": micros(c.start), "dur": micros(c.end.saturating_sub(c.start)),
        "name": name, "cat": cat, "args": Value::Object(args),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmmgpu_abi::{CmdHeader, Range, RangeFlags};

    fn request(op: Opcode, ctx: u32, tag: u64, ranges: &[Range]) -> Box<[u8]> {
        let count = u32::try_from(ranges.len()).unwrap();
        let mut b = CmdHeader::new(op, ctx, tag, count).to_bytes().to_vec();
        for r in ranges {
            b.extend_from_slice(&r.to_bytes());
        }
        b.into_boxed_slice()
    }

    fn copy_record(start: u64, bytes: u32) -> Record {
        let mut moved = Moved::default();
        moved.add_copy(Some(Phys::Guest(0)), Phys::Vram(0), u64::from(bytes));
        Record::Command(Box::new(CommandRecord {
            start,
            end: start + 500,
            request: request(
                Opcode::Copy,
                0,
                7,
                &[Range::new(0x1000, 0x2000, bytes, RangeFlags::DST_VRAM)],
            ),
            outcome: Outcome::Completed(Response::ok(u64::from(bytes))),
            moved,
            slices: 1,
            resumed: None,
        }))
    }

    fn parse(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn the_file_is_trace_event_json_with_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let tracer = Tracer::create(&path).unwrap();
        tracer.record(copy_record(1_000_000, 4096));
        tracer.record(Record::Fault {
            ts: 2_000_000,
            event: Event {
                kind: event::FAULT,
                ctx: 1,
                addr: 0x7000,
                access: event::ACCESS_READ,
                reason: event::REASON_NOT_MAPPED,
                seq: 1,
            },
            parked: Some(9),
        });
        tracer.record(Record::Unparked {
            ts: 3_000_000,
            ctx: 1,
            tag: 9,
            how: Unpark::Replay,
        });
        tracer.record(Record::Interrupt {
            ts: 3_500_000,
            queue: hmmgpu_abi::QUEUE_COMMAND,
            action: InterruptAction::Delay(Duration::from_millis(40)),
        });
        tracer.device("reset", "RESET_DEVICE".into());
        let stats = tracer.finish();
        assert_eq!(
            stats,
            TraceStats {
                written: 5,
                dropped: 0
            }
        );
        assert_eq!(tracer.finish(), stats, "finish is idempotent");
        let v = parse(&path);
        assert_eq!(v["metadata"]["clock"], CLOCK);
        assert_eq!(v["metadata"]["records_written"], 5);
        let events = v["traceEvents"].as_array().unwrap();
        let copy = events.iter().find(|e| e["name"] == "COPY").unwrap();
        assert_eq!(copy["ph"], "X");
        assert_eq!(copy["ts"], 1000.0);
        assert_eq!(copy["dur"], 0.5);
        assert_eq!(copy["args"]["bytes_guest_to_vram"], 4096);
        assert_eq!(copy["args"]["status"], "ok");
        assert_eq!(
            copy["args"]["ranges"],
            json!([["guest:0x1000", "vram:0x2000", 4096]])
        );
        let phases: Vec<&str> = events.iter().map(|e| e["ph"].as_str().unwrap()).collect();
        for ph in ["M", "X", "i", "b", "e"] {
            assert!(phases.contains(&ph), "{ph} in {phases:?}");
        }
        let delayed = events
            .iter()
            .find(|e| e["name"] == "interrupt delayed (injected)")
            .unwrap();
        assert_eq!(delayed["args"]["delay_us"], 40_000);
    }

    #[test]
    fn a_full_ring_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let tracer = Tracer::with_capacity(&path, 4).unwrap();
        // Faster than the writer's first drain: the ring holds 4.
        for i in 0..1000 {
            tracer.record(copy_record(i * 1000, 8));
        }
        let stats = tracer.finish();
        assert_eq!(stats.written + stats.dropped, 1000);
        assert!(stats.dropped > 0, "{stats:?}");
        let v = parse(&path);
        assert_eq!(v["metadata"]["records_dropped"], stats.dropped);
        let copies = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "COPY")
            .count();
        assert_eq!(copies as u64, stats.written);
    }

    #[test]
    fn special_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        let e = Tracer::create(&link).unwrap_err();
        assert!(e.to_string().contains("link"), "{e}");
        Tracer::create(Path::new("/dev/null")).unwrap_err();
    }

    #[test]
    fn the_clock_is_monotonic_nanoseconds() {
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        let b = now();
        assert!(b - a >= 2_000_000, "{a} {b}");
    }
}
