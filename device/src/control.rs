// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The control socket: a unix stream socket speaking JSON lines, one request
//! object per line, one response object per line (docs/control.md).
//!
//! It runs on its own threads (one accepting, one per connection) and only
//! reads shared counters, so a slow or stuck client never holds up the
//! command queue.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use log::{debug, warn};
use serde_json::{json, Value};

use crate::engine::Stats;

/// Longest request line accepted; longer ones get an error and the
/// connection is closed (a line is a few dozen bytes in practice).
const MAX_LINE: u64 = 64 * 1024;

/// A running control socket. Dropping it removes the socket file (the
/// accepting thread ends with the process).
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600 and serves it on a
    /// background thread. A stale socket at `path` is replaced; any other
    /// kind of file there is an error.
    pub fn start(path: &Path, stats: Arc<Stats>) -> io::Result<Self> {
        let listener = bind_private(path)?;
        let server = Self {
            path: path.to_owned(),
        };
        thread::Builder::new()
            .name("hmmgpu-control".into())
            .spawn(move || accept_loop(listener, stats))?;
        Ok(server)
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Binds a listening socket at `path` that only the owner can connect to.
///
/// The socket is bound under a temporary name, restricted to 0600 and only
/// then renamed to `path`, so there is no moment when `path` accepts
/// connections from other users (chmod after bind would leave one, and
/// changing the umask would affect every thread of the process).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let with_path =
        |e: io::Error| io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()));
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path).map_err(with_path)?,
        Ok(_) => {
            return Err(with_path(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e)),
    }
    let name = path.file_name().ok_or_else(|| {
        with_path(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let _ = fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp).map_err(with_path)?;
    let finish = fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = finish {
        let _ = fs::remove_file(&temp);
        return Err(with_path(e));
    }
    Ok(listener)
}

fn accept_loop(listener: UnixListener, stats: Arc<Stats>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let stats = stats.clone();
                let spawned = thread::Builder::new()
                    .name("hmmgpu-control-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_connection(stream, &stats) {
                            debug!("control connection: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    warn!("control socket: cannot start a connection thread: {e}");
                }
            }
            Err(e) => warn!("control socket: accept: {e}"),
        }
    }
}

/// Answers request lines until the client closes the connection.
fn serve_connection(stream: UnixStream, stats: &Stats) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = Vec::new();
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
            let reply = error_reply(&format!("request line longer than {MAX_LINE} bytes"));
            writeln!(writer, "{reply}")?;
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        writeln!(writer, "{}", handle_request(&text, stats))?;
    }
}

fn error_reply(message: &str) -> Value {
    json!({ "ok": false, "error": message })
}

/// Answers one request line (a JSON object with a `cmd` member).
pub fn handle_request(line: &str, stats: &Stats) -> Value {
    let request: Value = match serde_json::from_str(line) {
        Ok(value) => value,
        Err(e) => return error_reply(&format!("bad JSON: {e}")),
    };
    match request.get("cmd").and_then(Value::as_str) {
        Some("ping") => json!({ "ok": true }),
        Some("stats") => json!({ "ok": true, "stats": stats.snapshot() }),
        Some(other) => error_reply(&format!("unknown cmd {other:?}; known: ping, stats")),
        None => error_reply("request needs a string member \"cmd\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &str) -> Value {
        stream.write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    }

    #[test]
    fn answers_requests() {
        let stats = Stats::default();
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
    fn serves_a_private_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A stale socket from an earlier run is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let server = ControlServer::start(&path, Arc::new(Stats::default())).unwrap();
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
        let err = ControlServer::start(&path, Arc::new(Stats::default())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }
}
