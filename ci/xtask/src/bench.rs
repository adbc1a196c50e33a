//! `cargo xtask bench`: the same workloads on the kernel's test_hmm.ko and on
//! hmmgpu, in one VM boot, with the ratios hmmgpu / test_hmm. Every figure is
//! measured in that boot; nothing is compared across boots. Not a test: it
//! judges nothing, it prints a table and writes JSON (docs/running.md).

use crate::build::{self, log};
use crate::cli::BenchArgs;
use crate::vm::{self, Accel, Echo, VmConfig, VmResult};
use anyhow::{bail, Context, Result};
use std::time::Duration;

const DRIVERS: [&str; 2] = ["test_hmm", "hmmgpu"];

/// Runs of hmm-tests' benchmark_thp_migration per driver; each figure is the
/// median of the runs (the case itself prints the mean of 5 iterations, which
/// one TCG hiccup skews).
const SELFTEST_RUNS: usize = 3;

/// The guest script: per driver (test_hmm.ko and hmmgpu.ko both create
/// /dev/hmm_dmirror0.., so one at a time), hmmgpu-bench, hmm-tests' own THP
/// benchmark, and a timed full hmm-tests run, delimited for the host.
fn script() -> String {
    let mut s = String::from("rmmod hmmgpu || exit 90\n");
    let runs = (1..=SELFTEST_RUNS)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    for d in DRIVERS {
        s += &format!(
            r#"insmod /lib/modules/{d}.ko || exit 91
echo "HMMGPU-BENCH-BEGIN {d}"
hmmgpu-bench || exit 92
echo "HMMGPU-BENCH-THP {d}"
for i in {runs}; do hmm-tests -r hmm.hmm_device_private.benchmark_thp_migration; done
t0=$(cut -d' ' -f1 /proc/uptime)
hmm-tests >/tmp/hmm-tests-{d}.log 2>&1
t1=$(cut -d' ' -f1 /proc/uptime)
echo "BENCH hmm_tests_wall_s $(awk "BEGIN {{print $t1 - $t0}}")"
echo "HMMGPU-BENCH-HMM-TESTS $(grep '^# Totals:' /tmp/hmm-tests-{d}.log || echo 'no Totals line')"
echo "HMMGPU-BENCH-END {d}"
rmmod {d} || exit 93
"#
        );
    }
    s + "exit 0\n"
}

/// One driver's figures, in the order the guest printed them, each with its
/// samples (several only for hmm-tests' own benchmark).
#[derive(Debug, Default)]
struct Figures {
    values: Vec<(String, Vec<f64>)>,
    /// hmm-tests' `# Totals:` line of the timed full run.
    hmm_tests_totals: Option<String>,
}

impl Figures {
    /// The median of the figure's samples.
    fn get(&self, name: &str) -> Option<f64> {
        let (_, v) = self.values.iter().find(|(n, _)| n == name)?;
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    fn add(&mut self, name: String, v: f64) {
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1.push(v),
            None => self.values.push((name, vec![v])),
        }
    }
}

/// `BENCH name value` lines and hmm-tests' THP table for one driver.
fn parse(console: &[String], driver: &str) -> Result<Figures> {
    let begin = format!("HMMGPU-BENCH-BEGIN {driver}");
    let end = format!("HMMGPU-BENCH-END {driver}");
    let start = console
        .iter()
        .position(|l| l.trim() == begin)
        .with_context(|| format!("no '{begin}' in the console"))?;
    let mut out = Figures::default();
    let mut size = None;
    for l in &console[start + 1..] {
        let l = l.trim();
        if l == end {
            return Ok(out);
        }
        if let Some(rest) = l.strip_prefix("BENCH ") {
            if let Some((k, v)) = rest.split_once(' ') {
                if let Ok(v) = v.trim().parse() {
                    out.add(k.to_string(), v);
                }
            }
        } else if let Some(t) = l.strip_prefix("HMMGPU-BENCH-HMM-TESTS ") {
            out.hmm_tests_totals = Some(t.trim().to_string());
        } else if l.starts_with("=== ") {
            // hmm-tests' benchmark: "=== Single THP Size (2.0 MB) ===".
            size = l.contains("(2.0 MB)").then_some("2M");
        } else if let (Some(sz), Some(dir)) = (
            size,
            if l.starts_with("S->D Throughput") {
                Some("s2d")
            } else if l.starts_with("D->S Throughput") {
                Some("d2s")
            } else {
                None
            },
        ) {
            // "S->D Throughput | 0.39 GB/s | 0.37 GB/s | ..." (with, without THP)
            let cols: Vec<&str> = l.split('|').collect();
            for (i, kind) in [(1, "thp"), (2, "nothp")] {
                if let Some(v) = cols
                    .get(i)
                    .and_then(|c| c.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                {
                    out.add(format!("selftest_{dir}_{sz}_{kind}_gbps"), v);
                }
            }
        }
    }
    bail!("no '{end}' in the console: the benchmark did not finish")
}

/// Figures where lower is better (latencies, times).
fn lower_is_better(name: &str) -> bool {
    name.ends_with("_us") || name.ends_with("_s")
}

fn unit(name: &str) -> &'static str {
    if name.ends_with("_gbps") {
        "GB/s"
    } else if name.ends_with("_us") {
        "us"
    } else if name.ends_with("_s") {
        "s"
    } else {
        ""
    }
}

/// One row of the table: (figure, test_hmm, hmmgpu, hmmgpu / test_hmm).
type Row = (String, Option<f64>, Option<f64>, Option<f64>);

fn rows(base: &Figures, ours: &Figures) -> Vec<Row> {
    let mut names: Vec<&str> = base.values.iter().map(|(n, _)| n.as_str()).collect();
    for (n, _) in &ours.values {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    names
        .into_iter()
        .map(|n| {
            let (b, o) = (base.get(n), ours.get(n));
            let ratio = match (b, o) {
                (Some(b), Some(o)) if b > 0.0 => Some(o / b),
                _ => None,
            };
            (n.to_string(), b, o, ratio)
        })
        .collect()
}

fn git(args: &[&str]) -> Option<String> {
    let o = std::process::Command::new("git")
        .args(args)
        .current_dir(build::repo_root())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

pub fn run(args: &BenchArgs) -> Result<i32> {
    crate::cli::check_memory(args.vm.memory)?;
    let accel = vm::resolve_accel(args.vm.accel, args.vm.arch)?;
    let art = build::artifacts(&build::Wants {
        arch: args.vm.arch,
        flavour: args.vm.flavour,
        device: true,
        driver: true,
        kernel_dir: args.vm.kernel_dir.as_deref(),
        no_setup: args.vm.no_setup,
    })?;
    let run_dir = vm::RunDir::create()?;
    let initramfs = art.initramfs(&run_dir.path, &[])?;
    let cfg = VmConfig {
        arch: args.vm.arch,
        qemu: art.qemu.clone(),
        kernel_image: art.kernel.image(),
        initramfs,
        device_bin: art.device.clone(),
        gpus: args.gpus,
        vram_size: 1 << 30,
        memory: args.vm.memory,
        cpus: args.vm.cpus,
        accel,
        timeout: Duration::from_secs(args.timeout),
        cmd: vec!["sh".into(), "-c".into(), script()],
        noload: false,
        echo: Echo::Prefixed("  bench| ".into()),
        run_dir: run_dir.path.clone(),
        extra: Default::default(),
    };
    let out = vm::run(&cfg)?;
    match &out.result {
        VmResult::Exited(0) => {}
        VmResult::Exited(n) => bail!("the benchmark script failed in the guest (status {n})"),
        VmResult::Failed(e, m) => bail!("the VM failed: {e}: {m}"),
    }
    let base = parse(&out.console, "test_hmm")?;
    let ours = parse(&out.console, "hmmgpu")?;
    let rows = rows(&base, &ours);

    let accel_name = if accel == Accel::Kvm { "KVM" } else { "TCG" };
    let flavour = args.vm.flavour.as_str();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    println!();
    println!(
        "hmmgpu vs test_hmm.ko, one boot ({accel_name}, {} vCPUs, {} GPU(s), {flavour} kernel)",
        args.vm.cpus, args.gpus
    );
    println!(
        "{:<28} {:>5} {:>11} {:>11} {:>15}",
        "figure", "unit", "test_hmm", "hmmgpu", "hmmgpu/test_hmm"
    );
    for (name, b, o, ratio) in &rows {
        let verdict = match ratio {
            Some(r) if (*r >= 1.0) != lower_is_better(name) => "better",
            Some(_) => "worse",
            None => "",
        };
        println!(
            "{name:<28} {:>5} {:>11} {:>11} {:>14}x {verdict}",
            unit(name),
            fmt(*b),
            fmt(*o),
            ratio.map_or("-".to_string(), |r| format!("{r:.2}")),
        );
    }
    println!(
        "(GB/s: higher is better; us and s: lower is better; 'better'/'worse' is hmmgpu's side)"
    );
    for (d, f) in [("test_hmm.ko", &base), ("hmmgpu", &ours)] {
        println!(
            "hmm-tests (timed run) on {d}: {}",
            f.hmm_tests_totals
                .as_deref()
                .unwrap_or("no Totals line seen")
        );
    }

    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let json = serde_json::json!({
        "unix_time": unix_time,
        "git_head": git(&["rev-parse", "HEAD"]),
        // Uncommitted changes: the figures are not those of git_head alone.
        "git_dirty": git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
        "accel": accel_name,
        "cpus": args.vm.cpus,
        "gpus": args.gpus,
        "memory": args.vm.memory,
        "flavour": flavour,
        "hmm_tests_totals": {
            "test_hmm": base.hmm_tests_totals,
            "hmmgpu": ours.hmm_tests_totals,
        },
        "results": rows.iter().map(|(name, b, o, ratio)| serde_json::json!({
            "figure": name,
            "unit": unit(name),
            "higher_is_better": !lower_is_better(name),
            "test_hmm": b,
            "hmmgpu": o,
            // hmmgpu / test_hmm, as measured (above 1 is better only for GB/s).
            "ratio": ratio,
        })).collect::<Vec<_>>(),
    });
    let path = match &args.json {
        Some(p) => p.clone(),
        None => build::target_dir().join(format!("xtask/bench/{unix_time}.json")),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    log(format!("results written to {}", path.display()));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_figures_and_selftest_table() {
        let console: Vec<String> = [
            "HMMGPU-BENCH-BEGIN hmmgpu",
            "BENCH migrate_to_dev_4K_gbps 0.5",
            "BENCH cpu_fault_p50_us 12.5",
            "=== Half THP Size (1.0 MB) ===",
            "S->D Throughput      | 9.99 GB/s      | 9.99 GB/s      | 0%",
            "=== Single THP Size (2.0 MB) ===",
            "S->D Throughput      | 0.74 GB/s      | 0.40 GB/s      | 85.0%",
            "D->S Throughput      | 2.19 GB/s      | 0.86 GB/s      | 154.0%",
            "=== Single THP Size (2.0 MB) ===",
            "S->D Throughput      | 0.10 GB/s      | 0.40 GB/s      | 85.0%",
            "=== Single THP Size (2.0 MB) ===",
            "S->D Throughput      | 0.80 GB/s      | 0.40 GB/s      | 85.0%",
            "=== Two THP Size (4.0 MB) ===",
            "D->S Throughput      | 9.99 GB/s      | 9.99 GB/s      | 0%",
            "BENCH hmm_tests_wall_s 20.5",
            "HMMGPU-BENCH-HMM-TESTS # Totals: pass:78 fail:0 xfail:0 xpass:0 skip:0 error:0",
            "HMMGPU-BENCH-END hmmgpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = parse(&console, "hmmgpu").unwrap();
        assert_eq!(f.get("migrate_to_dev_4K_gbps"), Some(0.5));
        assert_eq!(f.get("selftest_s2d_2M_thp_gbps"), Some(0.74));
        assert_eq!(f.get("selftest_d2s_2M_nothp_gbps"), Some(0.86));
        assert_eq!(f.get("hmm_tests_wall_s"), Some(20.5));
        assert_eq!(f.values[0].0, "migrate_to_dev_4K_gbps", "guest order kept");
        assert!(f.hmm_tests_totals.as_deref().unwrap().contains("pass:78"));
        assert!(parse(&console[..3], "hmmgpu").is_err());

        let mut base = Figures::default();
        base.add("cpu_fault_p50_us".into(), 25.0);
        let r = rows(&base, &f);
        assert_eq!(
            r[0],
            ("cpu_fault_p50_us".into(), Some(25.0), Some(12.5), Some(0.5))
        );
        assert!(r
            .iter()
            .any(|(n, b, _, ratio)| n == "migrate_to_dev_4K_gbps"
                && b.is_none()
                && ratio.is_none()));
        assert!(lower_is_better("cpu_fault_p50_us") && !lower_is_better("migrate_to_dev_4K_gbps"));
    }
}
