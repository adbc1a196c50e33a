//! The test pattern of the guest programs, ci/guest/pattern.h (keep them identical):
//! xorshift64 over little-endian u64 words, state seeded with
//! `seed ^ 0x9E3779B97F4A7C15` (1 if that is 0).

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

pub const PAGE: usize = 4096;

pub struct XorShift64(u64);

impl XorShift64 {
    pub fn new(seed: u64) -> Self {
        let x = seed ^ 0x9E37_79B9_7F4A_7C15;
        XorShift64(if x == 0 { 1 } else { x })
    }
}

impl Iterator for XorShift64 {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        Some(x)
    }
}

/// The first `bytes` bytes of the pattern of `seed`.
pub fn pattern(seed: u64, bytes: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes + 8);
    for w in XorShift64::new(seed) {
        if v.len() >= bytes {
            break;
        }
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.truncate(bytes);
    v
}

/// Where the pages of a pattern were found in a VRAM image.
#[derive(Debug)]
pub struct ScanResult {
    pub pages: usize,
    /// For each page of the pattern, the VRAM offsets holding it.
    pub found_at: Vec<Vec<u64>>,
}

impl ScanResult {
    pub fn missing(&self) -> usize {
        self.found_at.iter().filter(|v| v.is_empty()).count()
    }
}

/// Scans `vram` page by page for the pages of the pattern of `seed` (`bytes`
/// long, a multiple of 4 KiB). A device-private driver puts each 4 KiB page
/// wherever its allocator chose, so pages are matched individually at
/// page-aligned VRAM offsets.
pub fn scan_vram(vram: &Path, seed: u64, bytes: usize) -> Result<ScanResult> {
    if bytes == 0 || !bytes.is_multiple_of(PAGE) {
        bail!("pattern size {bytes} is not a nonzero multiple of {PAGE}");
    }
    let pat = pattern(seed, bytes);
    let pages = bytes / PAGE;
    let mut by_first_word: HashMap<u64, Vec<usize>> = HashMap::new();
    for p in 0..pages {
        let w = u64::from_le_bytes(pat[p * PAGE..p * PAGE + 8].try_into().unwrap());
        by_first_word.entry(w).or_default().push(p);
    }
    let mut found_at = vec![Vec::new(); pages];
    let mut f =
        File::open(vram).with_context(|| format!("opening VRAM file {}", vram.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n =
            read_full(&mut f, &mut buf).with_context(|| format!("reading {}", vram.display()))?;
        if n == 0 {
            break;
        }
        for (i, page) in buf[..n].chunks_exact(PAGE).enumerate() {
            let w = u64::from_le_bytes(page[..8].try_into().unwrap());
            if let Some(cands) = by_first_word.get(&w) {
                for &p in cands {
                    if page == &pat[p * PAGE..(p + 1) * PAGE] {
                        found_at[p].push(offset + (i * PAGE) as u64);
                    }
                }
            }
        }
        offset += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok(ScanResult { pages, found_at })
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_c_implementation() {
        // Printed by ci/guest/pattern.h's xorshift_init/xorshift_next.
        let v: Vec<u64> = XorShift64::new(1).take(3).collect();
        assert_eq!(
            v,
            [0xdc1b77ae4b716dec, 0x74f0afbf0e6f7437, 0xe0194abe8b16471f]
        );
        assert_eq!(XorShift64::new(123456789).next(), Some(0xddce274d9c69d262));
        assert_eq!(XorShift64::new(0x9E37_79B9_7F4A_7C15).0, 1);
        assert_eq!(&pattern(1, 8)[..], &0xdc1b77ae4b716decu64.to_le_bytes());
    }

    #[test]
    fn finds_shuffled_pages() {
        let dir = std::env::temp_dir().join(format!("xtask-pattern-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vram");
        let pat = pattern(42, 4 * PAGE);
        let mut vram = vec![0u8; 16 * PAGE];
        for (p, slot) in [(0usize, 9usize), (1, 3), (2, 15), (3, 0)] {
            vram[slot * PAGE..(slot + 1) * PAGE].copy_from_slice(&pat[p * PAGE..(p + 1) * PAGE]);
        }
        std::fs::write(&file, &vram).unwrap();
        let r = scan_vram(&file, 42, 4 * PAGE).unwrap();
        assert_eq!(r.missing(), 0);
        assert_eq!(r.found_at[2], vec![15 * PAGE as u64]);
        let r = scan_vram(&file, 43, 4 * PAGE).unwrap();
        assert_eq!(r.missing(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
