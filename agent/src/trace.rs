//! `sluice trace`: runs a synthetic packet through the real programs with BPF_PROG_RUN.

use std::process::ExitCode;

/// Arguments of `sluice trace`.
#[derive(clap::Args, Debug)]
pub struct TraceArgs {}

pub fn run(_args: TraceArgs) -> ExitCode {
    eprintln!("sluice trace: not implemented yet");
    ExitCode::from(2)
}
