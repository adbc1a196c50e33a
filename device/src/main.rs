// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! `hmmgpu-device`: the hmmgpu vhost-user backend process (one per GPU).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use hmmgpu_device::cli::{self, Args};

fn main() -> ExitCode {
    // `hmmgpu-device inject|ctl ...`: a client of a running backend.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|first| cli::is_ctl_subcommand(&first.to_string_lossy()))
    {
        return cli::ctl_main(std::env::args_os());
    }
    // Wrong flags: clap prints the error and exits with status 2.
    let args = Args::parse();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(level) = args.log_level {
        logger.filter_level(level);
    }
    logger.init();

    match cli::run(&args) {
        Ok(stats) => {
            // The VM runner reads this line to prove bytes went through the device.
            eprintln!("{}", stats.exit_line());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("hmmgpu-device: error: {message}");
            ExitCode::FAILURE
        }
    }
}
