//! A new IPv6 flow: its frontend, source ranges, backend (sessionAffinity or random), source
//! NAT and conntrack entries; the IPv6 twins of lb.rs, masq.rs and conntrack::create.

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_get_prandom_u32};
use sluice_common::{
    source_range_prefix_len, Backend6, BackendKey, NodeConfig6, Reason, ServiceKey6, ServiceValue,
    SourceRangeKey6, BACKEND_F_LOCAL, CONFIG_F_MASQUERADE_ALL, CT_DIR_REPLY, CT_F_HAIRPIN,
    CT_F_REDIRECT, CT_F_SNAT, CT_SLOT_UNKNOWN, HAIRPIN6_SNAT_ADDR, MAX_CLUSTER_CIDRS, PROTO_TCP,
    REASON_DROP_NO_LOCAL_ENDPOINTS, REASON_DROP_NO_SNAT_PORT, REASON_DROP_SOURCE_RANGE,
    REASON_DROP_TCP_NO_FLOW, SCOPE_ALL, SCOPE_POD, SVC_F_AFFINITY, SVC_F_DROP_WHEN_EMPTY,
    SVC_F_EXTERNAL, SVC_F_EXTERNAL_LOCAL, SVC_F_SOURCE_RANGES,
};

use super::{Ipv6Packet, Scratch6};
use crate::{
    conntrack,
    lb::SYN_RETRANSMIT_NS,
    maps::{AFFINITY6, BACKENDS6, CONFIG6, SERVICES6, SOURCE_RANGES6},
    Hook,
};

/// The frontend the packet is addressed to; a packet from a pod uses the frontend's pods'
/// entry ([`SCOPE_POD`]) when it has one (only a frontend with [`SVC_F_EXTERNAL_LOCAL`] can),
/// as lb::service.
#[inline(always)]
pub fn service(pkt: &Ipv6Packet, hook: Hook) -> Option<ServiceValue> {
    let mut key = ServiceKey6 {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_ALL,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let all = unsafe { SERVICES6.get(key).copied() };
    if hook == Hook::Pod && all.is_some_and(|v| v.flags & SVC_F_EXTERNAL_LOCAL != 0) {
        key.scope = SCOPE_POD;
        // SAFETY: as above.
        if let Some(value) = unsafe { SERVICES6.get(key) } {
            return Some(*value);
        }
    }
    all
}

/// Whether the packet's source is in one of the service's loadBalancerSourceRanges.
#[inline(always)]
fn source_allowed(s: &mut Scratch6, service_id: u32, saddr: [u32; 4]) -> bool {
    s.range_key.prefix_len = source_range_prefix_len(128);
    s.range_key.data = SourceRangeKey6 {
        service_id,
        addr: saddr,
    };
    SOURCE_RANGES6.get(&s.range_key).is_some()
}

/// A new flow (or a TCP SYN starting a new connection) to `service`: steps 6 to 10. On
/// success `s.entry` is the flow's forward entry and the result `None`; `Some(action)`: the
/// packet is handled without a backend (passed, or [`super::REJECT`]ed).
#[inline(always)]
pub fn new_flow(
    s: &mut Scratch6,
    pkt: &Ipv6Packet,
    service: &ServiceValue,
    hook: Hook,
    now: u64,
) -> Result<Option<i32>, Reason> {
    if service.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(s, service.id, pkt.saddr) {
        return Err(REASON_DROP_SOURCE_RANGE);
    }
    if service.backend_count == 0 {
        if service.flags & SVC_F_DROP_WHEN_EMPTY != 0 {
            return Err(REASON_DROP_NO_LOCAL_ENDPOINTS);
        }
        return Ok(Some(super::REJECT));
    }
    let Some((backend, slot)) = select(s, service, pkt.saddr, now) else {
        // The service lost its backends between the two reads: as if it had none yet.
        return Ok(Some(TC_ACT_OK));
    };
    if hook == Hook::Pod {
        // Egress policy judges the backend, not the frontend.
        super::policy::egress_to_backend(s, pkt, &backend.addr, backend.port)?;
    }
    if pkt.proto == PROTO_TCP && !pkt.is_tcp_syn() {
        // Mid-connection, and nobody remembers its backend (as for IPv4).
        return Err(REASON_DROP_TCP_NO_FLOW);
    }
    let (snat_addr, flags) = masquerade(service, &backend, pkt, hook);
    create(s, pkt, service.id, &backend, slot, snat_addr, flags, now)?;
    Ok(None)
}

/// The backend of a new flow from `client` and its slot ([`CT_SLOT_UNKNOWN`] for an affinity
/// backend), as lb::select: the client's affinity backend while fresh (refreshed), else a
/// random one (remembered, with affinity).
#[inline(always)]
fn select(
    s: &mut Scratch6,
    service: &ServiceValue,
    client: [u32; 4],
    now: u64,
) -> Option<(Backend6, u32)> {
    if service.flags & SVC_F_AFFINITY == 0 {
        return random_backend(service);
    }
    let (backend, slot) = match affinity_backend(s, service, client, now) {
        Some(backend) => (backend, CT_SLOT_UNKNOWN),
        None => random_backend(service)?,
    };
    remember(s, backend, now);
    Some((backend, slot))
}

/// The client's affinity backend if used within the service's timeout; leaves the key in
/// `s.affinity_key`.
#[inline(always)]
fn affinity_backend(
    s: &mut Scratch6,
    service: &ServiceValue,
    client: [u32; 4],
    now: u64,
) -> Option<Backend6> {
    s.affinity_key.affinity_id = service.affinity_id;
    s.affinity_key.client = client;
    // SAFETY: the value is copied out at once.
    let entry = unsafe { AFFINITY6.get(&s.affinity_key) }?;
    let timeout_ns = service.affinity_timeout as u64 * 1_000_000_000;
    (now.wrapping_sub(entry.last_used_ns) < timeout_ns).then_some(entry.backend)
}

/// Records `backend` as the client's (key in `s.affinity_key`), used now.
#[inline(always)]
fn remember(s: &mut Scratch6, backend: Backend6, now: u64) {
    s.affinity.backend = backend;
    s.affinity._pad = 0;
    s.affinity.last_used_ns = now;
    // An LRU map evicts rather than fails; a failed write only loses the affinity.
    let _ = AFFINITY6.insert(&s.affinity_key, &s.affinity, 0);
}

/// Whether a TCP SYN of a tuple whose forward entry is `s.entry` keeps its backend, as
/// lb::keep_on_syn: a retransmission (young entry, backend still in its slot), or the
/// client's fresh affinity backend (refreshed).
#[inline(always)]
pub fn keep_on_syn(s: &mut Scratch6, service: &ServiceValue, client: [u32; 4], now: u64) -> bool {
    if s.entry.service_id != service.id {
        return false;
    }
    if now.wrapping_sub(s.entry.created_ns) < SYN_RETRANSMIT_NS && still_in_slot(s, service) {
        return true;
    }
    if service.flags & SVC_F_AFFINITY == 0 {
        return false;
    }
    match affinity_backend(s, service, client, now) {
        Some(backend) if backend.addr == s.entry.nat_addr && backend.port == s.entry.nat_port => {
            remember(s, backend, now);
            true
        }
        _ => false,
    }
}

#[inline(always)]
fn still_in_slot(s: &Scratch6, service: &ServiceValue) -> bool {
    if s.entry.backend_slot >= service.backend_count {
        return false;
    }
    let key = BackendKey {
        service_id: service.id,
        slot: s.entry.backend_slot,
    };
    // SAFETY: the value is read at once.
    match unsafe { BACKENDS6.get(key) } {
        Some(b) => b.addr == s.entry.nat_addr && b.port == s.entry.nat_port,
        None => false,
    }
}

#[inline(always)]
fn random_backend(service: &ServiceValue) -> Option<(Backend6, u32)> {
    if service.backend_count == 0 {
        return None;
    }
    // SAFETY: a helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let mut key = BackendKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: the values are copied out at once.
    match unsafe { BACKENDS6.get(key) } {
        Some(b) => Some((*b, slot)),
        None => {
            // A shrinking service: slot 0 exists while the count is not zero.
            key.slot = 0;
            unsafe { BACKENDS6.get(key).copied() }.map(|b| (b, 0))
        }
    }
}

/// [`HAIRPIN6_SNAT_ADDR`] as the maps and the packet hold it.
#[inline(always)]
fn hairpin_addr() -> [u32; 4] {
    let a = HAIRPIN6_SNAT_ADDR;
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Whether `addr` is in one of the IPv6 cluster CIDRs.
#[inline(always)]
fn in_cluster(config: &NodeConfig6, addr: &[u32; 4]) -> bool {
    for i in 0..MAX_CLUSTER_CIDRS {
        if i as u32 >= config.cidr_count {
            break;
        }
        let cidr = &config.cluster_cidrs[i];
        if addr[0] & cidr.mask[0] == cidr.net[0]
            && addr[1] & cidr.mask[1] == cidr.net[1]
            && addr[2] & cidr.mask[2] == cidr.net[2]
            && addr[3] & cidr.mask[3] == cidr.net[3]
        {
            return true;
        }
    }
    false
}

/// The source NAT of a new flow and its conntrack flags, as masq::decide for IPv4: hairpin
/// (the service loopback address, bounced); externalTrafficPolicy Local: never; else, with a
/// node IPv6 address, masqueradeAll, an external frontend reached from outside the node
/// balanced to a remote backend, or a source outside the IPv6 cluster CIDRs (except external
/// traffic to a local backend): the node's address, redirected per the FIB both ways.
/// `None`: not source-NATed (through the host's routing).
#[inline(always)]
fn masquerade(
    service: &ServiceValue,
    backend: &Backend6,
    pkt: &Ipv6Packet,
    hook: Hook,
) -> (Option<[u32; 4]>, u16) {
    if hook == Hook::Pod && backend.addr == pkt.saddr {
        return (
            Some(hairpin_addr()),
            CT_F_SNAT | CT_F_REDIRECT | CT_F_HAIRPIN,
        );
    }
    let Some(config) = CONFIG6.get(0) else {
        return (None, 0);
    };
    if service.flags & SVC_F_EXTERNAL_LOCAL != 0 || config.node_ip == [0; 4] {
        return (None, 0);
    }
    let external = service.flags & SVC_F_EXTERNAL != 0;
    let local = backend.flags & BACKEND_F_LOCAL != 0;
    let masquerade = config.flags & CONFIG_F_MASQUERADE_ALL != 0
        || (external && hook == Hook::World && !local)
        || (config.cidr_count > 0 && !(external && local) && !in_cluster(config, &pkt.saddr));
    if masquerade {
        (Some(config.node_ip), CT_F_SNAT | CT_F_REDIRECT)
    } else {
        (None, 0)
    }
}

// create() writes the conntrack key and values field by field into the scratch (whole struct
// literals there made LLVM emit code the verifier rejects, "R5 !read_ok"): a field added to
// CtKey6 or CtValue6 must be written there too, or it keeps an earlier packet's value. These
// sizes make such a change fail to build until create() is looked at.
const _: () = assert!(core::mem::size_of::<sluice_common::CtKey6>() == 40);
const _: () = assert!(core::mem::size_of::<sluice_common::CtValue6>() == 64);

/// Records the new flow (forward entry in `s.entry`, with the forward key in `s.key`), as
/// conntrack::create: a masqueraded flow claims a source port that makes its reply tuple
/// unique (conntrack::claim_port6).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn create(
    s: &mut Scratch6,
    pkt: &Ipv6Packet,
    service_id: u32,
    backend: &Backend6,
    slot: u32,
    snat_addr: Option<[u32; 4]>,
    flags: u16,
    now: u64,
) -> Result<(), Reason> {
    s.entry.nat_addr = backend.addr;
    s.entry.nat_port = backend.port;
    s.entry.flags = flags;
    s.entry.snat_addr = [0; 4];
    s.entry.snat_port = 0;
    s.entry.state = 0;
    s.entry._pad = 0;
    s.entry.service_id = service_id;
    s.entry.backend_slot = slot;
    s.entry.created_ns = now;
    s.entry.last_seen_ns = now;
    s.reply = s.entry;
    s.reply.nat_addr = pkt.daddr;
    s.reply.nat_port = pkt.dport;
    s.reply_key.saddr = backend.addr;
    s.reply_key.daddr = pkt.saddr;
    s.reply_key.sport = backend.port;
    s.reply_key.dport = pkt.sport;
    s.reply_key.proto = pkt.proto;
    s.reply_key.dir = CT_DIR_REPLY;
    s.reply_key._pad = 0;
    match snat_addr {
        None => conntrack::insert6(&s.reply_key, &s.reply),
        Some(addr) => {
            s.reply.snat_addr = pkt.saddr;
            s.reply.snat_port = pkt.sport;
            s.reply_key.daddr = addr;
            let keep_client_port = flags & CT_F_HAIRPIN != 0;
            let kept = conntrack::client_port_first(pkt.sport, keep_client_port)
                && conntrack::claim6(&s.reply_key, &s.reply);
            if !kept && !conntrack::claim_port6(&mut s.reply_key, &s.reply) {
                return Err(REASON_DROP_NO_SNAT_PORT);
            }
            s.entry.snat_addr = addr;
            s.entry.snat_port = s.reply_key.dport;
        }
    }
    conntrack::insert6(&s.key, &s.entry);
    Ok(())
}
