//! `cargo xtask bench`: the same workloads on the kernel's test_hmm.ko and on
//! hmmgpu, in one VM boot, with the ratios hmmgpu / test_hmm. Every figure is
//! measured in that boot; nothing is compared across boots. Not a test: it
//! judges nothing, it prints a table and writes JSON (docs/running.md).
//! `--compare` and `--from` read saved runs without a VM.

mod host;
mod report;

use crate::build::{self, log};
use crate::cli::BenchArgs;
use crate::vm::{self, Accel, Echo, VmConfig, VmExtra, VmResult};
use anyhow::{bail, Context, Result};
use host::PhaseCost;
use report::DRIVERS;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// Runs of hmm-tests' benchmark_thp_migration per driver; each figure is the
/// median of the runs (the case itself prints the mean of 5 iterations, which
/// one TCG hiccup skews).
const SELFTEST_RUNS: usize = 3;
/// The largest migration size.
const MAX_SIZE: u64 = 256 << 20;
/// Seconds each concurrency workload runs, and how many times (the figure
/// is the median).
const CONC_SECONDS: u32 = 1;
const CONC_ROUNDS: u32 = 3;
/// The guest script's last line.
const DONE: &str = "HMMGPU-BENCH-DONE";
/// Phases that moved less than this get no CPU-per-GiB figure (the
/// clock-tick resolution of /proc/PID/stat would dominate it).
const MIN_COST_BYTES: f64 = (64u64 << 20) as f64;

/// The migration sizes hmmgpu-bench measures up to `max` (its `sizes` mode).
fn sizes(max: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut s = 4u64 << 10;
    while s <= max.min(MAX_SIZE) {
        v.push(s);
        if s == 1 << 20 && 2 * s <= max {
            v.push(2 * s);
        }
        s *= 4;
    }
    v
}

/// One driver's figures, in the order the guest printed them, each with its
/// samples (several only for hmm-tests' own benchmark).
#[derive(Debug, Default)]
struct Figures {
    values: Vec<(String, Vec<f64>)>,
    /// hmm-tests' `# Totals:` line of the timed full run.
    hmm_tests_totals: Option<String>,
    /// Its `not ok` lines.
    hmm_tests_failed: Vec<String>,
    /// The module's parameters (/sys/module/NAME/parameters).
    params: serde_json::Map<String, Value>,
    /// Per phase, the bytes the guest programs said they migrated.
    moved: Vec<(String, f64)>,
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

    fn moved(&self, phase: &str) -> Option<f64> {
        self.moved.iter().find(|(p, _)| p == phase).map(|(_, b)| *b)
    }

    /// Scaling (conc_S_Np_x: N processes' throughput over one process's)
    /// and host CPU per GiB of each phase.
    fn derive(&mut self, driver: &str, costs: &[PhaseCost]) {
        let conc: Vec<(String, f64)> = self
            .values
            .iter()
            .filter(|(n, _)| n.starts_with("conc_") && !n.ends_with("_1p_gbps"))
            .filter_map(|(n, _)| Some((n.clone(), self.get(n)?)))
            .collect();
        for (name, v) in conc {
            let Some(stem) = name.strip_suffix("_gbps") else {
                continue;
            };
            let size = stem.split('_').nth(1).unwrap_or_default();
            if let Some(one) = self
                .get(&format!("conc_{size}_1p_gbps"))
                .filter(|v| *v > 0.0)
            {
                self.add(format!("{stem}_x"), v / one);
            }
        }
        for c in costs.iter().filter(|c| c.driver == driver) {
            let Some(bytes) = self.moved(&c.phase).filter(|b| *b >= MIN_COST_BYTES) else {
                continue;
            };
            let gib = bytes / (1u64 << 30) as f64;
            let phase = c.phase.replace('-', "_");
            if let Some(q) = c.qemu_cpu_s {
                let host = q + c.backend_cpu_s.unwrap_or(0.0);
                self.add(format!("hostcpu_{phase}_ms_per_gib"), host * 1e3 / gib);
            }
            // test_hmm has no backend: its (idle) backends' time is in `phases`.
            if driver == "hmmgpu" {
                if let Some(b) = c.backend_cpu_s {
                    self.add(format!("backend_cpu_{phase}_ms_per_gib"), b * 1e3 / gib);
                }
            }
        }
    }
}

/// The guest's output, per driver: `BENCH name value` lines, bytes moved,
/// module parameters and hmm-tests' THP table and totals, each attributed
/// to the driver of the phase it was printed in.
fn parse(console: &[String]) -> Result<Vec<Figures>> {
    let mut out: Vec<Figures> = DRIVERS.iter().map(|_| Figures::default()).collect();
    let mut current: Option<(usize, String)> = None;
    let mut size = None;
    for l in console {
        let l = l.trim();
        if l == DONE {
            for (d, f) in DRIVERS.iter().zip(&out) {
                if f.values.is_empty() {
                    bail!("the guest printed no figures for {d}");
                }
            }
            return Ok(out);
        }
        if let Some((driver, phase, begin)) = host::parse_mark(l) {
            let i = DRIVERS
                .iter()
                .position(|d| *d == driver)
                .with_context(|| format!("a phase mark for an unknown driver: {l}"))?;
            current = begin.then_some((i, phase));
            size = None;
            continue;
        }
        if let Some(p) = l.strip_prefix("HMMGPU-BENCH-PARAM ") {
            if let Some((d, kv)) = p.split_once(' ') {
                if let (Some(i), Some((k, v))) =
                    (DRIVERS.iter().position(|x| *x == d), kv.split_once('='))
                {
                    out[i].params.insert(k.to_string(), v.into());
                }
            }
            continue;
        }
        let Some((i, phase)) = &current else {
            continue;
        };
        let f = &mut out[*i];
        if let Some(rest) = l.strip_prefix("BENCH ") {
            if let Some((k, v)) = rest.split_once(' ') {
                if let Ok(v) = v.trim().parse() {
                    f.add(k.to_string(), v);
                }
            }
        } else if let Some(n) = l.strip_prefix("BENCH-MOVED ") {
            if let Ok(n) = n.trim().parse::<f64>() {
                match f.moved.iter_mut().find(|(p, _)| p == phase) {
                    Some(e) => e.1 += n,
                    None => f.moved.push((phase.clone(), n)),
                }
            }
        } else if let Some(t) = l.strip_prefix("HMMGPU-BENCH-HMM-TESTS-FAILED ") {
            f.hmm_tests_failed.push(t.trim().to_string());
        } else if let Some(t) = l.strip_prefix("HMMGPU-BENCH-HMM-TESTS ") {
            f.hmm_tests_totals = Some(t.trim().to_string());
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
                    f.add(format!("selftest_{dir}_{sz}_{kind}_gbps"), v);
                }
            }
        }
    }
    bail!("no '{DONE}' in the console: the benchmark did not finish")
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

fn loadavg() -> Option<Vec<f64>> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace()
        .take(3)
        .map(|v| v.parse().ok())
        .collect()
}

fn host_description() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": cpuinfo.lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim())),
        "loadavg_before": loadavg(),
    })
}

/// `HMMGPU-BENCH-GUEST kernel=... cpus=...`.
fn guest_facts(console: &[String]) -> (Option<String>, Option<u64>) {
    let Some(l) = console
        .iter()
        .find_map(|l| l.trim().strip_prefix("HMMGPU-BENCH-GUEST "))
    else {
        return (None, None);
    };
    let field = |k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    (
        field("kernel").map(String::from),
        field("cpus").and_then(|c| c.parse().ok()),
    )
}

fn write_svg(r: &Value, path: &std::path::Path) -> Result<()> {
    std::fs::write(path, report::plot(r)?)
        .with_context(|| format!("writing {}", path.display()))?;
    log(format!("plot written to {}", path.display()));
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<i32> {
    if let Some(ab) = &args.compare {
        let (a, b) = (report::load(&ab[0])?, report::load(&ab[1])?);
        print!(
            "{}",
            report::compare(
                &a,
                &b,
                &ab[0].display().to_string(),
                &ab[1].display().to_string()
            )
        );
        if let Some(p) = &args.plot {
            write_svg(&b, p)?;
        }
        return Ok(0);
    }
    if let Some(from) = &args.from {
        let r = report::load(from)?;
        print!("{}", report::table(&r));
        if let Some(p) = &args.plot {
            write_svg(&r, p)?;
        }
        return Ok(0);
    }
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
    // The private half of the VRAM bounds the sizes; twice it is the
    // oversubscribed working set.
    let private_vram = args.vram / 2;
    let size_list = sizes(private_vram);
    let mut host = host_description();
    log("measuring host memcpy bandwidth");
    let memcpy = host::memcpy_gbps(&size_list);

    let run_dir = vm::RunDir::create()?;
    let initramfs = art.initramfs(&run_dir.path, &[])?;
    let marks = Rc::new(RefCell::new(host::MarkLog::default()));
    let mut extra = VmExtra {
        console_hook: Some(host::mark_hook(Rc::clone(&marks), args.gpus)),
        ..Default::default()
    };
    let traced = args
        .trace
        .as_ref()
        .map(|_| crate::trace::arm(&mut extra, &run_dir.path, args.gpus));
    let cfg = VmConfig {
        arch: args.vm.arch,
        qemu: art.qemu.clone(),
        kernel_image: art.kernel.image(),
        initramfs,
        device_bin: art.device.clone(),
        gpus: args.gpus,
        vram_size: args.vram,
        memory: args.vm.memory,
        cpus: args.vm.cpus,
        accel,
        timeout: Duration::from_secs(args.timeout),
        cmd: [
            "bench-run".to_string(),
            private_vram.min(MAX_SIZE).to_string(),
            (2 * private_vram).to_string(),
            CONC_SECONDS.to_string(),
            CONC_ROUNDS.to_string(),
            args.gpus.to_string(),
            SELFTEST_RUNS.to_string(),
        ]
        .to_vec(),
        noload: false,
        echo: Echo::Prefixed("  bench| ".into()),
        run_dir: run_dir.path.clone(),
        extra,
    };
    let out = vm::run(&cfg)?;
    if let (Some(dest), Some(armed)) = (&args.trace, &traced) {
        crate::trace::write(dest, armed, &out, "cargo xtask bench")?;
    }
    host["loadavg_after"] = json!(loadavg());
    match &out.result {
        VmResult::Exited(0) => {}
        VmResult::Exited(n) => bail!("the benchmark script failed in the guest (status {n})"),
        VmResult::Failed(e, m) => bail!("the VM failed: {e}: {m}"),
    }
    let marks = marks.borrow();
    let costs = host::phase_costs(&marks.marks);
    let mut figs = parse(&out.console)?;
    for (d, f) in DRIVERS.iter().zip(&mut figs) {
        f.derive(d, &costs);
    }
    let (base, ours) = (&figs[0], &figs[1]);
    let rows = rows(base, ours);
    let (guest_kernel, guest_cpus) = guest_facts(&out.console);

    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let report = json!({
        "schema_version": report::SCHEMA_VERSION,
        "unix_time": unix_time,
        "run": {
            "git_head": git(&["rev-parse", "HEAD"]),
            "git_describe": git(&["describe", "--always", "--dirty"]),
            // Uncommitted changes: the figures are not those of git_head alone.
            "git_dirty": git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
            "arch": args.vm.arch.as_str(),
            "accel": if accel == Accel::Kvm { "KVM" } else { "TCG" },
            "cpus": args.vm.cpus,
            "gpus": args.gpus,
            "memory": args.vm.memory,
            "vram": args.vram,
            "flavour": args.vm.flavour.as_str(),
            // hmmgpu-device --trace: the device timeline was recorded.
            "device_trace": args.trace.is_some(),
            "guest_kernel": guest_kernel,
            "guest_cpus": guest_cpus,
            // The kernel tree (images/build-kernel.sh's are named by their
            // input hash; --kernel-dir's is the user's).
            "kernel_build": art.kernel.build.to_string_lossy(),
            "module_params": {
                "test_hmm": base.params,
                "hmmgpu": ours.params,
            },
            "backend_argv": marks.backend_argv,
            "workloads": {
                "sizes": size_list.iter().map(|s| report::size_label(*s)).collect::<Vec<_>>(),
                "oversub_bytes": 2 * private_vram,
                "conc_seconds": CONC_SECONDS,
                "conc_rounds": CONC_ROUNDS,
                "selftest_runs": SELFTEST_RUNS,
            },
            "host": host,
            "boot": out.timings.to_string(),
        },
        "host_memcpy": memcpy.iter().map(|(size, gbps)| json!({
            "size": report::size_label(*size), "bytes": size, "gbps": gbps,
        })).collect::<Vec<_>>(),
        "hmm_tests_totals": {
            "test_hmm": base.hmm_tests_totals,
            "hmmgpu": ours.hmm_tests_totals,
        },
        "hmm_tests_failed": {
            "test_hmm": base.hmm_tests_failed,
            "hmmgpu": ours.hmm_tests_failed,
        },
        "results": rows.iter().map(|(name, b, o, ratio)| json!({
            "figure": name,
            "unit": report::unit(name),
            "higher_is_better": !report::lower_is_better(name),
            "test_hmm": b,
            "hmmgpu": o,
            // hmmgpu / test_hmm, as measured (above 1 is better only where
            // higher_is_better).
            "ratio": ratio,
        })).collect::<Vec<_>>(),
        "phases": costs.iter().map(|c| {
            let f = &figs[if c.driver == "test_hmm" { 0 } else { 1 }];
            json!({
                "driver": c.driver,
                "phase": c.phase,
                "wall_s": c.wall_s,
                "guest_bytes": f.moved(&c.phase),
                "qemu_cpu_s": c.qemu_cpu_s,
                "backend_cpu_s": c.backend_cpu_s,
                // Seconds their threads waited for a host CPU.
                "qemu_wait_s": c.qemu_wait_s,
                "backend_wait_s": c.backend_wait_s,
                "engine_bytes": c.engine_bytes(),
                "backend_counters": c.counters,
            })
        }).collect::<Vec<_>>(),
    });
    println!();
    print!("{}", report::table(&report));
    let path = match &args.json {
        Some(p) => p.clone(),
        None => build::target_dir().join(format!("xtask/bench/{unix_time}.json")),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    log(format!("results written to {}", path.display()));
    if let Some(p) = &args.plot {
        write_svg(&report, p)?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_figures_and_selftest_table() {
        let console = lines(&[
            "HMMGPU-BENCH-GUEST kernel=7.3.4 cpus=2",
            "HMMGPU-BENCH-PARAM hmmgpu poll_us=20",
            "BENCH outside_any_phase 1",
            "HMMGPU-BENCH-MARK test_hmm sizes begin",
            "BENCH migrate_to_dev_4K_gbps 1.5",
            "HMMGPU-BENCH-MARK test_hmm sizes end",
            "HMMGPU-BENCH-MARK hmmgpu sizes begin",
            "BENCH migrate_to_dev_4K_gbps 0.5",
            "BENCH-MOVED 1000",
            "BENCH-MOVED 24",
            "HMMGPU-BENCH-MARK hmmgpu sizes end",
            "HMMGPU-BENCH-MARK hmmgpu latency begin",
            "BENCH cpu_fault_p50_us 12.5",
            "BENCH-MOVED 8192",
            "HMMGPU-BENCH-MARK hmmgpu latency end",
            "HMMGPU-BENCH-MARK hmmgpu selftest-thp begin",
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
            "HMMGPU-BENCH-MARK hmmgpu selftest-thp end",
            "HMMGPU-BENCH-MARK hmmgpu hmm-tests begin",
            "BENCH hmm_tests_wall_s 20.5",
            "HMMGPU-BENCH-HMM-TESTS # Totals: pass:77 fail:1 xfail:0 xpass:0 skip:0 error:0",
            "HMMGPU-BENCH-HMM-TESTS-FAILED not ok 9 hmm.hmm_device_private.anon_write_child",
            "HMMGPU-BENCH-MARK hmmgpu hmm-tests end",
            "HMMGPU-BENCH-DONE",
        ]);
        let figs = parse(&console).unwrap();
        let (t, f) = (&figs[0], &figs[1]);
        assert_eq!(t.get("migrate_to_dev_4K_gbps"), Some(1.5));
        assert_eq!(t.values.len(), 1);
        assert_eq!(f.get("migrate_to_dev_4K_gbps"), Some(0.5));
        assert_eq!(f.get("outside_any_phase"), None);
        assert_eq!(f.get("selftest_s2d_2M_thp_gbps"), Some(0.74));
        assert_eq!(f.get("selftest_d2s_2M_nothp_gbps"), Some(0.86));
        assert_eq!(f.get("hmm_tests_wall_s"), Some(20.5));
        assert_eq!(f.values[0].0, "migrate_to_dev_4K_gbps", "guest order kept");
        assert!(f.hmm_tests_totals.as_deref().unwrap().contains("pass:77"));
        assert_eq!(
            f.hmm_tests_failed,
            ["not ok 9 hmm.hmm_device_private.anon_write_child"]
        );
        assert!(t.hmm_tests_totals.is_none());
        assert_eq!(f.moved("sizes"), Some(1024.0));
        assert_eq!(f.moved("latency"), Some(8192.0));
        assert_eq!(t.moved("sizes"), None);
        assert_eq!(f.params["poll_us"], "20");
        assert!(t.params.is_empty());
        let unfinished = format!("{:#}", parse(&console[..10]).unwrap_err());
        assert!(unfinished.contains("did not finish"), "{unfinished}");
        let one_sided = lines(&[
            "HMMGPU-BENCH-MARK hmmgpu sizes begin",
            "BENCH migrate_to_dev_4K_gbps 0.5",
            "HMMGPU-BENCH-DONE",
        ]);
        let err = format!("{:#}", parse(&one_sided).unwrap_err());
        assert!(err.contains("no figures for test_hmm"), "{err}");
        assert!(parse(&lines(&["HMMGPU-BENCH-MARK nouveau sizes begin"])).is_err());

        let mut base = Figures::default();
        base.add("cpu_fault_p50_us".into(), 25.0);
        let r = rows(&base, f);
        assert_eq!(
            r[0],
            ("cpu_fault_p50_us".into(), Some(25.0), Some(12.5), Some(0.5))
        );
        assert!(r
            .iter()
            .any(|(n, b, _, ratio)| n == "migrate_to_dev_4K_gbps"
                && b.is_none()
                && ratio.is_none()));
    }

    #[test]
    fn derives_scaling_and_cost_per_gib() {
        let mut f = Figures::default();
        for (n, v) in [
            ("conc_16M_1p_gbps", 0.5),
            ("conc_16M_2p_gbps", 0.8),
            ("conc_16M_2gpu_gbps", 1.0),
            ("conc_64K_4p_gbps", 0.3),
        ] {
            f.add(n.into(), v);
        }
        f.moved = vec![
            ("sizes".into(), 2.0 * (1u64 << 30) as f64),
            ("latency".into(), 8192.0),
        ];
        let cost = |phase: &str, driver: &str| PhaseCost {
            driver: driver.into(),
            phase: phase.into(),
            wall_s: 9.0,
            qemu_cpu_s: Some(3.0),
            backend_cpu_s: Some(1.0),
            qemu_wait_s: None,
            backend_wait_s: None,
            counters: Default::default(),
        };
        let costs = [
            cost("sizes", "hmmgpu"),
            cost("latency", "hmmgpu"),
            cost("sizes", "test_hmm"),
        ];
        let mut t = Figures {
            moved: f.moved.clone(),
            ..Default::default()
        };
        f.derive("hmmgpu", &costs);
        assert_eq!(f.get("conc_16M_2p_x"), Some(1.6));
        assert_eq!(f.get("conc_16M_2gpu_x"), Some(2.0));
        assert_eq!(
            f.get("conc_64K_4p_x"),
            None,
            "no one-process figure to scale by"
        );
        assert_eq!(f.get("hostcpu_sizes_ms_per_gib"), Some(2000.0));
        assert_eq!(f.get("backend_cpu_sizes_ms_per_gib"), Some(500.0));
        assert_eq!(f.get("hostcpu_latency_ms_per_gib"), None, "too few bytes");
        t.derive("test_hmm", &costs);
        assert_eq!(t.get("hostcpu_sizes_ms_per_gib"), Some(2000.0));
        assert_eq!(t.get("backend_cpu_sizes_ms_per_gib"), None);
    }

    #[test]
    fn size_list_matches_the_guest_program() {
        let labels = |max| {
            sizes(max)
                .into_iter()
                .map(report::size_label)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            labels(512 << 20),
            ["4K", "16K", "64K", "256K", "1M", "2M", "4M", "16M", "64M", "256M"]
        );
        assert_eq!(labels(1 << 20), ["4K", "16K", "64K", "256K", "1M"]);
        assert_eq!(labels(2 << 20), ["4K", "16K", "64K", "256K", "1M", "2M"]);
    }

    #[test]
    fn guest_facts_line() {
        let c = lines(&["x", "HMMGPU-BENCH-GUEST kernel=7.3.4-hmmgpu cpus=2"]);
        assert_eq!(guest_facts(&c), (Some("7.3.4-hmmgpu".into()), Some(2)));
        assert_eq!(guest_facts(&lines(&["x"])), (None, None));
    }
}
