//! own-kernel: hmmgpu on a kernel tree built the way a user builds one, run
//! the way a user runs it. The tree is a plain `O=` build of Debian's
//! linux-source-7.2, as shipped (no images/patches): `make allnoconfig`,
//! images/config's fragments merged, `make` (images/build-kernel.sh
//! --release 7.2 --plain, cached, under the build lock). It then goes through
//! `build::artifacts` with `kernel_dir` set, the code `cargo xtask run
//! --kernel-dir` runs, so the image, test_hmm.ko, the uAPI header and the
//! unmodified hmm-tests all come from that tree.

use super::{argv, expect_status, selftest, Boot, Ctx};
use crate::build::{self, log, Release};
use crate::cli::{AccelChoice, Arch, Flavour};
use crate::vm;
use anyhow::{ensure, Result};

pub(super) fn t_own_kernel(ctx: &mut Ctx) -> Result<()> {
    let (arch, flavour) = (Arch::X86_64, Flavour::Release);
    let tree = build::debian_tree(arch, flavour, Release::V7_2, true)?;
    let art = build::artifacts(&build::Wants {
        arch,
        flavour,
        device: true,
        driver: true,
        kernel_dir: Some(&tree),
        // `cargo xtask test` ran ci/setup-host.sh already (host-setup).
        no_setup: true,
    })?;
    let accel = if ctx.arch == arch {
        ctx.accel
    } else {
        vm::resolve_accel(AccelChoice::Auto, arch)?
    };
    // hmm-tests-both exits 0 once hmm-tests ran (the host judges its
    // output), then the demo's status is the command's.
    let script = "echo \"HMMGPU-UNAME $(uname -r)\"\n\
                  hmm-tests-both hmmgpu || exit $?\n\
                  hmmgpu-demo";
    let driver = art.driver.as_ref();
    let out = ctx.boot_with(
        Boot {
            test: "own-kernel",
            gpus: 2,
            driver: true,
            cmd: argv(&["sh", "-c", script]),
        },
        &art.kernel,
        driver,
        &art.programs,
        &art.qemu,
        accel,
        ctx.cpus,
        vm::VmExtra::default(),
    )?;
    let uname = format!("HMMGPU-UNAME {}", art.kernel.release);
    ensure!(
        out.console.iter().any(|l| l.trim_end().ends_with(&uname)),
        "the guest did not boot the tree's kernel: no '{uname}' line"
    );
    log(format!("own-kernel: the guest runs {}", art.kernel.release));
    let checked = selftest::check_all_pass(
        ctx,
        &out,
        &format!(
            "the tree's own hmm-tests on hmmgpu ({}, 2 GPUs, {}):",
            art.kernel.release,
            if accel == vm::Accel::Kvm {
                "KVM"
            } else {
                "TCG"
            }
        ),
        &art.programs,
    );
    // A splat fails the boot itself; the demo's failure is the command's
    // status. Both verdicts are reported.
    selftest::both(expect_status(&out, 0), checked)
}
