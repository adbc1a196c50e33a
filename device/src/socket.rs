// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The backend's listening sockets (vhost-user and control): private to
//! the user running it whatever the umask.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Binds a listening socket at `path` that only the owner can connect to.
///
/// The socket is bound in a fresh directory of mode 0700 next to `path`,
/// restricted to 0600 and only then renamed to `path`, so there is no
/// moment when anyone else can reach it (chmod after bind would leave one,
/// and changing the umask would affect every thread of the process).
pub fn bind_private(path: &Path, what: &str) -> io::Result<UnixListener> {
    let with_path =
        |e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
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
    let mut dir_name = std::ffi::OsString::from(".");
    dir_name.push(name);
    dir_name.push(format!(".{}.tmp", std::process::id()));
    let dir = path.with_file_name(dir_name);
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(with_path)?;
    let temp = dir.join("socket");
    let bound = UnixListener::bind(&temp).and_then(|listener| {
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))?;
        fs::rename(&temp, path)?;
        Ok(listener)
    });
    let _ = fs::remove_dir_all(&dir);
    bound.map_err(with_path)
}

/// Removes a socket file when dropped (the listener bound by
/// [`bind_private`] does not).
#[derive(Debug)]
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_private_whatever_the_umask_and_never_replace_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A wide-open directory and socket would be 0777 under umask 0:
        // the mode is set before the socket appears at `path`.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let listener = bind_private(&path, "test socket").unwrap();
        let mode = fs::symlink_metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(listener);
        // A stale socket is replaced; a regular file is not.
        bind_private(&path, "test socket").unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"keep").unwrap();
        let err = bind_private(&file, "test socket").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&file).unwrap(), b"keep");
    }
}
