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
//! change is folded into the ICMP checksum. The quoted L4 checksum is left alone (receivers do
//! not check it in an error), as is the outer header's, updated with `bpf_l3_csum_replace`.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use sluice_common::{CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_REDIRECT, CT_F_SNAT};

use crate::{
    conntrack,
    parse::{IcmpError, ICMP_CSUM_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
    route,
};

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
    ip_addr(
        ctx,
        err.inner_off,
        IP_DADDR_OFF,
        err.inner_daddr,
        entry.nat_addr,
    )?;
    inner_port(ctx, err, 2, err.inner_dport, entry.nat_port)?;
    let mut daddr = err.daddr;
    if entry.flags & CT_F_SNAT != 0 {
        ip_addr(
            ctx,
            err.inner_off,
            IP_SADDR_OFF,
            err.inner_saddr,
            entry.snat_addr,
        )?;
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
    ip_addr(
        ctx,
        err.inner_off,
        IP_SADDR_OFF,
        err.inner_saddr,
        entry.nat_addr,
    )?;
    inner_port(ctx, err, 0, err.inner_sport, entry.nat_port)?;
    let mut saddr = err.saddr;
    if entry.flags & CT_F_SNAT != 0 {
        ip_addr(
            ctx,
            err.inner_off,
            IP_DADDR_OFF,
            err.inner_daddr,
            entry.snat_addr,
        )?;
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
    ctx.store(err.inner_l4_off + field, &new, 0).map_err(|_| ())
}
