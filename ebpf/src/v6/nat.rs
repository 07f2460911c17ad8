//! IPv6 address and port translation, and where a translated packet goes.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext,
};
use sluice_common::{
    crc32c, CtValue6, Reason, CT_F_HAIRPIN, CT_F_REDIRECT, CT_F_SNAT, PROTO_SCTP, PROTO_UDP,
    REASON_DROP_REWRITE_FAILED,
};

use super::{Ipv6Packet, Scratch6, IPV6_DADDR_OFF, IPV6_HOP_LIMIT_OFF, IPV6_SADDR_OFF};
use crate::{parse::ETH_HLEN, route};

const AF_INET6: u8 = 10;

/// A client's packet: destination to the backend and, masqueraded, source to the
/// masquerade address.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Ipv6Packet, entry: &CtValue6) -> Result<(), ()> {
    rewrite(
        ctx,
        pkt,
        IPV6_DADDR_OFF,
        2,
        (pkt.daddr, pkt.dport),
        (entry.nat_addr, entry.nat_port),
    )?;
    if entry.flags & CT_F_SNAT != 0 {
        rewrite(
            ctx,
            pkt,
            IPV6_SADDR_OFF,
            0,
            (pkt.saddr, pkt.sport),
            (entry.snat_addr, entry.snat_port),
        )?;
    }
    Ok(())
}

/// A reply: source back to the frontend and, masqueraded, destination back to the client.
#[inline(always)]
pub fn reverse(ctx: &TcContext, pkt: &Ipv6Packet, entry: &CtValue6) -> Result<(), ()> {
    rewrite(
        ctx,
        pkt,
        IPV6_SADDR_OFF,
        0,
        (pkt.saddr, pkt.sport),
        (entry.nat_addr, entry.nat_port),
    )?;
    if entry.flags & CT_F_SNAT != 0 {
        rewrite(
            ctx,
            pkt,
            IPV6_DADDR_OFF,
            2,
            (pkt.daddr, pkt.dport),
            (entry.snat_addr, entry.snat_port),
        )?;
    }
    Ok(())
}

/// (source, destination) of a client's packet after [`forward`].
#[inline(always)]
pub fn forwarded_addrs(pkt: &Ipv6Packet, entry: &CtValue6) -> ([u32; 4], [u32; 4]) {
    let saddr = if entry.flags & CT_F_SNAT != 0 {
        entry.snat_addr
    } else {
        pkt.saddr
    };
    (saddr, entry.nat_addr)
}

/// (source, destination) of a reply after [`reverse`].
#[inline(always)]
pub fn reversed_addrs(pkt: &Ipv6Packet, entry: &CtValue6) -> ([u32; 4], [u32; 4]) {
    let daddr = if entry.flags & CT_F_SNAT != 0 {
        entry.snat_addr
    } else {
        pkt.daddr
    };
    (entry.nat_addr, daddr)
}

/// Where a translated packet of a flow with conntrack flags `flags` (now `saddr -> daddr`,
/// hop limit `hop_limit`) goes: back out its interface (hairpin), per the FIB (flows that
/// skip the host's routing), or to the stack.
///
/// A redirected packet skips the kernel's forwarding, which would decrement its hop limit:
/// it is decremented here. A packet that arrived with a hop limit of 1 (or 0) goes to the
/// stack instead, translated: the kernel forwards it like any routed packet, so it discards it
/// and sends the time exceeded. (That error reaches the client, and is translated back on its
/// way out, when the client's address was kept; about a masqueraded packet it goes to the
/// node's own address and ends there.)
#[inline(always)]
pub fn send(
    ctx: &TcContext,
    s: &mut Scratch6,
    flags: u16,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
) -> Result<i32, Reason> {
    if flags & (CT_F_HAIRPIN | CT_F_REDIRECT) == 0 || hop_limit <= 1 {
        return Ok(TC_ACT_OK);
    }
    ctx.store(ETH_HLEN + IPV6_HOP_LIMIT_OFF, &(hop_limit - 1), 0)
        .map_err(|_| REASON_DROP_REWRITE_FAILED)?;
    if flags & CT_F_HAIRPIN != 0 {
        return route::bounce(ctx).map_err(|()| REASON_DROP_REWRITE_FAILED);
    }
    Ok(via_fib(ctx, &mut s.fib, saddr, daddr))
}

/// Redirects the packet to the egress interface and next hop the FIB has for `daddr`
/// (`bpf_fib_lookup` + `bpf_redirect_neigh`, as `route::via_fib` for IPv4); TC_ACT_OK (the
/// stack routes it) when there is no forwarding route.
#[inline(always)]
fn via_fib(ctx: &TcContext, params: &mut bpf_fib_lookup, saddr: [u32; 4], daddr: [u32; 4]) -> i32 {
    // SAFETY: a plain C struct; all zeroes is a valid value.
    *params = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.__bindgen_anon_3.ipv6_src = saddr;
    params.__bindgen_anon_4.ipv6_dst = daddr;
    // SAFETY: the context is the program's __sk_buff.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: params is a valid bpf_fib_lookup of the size given.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), params, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_OK;
    }
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET6 as u32,
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            // SAFETY: the lookup filled the IPv6 member for an IPv6 lookup.
            ipv6_nh: unsafe { params.__bindgen_anon_4.ipv6_dst },
        },
    };
    // SAFETY: nh is valid for its size.
    (unsafe {
        bpf_redirect_neigh(
            params.ifindex,
            &mut nh,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    }) as i32
}

/// Rewrites the address at `ip_field` of the IPv6 header and the port at `port_field` of the
/// L4 header from `old` to `new` (address, port).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Ipv6Packet,
    ip_field: usize,
    port_field: usize,
    (old_addr, old_port): ([u32; 4], u16),
    (new_addr, new_port): ([u32; 4], u16),
) -> Result<(), ()> {
    let csum_off = pkt.l4_csum_off();
    // A UDP checksum of 0 is invalid in IPv6, but never turn one into 0 either.
    let mangled0 = if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old_addr != new_addr {
        if pkt.proto != PROTO_SCTP {
            addr_csum(
                ctx,
                csum_off,
                &old_addr,
                &new_addr,
                BPF_F_PSEUDO_HDR as u64 | mangled0,
            )?;
        }
        ctx.store(ETH_HLEN + ip_field, &new_addr, 0)
            .map_err(|_| ())?;
    }
    if old_port != new_port {
        if pkt.proto == PROTO_SCTP {
            let old = old_port.to_ne_bytes();
            let new = new_port.to_ne_bytes();
            let trailing = (pkt.payload_len as usize).saturating_sub(port_field + 2) as u32;
            let delta = crc32c::delta2([old[0] ^ new[0], old[1] ^ new[1]], trailing & 0xffff);
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

/// Folds the change of a 128-bit address into the checksum at `csum_off`, one call per changed
/// 32-bit word; `flags`: BPF_F_PSEUDO_HDR when the address is in the pseudo header the
/// checksum covers (not when it sits in an ICMPv6 error's quote, part of the message itself).
#[inline(always)]
pub fn addr_csum(
    ctx: &TcContext,
    csum_off: usize,
    old: &[u32; 4],
    new: &[u32; 4],
    flags: u64,
) -> Result<(), ()> {
    for i in 0..4 {
        if old[i] != new[i] {
            ctx.l4_csum_replace(csum_off, old[i] as u64, new[i] as u64, flags | 4)
                .map_err(|_| ())?;
        }
    }
    Ok(())
}
