// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The control socket: a unix stream socket speaking JSON lines, one request
//! object per line, one response object per line (docs/control.md).
//!
//! It runs its own event loop on its own thread (rust-vmm's event-manager
//! over the listening socket, every connection and a stop eventfd, all
//! non-blocking), and a
//! request only touches shared counters and the fault injector, never the
//! device's queue worker: a stalled or slowed command queue (injected
//! `stall_queue`, `latency`) or a slow client never holds up an answer.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, warn};
use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::engine::Stats;
use crate::faults::{Fault, FaultError, FaultInjector};
use crate::plan::{Plan, PlanError};
use crate::session::Sessions;
use crate::stats::DeviceStats;

/// Longest request line accepted; longer ones get an error and the
/// connection is closed (a line is a few dozen bytes in practice).
const MAX_LINE: usize = 64 * 1024;

/// Most clients connected at once; more are turned away with an error.
pub const MAX_CLIENTS: usize = 16;

/// Most reply bytes waiting for a client that does not read; past it the
/// connection is closed (a reply is a few hundred bytes; `list` of many
/// faults a few KiB).
pub const MAX_OUTPUT: usize = 1 << 20;

/// Event data of the listener and the stop eventfd; connections count up
/// from [`FIRST_CONN`].
const LISTENER: u32 = 0;
const STOP: u32 = 1;
const FIRST_CONN: u32 = 2;

/// What a request may act on.
#[derive(Clone, Debug)]
pub struct Control {
    /// The device's counters.
    pub stats: Arc<Stats>,
    /// The fault injector (`None`: fault requests answer an error).
    pub faults: Option<Arc<FaultInjector>>,
    /// The front-end sessions (`None`: `session` answers an error).
    pub sessions: Option<Arc<Sessions>>,
}

impl Control {
    /// Counters only, no fault injection.
    pub fn stats_only(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            faults: None,
            sessions: None,
        }
    }
}

/// A running control socket. Dropping it stops its thread and removes the
/// socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Option<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600 and serves it on a
    /// background thread. A stale socket at `path` is replaced; any other
    /// kind of file there is an error.
    pub fn start(path: &Path, control: Control) -> io::Result<Self> {
        let listener = crate::socket::bind_private(path, "control socket")?;
        listener.set_nonblocking(true)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let plane = ControlPlane {
            listener,
            stop: stop.try_clone()?,
            stopped: stopped.clone(),
            control,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
        };
        let mut manager: EventManager<ControlPlane> =
            EventManager::new().map_err(|e| io::Error::other(format!("event manager: {e}")))?;
        manager.add_subscriber(plane);
        let thread = thread::Builder::new()
            .name("hmmgpu-control".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        warn!("control socket: {e}; control socket stopped");
                        return;
                    }
                }
            })?;
        Ok(Self {
            path: path.to_owned(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            if stop.write(1).is_ok() {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// One client connection: bytes read but not yet a full line, replies not
/// yet written.
struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once `output` is written (the client sent an over-long line).
    closing: bool,
    /// Whether epoll also waits for writability.
    want_out: bool,
}

/// The control plane as an event-manager subscriber: the listener, the
/// stop eventfd and every connection, all non-blocking, on the control
/// thread.
struct ControlPlane {
    listener: UnixListener,
    stop: EventFd,
    /// Set when the stop eventfd fires; the thread's loop ends.
    stopped: Arc<AtomicBool>,
    control: Control,
    conns: HashMap<u32, Conn>,
    next_token: u32,
}

/// What epoll waits for on a connection.
fn conn_events(conn: &Conn, token: u32) -> Events {
    let mut set = EventSet::IN | EventSet::READ_HANG_UP;
    if conn.want_out {
        set |= EventSet::OUT;
    }
    Events::with_data(&conn.stream, token, set)
}

impl ControlPlane {
    /// Accepts every pending connection.
    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(why) = admit(&stream, self.conns.len()) {
                        warn!("control socket: connection refused: {why}");
                        refuse(stream, &why);
                        continue;
                    }
                    let token = self.next_token;
                    // Tokens are not reused while a connection holds one:
                    // there are at most MAX_CLIENTS.
                    self.next_token = self.next_token.wrapping_add(1).max(FIRST_CONN);
                    let conn = Conn {
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        closing: false,
                        want_out: false,
                    };
                    let added = conn
                        .stream
                        .set_nonblocking(true)
                        .map_err(|e| e.to_string())
                        .and_then(|()| {
                            ops.add(conn_events(&conn, token))
                                .map_err(|e| e.to_string())
                        });
                    match added {
                        Ok(()) => {
                            self.conns.insert(token, conn);
                        }
                        Err(e) => warn!("control socket: new connection: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("control socket: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Serves connection `token`; drops it when it is done.
    fn serve_conn(&mut self, token: u32, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let was = conn.want_out;
        let keep = match serve(conn, &self.control) {
            Ok(keep) => keep,
            Err(e) => {
                debug!("control connection: {e}");
                false
            }
        };
        if keep {
            conn.want_out = !conn.output.is_empty();
            if conn.want_out != was {
                if let Err(e) = ops.modify(conn_events(conn, token)) {
                    debug!("control connection: {e}");
                }
            }
            return;
        }
        if let Some(conn) = self.conns.remove(&token) {
            let _ = ops.remove(conn_events(&conn, token));
        }
    }
}

impl MutEventSubscriber for ControlPlane {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [
            (self.listener.as_raw_fd(), LISTENER),
            (self.stop.as_raw_fd(), STOP),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                warn!("control socket: registering with the event manager: {e}");
                self.stopped.store(true, Ordering::Release);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STOP => self.stopped.store(true, Ordering::Release),
            LISTENER => self.accept(ops),
            token => self.serve_conn(token, ops),
        }
    }
}

/// Whether a new connection may stay: its peer runs as our user (the socket
/// is 0600, but a descriptor can be passed on), and there is room.
fn admit(stream: &UnixStream, clients: usize) -> Result<(), String> {
    let me = rustix::process::geteuid();
    let peer = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("no peer credentials: {e}"))?;
    if peer.uid != me {
        return Err(format!(
            "peer uid {} is not ours ({})",
            peer.uid.as_raw(),
            me.as_raw()
        ));
    }
    if clients >= MAX_CLIENTS {
        return Err(format!("{MAX_CLIENTS} clients connected already"));
    }
    Ok(())
}

/// Tells a client it is turned away (best effort, never blocking) and
/// closes the connection.
fn refuse(stream: UnixStream, why: &str) {
    let _ = stream.set_nonblocking(true);
    let _ = writeln!(&stream, "{}", error_reply(why));
}

/// Reads what a connection has, answers its complete lines and writes what
/// it can. Ok(false) when the connection is done.
fn serve(conn: &mut Conn, control: &Control) -> io::Result<bool> {
    let mut eof = false;
    if !conn.closing {
        let mut buf = [0u8; 4096];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => conn.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if conn.input.len() > MAX_LINE {
                break;
            }
        }
        while let Some(end) = conn.input.iter().position(|&b| b == b'\n') {
            if conn.output.len() > MAX_OUTPUT {
                // The client sends but does not read its answers.
                return Err(io::Error::other(format!(
                    "more than {MAX_OUTPUT} bytes of replies unread"
                )));
            }
            let line: Vec<u8> = conn.input.drain(..=end).collect();
            if line.len() > MAX_LINE {
                conn.closing = true;
                break;
            }
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            let reply = handle_request(&text, control);
            conn.output
                .extend_from_slice(format!("{reply}\n").as_bytes());
        }
        if conn.input.len() > MAX_LINE {
            conn.closing = true;
        }
        if conn.closing {
            conn.input.clear();
            let reply = error_reply(&format!("request line longer than {MAX_LINE} bytes"));
            conn.output
                .extend_from_slice(format!("{reply}\n").as_bytes());
        }
    }
    while !conn.output.is_empty() {
        match conn.stream.write(&conn.output) {
            Ok(n) => {
                conn.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let flushed = conn.output.is_empty();
    Ok(!(flushed && (eof || conn.closing)))
}

fn error_reply(message: &str) -> Value {
    json!({ "ok": false, "error": message })
}

/// One request, as a line of the control socket spells it: a JSON object
/// whose `cmd` names the variant. A member the request does not take is an
/// error (a misspelt `{"cmd":"clear","idd":1}` must not clear every fault).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the backend there?
    Ping {},
    /// The counters ([`DeviceStats`]).
    Stats {},
    /// The front-end sessions; with `serve_next`, first asks for (or
    /// cancels) serving the next front end ([`crate::session`]).
    Session {
        /// Serve the next front end after this one hangs up.
        #[serde(default)]
        serve_next: Option<bool>,
    },
    /// Injects one fault of the catalogue.
    Inject {
        /// The fault.
        fault: Fault,
    },
    /// Disarms fault `id`, or every fault.
    Clear {
        /// The fault to disarm (all when absent).
        #[serde(default)]
        id: Option<u64>,
    },
    /// The armed faults.
    List {},
    /// Loads a fault plan from a file the backend reads, or inline.
    LoadPlan {
        /// The plan file.
        #[serde(default)]
        path: Option<PathBuf>,
        /// The plan itself.
        #[serde(default)]
        plan: Option<Plan>,
    },
}

/// Why a request was refused (the `error` of the reply).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, or no request of the protocol.
    #[error("bad request: {0}")]
    Parse(#[from] serde_json::Error),
    /// A fault request to a backend without fault injection.
    #[error("fault injection is not enabled in this backend")]
    NoFaultInjection,
    /// `session` to a backend without sessions.
    #[error("this backend serves no vhost-user sessions")]
    NoSessions,
    /// The fault cannot be injected.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// The plan cannot be loaded.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// `clear` of an id that is not armed.
    #[error("no armed fault with id {0}")]
    NoSuchFault(u64),
    /// `load_plan` without exactly one of `path` and `plan`.
    #[error("load_plan needs a string \"path\" or a \"plan\" object")]
    PlanSource,
}

/// Answers one request line (a JSON object with a `cmd` member).
pub fn handle_request(line: &str, control: &Control) -> Value {
    let answer = serde_json::from_str::<Request>(line)
        .map_err(RequestError::from)
        .and_then(|request| answer(request, control));
    answer.unwrap_or_else(|e| error_reply(&e.to_string()))
}

/// The stats a `stats` request and the exit line report.
pub fn device_stats(control: &Control) -> DeviceStats {
    DeviceStats {
        injected: control.faults.as_ref().map(|f| f.injected_stats()),
        sessions: control.sessions.as_ref().map(|s| s.started()),
        ..DeviceStats::of(&control.stats)
    }
}

/// Carries out `request`.
fn answer(request: Request, control: &Control) -> Result<Value, RequestError> {
    let faults = || {
        control
            .faults
            .as_ref()
            .ok_or(RequestError::NoFaultInjection)
    };
    Ok(match request {
        Request::Ping {} => json!({ "ok": true }),
        Request::Stats {} => json!({ "ok": true, "stats": device_stats(control) }),
        Request::Session { serve_next } => {
            let sessions = control.sessions.as_ref().ok_or(RequestError::NoSessions)?;
            if let Some(on) = serve_next {
                sessions.set_serve_next(on);
            }
            json!({ "ok": true, "session": sessions.to_json() })
        }
        Request::Inject { fault } => {
            let id = faults()?.inject(fault)?;
            json!({ "ok": true, "id": id })
        }
        Request::Clear { id: None } => json!({ "ok": true, "cleared": faults()?.clear() }),
        Request::Clear { id: Some(id) } => {
            if !faults()?.clear_id(id) {
                return Err(RequestError::NoSuchFault(id));
            }
            json!({ "ok": true, "cleared": 1 })
        }
        Request::List {} => {
            let faults = faults()?;
            json!({
                "ok": true,
                "faults": faults.list(),
                "stalled": faults.stalled(),
                "plan_pending": faults.plan_pending(),
            })
        }
        Request::LoadPlan { path, plan } => {
            let faults = faults()?;
            let plan = match (path, plan) {
                (Some(path), None) => Plan::load(&path)?,
                (None, Some(plan)) => {
                    plan.validate()?;
                    plan
                }
                _ => return Err(RequestError::PlanSource),
            };
            let entries = plan.faults.len();
            faults.load_plan(plan)?;
            json!({ "ok": true, "entries": entries })
        }
    })
}

/// Sends one request line to the control socket at `path` and returns the
/// reply line, parsed (for `hmmgpu-device ctl` and `inject`).
pub fn request(path: &Path, request: &Value) -> io::Result<Value> {
    let mut stream = UnixStream::connect(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let timeout = Some(std::time::Duration::from_secs(10));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(line.trim()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control socket answered {:?}: {e}", line.trim()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ask(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &str) -> Value {
        stream.write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    }

    #[test]
    fn answers_requests() {
        let stats = Control::stats_only(Arc::new(Stats::default()));
        assert_eq!(
            handle_request(r#"{"cmd":"ping"}"#, &stats),
            json!({"ok": true})
        );
        let reply = handle_request(r#"{"cmd":"stats"}"#, &stats);
        assert_eq!(reply["ok"], true);
        assert_eq!(reply["stats"]["commands_ok"], 0);
        assert_eq!(reply["stats"]["bytes_filled"], 0);
        for bad in [
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"inject","fault":{"kind":"stall_queue"}}"#,
            r#"{"cmd":7}"#,
            "{}",
            "not json",
            "[1]",
        ] {
            let reply = handle_request(bad, &stats);
            assert_eq!(reply["ok"], false, "{bad}");
            assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }

    #[test]
    fn session_requests() {
        let mut control = Control::stats_only(Arc::new(Stats::default()));
        let reply = handle_request(r#"{"cmd":"session"}"#, &control);
        assert_eq!(reply["ok"], false, "no sessions in a stats-only control");
        let sessions = Arc::new(Sessions::default());
        control.sessions = Some(sessions.clone());
        sessions.begin();
        assert_eq!(
            handle_request(r#"{"cmd":"session","serve_next":true}"#, &control),
            json!({"ok": true, "session": {"started": 1, "connected": true, "serve_next": true}})
        );
        assert_eq!(
            handle_request(r#"{"cmd":"stats"}"#, &control)["stats"]["sessions"],
            1
        );
        assert!(sessions.end());
        assert_eq!(
            handle_request(r#"{"cmd":"session"}"#, &control),
            json!({"ok": true, "session": {"started": 1, "connected": false, "serve_next": false}})
        );
        for bad in [
            r#"{"cmd":"session","serve_next":1}"#,
            r#"{"cmd":"session","next":true}"#,
        ] {
            let reply = handle_request(bad, &control);
            assert_eq!(reply["ok"], false, "{bad}");
        }
    }

    #[test]
    fn serves_a_private_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A stale socket from an earlier run is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let server =
            ControlServer::start(&path, Control::stats_only(Arc::new(Stats::default()))).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut stream = UnixStream::connect(&path).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        assert_eq!(
            ask(&mut stream, &mut reader, "{\"cmd\":\"ping\"}\n"),
            json!({"ok": true})
        );
        let reply = ask(&mut stream, &mut reader, "\n{\"cmd\":\"stats\"}\n");
        assert_eq!(reply["stats"]["commands_failed"], 0);
        assert_eq!(
            ask(&mut stream, &mut reader, "{\"cmd\":\"x\"}\n")["ok"],
            false
        );

        drop(server);
        assert!(!path.exists(), "the socket file outlived the server");
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        fs::write(&path, b"precious").unwrap();
        let err = ControlServer::start(&path, Control::stats_only(Arc::new(Stats::default())))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    fn with_faults() -> (Control, Arc<FaultInjector>) {
        let faults = Arc::new(FaultInjector::default().quiet());
        let control = Control {
            stats: Arc::new(Stats::default()),
            faults: Some(faults.clone()),
            sessions: None,
        };
        (control, faults)
    }

    fn ask_json(control: &Control, request: Value) -> Value {
        handle_request(&request.to_string(), control)
    }

    #[test]
    fn injects_lists_and_clears_faults() {
        let (control, faults) = with_faults();
        let reply = ask_json(
            &control,
            json!({"cmd":"inject","fault":{"kind":"copy_error","count":3}}),
        );
        assert_eq!(reply, json!({"ok": true, "id": 1}));
        let range =
            json!({"kind":"copy_error","range":{"space":"vram","start":4096,"len":8192},"count":2});
        assert_eq!(
            ask_json(&control, json!({"cmd":"inject","fault":range}))["id"],
            2
        );
        for fault in [
            json!({"kind":"latency","us":10}),
            json!({"kind":"bandwidth","bytes_per_sec":1000}),
            json!({"kind":"drop_interrupts","count":2}),
            json!({"kind":"delay_interrupts","ms":5,"count":1}),
            json!({"kind":"stall_queue"}),
            json!({"kind":"spurious_faults","ctx":1,"addr":4096,"count":2}),
            json!({"kind":"fault_storm","ctx":2,"count":10}),
        ] {
            let reply = ask_json(&control, json!({"cmd":"inject","fault":fault}));
            assert_eq!(reply["ok"], true, "{fault}: {reply}");
        }
        let list = ask_json(&control, json!({"cmd":"list"}));
        assert_eq!(list["ok"], true);
        assert_eq!(list["stalled"], true);
        // The immediate ones (spurious_faults, fault_storm) are not armed.
        let kinds: Vec<&str> = list["faults"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["fault"]["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "copy_error",
                "copy_error",
                "latency",
                "bandwidth",
                "drop_interrupts",
                "delay_interrupts",
                "stall_queue"
            ]
        );
        assert_eq!(list["faults"][1], json!({"id": 2, "fault": range}));
        assert_eq!(
            ask_json(&control, json!({"cmd":"clear","id":7})),
            json!({"ok": true, "cleared": 1})
        );
        assert!(
            !faults.stalled(),
            "clearing the stall_queue fault un-stalls"
        );
        assert_eq!(
            ask_json(&control, json!({"cmd":"clear","id":7}))["ok"],
            false
        );
        assert_eq!(
            ask_json(&control, json!({"cmd":"clear","id":"x"}))["ok"],
            false
        );
        let stats = ask_json(&control, json!({"cmd":"stats"}));
        assert_eq!(stats["stats"]["injected"]["injected"], 9);
        assert_eq!(stats["stats"]["injected"]["queue_stalls"], 1);
        assert_eq!(stats["stats"]["commands_ok"], 0);
        assert_eq!(
            ask_json(&control, json!({"cmd":"clear"})),
            json!({"ok": true, "cleared": 6})
        );
        assert_eq!(
            ask_json(&control, json!({"cmd":"list"}))["faults"],
            json!([])
        );
    }

    #[test]
    fn bad_fault_requests_are_errors() {
        let (control, _faults) = with_faults();
        for bad in [
            json!({"cmd":"inject"}),
            json!({"cmd":"inject","fault":3}),
            json!({"cmd":"inject","fault":{"kind":"meteor"}}),
            json!({"cmd":"inject","fault":{"count":3}}),
            json!({"cmd":"inject","fault":{"kind":"copy_error","count":0}}),
            json!({"cmd":"inject","fault":{"kind":"copy_error","count":-1}}),
            json!({"cmd":"inject","fault":{"kind":"copy_error","cuont":1}}),
            json!({"cmd":"inject","fault":{"kind":"copy_error","range":{"space":"disk","start":0,"len":1}}}),
            json!({"cmd":"inject","fault":{"kind":"copy_error","range":{"space":"vram","start":0,"len":0}}}),
            json!({"cmd":"inject","fault":{"kind":"copy_error","probability":2.0}}),
            json!({"cmd":"inject","fault":{"kind":"latency"}}),
            json!({"cmd":"inject","fault":{"kind":"bandwidth","bytes_per_sec":0}}),
            json!({"cmd":"inject","fault":{"kind":"ecc","offset":0,"bit":8}}),
            // No VRAM attached to this injector.
            json!({"cmd":"inject","fault":{"kind":"ecc","offset":0,"bit":1}}),
            json!({"cmd":"inject","fault":{"kind":"spurious_faults","ctx":0,"addr":0}}),
            json!({"cmd":"inject","fault":{"kind":"fault_storm","ctx":5000,"count":1}}),
            json!({"cmd":"inject","fault":{"kind":"fault_storm","ctx":1,"count":0}}),
            json!({"cmd":"inject","fault":{"kind":"fault_storm","ctx":1,"count":1_000_000_000u64}}),
            json!({"cmd":"load_plan"}),
            json!({"cmd":"load_plan","path":"/nonexistent/plan.json"}),
            json!({"cmd":"load_plan","plan":{"faults":[{"fault":{"kind":"nope"}}]}}),
            json!({"cmd":"load_plan","plan":{"faults":[]},"path":"/x"}),
        ] {
            let reply = ask_json(&control, bad.clone());
            assert_eq!(reply["ok"], false, "{bad}: {reply}");
            assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        let stats = ask_json(&control, json!({"cmd":"stats"}));
        assert_eq!(stats["stats"]["injected"]["injected"], 0);
    }

    /// A misspelt member must not be ignored: `{"cmd":"clear","idd":1}`
    /// read as `{"cmd":"clear"}` would disarm every fault.
    #[test]
    fn a_request_with_an_unknown_member_is_refused_and_changes_nothing() {
        let (control, faults) = with_faults();
        for fault in [
            json!({"kind":"copy_error","count":3}),
            json!({"kind":"stall_queue"}),
        ] {
            assert_eq!(
                ask_json(&control, json!({"cmd":"inject","fault":fault}))["ok"],
                true
            );
        }
        let before = faults.list();
        for bad in [
            json!({"cmd":"clear","idd":1}),
            json!({"cmd":"clear","id":1,"all":true}),
            json!({"cmd":"ping","verbose":true}),
            json!({"cmd":"stats","reset":true}),
            json!({"cmd":"list","all":true}),
            json!({"cmd":"inject","fault":{"kind":"stall_queue"},"gpu":1}),
            json!({"cmd":"load_plan","plan":{"faults":[]},"replace":true}),
        ] {
            let reply = ask_json(&control, bad.clone());
            assert_eq!(reply["ok"], false, "{bad}: {reply}");
            let error = reply["error"].as_str().unwrap_or_default();
            assert!(error.contains("unknown field"), "{bad}: {reply}");
        }
        assert_eq!(
            faults.list(),
            before,
            "a refused request changed the faults"
        );
        assert!(faults.stalled());
        assert_eq!(faults.injected_stats().injected, 2);
    }

    #[test]
    fn loads_plans_inline_and_from_files() {
        let (control, faults) = with_faults();
        let plan = json!({"seed": 3, "faults": [
            {"fault": {"kind": "drop_interrupts", "count": 1}},
            {"after_commands": 10, "fault": {"kind": "stall_queue"}}
        ]});
        assert_eq!(
            ask_json(&control, json!({"cmd":"load_plan","plan":plan})),
            json!({"ok": true, "entries": 2})
        );
        let list = ask_json(&control, json!({"cmd":"list"}));
        assert_eq!(list["faults"][0]["fault"]["kind"], "drop_interrupts");
        assert_eq!(list["plan_pending"], 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.json");
        fs::write(&path, r#"{"faults":[{"fault":{"kind":"latency","us":5}}]}"#).unwrap();
        let reply = ask_json(
            &control,
            json!({"cmd":"load_plan","path":path.to_str().unwrap()}),
        );
        assert_eq!(reply, json!({"ok": true, "entries": 1}));
        assert_eq!(faults.list().len(), 2);
        assert_eq!(faults.plan_pending(), Some(0));
    }

    /// `load_plan` runs on the control thread: a path naming a device, a
    /// FIFO nobody writes or a huge file must be refused at once, not read
    /// without end or waited on.
    #[test]
    fn load_plan_refuses_devices_fifos_and_huge_files_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let huge = dir.path().join("huge.json");
        let file = fs::File::create(&huge).unwrap();
        file.set_len(crate::plan::MAX_PLAN_FILE + 1).unwrap();
        for path in [Path::new("/dev/zero"), &fifo, &huge] {
            let request = json!({"cmd":"load_plan","path":path});
            let (tx, rx) = std::sync::mpsc::channel();
            thread::spawn(move || {
                let (control, _faults) = with_faults();
                let _ = tx.send(ask_json(&control, request));
            });
            let reply = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("load_plan {} did not answer", path.display()));
            assert_eq!(reply["ok"], false, "{}: {reply}", path.display());
            let error = reply["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("not a regular file") || error.contains("at most"),
                "{}: {reply}",
                path.display()
            );
        }
    }

    #[test]
    fn clients_beyond_the_cap_and_clients_that_do_not_read_are_turned_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let server = ControlServer::start(&path, with_faults().0).unwrap();
        let mut clients: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        // Each is served (so all are registered before the next connects).
        for c in &mut clients {
            let mut reader = BufReader::new(c.try_clone().unwrap());
            assert_eq!(ask(c, &mut reader, "{\"cmd\":\"ping\"}\n")["ok"], true);
        }
        let extra = UnixStream::connect(&path).unwrap();
        let mut line = String::new();
        BufReader::new(extra).read_line(&mut line).unwrap();
        assert!(line.contains("clients connected already"), "{line}");
        // One leaves: there is room again (once the server saw it go).
        drop(clients.pop());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut again = UnixStream::connect(&path).unwrap();
            let mut reader = BufReader::new(again.try_clone().unwrap());
            if ask(&mut again, &mut reader, "{\"cmd\":\"ping\"}\n")["ok"] == true {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no room after a client left"
            );
            thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(clients);
        // A client that asks and never reads is dropped once its unread
        // replies pass MAX_OUTPUT, not buffered without end.
        let mut greedy = UnixStream::connect(&path).unwrap();
        greedy
            .set_write_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let request = "{\"cmd\":\"list\"}\n".repeat(1000);
        let mut sent = 0usize;
        let closed = loop {
            match greedy.write_all(request.as_bytes()) {
                Ok(()) => sent += 1000,
                Err(_) => break true,
            }
            if sent > 100_000 {
                break false;
            }
        };
        assert!(closed, "{sent} requests written, the server never hung up");
        greedy
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut replies = Vec::new();
        let _ = greedy.read_to_end(&mut replies);
        let one = handle_request("{\"cmd\":\"list\"}", &with_faults().0)
            .to_string()
            .len()
            + 1;
        assert!(
            replies.len() < sent * one,
            "all {sent} replies came: nothing was dropped"
        );
        drop(server);
    }

    /// The socket is 0600, but a descriptor can be passed on: a peer of
    /// another user is turned away all the same.
    #[test]
    fn a_peer_of_another_user_is_turned_away() {
        if !rustix::process::geteuid().is_root() {
            return; // only root can run a client as another user
        }
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("control.sock");
        let _server = ControlServer::start(&path, with_faults().0).unwrap();
        // Let the other user reach it (as a passed descriptor would).
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "socat",
                "-t2",
                "-",
            ])
            .arg(format!("UNIX-CONNECT:{}", path.display()))
            .stdin(std::process::Stdio::piped())
            .output();
        let Ok(out) = out else {
            return; // no setpriv or socat here
        };
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(reply.contains("peer uid 65534 is not ours"), "{reply}");
    }

    #[test]
    fn a_slow_client_does_not_hold_up_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (control, _faults) = with_faults();
        let server = ControlServer::start(&path, control).unwrap();
        // One client sends half a line and stalls; another gets answers.
        let mut slow = UnixStream::connect(&path).unwrap();
        slow.write_all(b"{\"cmd\":").unwrap();
        let mut fast = UnixStream::connect(&path).unwrap();
        let mut reader = BufReader::new(fast.try_clone().unwrap());
        assert_eq!(
            ask(
                &mut fast,
                &mut reader,
                "{\"cmd\":\"ping\"}\n{\"cmd\":\"ping\"}\n"
            ),
            json!({"ok": true})
        );
        let mut second = String::new();
        reader.read_line(&mut second).unwrap();
        assert_eq!(second.trim(), r#"{"ok":true}"#);
        // The slow one finishes its line later and is answered.
        slow.write_all(b"\"list\"}\n").unwrap();
        let mut reply = String::new();
        BufReader::new(slow.try_clone().unwrap())
            .read_line(&mut reply)
            .unwrap();
        assert!(reply.contains("\"ok\":true"), "{reply}");
        // An over-long line: an error, then the connection is closed.
        let mut long = UnixStream::connect(&path).unwrap();
        let mut junk = vec![b' '; MAX_LINE + 10];
        junk.push(b'\n');
        long.write_all(&junk).unwrap();
        let mut reader = BufReader::new(long);
        let mut text = String::new();
        reader.read_line(&mut text).unwrap();
        assert!(text.contains("longer than"), "{text}");
        let mut rest = String::new();
        // Closed: end of file (or a reset, for the unread bytes).
        assert!(
            !matches!(reader.read_line(&mut rest), Ok(n) if n > 0),
            "{rest}"
        );
        drop(server);
        assert!(!path.exists());
    }
}
