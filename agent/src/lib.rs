//! Sluice's node agent as a library: the binary (`main.rs`) is a thin CLI over these modules.
//!
//! * [`manifests`] reads Kubernetes objects from files, [`kube_source`] from the API server
//!   (I/O at the edge);
//! * [`node`] resolves this node's context (name, addresses, cluster CIDRs, options);
//! * [`translate`] turns objects into [`state::DesiredState`] (pure, unit-tested);
//! * [`datapath`] is everything that talks to the kernel: load, attach, map sync;
//! * [`interfaces`] finds pod veths with rtnetlink;
//! * [`packet`] builds and decodes the packets `BPF_PROG_RUN` feeds the programs (pure);
//! * [`daemon`] ties them together for `sluice agent`;
//! * [`policy`] resolves and compiles NetworkPolicy (pure), after [`policy_validation`]
//!   rejects what the API server would refuse;
//! * [`trace`], [`inspect`] and [`monitor`] are the debugging commands `sluice trace`,
//!   `sluice state` and `sluice monitor`.

pub mod config;
pub mod daemon;
pub mod datapath;
pub mod health;
pub mod inspect;
pub mod interfaces;
pub mod kube_source;
pub mod manifests;
pub mod monitor;
pub mod node;
pub mod packet;
pub mod policy;
pub mod policy_validation;
pub mod pressure;
pub mod state;
pub mod trace;
pub mod translate;
