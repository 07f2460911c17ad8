//! Address and port rewriting. Checksums are updated with the kernel's helpers, which also do
//! the right thing for CHECKSUM_PARTIAL packets (veth with checksum offload on), where the L4
//! checksum field holds only the pseudo-header sum.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use sluice_common::PROTO_UDP;

use crate::parse::{Ipv4Packet, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF};

/// Rewrites the destination to `addr:port` (DNAT to a backend).
#[inline(always)]
pub fn dnat(ctx: &TcContext, pkt: &Ipv4Packet, addr: u32, port: u16) -> Result<(), ()> {
    rewrite(ctx, pkt, IP_DADDR_OFF, pkt.daddr, addr, 2, pkt.dport, port)
}

/// Rewrites the source to `addr:port` (reverse NAT of a backend's reply to the VIP).
#[inline(always)]
pub fn snat_reply(ctx: &TcContext, pkt: &Ipv4Packet, addr: u32, port: u16) -> Result<(), ()> {
    rewrite(ctx, pkt, IP_SADDR_OFF, pkt.saddr, addr, 0, pkt.sport, port)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    ip_field: usize,
    old_addr: u32,
    new_addr: u32,
    port_field: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let csum_off = pkt.l4_csum_off();
    // A UDP checksum of zero means "none" and must stay zero.
    let mangled0 = if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(
            pkt.l3_off + IP_CSUM_OFF,
            old_addr as u64,
            new_addr as u64,
            4,
        )
        .map_err(|_| ())?;
        ctx.store(pkt.l3_off + ip_field, &new_addr, 0)
            .map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled0 | 2)
            .map_err(|_| ())?;
        ctx.store(pkt.l4_off + port_field, &new_port, 0)
            .map_err(|_| ())?;
    }
    Ok(())
}
