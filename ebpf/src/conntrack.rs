//! Connection tracking for translated flows: two entries per flow (see `sluice-common`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use sluice_common::{Backend, CtKey, CtValue, CT_DIR_REPLY};

use crate::{maps::CONNTRACK, parse::Ipv4Packet};

/// The packet's tuple as a conntrack key for direction `dir`.
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

/// Records a newly balanced flow: the forward entry keeps later packets on `backend`, the reply
/// entry lets `to_pod` restore the VIP as the source of the backend's replies.
#[inline(always)]
pub fn create(pkt: &Ipv4Packet, fwd_key: &CtKey, service_id: u32, backend: &Backend) {
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        _pad: 0,
        service_id,
        _pad2: 0,
        created_ns: now,
    };
    let reply_key = CtKey {
        saddr: backend.addr,
        daddr: pkt.saddr,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let reply = CtValue {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        _pad: 0,
        service_id,
        _pad2: 0,
        created_ns: now,
    };
    // An LRU map evicts instead of failing when full; an error here leaves the flow
    // translated for this packet only, which the next packet retries.
    let _ = CONNTRACK.insert(reply_key, reply, 0);
    let _ = CONNTRACK.insert(fwd_key, fwd, 0);
}
