//! `cargo xtask coverage [TESTS...]`: which lines of the kernel's HMM code
//! and of the driver's C the VM tests run.
//!
//! The gcov flavour of the guest kernel (images/build-kernel.sh --flavour
//! gcov: CONFIG_GCOV_KERNEL with mm/hmm.c, mm/migrate_device.c,
//! mm/memremap.c and mm/migrate.c profiled; images/build-driver.sh profiles
//! the driver's C shim on such a kernel) runs the chosen VM tests (default:
//! every x86_64 one but the -debug reruns). Each boot's command is followed
//! by a dump of /sys/kernel/debug/gcov on the console (every .gcda, as a
//! base64 gzipped tar between markers); here each boot's counters become an
//! lcov tracefile against the tree's .gcno files, the boots are merged, and
//! genhtml writes the HTML report. A user's own gcov-enabled tree works the
//! same way (`--kernel-dir`): whatever it profiles is reported.

use crate::build::{self, log};
use crate::cli::{AccelChoice, Arch, Flavour, TestArgs, VmOpts};
use crate::vm::{self, VmOutcome};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Args, Debug)]
pub struct CoverageArgs {
    /// VM tests to run, names or glob patterns (default: every x86_64 VM
    /// test but the -debug reruns, which run the same code on another
    /// kernel, and `oracle`, which checks the runner).
    #[arg(value_name = "TEST")]
    pub tests: Vec<String>,
    /// Leave out the VM tests matching this name or glob (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub skip: Vec<String>,
    /// Where the tracefile (coverage.info), the HTML report (html/) and
    /// each boot's counters go.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Your own gcov-enabled x86_64 kernel tree (CONFIG_GCOV_KERNEL=y, with
    /// GCOV_PROFILE for the files you want) instead of hmmgpu's gcov build.
    #[arg(long, value_name = "DIR")]
    pub kernel_dir: Option<PathBuf>,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Guest RAM (bytes, or with a K/M/G suffix).
    #[arg(long, default_value = "2G", value_parser = crate::cli::parse_size)]
    pub memory: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub cpus: u32,
    /// Seconds each VM test may take from launch to the status marker.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// The files hmmgpu's gcov flavour profiles (images/build-kernel.sh,
/// images/build-driver.sh); the table lists them even when a run missed one.
pub const PROFILED: &[&str] = &[
    "mm/hmm.c",
    "mm/migrate_device.c",
    "mm/memremap.c",
    "mm/migrate.c",
    "guest-driver/shim.c",
];

/// Console markers of the dump.
const BEGIN: &str = "HMMGPU-GCOV-BEGIN";
const END: &str = "HMMGPU-GCOV-END";
const NONE: &str = "HMMGPU-GCOV-NONE";

/// The guest side: every .gcda of /sys/kernel/debug/gcov copied out (their
/// debugfs size is 0, so tar cannot read them in place), tarred, gzipped and
/// printed as base64 between the markers, kernel messages kept off the
/// console meanwhile.
const DUMP_SCRIPT: &str = r#"#!/bin/sh
# cargo xtask coverage: prints the kernel's gcov counters on the console.
dmesg -n 1 2>/dev/null
g=/sys/kernel/debug/gcov
if [ ! -d "$g" ]; then echo; echo "HMMGPU-GCOV-NONE: no $g (not a gcov kernel)"; exit 0; fi
out=/tmp/hmmgpu-gcov
rm -rf "$out" && mkdir -p "$out" || exit 1
cd "$g" || exit 1
find . -name '*.gcda' | while read -r f; do
    mkdir -p "$out/${f%/*}" && cat "$f" >"$out/$f"
done
n=$(find "$out" -name '*.gcda' | wc -l)
tar -czf /tmp/hmmgpu-gcov.tgz -C "$out" . || exit 1
echo
echo "HMMGPU-GCOV-BEGIN files=$n bytes=$(wc -c </tmp/hmmgpu-gcov.tgz)"
base64 /tmp/hmmgpu-gcov.tgz
echo "HMMGPU-GCOV-END"
"#;

/// Where the dump script lands in the guest (`--add` puts files in /host/).
const GUEST_SCRIPT: &str = "/host/hmmgpu-gcov-dump";

/// Collects each VM test boot's gcov counters (used by tests.rs).
#[derive(Debug)]
pub struct Collector {
    dir: PathBuf,
    script: PathBuf,
    boots: RefCell<BTreeMap<String, u32>>,
    /// Per boot: its name and its folder of .gcda files, or why none.
    collected: RefCell<Vec<(String, Result<PathBuf, String>)>>,
}

impl Collector {
    fn new(dir: &Path) -> Result<Collector> {
        let script = dir.join("hmmgpu-gcov-dump");
        std::fs::create_dir_all(dir.join("boots"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&script, DUMP_SCRIPT)
            .with_context(|| format!("writing {}", script.display()))?;
        Ok(Collector {
            dir: dir.to_path_buf(),
            script,
            boots: RefCell::default(),
            collected: RefCell::default(),
        })
    }

    /// The file the initramfs must hold (under /host/).
    pub fn dump_script(&self) -> &Path {
        &self.script
    }

    /// `cmd` followed by the dump, keeping `cmd`'s exit status.
    pub fn wrap(&self, cmd: &[String]) -> Vec<String> {
        let script = format!("{}\ns=$?\nsh {GUEST_SCRIPT}\nexit $s", vm::shell_join(cmd));
        vec!["sh".into(), "-c".into(), script]
    }

    /// Takes the counters a boot of `test` printed. A boot without them
    /// (not a gcov kernel, a guest that died) is noted, not an error: the
    /// test's own verdict is the test's.
    pub fn collect(&self, test: &str, out: &VmOutcome) {
        let name = {
            let mut boots = self.boots.borrow_mut();
            let n = boots.entry(test.to_string()).or_default();
            *n += 1;
            if *n == 1 {
                test.to_string()
            } else {
                format!("{test}.boot{n}")
            }
        };
        let dir = self.dir.join("boots").join(&name);
        let got = extract(&out.console, &dir).map(|files| {
            log(format!(
                "coverage: {name}: {files} .gcda files in {}",
                dir.display()
            ));
            dir
        });
        if let Err(e) = &got {
            log(format!("coverage: {name}: no counters: {e:#}"));
        }
        self.collected
            .borrow_mut()
            .push((name, got.map_err(|e| format!("{e:#}"))));
    }
}

/// The RFC 4648 base64 of `text` (line breaks and padding allowed).
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => bail!("not base64: {:?}", c as char),
        };
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Unpacks the dump in `console` into `dir`; returns how many .gcda files.
fn extract(console: &[String], dir: &Path) -> Result<usize> {
    if let Some(l) = console.iter().find(|l| l.contains(NONE)) {
        bail!("{}", l.trim());
    }
    let start = console
        .iter()
        .rposition(|l| l.contains(BEGIN))
        .context("the console has no HMMGPU-GCOV-BEGIN (the command's end was not reached?)")?;
    let header = &console[start];
    let field = |key: &str| -> Option<usize> {
        header
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    let (files, bytes) = (field("files="), field("bytes="));
    let end = console[start..]
        .iter()
        .position(|l| l.contains(END))
        .context("the dump has no HMMGPU-GCOV-END")?;
    let text: String = console[start + 1..start + end]
        .iter()
        .map(|l| l.trim())
        .collect();
    let tgz = base64_decode(&text)?;
    ensure!(
        Some(tgz.len()) == bytes,
        "the dump decodes to {} bytes, the guest said {bytes:?} (console garbled?)",
        tgz.len()
    );
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tar = Command::new("tar")
        .args(["-xzf", "-", "-C"])
        .arg(dir)
        .stdin(Stdio::piped())
        .spawn()
        .context("running tar")?;
    std::io::Write::write_all(&mut tar.stdin.take().unwrap(), &tgz)?;
    let status = tar.wait()?;
    ensure!(status.success(), "tar could not unpack the dump ({status})");
    let found = gcda_files(dir)?.len();
    ensure!(
        Some(found) == files,
        "{found} .gcda files unpacked, the guest said {files:?}"
    );
    ensure!(found > 0, "the kernel profiles no file");
    Ok(found)
}

fn gcda_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "gcda") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Runs a command quietly; its output goes to `log` on failure.
fn run_tool(what: &str, cmd: &mut Command, log_file: &Path) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {what} (Debian's lcov: ci/setup-host.sh installs it)"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    std::fs::write(log_file, &text).ok();
    ensure!(
        out.status.success(),
        "{what} failed ({}); its output ({}):\n{}",
        out.status,
        log_file.display(),
        text.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// One boot's counters as an lcov tracefile: each .gcda (at the guest's
/// path of its object, which is the host's: the tree was built here) gets
/// its .gcno beside it, and geninfo runs `gcov_tool` on them.
fn capture(boot_dir: &Path, info: &Path, gcov_tool: &Path, name: &str) -> Result<()> {
    for gcda in gcda_files(boot_dir)? {
        let rel = gcda.strip_prefix(boot_dir).unwrap_or(&gcda);
        let gcno = Path::new("/").join(rel).with_extension("gcno");
        ensure!(
            gcno.is_file(),
            "{} has no {} on this host (the tree the guest ran was built elsewhere, or rebuilt since?)",
            rel.display(),
            gcno.display()
        );
        let link = gcda.with_extension("gcno");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&gcno, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run_tool(
        "lcov --capture",
        Command::new("lcov")
            .args(["--quiet", "--capture", "--directory"])
            .arg(boot_dir)
            .arg("--gcov-tool")
            .arg(gcov_tool)
            .args(["--test-name", &name.replace(['-', '.'], "_")])
            .arg("--output-file")
            .arg(info),
        &info.with_extension("log"),
    )
}

/// The gcov that reads the tree's data: gcc's for a gcc-built tree (the
/// host's gcc built it), llvm-cov's gcov mode for a clang-built one.
fn gcov_tool(tree_config: &str, dir: &Path) -> Result<PathBuf> {
    if !tree_config.lines().any(|l| l == "CONFIG_CC_IS_CLANG=y") {
        return Ok(PathBuf::from("gcov"));
    }
    let llvm_cov = ["llvm-cov-19", "llvm-cov"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("a clang-built tree needs llvm-cov (llvm-19) to read its gcov data")?;
    let wrapper = dir.join("llvm-gcov");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {llvm_cov} gcov \"$@\"\n"),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(wrapper)
}

/// Lines and functions of one source file in a tracefile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileCoverage {
    pub lines_found: u64,
    pub lines_hit: u64,
    pub functions_found: u64,
    pub functions_hit: u64,
}

/// The per-file totals of an lcov tracefile. A merged tracefile keeps one
/// record per file and test name (each boot is a test name), so a file's
/// lines are the union of its records' DA lines, hit when any boot ran them,
/// and its functions the union of FN names, hit when any FNDA counted one
/// (summing the records' LF and LH would count a file once per boot).
pub fn parse_tracefile(text: &str) -> BTreeMap<String, FileCoverage> {
    #[derive(Default)]
    struct Seen {
        lines: BTreeMap<u64, bool>,
        functions: BTreeMap<String, bool>,
    }
    let mut files: BTreeMap<String, Seen> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let (key, value) = line.split_once(':').unwrap_or((line, ""));
        if key == "SF" {
            current = Some(value.to_string());
            files.entry(value.to_string()).or_default();
            continue;
        }
        if key == "end_of_record" {
            current = None;
            continue;
        }
        let Some(seen) = current.as_ref().and_then(|f| files.get_mut(f)) else {
            continue;
        };
        let mut fields = value.split(',');
        match key {
            // DA:<line>,<count>[,<checksum>]
            "DA" => {
                let number = fields.next().and_then(|n| n.trim().parse::<u64>().ok());
                let count = fields.next().and_then(|c| c.trim().parse::<u64>().ok());
                if let (Some(n), Some(c)) = (number, count) {
                    *seen.lines.entry(n).or_default() |= c > 0;
                }
            }
            // FN:<line>,<name>
            "FN" => {
                if let Some(name) = fields.nth(1) {
                    seen.functions.entry(name.to_string()).or_default();
                }
            }
            // FNDA:<count>,<name>
            "FNDA" => {
                let count = fields.next().and_then(|c| c.trim().parse::<u64>().ok());
                if let (Some(c), Some(name)) = (count, fields.next()) {
                    *seen.functions.entry(name.to_string()).or_default() |= c > 0;
                }
            }
            _ => {}
        }
    }
    files
        .into_iter()
        .map(|(path, seen)| {
            let count = |hit: &mut dyn Iterator<Item = bool>| {
                let (mut found, mut hits) = (0, 0);
                for h in hit {
                    found += 1;
                    hits += u64::from(h);
                }
                (found, hits)
            };
            let (lines_found, lines_hit) = count(&mut seen.lines.values().copied());
            let (functions_found, functions_hit) = count(&mut seen.functions.values().copied());
            (
                path,
                FileCoverage {
                    lines_found,
                    lines_hit,
                    functions_found,
                    functions_hit,
                },
            )
        })
        .collect()
}

fn percent(hit: u64, found: u64) -> String {
    if found == 0 {
        "-".into()
    } else {
        format!("{:.1}%", hit as f64 * 100.0 / found as f64)
    }
}

/// The table `cargo xtask coverage` prints: every profiled C file, by its
/// path in the kernel tree (or guest-driver/), with lines and functions
/// executed; headers (inline functions) are summed on one line.
pub fn table(files: &BTreeMap<String, FileCoverage>, strip: &[PathBuf]) -> String {
    let show = |path: &str| -> String {
        for prefix in strip {
            if let Ok(rel) = Path::new(path).strip_prefix(prefix) {
                return rel.display().to_string();
            }
        }
        match path.rsplit_once("/guest-driver/") {
            Some((_, rest)) => format!("guest-driver/{rest}"),
            None => path.to_string(),
        }
    };
    let mut rows: BTreeMap<String, FileCoverage> = BTreeMap::new();
    let mut headers = FileCoverage::default();
    let mut header_files = 0;
    for (path, c) in files {
        if path.ends_with(".c") {
            rows.insert(show(path), c.clone());
        } else {
            header_files += 1;
            headers.lines_found += c.lines_found;
            headers.lines_hit += c.lines_hit;
            headers.functions_found += c.functions_found;
            headers.functions_hit += c.functions_hit;
        }
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<28} {:>16} {:>7} {:>14} {:>7}",
        "file", "lines executed", "", "functions", ""
    );
    let mut total = FileCoverage::default();
    let row = |o: &mut String, name: &str, c: &FileCoverage| {
        let _ = writeln!(
            o,
            "{name:<28} {:>16} {:>7} {:>14} {:>7}",
            format!("{} / {}", c.lines_hit, c.lines_found),
            percent(c.lines_hit, c.lines_found),
            format!("{} / {}", c.functions_hit, c.functions_found),
            percent(c.functions_hit, c.functions_found),
        );
    };
    for p in PROFILED {
        if !rows.contains_key(*p) {
            let _ = writeln!(o, "{p:<28} {:>16}", "no data");
        }
    }
    for (name, c) in &rows {
        row(&mut o, name, c);
        total.lines_found += c.lines_found;
        total.lines_hit += c.lines_hit;
        total.functions_found += c.functions_found;
        total.functions_hit += c.functions_hit;
    }
    row(&mut o, "total (.c files)", &total);
    if header_files > 0 {
        row(
            &mut o,
            &format!("{header_files} headers (inlines)"),
            &headers,
        );
    }
    o
}

/// The VM tests coverage runs by default: every x86_64 one but the reruns
/// on the debug kernel and `oracle` (deliberately broken runs that check
/// the runner, not the kernel).
pub fn default_tests() -> Vec<String> {
    crate::tests::names()
        .into_iter()
        .filter(|n| !n.starts_with("ppc64le-") && !n.ends_with("-debug") && *n != "oracle")
        .map(str::to_string)
        .collect()
}

pub fn run(args: &CoverageArgs) -> Result<i32> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| build::target_dir().join("xtask/coverage"));
    let _ = std::fs::remove_dir_all(out.join("boots"));
    let collector = std::rc::Rc::new(Collector::new(&out)?);
    if let Some(dir) = &args.kernel_dir {
        ensure!(
            dir.is_dir(),
            "--kernel-dir {}: no such directory",
            dir.display()
        );
    }
    let tests = if args.tests.is_empty() {
        default_tests()
    } else {
        args.tests.clone()
    };
    log(format!("coverage: running {}", tests.join(", ")));
    let test_args = TestArgs {
        vm: VmOpts {
            arch: Arch::X86_64,
            accel: args.accel,
            flavour: Flavour::Gcov,
            memory: args.memory,
            cpus: args.cpus,
            // Checked against images/config/gcov.config too (build/tree.rs).
            kernel_dir: args.kernel_dir.clone(),
            no_setup: false,
        },
        vm_only: true,
        timeout: args.timeout,
        only: tests,
        list: false,
        trace: None,
        coverage: Some(collector.clone()),
        skip: args.skip.clone(),
        fail_fast: false,
        shard: None,
        junit: None,
        json: None,
        format: crate::cli::OutputFormat::Human,
        keep: false,
    };
    let status = crate::tests::run(&test_args)?;

    let kernel = build::kernel(Arch::X86_64, Flavour::Gcov, args.kernel_dir.as_deref())?;
    let tree = kernel.build.clone();
    let config = std::fs::read_to_string(tree.join(".config"))
        .with_context(|| format!("reading {}/.config", tree.display()))?;
    ensure!(
        config.lines().any(|l| l == "CONFIG_GCOV_KERNEL=y"),
        "{} is not a gcov kernel (CONFIG_GCOV_KERNEL=y)",
        tree.display()
    );
    let tool = gcov_tool(&config, &out)?;
    let mut infos = Vec::new();
    let mut missing = Vec::new();
    for (name, got) in collector.collected.borrow().iter() {
        match got {
            Ok(dir) => {
                let info = out.join("boots").join(format!("{name}.info"));
                capture(dir, &info, &tool, name).with_context(|| format!("boot {name}"))?;
                infos.push(info);
            }
            Err(e) => missing.push(format!("{name}: {e}")),
        }
    }
    ensure!(
        !infos.is_empty(),
        "no boot left gcov counters:\n  {}",
        missing.join("\n  ")
    );
    let total = out.join("coverage.info");
    let mut merge = Command::new("lcov");
    merge.arg("--quiet");
    for i in &infos {
        merge.arg("--add-tracefile").arg(i);
    }
    merge.arg("--output-file").arg(&total);
    run_tool("lcov --add-tracefile", &mut merge, &out.join("merge.log"))?;
    let html = out.join("html");
    let _ = std::fs::remove_dir_all(&html);
    let source = std::fs::canonicalize(tree.join("source")).unwrap_or(tree.clone());
    run_tool(
        "genhtml",
        Command::new("genhtml")
            .args(["--quiet", "--title", "hmmgpu VM tests", "--prefix"])
            .arg(&source)
            .arg("--output-directory")
            .arg(&html)
            .arg(&total),
        &out.join("genhtml.log"),
    )?;
    let text = std::fs::read_to_string(&total)?;
    let files = parse_tracefile(&text);
    println!();
    println!(
        "=== coverage: {} boot(s) of {} ({})",
        infos.len(),
        collector
            .boots
            .borrow()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        tree.display()
    );
    for m in &missing {
        println!("no counters from {m}");
    }
    print!("{}", table(&files, &[source, tree.clone()]));
    println!("tracefile {}", total.display());
    println!("HTML report {}", html.join("index.html").display());
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_through_the_runner_encoder() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foobar",
            &[0u8, 255, 128, 7, 9][..],
        ] {
            let text = vm::base64(data);
            // Wrapped like busybox base64 output.
            let wrapped: String = text
                .as_bytes()
                .chunks(4)
                .map(|c| format!("{}\n", String::from_utf8_lossy(c)))
                .collect();
            assert_eq!(base64_decode(&wrapped).unwrap(), data);
        }
        assert!(base64_decode("ab$c").is_err());
    }

    #[test]
    fn the_dump_is_unpacked_and_checked() {
        let dir = std::env::temp_dir().join(format!("hmmgpu-cov-test-{}", std::process::id()));
        let src = dir.join("src/root/build/mm");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("hmm.gcda"), b"gcda bytes").unwrap();
        let tgz = Command::new("tar")
            .args(["-czf", "-", "-C"])
            .arg(dir.join("src"))
            .arg(".")
            .output()
            .unwrap()
            .stdout;
        let mut console = vec!["hmmgpu-demo: PASS".to_string(), String::new()];
        console.push(format!("{BEGIN} files=1 bytes={}", tgz.len()));
        let b64 = vm::base64(&tgz);
        for chunk in b64.as_bytes().chunks(76) {
            console.push(String::from_utf8_lossy(chunk).into_owned());
        }
        console.push(END.to_string());
        let out = dir.join("out");
        assert_eq!(extract(&console, &out).unwrap(), 1);
        assert_eq!(
            std::fs::read(out.join("root/build/mm/hmm.gcda")).unwrap(),
            b"gcda bytes"
        );
        // A line lost on the way is caught by the byte count.
        let mut lost = console.clone();
        lost.remove(3);
        assert!(extract(&lost, &out).is_err());
        // So is a dump that claims more files.
        let mut more = console.clone();
        more[2] = more[2].replace("files=1", "files=2");
        assert!(extract(&more, &out).is_err());
        let none = vec![format!(
            "{NONE}: no /sys/kernel/debug/gcov (not a gcov kernel)"
        )];
        assert!(format!("{:#}", extract(&none, &out).unwrap_err()).contains("not a gcov"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An lcov record of `lines` (line, count) and `functions` (name, count).
    fn record(test: &str, file: &str, lines: &[(u64, u64)], functions: &[(&str, u64)]) -> String {
        let mut r = format!("TN:{test}\nSF:{file}\n");
        for (i, (name, _)) in functions.iter().enumerate() {
            r += &format!("FN:{},{name}\n", i + 1);
        }
        for (name, count) in functions {
            r += &format!("FNDA:{count},{name}\n");
        }
        let hit = functions.iter().filter(|f| f.1 > 0).count();
        r += &format!("FNF:{}\nFNH:{hit}\n", functions.len());
        for (line, count) in lines {
            r += &format!("DA:{line},{count}\n");
        }
        let hit = lines.iter().filter(|l| l.1 > 0).count();
        r += &format!("LF:{}\nLH:{hit}\nend_of_record\n", lines.len());
        r
    }

    #[test]
    fn tracefiles_are_summed_per_file() {
        let hmm: Vec<(u64, u64)> = (1..=100).map(|l| (l, u64::from(l <= 40))).collect();
        let shim: Vec<(u64, u64)> = (1..=50).map(|l| (l, u64::from(l > 25))).collect();
        let info = record("demo", "/src/mm/hmm.c", &hmm, &[("a", 1), ("b", 0)])
            + &record("demo", "/src/include/linux/mm.h", &[(1, 3), (2, 3)], &[])
            + &record(
                "demo",
                "/build/driver-x/guest-driver/shim.c",
                &shim,
                &[("probe", 2)],
            );
        let files = parse_tracefile(&info);
        assert_eq!(files["/src/mm/hmm.c"].lines_hit, 40);
        assert_eq!(files["/src/mm/hmm.c"].functions_hit, 1);
        let t = table(&files, &[PathBuf::from("/src")]);
        assert!(t.contains("mm/hmm.c"), "{t}");
        assert!(t.contains("40 / 100"), "{t}");
        assert!(t.contains("40.0%"), "{t}");
        assert!(t.contains("guest-driver/shim.c"), "{t}");
        assert!(t.contains("65 / 150"), "total of the .c files: {t}");
        assert!(t.contains("1 headers (inlines)"), "{t}");
        assert!(t.contains("mm/migrate.c") && t.contains("no data"), "{t}");
    }

    #[test]
    fn boots_merge_as_a_union_of_lines() {
        // Two boots (lcov --add-tracefile keeps one record per test name):
        // lines 1-3 in both, each boot runs line 1, only the second line 2.
        let info = record(
            "demo",
            "/src/mm/hmm.c",
            &[(1, 5), (2, 0), (3, 0)],
            &[("f", 1), ("g", 0)],
        ) + &record(
            "hmm_tests",
            "/src/mm/hmm.c",
            &[(1, 7), (2, 2), (3, 0)],
            &[("f", 0), ("g", 4)],
        );
        let c = &parse_tracefile(&info)["/src/mm/hmm.c"];
        assert_eq!(
            (
                c.lines_hit,
                c.lines_found,
                c.functions_hit,
                c.functions_found
            ),
            (2, 3, 2, 2)
        );
    }

    #[test]
    fn the_wrapped_command_keeps_its_status() {
        let c = Collector::new(
            &std::env::temp_dir().join(format!("hmmgpu-cov-wrap-{}", std::process::id())),
        )
        .unwrap();
        let w = c.wrap(&["sh".into(), "-c".into(), "exit 7".into()]);
        let out = Command::new("sh")
            .args(["-c", &w[2].replace(GUEST_SCRIPT, "/dev/null")])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(7));
        std::fs::remove_dir_all(&c.dir).unwrap();
    }
}
