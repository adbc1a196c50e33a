//! `cargo xtask bench`: the same workloads on the kernel's test_hmm.ko and on
//! hmmgpu, in one VM boot, with the ratios hmmgpu / test_hmm. Every figure is
//! measured in that boot; nothing is compared across boots.

use crate::build::{self, log};
use crate::cli::BenchArgs;
use crate::vm::{self, Echo, VmConfig, VmResult};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;

const DRIVERS: [&str; 2] = ["test_hmm", "hmmgpu"];

/// The guest script: per driver, hmmgpu-bench, hmm-tests' own THP benchmark,
/// and a timed full hmm-tests run, each delimited for the host.
fn script() -> String {
    let mut s = String::from("rmmod hmmgpu || exit 90\n");
    for d in DRIVERS {
        let load = if d == "test_hmm" { "/lib/modules/test_hmm.ko" } else { "/lib/modules/hmmgpu.ko" };
        s += &format!(
            r#"insmod {load} || exit 91
echo "HMMGPU-BENCH-BEGIN {d}"
hmmgpu-bench || exit 92
echo "HMMGPU-BENCH-THP {d}"
hmm-tests -r hmm.hmm_device_private.benchmark_thp_migration
t0=$(cut -d' ' -f1 /proc/uptime)
hmm-tests >/dev/null 2>&1
t1=$(cut -d' ' -f1 /proc/uptime)
echo "BENCH hmm_tests_wall_s $(awk "BEGIN {{print $t1 - $t0}}")"
echo "HMMGPU-BENCH-END {d}"
rmmod {d} || exit 93
"#
        );
    }
    s + "exit 0\n"
}

/// `BENCH name value` lines and hmm-tests' THP table for one driver.
fn parse(console: &[String], driver: &str) -> Result<BTreeMap<String, f64>> {
    let begin = format!("HMMGPU-BENCH-BEGIN {driver}");
    let end = format!("HMMGPU-BENCH-END {driver}");
    let start = console
        .iter()
        .position(|l| l.trim() == begin)
        .with_context(|| format!("no '{begin}' in the console"))?;
    let mut out = BTreeMap::new();
    let mut size = None;
    for l in &console[start + 1..] {
        let l = l.trim();
        if l == end {
            return Ok(out);
        }
        if let Some(rest) = l.strip_prefix("BENCH ") {
            if let Some((k, v)) = rest.split_once(' ') {
                if let Ok(v) = v.trim().parse() {
                    out.insert(k.to_string(), v);
                }
            }
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
                if let Some(v) = cols.get(i).and_then(|c| c.trim().split_whitespace().next()).and_then(|v| v.parse().ok()) {
                    out.insert(format!("selftest_{dir}_{sz}_{kind}_gbps"), v);
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

pub fn run(args: &BenchArgs) -> Result<i32> {
    crate::cli::check_memory(args.vm.memory)?;
    let accel = vm::resolve_accel(args.vm.accel)?;
    let art = build::artifacts(&build::Wants {
        flavour: args.vm.flavour,
        device: true,
        driver: true,
    })?;
    let run_dir = vm::RunDir::create()?;
    let modules: Vec<_> = art.driver.iter().cloned().collect();
    let initramfs = build::initramfs(
        &art.kernel,
        &run_dir.path.join("initramfs.cpio.gz"),
        &modules,
        &art.programs,
        &[],
    )?;
    let cfg = VmConfig {
        qemu: art.qemu.clone(),
        kernel_image: art.kernel.image(),
        initramfs,
        device_bin: art.device.clone(),
        // Two GPUs so the full hmm-tests run covers the same cases as on test_hmm.
        gpus: 2,
        vram_size: 1 << 30,
        memory: args.vm.memory,
        cpus: args.vm.cpus,
        accel,
        timeout: Duration::from_secs(args.timeout),
        cmd: vec!["sh".into(), "-c".into(), script()],
        noload: false,
        echo: Echo::Prefixed("  bench| ".into()),
        run_dir: run_dir.path.clone(),
    };
    let out = vm::run(&cfg)?;
    match &out.result {
        VmResult::Exited(0) => {}
        VmResult::Exited(n) => bail!("the benchmark script failed in the guest (status {n})"),
        VmResult::Failed(e, m) => bail!("the VM failed: {e}: {m}"),
    }
    let base = parse(&out.console, "test_hmm")?;
    let ours = parse(&out.console, "hmmgpu")?;

    let accel_name = format!("{accel:?}").to_uppercase();
    println!();
    println!("hmmgpu vs test_hmm.ko, one boot ({accel_name}, {} vCPUs, {:?} kernel)", args.vm.cpus, args.vm.flavour);
    println!("{:<34} {:>12} {:>12} {:>10}", "figure", "test_hmm", "hmmgpu", "ratio");
    let mut rows = Vec::new();
    for (name, b) in &base {
        let Some(o) = ours.get(name) else { continue };
        // Ratio > 1 means hmmgpu is better, whichever way the figure goes.
        let ratio = if lower_is_better(name) { b / o } else { o / b };
        println!("{name:<34} {b:>12.3} {o:>12.3} {ratio:>9.2}x");
        rows.push(serde_json::json!({"figure": name, "test_hmm": b, "hmmgpu": o, "ratio": ratio}));
    }
    println!("(ratio: hmmgpu better than test_hmm when > 1; GB/s higher is better, us and s lower is better)");
    let json = serde_json::json!({
        "accel": accel_name,
        "cpus": args.vm.cpus,
        "flavour": format!("{:?}", args.vm.flavour),
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "git_head": std::process::Command::new("git").args(["rev-parse", "HEAD"]).current_dir(build::repo_root()).output().ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
        "results": rows,
    });
    let path = match &args.json {
        Some(p) => p.clone(),
        None => build::target_dir().join(format!("xtask/bench/{}.json", json["unix_time"])),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    log(format!("results written to {}", path.display()));
    Ok(0)
}
