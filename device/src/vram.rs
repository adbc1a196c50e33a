// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! The device's VRAM: a file mapped `MAP_SHARED`, the very file QEMU's memory
//! backend maps for BAR 2, so what the copy engine writes is what the guest
//! CPU sees through the BAR and the reverse.
//!
//! Every access goes through [`Vram::slice`], which checks the range against
//! the VRAM size with checked arithmetic; nothing here can touch memory
//! outside the mapping.
//!
//! The guest may access the same bytes concurrently through the BAR, so the
//! mapping is only ever handled as volatile memory ([`VolatileSlice`]), never
//! as a Rust `&[u8]`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

/// Smallest VRAM the device accepts (one 2 MiB huge page, the unit the
/// guest driver's ZONE_DEVICE chunks are made of).
pub const MIN_VRAM_SIZE: u64 = 2 << 20;

/// Why the VRAM could not be set up or accessed.
#[derive(Debug, thiserror::Error)]
pub enum VramError {
    /// The requested size is not a power of two, or below [`MIN_VRAM_SIZE`].
    #[error("VRAM size {0} is not a power of two of at least {MIN_VRAM_SIZE} bytes (2 MiB)")]
    BadSize(u64),
    /// The file exists but has another size than requested.
    #[error(
        "VRAM file {} is {file_size} bytes but the VRAM size is {wanted} bytes; \
         remove the file or give the matching --vram-size",
        path.display()
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its size on disk.
        file_size: u64,
        /// The size asked for.
        wanted: u64,
    },
    /// Opening, creating or sizing the file failed.
    #[error("VRAM file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The file is not safe to use: not a regular file, not ours, or open
    /// to other users (who could change the device's memory).
    #[error("VRAM file {}: {reason}; refusing it (the backend creates it 0600 when it is missing)", path.display())]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file's blocks could not be reserved (a full tmpfs): mapping it
    /// anyway would let a later access die of SIGBUS.
    #[error("VRAM file {}: reserving {size} bytes: {source}", path.display())]
    Reserve {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Why.
        source: io::Error,
    },
    /// mmap() failed.
    #[error("mapping the VRAM file: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
    /// An access was (partly) outside the VRAM.
    #[error("VRAM access of {len} bytes at offset {offset:#x} is outside the VRAM")]
    OutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
}

/// Refuses `file` (at `path`) unless it is a regular file owned by this
/// process's user and closed to everyone else.
fn check_owned_and_private(path: &Path, file: &File) -> Result<(), VramError> {
    let refuse = |reason: String| VramError::Unsafe {
        path: path.to_owned(),
        reason,
    };
    let meta = file.metadata().map_err(|source| VramError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(refuse(format!("owned by uid {}, not {me}", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refuse(format!(
            "mode {:o} lets other users at it (want 0600)",
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

/// The VRAM mapping.
#[derive(Debug)]
pub struct Vram {
    region: MmapRegion<()>,
    size: u64,
}

impl Vram {
    /// Maps `path` as a VRAM of `size` bytes. The file is created (mode
    /// 0600) when it does not exist; an existing file must be a regular file
    /// of ours that no other user can access, and already have exactly
    /// `size` bytes, so the backend never silently truncates or grows a file
    /// that QEMU maps too. A symbolic link is refused (O_NOFOLLOW). The
    /// file's blocks are reserved (posix_fallocate) before it is mapped, so
    /// a full tmpfs is an error here rather than a SIGBUS later.
    pub fn open(path: &Path, size: u64) -> Result<Self, VramError> {
        if !size.is_power_of_two() || size < MIN_VRAM_SIZE {
            return Err(VramError::BadSize(size));
        }
        let io_err = |source| VramError::Io {
            path: path.to_owned(),
            source,
        };
        let flags = libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(flags)
            .open(path)
        {
            Ok(file) => {
                file.set_len(size).map_err(io_err)?;
                file
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(flags)
                    .open(path)
                    .map_err(io_err)?;
                check_owned_and_private(path, &file)?;
                let file_size = file.metadata().map_err(io_err)?.len();
                if file_size != size {
                    return Err(VramError::SizeMismatch {
                        path: path.to_owned(),
                        file_size,
                        wanted: size,
                    });
                }
                file
            }
            Err(e) => return Err(io_err(e)),
        };
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size).map_err(
            |e| VramError::Reserve {
                path: path.to_owned(),
                size,
                source: e.into(),
            },
        )?;
        Self::from_file(file, size)
    }

    /// Maps the first `size` bytes of an already sized `file` shared.
    fn from_file(file: File, size: u64) -> Result<Self, VramError> {
        let len = usize::try_from(size).map_err(|_| VramError::BadSize(size))?;
        // MAP_SHARED: writes must reach the file (and QEMU's mapping of it);
        // MAP_NORESERVE: a sparse multi-GiB VRAM must not need swap backing.
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(VramError::Map)?;
        Ok(Self { region, size })
    }

    /// Size of the VRAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether `[offset, offset + len)` lies entirely inside the VRAM.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// The volatile view of `[offset, offset + len)`, or `OutOfRange`.
    pub fn slice(&self, offset: u64, len: u64) -> Result<VolatileSlice<'_>, VramError> {
        let out_of_range = || VramError::OutOfRange { offset, len };
        if !self.contains(offset, len) {
            return Err(out_of_range());
        }
        // Both fit in usize: they are bounded by the size of the mapping.
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let count = usize::try_from(len).map_err(|_| out_of_range())?;
        self.region
            .get_slice(start, count)
            .map_err(|_| out_of_range())
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VramError> {
        let slice = self.slice(offset, buf.len() as u64)?;
        slice.copy_to(buf);
        Ok(())
    }

    /// Copies `buf` to `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), VramError> {
        let slice = self.slice(offset, buf.len() as u64)?;
        slice.copy_from(buf);
        Ok(())
    }

    /// Copies `len` bytes from `src` to `dst` inside the VRAM, with memmove
    /// semantics when the two overlap.
    pub fn copy_within(&self, src: u64, dst: u64, len: u64) -> Result<(), VramError> {
        let from = self.slice(src, len)?;
        let to = self.slice(dst, len)?;
        from.copy_to_volatile_slice(to);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SIZE: u64 = MIN_VRAM_SIZE;

    #[test]
    fn creates_a_private_file_of_the_given_size_with_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vram");
        let vram = Vram::open(&path, SIZE).unwrap();
        assert_eq!(vram.size(), SIZE);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), SIZE);
        assert_eq!(meta.mode() & 0o777, 0o600);
        // Reserved, not sparse: every block is there.
        assert!(meta.blocks() * 512 >= SIZE, "{} blocks", meta.blocks());
    }

    #[test]
    fn refuses_links_shared_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        private_file(&target, SIZE);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = Vram::open(&link, SIZE).unwrap_err();
        assert!(
            matches!(&err, VramError::Io { source, .. } if source.raw_os_error() == Some(libc::ELOOP)),
            "{err}"
        );
        // Readable by the group, or by everyone: refused, untouched.
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Vram::open(&target, SIZE).unwrap_err();
            assert!(matches!(err, VramError::Unsafe { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains("other users"), "{err}");
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        Vram::open(&target, SIZE).unwrap();
        // A directory, a FIFO: not regular files.
        let err = Vram::open(dir.path(), SIZE).unwrap_err();
        assert!(
            matches!(err, VramError::Io { .. } | VramError::Unsafe { .. }),
            "{err}"
        );
        // Another user's file: only root can make one here.
        if rustix::process::geteuid().is_root() {
            let foreign = dir.path().join("foreign");
            private_file(&foreign, SIZE);
            std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
            let err = Vram::open(&foreign, SIZE).unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn a_vram_a_full_tmpfs_cannot_hold_is_an_error_not_a_sigbus() {
        // A tmpfs too small for the VRAM: only root can mount one.
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "hmmgpu-test"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("cannot mount a tmpfs here; skipped");
            return;
        }
        let err = Vram::open(&dir.path().join("vram"), SIZE).map(drop);
        let _ = std::process::Command::new("umount")
            .arg(dir.path())
            .status();
        let err = err.unwrap_err();
        assert!(matches!(err, VramError::Reserve { .. }), "{err}");
    }

    #[test]
    fn rejects_bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vram");
        for size in [0, 4096, MIN_VRAM_SIZE / 2, MIN_VRAM_SIZE + 4096, 3 << 20] {
            assert!(matches!(Vram::open(&path, size), Err(VramError::BadSize(s)) if s == size));
        }
        assert!(!path.exists(), "a rejected size must not create the file");
    }

    /// A file as QEMU's runner makes it: ours, 0600.
    fn private_file(path: &Path, len: u64) {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    #[test]
    fn existing_file_must_match_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vram");
        private_file(&path, SIZE * 2);
        let err = Vram::open(&path, SIZE).unwrap_err();
        assert!(
            matches!(err, VramError::SizeMismatch { file_size, wanted, .. }
            if file_size == SIZE * 2 && wanted == SIZE)
        );
        assert!(err.to_string().contains("--vram-size"));
        // The file was left alone.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE * 2);
        // The matching size maps it.
        Vram::open(&path, SIZE * 2).unwrap();
    }

    #[test]
    fn writes_reach_the_file_and_survive_remapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vram");
        let vram = Vram::open(&path, SIZE).unwrap();
        vram.write(SIZE - 4, b"HMMG").unwrap();
        drop(vram);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[bytes.len() - 4..], b"HMMG");
        let vram = Vram::open(&path, SIZE).unwrap();
        let mut buf = [0u8; 4];
        vram.read(SIZE - 4, &mut buf).unwrap();
        assert_eq!(&buf, b"HMMG");
    }

    #[test]
    fn accesses_are_bounds_checked() {
        let dir = tempfile::tempdir().unwrap();
        let vram = Vram::open(&dir.path().join("vram"), SIZE).unwrap();
        assert!(vram.contains(0, SIZE));
        assert!(vram.contains(SIZE, 0));
        assert!(!vram.contains(SIZE, 1));
        assert!(!vram.contains(1, SIZE));
        assert!(!vram.contains(u64::MAX, 2), "wrapping end must not pass");
        vram.slice(SIZE - 1, 2).unwrap_err();
        vram.slice(u64::MAX - 1, 4).unwrap_err();
        assert!(vram.write(SIZE - 2, &[1, 2, 3]).is_err());
        let mut buf = [0u8; 8];
        assert!(vram.read(SIZE - 4, &mut buf).is_err());
        assert!(vram.copy_within(0, SIZE - 4, 8).is_err());
        assert!(vram.copy_within(SIZE - 4, 0, 8).is_err());
    }

    #[test]
    fn copy_within_handles_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let vram = Vram::open(&dir.path().join("vram"), SIZE).unwrap();
        vram.write(100, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        vram.copy_within(100, 102, 8).unwrap();
        let mut buf = [0u8; 10];
        vram.read(100, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
