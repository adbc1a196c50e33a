//! The kernel's own HMM selftest (tools/testing/selftests/mm/hmm-tests,
//! unmodified) against hmmgpu, with test_hmm.ko as the baseline in the same
//! boot. The guest side is ci/guest/hmm-tests-both.sh (/usr/bin/hmm-tests-
//! both), which runs the binary directly (test_hmm.sh always exits 0), timed,
//! between markers.
//!
//! The gate is ci/hmm-tests-expected.txt: the cases hmmgpu is known not to
//! pass. hmmgpu failing or skipping any other case fails the test, and so does
//! a listed case that now passes (the list only shrinks), or a run that did
//! not reach hmm-tests' `# Totals:` line. A case listed as `debug-timeout`
//! must pass on the release kernel; on the debug kernel it may also end by
//! kselftest's own fixed timeout (and only that way).
//!
//! Which cases there are comes from the kernel tree's own hmm-tests (its
//! `hmm-tests -l`, listed at build time): 7.2's has one TEST_F fewer than
//! 7.3's. Every case of that list must report; a listed known failure that
//! this kernel's hmm-tests does not have is not judged on it.

use super::{argv, expect_status, Boot, Ctx};
use crate::build;
use crate::cli::{Arch, Flavour};
use crate::vm::{Accel, VmOutcome};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

/// The known-failures list, relative to the repository root.
const EXPECTED_FILE: &str = "ci/hmm-tests-expected.txt";

/// How one case ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
        })
    }
}

/// hmm-tests' `# Totals: pass:P fail:F xfail:X xpass:Y skip:S error:E`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Totals {
    pass: u32,
    fail: u32,
    xfail: u32,
    xpass: u32,
    skip: u32,
    error: u32,
}

impl Totals {
    fn parse(line: &str) -> Option<Totals> {
        let rest = line.trim().strip_prefix("# Totals:")?;
        let mut t = Totals::default();
        for field in rest.split_whitespace() {
            let (k, v) = field.split_once(':')?;
            let v: u32 = v.parse().ok()?;
            match k {
                "pass" => t.pass = v,
                "fail" => t.fail = v,
                "xfail" => t.xfail = v,
                "xpass" => t.xpass = v,
                "skip" => t.skip = v,
                "error" => t.error = v,
                _ => {}
            }
        }
        Some(t)
    }
}

/// One run of hmm-tests, parsed from its TAP output.
#[derive(Debug, Default)]
struct Tally {
    cases: BTreeMap<String, Outcome>,
    /// Failed cases the harness ended itself: `# NAME: Test terminated by
    /// timeout` right before their result line.
    timed_out: BTreeSet<String>,
    /// The harness's own `# Totals:` line; None: the binary did not get there.
    totals: Option<Totals>,
    /// Wall time in the guest.
    seconds: Option<f64>,
    /// hmm-tests' exit status.
    status: Option<i32>,
}

impl Tally {
    fn count(&self, o: Outcome) -> usize {
        self.cases.values().filter(|v| **v == o).count()
    }
}

/// A TAP result line: `ok N name`, `ok N name # SKIP reason`,
/// `ok N name #  message`, `not ok N name`; XFAIL counts as a failure and
/// XPASS as a pass.
fn tap_case(l: &str) -> Option<(String, Outcome)> {
    let (ok, rest) = if let Some(r) = l.strip_prefix("not ok ") {
        (false, r)
    } else {
        (true, l.strip_prefix("ok ")?)
    };
    let (num, rest) = rest.split_once(' ')?;
    num.parse::<u32>().ok()?;
    let (name, directive) = match rest.split_once(" #") {
        Some((n, d)) => (n.trim(), d.trim()),
        None => (rest.trim(), ""),
    };
    if name.is_empty() {
        return None;
    }
    let o = if !ok || directive.starts_with("XFAIL") {
        Outcome::Fail
    } else if directive.starts_with("SKIP") {
        Outcome::Skip
    } else {
        Outcome::Pass
    };
    Some((name.to_string(), o))
}

/// Extracts the run between `HMMGPU-SELFTEST-BEGIN name` and
/// `HMMGPU-SELFTEST-END name seconds=S status=N`.
fn parse(console: &[String], name: &str) -> Result<Tally> {
    let begin = format!("HMMGPU-SELFTEST-BEGIN {name}");
    let end = format!("HMMGPU-SELFTEST-END {name}");
    let start = console
        .iter()
        .position(|l| l.trim() == begin)
        .with_context(|| format!("hmm-tests on {name} did not start (no '{begin}' line)"))?;
    let mut t = Tally::default();
    // The short name of the last `# NAME: Test terminated by timeout`.
    let mut timeout_of: Option<&str> = None;
    for line in &console[start + 1..] {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix(&end) {
            for kv in rest.split_whitespace() {
                match kv.split_once('=') {
                    Some(("seconds", v)) => t.seconds = v.parse().ok(),
                    Some(("status", v)) => t.status = v.parse().ok(),
                    _ => {}
                }
            }
            return Ok(t);
        }
        if let Some(totals) = Totals::parse(l) {
            t.totals = Some(totals);
        } else if let Some((case, o)) = tap_case(l) {
            if o == Outcome::Fail
                && timeout_of.is_some_and(|short| case.ends_with(&format!(".{short}")))
            {
                t.timed_out.insert(case.clone());
            }
            timeout_of = None;
            t.cases.insert(case, o);
        } else if let Some(short) = l
            .strip_prefix("# ")
            .and_then(|r| r.strip_suffix(": Test terminated by timeout"))
        {
            timeout_of = Some(short);
        }
    }
    bail!("hmm-tests on {name} did not finish (no '{end}' line)")
}

/// The cases of a kernel's hmm-tests from its `-l` listing (kselftest
/// harness: `FIXTURE VARIANT TEST` columns, the fixture on its first row,
/// variants and tests listed side by side, fixtures separated by dashes), as
/// the TAP output names them: `fixture.variant.test` (`fixture.test` for a
/// fixture without variants).
pub(super) fn listed_cases(text: &str) -> Result<BTreeSet<String>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().context("hmm-tests -l printed nothing")?;
    let (Some(vcol), Some(tcol)) = (header.find("VARIANT"), header.find("TEST")) else {
        bail!("hmm-tests -l: no `# FIXTURE VARIANT TEST` header: {header}");
    };
    if !header.starts_with("# FIXTURE") || vcol >= tcol {
        bail!("hmm-tests -l: unexpected header: {header}");
    }
    // (fixture, variants, tests) per block.
    let mut blocks: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let cell = |l: &str, from: usize, to: Option<usize>| -> Result<Option<String>> {
        let end = to.unwrap_or(l.len()).min(l.len());
        let c = l.get(from.min(end)..end).unwrap_or("").trim();
        if c.contains(char::is_whitespace) {
            bail!("hmm-tests -l: cannot split this line into its columns: {l}");
        }
        Ok((!c.is_empty()).then(|| c.to_string()))
    };
    for l in lines {
        if l.starts_with("---") {
            continue;
        }
        // A name longer than its column shifts the next: refuse to guess.
        for col in [vcol, tcol] {
            if l.len() > col && !l[..col].ends_with(' ') {
                bail!("hmm-tests -l: a name overflows its column: {l}");
            }
        }
        let fixture = cell(l, 0, Some(vcol))?;
        let variant = cell(l, vcol, Some(tcol))?;
        let test = cell(l, tcol, None)?;
        if let Some(f) = fixture {
            blocks.push((f, Vec::new(), Vec::new()));
        }
        let Some(b) = blocks.last_mut() else {
            bail!("hmm-tests -l: a line before the first fixture: {l}");
        };
        b.1.extend(variant);
        b.2.extend(test);
    }
    let mut cases = BTreeSet::new();
    for (f, variants, tests) in blocks {
        let variants = if variants.is_empty() {
            vec![String::new()]
        } else {
            variants
        };
        for v in &variants {
            for t in &tests {
                cases.insert(if v.is_empty() {
                    format!("{f}.{t}")
                } else {
                    format!("{f}.{v}.{t}")
                });
            }
        }
    }
    if cases.is_empty() {
        bail!("hmm-tests -l listed no case");
    }
    Ok(cases)
}

/// The cases of the hmm-tests among `programs` (built from the kernel tree
/// under test).
fn tree_cases(programs: &[PathBuf]) -> Result<BTreeSet<String>> {
    listed_cases(&build::hmm_tests_list(programs)?)
}

/// ci/hmm-tests-expected.txt: case -> (outcome, reason).
#[derive(Debug, Default)]
struct Expected {
    cases: BTreeMap<String, (Outcome, String)>,
    /// `debug-timeout` cases: pass on the release kernel; on the debug
    /// kernel pass or end by kselftest's timeout. case -> reason.
    debug_timeouts: BTreeMap<String, String>,
}

impl Expected {
    fn parse(text: &str) -> Result<Expected> {
        let mut e = Expected::default();
        for (i, raw) in text.lines().enumerate() {
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            // NAME, OUTCOME, then the rest of the line as the reason.
            let (name, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            let rest = rest.trim_start();
            let (outcome, reason) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let reason = reason.trim();
            if reason.is_empty() {
                bail!(
                    "{EXPECTED_FILE}:{}: {name}: no reason given (want `NAME  fail|skip|debug-timeout  REASON`)",
                    i + 1
                );
            }
            let twice = e.cases.contains_key(name) || e.debug_timeouts.contains_key(name);
            match outcome {
                "fail" => e.cases.insert(name.to_string(), (Outcome::Fail, reason.to_string())),
                "skip" => e.cases.insert(name.to_string(), (Outcome::Skip, reason.to_string())),
                "debug-timeout" => e
                    .debug_timeouts
                    .insert(name.to_string(), reason.to_string())
                    .map(|r| (Outcome::Fail, r)),
                other => bail!(
                    "{EXPECTED_FILE}:{}: outcome '{other}' is not fail, skip or debug-timeout (want `NAME  fail|skip|debug-timeout  REASON`)",
                    i + 1
                ),
            };
            if twice {
                bail!("{EXPECTED_FILE}:{}: {name} is listed twice", i + 1);
            }
        }
        Ok(e)
    }

    fn load() -> Result<Expected> {
        let path = build::repo_root().join(EXPECTED_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Expected::parse(&text)
    }
}

/// hmmgpu's run judged against the expected list.
#[derive(Debug, Default)]
struct Verdict {
    /// Not listed, or listed with the other outcome: (case, got, listed).
    unexpected: Vec<(String, Outcome, Option<Outcome>)>,
    /// Listed but passing now, or not run at all: (case, got).
    stale: Vec<(String, Option<Outcome>)>,
    /// The run itself is not trustworthy (no Totals line, errors, counts off).
    broken: Vec<String>,
    /// Listed, but this kernel's hmm-tests has no such case: not judged here.
    not_in_tree: Vec<String>,
}

impl Verdict {
    fn ok(&self) -> bool {
        self.unexpected.is_empty() && self.stale.is_empty() && self.broken.is_empty()
    }
}

/// Which kernel flavour the run was on (`debug-timeout` entries differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Release,
    Debug,
}

/// Judges hmmgpu's run `t` against the list `exp`, for a kernel whose
/// hmm-tests has the cases `tree`.
fn judge(t: &Tally, exp: &Expected, tree: &BTreeSet<String>, kernel: Kernel) -> Verdict {
    let mut v = Verdict::default();
    match &t.totals {
        None => v.broken.push(
            "hmm-tests did not reach its '# Totals:' line (it crashed, hung or was killed)".into(),
        ),
        Some(tot) => {
            if tot.error > 0 {
                v.broken
                    .push(format!("hmm-tests reported error:{}", tot.error));
            }
            let counted = (
                t.count(Outcome::Pass),
                t.count(Outcome::Fail),
                t.count(Outcome::Skip),
            );
            let claimed = (
                (tot.pass + tot.xpass) as usize,
                (tot.fail + tot.xfail) as usize,
                tot.skip as usize,
            );
            if counted != claimed {
                v.broken.push(format!(
                    "the TAP lines read from the console (pass {} fail {} skip {}) disagree with hmm-tests' totals (pass {} fail {} skip {}): a result line was garbled or lost",
                    counted.0, counted.1, counted.2, claimed.0, claimed.1, claimed.2
                ));
            }
        }
    }
    if t.cases.is_empty() {
        v.broken.push("hmm-tests ran no case".into());
    } else if t.totals.is_some() {
        let lost: Vec<&str> = tree
            .iter()
            .filter(|c| !t.cases.contains_key(*c))
            .map(String::as_str)
            .collect();
        if !lost.is_empty() {
            v.broken.push(format!(
                "{} case(s) of this kernel's hmm-tests (hmm-tests -l) reported no result: {}",
                lost.len(),
                lost.join(", ")
            ));
        }
        let unknown: Vec<&str> = t
            .cases
            .keys()
            .filter(|c| !tree.contains(*c))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            v.broken.push(format!(
                "hmm-tests reported case(s) its own -l list does not have (a binary from another tree?): {}",
                unknown.join(", ")
            ));
        }
    }
    for (case, &got) in &t.cases {
        if exp.debug_timeouts.contains_key(case) {
            let timed_out = kernel == Kernel::Debug && t.timed_out.contains(case);
            if got != Outcome::Pass && !timed_out {
                v.broken.push(format!(
                    "{case}: {got}, listed as debug-timeout: it must pass{}",
                    if kernel == Kernel::Debug {
                        " or end by kselftest's timeout (it did not)"
                    } else {
                        " on the release kernel"
                    }
                ));
            }
            continue;
        }
        let listed = exp.cases.get(case).map(|(o, _)| *o);
        match (got, listed) {
            (Outcome::Pass, None) => {}
            (Outcome::Pass, Some(_)) => v.stale.push((case.clone(), Some(got))),
            (_, Some(l)) if l == got => {}
            (_, l) => v.unexpected.push((case.clone(), got, l)),
        }
    }
    for case in exp.cases.keys().chain(exp.debug_timeouts.keys()) {
        if !tree.contains(case) {
            v.not_in_tree.push(case.clone());
        } else if !t.cases.contains_key(case) {
            v.stale.push((case.clone(), None));
        }
    }
    v
}

/// The failure message: what went wrong and the exact edits of the list.
/// Why a run that must pass every case did not: no list of expected
/// outcomes applies, so no edit of one is suggested.
fn all_pass_message(v: &Verdict) -> String {
    let mut m = v.broken.clone();
    if !v.unexpected.is_empty() {
        m.push(format!(
            "{} case(s) of this kernel's hmm-tests did not pass (every case must, 0 skipped):",
            v.unexpected.len()
        ));
        m.extend(
            v.unexpected
                .iter()
                .map(|(case, got, _)| format!("  {case}: {got}")),
        );
    }
    m.join("\n")
}

fn verdict_message(v: &Verdict, exp: &Expected) -> String {
    let mut m = Vec::new();
    m.extend(v.broken.iter().cloned());
    if !v.unexpected.is_empty() {
        m.push(format!(
            "hmmgpu does not pass {} case(s) that {EXPECTED_FILE} does not expect:",
            v.unexpected.len()
        ));
        for (case, got, listed) in &v.unexpected {
            m.push(match listed {
                None => format!("  {case}: {got} (not listed)"),
                Some(l) => format!("  {case}: {got} (listed as {l})"),
            });
        }
    }
    if !v.stale.is_empty() {
        m.push(format!(
            "{EXPECTED_FILE} is stale: {} listed case(s) now pass or did not run:",
            v.stale.len()
        ));
        for (case, got) in &v.stale {
            m.push(match got {
                Some(o) => format!("  {case}: {o}"),
                None => format!("  {case}: not run (no such case in hmm-tests' output)"),
            });
        }
    }
    let edits: Vec<String> = v
        .stale
        .iter()
        .map(|(case, _)| match exp.cases.get(case) {
            Some((o, reason)) => format!("  - {case}  {o}  {reason}"),
            None => format!(
                "  - {case}  debug-timeout  {}",
                exp.debug_timeouts.get(case).map_or("", String::as_str)
            ),
        })
        .chain(v.unexpected.iter().map(|(case, got, listed)| match listed {
            None => format!(
                "  + {case}  {got}  REASON   (only if this is accepted, not a regression to fix)"
            ),
            Some(l) => format!(
                "  ~ {case}  {l} -> {got}  {}",
                exp.cases.get(case).map_or("", |(_, r)| r.as_str())
            ),
        }))
        .collect();
    if !edits.is_empty() {
        m.push(format!("edits that would make {EXPECTED_FILE} match this run (- remove the line, + add, ~ change the outcome):"));
        m.extend(edits);
    }
    m.join("\n")
}

/// hmmgpu's cases as the report's own testcases (JUnit, JSON, KTAP), each
/// timed on the host clock from the previous result line (or the run's
/// begin marker) to its own.
fn record_cases(ctx: &Ctx, out: &VmOutcome, name: &str, t: &Tally, exp: &Expected, kernel: Kernel) {
    let begin = format!("HMMGPU-SELFTEST-BEGIN {name}");
    let mut times = BTreeMap::new();
    if let Some(start) = out.console.iter().position(|l| l.trim() == begin) {
        let mut prev = out.console_times.get(start).copied();
        for (i, l) in out.console.iter().enumerate().skip(start + 1) {
            if let Some((case, _)) = tap_case(l.trim()) {
                let at = out.console_times.get(i).copied();
                if let (Some(a), Some(p)) = (at, prev) {
                    times.insert(case, a.saturating_sub(p));
                }
                prev = at;
            }
        }
    }
    ctx.cases
        .borrow_mut()
        .extend(t.cases.iter().map(|(case, o)| {
            let listed = exp.cases.get(case).map(|(l, _)| *l);
            super::Case {
                name: case.clone(),
                outcome: match o {
                    Outcome::Pass => super::report::CaseOutcome::Pass,
                    Outcome::Fail => super::report::CaseOutcome::Fail,
                    Outcome::Skip => super::report::CaseOutcome::Skip,
                },
                expected: match o {
                    Outcome::Pass => listed.is_none(),
                    _ if exp.debug_timeouts.contains_key(case) => {
                        kernel == Kernel::Debug && t.timed_out.contains(case)
                    }
                    _ => listed == Some(*o),
                },
                time: times.get(case).copied(),
            }
        }));
}

/// Both checks' failures, so a run that both recovered and failed cases
/// says so (the first alone would hide the other).
pub(super) fn both(a: Result<()>, b: Result<()>) -> Result<()> {
    match (a, b) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(a), Err(b)) => bail!("{a:#}\n{b:#}"),
    }
}

fn check_hmmgpu(t: &Tally, exp: &Expected, tree: &BTreeSet<String>, kernel: Kernel) -> Result<()> {
    let v = judge(t, exp, tree, kernel);
    if !v.not_in_tree.is_empty() {
        say!(
            "note: {} case(s) of {EXPECTED_FILE} are not in this kernel's hmm-tests, not judged here: {}",
            v.not_in_tree.len(),
            v.not_in_tree.join(", ")
        );
    }
    if v.ok() {
        say!(
            "hmmgpu matches {EXPECTED_FILE} on all {} cases of this kernel's hmm-tests ({} listed as known not to pass)",
            tree.len(),
            exp.cases.keys().filter(|c| tree.contains(*c)).count()
        );
        for case in &t.timed_out {
            say!(
                "note: {case} ended by kselftest's timeout on the debug kernel (listed as debug-timeout: {})",
                exp.debug_timeouts.get(case).map_or("", String::as_str)
            );
        }
        Ok(())
    } else {
        bail!("{}", verdict_message(&v, exp))
    }
}

/// The side-by-side tallies of the runs, then the cases whose outcome differs.
fn print_tallies(title: &str, runs: &[(&str, &Tally)], exp: &Expected) {
    say!("{title}");
    say_part!("  {:<12}", "");
    for (name, _) in runs {
        say_part!(" {name:>12}");
    }
    say!("");
    type Field = fn(&Totals) -> u32;
    let fields: [(&str, Field); 6] = [
        ("pass", |t| t.pass),
        ("fail", |t| t.fail),
        ("xfail", |t| t.xfail),
        ("xpass", |t| t.xpass),
        ("skip", |t| t.skip),
        ("error", |t| t.error),
    ];
    for (label, f) in fields {
        say_part!("  {label:<12}");
        for (_, t) in runs {
            let v = t
                .totals
                .as_ref()
                .map_or("-".to_string(), |tot| f(tot).to_string());
            say_part!(" {v:>12}");
        }
        say!("");
    }
    type Row = fn(&Tally) -> String;
    let rows: [(&str, Row); 3] = [
        ("cases", |t| t.cases.len().to_string()),
        ("wall time", |t| {
            t.seconds.map_or("?".into(), |s| format!("{s:.1} s"))
        }),
        ("exit status", |t| {
            t.status.map_or("?".into(), |s| s.to_string())
        }),
    ];
    for (label, f) in rows {
        say_part!("  {label:<12}");
        for (_, t) in runs {
            say_part!(" {:>12}", f(t));
        }
        say!("");
    }
    for (name, t) in runs {
        if t.totals.is_none() {
            say!("  {name}: no '# Totals:' line: hmm-tests did not finish");
        }
    }
    // Every case of any run, with its outcome per run and in the list.
    let mut all: BTreeMap<&str, ()> = BTreeMap::new();
    for (_, t) in runs {
        all.extend(t.cases.keys().map(|k| (k.as_str(), ())));
    }
    all.extend(exp.cases.keys().map(|k| (k.as_str(), ())));
    let show = |o: Option<&Outcome>| o.map_or("-".to_string(), |o| o.to_string());
    let differing: Vec<&str> = all
        .keys()
        .copied()
        .filter(|case| {
            let outs: Vec<Option<&Outcome>> =
                runs.iter().map(|(_, t)| t.cases.get(*case)).collect();
            exp.cases.contains_key(*case)
                || if outs.len() == 1 {
                    outs[0] != Some(&Outcome::Pass)
                } else {
                    outs.windows(2).any(|w| w[0] != w[1])
                }
        })
        .collect();
    if differing.is_empty() {
        say!(
            "  every case has the same outcome{}",
            if runs.len() > 1 { " on both" } else { "" }
        );
        return;
    }
    let width = differing.iter().map(|c| c.len()).max().unwrap_or(4).max(4);
    say!(
        "  {} case(s) whose outcome differs{}:",
        differing.len(),
        if runs.len() == 1 {
            " from pass or is listed"
        } else {
            " (or that are listed)"
        }
    );
    say_part!("  {:<width$}", "case");
    for (name, _) in runs {
        say_part!(" {name:>12}");
    }
    say!(" {:>8}", "listed");
    for case in differing {
        say_part!("  {case:<width$}");
        for (_, t) in runs {
            say_part!(" {:>12}", show(t.cases.get(case)));
        }
        say!(" {:>8}", show(exp.cases.get(case).map(|(o, _)| o)));
    }
}

fn accel_name(a: Accel) -> &'static str {
    if a == Accel::Kvm {
        "KVM"
    } else {
        "TCG"
    }
}

/// Parses hmmgpu's run of the tree's hmm-tests (the hmm-tests among
/// `programs`) from `out`, records and prints its tally under `title`, and
/// passes only if every case of that hmm-tests passed, none skipped: no
/// known-failures list applies (own-kernel).
pub(super) fn check_all_pass(
    ctx: &Ctx,
    out: &VmOutcome,
    title: &str,
    programs: &[PathBuf],
) -> Result<()> {
    let tree = tree_cases(programs)?;
    let ours = parse(&out.console, "hmmgpu")?;
    let none = Expected::default();
    record_cases(ctx, out, "hmmgpu", &ours, &none, Kernel::Release);
    print_tallies(title, &[("hmmgpu", &ours)], &none);
    let v = judge(&ours, &none, &tree, Kernel::Release);
    if !v.ok() {
        bail!("{}", all_pass_message(&v));
    }
    say!(
        "hmmgpu passes all {} cases of this kernel's hmm-tests, 0 skipped",
        tree.len()
    );
    Ok(())
}

pub(super) fn t_hmm_tests(ctx: &mut Ctx) -> Result<()> {
    // Read the lists first: a malformed one fails before the boot.
    let exp = Expected::load()?;
    let tree = tree_cases(super::need("the guest programs", &ctx.programs)?)?;
    let out = ctx.boot(Boot {
        test: "hmm-tests",
        gpus: 2,
        driver: true,
        cmd: argv(&["hmm-tests-both", "test_hmm", "hmmgpu"]),
    })?;
    // Parse what is there before judging the status: a partial run is still
    // worth seeing.
    let base = parse(&out.console, "test_hmm");
    let ours = parse(&out.console, "hmmgpu");
    if let Ok(o) = &ours {
        record_cases(ctx, &out, "hmmgpu", o, &exp, Kernel::Release);
    }
    if let (Ok(b), Ok(o)) = (&base, &ours) {
        print_tallies(
            &format!(
                "hmm-tests, one boot ({}, {} vCPUs, 2 GPUs), side by side:",
                accel_name(ctx.accel),
                ctx.cpus
            ),
            &[("test_hmm.ko", b), ("hmmgpu", o)],
            &exp,
        );
        if b.totals.as_ref().is_some_and(|t| t.fail > 0) {
            say!("note: the kernel's own test_hmm.ko failed cases too (the kernel or the setup, not hmmgpu?)");
        }
    }
    // A kernel WARNING/BUG/lockdep/KASAN report fails the boot (status 120).
    both(
        expect_status(&out, 0),
        base.and(ours)
            .and_then(|o| check_hmmgpu(&o, &exp, &tree, Kernel::Release)),
    )
}

pub(super) fn t_hmm_tests_debug(ctx: &mut Ctx) -> Result<()> {
    let exp = Expected::load()?;
    let debug = ctx.stack(ctx.arch, Flavour::Debug)?;
    let tree = tree_cases(&debug.programs)?;
    // One vCPU: under TCG, TLB-shootdown IPIs between vCPUs make the debug
    // kernel's migrations slow enough to hit the selftest's 120 s timeout
    // for benchmark_thp_migration.
    let out = ctx.boot_on(
        Boot {
            test: "hmm-tests-debug",
            gpus: 2,
            driver: true,
            cmd: argv(&["hmm-tests-both", "hmmgpu"]),
        },
        &debug,
        1,
    )?;
    let ours = parse(&out.console, "hmmgpu");
    if let Ok(o) = &ours {
        record_cases(ctx, &out, "hmmgpu", o, &exp, Kernel::Debug);
    }
    if let Ok(o) = &ours {
        print_tallies(
            &format!(
                "hmm-tests on the debug kernel ({}, 1 vCPU, 2 GPUs):",
                accel_name(ctx.accel)
            ),
            &[("hmmgpu", o)],
            &exp,
        );
    }
    // A lockdep, KASAN or DEBUG_VM report fails the boot itself (status 120).
    both(
        expect_status(&out, 0),
        ours.and_then(|o| check_hmmgpu(&o, &exp, &tree, Kernel::Debug)),
    )
}

pub(super) fn t_hmm_tests_ppc64le(ctx: &mut Ctx) -> Result<()> {
    let exp = Expected::load()?;
    let st = ctx.stack(Arch::Ppc64le, Flavour::Release)?;
    let tree = tree_cases(&st.programs)?;
    let out = ctx.boot_on(
        Boot {
            test: "ppc64le-hmm-tests",
            gpus: 2,
            driver: true,
            cmd: argv(&["hmm-tests-both", "hmmgpu"]),
        },
        &st,
        ctx.cpus,
    )?;
    let ours = parse(&out.console, "hmmgpu");
    if let Ok(o) = &ours {
        record_cases(ctx, &out, "hmmgpu", o, &exp, Kernel::Release);
    }
    if let Ok(o) = &ours {
        print_tallies(
            &format!(
                "hmm-tests in a ppc64le pseries guest ({}, {} vCPUs, 2 GPUs):",
                accel_name(st.accel),
                ctx.cpus
            ),
            &[("hmmgpu", o)],
            &exp,
        );
    }
    both(
        expect_status(&out, 0),
        ours.and_then(|o| check_hmmgpu(&o, &exp, &tree, Kernel::Release)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_tap_between_markers() {
        let console = lines(&[
            "noise",
            "HMMGPU-SELFTEST-BEGIN x",
            "ok 1 hmm.a.open_close",
            "ok 2 hmm.b.open_close # SKIP DEVICE_COHERENT not available",
            "not ok 3 hmm.a.anon_read",
            "ok 4 hmm.a.msg #  some message",
            "ok 5 hmm.a.xf # XFAIL known",
            "# Totals: pass:2 fail:1 xfail:1 xpass:0 skip:1 error:0",
            "HMMGPU-SELFTEST-END x seconds=12.5 status=1",
        ]);
        let t = parse(&console, "x").unwrap();
        assert_eq!(t.count(Outcome::Pass), 2);
        assert_eq!(t.count(Outcome::Skip), 1);
        assert_eq!(t.count(Outcome::Fail), 2);
        assert_eq!(t.cases["hmm.a.msg"], Outcome::Pass);
        assert_eq!(t.seconds, Some(12.5));
        assert_eq!(t.status, Some(1));
        assert_eq!(t.totals.as_ref().unwrap().xfail, 1);
        assert!(parse(&console[..3], "x").is_err());
        assert!(parse(&console, "y").is_err());
    }

    fn tally(cases: &[(&str, Outcome)], totals: bool) -> Tally {
        let mut t = Tally::default();
        for (c, o) in cases {
            t.cases.insert(c.to_string(), *o);
        }
        if totals {
            t.totals = Some(Totals {
                pass: t.count(Outcome::Pass) as u32,
                fail: t.count(Outcome::Fail) as u32,
                skip: t.count(Outcome::Skip) as u32,
                ..Totals::default()
            });
        }
        t
    }

    /// The cases of a tally (a tree whose hmm-tests has exactly those).
    fn tree_of(t: &Tally) -> BTreeSet<String> {
        t.cases.keys().cloned().collect()
    }

    fn set(cases: &[&str]) -> BTreeSet<String> {
        cases.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn expected_file_gate() {
        use Outcome::*;
        let exp = Expected::parse(
            "# comment\n\nhmm.p.exclusive  fail  not yet\nhmm.c.open_close skip   no coherent\n",
        )
        .unwrap();
        // Exactly as listed: OK.
        let t = tally(
            &[
                ("hmm.p.a", Pass),
                ("hmm.p.exclusive", Fail),
                ("hmm.c.open_close", Skip),
            ],
            true,
        );
        assert!(judge(&t, &exp, &tree_of(&t), Kernel::Release).ok());
        // A new failure and a new skip.
        let t = tally(
            &[
                ("hmm.p.a", Fail),
                ("hmm.p.b", Skip),
                ("hmm.p.exclusive", Fail),
                ("hmm.c.open_close", Skip),
            ],
            true,
        );
        let v = judge(&t, &exp, &tree_of(&t), Kernel::Release);
        assert_eq!(v.unexpected.len(), 2);
        assert!(v.stale.is_empty());
        assert!(verdict_message(&v, &exp).contains("+ hmm.p.a  fail"));
        // Listed as skip, now fails: unexpected, with a change edit.
        let t = tally(
            &[("hmm.p.exclusive", Fail), ("hmm.c.open_close", Fail)],
            true,
        );
        let v = judge(&t, &exp, &tree_of(&t), Kernel::Release);
        assert_eq!(
            v.unexpected,
            vec![("hmm.c.open_close".to_string(), Fail, Some(Skip))]
        );
        assert!(verdict_message(&v, &exp).contains("~ hmm.c.open_close  skip -> fail"));
        // A listed case passes now, another of the tree's is not run: stale,
        // with removals (and the lost case makes the run broken).
        let t = tally(&[("hmm.p.exclusive", Pass)], true);
        let v = judge(
            &t,
            &exp,
            &set(&["hmm.p.exclusive", "hmm.c.open_close"]),
            Kernel::Release,
        );
        assert!(!v.ok());
        assert_eq!(v.stale.len(), 2);
        assert_eq!(v.broken.len(), 1, "{:?}", v.broken);
        let m = verdict_message(&v, &exp);
        assert!(m.contains("- hmm.p.exclusive  fail  not yet"), "{m}");
        assert!(m.contains("- hmm.c.open_close  skip  no coherent"), "{m}");
        // No Totals line: broken even if every case seen passed.
        let t = tally(
            &[("hmm.p.exclusive", Fail), ("hmm.c.open_close", Skip)],
            false,
        );
        assert!(!judge(&t, &exp, &tree_of(&t), Kernel::Release).ok());
        // Totals that disagree with the TAP lines (a lost line).
        let mut t = tally(
            &[("hmm.p.exclusive", Fail), ("hmm.c.open_close", Skip)],
            true,
        );
        t.totals.as_mut().unwrap().fail += 1;
        assert!(!judge(&t, &exp, &tree_of(&t), Kernel::Release).ok());
    }

    #[test]
    fn all_pass_names_each_case_and_no_list() {
        use Outcome::*;
        let none = Expected::default();
        let t = tally(
            &[("hmm.p.a", Pass), ("hmm2.p.b", Fail), ("hmm.c.c", Skip)],
            true,
        );
        let v = judge(&t, &none, &tree_of(&t), Kernel::Release);
        assert!(!v.ok());
        let m = all_pass_message(&v);
        assert!(
            m.contains("2 case(s) of this kernel's hmm-tests did not pass"),
            "{m}"
        );
        assert!(
            m.contains("  hmm2.p.b: fail") && m.contains("  hmm.c.c: skip"),
            "{m}"
        );
        assert!(!m.contains(EXPECTED_FILE), "{m}");
        let t = tally(&[("hmm.p.a", Pass)], true);
        assert!(judge(&t, &none, &tree_of(&t), Kernel::Release).ok());
    }

    #[test]
    fn the_trees_own_hmm_tests_is_the_truth() {
        use Outcome::*;
        let exp = Expected::parse("hmm.c.userfaultfd_read  fail  7.3 only\n").unwrap();
        // A kernel whose hmm-tests lacks a listed case (7.2 and 7.3's
        // userfaultfd_read): not judged there, not stale.
        let t = tally(&[("hmm.p.a", Pass), ("hmm.c.a", Pass)], true);
        let v = judge(&t, &exp, &tree_of(&t), Kernel::Release);
        assert!(v.ok(), "{}", verdict_message(&v, &exp));
        assert_eq!(v.not_in_tree, ["hmm.c.userfaultfd_read"]);
        // On a kernel that has it, the same list holds it to its outcome.
        let t = tally(&[("hmm.p.a", Pass), ("hmm.c.userfaultfd_read", Pass)], true);
        let v = judge(&t, &exp, &tree_of(&t), Kernel::Release);
        assert!(!v.ok());
        assert_eq!(v.stale.len(), 1);
        // Every case of the tree's list must report, even when the Totals
        // line agrees with the lines seen (a case the harness never ran).
        let t = tally(&[("hmm.p.a", Pass)], true);
        let v = judge(&t, &exp, &set(&["hmm.p.a", "hmm.p.b"]), Kernel::Release);
        assert!(!v.ok());
        assert!(v.broken[0].contains("hmm.p.b"), "{:?}", v.broken);
        // A case the tree's list does not have: a binary of another tree.
        let t = tally(&[("hmm.p.a", Pass), ("hmm.p.new", Pass)], true);
        assert!(!judge(&t, &exp, &set(&["hmm.p.a"]), Kernel::Release).ok());
    }

    #[test]
    fn hmm_tests_dash_l() {
        // kselftest_harness.h's test_harness_list_tests(): "%-20s %-25s %s".
        let row = |f: &str, v: &str, t: &str| format!("{f:<20} {v:<25} {t}\n");
        let mut text = row("# FIXTURE", "VARIANT", "TEST");
        // The harness's default fixture, without tests.
        text += &row("global", "", "");
        text += &"-".repeat(80);
        text += "\n";
        text += &row("hmm", "hmm_device_private", "open_close");
        text += &row("", "hmm_device_coherent", "anon_read");
        text += &row("", "", "exclusive");
        text += &"-".repeat(80);
        text += "\n";
        text += &row("hmm2", "hmm2_device_private", "migrate_mixed");
        text += "--------\n";
        text += &row("plain", "", "t1");
        let c = listed_cases(&text).unwrap();
        let want = set(&[
            "hmm.hmm_device_private.open_close",
            "hmm.hmm_device_private.anon_read",
            "hmm.hmm_device_private.exclusive",
            "hmm.hmm_device_coherent.open_close",
            "hmm.hmm_device_coherent.anon_read",
            "hmm.hmm_device_coherent.exclusive",
            "hmm2.hmm2_device_private.migrate_mixed",
            "plain.t1",
        ]);
        assert_eq!(c, want);
        assert!(listed_cases("").is_err());
        assert!(listed_cases("garbage\n").is_err());
        let overflow = row("# FIXTURE", "VARIANT", "TEST")
            + &row("hmm", "a_variant_name_longer_than_25_chars", "t");
        assert!(listed_cases(&overflow).is_err());
    }

    #[test]
    fn debug_timeout_accepts_only_a_harness_timeout_on_the_debug_kernel() {
        let exp = Expected::parse("hmm.c.bench  debug-timeout  slow under TCG\n").unwrap();
        let console: Vec<String> = [
            "HMMGPU-SELFTEST-BEGIN hmmgpu",
            "ok 1 hmm.c.a",
            "# bench: Test terminated by timeout",
            "#          FAIL  hmm.c.bench",
            "not ok 2 hmm.c.bench",
            "# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:0 error:0",
            "HMMGPU-SELFTEST-END hmmgpu seconds=1 status=1",
        ]
        .iter()
        .map(|l| l.to_string())
        .collect();
        let t = parse(&console, "hmmgpu").unwrap();
        assert!(t.timed_out.contains("hmm.c.bench"));
        assert!(judge(&t, &exp, &tree_of(&t), Kernel::Debug).ok());
        // The release kernel must pass it.
        assert!(!judge(&t, &exp, &tree_of(&t), Kernel::Release).ok());
        // A failure that is not the harness's timeout is not accepted.
        let mut asserted = console.clone();
        asserted.remove(2);
        let t = parse(&asserted, "hmmgpu").unwrap();
        assert!(t.timed_out.is_empty());
        assert!(!judge(&t, &exp, &tree_of(&t), Kernel::Debug).ok());
        // Passing is fine on both; not running it is stale.
        let t = tally(
            &[("hmm.c.a", Outcome::Pass), ("hmm.c.bench", Outcome::Pass)],
            true,
        );
        assert!(judge(&t, &exp, &tree_of(&t), Kernel::Release).ok());
        assert!(judge(&t, &exp, &tree_of(&t), Kernel::Debug).ok());
        let t = tally(&[("hmm.c.a", Outcome::Pass)], true);
        assert!(!judge(&t, &exp, &set(&["hmm.c.a", "hmm.c.bench"]), Kernel::Debug).ok());
    }

    #[test]
    fn expected_file_syntax() {
        assert!(Expected::parse("a fail\n").is_err(), "no reason");
        assert!(
            Expected::parse("a pass ok\n").is_err(),
            "pass is not a known-bad outcome"
        );
        assert!(
            Expected::parse("a fail x\na skip y\n").is_err(),
            "listed twice"
        );
        assert_eq!(Expected::parse("  # c\n\n").unwrap().cases.len(), 0);
    }

    #[test]
    fn committed_expected_file_parses() {
        // Which cases exist is the kernel tree's hmm-tests' to say (judge).
        Expected::parse(include_str!("../../../hmm-tests-expected.txt")).unwrap();
    }

    #[test]
    fn totals_line() {
        let t = Totals::parse("# Totals: pass:31 fail:8 xfail:0 xpass:0 skip:39 error:0").unwrap();
        assert_eq!((t.pass, t.fail, t.skip, t.error), (31, 8, 39, 0));
        assert!(Totals::parse("# Totals: pass:x").is_none());
        assert!(Totals::parse("ok 1 a").is_none());
    }
}
