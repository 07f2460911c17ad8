//! NetworkPolicy: new connections of this node's pods checked against the compiled policy
//! (`isolated`, `policy`), admitted flows remembered (`policy_flows`) so their later packets
//! and replies pass without a check, drops counted and streamed (`policy_events`). Layout and
//! the reasoning: `sluice-common`, "NetworkPolicy".

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    maps::{lpm_trie::Key, HashMap, LruHashMap},
};
use sluice_common::{
    policy_prefix_len, PolicyEvent, PolicyFlowKey, PolicyKey, Reason, CT_DIR_FORWARD,
    ISOLATED_EGRESS, ISOLATED_INGRESS, MAX_POLICY_PORT_RANGES, PROTO_TCP,
    REASON_DROP_POLICY_EGRESS, REASON_DROP_POLICY_INGRESS, REASON_POLICY_REPLIED_FULL, WAY_EGRESS,
    WAY_INGRESS,
};

use crate::{
    conntrack,
    maps::{ISOLATED, POLICY, POLICY_EVENTS, POLICY_FLOWS, POLICY_REPLIED},
    parse::{Ipv4Packet, TCP_FLAG_FIN, TCP_FLAG_RST},
    stats,
};

/// Whether a policy isolates `pod` in direction `way` (a small map, the node's pods).
#[inline(always)]
fn isolated(pod: u32, way: u8) -> bool {
    let bit = if way == WAY_INGRESS {
        ISOLATED_INGRESS
    } else {
        ISOLATED_EGRESS
    };
    // SAFETY: a u8 copied out at once.
    let isolated = unsafe { ISOLATED.get(pod).copied() }.unwrap_or(0);
    isolated & bit != 0
}

/// Whether `pod` may have a new `proto` connection with `peer` to `port` (network byte order)
/// in direction `way`: open when the pod is not isolated for it, else one longest-prefix lookup
/// and a scan of at most [`MAX_POLICY_PORT_RANGES`] ranges.
#[inline(always)]
fn allowed(pod: u32, way: u8, proto: u8, peer: u32, port: u16) -> bool {
    allowed_when(isolated(pod, way), pod, way, proto, peer, port)
}

/// [`allowed`], with whether the pod is isolated in `way` already known.
#[inline(always)]
fn allowed_when(isolated: bool, pod: u32, way: u8, proto: u8, peer: u32, port: u16) -> bool {
    if !isolated {
        return true;
    }
    let key = Key::new(
        policy_prefix_len(32),
        PolicyKey {
            pod,
            way,
            proto,
            _pad: 0,
            peer,
        },
    );
    let Some(value) = POLICY.get(&key) else {
        return false;
    };
    let port = u16::from_be(port);
    for i in 0..MAX_POLICY_PORT_RANGES {
        if i as u32 >= value.count {
            break;
        }
        let range = value.ranges[i];
        if range.first <= port && port <= range.last {
            return true;
        }
    }
    false
}

#[inline(always)]
fn flow_key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, way: u8) -> PolicyFlowKey {
    PolicyFlowKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        way,
        _pad: 0,
    }
}

/// UDP and SCTP flows idle this long are new again (nf_conntrack's UDP stream timeout): a
/// client reusing the tuple later is checked against the policy of the day. TCP flows do not
/// expire (a new connection is a SYN, always checked).
const IDLE_FLOW_NS: u64 = 120_000_000_000;
/// A flow's last-seen time is refreshed at most this often (a store per packet otherwise).
const REFRESH_NS: u64 = 1_000_000_000;

/// Whether the flow under `key` (of protocol `proto`) was admitted and, but for TCP, seen
/// within [`IDLE_FLOW_NS`]; refreshes it. Admitted flows live in two maps, as conntrack's:
/// `answered` (a plain hash nothing evicts) for flows that had a reply, `flows` (an LRU) for
/// the others, so a flood of new flows cannot evict an established one. A `reply` (the packet
/// matched the reversed tuple) moves its flow to `answered` (when full it stays, counted:
/// [`REASON_POLICY_REPLIED_FULL`]); a TCP FIN or RST moves it back to the LRU: a closing
/// connection needs no protection, and the agent expires the rest by idle time. Both
/// families' maps go through here.
#[inline(always)]
pub fn known_in<K>(
    answered: &HashMap<K, u64>,
    flows: &LruHashMap<K, u64>,
    key: &K,
    proto: u8,
    tcp_flags: u8,
    reply: bool,
    now: u64,
) -> bool {
    let closing = tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
    if let Some(seen) = answered.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; a racing store of another CPU is a time as good.
        let last = unsafe { *seen };
        let idle = now.saturating_sub(last);
        if proto != PROTO_TCP && idle > IDLE_FLOW_NS {
            return false;
        }
        if closing {
            let _ = flows.insert(key, now, 0);
            let _ = answered.remove(key);
        } else if idle > REFRESH_NS {
            // SAFETY: as above.
            unsafe { *seen = now };
        }
        return true;
    }
    let Some(seen) = flows.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: as above.
    let last = unsafe { *seen };
    let idle = now.saturating_sub(last);
    if proto != PROTO_TCP && idle > IDLE_FLOW_NS {
        return false;
    }
    if reply && !closing {
        if answered.insert(key, now, 0).is_ok() {
            let _ = flows.remove(key);
        } else {
            stats::count(REASON_POLICY_REPLIED_FULL);
        }
    } else if idle > REFRESH_NS {
        // SAFETY: as above.
        unsafe { *seen = now };
    }
    true
}

/// [`known_in`] for IPv4.
#[inline(always)]
fn known(key: &PolicyFlowKey, tcp_flags: u8, reply: bool, now: u64) -> bool {
    known_in(
        &POLICY_REPLIED,
        &POLICY_FLOWS,
        key,
        key.proto,
        tcp_flags,
        reply,
        now,
    )
}

/// Whether the packet belongs to a flow already admitted: recorded in `way` under its own
/// tuple (a later packet of the flow; a TCP SYN opens a new connection and is checked again),
/// or in the other direction under the reversed tuple (a reply).
#[inline(always)]
fn admitted(pkt: &Ipv4Packet, way: u8, now: u64) -> bool {
    let other = if way == WAY_INGRESS {
        WAY_EGRESS
    } else {
        WAY_INGRESS
    };
    let own = flow_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, way);
    if !pkt.is_tcp_syn() && known(&own, pkt.tcp_flags, false, now) {
        return true;
    }
    known(
        &flow_key(pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, pkt.proto, other),
        pkt.tcp_flags,
        true,
        now,
    )
}

/// Remembers an admitted flow (unanswered: the LRU). An LRU map evicts instead of failing; a
/// failed write only means the next packet is checked again.
#[inline(always)]
fn record(pkt: &Ipv4Packet, way: u8, now: u64) {
    let key = flow_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, way);
    let _ = POLICY_FLOWS.insert(key, now, 0);
}

/// Streams a policy drop to `sluice monitor` (lost when the ring is full; counted anyway).
#[inline(always)]
fn report(pod: u32, peer: u32, pod_port: u16, peer_port: u16, proto: u8, way: u8, reason: Reason) {
    let event = PolicyEvent {
        pod,
        peer,
        pod_port,
        peer_port,
        proto,
        way,
        _pad: 0,
        reason,
        _pad2: 0,
        // SAFETY: a helper call without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = POLICY_EVENTS.output::<PolicyEvent>(event, 0);
}

/// Egress of a new service flow from a pod, against the chosen backend (`backend`:`port`,
/// network byte order). Its later packets and replies are `conntrack`'s: nothing is recorded.
#[inline(always)]
pub fn egress_to_backend(pkt: &Ipv4Packet, backend: u32, port: u16) -> Result<(), Reason> {
    if allowed(pkt.saddr, WAY_EGRESS, pkt.proto, backend, port) {
        return Ok(());
    }
    report(
        pkt.saddr,
        backend,
        pkt.sport,
        port,
        pkt.proto,
        WAY_EGRESS,
        REASON_DROP_POLICY_EGRESS,
    );
    Err(REASON_DROP_POLICY_EGRESS)
}

/// For a TCP SYN, whether `pod` is isolated in direction `way` (looked up once, reused by the
/// check); `None` for other packets, which look it up only when they are not of an admitted
/// flow. A SYN of a pod that is not isolated passes (and is recorded) whatever an admitted flow
/// would say, so the lookups for one are skipped: a SYN can only match the reversed tuple of
/// a flow admitted the other way in a simultaneous open, which passes either way.
#[inline(always)]
fn syn_isolation(pkt: &Ipv4Packet, pod: u32, way: u8) -> Option<bool> {
    pkt.is_tcp_syn().then(|| isolated(pod, way))
}

/// A packet a pod sends that is not a service flow's (`from_pod`): passes when its flow was
/// admitted, else it opens one, checked against the pod's egress policy and recorded.
#[inline(always)]
pub fn from_pod(pkt: &Ipv4Packet) -> Result<(), Reason> {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let syn_isolated = syn_isolation(pkt, pkt.saddr, WAY_EGRESS);
    if syn_isolated == Some(false) {
        record(pkt, WAY_EGRESS, now);
        return Ok(());
    }
    if admitted(pkt, WAY_EGRESS, now) {
        return Ok(());
    }
    let isolated = syn_isolated.unwrap_or_else(|| isolated(pkt.saddr, WAY_EGRESS));
    if !allowed_when(
        isolated, pkt.saddr, WAY_EGRESS, pkt.proto, pkt.daddr, pkt.dport,
    ) {
        report(
            pkt.saddr,
            pkt.daddr,
            pkt.sport,
            pkt.dport,
            pkt.proto,
            WAY_EGRESS,
            REASON_DROP_POLICY_EGRESS,
        );
        return Err(REASON_DROP_POLICY_EGRESS);
    }
    record(pkt, WAY_EGRESS, now);
    Ok(())
}

/// A packet delivered to a pod (`to_pod`) that is not the reply of a translated flow still to
/// be reverse-translated: passes when its flow was admitted or it answers the pod's own
/// service flow (already reverse-translated where it entered: the pod's forward `conntrack`
/// entry), else it opens a flow, checked against the pod's ingress policy and recorded.
#[inline(always)]
pub fn to_pod(pkt: &Ipv4Packet) -> Result<(), Reason> {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let syn_isolated = syn_isolation(pkt, pkt.daddr, WAY_INGRESS);
    if syn_isolated == Some(false) {
        record(pkt, WAY_INGRESS, now);
        return Ok(());
    }
    if admitted(pkt, WAY_INGRESS, now) {
        return Ok(());
    }
    let mut answered = conntrack::key(pkt, CT_DIR_FORWARD);
    answered.saddr = pkt.daddr;
    answered.daddr = pkt.saddr;
    answered.sport = pkt.dport;
    answered.dport = pkt.sport;
    if conntrack::lookup(&answered).is_some() {
        return Ok(());
    }
    let isolated = syn_isolated.unwrap_or_else(|| isolated(pkt.daddr, WAY_INGRESS));
    if !allowed_when(
        isolated,
        pkt.daddr,
        WAY_INGRESS,
        pkt.proto,
        pkt.saddr,
        pkt.dport,
    ) {
        report(
            pkt.daddr,
            pkt.saddr,
            pkt.dport,
            pkt.sport,
            pkt.proto,
            WAY_INGRESS,
            REASON_DROP_POLICY_INGRESS,
        );
        return Err(REASON_DROP_POLICY_INGRESS);
    }
    record(pkt, WAY_INGRESS, now);
    Ok(())
}
