//! VM tests for device resets (docs/fault-injection.md): lost and late
//! interrupts and a stalled command queue, which the driver survives by
//! polling and by resetting the device (catalogue entry 5), and a PCI reset
//! announced to the driver through virtio's reset_prepare/reset_done
//! (entry 7). The guest side is `hmmgpu-faults irq` and `hmmgpu-faults
//! reset flr|aer` (ci/guest/faults/irq.c, reset.c), which ask for the
//! faults through the console (see tests/faults.rs) and check the outcomes
//! in the guest; here the host checks what the backend injected and what
//! the driver said.

use super::faults::{console_has, faults_boot, guest_counter, inject_hook, injected};
use super::recovery::Expected;
use super::{expect_status_with, Ctx};
use crate::build::log;
use crate::vm::{self, VmOutcome};
use anyhow::{ensure, Result};

pub(super) fn t_interrupts_and_stall(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.boot_extra(
        faults_boot("fault-interrupts-stall", &["hmmgpu-faults", "irq"]),
        vm::VmExtra {
            console_hook: Some(inject_hook()),
            ..Default::default()
        },
    )?;
    // 8 dropped interrupts: completions found by polling (the 4 late ones
    // may be polled too), up to three each: the driver submits a MAP, its
    // REPLAY and the replayed access (or an UNMAP and the COPY behind it)
    // to complete behind one interrupt. The stall: one reset.
    expect_status_with(
        &out,
        0,
        &Expected {
            counters: &[
                ("driver_resets", 1..=1),
                ("driver_polled_completions", 1..=12 * 3),
            ],
            lines: &["got no answer in", "commands in flight were retried"],
            loaded_at_end: true,
        },
    )?;
    let dropped = injected(&out, "interrupts_dropped")?;
    let delayed = injected(&out, "interrupts_delayed")?;
    let stalls = injected(&out, "queue_stalls")?;
    let polled = guest_counter(&out, "driver_polled_completions")?;
    let resets = guest_counter(&out, "driver_resets")?;
    log(format!(
        "fault-interrupts-stall: backend dropped {dropped} and delayed {delayed} interrupts, stalled {stalls} time(s); \
         driver polled {polled} completion(s), reset {resets} time(s)"
    ));
    ensure!(
        dropped == 8,
        "the backend dropped {dropped} interrupts, not 8"
    );
    ensure!(
        delayed == 4,
        "the backend delayed {delayed} interrupts, not 4"
    );
    ensure!(stalls == 1, "the backend stalled {stalls} times, not once");
    ensure!(polled >= 1, "the driver found no completion by polling");
    ensure!(
        resets == 1,
        "the driver reset the device {resets} times, not once"
    );
    console_has(&out, "resetting the device")?;
    console_has(&out, "reset done")?;
    Ok(())
}

/// Boots `hmmgpu-faults reset how` (x86_64 only: both resets need the q35
/// PCIe topology); the guest must report success.
fn reset_boot(ctx: &mut Ctx, test: &'static str, how: &str) -> Result<VmOutcome> {
    ensure!(
        ctx.arch == crate::cli::Arch::X86_64,
        "{test} needs the q35 PCIe topology (x86_64)"
    );
    let out = ctx.boot_extra(
        faults_boot(test, &["hmmgpu-faults", "reset", how]),
        vm::VmExtra {
            console_hook: Some(inject_hook()),
            ..Default::default()
        },
    )?;
    // One announced reset (reset_prepare/reset_done), no polling, no
    // timeout-driven recovery.
    expect_status_with(
        &out,
        0,
        &Expected {
            counters: &[("driver_resets", 1..=1)],
            lines: &[],
            loaded_at_end: true,
        },
    )?;
    Ok(out)
}

pub(super) fn t_function_reset(ctx: &mut Ctx) -> Result<()> {
    let out = reset_boot(ctx, "fault-pci-reset", "flr")?;
    console_has(&out, "device reset requested: evicting VRAM")?;
    console_has(&out, "pages evicted to system memory before the reset")?;
    console_has(&out, "the device is back")?;
    Ok(())
}

pub(super) fn t_aer(ctx: &mut Ctx) -> Result<()> {
    let out = reset_boot(ctx, "fault-aer", "aer")?;
    // The AER driver's pci_info lines (recovery successful or failed) are
    // below the console level: the guest checks them in dmesg.
    console_has(&out, "PCIe Bus Error: severity=Correctable")?;
    console_has(&out, "PCIe Bus Error: severity=Uncorrectable (Non-Fatal)")?;
    console_has(&out, "PCIe Bus Error: severity=Uncorrectable (Fatal)")?;
    console_has(&out, "device reset requested: evicting VRAM")?;
    console_has(&out, "the device is back")?;
    Ok(())
}
