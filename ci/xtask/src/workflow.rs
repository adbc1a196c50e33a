//! Checks of the CI recipe, .github/workflows/hmmgpu.yml (docs/running.md,
//! "CI recipe"): it parses as YAML, runs the commands the README says CI
//! runs, shards them over its matrix (every shard exactly once), restores
//! the build cache keyed by the builds' inputs, lets the runner's user open
//! /dev/kvm, and uploads the JUnit file it asks for and the artifacts
//! folder.

use crate::build::repo_root;
use std::collections::BTreeMap;
use yaml_rust2::{Yaml, YamlLoader};

const WORKFLOW: &str = ".github/workflows/hmmgpu.yml";

fn read(rel: &str) -> String {
    let p = repo_root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn load(text: &str) -> Result<Yaml, String> {
    let mut docs =
        YamlLoader::load_from_str(text).map_err(|e| format!("the workflow is not YAML: {e}"))?;
    if docs.len() != 1 {
        return Err(format!("{} YAML documents, not one", docs.len()));
    }
    Ok(docs.remove(0))
}

fn s(y: &Yaml) -> &str {
    y.as_str().unwrap_or("")
}

/// The commands the README says CI runs: in its command blocks, the lines
/// whose comment says so ("... CI runs ..."), without the comment.
pub fn readme_ci_commands(readme: &str) -> Vec<String> {
    let mut in_block = false;
    let mut out = Vec::new();
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if let (true, Some((cmd, comment))) = (in_block, line.split_once('#')) {
            if comment.contains("CI runs") && !cmd.trim().is_empty() {
                out.push(cmd.trim().to_string());
            }
        }
    }
    out
}

/// Each step's `run` script with the `$NAME` of its env (and the job's and
/// the workflow's) replaced by their values, and the step itself.
fn run_scripts(doc: &Yaml) -> Result<Vec<(String, Yaml)>, String> {
    let env_of = |y: &Yaml| -> BTreeMap<String, String> {
        y["env"]
            .as_hash()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let v = match v {
                    Yaml::Integer(i) => i.to_string(),
                    other => s(other).to_string(),
                };
                (s(k).to_string(), v)
            })
            .collect()
    };
    let mut out = Vec::new();
    for (name, job) in doc["jobs"].as_hash().ok_or("jobs is no mapping")? {
        let steps = job["steps"]
            .as_vec()
            .ok_or(format!("job {name:?} has no steps"))?;
        for step in steps {
            let mut env = env_of(doc);
            env.extend(env_of(job));
            env.extend(env_of(step));
            let mut script = s(&step["run"]).to_string();
            for (k, v) in &env {
                for form in [format!("${{{k}}}"), format!("${k}")] {
                    script = script.replace(&form, v);
                }
            }
            out.push((script, step.clone()));
        }
    }
    Ok(out)
}

/// Whether `script` runs `cmd` as a command (at a line's or a shell
/// separator's start, followed by arguments or nothing).
fn runs(script: &str, cmd: &str) -> bool {
    script.lines().any(|line| {
        line.split(['&', ';', '|'])
            .map(str::trim)
            .any(|part| part == cmd || part.starts_with(&format!("{cmd} ")))
    })
}

/// A line split into shell words (quotes removed; nothing expanded).
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (None, '"' | '\'') => (quote, any) = (Some(c), true),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            (_, c) => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// The argument after `flag` in the first line of `script` that has it.
fn arg_after(script: &str, flag: &str) -> Option<String> {
    script.lines().find_map(|l| {
        let words = shell_words(l);
        let at = words.iter().position(|w| w == flag)?;
        words.get(at + 1).cloned()
    })
}

/// Every check of the module doc, on the workflow `text` and the README
/// `readme`; the first failure, if any.
pub fn check(text: &str, readme: &str) -> Result<(), String> {
    let doc = load(text)?;
    if doc["jobs"].as_hash().is_none_or(|j| j.is_empty()) || doc["on"].is_badvalue() {
        return Err("no `on` or no jobs".into());
    }
    let scripts = run_scripts(&doc)?;
    for (_, step) in &scripts {
        if step["run"].is_badvalue() && step["uses"].is_badvalue() {
            return Err(format!("a step neither runs nor uses anything: {step:?}"));
        }
    }
    let all: String = scripts.iter().map(|(s, _)| format!("{s}\n")).collect();

    let commands = readme_ci_commands(readme);
    if commands.is_empty() {
        return Err("the README names no command CI runs".into());
    }
    for cmd in &commands {
        if !runs(&all, cmd) {
            return Err(format!(
                "the workflow does not run the README's CI command `{cmd}`"
            ));
        }
    }
    // The host setup .ci/run does first.
    if !runs(&all, "bash ci/setup-host.sh") {
        return Err("the workflow does not run ci/setup-host.sh".into());
    }

    // --shard K/N over a matrix of 1..=N.
    let test_line = all
        .lines()
        .find(|l| runs(l, "cargo xtask test"))
        .ok_or("no `cargo xtask test` line")?;
    let shard = arg_after(test_line, "--shard").ok_or("cargo xtask test has no --shard")?;
    let (k, n) = shard
        .split_once('/')
        .ok_or(format!("--shard {shard} is not K/N"))?;
    if k != "${{ matrix.shard }}" {
        return Err(format!("--shard's K is {k}, not the matrix's shard"));
    }
    let n: i64 = n
        .parse()
        .map_err(|_| format!("--shard's N {n} is no number"))?;
    let job = doc["jobs"]
        .as_hash()
        .and_then(|j| {
            j.values()
                .find(|job| !job["strategy"]["matrix"]["shard"].is_badvalue())
        })
        .ok_or("no job has a strategy.matrix.shard")?;
    let matrix: Vec<i64> = job["strategy"]["matrix"]["shard"]
        .as_vec()
        .ok_or("no strategy.matrix.shard list")?
        .iter()
        .filter_map(Yaml::as_i64)
        .collect();
    if matrix != (1..=n).collect::<Vec<_>>() {
        return Err(format!(
            "matrix.shard {matrix:?} is not 1..={n}: some shard runs twice or never"
        ));
    }

    // The JUnit file it writes and the artifacts folder are uploaded, also
    // after a failure.
    let junit = arg_after(test_line, "--junit").ok_or("cargo xtask test has no --junit")?;
    let uploads: Vec<&Yaml> = scripts
        .iter()
        .map(|(_, st)| st)
        .filter(|st| s(&st["uses"]).starts_with("actions/upload-artifact@"))
        .collect();
    for path in [junit.as_str(), "target/xtask/runs"] {
        let up = uploads
            .iter()
            .find(|st| s(&st["with"]["path"]).lines().any(|p| p.trim() == path))
            .ok_or(format!("nothing uploads {path}"))?;
        if !s(&up["if"]).contains("always()") {
            return Err(format!(
                "the upload of {path} is skipped when a test fails (no `if: always()`)"
            ));
        }
    }

    // ~/.cache/hmmgpu, keyed by the hash of the builds' inputs.
    let cache = scripts
        .iter()
        .map(|(_, st)| st)
        .find(|st| s(&st["uses"]).starts_with("actions/cache@"))
        .ok_or("no actions/cache step")?;
    if s(&cache["with"]["path"]).trim() != "~/.cache/hmmgpu" {
        return Err(format!(
            "the cache holds {:?}, not ~/.cache/hmmgpu",
            cache["with"]["path"]
        ));
    }
    let key = s(&cache["with"]["key"]);
    for input in ["'images/**'", "'qemu-patches/**'", "'ci/setup-host.sh'"] {
        if !(key.contains("hashFiles(") && key.contains(input)) {
            return Err(format!("the cache key {key:?} does not hash {input}"));
        }
    }

    // GitHub's udev rule for /dev/kvm, applied.
    if !(all.contains(r#"KERNEL=="kvm", GROUP="kvm", MODE="0666""#)
        && runs(&all, "sudo udevadm trigger --name-match=kvm"))
    {
        return Err("no step applies the udev rule that opens /dev/kvm".into());
    }
    if !all.contains("--device /dev/kvm") {
        return Err("the container does not get /dev/kvm".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_names_what_ci_runs() {
        assert_eq!(readme_ci_commands(&read("README.md")), ["cargo xtask test"]);
    }

    #[test]
    fn the_workflow_parses_and_runs_the_readmes_ci_commands() {
        check(&read(WORKFLOW), &read("README.md")).unwrap();
    }

    #[test]
    fn a_workflow_that_breaks_a_promise_is_refused() {
        let (good, readme) = (read(WORKFLOW), read("README.md"));
        // Each break, and the reason it must be refused for.
        let broken = [
            (good.replace("jobs:", "jobs: ["), "not YAML"),
            (good.replace("--shard \"$SHARD\" ", ""), "has no --shard"),
            (
                good.replace("shard: [1, 2, 3, 4]", "shard: [1, 2, 3]"),
                "some shard runs twice or never",
            ),
            (
                good.replace("SHARD: ${{ matrix.shard }}/4", "SHARD: 1/4"),
                "not the matrix's shard",
            ),
            (
                good.replace(" --junit target/xtask/junit.xml", ""),
                "has no --junit",
            ),
            (
                good.replace("path: target/xtask/junit.xml", "path: junit.xml"),
                "nothing uploads target/xtask/junit.xml",
            ),
            (
                good.replace("path: target/xtask/runs", "path: target/runs"),
                "nothing uploads target/xtask/runs",
            ),
            (
                good.replace(
                    "if: always()\n        uses: actions/upload",
                    "uses: actions/upload",
                ),
                "skipped when a test fails",
            ),
            (
                good.replace("'qemu-patches/**', ", ""),
                "does not hash 'qemu-patches/**'",
            ),
            (
                good.replace("sudo udevadm trigger --name-match=kvm", "true"),
                "udev rule",
            ),
            (
                good.replace("kvm=(--device /dev/kvm)", "kvm=()"),
                "does not get /dev/kvm",
            ),
            (
                good.replace("bash ci/setup-host.sh --yes", "true"),
                "ci/setup-host.sh",
            ),
            (
                good.replace("cargo xtask test --shard", "cargo xtask run --shard"),
                "README's CI command",
            ),
        ];
        for (text, why) in broken {
            assert_ne!(text, good, "{why}: the replacement changed nothing");
            let refused = check(&text, &readme).expect_err(why);
            assert!(
                refused.contains(why),
                "refused for another reason: {refused} (want: {why})"
            );
        }
        // A README that names another CI command is not run by the workflow.
        let other: String = readme
            .lines()
            .map(|l| {
                if l.contains("CI runs") {
                    l.replace("cargo xtask test", "cargo xtask testall")
                } else {
                    l.to_string()
                }
            })
            .map(|l| l + "\n")
            .collect();
        assert!(check(&good, &other).is_err());
    }
}
