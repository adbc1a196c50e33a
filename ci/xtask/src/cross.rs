//! The backend's own tests (`cargo test -p hmmgpu-device -p hmmgpu-abi`:
//! unit tests and the vhost-user socket tests) built for a PowerPC host and
//! run under qemu-user: little-endian powerpc64le and big-endian powerpc64.
//!
//! The rustup toolchain here has no PowerPC std and no rust-src component, so
//! std is built from Debian's rust-src 1.95.0 with `-Zbuild-std`
//! (RUSTC_BOOTSTRAP=1 on the stable 1.95.0 toolchain, which that source
//! matches). Debian's cross gcc links; qemu-user runs the test binaries.

use crate::build::{self, log};
use crate::exit;
use crate::signals;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use std::path::Path;
use std::process::Command;

/// Debian's rust-src: the std sources `-Zbuild-std` compiles.
const RUST_LIBRARY_SRC: &str = "/usr/lib/rustlib/src/rust/library";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CrossTarget {
    /// Little-endian 64-bit PowerPC (POWER8 and later, ELFv2).
    #[value(name = "powerpc64le")]
    Powerpc64le,
    /// Big-endian 64-bit PowerPC.
    #[value(name = "powerpc64")]
    Powerpc64,
}

impl CrossTarget {
    pub const ALL: [CrossTarget; 2] = [CrossTarget::Powerpc64le, CrossTarget::Powerpc64];

    pub fn name(self) -> &'static str {
        match self {
            CrossTarget::Powerpc64le => "powerpc64le",
            CrossTarget::Powerpc64 => "powerpc64",
        }
    }

    fn triple(self) -> &'static str {
        match self {
            CrossTarget::Powerpc64le => "powerpc64le-unknown-linux-gnu",
            CrossTarget::Powerpc64 => "powerpc64-unknown-linux-gnu",
        }
    }

    /// Debian's cross toolchain prefix (gcc-powerpc64le-linux-gnu, ...).
    fn gnu(self) -> &'static str {
        match self {
            CrossTarget::Powerpc64le => "powerpc64le-linux-gnu",
            CrossTarget::Powerpc64 => "powerpc64-linux-gnu",
        }
    }

    fn qemu_user(self) -> &'static str {
        match self {
            CrossTarget::Powerpc64le => "qemu-ppc64le",
            CrossTarget::Powerpc64 => "qemu-ppc64",
        }
    }
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// Builds and runs the backend's tests for `target` under qemu-user.
pub fn device_tests(target: CrossTarget) -> Result<()> {
    let linker = format!("{}-gcc", target.gnu());
    let sysroot = format!("/usr/{}", target.gnu());
    for (what, ok) in [
        (linker.as_str(), on_path(&linker)),
        (target.qemu_user(), on_path(target.qemu_user())),
        (sysroot.as_str(), Path::new(&sysroot).is_dir()),
        (
            RUST_LIBRARY_SRC,
            Path::new(RUST_LIBRARY_SRC).join("std").is_dir(),
        ),
    ] {
        if !ok {
            bail!("{what} is missing: run ci/setup-host.sh");
        }
    }
    let env_target = target.triple().to_uppercase().replace('-', "_");
    let runner = format!("{} -L {sysroot}", target.qemu_user());
    let target_dir = build::target_dir().join("cross");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        "test",
        "-Zbuild-std=std,panic_abort",
        "--target",
        target.triple(),
        "-p",
        "hmmgpu-device",
        "-p",
        "hmmgpu-abi",
    ])
    .current_dir(build::repo_root())
    // -Z flags on the stable toolchain.
    .env("RUSTC_BOOTSTRAP", "1")
    // Where cargo finds std's sources when the toolchain has no rust-src.
    .env("__CARGO_TESTS_ONLY_SRC_ROOT", RUST_LIBRARY_SRC)
    .env("CARGO_TARGET_DIR", &target_dir)
    .env(format!("CARGO_TARGET_{env_target}_LINKER"), &linker)
    .env(format!("CARGO_TARGET_{env_target}_RUNNER"), &runner)
    // The socket tests also start the backend binary: through qemu-user too.
    .env("HMMGPU_TEST_RUNNER", &runner);
    log(format!(
        "cross: cargo test -Zbuild-std --target {} (under {}; std is built first, a few minutes the first time)",
        target.triple(),
        target.qemu_user()
    ));
    let status = cmd.status().context("running cargo")?;
    if signals::interrupted() {
        return Err(exit::interrupted());
    }
    if !status.success() {
        bail!(
            "cargo test for {} under {} failed ({status})",
            target.triple(),
            target.qemu_user()
        );
    }
    Ok(())
}
