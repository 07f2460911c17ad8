//! Address and port rewriting. Checksums are updated with the kernel's helpers, which also do
//! the right thing for CHECKSUM_PARTIAL packets (veth with checksum offload on), where the L4
//! checksum field holds only the pseudo-header sum, and keep a CHECKSUM_COMPLETE sum valid.
//! SCTP's CRC32c covers no IP address; a port change updates it incrementally
//! (`sluice_common::crc32c`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use sluice_common::{crc32c, CtValue, CT_F_SNAT, PROTO_SCTP, PROTO_UDP};

use crate::parse::{Ipv4Packet, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Forward translation of a flow's packet: destination to the backend, and source to the
/// masquerade address when the flow is source-NATed.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Ipv4Packet, entry: &CtValue) -> Result<(), ()> {
    rewrite(ctx, pkt, End::Destination, entry.nat_addr, entry.nat_port)?;
    if entry.flags & CT_F_SNAT != 0 {
        rewrite(ctx, pkt, End::Source, entry.snat_addr, entry.snat_port)?;
    }
    Ok(())
}

/// Reverse translation of a reply: source back to the frontend the client used, and
/// destination back to the client when the flow is source-NATed.
#[inline(always)]
pub fn reverse(ctx: &TcContext, pkt: &Ipv4Packet, entry: &CtValue) -> Result<(), ()> {
    rewrite(ctx, pkt, End::Source, entry.nat_addr, entry.nat_port)?;
    if entry.flags & CT_F_SNAT != 0 {
        rewrite(ctx, pkt, End::Destination, entry.snat_addr, entry.snat_port)?;
    }
    Ok(())
}

/// The packet's addresses once `forward` rewrote them: (source, destination).
#[inline(always)]
pub fn forwarded_addrs(pkt: &Ipv4Packet, entry: &CtValue) -> (u32, u32) {
    let saddr = if entry.flags & CT_F_SNAT != 0 {
        entry.snat_addr
    } else {
        pkt.saddr
    };
    (saddr, entry.nat_addr)
}

/// The packet's addresses once `reverse` rewrote them: (source, destination).
#[inline(always)]
pub fn reversed_addrs(pkt: &Ipv4Packet, entry: &CtValue) -> (u32, u32) {
    let daddr = if entry.flags & CT_F_SNAT != 0 {
        entry.snat_addr
    } else {
        pkt.daddr
    };
    (entry.nat_addr, daddr)
}

/// Rewrites one end's address and port.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    end: End,
    new_addr: u32,
    new_port: u16,
) -> Result<(), ()> {
    let (ip_field, port_field, old_addr, old_port) = match end {
        End::Source => (IP_SADDR_OFF, 0, pkt.saddr, pkt.sport),
        End::Destination => (IP_DADDR_OFF, 2, pkt.daddr, pkt.dport),
    };
    let csum_off = pkt.l4_csum_off();
    // A UDP checksum of zero means "none" and must stay zero.
    let mangled0 = if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old_addr != new_addr {
        if pkt.proto != PROTO_SCTP {
            ctx.l4_csum_replace(
                csum_off,
                old_addr as u64,
                new_addr as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
            )
            .map_err(|_| ())?;
        }
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
        if pkt.proto == PROTO_SCTP {
            let old = old_port.to_ne_bytes();
            let new = new_port.to_ne_bytes();
            // Bytes after the port up to the end of the SCTP packet.
            let sctp_len = (pkt.tot_len as usize).saturating_sub(pkt.ihl);
            let trailing = sctp_len.saturating_sub(port_field + 2) as u32;
            let delta = crc32c::delta2([old[0] ^ new[0], old[1] ^ new[1]], trailing & 0xffff);
            // SCTP stores the CRC little-endian: on bpfel a plain load reads its value.
            let crc: u32 = ctx.load(csum_off).map_err(|_| ())?;
            ctx.store(csum_off, &(crc ^ delta), 0).map_err(|_| ())?;
        } else {
            ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled0 | 2)
                .map_err(|_| ())?;
        }
        ctx.store(pkt.l4_off + port_field, &new_port, 0)
            .map_err(|_| ())?;
    }
    Ok(())
}
