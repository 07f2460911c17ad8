//! `sluice state`: the running agent's pinned maps as tables.

use std::process::ExitCode;

/// Arguments of `sluice state`.
#[derive(clap::Args, Debug)]
pub struct StateArgs {}

pub fn run(_args: StateArgs) -> ExitCode {
    eprintln!("sluice state: not implemented yet");
    ExitCode::from(2)
}
