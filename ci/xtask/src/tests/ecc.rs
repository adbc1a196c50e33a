//! The VRAM ECC error VM test (catalogue entry 3, docs/fault-injection.md
//! "`ecc`"). The guest side is `hmmgpu-faults ecc` (ci/guest/faults/ecc.c):
//! it asks for an ECC error (through the console, see tests/faults.rs) in a
//! free VRAM page, in a device-private page in use, in a device-private THP,
//! in a device-coherent page in use and in the driver's link canary, and
//! checks in the guest that only the corrupt page's owner gets SIGBUS, for
//! that page alone, that every other byte is intact, that the pages are
//! retired (counters, free VRAM) and that filling all of the (small) VRAM
//! afterwards uses every page but them; then rmmod. Here the host checks what the backend
//! injected and what the driver logged, and that the guest is still
//! responsive afterwards.

use super::faults::{
    expect_responsive, faults_boot, guest_counter, inject_hook, injected, then_responsive,
};
use super::recovery::Expected;
use super::{expect_status_with, Ctx};
use crate::build::log;
use crate::vm::{self, VmOutcome};
use anyhow::{ensure, Context, Result};

/// ECC errors `hmmgpu-faults ecc` asks for, one page each.
const ECC_ERRORS: u64 = 5;

/// 8 MiB per half: room for a THP beside the 2 MiB blocks retired pages
/// spoil, and small enough for the guest to fill all of it.
const ECC_VRAM_SIZE: u64 = 16 << 20;

/// Lines the driver logs per case (guest-driver/ecc.rs), each expected once.
const OUTCOMES: &[(&str, usize)] = &[
    ("retired: it was free", 1),
    (
        "retired: its data moved to system memory, the corrupt page poisoned",
        2,
    ),
    (
        "retired: its owners now map a poisoned system page instead",
        1,
    ),
    ("retired: it held the link canary, now at VRAM page", 1),
];

fn count_lines(out: &VmOutcome, what: &str) -> usize {
    out.console.iter().filter(|l| l.contains(what)).count()
}

/// (free KiB, total KiB, retired KiB) from the driver's removal line
/// `hmmgpu0: removed; N pages evicted ..., F of T KiB VRAM free, R KiB retired`.
fn removal_accounting(out: &VmOutcome) -> Result<(u64, u64, u64)> {
    let line = out
        .console
        .iter()
        // Not init's echo of the command that greps for it.
        .find(|l| l.contains("hmmgpu0: removed;") && !l.contains("grep"))
        .context("the driver logged no removal line (rmmod)")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let before = |w: &str| -> Result<u64> {
        let i = words
            .iter()
            .position(|x| x.trim_end_matches(',') == w)
            .with_context(|| format!("no '{w}' in {line:?}"))?;
        let n = i.checked_sub(1).map(|j| words[j]).unwrap_or("");
        n.parse()
            .with_context(|| format!("no number before '{w}' in {line:?}"))
    };
    let free = before("of")?;
    let total = before("KiB")?;
    let retired = words
        .iter()
        .rposition(|w| *w == "retired")
        .and_then(|i| words.get(i.checked_sub(2)?))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no 'N KiB retired' in {line:?}"))?;
    Ok((free, total, retired))
}

pub(super) fn t_ecc(ctx: &mut Ctx) -> Result<()> {
    // The removal line is pr_info, below the console's log level: dmesg.
    // The workload removed the driver: the round after it is the CPU's.
    let seed = super::vram_seed()?;
    let script = format!(
        "hmmgpu-faults ecc && dmesg | grep 'hmmgpu0: removed;'{}",
        then_responsive(seed, None)
    );
    let out = ctx.boot_extra(
        faults_boot("fault-ecc", &["sh", "-c", &script]),
        vm::VmExtra {
            console_hook: Some(inject_hook()),
            vram_size: Some(ECC_VRAM_SIZE),
            ..Default::default()
        },
    )?;
    // ECC errors are handled without any recovery; the script rmmods.
    expect_status_with(&out, 0, &Expected::NONE_UNLOADED)?;
    expect_responsive(&out, seed)?;
    let flips = injected(&out, "ecc_flips")?;
    let posted = injected(&out, "events_posted")?;
    let dropped = injected(&out, "events_dropped")?;
    ensure!(
        flips == ECC_ERRORS && posted == ECC_ERRORS && dropped == 0,
        "the backend flipped {flips} bits and posted {posted} events ({dropped} dropped), want {ECC_ERRORS} each"
    );
    let handled = guest_counter(&out, "driver_ecc_events")?;
    let retired = guest_counter(&out, "driver_retired_pages")?;
    ensure!(
        handled == ECC_ERRORS && retired == ECC_ERRORS,
        "the driver handled {handled} ECC events and retired {retired} pages, want {ECC_ERRORS} each"
    );
    for (what, want) in OUTCOMES {
        let n = count_lines(&out, what);
        ensure!(
            n == *want,
            "the driver logged '{what}' {n} times, want {want}"
        );
    }
    let (free, total, retired_kib) = removal_accounting(&out)?;
    log(format!(
        "fault-ecc: {flips} bits flipped, {handled} ECC events handled, {retired} pages retired; \
         at removal {free} of {total} KiB VRAM free, {retired_kib} KiB retired"
    ));
    ensure!(
        retired_kib == ECC_ERRORS * 4 && free + retired_kib == total,
        "at removal: {free} KiB free + {retired_kib} KiB retired != {total} KiB of VRAM \
         (want {} KiB retired): VRAM leaked",
        ECC_ERRORS * 4
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{VmResult, VramFiles};

    #[test]
    fn removal_line() {
        let out = VmOutcome {
            result: VmResult::Exited(0),
            timings: Default::default(),
            launched: std::time::Instant::now(),
            stats: Vec::new(),
            console: vec![
                "[   9.1] hmmgpu0: removed; 1024 pages evicted to system memory, 1048556 of 1048576 KiB VRAM free, 20 KiB retired".into(),
            ],
            console_times: Vec::new(),
            splats: Vec::new(),
            guest_counters: Vec::new(),
            vram: VramFiles { paths: Vec::new() },
            backend_restarts: 0,
        };
        assert_eq!(removal_accounting(&out).unwrap(), (1048556, 1048576, 20));
    }
}
