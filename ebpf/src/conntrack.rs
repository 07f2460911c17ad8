//! Connection tracking for translated flows: two entries per flow (see `sluice-common`), with
//! the flow's state (reply seen, FINs, RST) and when it was last seen, so entries expire as
//! nf_conntrack's do: an expired entry is absent for every lookup here, and the agent's
//! garbage collection deletes it.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::LruHashMap,
};
use sluice_common::{
    ct_next_state, Backend, CtEntry, CtKey, CtKey6, CtTimeouts, CtValue, CtValue6, NodeConfig,
    Reason, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_SNAT, REASON_DROP_NO_SNAT_PORT,
};

use crate::{
    maps::{CONFIG, CONNTRACK, CONNTRACK6},
    parse::Ipv4Packet,
};

/// How many source ports a masqueraded flow tries: the client's own when it may keep it, then
/// random ones from the masquerade range.
const SNAT_ATTEMPTS: u32 = 5;

/// The packet's own tuple as a key for direction `dir`: a forward key for a client's packet,
/// a reply key for a backend's.
#[inline(always)]
pub fn key(pkt: &Ipv4Packet, dir: u8) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir,
        _pad: 0,
    }
}

/// Whether an entry of protocol `proto` in `state`, last seen at `last_seen_ns`, has expired
/// at `now`, by the configured timeouts (`config` map; the defaults until the agent writes it).
/// Out of line (a BPF-to-BPF call, scalars only) so its spills stay out of the callers' frames.
#[inline(never)]
fn expired(proto: u8, state: u8, last_seen_ns: u64, now: u64) -> bool {
    match CONFIG.get(0) {
        Some(config) => config.ct_timeouts.expired(proto, state, last_seen_ns, now),
        None => CtTimeouts::DEFAULT.expired(proto, state, last_seen_ns, now),
    }
}

/// Whether a packet at `now` refreshes an entry of protocol `proto` in `state` last seen at
/// `last_seen_ns` ([`CtTimeouts::refresh_due`]). Out of line, as [`expired`].
#[inline(never)]
fn refresh_due(proto: u8, state: u8, last_seen_ns: u64, now: u64) -> bool {
    match CONFIG.get(0) {
        Some(config) => config
            .ct_timeouts
            .refresh_due(proto, state, last_seen_ns, now),
        None => CtTimeouts::DEFAULT.refresh_due(proto, state, last_seen_ns, now),
    }
}

/// The clock the entries' times are on. Read once per packet where it can: in a VM a read
/// costs tens of ns (a serialised TSC read).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper call without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The live entry under `key` of `map` (an expired one counts as absent), with the time it
/// was judged at (for [`seen_in`]: the clock is read only when there is an entry).
#[inline(always)]
fn lookup_in<V: CtEntry>(map: &LruHashMap<V::Key, V>, key: &V::Key) -> Option<(V, u64)> {
    // SAFETY: the value is read at once.
    let entry = unsafe { map.get(key)? };
    let now = now();
    if expired(V::proto(key), entry.state(), entry.last_seen_ns(), now) {
        return None;
    }
    Some((*entry, now))
}

/// Records that a packet with TCP flags `tcp_flags` (0: not TCP) went through the entry
/// `entry` found under `key` at `now`: its state moves on and it is seen then. Writes only when the
/// state changes or a refresh is due (`sluice_common::CT_REFRESH_NS`), and then writes the
/// flow's other entry too (when it still is this entry's peer), so both expire together
/// whichever direction the traffic goes.
#[inline(always)]
fn seen_in<V: CtEntry>(
    map: &LruHashMap<V::Key, V>,
    key: &V::Key,
    entry: &V,
    tcp_flags: u8,
    now: u64,
) {
    let state = ct_next_state(entry.state(), V::proto(key), V::dir(key), tcp_flags);
    if state == entry.state() && !refresh_due(V::proto(key), state, entry.last_seen_ns(), now) {
        return;
    }
    // Plain writes: two CPUs updating one flow at once may lose a bit of state, which only
    // changes which timeout the flow gets.
    if let Some(own) = map.get_ptr_mut(key) {
        // SAFETY: a pointer to the map's value, valid for the program's run.
        unsafe { (*own).mark(state, now) };
    }
    let peer_key = V::peer(key, entry);
    if let Some(peer) = map.get_ptr_mut(peer_key) {
        // SAFETY: as above.
        unsafe {
            if V::peer(&peer_key, &*peer) == *key {
                (*peer).mark(state, now);
            }
        }
    }
}

/// The live IPv4 entry under `key`.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<CtValue> {
    lookup_in(&CONNTRACK, key).map(|(entry, _)| entry)
}

/// The live IPv4 entry under `key`, with the time it was judged at (pass it on to [`seen`]).
#[inline(always)]
pub fn lookup_at(key: &CtKey) -> Option<(CtValue, u64)> {
    lookup_in(&CONNTRACK, key)
}

/// A packet of the flow went through `entry` (found under `key`) at `now`: see [`seen_in`].
#[inline(always)]
pub fn seen(key: &CtKey, entry: &CtValue, tcp_flags: u8, now: u64) {
    seen_in(&CONNTRACK, key, entry, tcp_flags, now)
}

/// Whether the IPv6 entry `entry` found under `key` has expired at `now` (it then counts as
/// absent). The IPv6 path copies entries into its per-CPU scratch itself (v6/mod.rs
/// `ct_lookup`).
#[inline(always)]
pub fn expired6(key: &CtKey6, entry: &CtValue6, now: u64) -> bool {
    expired(key.proto, entry.state, entry.last_seen_ns, now)
}

/// [`seen`] for IPv6. (Out of line it would need a scalar result: the verifier refuses a
/// subprogram returning with a stack pointer left in its return register.)
#[inline(always)]
pub fn seen6(key: &CtKey6, entry: &CtValue6, tcp_flags: u8, now: u64) {
    seen_in(&CONNTRACK6, key, entry, tcp_flags, now)
}

/// Claims the IPv6 reply entry `key` for a new masqueraded flow: free, or held by an expired
/// flow. Out of line, as [`expired`].
#[inline(never)]
pub fn claim6(key: &CtKey6, reply: &CtValue6) -> bool {
    if CONNTRACK6.insert(key, reply, BPF_NOEXIST as u64).is_ok() {
        return true;
    }
    // SAFETY: the fields are read at once.
    let stale = match unsafe { CONNTRACK6.get(key) } {
        Some(held) => expired6(key, held, now()),
        None => true,
    };
    stale && CONNTRACK6.insert(key, reply, 0).is_ok()
}

/// Deletes the reply entry of the forward entry `old` (under `fwd_key`) when it still is its
/// peer; returns whether it did.
#[inline(always)]
fn forget_reply(fwd_key: &CtKey, old: &CtValue) -> bool {
    let old_reply = fwd_key.peer(old);
    // SAFETY: the value is read at once.
    if let Some(entry) = unsafe { CONNTRACK.get(old_reply) } {
        if old_reply.peer(entry) == *fwd_key {
            return CONNTRACK.remove(old_reply).is_ok();
        }
    }
    false
}

/// Where a new flow's source goes. A plain struct, not an `Option`: a `None`'s undefined
/// payload copied into [`NewEntry`] made LLVM spill registers that were never written, which
/// the verifier rejects (`R4 !read_ok`).
#[derive(Clone, Copy)]
pub struct Snat {
    /// The masquerade address; 0: the flow keeps its source ([`Snat::NONE`]).
    pub addr: u32,
    /// The client's port may be kept even outside the masquerade range (hairpin: the address
    /// is not the node's, no socket of the node can share its tuples).
    pub keep_client_port: bool,
}

impl Snat {
    pub const NONE: Snat = Snat {
        addr: 0,
        keep_client_port: false,
    };
}

/// The source port attempt `attempt` of a masquerade tries (network order): the client's port
/// `sport` first when it is in the masquerade range ([`NodeConfig::snat_ports`]) or
/// `keep_client_port`, else a random port of the range. Out of line, as [`expired`].
#[inline(never)]
pub fn masquerade_port(attempt: u32, sport: u16, keep_client_port: bool) -> u16 {
    masquerade_port_inline(attempt, sport, keep_client_port)
}

/// [`masquerade_port`] inlined, for the IPv6 path, whose frame leaves no room for a call.
#[inline(always)]
pub fn masquerade_port_inline(attempt: u32, sport: u16, keep_client_port: bool) -> u16 {
    let (port_min, port_count) = match CONFIG.get(0) {
        Some(config) => config.snat_ports(),
        None => NodeConfig::default().snat_ports(),
    };
    let port = u16::from_be(sport) as u32;
    let in_range = port >= port_min as u32 && port < port_min as u32 + port_count;
    if attempt == 0 && (keep_client_port || in_range) {
        return sport;
    }
    // SAFETY: a helper call without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    ((port_min as u32 + random % port_count.max(1)) as u16).to_be()
}

/// Claims the reply entry `key` for a new masqueraded flow: free, or held by an expired flow.
/// Out of line, as [`expired`].
#[inline(never)]
fn claim(key: &CtKey, reply: &CtValue) -> bool {
    CONNTRACK.insert(key, reply, BPF_NOEXIST as u64).is_ok()
        || (lookup(key).is_none() && CONNTRACK.insert(key, reply, 0).is_ok())
}

/// A new flow's balancing: its service, backend and source NAT.
pub struct NewEntry {
    pub service_id: u32,
    pub backend: Backend,
    pub backend_slot: u32,
    pub snat: Snat,
    /// `CT_F_*` (without [`CT_F_SNAT`], which `snat` implies).
    pub flags: u16,
    pub now: u64,
}

/// Records a newly balanced flow and returns its forward entry: the forward entry keeps later
/// packets on the backend (and their masquerade source), the reply entry lets the programs
/// restore the frontend (and the client) in the backend's replies. `replaced`: the live forward entry
/// the tuple had (a TCP SYN re-balanced it), whose reply entry goes unless the new flow reuses
/// it, so the old backend's late packets are no longer translated as the client's flow.
///
/// A masqueraded flow needs a source port that makes the reply tuple (backend -> masquerade
/// address:port) unique: the client's port when it is in the masquerade range (or, hairpin,
/// whatever it is) and no live flow uses it, else a few random ones from the range. The reply
/// entry is claimed with BPF_NOEXIST, so two CPUs never get the same port; an expired entry is
/// overwritten.
#[inline(always)]
pub fn create(
    pkt: &Ipv4Packet,
    fwd_key: &CtKey,
    new: &NewEntry,
    replaced: Option<&CtValue>,
) -> Result<CtValue, Reason> {
    let state = ct_next_state(0, pkt.proto, CT_DIR_FORWARD, pkt.tcp_flags);
    let mut fwd = CtValue {
        nat_addr: new.backend.addr,
        nat_port: new.backend.port,
        flags: new.flags,
        snat_addr: 0,
        snat_port: 0,
        state,
        _pad: 0,
        service_id: new.service_id,
        backend_slot: new.backend_slot,
        created_ns: new.now,
        last_seen_ns: new.now,
    };
    let mut reply = CtValue {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        ..fwd
    };
    let mut reply_key = CtKey {
        saddr: new.backend.addr,
        daddr: pkt.saddr,
        sport: new.backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    if let Some(old) = replaced {
        let _ = forget_reply(fwd_key, old);
    }
    match new.snat {
        Snat { addr: 0, .. } => {
            // An LRU map evicts instead of failing when full; an error here leaves the flow
            // translated for this packet only, which the next packet retries.
            let _ = CONNTRACK.insert(reply_key, reply, 0);
        }
        snat => {
            fwd.flags |= CT_F_SNAT;
            reply.flags |= CT_F_SNAT;
            reply.snat_addr = pkt.saddr;
            reply.snat_port = pkt.sport;
            reply_key.daddr = snat.addr;
            let mut claimed = false;
            for attempt in 0..SNAT_ATTEMPTS {
                reply_key.dport = masquerade_port(attempt, pkt.sport, snat.keep_client_port);
                if claim(&reply_key, &reply) {
                    claimed = true;
                    break;
                }
            }
            if !claimed {
                return Err(REASON_DROP_NO_SNAT_PORT);
            }
            fwd.snat_addr = snat.addr;
            fwd.snat_port = reply_key.dport;
        }
    }
    let _ = CONNTRACK.insert(fwd_key, fwd, 0);
    Ok(fwd)
}
