//! Host traffic: socket-level load balancing (cgroup `sock_addr` programs), for processes in
//! the node's own network namespace (the kubelet, hostNetwork pods), which no tc program
//! sees: their packets leave the node's stack directly (kube-proxy translates them in its
//! OUTPUT chain).
//!
//! Instead of rewriting packets, the programs rewrite the address a socket is given, as
//! Cilium's socket LB does: `connect()` (TCP and UDP) and `sendmsg()` of an unconnected UDP
//! socket to a frontend get a backend's address, so every packet of the socket is sent to the
//! backend from the start, needs no conntrack entry and no reverse NAT on the wire. The
//! application keeps seeing the frontend: `getpeername()` and the source address `recvmsg()`
//! reports for a UDP datagram are rewritten back with the `sock_revnat` entry the translation
//! left (socket cookie, backend) -> frontend.
//!
//! The programs run for every process of the cgroup they are attached to, which can also hold
//! pods' processes in their own network namespaces: those are left alone (their packets take
//! the tc path) by comparing the socket's namespace cookie with `sock_config`'s.
//!
//! What the service decides, as kube-proxy does for the node's own traffic:
//! * the frontend's pods' entry ([`SCOPE_POD`]) when it has one: an externalTrafficPolicy
//!   Local frontend reached from the node uses the cluster-wide endpoints;
//! * loadBalancerSourceRanges are checked against the node's IP (the source the node's
//!   packets get), sessionAffinity is kept per node IP (one client: the node);
//! * no endpoints at all: the call fails at once with ECONNREFUSED (kube-proxy's REJECT);
//!   endpoints but none this node may use (a Local traffic policy) or a source outside the
//!   ranges: EPERM (kube-proxy drops the packet in OUTPUT, which a UDP sender sees as EPERM and
//!   a TCP connect as a timeout);
//! * TCP connections pick a backend at random; a UDP socket picks by its cookie, so all its
//!   datagrams go to one backend as a conntrack entry would keep them.
//!
//! An AF_INET6 socket reaching an IPv4 frontend through its IPv4-mapped address
//! (`::ffff:a.b.c.d`, as dual-stack runtimes do) is balanced like an IPv4 one.
//!
//! Not covered: SCTP sockets, connected UDP sockets whose backend goes away (they keep it until
//! reconnected).

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};
use sluice_common::{
    source_range_prefix_len, Backend6, BackendKey, ServiceKey, ServiceKey6, ServiceValue,
    SockRevKey, SockRevKey6, SockRevValue, SockRevValue6, SourceRangeKey6, PROTO_TCP, PROTO_UDP,
    SCOPE_ALL, SCOPE_POD, SVC_F_DROP_WHEN_EMPTY, SVC_F_EXTERNAL_LOCAL, SVC_F_SOURCE_RANGES,
};

use crate::{
    lb,
    maps::{
        BACKENDS6, CONFIG6, SERVICES, SERVICES6, SOCK_CONFIG, SOCK_REVNAT, SOCK_REVNAT6,
        SOURCE_RANGES6,
    },
    masq,
};

/// A `sock_addr` program's verdicts: let the call go on, or fail it (with `bpf_set_retval`'s
/// error, EPERM without one).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

/// Whether `bpf_set_retval` may be called (Linux >= 5.18). The agent clears it on older kernels
/// before loading (a read-only global: the verifier sees the constant and skips the call, which
/// 5.10's verifier would refuse as an unknown helper); the calls then fail with EPERM.
#[no_mangle]
static SOCK_SET_RETVAL: u8 = 1;

const EPERM: i32 = 1;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    verdict(forward4(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(forward4(&ctx))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    verdict(forward6(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(forward6(&ctx))
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    PROCEED
}

/// `Err(errno)` fails the system call with that error.
#[inline(always)]
fn verdict(result: Result<(), i32>) -> i32 {
    match result {
        Ok(()) => PROCEED,
        Err(errno) => {
            // SAFETY: reading a global the loader set.
            if unsafe { core::ptr::read_volatile(&SOCK_SET_RETVAL) } != 0 {
                // SAFETY: a helper call on plain integers. Should it fail, the call still
                // fails, with EPERM.
                unsafe { bpf_set_retval(-errno) };
            }
            REJECT
        }
    }
}

/// Whether the socket is a TCP or UDP socket of the node's own network namespace.
#[inline(always)]
fn host_socket(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: reading the program's own context.
    let proto = unsafe { (*ctx.sock_addr).protocol };
    if proto != PROTO_TCP as u32 && proto != PROTO_UDP as u32 {
        return None;
    }
    let config = SOCK_CONFIG.get(0)?;
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    (config.netns_cookie != 0 && netns == config.netns_cookie).then_some(proto as u8)
}

/// The socket's cookie, unique for the life of the system.
#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// What picks a new backend: a random number for a TCP connection; for a UDP socket its
/// cookie, so its datagrams keep going to the same backend.
#[inline(always)]
fn pick(proto: u8, cookie: u64) -> u32 {
    if proto == PROTO_TCP {
        // SAFETY: a helper call without arguments.
        unsafe { bpf_get_prandom_u32() }
    } else {
        (cookie ^ (cookie >> 32)) as u32
    }
}

/// The error a frontend without a backend to use fails the call with, if it has none.
#[inline(always)]
fn no_backend(service: &ServiceValue) -> Result<(), i32> {
    if service.backend_count != 0 {
        return Ok(());
    }
    if service.flags & SVC_F_DROP_WHEN_EMPTY != 0 {
        Err(EPERM)
    } else {
        Err(ECONNREFUSED)
    }
}

/// The IPv4 frontend (address, port, protocol): its pods' entry when it has one (see the
/// module; only a frontend with [`SVC_F_EXTERNAL_LOCAL`] can, as in lb::service).
#[inline(always)]
fn service4(addr: u32, port: u16, proto: u8) -> Option<ServiceValue> {
    let mut key = ServiceKey {
        addr,
        port,
        proto,
        scope: SCOPE_ALL,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let all = unsafe { SERVICES.get(key).copied() };
    if all.is_some_and(|v| v.flags & SVC_F_EXTERNAL_LOCAL != 0) {
        key.scope = SCOPE_POD;
        // SAFETY: as above.
        if let Some(value) = unsafe { SERVICES.get(key) } {
            return Some(*value);
        }
    }
    all
}

#[inline(always)]
fn forward4(ctx: &SockAddrContext) -> Result<(), i32> {
    let Some(proto) = host_socket(ctx) else {
        return Ok(());
    };
    let sa = ctx.sock_addr;
    // SAFETY: reading the program's own context (4-byte loads, as the verifier wants).
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    if let Some((backend_addr, backend_port)) = balance4(ctx, proto, addr, port)? {
        // SAFETY: writing the program's own context (4-byte stores).
        unsafe {
            (*sa).user_ip4 = backend_addr;
            (*sa).user_port = backend_port as u32;
        }
    }
    Ok(())
}

/// The backend (address, port) an IPv4 frontend's socket gets, remembered in `sock_revnat`;
/// `None` when `addr:port` is not a frontend. Shared by the IPv4 programs and the IPv6 ones
/// for IPv4-mapped addresses (`::ffff:a.b.c.d`, an AF_INET6 socket reaching an IPv4 service).
#[inline(always)]
fn balance4(
    ctx: &SockAddrContext,
    proto: u8,
    addr: u32,
    port: u16,
) -> Result<Option<(u32, u16)>, i32> {
    let Some(service) = service4(addr, port, proto) else {
        return Ok(None);
    };
    // The node's packets leave with its address: kube-proxy's source for ranges and affinity.
    let node_ip = masq::config().map_or(0, |c| c.node_ip);
    if service.flags & SVC_F_SOURCE_RANGES != 0 && !lb::source_allowed(service.id, node_ip) {
        return Err(EPERM);
    }
    no_backend(&service)?;
    let cookie = socket_cookie(ctx);
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((backend, _slot)) = lb::select_with(&service, node_ip, now, pick(proto, cookie))
    else {
        // The service lost its backends between the two reads: as if it had none yet.
        return Ok(None);
    };
    let key = SockRevKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let frontend = SockRevValue {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // An LRU map evicts rather than fails; a lost entry only shows the application the
    // backend's address.
    let _ = SOCK_REVNAT.insert(key, frontend, 0);
    Ok(Some((backend.addr, backend.port)))
}

/// The backend a translated socket talks to, back to the frontend it asked for.
#[inline(always)]
fn reverse4(ctx: &SockAddrContext) {
    if host_socket(ctx).is_none() {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: reading the program's own context.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    if let Some((frontend_addr, frontend_port)) = frontend4(ctx, addr, port) {
        // SAFETY: writing the program's own context.
        unsafe {
            (*sa).user_ip4 = frontend_addr;
            (*sa).user_port = frontend_port as u32;
        }
    }
}

/// The frontend whose backend `addr:port` the socket was given, if it still exists.
#[inline(always)]
fn frontend4(ctx: &SockAddrContext, addr: u32, port: u16) -> Option<(u32, u16)> {
    let key = SockRevKey {
        cookie: socket_cookie(ctx),
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let frontend = unsafe { SOCK_REVNAT.get(key).copied() }?;
    // A frontend that went away no longer stands for the backend.
    service4(frontend.addr, frontend.port, frontend.proto)?;
    Some((frontend.addr, frontend.port))
}

/// The IPv4 address in an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[inline(always)]
fn v4_mapped(addr: &[u32; 4]) -> Option<u32> {
    (addr[0] == 0 && addr[1] == 0 && u32::from_be(addr[2]) == 0xffff).then_some(addr[3])
}

/// `::ffff:<addr>`.
#[inline(always)]
fn map_v4(addr: u32) -> [u32; 4] {
    [0, 0, 0xffffu32.to_be(), addr]
}

/// The socket's IPv6 address (`user_ip6`, read word by word as the verifier wants).
#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let sa = ctx.sock_addr;
    // SAFETY: reading the program's own context, 4 bytes at a time.
    unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    }
}

#[inline(always)]
fn set_user6(ctx: &SockAddrContext, addr: &[u32; 4], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: writing the program's own context, 4 bytes at a time.
    unsafe {
        (*sa).user_ip6[0] = addr[0];
        (*sa).user_ip6[1] = addr[1];
        (*sa).user_ip6[2] = addr[2];
        (*sa).user_ip6[3] = addr[3];
        (*sa).user_port = port as u32;
    }
}

/// The IPv6 frontend: its pods' entry when it has one (the node's own traffic uses an
/// externalTrafficPolicy Local frontend's endpoints on every node, as [`service4`]).
#[inline(always)]
fn service6(addr: [u32; 4], port: u16, proto: u8) -> Option<ServiceValue> {
    let mut key = ServiceKey6 {
        addr,
        port,
        proto,
        scope: SCOPE_ALL,
    };
    // SAFETY: the values are copied out at once.
    let all = unsafe { SERVICES6.get(key).copied() };
    if all.is_some_and(|v| v.flags & SVC_F_EXTERNAL_LOCAL != 0) {
        key.scope = SCOPE_POD;
        // SAFETY: as above.
        if let Some(service) = unsafe { SERVICES6.get(key).copied() } {
            return Some(service);
        }
    }
    all
}

/// loadBalancerSourceRanges for the node's own IPv6 address (its packets' source).
#[inline(always)]
fn source_allowed6(service: &ServiceValue) -> bool {
    let node_ip = CONFIG6.get(0).map_or([0; 4], |c| c.node_ip);
    let key = Key::new(
        source_range_prefix_len(128),
        SourceRangeKey6 {
            service_id: service.id,
            addr: node_ip,
        },
    );
    SOURCE_RANGES6.get(&key).is_some()
}

/// The IPv6 service's slot `pick % backend_count` (slot 0 if a shrink removed it meanwhile).
#[inline(always)]
fn backend6(service: &ServiceValue, pick: u32) -> Option<Backend6> {
    if service.backend_count == 0 {
        return None;
    }
    let mut key = BackendKey {
        service_id: service.id,
        slot: pick % service.backend_count,
    };
    // SAFETY: the value is copied out at once.
    if let Some(backend) = unsafe { BACKENDS6.get(key) } {
        return Some(*backend);
    }
    key.slot = 0;
    // SAFETY: as above.
    unsafe { BACKENDS6.get(key).copied() }
}

/// [`forward4`] for IPv6: the pods' entry first and loadBalancerSourceRanges as for IPv4;
/// session affinity is not kept for the node's IPv6 sockets (each connection is balanced).
#[inline(always)]
fn forward6(ctx: &SockAddrContext) -> Result<(), i32> {
    let Some(proto) = host_socket(ctx) else {
        return Ok(());
    };
    let addr = user_ip6(ctx);
    // SAFETY: reading the program's own context.
    let port = unsafe { (*ctx.sock_addr).user_port } as u16;
    if let Some(addr4) = v4_mapped(&addr) {
        if let Some((backend_addr, backend_port)) = balance4(ctx, proto, addr4, port)? {
            set_user6(ctx, &map_v4(backend_addr), backend_port);
        }
        return Ok(());
    }
    let Some(service) = service6(addr, port, proto) else {
        return Ok(());
    };
    if service.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed6(&service) {
        return Err(EPERM);
    }
    no_backend(&service)?;
    let cookie = socket_cookie(ctx);
    let Some(backend) = backend6(&service, pick(proto, cookie)) else {
        return Ok(());
    };
    let key = SockRevKey6 {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 3],
    };
    let frontend = SockRevValue6 {
        addr,
        port,
        proto,
        _pad: 0,
    };
    let _ = SOCK_REVNAT6.insert(key, frontend, 0);
    set_user6(ctx, &backend.addr, backend.port);
    Ok(())
}

#[inline(always)]
fn reverse6(ctx: &SockAddrContext) {
    if host_socket(ctx).is_none() {
        return;
    }
    // SAFETY: reading the program's own context.
    let port = unsafe { (*ctx.sock_addr).user_port } as u16;
    let addr = user_ip6(ctx);
    if let Some(addr4) = v4_mapped(&addr) {
        if let Some((frontend_addr, frontend_port)) = frontend4(ctx, addr4, port) {
            set_user6(ctx, &map_v4(frontend_addr), frontend_port);
        }
        return;
    }
    let key = SockRevKey6 {
        cookie: socket_cookie(ctx),
        addr,
        port,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once.
    let Some(frontend) = (unsafe { SOCK_REVNAT6.get(key).copied() }) else {
        return;
    };
    if service6(frontend.addr, frontend.port, frontend.proto).is_none() {
        return;
    }
    set_user6(ctx, &frontend.addr, frontend.port);
}
