// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//! `hmmgpu-device`: the hmmgpu vhost-user backend process (one per GPU).

use std::process::ExitCode;

use clap::Parser;
use hmmgpu_device::cli::{self, Args};

fn main() -> ExitCode {
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
            let json = serde_json::to_string(&stats).unwrap_or_default();
            eprintln!("hmmgpu-device: stats: {json}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("hmmgpu-device: error: {message}");
            ExitCode::FAILURE
        }
    }
}
