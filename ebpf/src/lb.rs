//! Service lookup and backend selection.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use sluice_common::{Backend, BackendKey, ServiceKey};

use crate::{maps::BACKENDS, maps::SERVICES, parse::Ipv4Packet};

/// Looks the packet's destination up in `services` and picks one backend uniformly at random.
/// Returns the service id and the backend, or `None` when the destination is not a service or
/// the service has no backends.
#[inline(always)]
pub fn select_backend(pkt: &Ipv4Packet) -> Option<(u32, Backend)> {
    let key = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let service = unsafe { *SERVICES.get(key)? };
    if service.backend_count == 0 {
        return None;
    }
    // SAFETY: a helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let mut bkey = BackendKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: as above.
    let backend = match unsafe { BACKENDS.get(bkey) } {
        Some(b) => *b,
        None => {
            // The agent shrinks a service by lowering the count before deleting slots; a packet
            // that read the old count can land on a deleted slot. Slot 0 always exists while the
            // count is non-zero.
            bkey.slot = 0;
            unsafe { *BACKENDS.get(bkey)? }
        }
    };
    Some((service.id, backend))
}
