// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The vhost-user glue: feature negotiation, the config space, turning
//! descriptor chains of the command queue into [`Engine`] calls, and the
//! event queue the engine reports device faults through.
//!
//! Everything a chain holds comes from the guest and may be garbage. Nothing
//! here panics or returns an error to the vhost-user event loop because of
//! it (an error would stop the queue's worker thread for good): bad chains
//! are completed with an error status, or with used length 0 when there is
//! no room for a response, and counted as failed.
//!
//! Both queues are served by the one worker thread (the default
//! `queues_per_thread`), so the engine, the parked chains and both rings are
//! only ever touched from there. The event queue is passive: the driver
//! posts writable buffers and kicks; the device ignores the kicks and pops a
//! buffer only when it has an event to write. A command parked on a device
//! fault keeps its chain here, by head index, until REPLAY, CANCEL or
//! CTX_DESTROY completes it; its used element is then added just before the
//! one of the command that completed it, in the same batch, and one
//! notification check covers both (used-ring order differs from avail order,
//! which virtio allows).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};
use std::thread;

use hmmgpu_abi::{
    DeviceConfig, Event, Response, Status, ABI_VERSION, CONFIG_MAGIC, MAX_CONTEXTS, MAX_RANGES,
    NUM_QUEUES, PAGE_SIZE, QUEUE_COMMAND, QUEUE_EVENT, QUEUE_SIZE,
};
use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::engine::{
    Budget, Completion, Engine, EventSink, Executed, GuestRam, InterruptAction, Step,
    MAX_COMMAND_LEN,
};
use crate::faults::FaultInjector;
use crate::trace::{self, Record, Tracer};

/// Virtio feature bits the device offers.
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// A descriptor chain of a queue, holding its view of guest RAM.
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestRam>>;

/// The hmmgpu vhost-user device. The daemon wraps it in a `RwLock`
/// (`VhostUserBackendMut`), so one command is executed at a time, in queue
/// order, as the spec promises.
///
/// The worker holds that lock while it handles an event, and QEMU's vCPU
/// threads wait for it on every config-space read (GET_CONFIG), so one call
/// does at most [`Budget::PER_CALL`] bytes of work, for at most
/// [`Budget::CALL_TIME`]: a longer command is suspended
/// and its chain kept here; the call arms the resume timer and returns,
/// letting go of the lock, and the worker goes on when the timer fires.
pub struct HmmGpuBackend {
    engine: Engine,
    mem: GuestMemoryAtomic<GuestRam>,
    event_idx: bool,
    acked_features: u64,
    /// Chains of commands parked on device faults, by head index (the
    /// token the engine knows them by).
    parked: HashMap<u16, Chain>,
    /// The chain of the command the engine suspended, out of budget.
    current: Option<Chain>,
    /// Armed when a call ran out of budget with work left; the worker polls
    /// it ([`register_wakeups`]) and calls again [`RESUME_PAUSE`] later.
    resume: Option<TimerFd>,
    /// Whose command ring this process serves (see [`RingOrigin`]).
    origin: RingOrigin,
    /// How long the worker keeps looking at a command ring that ran dry
    /// before it waits for a kick ([`HmmGpuBackend::set_poll_window`]).
    poll_window: std::time::Duration,
}

/// Whether the command ring the front end handed over was set up with this
/// process, or is one a previous backend process served: a backend that
/// died, restarted on the same socket and VRAM file under a running guest
/// (QEMU's chardev reconnect hands the rings over from the used index on).
/// The VRAM survives in its file; the MMU contexts and parked commands died
/// with the old process, so the new one executes nothing until the driver
/// resets the device: it leaves the command ring alone (from the used index
/// on it may hold commands the dead process completed, out of order, after
/// a parked one) and tells the driver with a RESTARTED event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RingOrigin {
    /// Not looked at since this process started (or since an inherited
    /// ring stopped).
    Unknown,
    /// The ring started at index 0 with this process (the driver set the
    /// device up with it), or the device was reset since (RESET_DEVICE):
    /// this process's state is what the driver expects. A pause and resume
    /// keeps it so.
    Ours,
    /// The ring started at index `at`: a previous process served it;
    /// `announced` once the RESTARTED event is posted.
    Inherited { at: u16, announced: bool },
}

/// How long the worker leaves the device alone between two calls that
/// share a long command: the vhost-user thread (GET_CONFIG for a vCPU) and
/// the front end get the lock in that gap. (Rescheduling at once would not
/// do: the worker would take the lock again before a waiting reader's
/// thread is even scheduled.)
pub const RESUME_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// What one pass over the command queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueRun {
    /// Some chain was taken or completed.
    taken: bool,
    /// The budget ran out with work left (a suspended command, or chains
    /// not looked at yet).
    more: bool,
}

impl HmmGpuBackend {
    /// A device whose copy engine is `engine`. Guest memory arrives later,
    /// with the front end's SET_MEM_TABLE.
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            mem: GuestMemoryAtomic::new(GuestRam::new()),
            event_idx: false,
            acked_features: 0,
            parked: HashMap::new(),
            current: None,
            resume: TimerFd::new()
                .inspect_err(|e| error!("creating the resume timerfd: {e}"))
                .ok(),
            origin: RingOrigin::Unknown,
            poll_window: std::time::Duration::ZERO,
        }
    }

    /// After the command queue runs dry, the worker keeps looking at it
    /// for `window` before it waits for a kick, with notifications off, so
    /// a driver that submits again within it neither kicks (a VM exit) nor
    /// waits for the worker to wake (vhost-net's busyloop). Zero: off.
    /// The worker holds the device meanwhile: a config-space read waits
    /// up to `window` longer.
    pub fn set_poll_window(&mut self, window: std::time::Duration) {
        self.poll_window = window;
    }

    /// Busy-polls the command ring for up to the poll window; whether a
    /// chain was made available meanwhile.
    fn poll_for_more(&self, vring: &VringRwLock) -> bool {
        if self.poll_window.is_zero() {
            return false;
        }
        let mem = self.mem.memory();
        let start = std::time::Instant::now();
        loop {
            {
                let state = vring.get_ref();
                let queue = state.get_queue();
                match queue.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire) {
                    Ok(idx) if idx.0 != queue.next_avail() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            if start.elapsed() >= self.poll_window
                || !queue_ready(vring)
                || self.engine.faults().queue_stalled()
            {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// The copy engine (and through it the VRAM and counters).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The timerfd the worker must poll to go on with work a call left
    /// (see [`register_wakeups`]).
    pub fn resume_fd(&self) -> Option<RawFd> {
        self.resume.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The config space the driver reads.
    pub fn config(&self) -> DeviceConfig {
        DeviceConfig {
            magic: CONFIG_MAGIC,
            version: ABI_VERSION,
            vram_size: self.engine.vram().size(),
            page_size: PAGE_SIZE as u32,
            max_ranges: MAX_RANGES,
            max_contexts: MAX_CONTEXTS,
            reserved: 0,
        }
    }

    /// Asks the worker to call again, after [`RESUME_PAUSE`] (the budget
    /// ran out with work left).
    fn schedule_resume(&mut self) {
        match &mut self.resume {
            Some(timer) => {
                if let Err(e) = timer.reset(RESUME_PAUSE, None) {
                    error!("command queue: arming the resume timer: {e}");
                }
            }
            None => error!("command queue: no resume timer; waiting for the next kick"),
        }
    }

    /// Goes on with the suspended command, then executes available chains of
    /// the command queue, within one call's budget, then interrupts the
    /// driver if it asked for it.
    fn process_queue(&mut self, vrings: &[VringRwLock]) -> io::Result<QueueRun> {
        let Some(vring) = vrings.get(usize::from(QUEUE_COMMAND)) else {
            return Ok(QueueRun::default());
        };
        let mem = self.mem.memory();
        let mut events = EventQueue {
            vring: vrings.get(usize::from(QUEUE_EVENT)),
            mem: mem.clone(),
            tracer: self.engine.tracer().cloned(),
        };
        if queue_ready(vring) {
            self.note_ring_origin(vring);
        }
        if let RingOrigin::Inherited { at, announced } = self.origin {
            // Until it is told: an event buffer taken now, or at a later call.
            if !announced && self.engine.post_restarted(&mut events) {
                self.origin = RingOrigin::Inherited {
                    at,
                    announced: true,
                };
                if let Some(tracer) = self.engine.tracer() {
                    tracer.device("restart announced", "RESTARTED event posted".into());
                }
            }
            return Ok(QueueRun::default());
        }
        let mut budget = Budget::per_call();
        let mut run = QueueRun::default();
        let mut used = Vec::new();
        if let Some(chain) = self.current.take() {
            let step = self
                .engine
                .continue_suspended(chain.memory(), &mut events, &mut budget);
            run.taken = true;
            match step {
                Step::Suspended => {
                    self.current = Some(chain);
                    run.more = true;
                }
                Step::Done(executed) => used.extend(self.complete(chain, executed)),
            }
        }
        // One chain at a time: an injected stall (which a command can arm
        // through a fault plan) stops the device before the next one; the
        // front end may stop the queue between two calls.
        while !run.more && !self.engine.faults().queue_stalled() && queue_ready(vring) {
            if budget.exhausted() {
                run.more = true;
                break;
            }
            let next = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(|e| queue_error("command queue: reading the avail ring", e))?
                .next();
            let Some(chain) = next else {
                break;
            };
            run.taken = true;
            let head = chain.head_index();
            let current = self.current.as_ref().map(DescriptorChain::head_index);
            if self.parked.contains_key(&head) || current == Some(head) {
                // The driver made a chain available again while the device
                // still owns it: a driver bug. Completing either would
                // confuse it; leave this one unanswered.
                self.engine.stats().count_failed();
                self.engine.stats().guest_error(format_args!(
                    "chain {head}: made available while the device owns it; ignored"
                ));
                continue;
            }
            match self.process_chain(chain, &mut events, &mut budget) {
                Some(completed) => used.extend(completed),
                None => run.more = true,
            }
        }
        let used_any = !used.is_empty();
        for (head, used_len) in used {
            vring
                .add_used(head, used_len)
                .map_err(|e| queue_error("command queue: writing the used ring", e))?;
        }
        // A batch that only parked or suspended commands used nothing: no
        // interrupt.
        if used_any
            && vring
                .needs_notification()
                .map_err(|e| queue_error("command queue: reading used_event", e))?
        {
            let action = self.engine.faults().interrupt();
            if let Some(tracer) = self.engine.tracer() {
                tracer.record(Record::Interrupt {
                    ts: trace::now(),
                    queue: QUEUE_COMMAND,
                    action,
                });
            }
            signal(vring, action)?;
        }
        Ok(run)
    }

    /// Looks, once per ring start, at where the command ring starts: at 0
    /// for a driver that set the device up with this process; anywhere else
    /// for a ring a previous backend process served (see [`RingOrigin`]).
    /// The first look comes without a kick: the vhost-user library calls
    /// the worker for a ring as soon as it is enabled, so commands a driver
    /// queued while no backend served them are seen too.
    /// (A ring whose index wrapped to exactly 0 would pass for ours: one
    /// restart in 65536 is not noticed, and the driver then sees
    /// BAD_CONTEXT for its contexts.)
    fn note_ring_origin(&mut self, vring: &VringRwLock) {
        if self.origin != RingOrigin::Unknown {
            return;
        }
        let (next_avail, next_used) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (queue.next_avail(), queue.next_used())
        };
        if next_avail == 0 && next_used == 0 {
            self.origin = RingOrigin::Ours;
            return;
        }
        self.origin = RingOrigin::Inherited {
            at: next_avail,
            announced: false,
        };
        let message = format!(
            "the command ring was handed over at index {next_avail} (used {next_used}): \
             a previous backend served this guest and died; its contexts are gone, so \
             this one executes nothing until the driver resets the device (RESTARTED event)"
        );
        info!("{message}");
        if let Some(tracer) = self.engine.tracer() {
            tracer.device("ring inherited", message);
        }
    }

    /// Posts the injected events waiting (ECC, spurious faults, storms).
    fn post_injected(&mut self, vrings: &[VringRwLock]) {
        let mut events = EventQueue {
            vring: vrings.get(usize::from(QUEUE_EVENT)),
            mem: self.mem.memory(),
            tracer: self.engine.tracer().cloned(),
        };
        self.engine.post_injected(&mut events);
    }

    /// Executes one command chain within `budget`. Returns the used
    /// elements it completed: a parked command it completed, if any, then
    /// its own (used length 0 when the chain had no room for a response;
    /// none when it parked). `None` when the budget ran out: the chain is
    /// kept as the current one.
    fn process_chain(
        &mut self,
        chain: Chain,
        events: &mut dyn EventSink,
        budget: &mut Budget,
    ) -> Option<Vec<(u16, u32)>> {
        let head = chain.head_index();
        let mem = chain.memory();
        let dropped = match chain.clone().writer(mem) {
            Ok(writer) if writer.available_bytes() >= Response::SIZE => None,
            Ok(writer) => Some(format!(
                "{} writable bytes, a response needs {}",
                writer.available_bytes(),
                Response::SIZE
            )),
            Err(e) => Some(format!("bad writable part ({e})")),
        };
        if let Some(why) = dropped {
            if let Some(tracer) = self.engine.tracer() {
                tracer.device("chain dropped", format!("chain {head}: {why}"));
            }
            self.engine.stats().count_failed();
            self.engine
                .stats()
                .guest_error(format_args!("chain {head}: {why}; dropped"));
            budget.spend(Budget::STEP_COST);
            return Some(vec![(head, 0)]);
        }
        let executed = match read_command(&chain, mem) {
            Ok(request) => {
                match self
                    .engine
                    .process_budgeted(mem, &request, u64::from(head), events, budget)
                {
                    Step::Done(executed) => executed,
                    Step::Suspended => {
                        self.current = Some(chain);
                        return None;
                    }
                }
            }
            Err(e) => {
                if let Some(tracer) = self.engine.tracer() {
                    tracer.device("unreadable command", format!("chain {head}: {e}"));
                }
                self.engine.stats().count_failed();
                self.engine
                    .stats()
                    .guest_error(format_args!("chain {head}: cannot read the command ({e})"));
                budget.spend(Budget::STEP_COST);
                Executed {
                    resumed: None,
                    response: Some(Response::failed(Status::BadRequest, 0)),
                }
            }
        };
        Some(self.complete(chain, executed))
    }

    /// The used elements of what `executed` completed for `chain`: a parked
    /// command first, then the chain's own (kept, parked, when it has none).
    fn complete(&mut self, chain: Chain, executed: Executed) -> Vec<(u16, u32)> {
        let head = chain.head_index();
        let mut used: Vec<(u16, u32)> = executed
            .resumed
            .and_then(|completion| self.complete_parked(completion))
            .into_iter()
            .collect();
        match executed.response {
            Some(response) => used.push((head, write_response(&chain, response))),
            None => {
                debug!("chain {head}: parked on a device fault");
                self.parked.insert(head, chain);
            }
        }
        used
    }

    /// Writes the response of a parked command the engine completed;
    /// returns its used element.
    fn complete_parked(&mut self, completion: Completion) -> Option<(u16, u32)> {
        let head = u16::try_from(completion.token).ok();
        let Some((head, chain)) = head.and_then(|h| Some((h, self.parked.remove(&h)?))) else {
            error!("completion of unknown parked chain {}", completion.token);
            return None;
        };
        Some((head, write_response(&chain, completion.response)))
    }
}

/// Whether the front end has the queue running (it may stop it between two
/// calls of the worker).
fn queue_ready(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

/// Signals the command queue's interrupt as the fault hooks say: now, never,
/// or later from a timer thread (the used ring is already updated).
fn signal(vring: &VringRwLock, action: InterruptAction) -> io::Result<()> {
    match action {
        InterruptAction::Signal => vring.signal_used_queue(),
        InterruptAction::Drop => {
            debug!("command queue: interrupt dropped (fault injection)");
            Ok(())
        }
        InterruptAction::Delay(delay) => {
            let vring = vring.clone();
            thread::Builder::new()
                .name("hmmgpu-late-irq".into())
                .spawn(move || {
                    thread::sleep(delay);
                    if let Err(e) = vring.signal_used_queue() {
                        warn!("command queue: delayed interrupt: {e}");
                    }
                })
                .map(drop)
        }
    }
}

/// `handle_event` id of the fault injector's eventfd (ids up to
/// [`NUM_QUEUES`] belong to the queues and the exit event).
pub const FAULT_WAKEUP_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// `handle_event` id of the backend's resume timerfd.
pub const RESUME_EVENT: u16 = NUM_QUEUES as u16 + 2;

/// Registers the fault injector's eventfd and the backend's resume timerfd
/// (`resume`, [`HmmGpuBackend::resume_fd`]) with the daemon's queue worker,
/// so events injected through the control socket are posted (and a cleared
/// stall resumes) without waiting for a kick, and work a call left over
/// goes on.
pub fn register_wakeups(
    daemon: &VhostUserDaemon<Arc<RwLock<HmmGpuBackend>>>,
    faults: &FaultInjector,
    resume: Option<RawFd>,
) -> io::Result<()> {
    let handlers = daemon.get_epoll_handlers();
    let handler = handlers
        .first()
        .ok_or_else(|| io::Error::other("the daemon has no queue worker"))?;
    let fault_fd = faults
        .notify_fd()
        .ok_or_else(|| io::Error::other("fault injection has no wakeup eventfd"))?;
    handler.register_listener(fault_fd, EventSet::IN, u64::from(FAULT_WAKEUP_EVENT))?;
    let resume = resume.ok_or_else(|| io::Error::other("the backend has no resume timer"))?;
    handler.register_listener(resume, EventSet::IN, u64::from(RESUME_EVENT))
}

/// Writes `response` into the writable part of `chain` (checked to have
/// room); returns the used length.
fn write_response(chain: &Chain, response: Response) -> u32 {
    let head = chain.head_index();
    let written = chain
        .clone()
        .writer(chain.memory())
        .map_err(io::Error::other)
        .and_then(|mut writer| writer.write_all(&response.to_bytes()));
    if let Err(e) = written {
        // Cannot happen (room was checked), but never trust it.
        error!("chain {head}: writing the response: {e}");
        return 0;
    }
    debug!("chain {head}: {}", response.status.name());
    Response::SIZE as u32
}

/// The event queue as the engine's [`EventSink`]: each event goes into the
/// next buffer the driver posted, which is then used and signalled.
struct EventQueue<'a> {
    vring: Option<&'a VringRwLock>,
    mem: GuestMemoryLoadGuard<GuestRam>,
    /// The device timeline, when recorded (its interrupts).
    tracer: Option<Arc<Tracer>>,
}

impl EventSink for EventQueue<'_> {
    fn post(&mut self, event: &Event) -> bool {
        let Some(vring) = self.vring else {
            return false;
        };
        if !vring.get_ref().is_enabled() {
            return false;
        }
        // Buffers too small for an event are returned unused (length 0) and
        // the next one is tried; at most a ring's worth.
        for _ in 0..QUEUE_SIZE {
            let next = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().iter(self.mem.clone()) {
                    Ok(mut chains) => chains.next(),
                    Err(e) => {
                        debug!("event queue: {e}");
                        return false;
                    }
                }
            };
            let Some(chain) = next else {
                return false;
            };
            let head = chain.head_index();
            let used_len = write_event(&chain, event);
            if let Err(e) = vring.add_used(head, used_len) {
                error!("{}", queue_error("event queue: writing the used ring", e));
                return false;
            }
            match vring.needs_notification() {
                Ok(true) => {
                    if let Some(tracer) = &self.tracer {
                        tracer.record(Record::Interrupt {
                            ts: trace::now(),
                            queue: QUEUE_EVENT,
                            action: InterruptAction::Signal,
                        });
                    }
                    if let Err(e) = vring.signal_used_queue() {
                        error!("event queue: signalling: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => error!("{}", queue_error("event queue: reading used_event", e)),
            }
            if used_len != 0 {
                return true;
            }
        }
        false
    }
}

/// Writes `event` into an event-queue chain; returns the used length (0
/// when the chain has no room for it).
fn write_event(chain: &Chain, event: &Event) -> u32 {
    let head = chain.head_index();
    let written = chain
        .clone()
        .writer(chain.memory())
        .map_err(io::Error::other)
        .and_then(|mut writer| {
            if writer.available_bytes() < Event::SIZE {
                return Err(io::Error::other(format!(
                    "{} writable bytes, an event needs {}",
                    writer.available_bytes(),
                    Event::SIZE
                )));
            }
            writer.write_all(&event.to_bytes())
        });
    match written {
        Ok(()) => Event::SIZE as u32,
        Err(e) => {
            warn!("event buffer {head}: {e}; returned unused");
            0
        }
    }
}

/// Reads the device-readable part of `chain` (at most [`MAX_COMMAND_LEN`]
/// bytes: no command is longer, and a hostile chain could claim gigabytes).
fn read_command(chain: &Chain, mem: &GuestRam) -> io::Result<Vec<u8>> {
    let mut reader = chain.clone().reader(mem).map_err(io::Error::other)?;
    let mut request = vec![0u8; reader.available_bytes().min(MAX_COMMAND_LEN)];
    reader.read_exact(&mut request)?;
    Ok(request)
}

fn queue_error(what: &str, e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl VhostUserBackendMut for HmmGpuBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        DEVICE_FEATURES
    }

    fn acked_features(&mut self, features: u64) {
        debug!("features acked: {features:#x}");
        self.acked_features = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // RESET_DEVICE: a guest reboot (or driver reset) that resets the
        // device drops every MMU context with it.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        if queue_index != u32::from(QUEUE_COMMAND) {
            return Ok(());
        }
        // The front end stopping the command queue (GET_VRING_BASE: QEMU
        // sends it when the guest resets the device or the VM stops) ends
        // an injected stall, as a device reset does.
        if self.engine.faults().queue_stalled() {
            self.engine.faults().reset();
        }
        // Parked chains belong to the ring being stopped: completing one
        // later would put a stale head into the ring the driver sets up
        // after its reset. They are forgotten; the driver gives them up.
        let forgotten = self.engine.forget_parked();
        self.parked.clear();
        self.current = None;
        // An inherited ring stopped: the driver is resetting the device
        // (or the VM pauses). Where the ring starts again tells which.
        if matches!(self.origin, RingOrigin::Inherited { .. }) {
            self.origin = RingOrigin::Unknown;
        }
        if let Some(tracer) = self.engine.tracer() {
            tracer.device(
                "command queue stopped",
                format!("{forgotten} parked or suspended command(s) forgotten"),
            );
        }
        if forgotten > 0 {
            info!("command queue stopped: {forgotten} parked command(s) forgotten");
        }
        Ok(())
    }

    fn reset_device(&mut self) {
        if let Some(tracer) = self.engine.tracer() {
            tracer.device("device reset", "RESET_DEVICE from the front end".into());
        }
        self.event_idx = false;
        self.acked_features = 0;
        // The rings are re-initialized after a reset: parked chains are
        // forgotten, never completed, and the contexts go with them.
        self.parked.clear();
        self.current = None;
        // The device is empty now, as the driver that reset it expects:
        // whatever ring it sets up next is served as its own.
        self.origin = RingOrigin::Ours;
        self.engine.reset();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config().to_bytes();
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(usize::try_from(size).ok()?)?));
        match range.and_then(|range| config.get(range)) {
            Some(bytes) => bytes.to_vec(),
            None => {
                // An empty reply is how vhost-user reports a failed GET_CONFIG.
                warn!(
                    "GET_CONFIG of {size} bytes at {offset} is outside the {}-byte config",
                    config.len()
                );
                Vec::new()
            }
        }
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        warn!(
            "SET_CONFIG of {} bytes at {offset} refused: the config space is read-only",
            buf.len()
        );
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "hmmgpu config space is read-only",
        ))
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestRam>) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the daemon stop the queue worker thread when the session ends.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .inspect_err(|e| error!("creating the exit event: {e}"))
            .ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} for event {device_event}");
            return Ok(());
        }
        if device_event == FAULT_WAKEUP_EVENT {
            // Injected events to post, or a stall was cleared.
            self.engine.faults().acknowledge_wakeup();
            self.post_injected(vrings);
            let ready = vrings
                .get(usize::from(QUEUE_COMMAND))
                .is_some_and(queue_ready);
            if !ready || self.engine.faults().queue_stalled() {
                return Ok(());
            }
        } else if device_event == RESUME_EVENT {
            // A call before this one ran out of budget. (The timer expired:
            // epoll said so, so reading it does not block.)
            if let Some(timer) = &mut self.resume {
                if let Err(e) = timer.wait() {
                    warn!("command queue: reading the resume timer: {e}");
                }
            }
        } else if device_event == QUEUE_EVENT {
            // New event buffers: they are taken when an event needs one
            // (a RESTARTED event that found none before, too).
            debug!("event queue kicked");
            if matches!(
                self.origin,
                RingOrigin::Inherited {
                    announced: false,
                    ..
                }
            ) {
                if let Err(e) = self.process_queue(vrings) {
                    error!("{e}");
                }
            }
            return Ok(());
        } else if device_event != QUEUE_COMMAND {
            warn!("event for unknown queue {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(QUEUE_COMMAND)) else {
            return Ok(());
        };
        if self.engine.faults().queue_stalled() {
            debug!("command queue kicked while stalled (fault injection)");
            return Ok(());
        }
        // A broken ring (bogus avail index, used ring outside guest RAM) is
        // the guest's fault: log it and wait for the next kick rather than
        // kill the worker thread.
        let result = if self.event_idx {
            // With EVENT_IDX the driver only kicks when told to: keep draining
            // until re-enabling notifications finds no new work, or a chain
            // added in the window between the two would wait forever. When a
            // call runs out of budget, notifications stay off and the resume
            // eventfd brings the worker back to go on draining.
            loop {
                if let Err(e) = vring.disable_notification() {
                    break Err(queue_error("command queue: disabling notifications", e));
                }
                let run = match self.process_queue(vrings) {
                    Ok(run) => run,
                    Err(e) => break Err(e),
                };
                if run.more {
                    self.schedule_resume();
                    break Ok(());
                }
                // Stopped by the front end (GET_VRING_BASE marks the ring
                // not ready before it waits for this lock in stop_vring):
                // chains still in the avail ring cannot be taken, and
                // looping on them would hold the lock forever. The ring's
                // restart brings a kick. An inherited ring is left alone
                // (its chains stay available).
                if self.engine.faults().queue_stalled()
                    || !queue_ready(vring)
                    || matches!(self.origin, RingOrigin::Inherited { .. })
                {
                    break Ok(());
                }
                if self.poll_for_more(vring) {
                    continue;
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(queue_error("command queue: enabling notifications", e)),
                }
            }
        } else {
            self.process_queue(vrings).map(|run| {
                if run.more {
                    self.schedule_resume();
                }
            })
        };
        if let Err(e) = result {
            error!("{e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{NoFaults, Stats};
    use crate::vram::Vram;
    use std::sync::Arc;

    fn backend(dir: &tempfile::TempDir) -> HmmGpuBackend {
        let vram = Arc::new(Vram::open(&dir.path().join("vram"), 4 << 20).unwrap());
        HmmGpuBackend::new(Engine::new(
            vram,
            Arc::new(Stats::default()),
            Arc::new(NoFaults),
        ))
    }

    #[test]
    fn config_space_reads_are_bounds_checked() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(&dir);
        let whole = b.get_config(0, DeviceConfig::SIZE as u32);
        let config = DeviceConfig::from_bytes(&whole).unwrap();
        assert_eq!(config.magic, CONFIG_MAGIC);
        assert_eq!(config.version, ABI_VERSION);
        assert_eq!(config.vram_size, 4 << 20);
        assert_eq!(config.page_size, 4096);
        assert_eq!(config.max_ranges, MAX_RANGES);
        assert_eq!(b.get_config(8, 8), (4u64 << 20).to_le_bytes());
        assert_eq!(config.max_contexts, MAX_CONTEXTS);
        assert_eq!(config.reserved, 0);
        assert_eq!(b.get_config(24, 4), MAX_CONTEXTS.to_le_bytes());
        assert_eq!(b.get_config(32, 0), Vec::<u8>::new());
        for (offset, size) in [(0, 33), (28, 8), (32, 1), (u32::MAX, 2), (1, u32::MAX)] {
            assert!(b.get_config(offset, size).is_empty(), "{offset}+{size}");
        }
    }

    // -- Chain shapes, with virtio-queue's MockSplitQueue as the driver. -----

    use hmmgpu_abi::{CmdHeader, Opcode, Range, RangeFlags};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// Guest RAM: 16 MiB from 0; the rings at 0, buffers from 1 MiB.
    const RAM_LEN: usize = 16 << 20;
    const CMD: u64 = 0x10_0000;
    const RESP: u64 = 0x20_0000;
    const DATA: u64 = 0x30_0000;
    const RING_LEN: u16 = 64;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// A backend whose command queue is a MockSplitQueue in `mem`.
    struct Rig {
        _dir: tempfile::TempDir,
        /// Leaked: the mock borrows it for the whole test (creating a mock
        /// resets the ring indices, so there is only one).
        mem: &'static GuestRam,
        queue: MockSplitQueue<'static, GuestRam>,
        backend: HmmGpuBackend,
        vrings: Vec<VringRwLock>,
        /// Descriptors written so far (chains go one after another).
        next_desc: u16,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let mut backend = backend(&dir);
            let mem: &'static GuestRam = Box::leak(Box::new(
                GuestRam::from_ranges(&[(GuestAddress(0), RAM_LEN)]).unwrap(),
            ));
            let atomic = GuestMemoryAtomic::new(mem.clone());
            backend.update_memory(atomic.clone()).unwrap();
            let queue = MockSplitQueue::create(mem, GuestAddress(0), RING_LEN);
            let command = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
            command.set_queue_size(RING_LEN);
            command
                .set_queue_info(
                    queue.desc_table_addr().0,
                    queue.avail_addr().0,
                    queue.used_addr().0,
                )
                .unwrap();
            command.set_queue_ready(true);
            command.set_enabled(true);
            // The event queue is not set up: faults cannot be reported.
            let event = VringRwLock::new(atomic, QUEUE_SIZE).unwrap();
            Rig {
                _dir: dir,
                mem,
                queue,
                backend,
                vrings: vec![command, event],
                next_desc: 0,
            }
        }

        fn queue(&self) -> &MockSplitQueue<'static, GuestRam> {
            &self.queue
        }

        /// Makes `descs` (their NEXT flags and links as given) available as
        /// one chain whose head is the first, then kicks the device.
        fn submit_raw(&mut self, descs: &[RawDescriptor]) -> u16 {
            let head = self.next_desc;
            self.queue().add_desc_chains(descs, head).unwrap();
            self.next_desc += u16::try_from(descs.len()).unwrap();
            self.kick();
            head
        }

        /// Like `submit_raw`, linking `bufs` (addr, len, flags) with NEXT.
        fn submit(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
            let first = self.next_desc;
            let last = bufs.len() - 1;
            let descs: Vec<RawDescriptor> = bufs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let i = u16::try_from(i).unwrap();
                    let more = usize::from(i) < last;
                    let flags = if more { flags | NEXT } else { flags };
                    desc(addr, len, flags, if more { first + i + 1 } else { 0 })
                })
                .collect();
            self.submit_raw(&descs)
        }

        /// Kicks the device, then calls it again as its worker does when the
        /// resume timer fires, until no command is left half done (a slow
        /// host, qemu-user, runs out of a call's time even on small ones).
        fn kick(&mut self) {
            for _ in 0..10_000 {
                self.backend
                    .handle_event(QUEUE_COMMAND, EventSet::IN, &self.vrings, 0)
                    .unwrap();
                if !self.backend.engine().has_suspended() {
                    return;
                }
            }
            panic!("a command was still suspended after 10000 calls");
        }

        /// The used elements (id, len) so far.
        fn used(&self) -> Vec<(u32, u32)> {
            let queue = self.queue();
            // The mock's ring fields are raw: little-endian in memory.
            let n = u16::from_le(queue.used().idx().load());
            (0..n)
                .map(|i| {
                    let elem = queue.used().ring().ref_at(usize::from(i)).unwrap().load();
                    (elem.id(), elem.len())
                })
                .collect()
        }

        fn response(&self, at: u64) -> Option<Response> {
            let mut bytes = [0u8; Response::SIZE];
            self.mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
            Response::from_bytes(&bytes)
        }

        fn write_command(&self, at: u64, op: Opcode, ranges: &[Range]) -> u32 {
            let count = u32::try_from(ranges.len()).unwrap();
            let mut bytes = CmdHeader::new(op, 0, 7, count).to_bytes().to_vec();
            for r in ranges {
                bytes.extend_from_slice(&r.to_bytes());
            }
            self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
            u32::try_from(bytes.len()).unwrap()
        }

        fn stats(&self) -> crate::StatsSnapshot {
            self.backend.engine().stats().snapshot()
        }
    }

    const RESP_LEN: u32 = Response::SIZE as u32;

    #[test]
    fn a_chain_without_room_for_a_response_is_dropped_and_counted() {
        let mut rig = Rig::new();
        let len = rig.write_command(CMD, Opcode::Nop, &[]);
        // Read-only chain: no writable part at all.
        let head = rig.submit(&[(CMD, len, 0)]);
        // A writable part 8 bytes short.
        let short = rig.submit(&[(CMD, len, 0), (RESP, RESP_LEN - 8, WRITE)]);
        // A writable part outside guest RAM.
        let outside = rig.submit(&[(CMD, len, 0), (RAM_LEN as u64, RESP_LEN, WRITE)]);
        assert_eq!(
            rig.used(),
            [
                (u32::from(head), 0),
                (u32::from(short), 0),
                (u32::from(outside), 0)
            ]
        );
        assert_eq!(rig.response(RESP), Some(Response::ok(0)), "RAM was zero");
        assert_eq!(
            (rig.stats().commands_ok, rig.stats().commands_failed),
            (0, 3)
        );
        // The queue still serves a well-formed chain.
        let good = rig.submit(&[(CMD, len, 0), (RESP, RESP_LEN, WRITE)]);
        assert_eq!(rig.used().last(), Some(&(u32::from(good), RESP_LEN)));
        assert_eq!(rig.stats().commands_ok, 1);
    }

    #[test]
    fn commands_and_responses_may_be_split_over_many_descriptors() {
        let mut rig = Rig::new();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        rig.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let copy = Range::new(DATA, 0x1000, 4096, RangeFlags::DST_VRAM);
        let len = rig.write_command(CMD, Opcode::Copy, &[copy]);
        // The 48-byte command in 5 pieces (one empty), the response in two.
        let head = rig.submit(&[
            (CMD, 1, 0),
            (CMD + 1, 0, 0),
            (CMD + 1, 22, 0),
            (CMD + 23, 20, 0),
            (CMD + 43, len - 43, 0),
            (RESP, 5, WRITE),
            (RESP + 0x100, RESP_LEN - 5, WRITE),
        ]);
        assert_eq!(rig.used(), [(u32::from(head), RESP_LEN)]);
        let mut resp = [0u8; Response::SIZE];
        rig.mem
            .read_slice(&mut resp[..5], GuestAddress(RESP))
            .unwrap();
        rig.mem
            .read_slice(&mut resp[5..], GuestAddress(RESP + 0x100))
            .unwrap();
        assert_eq!(Response::from_bytes(&resp), Some(Response::ok(4096)));
        let mut vram = vec![0u8; 4096];
        rig.backend.engine().vram().read(0x1000, &mut vram).unwrap();
        assert!(vram == data, "the copy did not land");
    }

    #[test]
    fn an_indirect_table_carries_the_whole_chain() {
        let mut rig = Rig::new();
        let len = rig.write_command(CMD, Opcode::Nop, &[]);
        let table = DATA + 0x10_0000;
        for (i, d) in [desc(CMD, len, NEXT, 1), desc(RESP, RESP_LEN, WRITE, 0)]
            .iter()
            .enumerate()
        {
            rig.mem
                .write_obj(*d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = rig.submit_raw(&[desc(table, 32, VRING_DESC_F_INDIRECT as u16, 0)]);
        assert_eq!(rig.used(), [(u32::from(head), RESP_LEN)]);
        assert_eq!(rig.response(RESP), Some(Response::ok(0)));
        // An indirect table outside guest RAM: nothing readable or
        // writable, so the chain is dropped.
        let bad = rig.submit_raw(&[desc(
            RAM_LEN as u64 - 16,
            32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )]);
        assert_eq!(rig.used().last(), Some(&(u32::from(bad), 0)));
    }

    #[test]
    fn an_unreadable_or_truncated_command_is_a_bad_request() {
        let mut rig = Rig::new();
        // The readable descriptor is outside guest RAM.
        let head = rig.submit(&[(RAM_LEN as u64 - 8, 24, 0), (RESP, RESP_LEN, WRITE)]);
        assert_eq!(rig.used(), [(u32::from(head), RESP_LEN)]);
        assert_eq!(
            rig.response(RESP),
            Some(Response::failed(Status::BadRequest, 0))
        );
        // A writable-only chain: no command at all.
        let head = rig.submit(&[(RESP + 0x100, RESP_LEN, WRITE)]);
        assert_eq!(rig.used().last(), Some(&(u32::from(head), RESP_LEN)));
        assert_eq!(
            rig.response(RESP + 0x100),
            Some(Response::failed(Status::BadRequest, 0))
        );
        // A command announcing two ranges with the readable part ending
        // halfway through the first.
        let copy = Range::new(DATA, 0, 16, RangeFlags::DST_VRAM);
        rig.write_command(CMD, Opcode::Copy, &[copy, copy]);
        let head = rig.submit(&[(CMD, 24 + 12, 0), (RESP, RESP_LEN, WRITE)]);
        assert_eq!(rig.used().last(), Some(&(u32::from(head), RESP_LEN)));
        assert_eq!(
            rig.response(RESP),
            Some(Response::failed(Status::BadRequest, 0))
        );
        assert_eq!(rig.stats().commands_failed, 3);
    }

    #[test]
    fn a_descriptor_loop_or_a_bad_head_does_not_hang_the_queue() {
        let mut rig = Rig::new();
        let len = rig.write_command(CMD, Opcode::Nop, &[]);
        // A chain whose last descriptor points back at its first: the
        // device walks at most a ring's worth of descriptors.
        let first = rig.next_desc;
        let looping = rig.submit_raw(&[
            desc(CMD, len, NEXT, first + 1),
            desc(RESP, RESP_LEN, WRITE | NEXT, first),
        ]);
        let used = rig.used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(looping));
        // A head index beyond the ring: the device logs it and goes on
        // with the next chain on the next kick.
        let queue = rig.queue();
        let idx = u16::from_le(queue.avail().idx().load());
        queue
            .avail()
            .ring()
            .ref_at(usize::from(idx % RING_LEN))
            .unwrap()
            .store((RING_LEN + 5).to_le());
        queue.avail().idx().store(idx.wrapping_add(1).to_le());
        rig.kick();
        let good = rig.submit(&[(CMD, len, 0), (RESP + 0x200, RESP_LEN, WRITE)]);
        assert_eq!(rig.used().last(), Some(&(u32::from(good), RESP_LEN)));
        assert_eq!(rig.response(RESP + 0x200), Some(Response::ok(0)));
    }

    #[test]
    fn a_resume_after_the_front_end_stopped_the_queue_returns() {
        // Found by the hostile-guest VM test: a FILL too big for one call is
        // suspended, more chains wait behind it, and the front end stops the
        // command queue (a device reset: GET_VRING_BASE) before the resume
        // timer fires. The resume must return at once: the queue is not
        // ready, so nothing can be taken, and looping until it is would hold
        // the device's lock that the front end's next message (GET_CONFIG,
        // SET_VRING_ENABLE) waits for, freezing the VM for good.
        let mut rig = Rig::new();
        rig.backend.set_event_idx(true);
        let vram = rig.backend.engine().vram().size();
        let whole = Range::new(0x5a5a, 0, vram as u32, RangeFlags::DST_VRAM);
        let fill = vec![whole; MAX_RANGES as usize];
        let len = rig.write_command(CMD, Opcode::Fill, &fill);
        let head = rig.next_desc;
        rig.queue()
            .add_desc_chains(
                &[
                    desc(CMD, len, NEXT, head + 1),
                    desc(RESP, RESP_LEN, WRITE, 0),
                ],
                head,
            )
            .unwrap();
        let nop = rig.write_command(DATA, Opcode::Nop, &[]);
        rig.queue()
            .add_desc_chains(
                &[
                    desc(DATA, nop, NEXT, head + 3),
                    desc(RESP + 0x100, RESP_LEN, WRITE, 0),
                ],
                head + 2,
            )
            .unwrap();
        rig.backend
            .handle_event(QUEUE_COMMAND, EventSet::IN, &rig.vrings, 0)
            .unwrap();
        assert!(
            rig.backend.engine().has_suspended(),
            "the FILL took one call"
        );
        // GET_VRING_BASE, as vhost-user-backend's handler does it.
        rig.vrings[0].set_queue_ready(false);
        rig.backend.stop_vring(u32::from(QUEUE_COMMAND)).unwrap();
        let Rig {
            mut backend,
            vrings,
            ..
        } = rig;
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let r = backend.handle_event(RESUME_EVENT, EventSet::IN, &vrings, 0);
            let _ = tx.send(r.is_ok());
        });
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok(true),
            "the resume on a stopped queue did not return"
        );
    }

    #[test]
    fn offers_the_spec_features() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(&dir);
        assert_eq!(b.num_queues(), 2);
        assert_eq!(b.max_queue_size(), usize::from(QUEUE_SIZE));
        assert_eq!(b.features() & (1 << 32), 1 << 32, "VIRTIO_F_VERSION_1");
        assert_eq!(b.features() & (1 << 33), 0, "no VIRTIO_F_ACCESS_PLATFORM");
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::RESET_DEVICE));
        assert!(b.set_config(0, &[0; 4]).is_err());
    }
}
