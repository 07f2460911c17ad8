//! ICMPv6 errors about translated flows (destination unreachable, packet too big, time
//! exceeded, parameter problem), translated like the packets of the flow they belong to, as
//! icmp.rs does for IPv4 (its module doc has the two directions: an error about a packet
//! toward the backend travels toward the client and is translated like a reply; an error
//! about a reply as the client got it travels toward the backend and is translated like the
//! client's packets).
//!
//! Checksums: the ICMPv6 checksum covers the pseudo header (the outer addresses, folded in
//! with BPF_F_PSEUDO_HDR) and the whole message, so the quoted addresses and ports are folded
//! into it too. The quoted L4 checksum is left as it was (as for IPv4: receivers do not check
//! it in an error).

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use sluice_common::{
    CtKey6, Reason, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_REDIRECT, CT_F_SNAT,
    REASON_DROP_REWRITE_FAILED,
};

use super::{
    ct_lookup, nat, Icmp6Error, Scratch6, ICMP_OFF, INNER_L4_OFF, INNER_OFF, IPV6_DADDR_OFF,
    IPV6_SADDR_OFF,
};
use crate::parse::{ETH_HLEN, ICMP_CSUM_OFF};

use aya_ebpf::bindings::BPF_F_PSEUDO_HDR;

const CSUM_OFF: usize = ICMP_OFF + ICMP_CSUM_OFF;

/// Looks up the flow the error quotes, in direction `dir`: its entry in `s.entry`.
#[inline(always)]
fn lookup(s: &mut Scratch6, err: &Icmp6Error, dir: u8) -> bool {
    s.key = CtKey6 {
        saddr: err.inner_daddr,
        daddr: err.inner_saddr,
        sport: err.inner_dport,
        dport: err.inner_sport,
        proto: err.inner_proto,
        dir,
        _pad: 0,
    };
    ct_lookup(s)
}

/// At tc ingress: errors toward the client of flows that skip the host's routing, and every
/// error toward a backend.
#[inline(always)]
pub fn ingress(ctx: &TcContext, s: &mut Scratch6, err: &Icmp6Error) -> Result<i32, Reason> {
    let failed = |()| REASON_DROP_REWRITE_FAILED;
    if lookup(s, err, CT_DIR_REPLY) {
        if s.entry.flags & CT_F_REDIRECT == 0 {
            // Translated on the way out, like the flow's replies.
            return Ok(TC_ACT_OK);
        }
        let (saddr, daddr) = toward_client(ctx, s, err).map_err(failed)?;
        let flags = s.entry.flags;
        return nat::send(ctx, s, flags, err.hop_limit, saddr, daddr);
    }
    if lookup(s, err, CT_DIR_FORWARD) {
        let (saddr, daddr) = toward_backend(ctx, s, err).map_err(failed)?;
        let flags = s.entry.flags;
        return nat::send(ctx, s, flags, err.hop_limit, saddr, daddr);
    }
    Ok(TC_ACT_OK)
}

/// At tc egress: errors toward the client, as replies are.
#[inline(always)]
pub fn egress(ctx: &TcContext, s: &mut Scratch6, err: &Icmp6Error) -> Result<(), ()> {
    if lookup(s, err, CT_DIR_REPLY) {
        toward_client(ctx, s, err)?;
    }
    Ok(())
}

/// The quote client' -> backend becomes client -> frontend (reply entry in `s.entry`).
/// Returns the new outer addresses.
#[inline(always)]
fn toward_client(
    ctx: &TcContext,
    s: &Scratch6,
    err: &Icmp6Error,
) -> Result<([u32; 4], [u32; 4]), ()> {
    let entry = &s.entry;
    addr(
        ctx,
        INNER_OFF + IPV6_DADDR_OFF,
        &err.inner_daddr,
        &entry.nat_addr,
        0,
    )?;
    port(ctx, INNER_L4_OFF + 2, err.inner_dport, entry.nat_port)?;
    let mut daddr = err.daddr;
    if entry.flags & CT_F_SNAT != 0 {
        addr(
            ctx,
            INNER_OFF + IPV6_SADDR_OFF,
            &err.inner_saddr,
            &entry.snat_addr,
            0,
        )?;
        port(ctx, INNER_L4_OFF, err.inner_sport, entry.snat_port)?;
        daddr = entry.snat_addr;
    }
    let saddr = if err.saddr == err.inner_daddr {
        entry.nat_addr
    } else {
        err.saddr
    };
    outer(ctx, err, &saddr, &daddr)?;
    Ok((saddr, daddr))
}

/// The quote frontend -> client becomes backend -> client' (forward entry in `s.entry`).
/// Returns the new outer addresses.
#[inline(always)]
fn toward_backend(
    ctx: &TcContext,
    s: &Scratch6,
    err: &Icmp6Error,
) -> Result<([u32; 4], [u32; 4]), ()> {
    let entry = &s.entry;
    addr(
        ctx,
        INNER_OFF + IPV6_SADDR_OFF,
        &err.inner_saddr,
        &entry.nat_addr,
        0,
    )?;
    port(ctx, INNER_L4_OFF, err.inner_sport, entry.nat_port)?;
    let mut saddr = err.saddr;
    if entry.flags & CT_F_SNAT != 0 {
        addr(
            ctx,
            INNER_OFF + IPV6_DADDR_OFF,
            &err.inner_daddr,
            &entry.snat_addr,
            0,
        )?;
        port(ctx, INNER_L4_OFF + 2, err.inner_dport, entry.snat_port)?;
        if err.saddr == err.inner_daddr {
            saddr = entry.snat_addr;
        }
    }
    let daddr = entry.nat_addr;
    outer(ctx, err, &saddr, &daddr)?;
    Ok((saddr, daddr))
}

/// The outer header's addresses (in the ICMPv6 pseudo header).
#[inline(always)]
fn outer(ctx: &TcContext, err: &Icmp6Error, saddr: &[u32; 4], daddr: &[u32; 4]) -> Result<(), ()> {
    let pseudo = BPF_F_PSEUDO_HDR as u64;
    addr(ctx, ETH_HLEN + IPV6_SADDR_OFF, &err.saddr, saddr, pseudo)?;
    addr(ctx, ETH_HLEN + IPV6_DADDR_OFF, &err.daddr, daddr, pseudo)
}

/// Rewrites the address at `off` and folds the change into the ICMPv6 checksum.
#[inline(always)]
fn addr(ctx: &TcContext, off: usize, old: &[u32; 4], new: &[u32; 4], flags: u64) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    nat::addr_csum(ctx, CSUM_OFF, old, new, flags)?;
    ctx.store(off, new, 0).map_err(|_| ())
}

/// Rewrites a quoted port at `off` and folds the change into the ICMPv6 checksum.
#[inline(always)]
fn port(ctx: &TcContext, off: usize, old: u16, new: u16) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(CSUM_OFF, old as u64, new as u64, 2)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}
