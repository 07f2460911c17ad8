//! Connection tracking for translated flows: two entries per flow (see `sluice-common`), with
//! the flow's state (reply seen, FINs, RST) and when it was last seen, so entries expire as
//! nf_conntrack's do: an expired entry is absent for every lookup here, and the agent's
//! garbage collection deletes it.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::{HashMap, LruHashMap},
};
use sluice_common::{
    ct_closed, ct_next_state, Backend, CtEntry, CtKey, CtKey6, CtTimeouts, CtValue, CtValue6,
    NodeConfig, Reason, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_SNAT, CT_S_SEEN_REPLY,
    REASON_CT_ANSWERED_FULL, REASON_DROP_NO_SNAT_PORT,
};

use crate::{
    maps::{CONFIG, CONNTRACK, CONNTRACK6, CT_ANSWERED, CT_ANSWERED6},
    parse::Ipv4Packet,
    stats,
};

/// A family's two conntrack maps (see "conntrack" in `sluice-common`): flows the backend
/// answered in a plain hash nothing evicts, the others in an LRU.
pub trait CtMaps: CtEntry + 'static {
    fn answered() -> &'static HashMap<Self::Key, Self>;
    fn unanswered() -> &'static LruHashMap<Self::Key, Self>;
}

impl CtMaps for CtValue {
    #[inline(always)]
    fn answered() -> &'static HashMap<CtKey, CtValue> {
        &CT_ANSWERED
    }
    #[inline(always)]
    fn unanswered() -> &'static LruHashMap<CtKey, CtValue> {
        &CONNTRACK
    }
}

impl CtMaps for CtValue6 {
    #[inline(always)]
    fn answered() -> &'static HashMap<CtKey6, CtValue6> {
        &CT_ANSWERED6
    }
    #[inline(always)]
    fn unanswered() -> &'static LruHashMap<CtKey6, CtValue6> {
        &CONNTRACK6
    }
}

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

/// The entry under `key`, answered or not (live or expired): a pointer into its map.
#[inline(always)]
fn find<V: CtMaps>(key: &V::Key) -> Option<*mut V> {
    match V::answered().get_ptr_mut(key) {
        Some(entry) => Some(entry),
        None => V::unanswered().get_ptr_mut(key),
    }
}

/// The live entry under `key` (an expired one counts as absent), with the time it was judged
/// at (for [`seen_in`]: the clock is read only when there is an entry).
#[inline(always)]
fn lookup_in<V: CtMaps>(key: &V::Key) -> Option<(V, u64)> {
    // SAFETY: the value is read at once.
    let entry = unsafe { *find::<V>(key)? };
    let now = now();
    if expired(V::proto(key), entry.state(), entry.last_seen_ns(), now) {
        return None;
    }
    Some((entry, now))
}

/// Records `state` at `now` in the entry under `key`. An unanswered entry the backend has now
/// answered moves to the answered map, out of reach of the LRU's evictions; when that map is
/// full it stays where it is, counted ([`REASON_CT_ANSWERED_FULL`]). A connection that is
/// over (RST, FIN both ways) moves back to the LRU.
#[inline(always)]
fn mark<V: CtMaps>(key: &V::Key, state: u8, now: u64) {
    if let Some(entry) = V::answered().get_ptr_mut(key) {
        // SAFETY: a pointer to the map's value, valid for the program's run.
        unsafe { (*entry).mark(state, now) };
        if ct_closed(state) {
            // A connection that is over needs no protection: back to the LRU, until its
            // close timeout (or a new flow) frees it.
            // SAFETY: as above; the kernel copies the value.
            #[allow(clippy::needless_borrows_for_generic_args)]
            if V::unanswered().insert(key, unsafe { &*entry }, 0).is_ok() {
                let _ = V::answered().remove(key);
            }
        }
        return;
    }
    let Some(entry) = V::unanswered().get_ptr_mut(key) else {
        return;
    };
    // SAFETY: as above.
    unsafe { (*entry).mark(state, now) };
    if state & CT_S_SEEN_REPLY != 0 && !ct_closed(state) {
        // SAFETY: as above; the kernel copies the value from the map itself (by reference:
        // no copy of it on the stack).
        #[allow(clippy::needless_borrows_for_generic_args)]
        if V::answered().insert(key, unsafe { &*entry }, 0).is_ok() {
            let _ = V::unanswered().remove(key);
        } else {
            stats::count(REASON_CT_ANSWERED_FULL);
        }
    }
}

/// Records that a packet with TCP flags `tcp_flags` (0: not TCP) went through the entry
/// `entry` found under `key` at `now`: its state moves on and it is seen then. Writes only when the
/// state changes or a refresh is due (`sluice_common::CT_REFRESH_NS`), and then writes the
/// flow's other entry too (when it still is this entry's peer), so both expire together
/// whichever direction the traffic goes.
#[inline(always)]
fn seen_in<V: CtMaps>(key: &V::Key, entry: &V, tcp_flags: u8, now: u64) {
    let state = ct_next_state(entry.state(), V::proto(key), V::dir(key), tcp_flags);
    if state == entry.state() && !refresh_due(V::proto(key), state, entry.last_seen_ns(), now) {
        return;
    }
    // Plain writes: two CPUs updating one flow at once may lose a bit of state, which only
    // changes which timeout the flow gets.
    mark::<V>(key, state, now);
    let peer_key = V::peer(key, entry);
    if let Some(peer) = find::<V>(&peer_key) {
        // SAFETY: a pointer to the map's value, valid for the program's run.
        if V::peer(&peer_key, unsafe { &*peer }) == *key {
            mark::<V>(&peer_key, state, now);
        }
    }
}

/// Deletes the entry under `key` from whichever map holds it.
#[inline(always)]
fn remove<V: CtMaps>(key: &V::Key) {
    let _ = V::answered().remove(key);
    let _ = V::unanswered().remove(key);
}

/// Claims the reply entry `key` for a new masqueraded flow: free, or held by an expired flow
/// (an answered one is deleted first: the new flow starts unanswered).
#[inline(always)]
fn claim_in<V: CtMaps>(key: &V::Key, reply: &V) -> bool {
    // SAFETY: the fields are read at once.
    if let Some(held) = unsafe { V::answered().get(key) } {
        if !expired(V::proto(key), held.state(), held.last_seen_ns(), now()) {
            return false;
        }
        let _ = V::answered().remove(key);
    }
    if V::unanswered()
        .insert(key, reply, BPF_NOEXIST as u64)
        .is_ok()
    {
        return true;
    }
    // SAFETY: as above.
    let stale = match unsafe { V::unanswered().get(key) } {
        Some(held) => expired(V::proto(key), held.state(), held.last_seen_ns(), now()),
        None => true,
    };
    stale && V::unanswered().insert(key, reply, 0).is_ok()
}

/// Whether the reply key `key` is free, claiming it for `reply` if so: one probe of the
/// masquerade search. No function call (the search runs it [`SEARCH_PORTS`] times, each
/// walked by the verifier, and a call would put another frame on the deepest call chain of
/// older kernels): an entry of a connection that is over (RST, FIN both ways) and idle since
/// `reclaim_before` is free, as [`claim_in`] would judge it; other expired entries count as
/// taken until the agent's garbage collection deletes them.
#[inline(always)]
fn probe<V: CtMaps>(key: &V::Key, reply: &V, reclaim_before: u64) -> bool {
    // SAFETY: a presence check; nothing is read.
    if unsafe { V::answered().get(key) }.is_some() {
        return false;
    }
    if V::unanswered()
        .insert(key, reply, BPF_NOEXIST as u64)
        .is_ok()
    {
        return true;
    }
    // SAFETY: the fields are read at once.
    match unsafe { V::unanswered().get(key) } {
        Some(held) if ct_closed(held.state()) && held.last_seen_ns() < reclaim_before => {
            V::unanswered().insert(key, reply, 0).is_ok()
        }
        _ => false,
    }
}

/// How many ports a masquerade search probes, each at a random index of the range. Not runs
/// of consecutive ports (nf_nat's): those grow clusters of taken ports, and at 80% of a
/// backend's ports in use a run of 32 then 16, 8, ... missed about 3 flows in 1,000. Random
/// probes keep the taken ports spread, so 64 miss with probability (share in use)^64: once in
/// 1.6 million flows at 80%, once in 150,000 at 83% (30,000 of the default 36,280 ports).
const SEARCH_PORTS: u32 = 64;

/// The masquerade ports of the node's configuration ([`NodeConfig::snat_port_space`]).
#[inline(always)]
fn snat_port_space() -> (u32, u32, u32, u32) {
    match CONFIG.get(0) {
        Some(config) => config.snat_port_space(),
        None => NodeConfig::default().snat_port_space(),
    }
}

/// Whether a new masqueraded flow from source port `sport` (network order) tries to keep it:
/// hairpin (`keep_client_port`), or a port of the masquerade range.
#[inline(always)]
pub fn client_port_first(sport: u16, keep_client_port: bool) -> bool {
    keep_client_port || NodeConfig::is_snat_port(snat_port_space(), u16::from_be(sport))
}

/// Searches the masquerade ports for one that makes the reply key `key` (its `dport`) free,
/// and claims it with the reply entry `reply` ([`SEARCH_PORTS`] probes at random indices).
/// A port only has to be unique per (masquerade address, backend, protocol): the reply key.
#[inline(always)]
fn claim_port_in<V: CtMaps>(key: &mut V::Key, reply: &V) -> bool {
    let space = snat_port_space();
    let usable = space.1;
    if usable == 0 {
        return false;
    }
    let close_ms = match CONFIG.get(0) {
        Some(config) if config.ct_timeouts.tcp_close_ms != 0 => config.ct_timeouts.tcp_close_ms,
        _ => CtTimeouts::DEFAULT.tcp_close_ms,
    };
    let reclaim_before = now().saturating_sub(close_ms as u64 * 1_000_000);
    for _ in 0..SEARCH_PORTS {
        // SAFETY: a helper call without arguments.
        let index = unsafe { bpf_get_prandom_u32() } % usable;
        V::set_dport(key, NodeConfig::snat_port(space, index).to_be());
        if probe::<V>(key, reply, reclaim_before) {
            return true;
        }
    }
    false
}

/// [`claim_port_in`] for IPv4. Out of line: the search loop is verified once per caller. It
/// calls nothing itself: the deepest call chain of kernels before 6.12 (every frame rounded
/// up to 32 bytes) has room for exactly this frame under the programs' main one.
#[inline(never)]
fn claim_port(key: &mut CtKey, reply: &CtValue) -> bool {
    claim_port_in::<CtValue>(key, reply)
}

/// [`claim_port_in`] for IPv6 (the keys and values live in the per-CPU scratch).
#[inline(never)]
pub fn claim_port6(key: &mut CtKey6, reply: &CtValue6) -> bool {
    claim_port_in::<CtValue6>(key, reply)
}

/// Claims the IPv4 reply entry `key` for a new masqueraded flow ([`claim_in`]). Out of line,
/// as [`expired`].
#[inline(never)]
fn claim(key: &CtKey, reply: &CtValue) -> bool {
    claim_in::<CtValue>(key, reply)
}

/// [`claim`] for IPv6.
#[inline(never)]
pub fn claim6(key: &CtKey6, reply: &CtValue6) -> bool {
    claim_in::<CtValue6>(key, reply)
}

/// The live IPv4 entry under `key`.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<CtValue> {
    lookup_in::<CtValue>(key).map(|(entry, _)| entry)
}

/// The live IPv4 entry under `key`, with the time it was judged at (pass it on to [`seen`]).
#[inline(always)]
pub fn lookup_at(key: &CtKey) -> Option<(CtValue, u64)> {
    lookup_in::<CtValue>(key)
}

/// A packet of the flow went through `entry` (found under `key`) at `now`: see [`seen_in`].
#[inline(always)]
pub fn seen(key: &CtKey, entry: &CtValue, tcp_flags: u8, now: u64) {
    seen_in::<CtValue>(key, entry, tcp_flags, now)
}

/// The IPv6 entry under `key`, answered or not, live or expired (the IPv6 path copies it into
/// its per-CPU scratch itself and judges it with [`expired6`]: v6/mod.rs `ct_lookup`).
#[inline(always)]
pub fn find6(key: &CtKey6) -> Option<*mut CtValue6> {
    find::<CtValue6>(key)
}

/// Whether the IPv6 entry `entry` found under `key` has expired at `now` (it then counts as
/// absent).
#[inline(always)]
pub fn expired6(key: &CtKey6, entry: &CtValue6, now: u64) -> bool {
    expired(key.proto, entry.state, entry.last_seen_ns, now)
}

/// [`seen`] for IPv6. (Out of line it would need a scalar result: the verifier refuses a
/// subprogram returning with a stack pointer left in its return register.)
#[inline(always)]
pub fn seen6(key: &CtKey6, entry: &CtValue6, tcp_flags: u8, now: u64) {
    seen_in::<CtValue6>(key, entry, tcp_flags, now)
}

/// Records a new IPv6 entry (unanswered: the LRU map), replacing whatever the key held.
#[inline(always)]
pub fn insert6(key: &CtKey6, entry: &CtValue6) {
    let _ = CT_ANSWERED6.remove(key);
    // An LRU map evicts instead of failing when full; without its entry this packet is
    // translated and the next one retries.
    let _ = CONNTRACK6.insert(key, entry, 0);
}

/// Deletes the reply entry of the forward entry `old` (under `fwd_key`) when it still is its
/// peer; returns whether it did.
#[inline(always)]
fn forget_reply(fwd_key: &CtKey, old: &CtValue) -> bool {
    let old_reply = fwd_key.peer(old);
    match find::<CtValue>(&old_reply) {
        // SAFETY: a pointer to the map's value, valid for the program's run.
        Some(entry) if old_reply.peer(unsafe { &*entry }) == *fwd_key => {
            remove::<CtValue>(&old_reply);
            true
        }
        _ => false,
    }
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
/// address:port) unique ([`claim_port_in`]). The reply entry is claimed with BPF_NOEXIST, so
/// two CPUs never get the same port; an expired entry is overwritten. Both entries start in
/// the unanswered map (an answered entry the tuple had goes).
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
            // The flow starts unanswered. An LRU map evicts instead of failing when full; an
            // error here leaves the flow translated for this packet only, which the next
            // packet retries.
            let _ = CT_ANSWERED.remove(reply_key);
            let _ = CONNTRACK.insert(reply_key, reply, 0);
        }
        snat => {
            fwd.flags |= CT_F_SNAT;
            reply.flags |= CT_F_SNAT;
            reply.snat_addr = pkt.saddr;
            reply.snat_port = pkt.sport;
            reply_key.daddr = snat.addr;
            // The client's own port first, when it may keep it; else a search.
            let kept =
                client_port_first(pkt.sport, snat.keep_client_port) && claim(&reply_key, &reply);
            if !kept && !claim_port(&mut reply_key, &reply) {
                return Err(REASON_DROP_NO_SNAT_PORT);
            }
            fwd.snat_addr = snat.addr;
            fwd.snat_port = reply_key.dport;
        }
    }
    let _ = CT_ANSWERED.remove(fwd_key);
    let _ = CONNTRACK.insert(fwd_key, fwd, 0);
    Ok(fwd)
}
