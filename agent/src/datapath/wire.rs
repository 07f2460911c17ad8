//! Conversions between the agent's types (`crate::state`) and the map layout
//! (`sluice-common`). The maps hold addresses and ports in network byte order exactly as they sit
//! in a packet, so an address is the native-endian reading of its four octets and a port is
//! byte-swapped with `to_be`.

use std::net::Ipv4Addr;

use sluice_common::{Backend, ServiceKey};

use crate::state::{BackendAddr, Frontend, Protocol};

/// An IPv4 address as the maps (and the packet) hold it.
pub fn addr_to_map(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn addr_from_map(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// A port as the maps (and the packet) hold it.
pub fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

pub fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

pub fn service_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: addr_to_map(frontend.ip),
        port: port_to_map(frontend.port),
        proto: frontend.proto.number(),
        _pad: 0,
    }
}

/// The frontend a `services` key stands for; `None` for a protocol the agent never writes.
pub fn frontend(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: addr_from_map(key.addr),
        port: port_from_map(key.port),
        proto: Protocol::from_number(key.proto)?,
    })
}

pub fn backend_value(backend: &BackendAddr) -> Backend {
    Backend {
        addr: addr_to_map(backend.ip),
        port: port_to_map(backend.port),
        _pad: 0,
    }
}

pub fn backend_addr(backend: &Backend) -> BackendAddr {
    BackendAddr {
        ip: addr_from_map(backend.addr),
        port: port_from_map(backend.port),
    }
}

/// A `services` key for messages: the frontend when it is one, the raw fields otherwise.
pub fn describe_key(key: &ServiceKey) -> String {
    match frontend(key) {
        Some(frontend) => frontend.to_string(),
        None => format!(
            "{}:{}/proto-{}",
            addr_from_map(key.addr),
            port_from_map(key.port),
            key.proto
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_ports_are_stored_as_on_the_wire() {
        let frontend = Frontend {
            ip: Ipv4Addr::new(10, 96, 0, 1),
            port: 443,
            proto: Protocol::Tcp,
        };
        let key = service_key(&frontend);
        // The bytes in memory are the bytes in the packet.
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(key.port.to_ne_bytes(), 443u16.to_be_bytes());
        assert_eq!(super::frontend(&key), Some(frontend));

        let backend = BackendAddr {
            ip: Ipv4Addr::new(10, 244, 1, 7),
            port: 8443,
        };
        assert_eq!(backend_addr(&backend_value(&backend)), backend);
    }
}
