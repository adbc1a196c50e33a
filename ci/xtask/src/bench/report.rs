//! A benchmark run's JSON report: its figures' units and directions, the
//! table printed from it, `--compare` of two reports and `--plot`'s SVG.
//! Everything here reads the JSON, so a saved run prints and plots the same
//! as a fresh one.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// The report format's version: 2 added `schema_version`, `run`,
/// `host_memcpy` and `phases`; version 1 (no field) had the figures only.
pub const SCHEMA_VERSION: u64 = 2;

/// The two drivers every figure has a column for.
pub const DRIVERS: [&str; 2] = ["test_hmm", "hmmgpu"];

/// The unit of a figure, from its name's suffix.
pub fn unit(name: &str) -> &'static str {
    if name.ends_with("_gbps") {
        "GB/s"
    } else if name.ends_with("_us") {
        "us"
    } else if name.ends_with("_ms_per_gib") {
        "ms/GiB"
    } else if name.ends_with("_s") {
        "s"
    } else if name.ends_with("_pct") {
        "%"
    } else if name.ends_with("_x") {
        "x"
    } else {
        ""
    }
}

/// Figures where lower is better: latencies, times, CPU per GiB, counts of
/// failures.
pub fn lower_is_better(name: &str) -> bool {
    matches!(unit(name), "us" | "s" | "ms/GiB") || name.ends_with("_count")
}

/// `a` better than `b` for figure `name`.
fn better(name: &str, ratio: f64) -> &'static str {
    if (ratio >= 1.0) != lower_is_better(name) {
        "better"
    } else {
        "worse"
    }
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v != 0.0 && v.abs() < 0.01 => format!("{v:.5}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// Reads a report, checking it is one.
pub fn load(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if !v["results"].is_array() {
        bail!(
            "{} is not a `cargo xtask bench` report (no \"results\" array)",
            path.display()
        );
    }
    match v["schema_version"].as_u64() {
        None | Some(1..=SCHEMA_VERSION) => Ok(v),
        Some(n) => bail!(
            "{}: report schema version {n}, this xtask knows up to {SCHEMA_VERSION}",
            path.display()
        ),
    }
}

/// The run description: `run` (version 2) or the top level (version 1).
fn run_field<'a>(r: &'a Value, key: &str) -> &'a Value {
    if r["run"].is_object() {
        &r["run"][key]
    } else {
        &r[key]
    }
}

/// One line saying what the run was.
pub fn describe(r: &Value) -> String {
    let s = |k: &str| {
        let v = run_field(r, k);
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    let head = s("git_head");
    let mut d = format!(
        "git {}{}, {} {} vCPUs, {} GPU(s), {} kernel",
        head.get(..12).unwrap_or(&head),
        if run_field(r, "git_dirty") == &Value::Bool(true) {
            " (dirty)"
        } else {
            ""
        },
        s("accel"),
        s("cpus"),
        s("gpus"),
        s("flavour"),
    );
    if let Some(k) = run_field(r, "guest_kernel").as_str() {
        let _ = write!(d, " {k}");
    }
    if let Some(v) = run_field(r, "vram").as_u64() {
        let _ = write!(d, ", VRAM {} MiB/GPU", v >> 20);
    }
    if run_field(r, "device_trace") == &Value::Bool(true) {
        d.push_str(", device timeline recorded (--trace)");
    }
    let load = |k: &str| {
        run_field(r, "host")[k]
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_f64)
    };
    if let (Some(a), Some(b)) = (load("loadavg_before"), load("loadavg_after")) {
        let _ = write!(d, ", host load {a:.2} -> {b:.2}");
    }
    d
}

/// The figures of a report: (name, test_hmm, hmmgpu).
fn figures(r: &Value) -> Vec<(String, Option<f64>, Option<f64>)> {
    r["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some((
                f["figure"].as_str()?.to_string(),
                f["test_hmm"].as_f64(),
                f["hmmgpu"].as_f64(),
            ))
        })
        .collect()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    }
}

/// Host CPU figures: in the per-phase table, not the main one.
fn is_cost_figure(name: &str) -> bool {
    name.starts_with("hostcpu_") || name.starts_with("backend_cpu_")
}

/// The table of a report, as `cargo xtask bench` prints it.
pub fn table(r: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "hmmgpu vs test_hmm.ko, one boot ({})", describe(r));
    let _ = writeln!(
        o,
        "{:<30} {:>6} {:>11} {:>11} {:>15}",
        "figure", "unit", "test_hmm", "hmmgpu", "hmmgpu/test_hmm"
    );
    let figs = figures(r);
    for (name, b, h) in figs.iter().filter(|(n, _, _)| !is_cost_figure(n)) {
        let q = ratio(*b, *h);
        let _ = writeln!(
            o,
            "{name:<30} {:>6} {:>11} {:>11} {:>14}x {}",
            unit(name),
            fmt(*b),
            fmt(*h),
            q.map_or("-".to_string(), |q| format!("{q:.2}")),
            q.map_or("", |q| better(name, q)),
        );
    }
    let _ = writeln!(
        o,
        "(GB/s, %, x: higher is better; us, s, ms/GiB, counts: lower is better; 'better'/'worse' is hmmgpu's side)"
    );
    o += &scaling(&figs);
    if let Some(m) = r["host_memcpy"].as_array() {
        let list: Vec<String> = m
            .iter()
            .filter_map(|e| {
                Some(format!(
                    "{} {:.2}",
                    e["size"].as_str()?,
                    e["gbps"].as_f64()?
                ))
            })
            .collect();
        let _ = writeln!(
            o,
            "host memcpy, one thread (the copy engine's limit), GB/s: {}",
            list.join(", ")
        );
    }
    o += &costs(r);
    for d in DRIVERS {
        let _ = writeln!(
            o,
            "hmm-tests (timed run) on {d}: {}",
            r["hmm_tests_totals"][d]
                .as_str()
                .unwrap_or("no Totals line seen")
        );
        for f in r["hmm_tests_failed"][d].as_array().into_iter().flatten() {
            let _ = writeln!(o, "    {}", f.as_str().unwrap_or("?"));
        }
    }
    o
}

/// "N processes give X× one process", per driver and size.
fn scaling(figs: &[(String, Option<f64>, Option<f64>)]) -> String {
    let get = |n: &str| figs.iter().find(|(f, _, _)| f == n);
    let mut o = String::new();
    for size in ["64K", "16M"] {
        for (col, d) in DRIVERS.iter().enumerate() {
            let mut parts = Vec::new();
            for (k, what) in [
                ("2p", "2 processes"),
                ("4p", "4 processes"),
                ("2gpu", "one process per GPU on 2 GPUs"),
            ] {
                if let Some((_, b, h)) = get(&format!("conc_{size}_{k}_x")) {
                    if let Some(x) = if col == 0 { b } else { h } {
                        let verb = if k == "2gpu" { "gives" } else { "give" };
                        parts.push(format!("{what} {verb} {x:.2}x one process"));
                    }
                }
            }
            if !parts.is_empty() {
                let _ = writeln!(o, "scaling, {size} migrations, {d}: {}", parts.join("; "));
            }
        }
    }
    o
}

/// Host CPU per phase (QEMU: the vCPUs and device emulation; backends: the
/// GPUs' processes).
fn costs(r: &Value) -> String {
    let Some(phases) = r["phases"].as_array().filter(|p| !p.is_empty()) else {
        return String::new();
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "host CPU per phase: {:<15} {:<9} {:>7} {:>8} {:>9} {:>9} {:>12} {:>14} {:>11}",
        "phase",
        "driver",
        "wall s",
        "GiB",
        "QEMU s",
        "backend s",
        "host ms/GiB",
        "backend ms/GiB",
        "CPU wait s"
    );
    for p in phases {
        let f = |k: &str| p[k].as_f64();
        let gib = f("guest_bytes").map(|b| b / (1u64 << 30) as f64);
        let per = |cpu: Option<f64>| match (cpu, gib) {
            (Some(c), Some(g)) if g > 0.0 => format!("{:.0}", c * 1e3 / g),
            _ => "-".into(),
        };
        let host = match (f("qemu_cpu_s"), f("backend_cpu_s")) {
            (Some(q), b) => Some(q + b.unwrap_or(0.0)),
            _ => None,
        };
        let wait = match (f("qemu_wait_s"), f("backend_wait_s")) {
            (Some(q), b) => format!("{:.2}", q + b.unwrap_or(0.0)),
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "                    {:<15} {:<9} {:>7.2} {:>8} {:>9} {:>9} {:>12} {:>14} {:>11}",
            p["phase"].as_str().unwrap_or("?"),
            p["driver"].as_str().unwrap_or("?"),
            f("wall_s").unwrap_or(f64::NAN),
            gib.map_or("-".into(), |g| format!("{g:.3}")),
            f("qemu_cpu_s").map_or("-".into(), |v| format!("{v:.2}")),
            f("backend_cpu_s").map_or("-".into(), |v| format!("{v:.2}")),
            per(host),
            per(f("backend_cpu_s")),
            wait,
        );
    }
    o
}

/// `--compare A B`: per figure, hmmgpu's A, B and B/A, and test_hmm's B/A
/// (the baseline's own change: how much of hmmgpu's is the machine's).
pub fn compare(a: &Value, b: &Value, a_name: &str, b_name: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "A: {a_name}\n   {}", describe(a));
    let _ = writeln!(o, "B: {b_name}\n   {}", describe(b));
    for key in [
        "accel",
        "cpus",
        "flavour",
        "arch",
        "guest_kernel",
        "vram",
        "module_params",
        "device_trace",
    ] {
        let (x, y) = (run_field(a, key), run_field(b, key));
        if x != y && !x.is_null() && !y.is_null() {
            let _ = writeln!(o, "note: {key} differs: A {x}, B {y}");
        }
    }
    let _ = writeln!(
        o,
        "{:<36} {:>6} {:>11} {:>11} {:>7} {:<6} {:>13}",
        "figure", "unit", "hmmgpu A", "hmmgpu B", "B/A", "", "test_hmm B/A"
    );
    let (fa, fb) = (figures(a), figures(b));
    let mut names: Vec<&str> = fb.iter().map(|(n, _, _)| n.as_str()).collect();
    for (n, _, _) in &fa {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    let find = |f: &[(String, Option<f64>, Option<f64>)], n: &str| {
        f.iter()
            .find(|(m, _, _)| m == n)
            .map_or((None, None), |(_, t, h)| (*t, *h))
    };
    let mut row = |name: &str, ha: Option<f64>, hb: Option<f64>, tq: Option<f64>| {
        let q = ratio(ha, hb);
        let _ = writeln!(
            o,
            "{name:<36} {:>6} {:>11} {:>11} {:>7} {:<6} {:>13}",
            unit(name),
            fmt(ha),
            fmt(hb),
            q.map_or("-".to_string(), |q| format!("{q:.2}x")),
            q.map_or("", |q| better(name, q)),
            tq.map_or("-".to_string(), |q| format!("{q:.2}x")),
        );
    };
    for n in names {
        let ((ta, ha), (tb, hb)) = (find(&fa, n), find(&fb, n));
        row(n, ha, hb, ratio(ta, tb));
    }
    let memcpy = |r: &Value, size: &str| {
        r["host_memcpy"]
            .as_array()?
            .iter()
            .find(|e| e["size"] == size)?["gbps"]
            .as_f64()
    };
    for e in b["host_memcpy"].as_array().into_iter().flatten() {
        if let Some(size) = e["size"].as_str() {
            row(
                &format!("host_memcpy_{size}_gbps"),
                memcpy(a, size),
                memcpy(b, size),
                None,
            );
        }
    }
    let _ = writeln!(
        o,
        "(B/A: B's value over A's; 'better'/'worse' is B's side; test_hmm B/A is the same figure's change on the baseline in the same two boots)"
    );
    o
}

/// One line of the plot.
struct Series {
    label: String,
    colour: &'static str,
    dashed: bool,
    /// (bytes, GB/s)
    points: Vec<(f64, f64)>,
}

/// Throughput against migration size for both drivers and host memcpy, as
/// an SVG: log-log axes, one line per driver and direction.
pub fn plot(r: &Value) -> Result<String> {
    let mut series: Vec<Series> = Vec::new();
    for (dir, colour, what) in [
        ("dev", "#1f77b4", "to device"),
        ("sys", "#d62728", "to system"),
    ] {
        for (col, d) in DRIVERS.iter().enumerate() {
            let mut pts: Vec<(f64, f64)> = figures(r)
                .iter()
                .filter_map(|(n, t, h)| {
                    let size = n
                        .strip_prefix(&format!("migrate_to_{dir}_"))?
                        .strip_suffix("_gbps")?;
                    let bytes = crate::cli::parse_size(size).ok()? as f64;
                    let v = if col == 0 { *t } else { *h }?;
                    (v > 0.0).then_some((bytes, v))
                })
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if !pts.is_empty() {
                series.push(Series {
                    label: format!("{d} {what}"),
                    colour,
                    dashed: col == 0,
                    points: pts,
                });
            }
        }
    }
    let memcpy: Vec<(f64, f64)> = r["host_memcpy"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["bytes"].as_f64()?, e["gbps"].as_f64()?)))
        .filter(|(_, g)| *g > 0.0)
        .collect();
    if !memcpy.is_empty() {
        series.push(Series {
            label: "host memcpy (limit)".into(),
            colour: "#7f7f7f",
            dashed: false,
            points: memcpy,
        });
    }
    if series.is_empty() {
        bail!("the report has no migrate_to_{{dev,sys}}_<size>_gbps figures to plot");
    }
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (xmin, xmax) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (lx0, lx1) = (xmin.log2(), xmax.log2().max(xmin.log2() + 1.0));
    let (ly0, ly1) = (
        ymin.log10().floor(),
        ymax.log10().ceil().max(ymin.log10().floor() + 1.0),
    );
    let (w, h, left, right, top, bottom) = (820.0, 520.0, 70.0, 230.0, 55.0, 60.0);
    let px = |x: f64| left + (x.log2() - lx0) / (lx1 - lx0) * (w - left - right);
    let py = |y: f64| h - bottom - (y.log10() - ly0) / (ly1 - ly0) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">Migration throughput against size, hmmgpu and test_hmm.ko in one boot</text>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="38" font-size="10">{}</text>"#,
        xml(&describe(r))
    );
    // Decades of GB/s, and each measured size.
    let mut d = ly0;
    while d <= ly1 + 1e-9 {
        let y = py(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            10f64.powf(d)
        );
        d += 1.0;
    }
    let mut sizes: Vec<f64> = all().map(|p| p.0).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    for x in sizes {
        let xp = px(x);
        let _ = writeln!(
            s,
            r##"<line x1="{xp:.1}" y1="{top}" x2="{xp:.1}" y2="{:.1}" stroke="#eee"/><text x="{xp:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            h - bottom,
            h - bottom + 16.0,
            size_label(bytes_of(x))
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{:.1}" height="{:.1}" fill="none" stroke="#333"/>"##,
        w - left - right,
        h - top - bottom
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">migration size (bytes, log scale)</text>"#,
        left + (w - left - right) / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">GB/s (log scale)</text>"#,
        top + (h - top - bottom) / 2.0
    );
    for (
        i,
        Series {
            label,
            colour,
            dashed,
            points: pts,
        },
    ) in series.iter().enumerate()
    {
        let dash = if *dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for &(x, y) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{label}: {} {y:.3} GB/s</title></circle>"#,
                px(x),
                py(y),
                size_label(bytes_of(x))
            );
        }
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx = w - right + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 30.0,
            lx + 36.0,
            ly + 4.0,
            xml(label)
        );
    }
    s += "</svg>\n";
    Ok(s)
}

fn xml(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// 4096 -> "4K", 2097152 -> "2M".
pub fn size_label(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// A plot's x value (a size in bytes, as f64) back as bytes; negative or
/// NaN is 0.
#[allow(clippy::cast_sign_loss)] // clamped to >= 0 first
fn bytes_of(x: f64) -> u64 {
    x.max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(scale: f64, head: &str) -> Value {
        json!({
            "schema_version": SCHEMA_VERSION,
            "run": {"git_head": head, "git_dirty": false, "accel": "TCG", "cpus": 2, "gpus": 2,
                    "flavour": "release", "vram": 1u64 << 30,
                    "host": {"loadavg_before": [1.5, 1.0, 0.5], "loadavg_after": [2.0, 1.0, 0.5]}},
            "host_memcpy": [{"size": "4K", "bytes": 4096, "gbps": 20.0},
                            {"size": "1M", "bytes": 1048576, "gbps": 10.0}],
            "results": [
                {"figure": "migrate_to_dev_4K_gbps", "test_hmm": 1.0, "hmmgpu": 0.04 * scale},
                {"figure": "migrate_to_dev_1M_gbps", "test_hmm": 1.0, "hmmgpu": 0.9 * scale},
                {"figure": "migrate_to_sys_1M_gbps", "test_hmm": 1.0, "hmmgpu": null},
                {"figure": "cpu_fault_p50_us", "test_hmm": 10.0, "hmmgpu": 200.0 / scale},
                {"figure": "conc_16M_2p_x", "test_hmm": 1.2, "hmmgpu": 1.5},
                {"figure": "hostcpu_sizes_ms_per_gib", "test_hmm": 900.0, "hmmgpu": 1200.0},
            ],
            "phases": [{"driver": "hmmgpu", "phase": "sizes", "wall_s": 2.0, "guest_bytes": 2147483648.0,
                        "qemu_cpu_s": 3.0, "backend_cpu_s": 1.0, "qemu_wait_s": 0.5, "backend_wait_s": 0.25}],
            "hmm_tests_totals": {"test_hmm": "# Totals: pass:39", "hmmgpu": "# Totals: pass:77 fail:1"},
            "hmm_tests_failed": {"hmmgpu": ["not ok 3 hmm.hmm_device_private.open_close"]},
        })
    }

    #[test]
    fn units_and_directions() {
        for (n, u, low) in [
            ("migrate_to_dev_4K_gbps", "GB/s", false),
            ("cpu_fault_p99_us", "us", true),
            ("hmm_tests_wall_s", "s", true),
            ("hostcpu_sizes_ms_per_gib", "ms/GiB", true),
            ("oversub_resident_pct", "%", false),
            ("conc_64K_4p_x", "x", false),
            ("oversub_step_errors_count", "", true),
        ] {
            assert_eq!((unit(n), lower_is_better(n)), (u, low), "{n}");
        }
        assert_eq!(better("cpu_fault_p50_us", 0.5), "better");
        assert_eq!(better("migrate_to_dev_4K_gbps", 0.5), "worse");
    }

    #[test]
    fn table_has_every_figure_and_the_scaling_statement() {
        let t = table(&report(1.0, "0123456789abcdef"));
        assert!(t.contains("git 0123456789ab, TCG 2 vCPUs"), "{t}");
        assert!(t.contains("host load 1.50 -> 2.00"), "{t}");
        let row = t
            .lines()
            .find(|l| l.starts_with("cpu_fault_p50_us"))
            .unwrap();
        assert!(row.contains("20.00x worse"), "{row}");
        let row = t
            .lines()
            .find(|l| l.starts_with("migrate_to_sys_1M_gbps"))
            .unwrap();
        assert!(row.contains(" - ") && !row.contains("better"), "{row}");
        assert!(
            t.contains("scaling, 16M migrations, hmmgpu: 2 processes give 1.50x one process"),
            "{t}"
        );
        assert!(
            !t.lines().any(|l| l.starts_with("hostcpu_")),
            "per-GiB rows go to the phase table"
        );
        assert!(t.contains(
            "host memcpy, one thread (the copy engine's limit), GB/s: 4K 20.00, 1M 10.00"
        ));
        let phase = t.lines().find(|l| l.contains(" sizes ")).unwrap();
        // (3 + 1) s over 2 GiB; backend 1 s over 2 GiB.
        assert!(
            phase.contains(" 2000 ") && phase.contains(" 500 "),
            "{phase}"
        );
        assert!(
            phase.trim_end().ends_with(" 0.75"),
            "run-queue wait: {phase}"
        );
        assert!(t.contains(
            "hmm-tests (timed run) on hmmgpu: # Totals: pass:77 fail:1\n    not ok 3 hmm.hmm_device_private.open_close\n"
        ), "{t}");
        let mut no_totals = report(1.0, "x");
        no_totals["hmm_tests_totals"]["hmmgpu"] = Value::Null;
        assert!(table(&no_totals).contains("hmm-tests (timed run) on hmmgpu: no Totals line seen"));
    }

    #[test]
    fn compare_gives_b_over_a() {
        let (a, b) = (report(1.0, "aaaa"), report(2.0, "bbbb"));
        let c = compare(&a, &b, "A.json", "B.json");
        let row = c
            .lines()
            .find(|l| l.starts_with("migrate_to_dev_1M_gbps"))
            .unwrap();
        assert!(
            row.contains("0.900") && row.contains("1.800") && row.contains("2.00x better"),
            "{row}"
        );
        assert!(
            row.trim_end().ends_with("1.00x"),
            "test_hmm unchanged: {row}"
        );
        let row = c
            .lines()
            .find(|l| l.starts_with("cpu_fault_p50_us"))
            .unwrap();
        assert!(row.contains("0.50x better"), "{row}");
        assert!(c
            .lines()
            .any(|l| l.starts_with("host_memcpy_4K_gbps") && l.contains("1.00x")));
        // A version 1 report (figures only, run fields at the top level).
        let v1 = json!({"git_head": "old", "accel": "TCG", "cpus": 1, "flavour": "release",
                        "results": [{"figure": "migrate_to_dev_1M_gbps", "test_hmm": 1.0, "hmmgpu": 0.45}]});
        let c = compare(&v1, &b, "v1.json", "B.json");
        assert!(c.contains("note: cpus differs: A 1, B 2"), "{c}");
        let row = c
            .lines()
            .find(|l| l.starts_with("migrate_to_dev_1M_gbps"))
            .unwrap();
        assert!(row.contains("4.00x better"), "{row}");
    }

    #[test]
    fn load_rejects_what_is_not_a_report() {
        let dir = std::env::temp_dir().join(format!("hmmgpu-bench-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.json");
        std::fs::write(&p, "{\"a\": 1}").unwrap();
        assert!(format!("{:#}", load(&p).unwrap_err()).contains("no \"results\" array"));
        std::fs::write(&p, "not json").unwrap();
        load(&p).unwrap_err();
        std::fs::write(&p, json!({"schema_version": 99, "results": []}).to_string()).unwrap();
        assert!(format!("{:#}", load(&p).unwrap_err()).contains("schema version 99"));
        std::fs::write(&p, report(1.0, "x").to_string()).unwrap();
        load(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plot_draws_each_series() {
        let svg = plot(&report(1.0, "x")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // test_hmm and hmmgpu to device, test_hmm to system, host memcpy.
        assert_eq!(svg.matches("<polyline").count(), 4, "{svg}");
        assert!(svg.contains("hmmgpu to device") && svg.contains("host memcpy (limit)"));
        assert!(svg.contains(">4K<") && svg.contains(">1M<"));
        plot(&json!({"results": []})).unwrap_err();
        assert_eq!(size_label(2 << 20), "2M");
        assert_eq!(size_label(256 << 10), "256K");
    }
}
