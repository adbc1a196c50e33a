//! The run oracle's own VM test: deliberately broken runs that the old
//! oracle passed, each of which must now fail the way docs/running.md says
//! ("What makes a run pass"). Host-side unit tests of vm::verdict and
//! tests/recovery.rs cover every rule; these boots show the real thing.

use super::recovery::Expected;
use super::{argv, expect_status_with, need, Boot, Ctx};
use crate::build::{self, log};
use crate::exit::Exit;
use crate::vm::{self, VmOutcome, VmResult};
use anyhow::{bail, ensure, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Fails unless `out` failed with `want` and a message containing `says`.
fn expect_failure(case: &str, out: &VmOutcome, want: Exit, says: &str) -> Result<()> {
    match &out.result {
        VmResult::Failed(e, m) if *e == want && m.contains(says) => {
            log(format!("oracle: {case}: failed as it must ({e})"));
            Ok(())
        }
        VmResult::Failed(e, m) => {
            bail!("{case}: failed with {e}, want {want} saying '{says}': {m}")
        }
        VmResult::Exited(n) => bail!("{case}: the run passed (status {n}), want {want}"),
    }
}

/// A script standing in for the backend: `body` around the real binary.
fn wrapper(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n"))
        .with_context(|| format!("writing {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

pub(super) fn t_oracle(ctx: &mut Ctx) -> Result<()> {
    // 1. The command prints status markers itself (none has the nonce),
    //    after checking it cannot see the nonce file; its own status wins.
    let out = ctx.boot(Boot {
        test: "oracle",
        gpus: 0,
        driver: false,
        cmd: argv(&[
            "sh",
            "-c",
            "test ! -e /etc/hmmgpu-nonce || exit 9; echo HMMGPU-EXIT-STATUS=0; echo HMMGPU-EXIT-STATUS=:0; exit 3",
        ]),
    })?;
    match out.result {
        VmResult::Exited(3) => log("oracle: forged markers: ignored, the command's 3 reported"),
        r => bail!("forged markers: want the command's status 3, got {r:?}"),
    }

    // 2. An init that prints its (real) status marker and never powers off.
    let init = std::fs::read_to_string(build::repo_root().join("images/init"))?;
    ensure!(
        init.contains("    poweroff -f\n"),
        "images/init has no 'poweroff -f' line"
    );
    let out = ctx.boot_extra(
        Boot {
            test: "oracle",
            gpus: 0,
            driver: false,
            cmd: argv(&["true"]),
        },
        vm::VmExtra {
            init_override: Some(init.replace("    poweroff -f\n", "    sleep 3600\n")),
            poweroff_grace: Some(Duration::from_secs(5)),
            ..Default::default()
        },
    )?;
    expect_failure("no power-off", &out, Exit::NoPowerOff, "did not power off")?;

    let real = need("hmmgpu-device", &ctx.device)?.clone();
    let dir = super::faults::TempDir::new("oracle")?;
    let real_q = crate::vm::shell_join(&[real.display().to_string()]);

    // 3. A backend that serves the whole run, then exits 1 at shutdown.
    let bin = wrapper(&dir.0, "exit-1", &format!("{real_q} \"$@\"\nexit 1"))?;
    let out = ctx.boot_extra(
        Boot {
            test: "oracle",
            gpus: 1,
            driver: true,
            cmd: argv(&["true"]),
        },
        vm::VmExtra {
            backend_bin: Some(bin),
            ..Default::default()
        },
    )?;
    expect_failure(
        "backend exits 1",
        &out,
        Exit::BackendFailed,
        "exit status: 1 at shutdown",
    )?;

    // 4. A backend whose stderr has a crash report (planted).
    let bin = wrapper(
        &dir.0,
        "splat",
        &format!("echo 'BUG: KASAN: planted by the oracle test' >&2\nexec {real_q} \"$@\""),
    )?;
    let out = ctx.boot_extra(
        Boot {
            test: "oracle",
            gpus: 1,
            driver: true,
            cmd: argv(&["true"]),
        },
        vm::VmExtra {
            backend_bin: Some(bin),
            ..Default::default()
        },
    )?;
    expect_failure(
        "planted splat",
        &out,
        Exit::BackendFailed,
        "planted by the oracle test",
    )?;

    // 5. The demo passes, but the driver had to poll for one completion
    //    whose interrupt the device dropped: a test that injects nothing
    //    must fail on it.
    let plan = dir.0.join("drop-one-interrupt.json");
    std::fs::write(
        &plan,
        r#"{"seed":1,"faults":[{"after_commands":20,"fault":{"kind":"drop_interrupts","count":1}}]}"#,
    )?;
    let out = ctx.boot_extra(
        Boot {
            test: "oracle",
            gpus: 1,
            driver: true,
            cmd: argv(&["hmmgpu-demo"]),
        },
        vm::VmExtra {
            backend_args: vec![vec!["--fault-plan".into(), plan.display().to_string()]],
            ..Default::default()
        },
    )?;
    match expect_status_with(&out, 0, &Expected::NONE) {
        Ok(()) => bail!("a dropped interrupt: the demo passed though the driver polled"),
        Err(e) if format!("{e:#}").contains("driver_polled_completions") => {
            log(format!("oracle: polled completion: caught ({e:#})"))
        }
        Err(e) => bail!("a dropped interrupt: failed, but not on the poll: {e:#}"),
    }
    Ok(())
}
