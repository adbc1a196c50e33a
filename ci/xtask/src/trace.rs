//! The device timeline of a VM run (`cargo xtask run --trace FILE`, `test
//! --trace DIR`, `bench --trace FILE`): each backend records its own trace
//! (`hmmgpu-device --trace`, device/src/trace.rs); after the run they are
//! merged into one Chrome trace-event JSON file, one process per GPU, with
//! the guest's markers (HMMGPU-INIT, HMMGPU-READY, HMMGPU-EXIT-STATUS), its
//! console lines and QEMU's launch and exit on a "guest" process.
//!
//! One clock for everything: the backends read CLOCK_MONOTONIC; here the
//! console's host timestamps are `Instant`s, which on Linux are that same
//! clock, mapped to nanoseconds through one reading of both.
//!
//! [`validate`] is a strict checker of the Trace Event Format written from
//! its specification (the JSON Object Format, the phases and their
//! required fields, nesting of complete and duration events on a thread,
//! matching of async begin and end events).

use crate::build::log;
use crate::vm::{VmExtra, VmOutcome};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The merged file's process for the guest (GPU N is [`gpu_pid`]`(N)`).
const GUEST_PID: u64 = 1;

/// The merged file's process for GPU `gpu`.
fn gpu_pid(gpu: u32) -> u64 {
    10 + u64::from(gpu)
}

/// CLOCK_MONOTONIC now, in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `t`, a valid timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    // CLOCK_MONOTONIC is never negative.
    t.tv_sec.cast_unsigned() * 1_000_000_000 + t.tv_nsec.cast_unsigned()
}

/// `at` on CLOCK_MONOTONIC, in nanoseconds. (`Instant` is CLOCK_MONOTONIC
/// on Linux; the offset between the two readings is a few tens of ns.)
pub fn instant_ns(at: Instant) -> u64 {
    let (now, now_ns) = (Instant::now(), monotonic_ns());
    match now.checked_duration_since(at) {
        Some(ago) => now_ns.saturating_sub(ago.as_nanos() as u64),
        None => now_ns + at.duration_since(now).as_nanos() as u64,
    }
}

fn micros(ns: u64) -> Value {
    json!(ns as f64 / 1000.0)
}

/// A run's per-GPU trace files, in its run directory.
pub struct Armed {
    files: Vec<PathBuf>,
}

/// Adds `--trace` to each backend's arguments (GPU `n` writes
/// `run_dir/gpuN.trace.json`).
pub fn arm(extra: &mut VmExtra, run_dir: &Path, gpus: u32) -> Armed {
    let mut files = Vec::new();
    for gpu in 0..gpus as usize {
        let file = run_dir.join(format!("gpu{gpu}.trace.json"));
        if extra.backend_args.len() <= gpu {
            extra.backend_args.resize(gpu + 1, Vec::new());
        }
        extra.backend_args[gpu].extend(["--trace".to_string(), file.display().to_string()]);
        files.push(file);
    }
    Armed { files }
}

/// The file of boot `n` (from 1) of `test` under `dir`: TEST.json, then
/// TEST.boot2.json...
pub fn boot_file(dir: &Path, test: &str, n: u32) -> PathBuf {
    if n <= 1 {
        dir.join(format!("{test}.json"))
    } else {
        dir.join(format!("{test}.boot{n}.json"))
    }
}

/// One backend's trace, read back.
struct GpuTrace {
    events: Vec<Value>,
    metadata: Value,
    /// The file ended early (the backend was killed): the events up to
    /// there were recovered line by line.
    truncated: bool,
}

/// Reads a backend's trace; a file cut short keeps the events before the
/// cut (each is on its own line).
fn read_gpu_trace(path: &Path) -> Result<GpuTrace> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        let events = v["traceEvents"]
            .as_array()
            .with_context(|| format!("{}: no traceEvents array", path.display()))?
            .clone();
        return Ok(GpuTrace {
            events,
            metadata: v["metadata"].clone(),
            truncated: false,
        });
    }
    let mut events = Vec::new();
    for line in text.lines().skip(1) {
        let line = line.strip_prefix(',').unwrap_or(line);
        match serde_json::from_str::<Value>(line) {
            Ok(e) if e.is_object() => events.push(e),
            _ => break,
        }
    }
    ensure!(
        !events.is_empty(),
        "{} holds no trace events (not a backend trace?)",
        path.display()
    );
    Ok(GpuTrace {
        events,
        metadata: Value::Null,
        truncated: true,
    })
}

/// What a merged trace holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Per GPU: COPY's bytes by counter name (`bytes_guest_to_vram`...).
    pub copy_bytes: Vec<BTreeMap<String, u64>>,
    /// Per GPU: records the backend dropped (ring full), if it said.
    pub dropped: Vec<Option<u64>>,
    /// Command events per GPU.
    pub commands: Vec<u64>,
}

/// The bytes of every COPY command event per counter name, for the GPU
/// whose events are `events`.
pub fn copy_bytes<'a>(events: impl Iterator<Item = &'a Value>) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    for e in events.filter(|e| e["ph"] == "X" && e["name"] == "COPY") {
        if let Some(args) = e["args"].as_object() {
            for (k, v) in args {
                if k.starts_with("bytes_") {
                    *sums.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
                }
            }
        }
    }
    sums
}

/// Merges the backends' traces of a run into `dest`, with the guest's
/// markers; returns what it holds.
pub fn write(dest: &Path, armed: &Armed, out: &VmOutcome, what: &str) -> Result<Summary> {
    let mut events = vec![
        json!({"ph": "M", "pid": GUEST_PID, "tid": 0, "name": "process_name",
               "args": {"name": format!("guest ({what})")}}),
        json!({"ph": "M", "pid": GUEST_PID, "tid": 0, "name": "process_sort_index",
               "args": {"sort_index": 0}}),
        json!({"ph": "M", "pid": GUEST_PID, "tid": 1, "name": "thread_name",
               "args": {"name": "markers (host clock)"}}),
        json!({"ph": "M", "pid": GUEST_PID, "tid": 2, "name": "thread_name",
               "args": {"name": "console (host clock)"}}),
    ];
    let launch = instant_ns(out.launched);
    let mut marker = |name: &str, at: u64, args: Value| {
        events.push(json!({"ph": "i", "s": "p", "pid": GUEST_PID, "tid": 1,
                           "ts": micros(at), "name": name, "cat": "guest", "args": args}));
    };
    marker("QEMU launched", launch, json!({}));
    let t = &out.timings;
    for (name, at) in [
        ("HMMGPU-INIT (init started)", t.init),
        ("HMMGPU-READY (driver loaded)", t.ready),
        ("HMMGPU-EXIT-STATUS (command done)", t.exit_marker),
    ] {
        if let Some(d) = at {
            marker(
                name,
                launch + d.as_nanos() as u64,
                json!({"after_launch_s": d.as_secs_f64()}),
            );
        }
    }
    marker(
        "QEMU exited",
        launch + t.total.as_nanos() as u64,
        json!({"result": format!("{:?}", out.result)}),
    );
    // Every console line, when xtask read it: the driver's messages beside
    // the device's commands.
    for (line, at) in out.console.iter().zip(&out.console_times) {
        if line.trim().is_empty() {
            continue;
        }
        let name: String = line.trim().chars().take(80).collect();
        events.push(json!({"ph": "i", "s": "t", "pid": GUEST_PID, "tid": 2,
                           "ts": micros(launch + at.as_nanos() as u64),
                           "name": name, "cat": "console", "args": {"line": line}}));
    }

    let mut summary = Summary::default();
    let mut gpus_meta = Vec::new();
    for (gpu, file) in armed.files.iter().enumerate() {
        let gpu = gpu as u32;
        let trace = match read_gpu_trace(file) {
            Ok(t) => t,
            Err(e) => {
                log(format!("warning: gpu{gpu}'s trace: {e:#}"));
                gpus_meta.push(json!({"gpu": gpu, "error": format!("{e:#}")}));
                summary.copy_bytes.push(BTreeMap::new());
                summary.dropped.push(None);
                summary.commands.push(0);
                continue;
            }
        };
        if trace.truncated {
            log(format!(
                "warning: gpu{gpu}'s trace {} ends early (backend killed?): {} events recovered",
                file.display(),
                trace.events.len()
            ));
        }
        let pid = gpu_pid(gpu);
        let backend_pid = trace.metadata["pid"].as_u64();
        let mut commands = 0;
        for mut e in trace.events {
            e["pid"] = json!(pid);
            if e["ph"] == "M" && e["name"] == "process_name" {
                e["args"]["name"] = json!(match backend_pid {
                    Some(p) => format!("gpu{gpu} (hmmgpu-device pid {p})"),
                    None => format!("gpu{gpu} (hmmgpu-device)"),
                });
            }
            if e["ph"] == "X" && e["tid"] == 1 {
                commands += 1;
            }
            events.push(e);
        }
        events.push(
            json!({"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index",
                           "args": {"sort_index": 1 + gpu}}),
        );
        let dropped = trace.metadata["records_dropped"].as_u64();
        if let Some(n) = dropped.filter(|&n| n > 0) {
            log(format!(
                "warning: gpu{gpu}'s trace dropped {n} records (its ring was full)"
            ));
        }
        summary
            .copy_bytes
            .push(copy_bytes(events.iter().filter(|e| e["pid"] == pid)));
        summary.dropped.push(dropped);
        summary.commands.push(commands);
        gpus_meta.push(json!({
            "gpu": gpu, "pid": pid, "backend_pid": backend_pid,
            "records_written": trace.metadata["records_written"],
            "records_dropped": dropped, "truncated": trace.truncated,
        }));
    }
    let doc = json!({
        "displayTimeUnit": "ns",
        "traceEvents": events,
        "metadata": {
            "clock": "CLOCK_MONOTONIC",
            "clock-domain": "LINUX_CLOCK_MONOTONIC",
            "ts_unit": "microseconds (CLOCK_MONOTONIC / 1000, nanosecond decimals)",
            "clock_note": "the backends read CLOCK_MONOTONIC; the guest's markers are the \
                           host times cargo xtask read the console lines, on the same clock",
            "producer": "cargo xtask",
            "run": what,
            "gpus": gpus_meta,
        },
    });
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(dest, serde_json::to_string(&doc)?)
        .with_context(|| format!("writing {}", dest.display()))?;
    log(format!(
        "device timeline: {} ({} command events; open it in ui.perfetto.dev or chrome://tracing)",
        dest.display(),
        summary.commands.iter().sum::<u64>()
    ));
    Ok(summary)
}

// ---------------------------------------------------------------------------
// A strict validator of the Trace Event Format.
// ---------------------------------------------------------------------------

/// What [`validate`] found in a valid trace.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Events per phase.
    pub phases: BTreeMap<String, usize>,
    /// Processes with events.
    pub pids: usize,
}

/// Every phase the format defines.
const PHASES: &[&str] = &[
    "B", "E", "X", "i", "I", "C", "b", "n", "e", "S", "T", "p", "F", "s", "t", "f", "P", "N", "O",
    "D", "M", "V", "v", "R", "c", "(", ")",
];

/// The metadata event names the format defines, with the argument each needs.
const METADATA: &[(&str, &str)] = &[
    ("process_name", "name"),
    ("process_labels", "labels"),
    ("process_sort_index", "sort_index"),
    ("thread_name", "name"),
    ("thread_sort_index", "sort_index"),
];

/// A complete event: start, end, index.
type Span = (f64, f64, usize);

fn is_int(v: &Value) -> bool {
    v.as_i64().is_some() || v.as_u64().is_some()
}

fn number(e: &Value, key: &str, i: usize) -> Result<f64> {
    let n = e[key]
        .as_f64()
        .with_context(|| format!("event {i}: \"{key}\" is not a number: {e}"))?;
    ensure!(
        n.is_finite() && n >= 0.0,
        "event {i}: \"{key}\" is {n}: {e}"
    );
    Ok(n)
}

/// Checks `doc` against the Trace Event Format: the JSON Object Format (an
/// object with a `traceEvents` array; `displayTimeUnit` "ms" or "ns") or the
/// JSON Array Format; every event an object with a known `ph`, integer
/// `pid` and `tid`, a numeric non-negative `ts` (all but metadata events), a
/// string `name` (all but `E`), an object `args` and a string `cat` where
/// present; complete events with a non-negative `dur`; instant events'
/// scope `g`, `p` or `t`; metadata events of a defined name with their
/// argument; counter events with numeric arguments; duration events
/// balanced and complete events properly nested per thread; async events
/// with a `cat` and an `id`, every end matching an open begin and none left
/// open.
pub fn validate(doc: &Value) -> Result<Counts> {
    let events = match doc {
        Value::Array(a) => a,
        Value::Object(o) => {
            if let Some(unit) = o.get("displayTimeUnit") {
                ensure!(
                    unit == "ms" || unit == "ns",
                    "displayTimeUnit is {unit}, not \"ms\" or \"ns\""
                );
            }
            o.get("traceEvents")
                .and_then(Value::as_array)
                .context("the object has no \"traceEvents\" array")?
        }
        _ => bail!("a trace is an object or an array, not {doc}"),
    };
    let mut counts = Counts::default();
    let mut pids = std::collections::BTreeSet::new();
    let mut open_b: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut complete: HashMap<(u64, u64), Vec<Span>> = HashMap::new();
    let mut open_async: HashMap<(u64, String, String), usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let obj = e
            .as_object()
            .with_context(|| format!("event {i} is not an object: {e}"))?;
        let ph = obj
            .get("ph")
            .and_then(Value::as_str)
            .with_context(|| format!("event {i} has no \"ph\" string: {e}"))?;
        ensure!(PHASES.contains(&ph), "event {i}: unknown phase {ph:?}: {e}");
        *counts.phases.entry(ph.to_string()).or_default() += 1;
        for key in ["pid", "tid"] {
            ensure!(
                obj.get(key).is_some_and(is_int),
                "event {i}: \"{key}\" is not an integer: {e}"
            );
        }
        let pid = e["pid"].as_u64().unwrap_or(0);
        let tid = e["tid"].as_u64().unwrap_or(0);
        pids.insert(pid);
        if ph != "E" {
            ensure!(
                obj.get("name").is_some_and(Value::is_string),
                "event {i}: no \"name\" string: {e}"
            );
        }
        if let Some(cat) = obj.get("cat") {
            ensure!(cat.is_string(), "event {i}: \"cat\" is not a string: {e}");
        }
        if let Some(args) = obj.get("args") {
            ensure!(
                args.is_object(),
                "event {i}: \"args\" is not an object: {e}"
            );
        }
        let ts = if ph == "M" { 0.0 } else { number(e, "ts", i)? };
        match ph {
            "X" => {
                let dur = number(e, "dur", i)?;
                complete
                    .entry((pid, tid))
                    .or_default()
                    .push((ts, ts + dur, i));
            }
            "B" => open_b
                .entry((pid, tid))
                .or_default()
                .push(e["name"].as_str().unwrap_or("").to_string()),
            "E" => {
                ensure!(
                    open_b.entry((pid, tid)).or_default().pop().is_some(),
                    "event {i}: an end (E) with no open begin on pid {pid} tid {tid}"
                );
            }
            "i" | "I" => {
                if let Some(s) = obj.get("s") {
                    ensure!(
                        s == "g" || s == "p" || s == "t",
                        "event {i}: instant scope {s}, not g, p or t"
                    );
                }
            }
            "C" => {
                let args = e["args"]
                    .as_object()
                    .with_context(|| format!("event {i}: a counter without args: {e}"))?;
                ensure!(
                    args.values().all(Value::is_number),
                    "event {i}: counter values must be numbers: {e}"
                );
            }
            "b" | "n" | "e" => {
                let cat = obj
                    .get("cat")
                    .and_then(Value::as_str)
                    .with_context(|| format!("event {i}: an async event without \"cat\": {e}"))?;
                let id = match obj.get("id").or_else(|| obj.get("id2")) {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) if is_int(v) || v.is_object() => v.to_string(),
                    _ => bail!("event {i}: an async event without an \"id\": {e}"),
                };
                let key = (pid, cat.to_string(), id);
                match ph {
                    "b" => *open_async.entry(key).or_default() += 1,
                    "e" => {
                        let open = open_async.entry(key.clone()).or_default();
                        ensure!(
                            *open > 0,
                            "event {i}: async end with no open begin (cat {}, id {}): {e}",
                            key.1,
                            key.2
                        );
                        *open -= 1;
                    }
                    _ => {}
                }
            }
            "M" => {
                let name = e["name"].as_str().unwrap_or("");
                let (_, arg) = METADATA
                    .iter()
                    .find(|(n, _)| *n == name)
                    .with_context(|| format!("event {i}: unknown metadata event {name:?}"))?;
                let value = &e["args"][*arg];
                let ok = match *arg {
                    "sort_index" => is_int(value),
                    _ => value.is_string(),
                };
                ensure!(ok, "event {i}: metadata {name} needs args.{arg}: {e}");
            }
            _ => {}
        }
    }
    for ((pid, tid), open) in &open_b {
        ensure!(
            open.is_empty(),
            "pid {pid} tid {tid}: {} duration events never end ({open:?})",
            open.len()
        );
    }
    for ((pid, cat, id), open) in &open_async {
        ensure!(
            *open == 0,
            "pid {pid}: async slice cat {cat} id {id} is never ended"
        );
    }
    // Complete events on one thread nest: each one is inside, or after,
    // the ones still open when it starts.
    for ((pid, tid), mut spans) in complete {
        spans.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        let mut stack: Vec<Span> = Vec::new();
        for span in spans {
            while stack.last().is_some_and(|top| top.1 <= span.0) {
                stack.pop();
            }
            if let Some(top) = stack.last() {
                ensure!(
                    span.1 <= top.1,
                    "pid {pid} tid {tid}: complete events {} [{}, {}] and {} [{}, {}] overlap without nesting",
                    top.2, top.0, top.1, span.2, span.0, span.1
                );
            }
            stack.push(span);
        }
    }
    counts.pids = pids.len();
    Ok(counts)
}

/// Parses `path` with Python's json module (strict: NaN and Infinity
/// refused), a second, independent JSON parser.
pub fn python_parses(path: &Path) -> Result<()> {
    let script = "import json, sys\n\
                  def bad(c): raise ValueError('not JSON: ' + c)\n\
                  d = json.load(open(sys.argv[1]), parse_constant=bad)\n\
                  print(len(d['traceEvents']))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .context("running python3 (Debian's python3)")?;
    ensure!(
        out.status.success(),
        "python3's json module refused {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Reads and validates a trace file.
pub fn validate_file(path: &Path) -> Result<(Value, Counts)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let counts = validate(&doc).with_context(|| format!("{} is no valid trace", path.display()))?;
    python_parses(path)?;
    Ok((doc, counts))
}

/// The events of process `pid` in a merged trace.
pub fn gpu_events(doc: &Value, gpu: u32) -> impl Iterator<Item = &Value> {
    let pid = gpu_pid(gpu);
    doc["traceEvents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |e| e["pid"] == pid)
}

/// The byte counters a command event may carry (the device's own names).
const BYTE_COUNTERS: [&str; 7] = [
    "bytes_guest_to_vram",
    "bytes_vram_to_guest",
    "bytes_vram_to_vram",
    "bytes_guest_to_guest",
    "bytes_filled",
    "bytes_vread",
    "bytes_vwrite",
];

/// Checks GPU 0's timeline in the merged trace `path` against its
/// backend's final counters `stats`: the file is a valid trace (the strict
/// validator and Python's json), nothing was dropped, its COPY events add
/// up to `bytes_guest_to_vram` and `bytes_vram_to_guest` (both non-zero),
/// all its command events to every byte counter, and every GPU event lies
/// between QEMU's launch and exit as the console saw them (one clock).
pub fn check_against_stats(path: &Path, stats: &crate::vm::BackendStats) -> Result<()> {
    let (doc, counts) = validate_file(path)?;
    log(format!(
        "{}: a valid trace (strict validator, python3 json): {} events, phases {:?}",
        path.display(),
        counts.phases.values().sum::<usize>(),
        counts.phases
    ));
    let gpu0 = &doc["metadata"]["gpus"][0];
    ensure!(
        gpu0["records_dropped"] == 0 && gpu0["truncated"] == false,
        "gpu0's trace lost records ({gpu0}): its sums cannot be checked"
    );
    let copies = copy_bytes(gpu_events(&doc, 0));
    for name in ["bytes_guest_to_vram", "bytes_vram_to_guest"] {
        let (traced, counted) = (copies.get(name).copied().unwrap_or(0), stats.counter(name)?);
        ensure!(
            traced == counted,
            "COPY events add up to {name} {traced}, the backend counted {counted}"
        );
        ensure!(counted > 0, "the demo moved no bytes {name}");
        log(format!(
            "COPY events: {name} {traced} = the backend's {counted}"
        ));
    }
    for name in BYTE_COUNTERS {
        let traced: u64 = gpu_events(&doc, 0)
            .filter(|e| e["ph"] == "X")
            .filter_map(|e| e["args"][name].as_u64())
            .sum();
        let counted = stats.counter(name)?;
        ensure!(
            traced == counted,
            "command events add up to {name} {traced}, the backend counted {counted}"
        );
    }
    let marker = |name: &str| {
        doc["traceEvents"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                e["pid"] == GUEST_PID && e["name"].as_str().is_some_and(|n| n.starts_with(name))
            })
            .and_then(|e| e["ts"].as_f64())
            .with_context(|| format!("the trace has no guest marker {name}"))
    };
    let (launch, ready, exit) = (
        marker("QEMU launched")?,
        marker("HMMGPU-READY")?,
        marker("QEMU exited")?,
    );
    ensure!(
        launch < ready && ready < exit,
        "guest markers out of order: {launch} {ready} {exit}"
    );
    let (mut first, mut last) = (f64::MAX, 0.0f64);
    for e in gpu_events(&doc, 0).filter(|e| e["ph"] != "M") {
        let ts = e["ts"].as_f64().unwrap_or(0.0);
        first = first.min(ts);
        last = last.max(ts + e["dur"].as_f64().unwrap_or(0.0));
    }
    ensure!(
        launch <= first && last <= exit,
        "gpu0's events [{first}, {last}] us are not within QEMU's run [{launch}, {exit}] us: \
         not one clock"
    );
    log(format!(
        "one clock: gpu0's events from {:.3}s to {:.3}s after QEMU's launch, the guest ready at {:.3}s",
        (first - launch) / 1e6,
        (last - launch) / 1e6,
        (ready - launch) / 1e6
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(events: Value) -> Result<Counts> {
        validate(&json!({"displayTimeUnit": "ns", "traceEvents": events}))
    }

    #[test]
    fn the_validator_accepts_the_formats_phases() {
        let c = ok(json!([
            {"ph": "M", "pid": 1, "tid": 0, "name": "process_name", "args": {"name": "p"}},
            {"ph": "X", "pid": 1, "tid": 1, "ts": 1.0, "dur": 10.0, "name": "outer"},
            {"ph": "X", "pid": 1, "tid": 1, "ts": 2.0, "dur": 3.0, "name": "inner"},
            {"ph": "X", "pid": 1, "tid": 1, "ts": 11.0, "dur": 0.0, "name": "after"},
            {"ph": "B", "pid": 1, "tid": 2, "ts": 1.0, "name": "b"},
            {"ph": "E", "pid": 1, "tid": 2, "ts": 2.0},
            {"ph": "i", "s": "t", "pid": 1, "tid": 3, "ts": 1.5, "name": "i"},
            {"ph": "b", "cat": "c", "id": "0x1", "pid": 1, "tid": 3, "ts": 1.0, "name": "a"},
            {"ph": "e", "cat": "c", "id": "0x1", "pid": 1, "tid": 3, "ts": 2.0, "name": "a"},
            {"ph": "C", "pid": 1, "tid": 0, "ts": 2.0, "name": "n", "args": {"v": 3}},
        ]))
        .unwrap();
        assert_eq!(c.phases["X"], 3);
        assert_eq!(c.pids, 1);
        validate(&json!([{"ph": "i", "pid": 0, "tid": 0, "ts": 0, "name": "x"}])).unwrap();
    }

    #[test]
    fn the_validator_refuses_what_the_format_forbids() {
        let bad = [
            json!([{"pid": 1, "tid": 1, "ts": 1, "name": "no ph"}]),
            json!([{"ph": "Q", "pid": 1, "tid": 1, "ts": 1, "name": "bad ph"}]),
            json!([{"ph": "X", "pid": "1", "tid": 1, "ts": 1, "dur": 1, "name": "string pid"}]),
            json!([{"ph": "X", "pid": 1, "tid": 1, "ts": 1, "name": "no dur"}]),
            json!([{"ph": "X", "pid": 1, "tid": 1, "ts": -1, "dur": 1, "name": "negative"}]),
            json!([{"ph": "i", "pid": 1, "tid": 1, "name": "no ts"}]),
            json!([{"ph": "i", "pid": 1, "tid": 1, "ts": 1}]),
            json!([{"ph": "i", "s": "x", "pid": 1, "tid": 1, "ts": 1, "name": "scope"}]),
            json!([{"ph": "i", "pid": 1, "tid": 1, "ts": 1, "name": "n", "args": [1]}]),
            json!([{"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {}}]),
            json!([{"ph": "M", "pid": 1, "tid": 1, "name": "nonsense", "args": {"name": "x"}}]),
            json!([{"ph": "E", "pid": 1, "tid": 1, "ts": 1}]),
            json!([{"ph": "B", "pid": 1, "tid": 1, "ts": 1, "name": "never ends"}]),
            json!([{"ph": "b", "pid": 1, "tid": 1, "ts": 1, "name": "no cat", "id": 1}]),
            json!([{"ph": "b", "cat": "c", "pid": 1, "tid": 1, "ts": 1, "name": "no id"}]),
            json!([{"ph": "b", "cat": "c", "id": 1, "pid": 1, "tid": 1, "ts": 1, "name": "open"}]),
            json!([{"ph": "e", "cat": "c", "id": 1, "pid": 1, "tid": 1, "ts": 1, "name": "x"}]),
            json!([{"ph": "C", "pid": 1, "tid": 1, "ts": 1, "name": "c", "args": {"v": "3"}}]),
            json!([
                {"ph": "X", "pid": 1, "tid": 1, "ts": 1, "dur": 5, "name": "a"},
                {"ph": "X", "pid": 1, "tid": 1, "ts": 3, "dur": 5, "name": "overlaps a"},
            ]),
        ];
        for (n, events) in bad.iter().enumerate() {
            assert!(validate(events).is_err(), "case {n}: {events}");
        }
        validate(&json!({"traceEvents": {}})).unwrap_err();
        validate(&json!({"displayTimeUnit": "s", "traceEvents": []})).unwrap_err();
        validate(&json!(3)).unwrap_err();
    }

    #[test]
    fn a_backend_trace_cut_short_keeps_its_events() {
        let dir = std::env::temp_dir().join(format!("hmmgpu-trace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("gpu0.trace.json");
        std::fs::write(
            &p,
            "{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n\
             {\"ph\":\"M\",\"pid\":5,\"tid\":0,\"name\":\"process_name\",\"args\":{\"name\":\"x\"}}\n\
             ,{\"ph\":\"X\",\"pid\":5,\"tid\":1,\"ts\":1.0,\"dur\":1.0,\"name\":\"COPY\",\"args\":{\"bytes_guest_to_vram\":4096}}\n\
             ,{\"ph\":\"X\",\"pid\":5,\"ti",
        )
        .unwrap();
        let t = read_gpu_trace(&p).unwrap();
        assert!(t.truncated);
        assert_eq!(t.events.len(), 2);
        assert_eq!(copy_bytes(t.events.iter())["bytes_guest_to_vram"], 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn instants_map_onto_clock_monotonic() {
        let a = Instant::now();
        let (later, ns) = (monotonic_ns(), instant_ns(a));
        // `a` was read before `later`: mapped onto CLOCK_MONOTONIC it is
        // earlier, by less than a millisecond (the mapping's own error is
        // a few tens of ns).
        let ahead = i128::from(later) - i128::from(ns);
        assert!((-10_000..1_000_000).contains(&ahead), "{ns} {later}");
        // And one second apart stays one second apart.
        let b = a + std::time::Duration::from_secs(1);
        let apart = i128::from(instant_ns(b)) - i128::from(ns);
        assert!((apart - 1_000_000_000).abs() < 20_000, "{apart}");
    }
}
