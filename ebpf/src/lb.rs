//! Service lookup and backend selection: the frontend, its loadBalancerSourceRanges, its
//! sessionAffinity, a random slot otherwise.

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use sluice_common::{
    source_range_prefix_len, AffinityKey, AffinityValue, Backend, BackendKey, CtValue, ServiceKey,
    ServiceValue, SourceRangeKey, CT_SLOT_UNKNOWN, INLINE_BACKENDS, SCOPE_ALL, SCOPE_POD,
    SVC_F_AFFINITY, SVC_F_EXTERNAL_LOCAL,
};

use crate::{
    maps::{AFFINITY, BACKENDS, SERVICES, SOURCE_RANGES},
    parse::Ipv4Packet,
    Hook,
};

/// A TCP SYN whose tuple still has a conntrack entry younger than this is taken for a
/// retransmission of the SYN that created it (Linux retransmits a SYN after 1 s,
/// TCP_TIMEOUT_INIT), not for a new connection reusing the client's port, and keeps the entry's
/// backend: re-balancing it could answer the client's ACK from another backend than its SYN-ACK.
pub const SYN_RETRANSMIT_NS: u64 = 1_500_000_000;

/// The frontend the packet is addressed to. A packet from a pod (`hook` [`Hook::Pod`]) uses
/// the frontend's pods' entry when it has one ([`SCOPE_POD`]: the cluster-wide backends of an
/// externalTrafficPolicy Local frontend). Only such a frontend ([`SVC_F_EXTERNAL_LOCAL`] in its
/// [`SCOPE_ALL`] entry) can have one, so every other packet costs one lookup: the services map
/// is large and its entries are cold at scale, each lookup a cache miss or two.
#[inline(always)]
pub fn service(pkt: &Ipv4Packet, hook: Hook) -> Option<ServiceValue> {
    let mut key = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_ALL,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let all = unsafe { SERVICES.get(key).copied() };
    if hook == Hook::Pod && all.is_some_and(|v| v.flags & SVC_F_EXTERNAL_LOCAL != 0) {
        key.scope = SCOPE_POD;
        // SAFETY: as above.
        if let Some(value) = unsafe { SERVICES.get(key) } {
            return Some(*value);
        }
    }
    all
}

/// Whether `saddr` is in one of the service's loadBalancerSourceRanges.
#[inline(always)]
pub fn source_allowed(service_id: u32, saddr: u32) -> bool {
    let key = Key::new(
        source_range_prefix_len(32),
        SourceRangeKey {
            service_id,
            addr: saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// The backend a new flow of `service` from `client` goes to, and its slot
/// ([`CT_SLOT_UNKNOWN`] for an affinity backend): the client's affinity backend while it is
/// fresh (refreshed by this flow), else one picked uniformly at random (and remembered, with
/// affinity). `None` only when the service lost its backends meanwhile.
#[inline(always)]
pub fn select(service: &ServiceValue, client: u32, now: u64) -> Option<(Backend, u32)> {
    // SAFETY: a helper call without arguments.
    select_with(service, client, now, unsafe { bpf_get_prandom_u32() })
}

/// [`select`], with `pick` choosing the slot (`pick % backend_count`) instead of a random
/// number: the socket programs pick by socket cookie so every datagram of a UDP socket goes
/// to the same backend.
#[inline(always)]
pub fn select_with(
    service: &ServiceValue,
    client: u32,
    now: u64,
    pick: u32,
) -> Option<(Backend, u32)> {
    if service.flags & SVC_F_AFFINITY == 0 {
        return random_backend(service, pick);
    }
    let key = AffinityKey {
        affinity_id: service.affinity_id,
        client,
    };
    let (backend, slot) = match affinity_backend(service, &key, now) {
        Some(backend) => (backend, CT_SLOT_UNKNOWN),
        None => random_backend(service, pick)?,
    };
    let value = AffinityValue {
        backend,
        last_used_ns: now,
    };
    // An LRU map evicts rather than fails; a failed write only loses the affinity.
    let _ = AFFINITY.insert(key, value, 0);
    Some((backend, slot))
}

/// The client's affinity backend, if used within the service's timeout.
#[inline(always)]
fn affinity_backend(service: &ServiceValue, key: &AffinityKey, now: u64) -> Option<Backend> {
    // SAFETY: the value is copied out at once.
    let entry = unsafe { AFFINITY.get(key).copied()? };
    let timeout_ns = service.affinity_timeout as u64 * 1_000_000_000;
    (now.wrapping_sub(entry.last_used_ns) < timeout_ns).then_some(entry.backend)
}

/// Whether a TCP SYN of a tuple that has the conntrack entry `entry` keeps its backend instead
/// of being balanced again: the entry belongs to this service and either is a few moments old
/// (the SYN is a retransmission, [`SYN_RETRANSMIT_NS`]) with its backend still in the slot it
/// was picked from (a removed backend gets no new connection), or its backend is the client's
/// affinity backend (which a new balancing would choose again; its use is refreshed; the agent
/// deletes the affinity entries of removed backends).
#[inline(always)]
pub fn keep_on_syn(service: &ServiceValue, entry: &CtValue, client: u32, now: u64) -> bool {
    if entry.service_id != service.id {
        return false;
    }
    if now.wrapping_sub(entry.created_ns) < SYN_RETRANSMIT_NS && still_in_slot(service, entry) {
        return true;
    }
    if service.flags & SVC_F_AFFINITY == 0 {
        return false;
    }
    let key = AffinityKey {
        affinity_id: service.affinity_id,
        client,
    };
    match affinity_backend(service, &key, now) {
        Some(backend) if backend.addr == entry.nat_addr && backend.port == entry.nat_port => {
            let _ = AFFINITY.insert(
                key,
                AffinityValue {
                    backend,
                    last_used_ns: now,
                },
                0,
            );
            true
        }
        _ => false,
    }
}

/// The service entry's copy of backend `slot` (< [`INLINE_BACKENDS`]). Indexed by constants:
/// 5.10 refuses any variable-offset read of the stack, and 6.1 one it cannot bound.
#[inline(always)]
fn inline_backend(service: &ServiceValue, slot: u32) -> Backend {
    const _: () = assert!(INLINE_BACKENDS == 2);
    if slot == 0 {
        service.inline_backends[0]
    } else {
        service.inline_backends[1]
    }
}

/// Whether the entry's backend is still in the slot it was picked from.
#[inline(always)]
fn still_in_slot(service: &ServiceValue, entry: &CtValue) -> bool {
    if entry.backend_slot >= service.backend_count {
        return false;
    }
    if (entry.backend_slot as usize) < INLINE_BACKENDS {
        let b = inline_backend(service, entry.backend_slot);
        return b.addr == entry.nat_addr && b.port == entry.nat_port;
    }
    let key = BackendKey {
        service_id: service.id,
        slot: entry.backend_slot,
    };
    // SAFETY: the value is read at once.
    match unsafe { BACKENDS.get(key) } {
        Some(b) => b.addr == entry.nat_addr && b.port == entry.nat_port,
        None => false,
    }
}

/// The service's slot `pick % backend_count` (`pick` random: uniformly at random), with its
/// slot: one of the entry's own copies of the first slots when it is one of them
/// ([`ServiceValue::inline_backends`], written with the count: no `backends` lookup), else
/// the `backends` entry.
#[inline(always)]
fn random_backend(service: &ServiceValue, pick: u32) -> Option<(Backend, u32)> {
    if service.backend_count == 0 {
        return None;
    }
    let slot = pick % service.backend_count;
    if (slot as usize) < INLINE_BACKENDS {
        return Some((inline_backend(service, slot), slot));
    }
    let mut bkey = BackendKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: the value is copied out at once.
    match unsafe { BACKENDS.get(bkey) } {
        Some(b) => Some((*b, slot)),
        None => {
            // The agent shrinks a service by lowering the count before deleting slots; a packet
            // that read the old count can land on a deleted slot. Slot 0 always exists while the
            // count is non-zero.
            bkey.slot = 0;
            unsafe { BACKENDS.get(bkey).copied() }.map(|b| (b, 0))
        }
    }
}
