//! The real eBPF programs, loaded into the kernel and run with `BPF_PROG_RUN` on hand-built
//! packets, with their maps programmed by `Datapath::sync`.
//!
//! Needs root and BPF; a test fails (never skips) when they are missing. Every test loads its
//! own datapath with private maps, so the tests run in parallel without seeing each other. The
//! pinning/attach tests use a bpffs mounted in a temporary directory and a veth pair inside a
//! network namespace of their own, both removed afterwards (also on panic): nothing touches the
//! machine's interfaces or /sys/fs/bpf.
//!
//! `support` holds what the topic modules share.

mod support;

mod affinity;
mod clusterip;
mod conntrack;
mod fuzz;
mod ipv6;
mod kernel;
mod layout;
mod pinning;
mod policy;
mod policy6;
mod repair;
mod resize;
mod services;
mod sock;
mod traffic;
