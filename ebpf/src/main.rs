//! Sluice's datapath. This file lists every hook in the order a packet meets it; each step is a
//! small module of its own.
//!
//! A pod's traffic crosses the node through the node-side end of the pod's veth:
//!
//! ```text
//!  pod A ──veth──> [tc ingress: from_pod] ──> node routing ──> [tc egress: to_pod] ──veth──> pod B
//! ```
//!
//! `from_pod` (tc ingress on the node side of every pod veth: packets the pod sends)
//!   1. `parse::parse_ipv4`        IPv4 TCP/UDP only; everything else passes untouched
//!   2. `conntrack::lookup`        a flow already balanced keeps its backend
//!   3. `lb::select_backend`       (VIP, port, proto) in `services` -> random slot in `backends`
//!   4. `conntrack::create`        forward entry + reply entry for the reverse NAT
//!   5. `nat::dnat`                rewrite destination to the backend, checksums by kernel helpers
//!
//! `to_pod` (tc egress on the node side of every pod veth: packets delivered to the pod)
//!   1. `parse::parse_ipv4`
//!   2. `conntrack::lookup` (reply direction): is this a reply of a translated flow?
//!   3. `nat::snat_reply`          rewrite source back to the VIP and service port
//!
//! The maps and their layout are described in `sluice-common` (common/src/lib.rs).
#![no_std]
#![no_main]

mod conntrack;
mod lb;
mod maps;
mod nat;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use sluice_common::{Backend, CT_DIR_FORWARD, CT_DIR_REPLY};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(action) => action,
        // A packet the helpers could not rewrite would reach a pod with a wrong address or
        // checksum; dropping it lets the sender retransmit.
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = parse::parse_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };

    let fwd_key = conntrack::key(&pkt, CT_DIR_FORWARD);
    // A TCP SYN starts a new connection even when its tuple is still remembered (the client
    // reused a port): balance it again, as netfilter does for a closed connection.
    let known = if pkt.is_tcp_syn() {
        None
    } else {
        conntrack::lookup(&fwd_key)
    };

    let backend = match known {
        Some(entry) => Backend {
            addr: entry.nat_addr,
            port: entry.nat_port,
            _pad: 0,
        },
        None => {
            let Some((service_id, backend)) = lb::select_backend(&pkt) else {
                // Not a service, or a service without backends (kube-proxy's REJECT comes later).
                return Ok(TC_ACT_OK);
            };
            conntrack::create(&pkt, &fwd_key, service_id, &backend);
            backend
        }
    };

    nat::dnat(ctx, &pkt, backend.addr, backend.port)?;
    Ok(TC_ACT_OK)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match try_to_pod(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = parse::parse_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let reply_key = conntrack::key(&pkt, CT_DIR_REPLY);
    if let Some(entry) = conntrack::lookup(&reply_key) {
        nat::snat_reply(ctx, &pkt, entry.nat_addr, entry.nat_port)?;
    }
    Ok(TC_ACT_OK)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
