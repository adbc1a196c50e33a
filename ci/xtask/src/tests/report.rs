//! Results CI systems read: JUnit XML (`--junit`), JSON (`--json`) and KTAP
//! on stdout (`--format ktap`, as the kernel's `tools/testing/kunit/kunit.py
//! parse` reads it).

use serde_json::json;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// The JSON file's `schema` version: bump it when a field changes meaning
/// or goes away (adding one does not).
pub const JSON_SCHEMA: u32 = 1;

/// How a sub-case (one of hmm-tests' cases) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseOutcome {
    Pass,
    Fail,
    Skip,
}

impl CaseOutcome {
    fn as_str(self) -> &'static str {
        match self {
            CaseOutcome::Pass => "pass",
            CaseOutcome::Fail => "fail",
            CaseOutcome::Skip => "skip",
        }
    }
}

/// A case inside a VM test (hmm-tests' `hmm.hmm_device_private.open_close`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    pub outcome: CaseOutcome,
    /// Whether the test's expected list accepts this outcome (a listed
    /// failure is not a failure of the run).
    pub expected: bool,
    /// From the previous result line to this one, on the host clock.
    pub time: Option<Duration>,
}

/// One step or VM test of a `cargo xtask test` run.
#[derive(Clone, Debug, Default)]
pub struct TestResult {
    pub name: String,
    pub pass: bool,
    pub time: Duration,
    /// Why it failed (empty if it passed).
    pub message: String,
    /// The last console lines of its last boot.
    pub console: Vec<String>,
    /// Its boots' artifacts folders (kept).
    pub artifacts: Vec<PathBuf>,
    pub cases: Vec<Case>,
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 has no other control characters (console noise).
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one testsuite `hmmgpu`, a testcase per step and VM test (the
/// failure message and a console excerpt on a failure), and each sub-case
/// as a testcase whose classname is its VM test.
pub fn junit(results: &[TestResult]) -> String {
    let cases: usize = results.iter().map(|r| 1 + r.cases.len()).sum();
    let failures: usize = results
        .iter()
        .map(|r| {
            usize::from(!r.pass)
                + r.cases
                    .iter()
                    .filter(|c| c.outcome == CaseOutcome::Fail && !c.expected)
                    .count()
        })
        .sum();
    let skipped: usize = results
        .iter()
        .flat_map(|r| &r.cases)
        .filter(|c| c.outcome == CaseOutcome::Skip)
        .count();
    let total: f64 = results.iter().map(|r| r.time.as_secs_f64()).sum();
    let mut x = String::new();
    let _ = writeln!(x, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        x,
        r#"<testsuites name="cargo xtask test" tests="{cases}" failures="{failures}" time="{total:.3}">"#
    );
    let _ = writeln!(
        x,
        r#"  <testsuite name="hmmgpu" tests="{cases}" failures="{failures}" skipped="{skipped}" time="{total:.3}">"#
    );
    for r in results {
        let _ = write!(
            x,
            r#"    <testcase classname="hmmgpu" name="{}" time="{:.3}""#,
            xml_escape(&r.name),
            r.time.as_secs_f64()
        );
        if r.pass {
            let _ = writeln!(x, "/>");
        } else {
            let first = r.message.lines().next().unwrap_or("failed");
            let _ = writeln!(x, ">");
            let _ = writeln!(
                x,
                r#"      <failure message="{}">{}</failure>"#,
                xml_escape(first),
                xml_escape(&r.message)
            );
            let mut out = String::new();
            if !r.artifacts.is_empty() {
                out.push_str("artifacts:\n");
                for a in &r.artifacts {
                    let _ = writeln!(out, "  {}", a.display());
                }
            }
            if !r.console.is_empty() {
                out.push_str("console (last lines):\n");
                for l in &r.console {
                    let _ = writeln!(out, "{l}");
                }
            }
            if !out.is_empty() {
                let _ = writeln!(x, "      <system-out>{}</system-out>", xml_escape(&out));
            }
            let _ = writeln!(x, "    </testcase>");
        }
        for c in &r.cases {
            let _ = write!(
                x,
                r#"    <testcase classname="hmmgpu.{}" name="{}"{}"#,
                xml_escape(&r.name),
                xml_escape(&c.name),
                c.time.map_or(String::new(), |t| format!(
                    r#" time="{:.3}""#,
                    t.as_secs_f64()
                ))
            );
            match (c.outcome, c.expected) {
                (CaseOutcome::Pass, _) | (CaseOutcome::Fail, true) => {
                    let _ = writeln!(x, "/>");
                }
                (CaseOutcome::Skip, _) => {
                    let _ = writeln!(x, "><skipped/></testcase>");
                }
                (CaseOutcome::Fail, false) => {
                    let _ = writeln!(
                        x,
                        r#"><failure message="{} failed (not in the expected list)"/></testcase>"#,
                        xml_escape(&c.name)
                    );
                }
            }
        }
    }
    let _ = writeln!(x, "  </testsuite>");
    let _ = writeln!(x, "</testsuites>");
    x
}

/// The JSON results (schema [`JSON_SCHEMA`]).
pub fn json(results: &[TestResult], meta: serde_json::Value) -> serde_json::Value {
    let passed = results.iter().filter(|r| r.pass).count();
    json!({
        "schema": JSON_SCHEMA,
        "run": meta,
        "passed": passed,
        "failed": results.len() - passed,
        "tests": results.iter().map(|r| json!({
            "name": r.name,
            "result": if r.pass { "pass" } else { "fail" },
            "seconds": (r.time.as_secs_f64() * 1000.0).round() / 1000.0,
            "message": r.message,
            "console_tail": r.console,
            "artifacts": r.artifacts.iter().map(|a| a.display().to_string()).collect::<Vec<_>>(),
            "cases": r.cases.iter().map(|c| json!({
                "name": c.name,
                "result": c.outcome.as_str(),
                "expected": c.expected,
                "seconds": c.time.map(|t| (t.as_secs_f64() * 1000.0).round() / 1000.0),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// KTAP v1 (Documentation/dev-tools/ktap.rst): one suite `hmmgpu` with a
/// test per step and VM test; a VM test with cases has them as subtests.
pub fn ktap(results: &[TestResult]) -> String {
    // Names are one token in KTAP: no spaces or '#'.
    fn name(s: &str) -> String {
        s.chars()
            .map(|c| {
                if c.is_whitespace() || c == '#' {
                    '_'
                } else {
                    c
                }
            })
            .collect()
    }
    let mut k = String::new();
    k.push_str("KTAP version 1\n1..1\n");
    k.push_str("    KTAP version 1\n    # Subtest: hmmgpu\n");
    let _ = writeln!(k, "    1..{}", results.len());
    for (i, r) in results.iter().enumerate() {
        if !r.cases.is_empty() {
            let _ = writeln!(
                k,
                "        KTAP version 1\n        # Subtest: {}",
                name(&r.name)
            );
            let _ = writeln!(k, "        1..{}", r.cases.len());
            for (j, c) in r.cases.iter().enumerate() {
                let _ = writeln!(
                    k,
                    "        {} {} {}{}",
                    if c.outcome == CaseOutcome::Fail && !c.expected {
                        "not ok"
                    } else {
                        "ok"
                    },
                    j + 1,
                    name(&c.name),
                    match (c.outcome, c.expected) {
                        (CaseOutcome::Skip, _) => " # SKIP",
                        (CaseOutcome::Fail, true) => " # SKIP expected to fail",
                        _ => "",
                    }
                );
            }
        }
        if !r.pass {
            for l in r.message.lines().take(20) {
                let _ = writeln!(k, "    # {l}");
            }
        }
        let _ = writeln!(
            k,
            "    {} {} {}",
            if r.pass { "ok" } else { "not ok" },
            i + 1,
            name(&r.name)
        );
    }
    let all = results.iter().all(|r| r.pass);
    let _ = writeln!(k, "{} 1 hmmgpu", if all { "ok" } else { "not ok" });
    k
}

/// Results of every shape the report has: a pass, a failure with a
/// message, console and artifacts, and a test with cases (a pass, a skip).
fn sample() -> Vec<TestResult> {
    vec![
        TestResult {
            name: "bare-boot".into(),
            pass: true,
            time: Duration::from_millis(2100),
            ..Default::default()
        },
        TestResult {
            name: "demo".into(),
            pass: false,
            time: Duration::from_millis(9000),
            message: "the VM failed: backend failed (exit status 122): <gpu0> & co".into(),
            console: vec!["[ 1.0] hmmgpu-demo: FAIL \u{1b}[0m".into()],
            artifacts: vec![PathBuf::from("target/xtask/runs/t/demo/1")],
            cases: Vec::new(),
        },
        TestResult {
            name: "hmm-tests".into(),
            pass: true,
            time: Duration::from_secs(60),
            cases: vec![
                Case {
                    name: "hmm.hmm_device_private.open_close".into(),
                    outcome: CaseOutcome::Pass,
                    expected: true,
                    time: Some(Duration::from_millis(250)),
                },
                Case {
                    name: "hmm.hmm_device_coherent.exclusive".into(),
                    outcome: CaseOutcome::Skip,
                    expected: true,
                    time: None,
                },
            ],
            ..Default::default()
        },
    ]
}

/// Feeds [`ktap`] output (with the `N passed, N failed` line after it, as
/// on stdout) to the kernel's own `tools/testing/kunit/kunit.py parse` from
/// `k`'s source tree and checks that it reads every test with its result.
pub fn kunit_parse_check(k: &crate::build::Kernel) -> anyhow::Result<()> {
    use anyhow::{bail, ensure, Context};
    use std::io::Write;
    let kunit = k.source.join("tools/testing/kunit/kunit.py");
    ensure!(kunit.is_file(), "{} does not exist", kunit.display());
    let results = sample();
    let text = format!("{}2 passed, 1 failed\n", ktap(&results));
    let json_path = std::env::temp_dir().join(format!("hmmgpu-kunit-{}.json", std::process::id()));
    let mut child = std::process::Command::new("python3")
        .arg(&kunit)
        .arg("parse")
        .arg(format!("--json={}", json_path.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running python3 kunit.py parse")?;
    child.stdin.take().unwrap().write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let json = std::fs::read_to_string(&json_path);
    let _ = std::fs::remove_file(&json_path);
    if said.contains("[ERROR]") || said.contains("could not") {
        bail!("kunit.py parse reports errors:\n{said}");
    }
    let v: serde_json::Value = serde_json::from_str(&json.context("kunit.py wrote no JSON")?)?;
    // Every test case kunit.py found, flattened: (name, status).
    fn walk(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for c in v["test_cases"].as_array().into_iter().flatten() {
            out.push((
                c["name"].as_str().unwrap_or("").to_string(),
                c["status"].as_str().unwrap_or("").to_string(),
            ));
        }
        for g in v["sub_groups"].as_array().into_iter().flatten() {
            walk(g, out);
        }
    }
    let mut got = Vec::new();
    walk(&v, &mut got);
    got.sort();
    let mut want: Vec<(String, String)> = vec![
        ("bare-boot".into(), "PASS".into()),
        ("demo".into(), "FAIL".into()),
        ("hmm.hmm_device_private.open_close".into(), "PASS".into()),
        ("hmm.hmm_device_coherent.exclusive".into(), "SKIP".into()),
    ];
    want.sort();
    ensure!(
        got == want,
        "kunit.py parse read {got:?}, want {want:?}; it said:\n{said}"
    );
    // A failed test must make kunit.py fail too.
    ensure!(
        !out.status.success(),
        "kunit.py parse passed a run with a failure"
    );
    crate::build::log(format!(
        "kunit.py parse ({}) reads --format ktap: {} tests as written",
        kunit.display(),
        got.len()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_counts_and_escapes() {
        let x = junit(&sample());
        assert!(
            x.contains(r#"<testsuite name="hmmgpu" tests="5" failures="1" skipped="1""#),
            "{x}"
        );
        assert!(x.contains(r#"name="demo" time="9.000""#));
        assert!(x.contains("&lt;gpu0&gt; &amp; co"));
        assert!(x.contains("target/xtask/runs/t/demo/1"));
        assert!(!x.contains('\u{1b}'), "control characters are not XML");
        assert!(x.contains(
            r#"classname="hmmgpu.hmm-tests" name="hmm.hmm_device_private.open_close" time="0.250"/>"#
        ));
        // Well-formed enough for a strict parser: python's, if there is one.
        if let Ok(mut c) = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys,xml.dom.minidom as m; m.parseString(sys.stdin.read())",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
        {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(x.as_bytes()).unwrap();
            assert!(c.wait().unwrap().success(), "python rejects the XML:\n{x}");
        }
    }

    #[test]
    fn json_has_a_schema_and_every_test() {
        let v = json(&sample(), json!({"arch": "x86_64"}));
        assert_eq!(v["schema"], JSON_SCHEMA);
        assert_eq!(v["passed"], 2);
        assert_eq!(v["failed"], 1);
        assert_eq!(v["tests"][1]["result"], "fail");
        assert_eq!(v["tests"][2]["cases"][1]["result"], "skip");
        assert_eq!(v["run"]["arch"], "x86_64");
    }

    #[test]
    fn ktap_shape() {
        let k = ktap(&sample());
        assert!(k.starts_with("KTAP version 1\n1..1\n"));
        assert!(k.contains("    1..3\n"));
        assert!(k.contains("    not ok 2 demo\n"));
        assert!(k.contains("        ok 2 hmm.hmm_device_coherent.exclusive # SKIP\n"));
        assert!(k.ends_with("not ok 1 hmmgpu\n"));
    }
}
