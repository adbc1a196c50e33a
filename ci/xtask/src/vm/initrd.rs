//! The run's nonce and the initramfs that carries it (docs/running.md,
//! "The nonce"): a second cpio archive appended to the built initramfs.

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;

/// Where images/init finds the run's nonce (then deletes it).
const NONCE_PATH: &str = "etc/hmmgpu-nonce";

/// A fresh random nonce (hex), from the kernel's CSPRNG.
pub(super) fn new_nonce() -> Result<String> {
    let mut b = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A newc cpio archive of regular files `(name, mode, data)` plus the
/// trailer.
fn cpio_newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]) {
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, i + 1, name, 0o100000 | mode, data);
    }
    entry(&mut out, files.len() + 1, "TRAILER!!!", 0, &[]);
    out
}

/// A copy of `initramfs` with the nonce file (and `init`, if given) appended
/// as a second, uncompressed cpio archive: the kernel unpacks concatenated
/// archives, later files replacing earlier ones; an uncompressed one must
/// start 4-byte aligned, hence the zero padding.
pub(super) fn initramfs_with_nonce(
    initramfs: &Path,
    out: &Path,
    nonce: &str,
    init: Option<&str>,
) -> Result<()> {
    let mut data =
        std::fs::read(initramfs).with_context(|| format!("reading {}", initramfs.display()))?;
    while !data.len().is_multiple_of(4) {
        data.push(0);
    }
    let nonce_line = format!("{nonce}\n");
    let mut files = vec![(NONCE_PATH, 0o400, nonce_line.as_bytes())];
    if let Some(init) = init {
        files.push(("init", 0o755, init.as_bytes()));
    }
    data.extend(cpio_newc(&files));
    std::fs::write(out, data).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    #[test]
    fn nonce_archive_is_a_newc_cpio() {
        let a = cpio_newc(&[("etc/hmmgpu-nonce", 0o400, b"abc\n")]);
        assert!(a.len().is_multiple_of(4));
        let text = String::from_utf8_lossy(&a);
        assert!(text.starts_with("070701"));
        // mode: a regular file, 0400.
        assert_eq!(&text[14..22], "00008100");
        // file size 4, name size 17 (with its NUL).
        assert_eq!(&text[54..62], "00000004");
        assert_eq!(&text[94..102], "00000011");
        assert!(text.contains("etc/hmmgpu-nonce\0"));
        assert!(text.contains("TRAILER!!!"));
        // The host's cpio reads it back, if it is installed.
        if let Ok(mut c) = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        {
            c.stdin.take().unwrap().write_all(&a).unwrap();
            let out = c.wait_with_output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), "etc/hmmgpu-nonce\n");
        }
    }

    #[test]
    fn nonce_is_fresh_hex() {
        let (a, b) = (new_nonce().unwrap(), new_nonce().unwrap());
        assert_eq!(a.len(), 24);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
