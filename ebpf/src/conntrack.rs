//! Connection tracking for translated flows: two entries per flow (see `sluice-common`).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use sluice_common::{
    Backend, CtKey, CtValue, Reason, CT_DIR_REPLY, CT_F_SNAT, REASON_DROP_NO_SNAT_PORT,
};

use crate::{maps::CONNTRACK, parse::Ipv4Packet};

/// How many source ports a masqueraded flow tries: the client's own, then random ones.
const SNAT_ATTEMPTS: u32 = 5;
/// Random masquerade ports come from 61000-65535, above Linux's default ephemeral range
/// (32768-60999), so they rarely meet the node's own connections to the same backend.
const SNAT_PORT_MIN: u32 = 61_000;
const SNAT_PORT_SPAN: u32 = 65_536 - SNAT_PORT_MIN;

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

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<CtValue> {
    // SAFETY: the value is copied out at once.
    unsafe { CONNTRACK.get(key).copied() }
}

/// Where a new flow's source goes.
#[derive(Clone, Copy)]
pub struct Snat {
    pub addr: u32,
}

/// Records a newly balanced flow and returns its forward entry: the forward entry keeps later
/// packets on `backend` (and their masquerade source), the reply entry lets the programs restore
/// the frontend (and the client) in the backend's replies.
///
/// A masqueraded flow needs a source port that makes the reply tuple (backend -> masquerade
/// address:port) unique: the client's port when no other flow uses it, else a few random ones.
/// The reply entry is claimed with BPF_NOEXIST, so two CPUs never get the same port.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn create(
    pkt: &Ipv4Packet,
    fwd_key: &CtKey,
    service_id: u32,
    backend: &Backend,
    backend_slot: u32,
    snat: Option<Snat>,
    flags: u16,
    now: u64,
) -> Result<CtValue, Reason> {
    let mut fwd = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        snat_addr: 0,
        snat_port: 0,
        _pad: 0,
        service_id,
        backend_slot,
        created_ns: now,
    };
    let mut reply = CtValue {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        ..fwd
    };
    let mut reply_key = CtKey {
        saddr: backend.addr,
        daddr: pkt.saddr,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    match snat {
        None => {
            // An LRU map evicts instead of failing when full; an error here leaves the flow
            // translated for this packet only, which the next packet retries.
            let _ = CONNTRACK.insert(reply_key, reply, 0);
        }
        Some(snat) => {
            fwd.flags |= CT_F_SNAT;
            reply.flags |= CT_F_SNAT;
            reply.snat_addr = pkt.saddr;
            reply.snat_port = pkt.sport;
            reply_key.daddr = snat.addr;
            let mut claimed = false;
            for attempt in 0..SNAT_ATTEMPTS {
                if attempt > 0 {
                    // SAFETY: a helper call without arguments.
                    let random = unsafe { bpf_get_prandom_u32() };
                    reply_key.dport = ((SNAT_PORT_MIN + random % SNAT_PORT_SPAN) as u16).to_be();
                }
                if CONNTRACK
                    .insert(reply_key, reply, BPF_NOEXIST as u64)
                    .is_ok()
                {
                    claimed = true;
                    break;
                }
                // Taken: by this very flow (a new connection reusing the client's tuple and
                // balanced to the same backend)? Then it is ours to overwrite.
                if let Some(existing) = lookup(&reply_key) {
                    if existing.snat_addr == pkt.saddr
                        && existing.snat_port == pkt.sport
                        && existing.nat_addr == pkt.daddr
                        && existing.nat_port == pkt.dport
                    {
                        let _ = CONNTRACK.insert(reply_key, reply, 0);
                        claimed = true;
                        break;
                    }
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
