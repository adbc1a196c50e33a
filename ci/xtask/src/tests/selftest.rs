//! The kernel's own HMM selftest (tools/testing/selftests/mm/hmm-tests,
//! unmodified) against hmmgpu, with test_hmm.ko as the baseline in the same
//! boot. The binary is run directly: test_hmm.sh always exits 0.

use super::{argv, expect_status, Boot, Ctx};
use crate::build::log;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;

/// How one case ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// One run of hmm-tests, parsed from its TAP output.
#[derive(Debug, Default)]
struct Tally {
    cases: BTreeMap<String, Outcome>,
    /// The harness's own `# Totals:` line.
    totals: Option<String>,
    seconds: Option<f64>,
}

impl Tally {
    fn count(&self, o: Outcome) -> usize {
        self.cases.values().filter(|v| **v == o).count()
    }
}

/// Extracts the run between `HMMGPU-SELFTEST-BEGIN name` and
/// `HMMGPU-SELFTEST-END name seconds=S`.
fn parse(console: &[String], name: &str) -> Result<Tally> {
    let begin = format!("HMMGPU-SELFTEST-BEGIN {name}");
    let end = format!("HMMGPU-SELFTEST-END {name}");
    let start = console
        .iter()
        .position(|l| l.trim() == begin)
        .with_context(|| format!("hmm-tests on {name} did not start (no '{begin}' line)"))?;
    let mut t = Tally::default();
    for line in &console[start + 1..] {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix(&end) {
            t.seconds = rest.trim().strip_prefix("seconds=").and_then(|s| s.parse().ok());
            return Ok(t);
        }
        if l.starts_with("# Totals:") {
            t.totals = Some(l.to_string());
        } else if let Some(rest) = l.strip_prefix("not ok ") {
            if let Some((_, name)) = rest.split_once(' ') {
                t.cases.insert(name.trim().to_string(), Outcome::Fail);
            }
        } else if let Some(rest) = l.strip_prefix("ok ") {
            if let Some((_, name)) = rest.split_once(' ') {
                let (name, skip) = match name.split_once(" # SKIP") {
                    Some((n, _)) => (n, true),
                    None => (name, false),
                };
                let o = if skip { Outcome::Skip } else { Outcome::Pass };
                t.cases.insert(name.trim().to_string(), o);
            }
        }
    }
    bail!("hmm-tests on {name} did not finish (no '{end}' line)")
}

/// Guest shell lines that run hmm-tests with markers and timing.
fn run_block(name: &str) -> String {
    format!(
        r#"echo; echo "HMMGPU-SELFTEST-BEGIN {name}"
t0=$(cut -d' ' -f1 /proc/uptime)
hmm-tests
t1=$(cut -d' ' -f1 /proc/uptime)
echo; echo "HMMGPU-SELFTEST-END {name} seconds=$(awk "BEGIN {{print $t1 - $t0}}")"
"#
    )
}

/// hmmgpu must pass every case: 78 = 39 tests x 2 variants, none skipped.
fn check_hmmgpu(t: &Tally) -> Result<()> {
    let (pass, fail, skip) = (t.count(Outcome::Pass), t.count(Outcome::Fail), t.count(Outcome::Skip));
    let bad: Vec<String> = t
        .cases
        .iter()
        .filter(|(_, o)| **o != Outcome::Pass)
        .map(|(n, o)| format!("{n} ({o:?})"))
        .collect();
    ensure!(
        pass == 78 && fail == 0 && skip == 0,
        "hmm-tests on hmmgpu: pass {pass} fail {fail} skip {skip}, want 78/0/0; not passing: {}",
        bad.join(", ")
    );
    let totals = t.totals.as_deref().unwrap_or("(no Totals line)");
    ensure!(
        totals.contains("pass:78 fail:0") && totals.contains("skip:0") && totals.contains("error:0"),
        "hmm-tests' own totals disagree: {totals}"
    );
    Ok(())
}

fn secs(t: &Tally) -> String {
    t.seconds.map_or("?".into(), |s| format!("{s:.1} s"))
}

pub(super) fn t_hmm_tests(ctx: &mut Ctx) -> Result<()> {
    // test_hmm.ko and hmmgpu both create /dev/hmm_dmirror0..: one at a time.
    let script = format!(
        "rmmod hmmgpu || exit 90\ninsmod /lib/modules/test_hmm.ko || exit 91\n{}rmmod test_hmm || exit 92\ninsmod /lib/modules/hmmgpu.ko || exit 93\n{}exit 0\n",
        run_block("test_hmm"),
        run_block("hmmgpu")
    );
    let out = ctx.boot(Boot {
        test: "hmm-tests",
        gpus: 2,
        driver: true,
        cmd: argv(&["sh", "-c", &script]),
    })?;
    expect_status(&out, 0)?;
    let base = parse(&out.console, "test_hmm")?;
    let ours = parse(&out.console, "hmmgpu")?;
    log("hmm-tests, same boot (TCG), side by side:".to_string());
    log(format!("  {:<12} {:>12} {:>12}", "", "test_hmm.ko", "hmmgpu"));
    for (label, o) in [("pass", Outcome::Pass), ("fail", Outcome::Fail), ("skip", Outcome::Skip)] {
        log(format!("  {:<12} {:>12} {:>12}", label, base.count(o), ours.count(o)));
    }
    log(format!("  {:<12} {:>12} {:>12}", "wall time", secs(&base), secs(&ours)));
    log(format!("  test_hmm.ko: {}", base.totals.as_deref().unwrap_or("-")));
    log(format!("  hmmgpu:      {}", ours.totals.as_deref().unwrap_or("-")));
    for (name, o) in &ours.cases {
        let b = base.cases.get(name);
        if b != Some(o) {
            log(format!("  differs: {name}: test_hmm {b:?}, hmmgpu {o:?}"));
        }
    }
    check_hmmgpu(&ours)
}

pub(super) fn t_hmm_tests_debug(ctx: &mut Ctx) -> Result<()> {
    let (kernel, driver, programs) = ctx.debug_artifacts()?.clone();
    let script = format!("{}exit 0\n", run_block("hmmgpu"));
    // One vCPU: under TCG, TLB-shootdown IPIs between vCPUs make the debug
    // kernel's migrations slow enough to hit the selftest's 120 s timeout
    // for benchmark_thp_migration.
    let out = ctx.boot_with(
        Boot {
            test: "hmm-tests-debug",
            gpus: 2,
            driver: true,
            cmd: argv(&["sh", "-c", &script]),
        },
        &kernel,
        Some(&driver),
        &programs,
        1,
    )?;
    // A lockdep, KASAN or DEBUG_VM report fails the boot itself (status 120).
    expect_status(&out, 0)?;
    let ours = parse(&out.console, "hmmgpu")?;
    log(format!(
        "hmm-tests-debug: hmmgpu {} in {}",
        ours.totals.as_deref().unwrap_or("-"),
        secs(&ours)
    ));
    check_hmmgpu(&ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tap_between_markers() {
        let console: Vec<String> = [
            "noise",
            "HMMGPU-SELFTEST-BEGIN x",
            "ok 1 hmm.a.open_close",
            "ok 2 hmm.b.open_close # SKIP DEVICE_COHERENT not available",
            "not ok 3 hmm.a.anon_read",
            "# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0",
            "HMMGPU-SELFTEST-END x seconds=12.5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t = parse(&console, "x").unwrap();
        assert_eq!(t.count(Outcome::Pass), 1);
        assert_eq!(t.count(Outcome::Skip), 1);
        assert_eq!(t.count(Outcome::Fail), 1);
        assert_eq!(t.seconds, Some(12.5));
        assert!(check_hmmgpu(&t).is_err());
        assert!(parse(&console[..3], "x").is_err());
    }
}
