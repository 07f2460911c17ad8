//! Map layout shared by the eBPF programs (`ebpf/`) and the agent (`agent/`).
//!
//! This file is the one place the datapath's maps are described. Every key and value is
//! `#[repr(C)]`, padded explicitly so no byte is left uninitialised (the kernel hashes keys
//! byte for byte), and stores addresses and ports in network byte order exactly as they sit in
//! the packet, so the programs compare and copy them without swapping.
//!
//! | map (= pin file)  | type          | key                | value           | written by |
//! |-------------------|---------------|--------------------|-----------------|------------|
//! | `services`        | hash          | [`ServiceKey`]     | [`ServiceValue`]| agent      |
//! | `backends`        | hash          | [`BackendKey`]     | [`Backend`]     | agent      |
//! | `conntrack`       | LRU hash      | [`CtKey`]          | [`CtValue`]     | programs (agent purges) |
//!
//! A service frontend is one (VIP, port, protocol). Its backends live in `backends` under
//! (service id, slot) for slots `0..backend_count`; a program picks `prandom % backend_count`.
//! The agent grows a service by writing new slots before raising `backend_count`, and shrinks it
//! by lowering `backend_count` before deleting slots, so a packet never sees a count with a
//! missing slot behind it (see `agent/src/datapath/sync.rs`).
//!
//! `conntrack` holds two entries per translated flow, in the spirit of Cilium's CT map:
//! * [`CT_DIR_FORWARD`]: the client's original tuple (client -> VIP) to the chosen backend, so
//!   every later packet of the flow goes to the same backend;
//! * [`CT_DIR_REPLY`]: the tuple the backend replies with (backend -> client) to the VIP and
//!   port, so replies get their source rewritten back (reverse NAT).
#![no_std]

/// Pin directory used by a real node. Tests pass their own with `--pin-path`.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/sluice";

/// Map names, as in the object and as pin file names under the pin directory.
pub const MAP_SERVICES: &str = "services";
pub const MAP_BACKENDS: &str = "backends";
pub const MAP_CONNTRACK: &str = "conntrack";

pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
pub const MAX_CONNTRACK: u32 = 262_144;

/// IP protocol numbers as found in the IPv4 header.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// A service frontend: (virtual IP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Flags of a [`ServiceValue`]. None are defined yet; the field is reserved for kube-proxy's
/// behaviours (external traffic policy, affinity, ...) so the map layout does not change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Agent-assigned id, the first half of every [`BackendKey`] of this service.
    pub id: u32,
    /// Number of slots `0..backend_count` present in `backends`.
    pub backend_count: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// A pod endpoint: address and port, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A flow tuple as seen on the wire, plus the direction it was recorded for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    pub _pad: u16,
}

/// The address a flow is translated to: for a forward entry the backend, for a reply entry
/// the service VIP and port that replaces the backend as source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub nat_addr: u32,
    pub nat_port: u16,
    pub _pad: u16,
    /// Id of the service the flow was balanced by.
    pub service_id: u32,
    pub _pad2: u32,
    /// bpf_ktime_get_ns() when the entry was created, for garbage collection and `sluice state`.
    pub created_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), contain only integers and have no implicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The programs and the agent must agree byte for byte; implicit padding would make keys
    // hash differently depending on stack garbage.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 12);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 24);
    }
}
