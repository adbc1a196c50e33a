//! The host's side of the benchmark: memcpy bandwidth (the physical limit
//! of a copy engine that is host memcpy), and the CPU time and counters of
//! QEMU and the backends at each phase mark the guest prints.

use crate::inject;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Host memcpy bandwidth in GB/s (1e9 bytes per second) for each size: one
/// thread copying between two pre-touched buffers, median of 5 trials of
/// at least 64 MiB each (so a 4K copy runs from cache, a 256M one from RAM).
pub fn memcpy_gbps(sizes: &[u64]) -> Vec<(u64, f64)> {
    const TRIALS: usize = 5;
    const TRIAL_BYTES: u64 = 64 << 20;
    sizes
        .iter()
        .map(|&size| {
            let src = vec![0x5au8; size as usize];
            let mut dst = vec![0u8; size as usize];
            let reps = (TRIAL_BYTES / size).max(1);
            let mut trials: Vec<f64> = (0..TRIALS)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..reps {
                        dst.copy_from_slice(std::hint::black_box(&src));
                        std::hint::black_box(&mut dst);
                    }
                    (reps * size) as f64 / t.elapsed().as_secs_f64() / 1e9
                })
                .collect();
            trials.sort_by(f64::total_cmp);
            (size, trials[TRIALS / 2])
        })
        .collect()
}

/// user + system CPU time of a process (all its threads), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_time_of_stat(&stat)
}

/// Time the process's threads waited on a run queue for a CPU (the sum of
/// /proc/PID/task/*/schedstat's second field): how much the host's other
/// work held it up.
pub fn run_delay(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            s.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum();
    Some(Duration::from_nanos(ns))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    }
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line; the command
/// name (field 2) may hold spaces and parentheses, so count after its last ')'.
fn cpu_time_of_stat(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks()))
}

/// Our child QEMU: the process whose parent is this one and whose command
/// name starts with "qemu-system" (the benchmark runs one VM at a time).
fn child_qemu() -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let comm = &stat[stat.find('(')? + 1..stat.rfind(')')?];
        let ppid = stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?;
        (ppid == me && comm.starts_with("qemu-system")).then_some(pid)
    })
}

/// What the host read at one `HMMGPU-BENCH-MARK driver phase begin|end`.
#[derive(Clone, Debug)]
pub struct Mark {
    pub driver: String,
    pub phase: String,
    pub begin: bool,
    pub at: Instant,
    pub qemu_cpu: Option<Duration>,
    /// Per GPU.
    pub backend_cpu: Vec<Option<Duration>>,
    /// QEMU's and the backends' (together) run-queue wait.
    pub qemu_wait: Option<Duration>,
    pub backend_wait: Option<Duration>,
    /// Per GPU: the control socket's `stats`.
    pub counters: Vec<Option<serde_json::Value>>,
}

const MARK: &str = "HMMGPU-BENCH-MARK ";
/// The host's answer to a mark: go on.
pub const GO: &str = "HMMGPU-BENCH-GO";

/// Parses `... HMMGPU-BENCH-MARK driver phase begin|end`.
pub fn parse_mark(line: &str) -> Option<(String, String, bool)> {
    let rest = &line[line.find(MARK)? + MARK.len()..];
    let mut w = rest.split_whitespace();
    let (driver, phase, edge) = (w.next()?, w.next()?, w.next()?);
    let begin = match edge {
        "begin" => true,
        "end" => false,
        _ => return None,
    };
    Some((driver.to_string(), phase.to_string(), begin))
}

/// The marks read so far, and what was learnt about the backends once.
#[derive(Default)]
pub struct MarkLog {
    pub marks: Vec<Mark>,
    /// Per GPU: the backend's command line (its flags are part of a run's
    /// configuration).
    pub backend_argv: Vec<Vec<String>>,
    qemu_pid: Option<u32>,
    backend_pids: Vec<Option<u32>>,
}

impl MarkLog {
    fn read(
        &mut self,
        run_dir: &Path,
        gpus: u32,
        driver: String,
        phase: String,
        begin: bool,
    ) -> Mark {
        if self.backend_pids.is_empty() {
            self.backend_pids = (0..gpus)
                .map(|g| {
                    std::fs::read_to_string(run_dir.join(format!("gpu{g}.pid")))
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                })
                .collect();
            self.backend_argv = self
                .backend_pids
                .iter()
                .map(|p| {
                    p.and_then(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
                        .map(|b| {
                            b.split(|&c| c == 0)
                                .filter(|a| !a.is_empty())
                                .map(|a| String::from_utf8_lossy(a).into_owned())
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect();
        }
        if self.qemu_pid.is_none() {
            self.qemu_pid = child_qemu();
        }
        let at = Instant::now();
        Mark {
            driver,
            phase,
            begin,
            at,
            qemu_cpu: self.qemu_pid.and_then(cpu_time),
            backend_cpu: self
                .backend_pids
                .iter()
                .map(|p| p.and_then(cpu_time))
                .collect(),
            qemu_wait: self.qemu_pid.and_then(run_delay),
            backend_wait: self
                .backend_pids
                .iter()
                .map(|p| p.and_then(run_delay))
                .sum(),
            counters: (0..gpus)
                .map(|g| {
                    inject::send(run_dir, g, &serde_json::json!({"cmd": "stats"}))
                        .ok()
                        .map(|r| r["stats"].clone())
                })
                .collect(),
        }
    }
}

/// The console hook: at each mark, reads the CPU times and counters, then
/// lets the guest go on.
pub fn mark_hook(log: Rc<RefCell<MarkLog>>, gpus: u32) -> crate::vm::ConsoleHook {
    Box::new(move |run_dir: &Path, line: &str| {
        let (driver, phase, begin) = parse_mark(line)?;
        let mark = log.borrow_mut().read(run_dir, gpus, driver, phase, begin);
        log.borrow_mut().marks.push(mark);
        Some(GO.to_string())
    })
}

/// One phase of one driver, from its two marks.
#[derive(Clone, Debug)]
pub struct PhaseCost {
    pub driver: String,
    pub phase: String,
    pub wall_s: f64,
    pub qemu_cpu_s: Option<f64>,
    /// All backends together.
    pub backend_cpu_s: Option<f64>,
    /// Run-queue wait of QEMU's threads and of the backends' threads.
    pub qemu_wait_s: Option<f64>,
    pub backend_wait_s: Option<f64>,
    /// Each counter's change over the phase, all backends together.
    pub counters: serde_json::Map<String, serde_json::Value>,
}

impl PhaseCost {
    fn merge(&mut self, o: &PhaseCost) {
        let add = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
        self.wall_s += o.wall_s;
        self.qemu_cpu_s = add(self.qemu_cpu_s, o.qemu_cpu_s);
        self.backend_cpu_s = add(self.backend_cpu_s, o.backend_cpu_s);
        self.qemu_wait_s = add(self.qemu_wait_s, o.qemu_wait_s);
        self.backend_wait_s = add(self.backend_wait_s, o.backend_wait_s);
        for (k, v) in &o.counters {
            let sum = self.counters.get(k).and_then(|s| s.as_u64()).unwrap_or(0);
            self.counters
                .insert(k.clone(), (sum + v.as_u64().unwrap_or(0)).into());
        }
    }

    /// Bytes the backends' copy engines moved between guest RAM and VRAM.
    pub fn engine_bytes(&self) -> f64 {
        ["bytes_guest_to_vram", "bytes_vram_to_guest"]
            .iter()
            .filter_map(|k| self.counters.get(*k)?.as_f64())
            .sum()
    }
}

fn delta(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    Some(b?.checked_sub(a?)?.as_secs_f64())
}

/// A thread that exits takes its run-queue wait along: never below 0.
fn wait(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    Some(b?.saturating_sub(a?).as_secs_f64())
}

/// Pairs each begin mark with the end mark of the same driver and phase.
pub fn phase_costs(marks: &[Mark]) -> Vec<PhaseCost> {
    let mut out: Vec<PhaseCost> = Vec::new();
    for (i, b) in marks.iter().enumerate().filter(|(_, m)| m.begin) {
        let Some(e) = marks[i + 1..]
            .iter()
            .find(|m| !m.begin && m.driver == b.driver && m.phase == b.phase)
        else {
            continue;
        };
        let backend_cpu_s = b
            .backend_cpu
            .iter()
            .zip(&e.backend_cpu)
            .map(|(x, y)| delta(*x, *y))
            .sum::<Option<f64>>();
        let mut counters = serde_json::Map::new();
        for (x, y) in b.counters.iter().zip(&e.counters) {
            let (Some(serde_json::Value::Object(x)), Some(serde_json::Value::Object(y))) = (x, y)
            else {
                continue;
            };
            for (k, v) in y {
                if let (Some(v), Some(u)) = (v.as_u64(), x.get(k).and_then(|u| u.as_u64())) {
                    let sum = counters.get(k).and_then(|s| s.as_u64()).unwrap_or(0);
                    counters.insert(k.clone(), (sum + v.saturating_sub(u)).into());
                }
            }
        }
        let cost = PhaseCost {
            driver: b.driver.clone(),
            phase: b.phase.clone(),
            wall_s: e.at.duration_since(b.at).as_secs_f64(),
            qemu_cpu_s: delta(b.qemu_cpu, e.qemu_cpu),
            backend_cpu_s: if b.backend_cpu.is_empty() {
                None
            } else {
                backend_cpu_s
            },
            counters,
            qemu_wait_s: wait(b.qemu_wait, e.qemu_wait),
            backend_wait_s: wait(b.backend_wait, e.backend_wait),
        };
        // A phase run several times (rounds) is one phase: the sums.
        match out
            .iter_mut()
            .find(|c| c.driver == cost.driver && c.phase == cost.phase)
        {
            Some(c) => c.merge(&cost),
            None => out.push(cost),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_time() {
        // A command name with spaces and ')' in it; utime 250, stime 50 ticks.
        let stat = "42 (qemu (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1";
        let t = cpu_time_of_stat(stat).unwrap().as_secs_f64();
        assert!((t - 300.0 / clock_ticks()).abs() < 1e-9, "{t}");
        assert!(cpu_time_of_stat("42 (x) S 1").is_none());
        let me = cpu_time(std::process::id()).expect("our own /proc/self/stat");
        assert!(me < Duration::from_secs(3600));
        assert!(run_delay(std::process::id()).is_some(), "our own schedstat");
        assert!(run_delay(u32::MAX).is_none());
    }

    #[test]
    fn memcpy_measures_something() {
        let r = memcpy_gbps(&[4096, 1 << 20]);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|(_, g)| *g > 0.01 && g.is_finite()), "{r:?}");
    }

    #[test]
    fn marks_pair_into_phases() {
        assert_eq!(
            parse_mark("[ 3.1] HMMGPU-BENCH-MARK hmmgpu conc-16M-2p begin"),
            Some(("hmmgpu".into(), "conc-16M-2p".into(), true))
        );
        assert_eq!(parse_mark("HMMGPU-BENCH-MARK hmmgpu sizes later"), None);
        assert_eq!(parse_mark("HMMGPU-BENCH-GO"), None);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mark = |phase: &str, begin, at: u64, cpu: u64, bytes: u64| Mark {
            driver: "hmmgpu".into(),
            phase: phase.into(),
            begin,
            at: t0 + s(at),
            qemu_cpu: Some(s(10 * cpu)),
            backend_cpu: vec![Some(s(cpu)), Some(s(2 * cpu))],
            qemu_wait: Some(s(at)),
            backend_wait: None,
            counters: vec![
                Some(serde_json::json!({"bytes_guest_to_vram": bytes, "commands_ok": 1})),
                Some(serde_json::json!({"bytes_guest_to_vram": 2 * bytes, "commands_ok": 1})),
            ],
        };
        let p = phase_costs(&[
            mark("a", true, 0, 1, 100),
            mark("b", true, 1, 2, 150),
            mark("b", false, 3, 4, 200),
            mark("a", false, 4, 5, 400),
            mark("c", true, 5, 5, 400),
            // b's second round.
            mark("b", true, 10, 10, 1000),
            mark("b", false, 11, 11, 1100),
        ]);
        assert_eq!(p.len(), 2, "c never ended, b is one phase: {p:?}");
        let a = p.iter().find(|c| c.phase == "a").unwrap();
        assert_eq!(a.wall_s, 4.0);
        assert_eq!(a.qemu_cpu_s, Some(40.0));
        assert_eq!(a.backend_cpu_s, Some(4.0 + 8.0));
        assert_eq!((a.qemu_wait_s, a.backend_wait_s), (Some(4.0), None));
        assert_eq!(a.engine_bytes(), 300.0 + 600.0);
        assert_eq!(a.counters["commands_ok"], 0);
        let b = p.iter().find(|c| c.phase == "b").unwrap();
        assert_eq!(b.wall_s, 2.0 + 1.0);
        assert_eq!(b.backend_cpu_s, Some(2.0 + 4.0 + 1.0 + 2.0));
        assert_eq!(b.engine_bytes(), 150.0 + 300.0);
        assert_eq!(b.counters["commands_ok"], 0);
    }
}
