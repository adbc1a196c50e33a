//! VM test of an orderly hot-unplug (docs/fault-injection.md, catalogue
//! entry 8): `hmmgpu-faults unplug` (ci/guest/faults/unplug.c) puts data in
//! both kinds of VRAM, asks for `unplug` (QMP device_del, src/hostfault.rs)
//! through the console, checks in the guest that everything was evicted to
//! system RAM and is intact in the process and a forked child, asks for
//! `plug` (device_add) and checks that the device works again. Here the host
//! checks what only it can see: the driver's eviction count, one backend
//! process serving both sessions, the re-plugged device's data in the VRAM
//! file it was given at boot, and a guest that still runs commands.

use super::faults::{expect_responsive, faults_boot, inject_hook, then_responsive};
use super::{expect_status, vram_holds_pattern, vram_seed, Ctx};
use crate::build::log;
use crate::cli::Arch;
use crate::vm::{self, VmOutcome};
use anyhow::{ensure, Context, Result};

/// 4 KiB pages `hmmgpu-faults unplug` has in VRAM at the unplug: P1 (a 2 MiB
/// THP) and P2 (1 MiB) device-private, C (2 MiB) device-coherent; nothing
/// else is (the driver's link canary goes back before the eviction).
const WORKLOAD_VRAM_PAGES: u64 = 512 + 256 + 512;

/// The driver's removal line: "hmmgpuN: removed; N pages evicted to system
/// memory, ..." (guest-driver/gpu.rs); the guest program prints it from
/// dmesg (pr_info does not reach the console).
fn evicted_pages(out: &VmOutcome) -> Result<u64> {
    const KEY: &str = ": removed; ";
    let line = out
        .console
        .iter()
        .find(|l| l.contains("hmmgpu0") && l.contains(KEY))
        .context("the guest printed no 'hmmgpu0: removed; N pages evicted' line")?;
    let rest = &line[line.find(KEY).unwrap() + KEY.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("bad removal line {line:?}"))
}

/// The number after `key` in the guest program's last line containing it.
fn guest_figure(out: &VmOutcome, line_has: &str, key: &str) -> Option<f64> {
    let line = out.console.iter().rev().find(|l| l.contains(line_has))?;
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

pub(super) fn t_hot_unplug(ctx: &mut Ctx) -> Result<()> {
    // On pseries, QEMU's device_del raises an RTAS hotplug event that Linux
    // hands to userspace (rtas_errd and drmgr of powerpc-utils), which the
    // test initramfs does not have: the guest would never release the slot.
    ensure!(
        ctx.arch == Arch::X86_64,
        "hot-unplug is tested on x86_64 (q35, ACPI PCI hotplug) only: on a pseries guest the \
         unplug request needs userspace drmgr (powerpc-utils), which the initramfs lacks"
    );
    let seed = vram_seed()?;
    // The round after it through the coherent device: a device-private one
    // could overwrite the pattern the workload leaves in private VRAM.
    let round_seed = vram_seed()?;
    let script = format!(
        "hmmgpu-faults unplug --vram-seed {seed}{}",
        then_responsive(round_seed, Some("/dev/hmm_dmirror2"))
    );
    let out = ctx.boot_extra(
        faults_boot("fault-hot-unplug", &["sh", "-c", &script]),
        vm::VmExtra {
            console_hook: Some(inject_hook()),
            ..Default::default()
        },
    )?;
    expect_status(&out, 0)?;
    expect_responsive(&out, round_seed)?;
    let evicted = evicted_pages(&out)?;
    ensure!(
        evicted == WORKLOAD_VRAM_PAGES,
        "the driver evicted {evicted} pages at the unplug, want the workload's {WORKLOAD_VRAM_PAGES}"
    );
    let stats = out.stats.first().context("gpu0 reported no stats")?;
    let sessions = stats.counter("sessions")?;
    ensure!(
        sessions == 2,
        "gpu0's backend served {sessions} vhost-user sessions, want 2 (boot, then the re-plug)"
    );
    vram_holds_pattern("fault-hot-unplug", &out, seed)?;
    let gone_ms = guest_figure(&out, "the device was gone", "gone ");
    let back_ms = guest_figure(&out, "are back", "are back ");
    log(format!(
        "fault-hot-unplug: the driver evicted {evicted} pages; the device was gone {} ms after the \
         unplug request and its uAPI back {} ms after device_add; one backend served {sessions} sessions",
        gone_ms.map_or("?".into(), |m| format!("{m:.0}")),
        back_ms.map_or("?".into(), |m| format!("{m:.0}")),
    ));
    Ok(())
}
