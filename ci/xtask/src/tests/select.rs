//! Which VM tests a `cargo xtask test` run runs: glob patterns, `--skip`,
//! and `--shard K/N`, a deterministic split of the selected list so that a
//! CI matrix of N machines runs every test exactly once.

use anyhow::{bail, Result};

/// `*` matches any run of characters, `?` one; everything else itself.
pub(super) fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// `K/N` with 1 <= K <= N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Shard, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not K/N (e.g. 2/4)"))?;
        let k: usize = k.trim().parse().map_err(|e| format!("'{s}': K: {e}"))?;
        let n: usize = n.trim().parse().map_err(|e| format!("'{s}': N: {e}"))?;
        if n == 0 || k == 0 || k > n {
            return Err(format!("'{s}': want 1 <= K <= N"));
        }
        Ok(Shard { k, n })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

/// The names of `all` (in order) that match one of `only` (all if empty)
/// and none of `skip`, then this shard's part: the i-th selected test
/// belongs to shard (i mod N) + 1. A pattern of `only` that matches no test
/// is an error (a typo would otherwise run nothing and pass).
pub(super) fn select<'a>(
    all: &[&'a str],
    only: &[String],
    skip: &[String],
    shard: Option<Shard>,
) -> Result<Vec<&'a str>> {
    for p in only {
        if !all.iter().any(|n| glob(p, n)) {
            bail!("no VM test matches '{p}' (cargo xtask test --list)");
        }
    }
    let picked = all
        .iter()
        .copied()
        .filter(|n| only.is_empty() || only.iter().any(|p| glob(p, n)))
        .filter(|n| !skip.iter().any(|p| glob(p, n)));
    Ok(match shard {
        None => picked.collect(),
        Some(s) => picked
            .enumerate()
            .filter(|(i, _)| i % s.n == s.k - 1)
            .map(|(_, n)| n)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[&str] = &[
        "bare-boot",
        "exit-status",
        "demo",
        "fault-copy-error",
        "fault-storm",
        "fault-copy-error-debug",
        "hmm-tests",
        "ppc64le-smoke",
    ];

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn globs() {
        assert!(glob("fault-*", "fault-storm"));
        assert!(glob("*-debug", "fault-copy-error-debug"));
        assert!(glob("demo", "demo"));
        assert!(!glob("demo", "demo2"));
        assert!(glob("d?mo", "demo"));
        assert!(glob("*", ""));
        assert!(!glob("fault-*", "hmm-tests"));
        assert!(glob("*copy*", "fault-copy-error"));
    }

    #[test]
    fn patterns_and_skips() {
        assert_eq!(select(ALL, &[], &[], None).unwrap(), ALL);
        assert_eq!(
            select(ALL, &s(&["fault-*"]), &s(&["*-debug"]), None).unwrap(),
            ["fault-copy-error", "fault-storm"]
        );
        assert_eq!(
            select(ALL, &s(&["demo", "bare-boot"]), &[], None).unwrap(),
            ["bare-boot", "demo"],
            "the list's order, not the patterns'"
        );
        assert!(select(ALL, &s(&["fualt-*"]), &[], None).is_err());
    }

    #[test]
    fn shards_cover_every_test_exactly_once() {
        for n in 1..=ALL.len() + 2 {
            let mut seen: Vec<&str> = Vec::new();
            for k in 1..=n {
                let part = select(ALL, &[], &[], Some(Shard { k, n })).unwrap();
                // Deterministic: the same call gives the same part.
                assert_eq!(part, select(ALL, &[], &[], Some(Shard { k, n })).unwrap());
                seen.extend(part);
            }
            seen.sort();
            let mut all = ALL.to_vec();
            all.sort();
            assert_eq!(seen, all, "N={n}");
        }
        // With patterns too: the shards split what the patterns picked.
        let picked = select(ALL, &s(&["fault-*"]), &[], None).unwrap();
        let mut seen = Vec::new();
        for k in 1..=2 {
            seen.extend(select(ALL, &s(&["fault-*"]), &[], Some(Shard { k, n: 2 })).unwrap());
        }
        seen.sort();
        let mut picked = picked;
        picked.sort();
        assert_eq!(seen, picked);
    }

    #[test]
    fn shard_syntax() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { k: 2, n: 4 }));
        for bad in ["0/2", "3/2", "1/0", "x/2", "2", "1/2/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
