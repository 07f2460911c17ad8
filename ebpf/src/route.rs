//! Where a translated packet goes next.
//!
//! A packet whose source became one of the node's addresses (masqueraded, or a reply
//! reverse-translated to come from a NodePort) must not go up the stack from tc ingress: the
//! kernel drops a packet received with a local source address as martian
//! (`fib_validate_source`). Such packets, and every packet of a flow that entered from outside
//! the node ([`sluice_common::CT_F_REDIRECT`]), are sent to the egress interface the routing
//! table gives with `bpf_fib_lookup` + `bpf_redirect_neigh`, as Cilium's NodePort path does;
//! only when the lookup finds no forwarding route (local delivery, no route, forwarding
//! disabled) does the packet go to the stack. Hairpin packets and the programs' own answers
//! are sent back out the interface they came in on, MAC addresses swapped.
//!
//! A packet sent on past the stack this way (redirected or hairpinned, not the programs' own
//! answers) skips the kernel's forwarding, so its IPv4 TTL is decremented here, header checksum
//! included, as `ip_forward` would. A packet whose TTL would reach 0 goes to the stack instead
//! (TC_ACT_OK), translated: the kernel's forwarding drops it and sends the ICMP time exceeded,
//! which the programs translate back like any error about the flow. (A masqueraded packet
//! handed up this way carries the node's address as source and is dropped as martian without
//! an error: the kernel does not answer those.)

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext,
};
use sluice_common::{CtValue, CT_F_HAIRPIN, CT_F_REDIRECT};

use crate::parse::{ETH_HLEN, IP_CSUM_OFF};

const AF_INET: u8 = 2;
/// Offset of the TTL in the IPv4 header (the 16-bit word it starts holds TTL, protocol).
const IP_TTL_OFF: usize = 8;

/// The interface the packet is on (at tc ingress: the one it arrived on).
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context is the program's __sk_buff.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The verdict for a packet of the flow `entry` translated to `saddr -> daddr`: sent back out
/// its interface (hairpin), redirected per the FIB (flows that skip the host's routing), or
/// handed to the stack.
#[inline(always)]
pub fn send(ctx: &TcContext, entry: &CtValue, saddr: u32, daddr: u32) -> Result<i32, ()> {
    if entry.flags & CT_F_HAIRPIN != 0 {
        if !decrement_ttl(ctx)? {
            return Ok(TC_ACT_OK);
        }
        bounce(ctx)
    } else if entry.flags & CT_F_REDIRECT != 0 {
        via_fib(ctx, saddr, daddr)
    } else {
        Ok(TC_ACT_OK)
    }
}

/// Decrements the IPv4 TTL of a packet the programs forward themselves, updating the header
/// checksum; `false` (packet unchanged) when it would reach 0: the stack must handle it.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext) -> Result<bool, ()> {
    let word: [u8; 2] = ctx.load(ETH_HLEN + IP_TTL_OFF).map_err(|_| ())?;
    if word[0] <= 1 {
        return Ok(false);
    }
    let new = [word[0] - 1, word[1]];
    ctx.l3_csum_replace(
        ETH_HLEN + IP_CSUM_OFF,
        u16::from_ne_bytes(word) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )
    .map_err(|_| ())?;
    ctx.store(ETH_HLEN + IP_TTL_OFF, &new[0], 0)
        .map_err(|_| ())?;
    Ok(true)
}

/// Redirects the packet to the egress interface and next hop the FIB has for `daddr`, its TTL
/// decremented; TC_ACT_OK (the stack routes it) when there is no forwarding route or the TTL
/// is spent.
#[inline(always)]
fn via_fib(ctx: &TcContext, saddr: u32, daddr: u32) -> Result<i32, ()> {
    // SAFETY: a plain C struct; all zeroes is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    params.ifindex = ifindex(ctx);
    // tot_len stays 0: the kernel then checks the skb against the egress MTU itself, GSO-aware.
    // SAFETY: params is a valid bpf_fib_lookup of the size given.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Ok(TC_ACT_OK);
    }
    if !decrement_ttl(ctx)? {
        return Ok(TC_ACT_OK);
    }
    let redirected = if params.family == AF_INET {
        // The next hop (gateway, or the destination on a connected route): the kernel resolves
        // its neighbour entry (and queues the packet while it does) and writes the MAC header.
        let mut nh = bpf_redir_neigh {
            nh_family: AF_INET as u32,
            __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                // SAFETY: the lookup filled the IPv4 member for an IPv4 result.
                ipv4_nh: unsafe { params.__bindgen_anon_4.ipv4_dst },
            },
        };
        // SAFETY: nh is valid for its size.
        unsafe {
            bpf_redirect_neigh(
                params.ifindex,
                &mut nh,
                size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        }
    } else {
        // An IPv6 next hop for an IPv4 route: let the kernel look it up again.
        // SAFETY: a NULL neighbour with length 0 is the documented "look it up" form.
        unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    Ok(redirected as i32)
}

/// Sends the packet back out the interface it came in on, MAC addresses swapped: hairpin
/// traffic, and the programs' own answers (TCP RST, ICMP unreachable).
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> Result<i32, ()> {
    let macs: [u16; 6] = ctx.load(0).map_err(|_| ())?;
    let swapped = [macs[3], macs[4], macs[5], macs[0], macs[1], macs[2]];
    ctx.store(0, &swapped, 0).map_err(|_| ())?;
    // SAFETY: a helper call with plain arguments.
    Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}
