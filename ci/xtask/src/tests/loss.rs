//! VM tests for losing the device (docs/fault-injection.md, "Host-side
//! faults"): the backend killed mid-run (catalogue entry 9, surprise loss)
//! and the VRAM BAR's link going down (entry 4), and a machine check on a
//! device-coherent page (entry 10). The guest side is `hmmgpu-faults loss
//! kill|link` (ci/guest/faults/loss.c) and `hmmgpu-faults mce`
//! (ci/guest/faults/mce.c), which ask for the fault through the console
//! (see tests/faults.rs) and check the outcomes in the guest; here the host
//! checks the driver said why.

use super::faults::{console_has, faults_boot, inject_hook};
use super::recovery::Expected;
use super::{expect_status_with, Ctx};
use crate::vm::{self, VmOutcome};
use anyhow::{ensure, Result};

/// Boots `hmmgpu-faults loss how`. Only the kill test's backend may end
/// early, and only by the SIGKILL it asks for; in the link-down test the
/// backend lives on and must exit cleanly with its stats like in any run.
fn loss_boot(ctx: &mut Ctx, test: &'static str, how: &str, killed: bool) -> Result<VmOutcome> {
    ctx.boot_extra(
        faults_boot(test, &["hmmgpu-faults", "loss", how]),
        vm::VmExtra {
            console_hook: Some(inject_hook()),
            backends_killed: killed,
            ..Default::default()
        },
    )
}

pub(super) fn t_surprise_loss(ctx: &mut Ctx) -> Result<()> {
    let out = loss_boot(ctx, "fault-surprise-loss", "kill", true)?;
    // The commands in flight at the kill time out: the driver tries a reset,
    // the device does not come back, it is declared dead; then rmmod.
    expect_status_with(
        &out,
        0,
        &Expected {
            counters: &[
                ("driver_resets", 0..=1),
                ("driver_polled_completions", 0..=0),
            ],
            lines: &[
                "got no answer in",
                "did not come back from its reset",
                "the device stopped answering",
                "abandoning a command",
            ],
            loaded_at_end: false,
        },
    )?;
    console_has(&out, "the device stopped answering; it is dead")?;
    console_has(&out, "pages lost with the device")?;
    Ok(())
}

/// The backend killed mid-migration and a new one started on the same
/// socket and VRAM file (QEMU reconnects): `hmmgpu-faults restart`
/// (ci/guest/faults/restart.c, twice: mid-migration and mid-READ) checks
/// every byte in the guest; here, that exactly two backends were restarted,
/// and the driver reset the device once for each,
/// because the new backend said so (a RESTARTED event; not because a command
/// timed out), and retried what was in flight.
pub(super) fn t_backend_restart(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.boot_extra(
        faults_boot("fault-backend-restart", &["hmmgpu-faults", "restart"]),
        vm::VmExtra {
            console_hook: Some(inject_hook()),
            restart_killed_backends: true,
            ..Default::default()
        },
    )?;
    expect_status_with(
        &out,
        0,
        &Expected {
            counters: &[("driver_resets", 2..=2)],
            lines: &[
                "restarted under the driver",
                "commands in flight were retried",
            ],
            loaded_at_end: true,
        },
    )?;
    ensure!(
        out.backend_restarts == 2,
        "{} backends were restarted, want 2",
        out.backend_restarts
    );
    console_has(
        &out,
        "the device restarted under the driver (its contexts are gone); resetting it",
    )?;
    console_has(&out, "PASS: restart: all checks passed")?;
    Ok(())
}

pub(super) fn t_machine_check(ctx: &mut Ctx) -> Result<()> {
    ensure!(
        ctx.arch == crate::cli::Arch::X86_64,
        "machine-check injection is x86-only (QEMU's mce)"
    );
    let out = ctx.boot_extra(
        faults_boot("fault-machine-check", &["hmmgpu-faults", "mce"]),
        vm::VmExtra {
            console_hook: Some(inject_hook()),
            tcg_cpu: Some(crate::hostfault::MCE_CPU.to_string()),
            ..Default::default()
        },
    )?;
    // A machine check on a page is no device failure: no recovery.
    expect_status_with(&out, 0, &Expected::NONE_UNLOADED)?;
    console_has(&out, "memory failure on 1 device-coherent page(s)")?;
    console_has(&out, "retired (memory failure)")?;
    console_has(&out, "1 moved to poisoned system pages")?;
    Ok(())
}

pub(super) fn t_link_down(ctx: &mut Ctx) -> Result<()> {
    let out = loss_boot(ctx, "fault-link-down", "link", false)?;
    // The driver sees the link fail through its canary, not through a
    // command timing out: no reset, no polling.
    expect_status_with(&out, 0, &Expected::NONE_UNLOADED)?;
    console_has(&out, "the link is down; the device is dead")?;
    console_has(&out, "pages lost with the device")?;
    Ok(())
}
