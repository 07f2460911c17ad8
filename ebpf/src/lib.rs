//! Present so the agent can name this crate as a build dependency (cargo then rebuilds the
//! agent when the programs change). The programs themselves are the `sluice` binary target.
#![no_std]
