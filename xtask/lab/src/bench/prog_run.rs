//! Part 1: the programs' cost per packet, as the kernel reports it for `BPF_PROG_RUN`.
//!
//! Each sample is one run (`repeat` = 1) of one packet with a key of its own: a random
//! service of the N programmed and a source port never used before, so neither the
//! conntrack map nor the CPU's caches see the same key twice in a row. New flows are SYNs
//! that create their conntrack entry; established flows are data segments of flows whose
//! SYN ran before. The floor is a classifier that only returns TC_ACT_OK, loaded from raw
//! instructions by this file (bench-only, nothing added to the eBPF object), timed the same
//! way, so the per-run overhead of BPF_PROG_RUN is visible and can be subtracted by eye.

use std::{net::Ipv4Addr, os::fd::RawFd, path::Path, time::Duration};

use anyhow::{bail, Context as _};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use sluice::{
    datapath::{Datapath, MapSizes},
    manifests,
    node::NodeContext,
    packet::{self, Flow, TCP_ACK, TCP_PSH, TCP_SYN},
    policy,
    state::{BackendAddr, DesiredState, Frontend, Protocol, ServiceEntry},
};
use sluice_common::PROTO_TCP;

use super::{stats::Summary, Options};

/// One measured case at one number of services.
#[derive(Clone, Debug)]
pub struct PacketCost {
    pub services_requested: usize,
    pub services: usize,
    pub case: &'static str,
    pub ns: Summary,
}

pub const CASES: &[&str] = &[
    "floor (pass only)",
    "new ClusterIP flow",
    "established flow",
    "non-service packet",
    "policy allow (new flow)",
    "policy deny",
];

/// The `i`th service's VIP (10.96.0.0/12) and its two backends (10.244.0.0/16 on node b).
pub fn service_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

fn service_backends(i: usize) -> Vec<BackendAddr> {
    let base = u32::from(Ipv4Addr::new(10, 244, 128, 0)) + (i as u32 % 16_000) * 2;
    let mut list: Vec<BackendAddr> = (0..2)
        .map(|k| BackendAddr {
            ip: Ipv4Addr::from(base + k).into(),
            port: 8080,
        })
        .collect();
    list.sort();
    list
}

pub fn desired(n: usize) -> DesiredState {
    DesiredState {
        services: (0..n)
            .map(|i| {
                (
                    Frontend {
                        ip: service_vip(i).into(),
                        port: 80,
                        proto: Protocol::Tcp,
                    },
                    ServiceEntry::cluster_ip(format!("bench/svc-{i}:http"), service_backends(i))
                        .into(),
                )
            })
            .collect(),
        ..Default::default()
    }
}

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
/// Pods of the policy cases (namespace x: a, b; namespace y: a), on this node.
const XA: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const XB: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const YA: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);

fn node_context() -> NodeContext {
    NodeContext {
        name: Some("node-a".into()),
        node_ips: vec![NODE_IP.into()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("CIDR")],
        ..Default::default()
    }
}

/// x/a admits TCP port 80 from x/b only.
fn policy_yaml() -> String {
    let mut yaml = String::new();
    for ns in ["x", "y"] {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for (ns, pod, ip) in [("x", "a", XA), ("x", "b", XB), ("y", "a", YA)] {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
             spec:\n  nodeName: node-a\n  containers:\n  - name: c\nstatus: {{podIP: {ip}}}\n"
        ));
    }
    yaml.push_str(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-b, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}]\n",
    );
    yaml
}

fn program_policy(datapath: &mut Datapath) -> anyhow::Result<()> {
    let mut objects = manifests::Objects::default();
    let mut errors = Vec::new();
    manifests::parse_into(
        Path::new("bench-policy.yaml"),
        &policy_yaml(),
        &mut objects,
        &mut errors,
    );
    if !errors.is_empty() {
        bail!("the bench's policy manifests: {errors:?}");
    }
    let (wire, problems) = policy::program(&objects, &node_context());
    if !problems.is_empty() {
        bail!("the bench's policy: {problems:?}");
    }
    let stats = datapath.sync_policy(&wire);
    if !stats.failed.is_empty() {
        bail!("programming the bench's policy: {stats:?}");
    }
    Ok(())
}

/// One BPF_PROG_RUN; returns the verdict and the kernel's duration.
fn time_run(program: &SchedClassifier, packet: &[u8]) -> anyhow::Result<(u32, Duration)> {
    let mut out = vec![0u8; packet.len() + 512];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_RUN")?;
    Ok((result.return_value, result.duration))
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// The floor: `r0 = TC_ACT_OK; exit`, a SCHED_CLS program loaded with bpf(BPF_PROG_LOAD).
pub struct FloorProgram {
    fd: RawFd,
}

impl FloorProgram {
    pub fn load() -> anyhow::Result<FloorProgram> {
        // BPF_MOV64_IMM(BPF_REG_0, 0); BPF_EXIT_INSN()
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        let license = b"GPL\0";
        let mut attr = [0u8; 144];
        attr[0..4].copy_from_slice(&libc::c_uint::to_ne_bytes(3)); // BPF_PROG_TYPE_SCHED_CLS
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..64].copy_from_slice(b"bench_floor\0\0\0\0\0"); // prog_name
                                                                // SAFETY: bpf(BPF_PROG_LOAD) with an attr buffer of the kernel's size, pointers valid
                                                                // for the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                5, // BPF_PROG_LOAD
                attr.as_mut_ptr(),
                attr.len() as u32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("loading the floor program");
        }
        Ok(FloorProgram { fd: fd as RawFd })
    }

    pub fn time_run(&self, packet: &[u8]) -> anyhow::Result<(u32, Duration)> {
        let mut out = vec![0u8; packet.len() + 512];
        let mut attr = [0u8; 80];
        attr[0..4].copy_from_slice(&(self.fd as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
        attr[16..24].copy_from_slice(&(packet.as_ptr() as u64).to_ne_bytes());
        attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
        attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
        // SAFETY: bpf(BPF_PROG_TEST_RUN) with buffers that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                10, // BPF_PROG_TEST_RUN
                attr.as_mut_ptr(),
                attr.len() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_PROG_TEST_RUN (floor)");
        }
        let retval = u32::from_ne_bytes(attr[4..8].try_into().expect("4"));
        let duration = u32::from_ne_bytes(attr[36..40].try_into().expect("4"));
        Ok((retval, Duration::from_nanos(duration.into())))
    }
}

impl Drop for FloorProgram {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(self.fd) };
    }
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Flow {
    Flow {
        proto: PROTO_TCP,
        src,
        sport,
        dst,
        dport,
    }
}

const PAYLOAD: &[u8] = b"bench";

/// Source ports cycle through 1024..65535 and the client address steps on each wrap, so no
/// two samples of one case share a 5-tuple.
fn nth_source(base: Ipv4Addr, k: usize) -> (Ipv4Addr, u16) {
    let ports = 64_000;
    (
        Ipv4Addr::from(u32::from(base) + (k / ports) as u32 * 256),
        1024 + (k % ports) as u16,
    )
}

fn expect_verdict(case: &str, got: u32, want: u32) -> anyhow::Result<()> {
    if got != want {
        bail!("{case}: the program returned {got}, expected {want}");
    }
    Ok(())
}

pub fn run(options: &Options) -> anyhow::Result<Vec<PacketCost>> {
    let floor = FloorProgram::load()?;
    let samples = options.packets;
    let mut rows = Vec::new();
    for &requested in &options.prog_run_services {
        let n = requested;
        // Maps sized for the N services of `desired` (two backends each).
        let sizes = MapSizes::for_services(n, 2);
        let mut datapath = Datapath::load_unpinned_with(&sizes).context("loading the datapath")?;
        datapath.set_node_config(&node_context())?;
        let stats = datapath.sync(&desired(n))?;
        if !stats.is_complete() {
            bail!("programming {n} services: {stats:?}");
        }
        program_policy(&mut datapath)?;
        let mut push = |case: &'static str, ns: Vec<f64>| {
            rows.push(PacketCost {
                services_requested: requested,
                services: n,
                case,
                ns: Summary::of(ns),
            })
        };
        let mut rng = fastrand::Rng::with_seed(7 + n as u64);

        let mut ns = Vec::with_capacity(samples);
        for k in 0..samples {
            let (src, sport) = nth_source(CLIENT, k);
            let packet = packet::tcp_packet(
                &tcp(src, sport, service_vip(rng.usize(0..n)), 80),
                TCP_SYN,
                &[],
            );
            let (verdict, took) = floor.time_run(&packet)?;
            expect_verdict("floor", verdict, TC_ACT_OK)?;
            ns.push(took.as_nanos() as f64);
        }
        push(CASES[0], ns);

        // New flows, keeping their tuples for the established case.
        let mut flows = Vec::with_capacity(samples);
        let mut ns = Vec::with_capacity(samples);
        for k in 0..samples {
            let (src, sport) = nth_source(CLIENT, k);
            let flow = tcp(src, sport, service_vip(rng.usize(0..n)), 80);
            let (verdict, took) = time_run(
                datapath.from_pod(),
                &packet::tcp_packet(&flow, TCP_SYN, &[]),
            )?;
            expect_verdict("new ClusterIP flow", verdict, TC_ACT_OK)?;
            ns.push(took.as_nanos() as f64);
            flows.push(flow);
        }
        push(CASES[1], ns);

        rng.shuffle(&mut flows);
        let mut ns = Vec::with_capacity(samples);
        for flow in &flows {
            let (verdict, took) = time_run(
                datapath.from_pod(),
                &packet::tcp_packet(flow, TCP_PSH | TCP_ACK, PAYLOAD),
            )?;
            expect_verdict("established flow", verdict, TC_ACT_OK)?;
            ns.push(took.as_nanos() as f64);
        }
        push(CASES[2], ns);

        let mut ns = Vec::with_capacity(samples);
        for k in 0..samples {
            let (src, sport) = nth_source(CLIENT, k);
            // Pod to pod on the other node: no service, no policy on either end.
            let dst = Ipv4Addr::new(10, 244, 1, 1 + rng.u8(0..250));
            let (verdict, took) = time_run(
                datapath.from_pod(),
                &packet::tcp_packet(&tcp(src, sport, dst, 8080), TCP_SYN, &[]),
            )?;
            expect_verdict("non-service packet", verdict, TC_ACT_OK)?;
            ns.push(took.as_nanos() as f64);
        }
        push(CASES[3], ns);

        // Policy: new connections into x/a, delivered by to_pod, checked against its ingress.
        let mut ns = Vec::with_capacity(samples);
        for k in 0..samples {
            let sport = 1024 + (k % 64_000) as u16;
            let flow = tcp(XB, sport, XA, 80);
            let (verdict, took) =
                time_run(datapath.to_pod(), &packet::tcp_packet(&flow, TCP_SYN, &[]))?;
            expect_verdict("policy allow", verdict, TC_ACT_OK)?;
            ns.push(took.as_nanos() as f64);
        }
        push(CASES[4], ns);
        let mut ns = Vec::with_capacity(samples);
        for k in 0..samples {
            let sport = 1024 + (k % 64_000) as u16;
            let flow = tcp(YA, sport, XA, 80);
            let (verdict, took) =
                time_run(datapath.to_pod(), &packet::tcp_packet(&flow, TCP_SYN, &[]))?;
            expect_verdict("policy deny", verdict, TC_ACT_SHOT)?;
            ns.push(took.as_nanos() as f64);
        }
        push(CASES[5], ns);
        eprintln!("bench: per-packet cost measured at {n} services");
    }
    Ok(rows)
}
