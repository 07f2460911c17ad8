//! ICMP errors about translated flows (destination unreachable, fragmentation needed, time
//! exceeded, parameter problem), translated like the packets of the flow they belong to, so
//! each side sees an error about the addresses it uses.
//!
//! The quoted ("inner") packet is found in conntrack by its tuple, reversed:
//! * as a reply key: the error is about a packet that went toward the backend
//!   (client -> backend); it travels toward the client and is translated like a reply: the
//!   quote becomes client -> frontend, the outer destination the client (masqueraded flows),
//!   and the outer source the frontend when it is the backend itself complaining;
//! * as a forward key: the error is about a reply as the client got it (frontend -> client);
//!   it travels toward the backend and is translated like the client's packets: the quote
//!   becomes backend -> masquerade address, the outer destination the backend.
//!
//! Checksums: a quoted address changes together with the quoted header's checksum
//! (`bpf_l3_csum_replace` on it), which leaves the ICMP checksum as it was; a quoted port
//! change is folded into the ICMP checksum. The quoted TCP or UDP checksum, when the quote
//! holds it (UDP always, TCP from 18 quoted bytes; a UDP checksum of 0 means none), is updated
//! for the quoted addresses (its pseudo header) and ports like the packet's own was, and the
//! ICMP checksum for that change, so the quote is the packet as the receiver sent it or got it
//! (tools that match errors to packets by the whole quote see a consistent one). SCTP's quoted
//! CRC32c is left alone. The outer header is updated with `bpf_l3_csum_replace`.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use sluice_common::{CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_REDIRECT, CT_F_SNAT};

use crate::{
    conntrack,
    parse::{
        IcmpError, ICMP_CSUM_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, TCP_CSUM_OFF,
        UDP_CSUM_OFF,
    },
    route,
};
use sluice_common::{PROTO_TCP, PROTO_UDP};

/// The conntrack entry of the flow the error quotes, in direction `dir` (see the module doc).
#[inline(always)]
fn lookup(err: &IcmpError, dir: u8) -> Option<CtValue> {
    conntrack::lookup(&sluice_common::CtKey {
        saddr: err.inner_daddr,
        daddr: err.inner_saddr,
        sport: err.inner_dport,
        dport: err.inner_sport,
        proto: err.inner_proto,
        dir,
        _pad: 0,
    })
}

/// At tc ingress (`from_pod`, `from_world`): errors toward the client of flows that skip the
/// host's routing, and every error toward a backend (like a client's packet).
#[inline(always)]
pub fn ingress(ctx: &TcContext, err: &IcmpError) -> Result<i32, ()> {
    if let Some(entry) = lookup(err, CT_DIR_REPLY) {
        if entry.flags & CT_F_REDIRECT == 0 {
            // Translated on the way out (`to_pod`, `to_world`), like the flow's replies.
            return Ok(TC_ACT_OK);
        }
        let (saddr, daddr) = toward_client(ctx, err, &entry)?;
        return route::send(ctx, &entry, saddr, daddr);
    }
    if let Some(entry) = lookup(err, CT_DIR_FORWARD) {
        let (saddr, daddr) = toward_backend(ctx, err, &entry)?;
        return route::send(ctx, &entry, saddr, daddr);
    }
    Ok(TC_ACT_OK)
}

/// At tc egress (`to_pod`, `to_world`): errors toward the client, as replies are.
#[inline(always)]
pub fn egress(ctx: &TcContext, err: &IcmpError) -> Result<i32, ()> {
    if let Some(entry) = lookup(err, CT_DIR_REPLY) {
        toward_client(ctx, err, &entry)?;
    }
    Ok(TC_ACT_OK)
}

/// The quote client' -> backend becomes client -> frontend. Returns the new outer addresses.
#[inline(always)]
fn toward_client(ctx: &TcContext, err: &IcmpError, entry: &CtValue) -> Result<(u32, u32), ()> {
    inner_addr(ctx, err, IP_DADDR_OFF, err.inner_daddr, entry.nat_addr)?;
    inner_port(ctx, err, 2, err.inner_dport, entry.nat_port)?;
    let mut daddr = err.daddr;
    if entry.flags & CT_F_SNAT != 0 {
        inner_addr(ctx, err, IP_SADDR_OFF, err.inner_saddr, entry.snat_addr)?;
        inner_port(ctx, err, 0, err.inner_sport, entry.snat_port)?;
        daddr = entry.snat_addr;
    }
    let saddr = if err.saddr == err.inner_daddr {
        entry.nat_addr
    } else {
        err.saddr
    };
    ip_addr(ctx, err.l3_off, IP_SADDR_OFF, err.saddr, saddr)?;
    ip_addr(ctx, err.l3_off, IP_DADDR_OFF, err.daddr, daddr)?;
    Ok((saddr, daddr))
}

/// The quote frontend -> client becomes backend -> client'. Returns the new outer addresses.
#[inline(always)]
fn toward_backend(ctx: &TcContext, err: &IcmpError, entry: &CtValue) -> Result<(u32, u32), ()> {
    inner_addr(ctx, err, IP_SADDR_OFF, err.inner_saddr, entry.nat_addr)?;
    inner_port(ctx, err, 0, err.inner_sport, entry.nat_port)?;
    let mut saddr = err.saddr;
    if entry.flags & CT_F_SNAT != 0 {
        inner_addr(ctx, err, IP_DADDR_OFF, err.inner_daddr, entry.snat_addr)?;
        inner_port(ctx, err, 2, err.inner_dport, entry.snat_port)?;
        if err.saddr == err.inner_daddr {
            saddr = entry.snat_addr;
        }
    }
    let daddr = entry.nat_addr;
    ip_addr(ctx, err.l3_off, IP_SADDR_OFF, err.saddr, saddr)?;
    ip_addr(ctx, err.l3_off, IP_DADDR_OFF, err.daddr, daddr)?;
    Ok((saddr, daddr))
}

/// Rewrites the IPv4 address at `field` of the header at `ip_off` (the outer header, or the
/// one the error quotes) and that header's checksum. The ICMP checksum needs no update for a
/// quoted header: its checksum field changes by exactly the opposite of its address.
#[inline(always)]
fn ip_addr(ctx: &TcContext, ip_off: usize, field: usize, old: u32, new: u32) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(ip_off + IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| ())?;
    ctx.store(ip_off + field, &new, 0).map_err(|_| ())
}

/// Rewrites an address of the quoted header (see [`ip_addr`]) and the quoted L4 checksum,
/// whose pseudo header holds it.
#[inline(always)]
fn inner_addr(
    ctx: &TcContext,
    err: &IcmpError,
    field: usize,
    old: u32,
    new: u32,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ip_addr(ctx, err.inner_off, field, old, new)?;
    let [o0, o1] = split(old);
    let [n0, n1] = split(new);
    inner_l4_csum(ctx, err, [o0, o1], [n0, n1])
}

/// The two 16-bit words of an address, as in the packet.
#[inline(always)]
fn split(addr: u32) -> [u16; 2] {
    let b = addr.to_ne_bytes();
    [
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    ]
}

#[inline(always)]
fn inner_port(
    ctx: &TcContext,
    err: &IcmpError,
    field: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(err.icmp_off + ICMP_CSUM_OFF, old as u64, new as u64, 2)
        .map_err(|_| ())?;
    ctx.store(err.inner_l4_off + field, &new, 0)
        .map_err(|_| ())?;
    inner_l4_csum(ctx, err, [old, 0], [new, 0])
}

/// Updates the quoted TCP or UDP checksum for 16-bit words `old` becoming `new` (RFC 1624), and
/// the ICMP checksum for the change of that field. Nothing when the quote stops before the
/// field, for SCTP, or for a UDP datagram sent without checksum.
#[inline(always)]
fn inner_l4_csum(ctx: &TcContext, err: &IcmpError, old: [u16; 2], new: [u16; 2]) -> Result<(), ()> {
    let off = err.inner_l4_off
        + match err.inner_proto {
            PROTO_TCP => TCP_CSUM_OFF,
            PROTO_UDP => UDP_CSUM_OFF,
            _ => return Ok(()),
        };
    if off + 2 > err.end {
        return Ok(()); // not quoted (whatever bytes follow the packet)
    }
    let Ok(csum) = ctx.load::<u16>(off) else {
        return Ok(()); // not quoted
    };
    if csum == 0 && err.inner_proto == PROTO_UDP {
        return Ok(());
    }
    let mut sum = (!csum) as u32;
    for i in 0..2 {
        sum += (!old[i]) as u32 + new[i] as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let mut updated = !(sum as u16);
    if updated == 0 && err.inner_proto == PROTO_UDP {
        updated = 0xffff;
    }
    ctx.l4_csum_replace(err.icmp_off + ICMP_CSUM_OFF, csum as u64, updated as u64, 2)
        .map_err(|_| ())?;
    ctx.store(off, &updated, 0).map_err(|_| ())
}
