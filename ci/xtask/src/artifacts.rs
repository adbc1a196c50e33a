//! A VM run's artifacts folder (`target/xtask/runs/<time>/<test>/`): the
//! console with host timestamps, QEMU's and each backend's full stderr, the
//! fault logs, the backends' stats as JSON, the verdict, and `reproduce.sh`,
//! which boots the same VM again from the same kernel, initramfs (copied
//! here), QEMU and backend command lines.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `target/xtask/runs`.
pub fn runs_root() -> PathBuf {
    crate::build::target_dir().join("xtask/runs")
}

/// `YYYYmmdd-HHMMSS` (UTC) of now: one folder per xtask invocation.
pub fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A free folder for a boot of `test` under `root`: `<test>`, then
/// `<test>.boot2`, `<test>.boot3`... for a test's later boots.
pub fn boot_dir(root: &Path, test: &str) -> PathBuf {
    let first = root.join(test);
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|n| root.join(format!("{test}.boot{n}")))
        .find(|p| !p.exists())
        .expect("an unused name")
}

/// What a boot ran, with the paths reproduce.sh replaces.
pub struct Record<'a> {
    pub dir: &'a Path,
    /// The run's temporary folder (sockets): `$RUN` in reproduce.sh.
    pub run_dir: &'a Path,
    /// The VRAM files: `$VRAM0`...
    pub vram: &'a [PathBuf],
    pub vram_size: u64,
    /// The initramfs QEMU booted (with the nonce), copied as initramfs.img.
    pub initrd: &'a Path,
    pub qemu: &'a [String],
    /// Each backend's argv, program first.
    pub backends: &'a [Vec<String>],
    /// Console lines with their time after QEMU's launch.
    pub console: &'a [(Duration, String)],
    pub qemu_stderr: &'a [String],
    pub backend_stderr: &'a [Vec<String>],
    /// Per GPU, the stats (exit line or control socket) as JSON.
    pub stats: serde_json::Value,
    pub verdict: &'a str,
    /// A console hook answered the guest (fault tests): reproduce.sh cannot.
    pub interactive: bool,
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
}

fn lines(v: &[String]) -> String {
    let mut s = v.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// Writes the folder.
pub fn write_all(r: &Record) -> Result<()> {
    std::fs::create_dir_all(r.dir).with_context(|| format!("creating {}", r.dir.display()))?;
    let mut console = String::new();
    for (t, l) in r.console {
        let _ = writeln!(console, "[+{:9.3}s] {l}", t.as_secs_f64());
    }
    write(r.dir, "console.log", &console)?;
    write(r.dir, "qemu.stderr", &lines(r.qemu_stderr))?;
    for (i, e) in r.backend_stderr.iter().enumerate() {
        write(r.dir, &format!("gpu{i}.stderr"), &lines(e))?;
    }
    write(
        r.dir,
        "stats.json",
        &format!("{}\n", serde_json::to_string_pretty(&r.stats)?),
    )?;
    write(r.dir, "verdict.txt", &format!("{}\n", r.verdict))?;
    // Fault logs the backends wrote into the run folder.
    for i in 0..r.backends.len() {
        let log = r.run_dir.join(format!("gpu{i}.faults"));
        if log.is_file() {
            let _ = std::fs::copy(&log, r.dir.join(format!("gpu{i}.faults")));
        }
    }
    std::fs::copy(r.initrd, r.dir.join("initramfs.img"))
        .with_context(|| format!("copying {}", r.initrd.display()))?;
    let script = reproduce_sh(r)?;
    write(r.dir, "reproduce.sh", &script)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        r.dir.join("reproduce.sh"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    Ok(())
}

/// `arg` as a shell word, with the known paths in it replaced by variables.
fn word(arg: &str, subs: &[(String, &str)]) -> String {
    let mut out = String::new();
    let mut rest = arg;
    'outer: while !rest.is_empty() {
        for (path, var) in subs {
            if let Some(tail) = rest.strip_prefix(path.as_str()) {
                let _ = write!(out, "\"${{{var}}}\"");
                rest = tail;
                continue 'outer;
            }
        }
        // Up to the next substitution (or the end), quoted literally.
        let next = subs
            .iter()
            .filter_map(|(p, _)| rest[1..].find(p.as_str()).map(|i| i + 1))
            .min()
            .unwrap_or(rest.len());
        let lit = &rest[..next];
        if lit
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c))
        {
            out.push_str(lit);
        } else {
            let _ = write!(out, "'{}'", lit.replace('\'', r"'\''"));
        }
        rest = &rest[next..];
    }
    if out.is_empty() {
        out.push_str("''");
    }
    out
}

fn reproduce_sh(r: &Record) -> Result<String> {
    let mut subs: Vec<(String, &str)> = Vec::new();
    // Longest first, so the VRAM files win over a folder they may be in.
    let vram_vars = [
        "VRAM0", "VRAM1", "VRAM2", "VRAM3", "VRAM4", "VRAM5", "VRAM6", "VRAM7",
    ];
    for (p, v) in r.vram.iter().zip(vram_vars) {
        subs.push((p.display().to_string(), v));
    }
    subs.push((r.initrd.display().to_string(), "INITRD"));
    subs.push((r.run_dir.display().to_string(), "RUN"));
    subs.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let mut s = String::new();
    s.push_str("#!/bin/sh\n");
    s.push_str("# Boots the same VM as this run: the same kernel, initramfs (copied here,\n");
    s.push_str("# with the run's nonce), QEMU and backend command lines; the sockets and\n");
    s.push_str("# VRAM files are made anew. The console is on this terminal (Ctrl-C quits).\n");
    if r.interactive {
        s.push_str("# This run's guest asked the test for fault injections over the console\n");
        s.push_str(
            "# (HMMGPU-INJECT-REQUEST): answer them with `cargo xtask inject --run-dir \"$RUN\"`\n",
        );
        s.push_str("# and type the HMMGPU-INJECT-REPLY line, or it waits.\n");
    }
    s.push_str("set -eu\n");
    s.push_str("here=$(cd \"$(dirname \"$0\")\" && pwd)\n");
    s.push_str("INITRD=\"$here/initramfs.img\"\n");
    s.push_str("RUN=$(mktemp -d \"${TMPDIR:-/tmp}/hmmgpu-repro.XXXXXX\")\n");
    for (i, v) in vram_vars.iter().take(r.vram.len()).enumerate() {
        let _ = writeln!(s, "{v}=/dev/shm/hmmgpu-repro-$$-gpu{i}");
    }
    s.push_str("pids=\"\"\n");
    s.push_str("cleanup() {\n    for p in $pids; do kill \"$p\" 2>/dev/null || true; done\n");
    let _ = writeln!(
        s,
        "    rm -rf \"$RUN\"{}\n}}",
        vram_vars
            .iter()
            .take(r.vram.len())
            .map(|v| format!(" \"${v}\""))
            .collect::<String>()
    );
    s.push_str("trap cleanup EXIT\ntrap 'exit 130' INT TERM\n");
    for (i, argv) in r.backends.iter().enumerate() {
        let _ = writeln!(s, "truncate -s {} \"$VRAM{i}\"", r.vram_size);
        let cmd: Vec<String> = argv.iter().map(|a| word(a, &subs)).collect();
        let _ = writeln!(s, "{} &\npids=\"$pids $!\"", cmd.join(" "));
        let _ = writeln!(s, "while [ ! -S \"$RUN/gpu{i}.sock\" ]; do sleep 0.1; done");
    }
    let cmd: Vec<String> = r.qemu.iter().map(|a| word(a, &subs)).collect();
    let _ = writeln!(s, "{}", cmd.join(" "));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_substitute_paths() {
        let subs = vec![
            ("/dev/shm/v-gpu0".to_string(), "VRAM0"),
            ("/run/r1".to_string(), "RUN"),
        ];
        assert_eq!(word("-m", &subs), "-m");
        assert_eq!(word("/run/r1/gpu0.sock", &subs), "\"${RUN}\"/gpu0.sock");
        assert_eq!(
            word("socket,id=gpu0,path=/run/r1/gpu0.sock", &subs),
            "socket,id=gpu0,path=\"${RUN}\"/gpu0.sock"
        );
        assert_eq!(
            word("memory-backend-file,mem-path=/dev/shm/v-gpu0,size=1", &subs),
            "memory-backend-file,mem-path=\"${VRAM0}\",size=1"
        );
        assert_eq!(word("a b'c", &subs), r"'a b'\''c'");
        assert_eq!(word("", &subs), "''");
    }

    #[test]
    fn timestamps_are_civil_dates() {
        let t = timestamp();
        assert_eq!(t.len(), 15);
        assert!(t.starts_with("20"), "{t}");
        assert_eq!(&t[8..9], "-");
    }

    #[test]
    fn the_folder_and_a_script_that_parses() {
        let dir =
            std::env::temp_dir().join(format!("hmmgpu-artifacts-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let initrd = dir.join("in.img");
        std::fs::write(&initrd, b"x").unwrap();
        let run_dir = PathBuf::from("/run/user/0/hmmgpu-run-1-0");
        let vram = vec![PathBuf::from("/dev/shm/hmmgpu-vram-1-0-gpu0")];
        let out = dir.join("demo");
        write_all(&Record {
            dir: &out,
            run_dir: &run_dir,
            vram: &vram,
            vram_size: 1 << 30,
            initrd: &initrd,
            qemu: &[
                "/q/qemu-system-x86_64".into(),
                "-initrd".into(),
                initrd.display().to_string(),
                "-chardev".into(),
                "socket,id=gpu0,path=/run/user/0/hmmgpu-run-1-0/gpu0.sock".into(),
            ],
            backends: &[vec![
                "/b/hmmgpu-device".into(),
                "--vram-path".into(),
                "/dev/shm/hmmgpu-vram-1-0-gpu0".into(),
            ]],
            console: &[(Duration::from_millis(1500), "HMMGPU-INIT uptime=1.0".into())],
            qemu_stderr: &[],
            backend_stderr: &[vec!["hmmgpu-device: stats: {}".into()]],
            stats: serde_json::json!([{"gpu": 0}]),
            verdict: "exited 0",
            interactive: false,
        })
        .unwrap();
        for f in [
            "console.log",
            "qemu.stderr",
            "gpu0.stderr",
            "stats.json",
            "verdict.txt",
            "initramfs.img",
            "reproduce.sh",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let console = std::fs::read_to_string(out.join("console.log")).unwrap();
        assert_eq!(console, "[+    1.500s] HMMGPU-INIT uptime=1.0\n");
        let script = std::fs::read_to_string(out.join("reproduce.sh")).unwrap();
        assert!(script.contains("-initrd \"${INITRD}\""), "{script}");
        assert!(script.contains("--vram-path \"${VRAM0}\""), "{script}");
        assert!(script.contains("path=\"${RUN}\"/gpu0.sock"), "{script}");
        assert!(
            script.contains("truncate -s 1073741824 \"$VRAM0\""),
            "{script}"
        );
        let st = std::process::Command::new("sh")
            .arg("-n")
            .arg(out.join("reproduce.sh"))
            .status()
            .unwrap();
        assert!(st.success(), "sh -n rejects reproduce.sh:\n{script}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
