//! Map layout shared by the eBPF programs (`ebpf/`) and the agent (`agent/`).
//!
//! This file is the one place the datapath's maps are described. Every key and value is
//! `#[repr(C)]`, padded explicitly so no byte is left uninitialised (the kernel hashes keys
//! byte for byte), and stores addresses and ports in network byte order exactly as they sit in
//! the packet, so the programs compare and copy them without swapping. IPv6 has its own keys
//! and maps next to the IPv4 ones (`*6` types and maps, as Cilium's `lb6_*`), see "IPv6" below.
//!
//! | map (= pin file)  | type             | key                  | value            | written by |
//! |-------------------|------------------|----------------------|------------------|------------|
//! | `services`        | hash             | [`ServiceKey`]       | [`ServiceValue`] | agent      |
//! | `backends`        | hash             | [`BackendKey`]       | [`Backend`]      | agent      |
//! | `conntrack`       | LRU hash         | [`CtKey`]            | [`CtValue`]      | programs (agent purges) |
//! | `ct_answered`     | hash             | [`CtKey`]            | [`CtValue`]      | programs (agent expires) |
//! | `affinity`        | LRU hash         | [`AffinityKey`]      | [`AffinityValue`]| programs (agent purges) |
//! | `source_ranges`   | LPM trie         | [`SourceRangeKey`] with a prefix length | `u8` (1) | agent |
//! | `config`          | array, 1 entry   | `u32` 0              | [`NodeConfig`]   | agent      |
//! | `drops`           | per-CPU array    | `u32` [`Reason`]     | `u64` packets    | programs   |
//! | `services6`       | hash             | [`ServiceKey6`]      | [`ServiceValue`] | agent      |
//! | `backends6`       | hash             | [`BackendKey`]       | [`Backend6`]     | agent      |
//! | `conntrack6`      | LRU hash         | [`CtKey6`]           | [`CtValue6`]     | programs (agent purges) |
//! | `ct_answered6`    | hash             | [`CtKey6`]           | [`CtValue6`]     | programs (agent expires) |
//! | `affinity6`       | LRU hash         | [`AffinityKey6`]     | [`AffinityValue6`]| programs (agent purges) |
//! | `source_ranges6`  | LPM trie         | [`SourceRangeKey6`] with a prefix length | `u8` (1) | agent |
//! | `config6`         | array, 1 entry   | `u32` 0              | [`NodeConfig6`]  | agent      |
//! | `sock_config`     | array, 1 entry   | `u32` 0              | [`SockConfig`]   | agent      |
//! | `sock_revnat`     | LRU hash         | [`SockRevKey`]       | [`SockRevValue`] | socket programs |
//! | `sock_revnat6`    | LRU hash         | [`SockRevKey6`]      | [`SockRevValue6`]| socket programs |
//! | `policy`          | LPM trie         | [`PolicyKey`] with a prefix length | [`PolicyValue`] | agent |
//! | `isolated`        | hash             | `u32` pod IPv4       | `u8` `ISOLATED_*`| agent      |
//! | `policy_flows`    | LRU hash         | [`PolicyFlowKey`]    | `u64` last seen ns | programs |
//! | `policy_replied`  | hash             | [`PolicyFlowKey`]    | `u64` last seen ns | programs (agent expires) |
//! | `policy_events`   | ring buffer      | -                    | [`PolicyEvent`] or [`PolicyEvent6`] | programs (`sluice monitor` reads) |
//! | `policy6`         | LPM trie         | [`PolicyKey6`] with a prefix length | [`PolicyValue`] | agent |
//! | `isolated6`       | hash             | `[u32; 4]` pod IPv6  | `u8` `ISOLATED_*`| agent      |
//! | `policy_flows6`   | LRU hash         | [`PolicyFlowKey6`]   | `u64` last seen ns | programs |
//! | `policy_replied6` | hash             | [`PolicyFlowKey6`]   | `u64` last seen ns | programs (agent expires) |
//!
//! The programs also have a private per-CPU array, `scratch6` (not pinned, no state between
//! packets): the IPv6 path's working copies of keys and values, which do not fit in the eBPF
//! stack next to the rest (ebpf/src/v6/mod.rs).
//!
//! ## services and backends
//!
//! A service frontend is one (address, port, protocol): a ClusterIP, a node IP at a NodePort,
//! an external IP or a load balancer IP. Its backends live in `backends` under (service id,
//! slot) for slots `0..backend_count`; a program picks `prandom % backend_count`. The agent
//! grows a service by writing new slots before raising `backend_count`, and shrinks it by
//! lowering `backend_count` before deleting slots, so a packet never sees a count with a
//! missing slot behind it (see `agent/src/datapath/sync.rs`). The `services` entry also
//! carries copies of the first [`INLINE_BACKENDS`] slots ([`ServiceValue::inline_backends`],
//! IPv4), rewritten with the entry whenever one of them changes (after the slot, before
//! anything is deleted): a new flow picking one of those slots reads no `backends` entry. At
//! scale every lookup of a random key is one or two cache misses (the bucket, the element),
//! so this takes a new flow of a small service from four misses to two.
//! [`ServiceValue::flags`] carry
//! kube-proxy's per-service behaviours ([`SVC_F_EXTERNAL`], ...), [`Backend::flags`] whether
//! the backend runs on this node ([`BACKEND_F_LOCAL`]).
//!
//! ## pod traffic to external frontends
//!
//! An external frontend with externalTrafficPolicy Local balances over this node's endpoints
//! only, but traffic from a pod uses the service's cluster-wide endpoints (kube-proxy's "pod
//! traffic for external destinations" rule). Such a frontend has a second `services` entry,
//! with [`ServiceKey::scope`] [`SCOPE_POD`], its own service id and the cluster-wide backends
//! (flags without [`SVC_F_EXTERNAL_LOCAL`] and [`SVC_F_DROP_WHEN_EMPTY`]). `from_pod` (and the
//! socket programs) look up the [`SCOPE_ALL`] entry and, only when it has
//! [`SVC_F_EXTERNAL_LOCAL`] (the frontends that have a pods' entry), the [`SCOPE_POD`] one,
//! which wins when present: every other packet costs one `services` lookup, a cache miss or two
//! at scale. `from_world` only uses the [`SCOPE_ALL`] entry. Each entry is a frontend of its
//! own for the agent's sync (ordering rules included): a pods' entry without its
//! [`SCOPE_ALL`] entry (a sync in progress) is not used, a [`SCOPE_ALL`] entry without its pods'
//! entry serves pods too. IPv6 frontends have the same pair in `services6`.
//!
//! ## conntrack
//!
//! `conntrack` holds two entries per translated flow, in the spirit of Cilium's CT map:
//! * [`CT_DIR_FORWARD`]: the client's original tuple (client -> frontend) to the chosen backend
//!   and, when the flow is source-NATed, the source it is given, so every later packet of the
//!   flow is translated the same way;
//! * [`CT_DIR_REPLY`]: the tuple the backend replies with (backend -> client, or backend -> the
//!   SNAT address and port) to the frontend address to restore as source and, when source-NATed,
//!   the original client to restore as destination (reverse NAT).
//!
//! A flow lives in one of two maps, as nf_conntrack tells "assured" flows from the rest:
//! * `conntrack` (LRU): new flows, until the backend answers. A flood of new flows evicts
//!   only such flows (as nf_conntrack's early drop of unassured entries does).
//! * `ct_answered` (plain hash, never evicted): flows the backend answered
//!   ([`CT_S_SEEN_REPLY`]). The packet that records the answer moves both entries there
//!   (`ebpf/src/conntrack.rs`); a connection that is over (RST, FIN both ways) moves back to
//!   `conntrack`, and the agent's garbage collection deletes them when they expire.
//!   When it is full the flow stays in `conntrack`, evictable, and the move is counted
//!   ([`REASON_CT_ANSWERED_FULL`]): established flows are never evicted to make room.
//!
//! Lookups try `ct_answered` first. A TCP segment to a frontend that is not a SYN and has no
//! entry in either map is dropped ([`REASON_DROP_TCP_NO_FLOW`]), never balanced again: its
//! connection lives on another backend. `conntrack6` and `ct_answered6` are the same for IPv6.
//!
//! ICMP errors about a flow (destination unreachable, time exceeded, parameter problem) are
//! found through the same entries by the tuple they quote.
//!
//! Both entries of a flow carry its state ([`CtValue::state`], `CT_S_*`: the backend answered,
//! a FIN from either side, a RST) and when it was last seen ([`CtValue::last_seen_ns`]); a
//! packet through either entry updates both (at most once per [`CT_REFRESH_NS`] unless the
//! state changes), so they expire together. The timeout comes from the protocol and the state
//! as nf_conntrack picks it ([`CtTimeouts`], configured in [`NodeConfig::ct_timeouts`]): TCP
//! before the answer, established, closing (FIN from one side), closed (RST, or FIN from both);
//! UDP unreplied or a stream; SCTP. The programs treat an expired entry as absent (the flow's
//! next packet is balanced again, its backend's late packets are not translated), a TCP SYN on
//! a closed connection starts a new one, and the agent deletes expired entries with their
//! peers ([`CtKey::peer`]). A re-balanced tuple's old reply entry is deleted when the new flow
//! is created (IPv4; an IPv6 SYN re-balancing a tuple overwrites its entries instead). IPv6
//! entries have the same state and timeouts. An entry with `last_seen_ns` 0 is untracked
//! (never expired; none is written any more).
//!
//! Masqueraded flows take their source port from [`NodeConfig::snat_port`] (the client's own
//! when it is in that range and free, else up to 64 probes at random indices of the range),
//! skipping the node's ephemeral ports so a masqueraded flow never takes the tuple of a
//! connection the node itself opens. A port only has to be unique per (masquerade address,
//! backend address, backend port, protocol): that is the reply entry's key.
//!
//! ## affinity
//!
//! sessionAffinity ClientIP: (affinity id, client address) -> the backend last chosen for that
//! client and when. A new flow of a service with [`SVC_F_AFFINITY`] reuses it while
//! `now - last_used_ns` is below the service's timeout, and refreshes `last_used_ns`.
//!
//! The affinity id ([`ServiceValue::affinity_id`]) is not the frontend's service id: as with
//! kube-proxy (which keeps a client's affinity in the service port's KUBE-SVC chain), a client
//! keeps its backend whether it comes through the ClusterIP, a NodePort, an external IP or a
//! load balancer IP of the same service port. The agent gives one affinity id to the
//! frontends of a service port (and family) that balance over the same backends; a frontend
//! with a different set (a Local traffic policy's node-local endpoints) has its own, so an
//! affinity backend is always one of the frontend's backends. `affinity6` is the IPv6 twin,
//! with its own ids.
//!
//! ## source_ranges
//!
//! (`source_ranges6`: the same for IPv6 frontends, [`SourceRangeKey6`], prefix length
//! `32 + n` for a range `/n` of up to 128 bits.)
//!
//! loadBalancerSourceRanges of the services with [`SVC_F_SOURCE_RANGES`]: an LPM trie keyed by
//! (service id, source address); a range `a.b.c.d/n` of service `id` is stored with prefix
//! length `32 + n` (the id is matched whole). A new flow whose source matches no entry of its
//! service is dropped. The agent writes a service's ranges before setting the flag and clears
//! the flag before deleting the last of them.
//!
//! ## config and drops
//!
//! `config` is this node's context ([`NodeConfig`]): the address masqueraded traffic gets, the
//! cluster CIDRs, masqueradeAll, the conntrack timeouts (for both families) and the masquerade
//! port range. `drops` counts the packets the programs dropped or answered
//! themselves, by [`Reason`]; a program also leaves the reason in `skb->cb[0]`
//! ([`CB_REASON_MAGIC`] | reason) so `BPF_PROG_RUN` callers (`sluice trace`) can name it.
//!
//! ## NetworkPolicy: policy, isolated, policy_flows, policy_events
//!
//! The agent compiles every NetworkPolicy selecting a pod of this node into longest-prefix
//! entries (agent/src/policy.rs, `compile`): for one (pod, direction, protocol), every prefix a
//! rule names becomes an entry holding the union of the port ranges of the rules covering the
//! whole prefix, so the longest prefix containing a peer answers what a scan of every rule
//! would. A new connection costs one `isolated` lookup and, for an isolated pod, one `policy`
//! lookup: O(1) in the number of policies and pods (the trie's depth is bounded by the key).
//!
//! * `isolated`: pod IPv4 -> [`ISOLATED_INGRESS`] | [`ISOLATED_EGRESS`]; a pod without an entry
//!   (or without the direction's bit) is open in that direction.
//! * `policy`: [`PolicyKey`] {pod, [`WAY_INGRESS`]/[`WAY_EGRESS`], protocol, peer} with prefix
//!   length [`policy_prefix_len`]`(n)` = 64 + n (pod, way, protocol and padding matched whole,
//!   then `n` bits of the peer prefix) -> [`PolicyValue`]: up to [`MAX_POLICY_PORT_RANGES`]
//!   sorted, merged port ranges (host byte order, both ends included). A prefix needing more
//!   ranges keeps the first [`MAX_POLICY_PORT_RANGES`] (fails closed: it allows less, never
//!   more) and the agent reports an error naming the pod and its policies. A missing entry
//!   means "no rule allows this peer"; a shorter prefix only ever allows a subset of a longer
//!   one's ports, so an entry the agent could not write also fails closed.
//! * The checks: egress in `from_pod` for a new flow, after service DNAT (the peer is the
//!   chosen backend, the port its target port), before conntrack remembers the flow; ingress in
//!   `to_pod` for a new flow as delivered (the peer is the original client, or the masquerade
//!   address of a masqueraded flow). The port is the destination's (the pod's for ingress, the
//!   peer's for egress).
//! * Connection state (`policy_flows`, LRU): only new connections are checked. Service flows
//!   are in `conntrack` (their later packets and replies never reach a policy check); every
//!   other flow a pod of this node opens or accepts is recorded in `policy_flows` under its
//!   initiator's tuple as seen at the pod's veth ([`PolicyFlowKey`], with the direction it was
//!   admitted in: [`WAY_EGRESS`] at the initiator's `from_pod`, [`WAY_INGRESS`] at the
//!   receiver's `to_pod`). A packet matching its own tuple (later packets) or the reversed
//!   tuple recorded the other way (replies) passes without a check, whether or not the pod is
//!   isolated: flows of open pods are recorded too, so a policy that isolates a pod later does
//!   not break its established connections. (A TCP SYN of a pod open in its direction is
//!   recorded without looking for an admitted flow first: it passes either way.) A reply whose flow was already reverse-translated
//!   (a redirected service flow) is recognised by the client's forward `conntrack` entry. The
//!   value is when the flow was last seen (bpf_ktime_get_ns, refreshed at most once a second);
//!   a UDP or SCTP flow idle for 120 s is new again (nf_conntrack's UDP timeout), a TCP flow
//!   does not expire (a new TCP connection is a SYN, which is always checked).
//! * Flows that had a reply move to `policy_replied` (a plain hash nothing evicts; `*6` for
//!   IPv6), as conntrack's answered flows do, so a flood of new flows evicts only unanswered
//!   ones; a TCP FIN or RST moves a flow back to the LRU (a closing connection needs no
//!   protection). The agent deletes replied flows idle longer than the TCP established
//!   timeout (TCP) or 120 s (the rest). When it is full a replied flow stays in the LRU,
//!   counted ([`REASON_POLICY_REPLIED_FULL`]). Lookups try `policy_replied` first.
//! * Drops: [`REASON_DROP_POLICY_EGRESS`], [`REASON_DROP_POLICY_INGRESS`] in `drops`, and a
//!   [`PolicyEvent`] in `policy_events` (`sluice monitor` streams them; an event is lost when
//!   the ring is full, the drop is counted either way).
//! * IPv6 (`policy6`, `isolated6`, `policy_flows6`): the same maps with 128-bit addresses,
//!   checked at the same points of the IPv6 path (ebpf/src/v6/policy.rs): `isolated6` pod
//!   IPv6 (`[u32; 4]`) -> `ISOLATED_*`; `policy6` [`PolicyKey6`] with prefix length
//!   [`policy6_prefix_len`]`(n)` = 160 + n -> [`PolicyValue`]; `policy_flows6`
//!   [`PolicyFlowKey6`] -> last seen ns. A dual-stack pod has an entry in each family, from
//!   the same rules: pod peers contribute their address of the family, ipBlocks (and their
//!   `except`s) apply to their own family only. Keys live in the per-CPU `scratch6`, not on
//!   the stack. IPv6 drops go to the same `policy_events` ring as a [`PolicyEvent6`]: a reader
//!   tells the two record types apart by their length (32 and 56 bytes).
//!
//! ## IPv6
//!
//! `services6`, `backends6`, `conntrack6`, `affinity6`, `source_ranges6` and `config6` are
//! the IPv6 `services`, `backends`, `conntrack`, `affinity`, `source_ranges` and `config`,
//! with 128-bit addresses (`[u32; 4]`, the 16 bytes as in the packet) and their own service
//! and affinity ids. The IPv6 datapath has the IPv4 one's behaviours (ebpf/src/v6/mod.rs),
//! with [`HAIRPIN6_SNAT_ADDR`] as its hairpin address; [`ServiceKey6::scope`] is
//! [`ServiceKey::scope`]'s twin.
//!
//! ## host traffic (socket programs)
//!
//! Processes in the node's own network namespace (the kubelet, hostNetwork pods) are balanced
//! when they address a socket, by cgroup `sock_addr` programs (ebpf/src/sock.rs), not per
//! packet: `connect()` and an unconnected UDP `sendmsg()` to a frontend get the backend's
//! address instead, so the packets leave already addressed to the backend and need no
//! conntrack entry. They use the same `services`/`backends`/`affinity` entries as the tc
//! programs (the [`SCOPE_POD`] entry first, as kube-proxy sends the node's own traffic to an
//! externalTrafficPolicy Local frontend's cluster-wide endpoints) and `services6`/`backends6`.
//!
//! * `sock_config` ([`SockConfig`]) holds the cookie of the node's network namespace. The
//!   programs run for every process of the cgroup they are attached to, pods included, whose
//!   sockets live in other namespaces and must keep the tc path: a socket whose namespace
//!   cookie differs is left alone. 0 (not written yet): nothing is translated.
//! * `sock_revnat` ([`SockRevKey`] -> [`SockRevValue`]): (socket cookie, backend address, port)
//!   -> the frontend the socket asked for, written at each translation. `recvmsg()` of a UDP
//!   socket and `getpeername()` rewrite the backend back to the frontend with it, so the
//!   application only ever sees the address it used. An entry whose frontend is gone from
//!   `services` is ignored; LRU eviction removes entries of closed sockets.
//! * `sock_revnat6`: the same for IPv6 ([`SockRevKey6`] -> [`SockRevValue6`]). An IPv6 socket
//!   reaching an IPv4 frontend by its IPv4-mapped address (`::ffff:a.b.c.d`) is balanced on the
//!   IPv4 maps and remembered in `sock_revnat`.
#![no_std]

pub mod crc32c;

/// Pin directory used by a real node. Tests pass their own with `--pin-path`.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/sluice";

/// Map names, as in the object and as pin file names under the pin directory.
pub const MAP_SERVICES: &str = "services";
pub const MAP_BACKENDS: &str = "backends";
pub const MAP_CONNTRACK: &str = "conntrack";
pub const MAP_CT_ANSWERED: &str = "ct_answered";
pub const MAP_AFFINITY: &str = "affinity";
pub const MAP_SOURCE_RANGES: &str = "source_ranges";
pub const MAP_CONFIG: &str = "config";
pub const MAP_DROPS: &str = "drops";
pub const MAP_SERVICES6: &str = "services6";
pub const MAP_BACKENDS6: &str = "backends6";
pub const MAP_CONNTRACK6: &str = "conntrack6";
pub const MAP_CT_ANSWERED6: &str = "ct_answered6";
pub const MAP_CONFIG6: &str = "config6";
pub const MAP_SOCK_CONFIG: &str = "sock_config";
pub const MAP_SOCK_REVNAT: &str = "sock_revnat";
pub const MAP_SOCK_REVNAT6: &str = "sock_revnat6";
pub const MAP_AFFINITY6: &str = "affinity6";
pub const MAP_SOURCE_RANGES6: &str = "source_ranges6";
pub const MAP_POLICY: &str = "policy";
pub const MAP_ISOLATED: &str = "isolated";
pub const MAP_POLICY_FLOWS: &str = "policy_flows";
pub const MAP_POLICY_EVENTS: &str = "policy_events";
pub const MAP_POLICY6: &str = "policy6";
pub const MAP_ISOLATED6: &str = "isolated6";
pub const MAP_POLICY_FLOWS6: &str = "policy_flows6";
pub const MAP_POLICY_REPLIED: &str = "policy_replied";
pub const MAP_POLICY_REPLIED6: &str = "policy_replied6";

/// Default capacities of `services`/`services6`, `backends`/`backends6` and
/// `conntrack`/`conntrack6` (each family gets the same). The agent sets the real ones at load
/// time (`--max-services`, `--max-backends`, `--max-conntrack`; the programs never depend on
/// them) and replaces a pinned map of another size by one holding its entries
/// (agent/src/datapath/resize.rs). Every other map has the size given here.
pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
pub const MAX_CONNTRACK: u32 = 262_144;
pub const MAX_AFFINITY: u32 = 65_536;
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// Translated host sockets remembered for their replies (`sock_revnat`, `sock_revnat6`).
pub const MAX_SOCK_REVNAT: u32 = 65_536;
/// `policy` entries: (pod, direction, protocol, peer prefix) across this node's pods.
pub const MAX_POLICY_ENTRIES: u32 = 65_536;
/// Pods of this node `isolated` can hold.
pub const MAX_POLICY_PODS: u32 = 16_384;
/// Default entries of `policy_flows` and `policy_replied` (each family): `--max-policy-flows`.
pub const MAX_POLICY_FLOWS: u32 = 262_144;
/// Bytes of the `policy_events` ring buffer (a power of two, a multiple of the page size).
pub const POLICY_EVENTS_BYTES: u32 = 256 * 1024;
/// Port ranges one `policy` entry holds (see [`PolicyValue`]).
pub const MAX_POLICY_PORT_RANGES: usize = 16;
/// Cluster CIDRs [`NodeConfig`] holds; the programs check them all, unrolled.
pub const MAX_CLUSTER_CIDRS: usize = 8;

/// IP protocol numbers as found in the IPv4 header.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// The address hairpin traffic (a pod reaching itself through a service) is source-NATed to,
/// so the pod does not see a packet from itself: Cilium's default service loopback address,
/// 169.254.42.1, as the maps hold it.
pub const HAIRPIN_SNAT_ADDR: [u8; 4] = [169, 254, 42, 1];

/// The IPv6 service loopback address hairpin traffic is source-NATed to:
/// `fd00:a9fe:2a01::1`, a unique local address (RFC 4193) whose middle spells the IPv4 one,
/// 169.254.42.1, in hex. Pods reach it through their default route, like any address.
pub const HAIRPIN6_SNAT_ADDR: [u8; 16] = [
    0xfd, 0x00, 0xa9, 0xfe, 0x2a, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
];

/// A service frontend: (address, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// Which traffic the entry serves: [`SCOPE_ALL`], or [`SCOPE_POD`] for the pods' entry of
    /// an externalTrafficPolicy Local frontend (see "pod traffic to external frontends").
    pub scope: u8,
}

/// [`ServiceKey::scope`] of a frontend's entry: every packet addressed to it.
pub const SCOPE_ALL: u8 = 0;
/// [`ServiceKey::scope`] of the second entry an external frontend with externalTrafficPolicy
/// Local has: the service's cluster-wide backends, which packets from pods (`from_pod`) use
/// instead of the frontend's node-local ones.
pub const SCOPE_POD: u8 = 1;

/// [`ServiceValue::flags`]: the frontend is reached from outside the cluster (a NodePort, an
/// external IP or a load balancer IP): externalTrafficPolicy applies, and traffic entering
/// from outside the node to a backend on another node is source-NATed to the node.
pub const SVC_F_EXTERNAL: u16 = 1 << 0;
/// externalTrafficPolicy Local on an external frontend: never source-NATed (the backends are
/// this node's only, the translation saw to that).
pub const SVC_F_EXTERNAL_LOCAL: u16 = 1 << 1;
/// Without backends, drop silently (a Local policy left none on this node) instead of
/// rejecting (TCP RST, ICMP port unreachable: the service has no endpoint at all).
pub const SVC_F_DROP_WHEN_EMPTY: u16 = 1 << 2;
/// sessionAffinity ClientIP, for [`ServiceValue::affinity_timeout`] seconds (`affinity` map).
pub const SVC_F_AFFINITY: u16 = 1 << 3;
/// loadBalancerSourceRanges: sources outside the service's `source_ranges` are dropped.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 4;

/// [`ServiceValue::kind`]: which Kubernetes address the frontend is.
pub const KIND_CLUSTER_IP: u8 = 0;
pub const KIND_NODE_PORT: u8 = 1;
pub const KIND_EXTERNAL_IP: u8 = 2;
pub const KIND_LOAD_BALANCER: u8 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Agent-assigned id, the first half of every [`BackendKey`] of this service; also in
    /// conntrack, affinity and source range entries.
    pub id: u32,
    /// Number of slots `0..backend_count` present in `backends`.
    pub backend_count: u32,
    /// `SVC_F_*`.
    pub flags: u16,
    /// `KIND_*`, for `sluice state`; the programs decide on `flags`.
    pub kind: u8,
    pub _pad: u8,
    /// sessionAffinity timeout in seconds, with [`SVC_F_AFFINITY`]; 0 otherwise.
    pub affinity_timeout: u32,
    /// With [`SVC_F_AFFINITY`]: the first half of this frontend's [`AffinityKey`]s (or
    /// [`AffinityKey6`]s), shared by the frontends of its service port with the same backends
    /// (see "affinity"); 0 otherwise.
    pub affinity_id: u32,
    /// `services` (IPv4): copies of the backends in slots `0..min(backend_count,`
    /// [`INLINE_BACKENDS`]`)`, written with the count, so a new flow picking one of them needs
    /// no `backends` lookup (see "services and backends"); the rest zero. `services6`: zero
    /// (an IPv6 backend does not fit).
    pub inline_backends: [Backend; INLINE_BACKENDS],
}

/// How many of a service's first backends its `services` entry carries
/// ([`ServiceValue::inline_backends`]).
pub const INLINE_BACKENDS: usize = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// [`Backend::flags`]: the backend runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

/// A pod endpoint: address and port, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    /// `BACKEND_F_*`.
    pub flags: u8,
    pub _pad: u8,
}

impl Backend {
    /// An unused [`ServiceValue::inline_backends`] entry.
    pub const NONE: Backend = Backend {
        addr: 0,
        port: 0,
        flags: 0,
        _pad: 0,
    };
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

/// [`CtValue::flags`]: the flow is source-NATed; `snat_addr`/`snat_port` are valid.
pub const CT_F_SNAT: u16 = 1 << 0;
/// The flow's packets skip the host's routing after translation (the programs redirect them
/// to the egress interface found with `bpf_fib_lookup`), in both directions: flows entering
/// from outside the node, and source-NATed ones, whose source became a local address the stack
/// would drop as martian. Their replies are reverse-translated where they enter the datapath
/// (`from_pod`, `from_world`). Flows without the flag go through the host's routing and
/// netfilter, which see the backend's address both ways: their replies are reverse-translated
/// on the way out (`to_pod`, `to_world`).
pub const CT_F_REDIRECT: u16 = 1 << 1;
/// Hairpin: the backend is the client itself; packets are sent back out the interface they
/// came in on.
pub const CT_F_HAIRPIN: u16 = 1 << 2;

/// A conntrack entry.
///
/// | field              | forward entry                       | reply entry |
/// |--------------------|-------------------------------------|-------------|
/// | `nat_addr/port`    | backend: the new destination        | frontend: the new source |
/// | `snat_addr/port`   | with [`CT_F_SNAT`]: the new source  | with [`CT_F_SNAT`]: the client, the new destination |
/// | `state`, `last_seen_ns` | the flow's, the same in both entries (see "conntrack") | |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub nat_addr: u32,
    pub nat_port: u16,
    /// `CT_F_*`.
    pub flags: u16,
    pub snat_addr: u32,
    pub snat_port: u16,
    /// `CT_S_*`: what the flow has shown (reply, FINs, RST); with the protocol, it picks the
    /// entry's timeout ([`CtTimeouts::timeout_ns`]).
    pub state: u8,
    pub _pad: u8,
    /// Id of the service the flow was balanced by.
    pub service_id: u32,
    /// The slot of `backends` the backend was picked from ([`CT_SLOT_UNKNOWN`]: picked by
    /// sessionAffinity), so a retransmitted SYN keeps the backend only while the service
    /// still has it there.
    pub backend_slot: u32,
    /// bpf_ktime_get_ns() when the entry was created, for `sluice state`, and to tell a
    /// retransmitted SYN from a new connection reusing the tuple.
    pub created_ns: u64,
    /// bpf_ktime_get_ns() of the flow's last packet (within [`CT_REFRESH_NS`]): the entry
    /// expires its timeout after it.
    pub last_seen_ns: u64,
}

/// [`CtValue::backend_slot`] of a backend not picked from a slot.
pub const CT_SLOT_UNKNOWN: u32 = u32::MAX;

/// [`CtValue::state`]: the backend answered (TCP: its SYN-ACK; UDP: a datagram back). A TCP
/// flow is established from then on, a UDP one a "stream" (nf_conntrack's assured flow).
pub const CT_S_SEEN_REPLY: u8 = 1 << 0;
/// The client sent a FIN.
pub const CT_S_FIN_CLIENT: u8 = 1 << 1;
/// The backend sent a FIN.
pub const CT_S_FIN_BACKEND: u8 = 1 << 2;
/// Either side sent a RST: the connection is gone.
pub const CT_S_RST: u8 = 1 << 3;
/// A TCP flow that is over: reset, or closed by both sides.
pub const CT_S_CLOSED: u8 = CT_S_RST | CT_S_FIN_CLIENT | CT_S_FIN_BACKEND;

/// How often a flow's packets rewrite its entries' `last_seen_ns` at most (a state change
/// always does): a packet refreshes both entries of its flow when the last refresh is older
/// than this or than an eighth of the flow's timeout, whichever is shorter
/// ([`CtTimeouts::refresh_due`]), so a long flow costs a map write per second, not per packet,
/// and an entry expires at most that much early.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// The conntrack timeouts, in milliseconds, as nf_conntrack's sysctls and kube-proxy's
/// `conntrack` settings name them; 0 means the default ([`CtTimeouts::DEFAULT`]). An entry
/// expires when the flow has been silent for the timeout of its protocol and state: expired
/// entries count as absent for the programs (the flow's next packet is a new flow, balanced
/// again) and the agent's garbage collection deletes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtTimeouts {
    /// TCP before the backend answered (nf_conntrack_tcp_timeout_syn_sent).
    pub tcp_syn_ms: u32,
    /// TCP established (kube-proxy's `--conntrack-tcp-timeout-established`).
    pub tcp_established_ms: u32,
    /// TCP closed by one side only (kube-proxy's `--conntrack-tcp-timeout-close-wait`).
    pub tcp_close_wait_ms: u32,
    /// TCP reset, or closed by both sides (nf_conntrack_tcp_timeout_close).
    pub tcp_close_ms: u32,
    /// UDP before the backend answered (kube-proxy's `--conntrack-udp-timeout`).
    pub udp_ms: u32,
    /// UDP once the backend answered (kube-proxy's `--conntrack-udp-timeout-stream`).
    pub udp_stream_ms: u32,
    /// SCTP (nf_conntrack_sctp_timeout_established).
    pub sctp_ms: u32,
    pub _pad: u32,
}

impl CtTimeouts {
    /// kube-proxy's defaults for what it sets (established 24 h, close-wait 1 h), the kernel's
    /// nf_conntrack defaults for the rest: SYN sent 120 s, close 10 s, UDP 30 s, UDP stream
    /// 120 s, SCTP established 210 s.
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn_ms: 120_000,
        tcp_established_ms: 24 * 3_600_000,
        tcp_close_wait_ms: 3_600_000,
        tcp_close_ms: 10_000,
        udp_ms: 30_000,
        udp_stream_ms: 120_000,
        sctp_ms: 210_000,
        _pad: 0,
    };

    /// How long an entry of protocol `proto` in `state` (`CT_S_*`) lives without packets, in
    /// nanoseconds.
    #[inline(always)]
    pub fn timeout_ns(&self, proto: u8, state: u8) -> u64 {
        let (ms, default) = match proto {
            PROTO_TCP if state & CT_S_RST != 0 => (self.tcp_close_ms, Self::DEFAULT.tcp_close_ms),
            PROTO_TCP
                if state & (CT_S_FIN_CLIENT | CT_S_FIN_BACKEND)
                    == CT_S_FIN_CLIENT | CT_S_FIN_BACKEND =>
            {
                (self.tcp_close_ms, Self::DEFAULT.tcp_close_ms)
            }
            PROTO_TCP if state & (CT_S_FIN_CLIENT | CT_S_FIN_BACKEND) != 0 => {
                (self.tcp_close_wait_ms, Self::DEFAULT.tcp_close_wait_ms)
            }
            PROTO_TCP if state & CT_S_SEEN_REPLY != 0 => {
                (self.tcp_established_ms, Self::DEFAULT.tcp_established_ms)
            }
            PROTO_TCP => (self.tcp_syn_ms, Self::DEFAULT.tcp_syn_ms),
            PROTO_UDP if state & CT_S_SEEN_REPLY != 0 => {
                (self.udp_stream_ms, Self::DEFAULT.udp_stream_ms)
            }
            PROTO_UDP => (self.udp_ms, Self::DEFAULT.udp_ms),
            _ => (self.sctp_ms, Self::DEFAULT.sctp_ms),
        };
        let ms = if ms == 0 { default } else { ms };
        ms as u64 * 1_000_000
    }

    /// Whether a packet at `now_ns` refreshes an entry last seen at `last_seen_ns` (see
    /// [`CT_REFRESH_NS`]).
    #[inline(always)]
    pub fn refresh_due(&self, proto: u8, state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
        let every = self.timeout_ns(proto, state) / 8;
        let every = if every < CT_REFRESH_NS {
            every
        } else {
            CT_REFRESH_NS
        };
        now_ns.saturating_sub(last_seen_ns) >= every
    }

    /// Whether an entry of protocol `proto` in `state`, last seen at `last_seen_ns`, has
    /// expired at `now_ns` (both bpf_ktime_get_ns(), CLOCK_MONOTONIC). An entry another CPU
    /// refreshed after `now_ns` was read is not expired.
    #[inline(always)]
    pub fn expired(&self, proto: u8, state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
        now_ns.saturating_sub(last_seen_ns) > self.timeout_ns(proto, state)
    }
}

/// The state of a flow after a packet with TCP flags `tcp_flags` (0 for UDP and SCTP) went
/// through its entry of direction `dir`. A client's SYN (without ACK) starts the connection
/// over: a new connection on the tuple, or the first SYN's retransmission.
#[inline(always)]
pub fn ct_next_state(state: u8, proto: u8, dir: u8, tcp_flags: u8) -> u8 {
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    let mut state = state;
    if dir == CT_DIR_REPLY {
        state |= CT_S_SEEN_REPLY;
    }
    if proto == PROTO_TCP {
        if dir == CT_DIR_FORWARD && tcp_flags & (SYN | ACK) == SYN {
            state = 0;
        }
        if tcp_flags & RST != 0 {
            state |= CT_S_RST;
        }
        if tcp_flags & FIN != 0 {
            state |= if dir == CT_DIR_FORWARD {
                CT_S_FIN_CLIENT
            } else {
                CT_S_FIN_BACKEND
            };
        }
    }
    state
}

/// Whether a TCP flow in `state` is over (reset, or closed by both sides): a SYN on its tuple
/// is a new connection, balanced again.
#[inline(always)]
pub fn ct_closed(state: u8) -> bool {
    state & CT_S_RST != 0
        || state & (CT_S_FIN_CLIENT | CT_S_FIN_BACKEND) == CT_S_FIN_CLIENT | CT_S_FIN_BACKEND
}

/// A conntrack entry of either family, as the programs (lookup, refresh) and the agent
/// (garbage collection) read it: one set of accessors for both, implemented by
/// `impl_ct_peer!`.
pub trait CtEntry: Copy {
    type Key: Copy + PartialEq;
    fn proto(key: &Self::Key) -> u8;
    fn dir(key: &Self::Key) -> u8;
    /// [`CtKey::peer`] / [`CtKey6::peer`].
    fn peer(key: &Self::Key, value: &Self) -> Self::Key;
    fn state(&self) -> u8;
    fn last_seen_ns(&self) -> u64;
    /// Records the flow's new state, seen at `now`.
    fn mark(&mut self, state: u8, now: u64);
    /// Sets the key's destination port (network order): a masquerade port candidate of a
    /// reply key.
    fn set_dport(key: &mut Self::Key, port: u16);
}

/// `peer` and [`CtEntry`] for a conntrack key type and its value type (the two families'
/// keys differ only in their address width).
macro_rules! impl_ct_peer {
    ($key:ident, $value:ident) => {
        impl $key {
            /// The key of the other entry of the flow this entry (`self` -> `value`) belongs
            /// to: the reply key of a forward entry, the forward key of a reply entry. Two
            /// entries are one flow's when each is the other's peer (after a TCP SYN
            /// re-balanced a tuple, the old reply entry's peer is the new flow's forward
            /// entry, whose peer is another reply key).
            #[inline(always)]
            pub fn peer(&self, value: &$value) -> $key {
                let snat = value.flags & CT_F_SNAT != 0;
                if self.dir == CT_DIR_FORWARD {
                    $key {
                        saddr: value.nat_addr,
                        daddr: if snat { value.snat_addr } else { self.saddr },
                        sport: value.nat_port,
                        dport: if snat { value.snat_port } else { self.sport },
                        proto: self.proto,
                        dir: CT_DIR_REPLY,
                        _pad: 0,
                    }
                } else {
                    $key {
                        saddr: if snat { value.snat_addr } else { self.daddr },
                        daddr: value.nat_addr,
                        sport: if snat { value.snat_port } else { self.dport },
                        dport: value.nat_port,
                        proto: self.proto,
                        dir: CT_DIR_FORWARD,
                        _pad: 0,
                    }
                }
            }
        }

        impl CtEntry for $value {
            type Key = $key;
            #[inline(always)]
            fn proto(key: &$key) -> u8 {
                key.proto
            }
            #[inline(always)]
            fn dir(key: &$key) -> u8 {
                key.dir
            }
            #[inline(always)]
            fn peer(key: &$key, value: &Self) -> $key {
                key.peer(value)
            }
            #[inline(always)]
            fn state(&self) -> u8 {
                self.state
            }
            #[inline(always)]
            fn last_seen_ns(&self) -> u64 {
                self.last_seen_ns
            }
            #[inline(always)]
            fn mark(&mut self, state: u8, now: u64) {
                self.state = state;
                self.last_seen_ns = now;
            }
            #[inline(always)]
            fn set_dport(key: &mut $key, port: u16) {
                key.dport = port;
            }
        }
    };
}

impl_ct_peer!(CtKey, CtValue);
impl_ct_peer!(CtKey6, CtValue6);

/// sessionAffinity: a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// [`ServiceValue::affinity_id`] of the frontend.
    pub affinity_id: u32,
    /// The client's address, network byte order.
    pub client: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// The backend the client's flows go to.
    pub backend: Backend,
    /// bpf_ktime_get_ns() of the client's last new flow.
    pub last_used_ns: u64,
}

/// The data part of a `source_ranges` key (the LPM trie's key is a `u32` prefix length
/// followed by this). The prefix length counts the 32 bits of `service_id` plus the range's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub service_id: u32,
    /// The range's network address (or, in a lookup, the source), network byte order.
    pub addr: u32,
}

/// An IPv6 service frontend: (address, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    /// IPv6 address, the 16 bytes as in the packet.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// [`SCOPE_ALL`] or [`SCOPE_POD`], as [`ServiceKey::scope`].
    pub scope: u8,
}

/// sessionAffinity of an IPv6 client ([`AffinityKey`]'s twin, `affinity6` map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey6 {
    /// [`ServiceValue::affinity_id`] of the IPv6 frontend.
    pub affinity_id: u32,
    /// The client's address, as in the packet.
    pub client: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue6 {
    /// The backend the client's flows go to.
    pub backend: Backend6,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the client's last new flow.
    pub last_used_ns: u64,
}

/// The data part of a `source_ranges6` key ([`SourceRangeKey`]'s twin); prefix length
/// `32 + bits` of the range.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey6 {
    pub service_id: u32,
    /// The range's network address (or, in a lookup, the source), as in the packet.
    pub addr: [u32; 4],
}

/// An IPv6 pod endpoint: address (as in the packet) and port (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend6 {
    pub addr: [u32; 4],
    pub port: u16,
    /// `BACKEND_F_*`.
    pub flags: u8,
    pub _pad: u8,
}

/// An IPv6 flow tuple, plus the direction it was recorded for ([`CtKey`]'s IPv6 twin).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// An IPv6 conntrack entry, [`CtValue`]'s twin: forward entry: the backend (new destination)
/// and, with [`CT_F_SNAT`], the new source; reply entry: the frontend (new source) and, with
/// [`CT_F_SNAT`], the client (new destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue6 {
    pub nat_addr: [u32; 4],
    pub nat_port: u16,
    /// `CT_F_*`.
    pub flags: u16,
    pub snat_addr: [u32; 4],
    pub snat_port: u16,
    /// `CT_S_*`, as [`CtValue::state`].
    pub state: u8,
    pub _pad: u8,
    pub service_id: u32,
    pub backend_slot: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
}

/// An IPv6 CIDR as `(addr & mask) == net`, word by word, as in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cidr6 {
    pub net: [u32; 4],
    pub mask: [u32; 4],
}

/// This node for the IPv6 datapath (`config6` map, entry 0), [`NodeConfig`]'s twin.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig6 {
    /// The node's IPv6 address masqueraded traffic gets as source (as in the packet); all
    /// zeroes: none known, nothing is masqueraded (such flows are not translated).
    pub node_ip: [u32; 4],
    /// `CONFIG_F_*`.
    pub flags: u32,
    /// Entries of `cluster_cidrs` in use (the IPv6 cluster CIDRs); 0: every source counts as
    /// a pod.
    pub cidr_count: u32,
    pub cluster_cidrs: [Cidr6; MAX_CLUSTER_CIDRS],
}

/// The socket programs' context (`sock_config` map, entry 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockConfig {
    /// Cookie of the node's network namespace (`SO_NETNS_COOKIE`, as
    /// `bpf_get_netns_cookie` returns it): only sockets of that namespace are translated. 0:
    /// unknown, nothing is.
    pub netns_cookie: u64,
}

/// A translated socket and the backend it was sent to (`sock_revnat`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`: unique per socket for the life of the system.
    pub cookie: u64,
    /// The backend's address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// The frontend a socket addressed (`sock_revnat` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    /// The frontend's address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    /// The protocol, to find the frontend in `services` again.
    pub proto: u8,
    pub _pad: u8,
}

/// [`SockRevKey`]'s IPv6 twin (`sock_revnat6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    /// The backend's address (as in the packet) and port (network byte order).
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u16; 3],
}

/// [`SockRevValue`]'s IPv6 twin.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevValue6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Prefix length of a `source_ranges` entry for a range of `bits` bits.
pub const fn source_range_prefix_len(bits: u32) -> u32 {
    32 + bits
}

/// An IPv4 CIDR as `(addr & mask) == net`, both in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cidr4 {
    pub net: u32,
    pub mask: u32,
}

/// [`NodeConfig::flags`]: kube-proxy's masqueradeAll: every new service flow is source-NATed
/// (except external frontends with externalTrafficPolicy Local).
pub const CONFIG_F_MASQUERADE_ALL: u32 = 1 << 0;

/// This node, as the programs need it (`config` map, entry 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The node's IPv4 address masqueraded traffic gets as source; 0: none known, nothing is
    /// masqueraded.
    pub node_ip: u32,
    /// `CONFIG_F_*`.
    pub flags: u32,
    /// Entries of `cluster_cidrs` in use. 0: no cluster CIDR configured, every source counts
    /// as a pod (kube-proxy without clusterCIDR does not masquerade on it).
    pub cidr_count: u32,
    pub _pad: u32,
    pub cluster_cidrs: [Cidr4; MAX_CLUSTER_CIDRS],
    /// Conntrack timeouts, for both families' maps (0: the default).
    pub ct_timeouts: CtTimeouts,
    /// The source ports masquerading to the node's address picks from, inclusive, host
    /// order (`--masquerade-port-range`). Both 0:
    /// [`SNAT_PORT_MIN_DEFAULT`]-[`SNAT_PORT_MAX_DEFAULT`].
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Ports of that range never used: the node's ephemeral ports
    /// (net.ipv4.ip_local_port_range), inclusive, host order, so a masqueraded flow never
    /// takes the tuple of a connection the node itself opens. Both 0: none.
    pub skip_port_min: u16,
    pub skip_port_max: u16,
}

/// The default masquerade port range: every unprivileged port (less the node's ephemeral
/// ones, [`NodeConfig::skip_port_min`]), as nf_nat's MASQUERADE.
pub const SNAT_PORT_MIN_DEFAULT: u16 = 1_024;
pub const SNAT_PORT_MAX_DEFAULT: u16 = 65_535;

impl NodeConfig {
    /// The masquerade port range in use: (first port, number of ports), host order.
    #[inline(always)]
    pub fn snat_ports(&self) -> (u16, u32) {
        if self.snat_port_min == 0 || self.snat_port_max < self.snat_port_min {
            (
                SNAT_PORT_MIN_DEFAULT,
                (SNAT_PORT_MAX_DEFAULT - SNAT_PORT_MIN_DEFAULT) as u32 + 1,
            )
        } else {
            (
                self.snat_port_min,
                (self.snat_port_max - self.snat_port_min) as u32 + 1,
            )
        }
    }

    /// The masquerade ports as one run of indices: (first port, usable ports, first skipped
    /// port, skipped ports), host order. Index `i < usable` is port [`NodeConfig::snat_port`].
    #[inline(always)]
    pub fn snat_port_space(&self) -> (u32, u32, u32, u32) {
        let (min, count) = self.snat_ports();
        let (min, max) = (min as u32, min as u32 + count - 1);
        let (skip_min, skip_max) = (self.skip_port_min as u32, self.skip_port_max as u32);
        // The part of the skipped ports inside the range.
        let lo = if skip_min > min { skip_min } else { min };
        let hi = if skip_max < max { skip_max } else { max };
        if skip_max == 0 || skip_max < skip_min || lo > hi || hi - lo + 1 >= count {
            // Nothing to skip, or nothing would be left: the whole range.
            return (min, count, 0, 0);
        }
        (min, count - (hi - lo + 1), lo, hi - lo + 1)
    }

    /// The masquerade port of index `index` (below the usable count of
    /// [`NodeConfig::snat_port_space`] `space`), host order.
    #[inline(always)]
    pub fn snat_port(space: (u32, u32, u32, u32), index: u32) -> u16 {
        let (min, _, skip_first, skipped) = space;
        let port = min + index;
        if skipped != 0 && port >= skip_first {
            (port + skipped) as u16
        } else {
            port as u16
        }
    }

    /// Whether `port` (host order) is one masquerading may use.
    #[inline(always)]
    pub fn is_snat_port(space: (u32, u32, u32, u32), port: u16) -> bool {
        let (min, usable, skip_first, skipped) = space;
        let port = port as u32;
        port >= min
            && port < min + usable + skipped
            && !(skipped != 0 && port >= skip_first && port < skip_first + skipped)
    }
}

/// `isolated` bits: the pod is selected by a policy for ingress / egress.
pub const ISOLATED_INGRESS: u8 = 1 << 0;
pub const ISOLATED_EGRESS: u8 = 1 << 1;

/// [`PolicyKey::way`], [`PolicyFlowKey::way`], [`PolicyEvent::way`].
pub const WAY_INGRESS: u8 = 0;
pub const WAY_EGRESS: u8 = 1;

/// The data part of a `policy` key (the LPM trie's key is a `u32` prefix length followed by
/// this); see [`policy_prefix_len`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The pod of this node the policy is enforced for, network byte order.
    pub pod: u32,
    /// [`WAY_INGRESS`] or [`WAY_EGRESS`].
    pub way: u8,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_SCTP`].
    pub proto: u8,
    pub _pad: u16,
    /// The peer prefix's network address (in a lookup: the peer), network byte order.
    pub peer: u32,
}

/// Prefix length of a `policy` entry for a peer prefix of `bits` bits: the 64 bits of pod,
/// way, protocol and padding, then the peer's.
pub const fn policy_prefix_len(bits: u32) -> u32 {
    64 + bits
}

/// A port range of a `policy` entry, host byte order, both ends included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyPortRange {
    pub first: u16,
    pub last: u16,
}

/// The ports a peer prefix may use: `ranges[..count]`, sorted and merged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub count: u32,
    pub ranges: [PolicyPortRange; MAX_POLICY_PORT_RANGES],
}

/// A flow admitted by policy (`policy_flows`): the initiator's tuple as seen at the pod's veth
/// (after service DNAT), and the direction it was admitted in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyFlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`WAY_EGRESS`]: recorded at the initiator's `from_pod`; [`WAY_INGRESS`]: at the
    /// receiver's `to_pod`.
    pub way: u8,
    pub _pad: u16,
}

/// A packet dropped by policy, as `policy_events` carries it to `sluice monitor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEvent {
    /// The pod of this node whose policy dropped the packet, network byte order.
    pub pod: u32,
    /// The other end (the backend for egress, the client or masquerade address for ingress).
    pub peer: u32,
    /// The pod's port and the peer's, network byte order.
    pub pod_port: u16,
    pub peer_port: u16,
    pub proto: u8,
    /// [`WAY_INGRESS`] or [`WAY_EGRESS`].
    pub way: u8,
    pub _pad: u16,
    /// [`REASON_DROP_POLICY_INGRESS`] or [`REASON_DROP_POLICY_EGRESS`].
    pub reason: u32,
    pub _pad2: u32,
    /// bpf_ktime_get_ns() of the drop.
    pub time_ns: u64,
}

/// The data part of a `policy6` key: [`PolicyKey`] with IPv6 addresses (the 16 bytes as in
/// the packet); see [`policy6_prefix_len`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey6 {
    pub pod: [u32; 4],
    /// [`WAY_INGRESS`] or [`WAY_EGRESS`].
    pub way: u8,
    pub proto: u8,
    pub _pad: u16,
    pub peer: [u32; 4],
}

/// Prefix length of a `policy6` entry for a peer prefix of `bits` bits: the 160 bits of pod,
/// way, protocol and padding, then the peer's.
pub const fn policy6_prefix_len(bits: u32) -> u32 {
    160 + bits
}

/// [`PolicyFlowKey`] with IPv6 addresses (`policy_flows6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyFlowKey6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub way: u8,
    pub _pad: u16,
}

/// [`PolicyEvent`] of an IPv6 packet, in the same `policy_events` ring (56 bytes long where
/// [`PolicyEvent`] is 32: the record length says which).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEvent6 {
    pub pod: [u32; 4],
    pub peer: [u32; 4],
    pub pod_port: u16,
    pub peer_port: u16,
    pub proto: u8,
    pub way: u8,
    pub _pad: u16,
    pub reason: u32,
    pub _pad2: u32,
    pub time_ns: u64,
}

/// Why a program dropped a packet or answered it itself (index of the `drops` map).
pub type Reason = u32;
/// Answered with a TCP RST or an ICMP port unreachable: the service has no endpoints.
pub const REASON_REJECT_NO_ENDPOINTS: Reason = 1;
/// Dropped: the service has endpoints, but a Local traffic policy left none on this node.
pub const REASON_DROP_NO_LOCAL_ENDPOINTS: Reason = 2;
/// Dropped: the source is not in the service's loadBalancerSourceRanges.
pub const REASON_DROP_SOURCE_RANGE: Reason = 3;
/// Dropped: no free source port to masquerade the flow with.
pub const REASON_DROP_NO_SNAT_PORT: Reason = 4;
/// Dropped: the answer to a rejected packet could not be built.
pub const REASON_DROP_REJECT_FAILED: Reason = 5;
/// Dropped: a kernel helper failed to rewrite the packet.
pub const REASON_DROP_REWRITE_FAILED: Reason = 6;
/// Dropped: a new connection the sending pod's egress NetworkPolicy does not allow.
pub const REASON_DROP_POLICY_EGRESS: Reason = 7;
/// Dropped: a new connection the receiving pod's ingress NetworkPolicy does not allow.
pub const REASON_DROP_POLICY_INGRESS: Reason = 8;
/// Dropped: a TCP segment to a frontend that is not a SYN and belongs to no flow (its
/// connection was balanced to a backend nobody remembers; a new one would answer with a RST).
pub const REASON_DROP_TCP_NO_FLOW: Reason = 9;
/// Counted, not dropped: a flow the backend answered could not move to `ct_answered` (full);
/// it stays in `conntrack`, where new flows can evict it (`--max-conntrack`).
pub const REASON_CT_ANSWERED_FULL: Reason = 10;
/// Counted, not dropped: an answered NetworkPolicy flow could not move to
/// `policy_replied` (full); new flows can evict it.
pub const REASON_POLICY_REPLIED_FULL: Reason = 11;
/// Counted by the agent, not the programs: a program detached, a pin removed or replaced,
/// put back by the resync's repair pass (agent/src/datapath/repair.rs).
pub const REASON_DATAPATH_REPAIRED: Reason = 12;
/// Entries of the `drops` map (reason 0 is unused; room for reasons to come, so the pinned
/// map keeps its size).
pub const REASON_COUNT: u32 = 16;
/// The last reason in use.
pub const REASON_LAST: Reason = REASON_DATAPATH_REPAIRED;

/// Whether `reason` only counts an event (the packet went on).
pub const fn reason_is_count_only(reason: Reason) -> bool {
    matches!(
        reason,
        REASON_CT_ANSWERED_FULL | REASON_POLICY_REPLIED_FULL | REASON_DATAPATH_REPAIRED
    )
}

/// `skb->cb[0]` of a packet a program dropped or answered: this magic | the [`Reason`].
pub const CB_REASON_MAGIC: u32 = 0x5c1c_e000;
pub const CB_REASON_MASK: u32 = 0xff;

/// A short name for a [`Reason`], as `sluice trace` and metrics show it.
pub const fn reason_name(reason: Reason) -> &'static str {
    match reason {
        REASON_REJECT_NO_ENDPOINTS => "reject-no-endpoints",
        REASON_DROP_NO_LOCAL_ENDPOINTS => "drop-no-local-endpoints",
        REASON_DROP_SOURCE_RANGE => "drop-source-range",
        REASON_DROP_NO_SNAT_PORT => "drop-no-snat-port",
        REASON_DROP_REJECT_FAILED => "drop-reject-failed",
        REASON_DROP_REWRITE_FAILED => "drop-rewrite-failed",
        REASON_DROP_POLICY_EGRESS => "drop-policy-egress-denied",
        REASON_DROP_POLICY_INGRESS => "drop-policy-ingress-denied",
        REASON_DROP_TCP_NO_FLOW => "drop-tcp-no-flow",
        REASON_CT_ANSWERED_FULL => "conntrack-answered-full",
        REASON_POLICY_REPLIED_FULL => "policy-replied-full",
        REASON_DATAPATH_REPAIRED => "datapath-repaired",
        _ => "unknown",
    }
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
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for Cidr4 {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for CtValue6 {}
    unsafe impl aya::Pod for NodeConfig6 {}
    unsafe impl aya::Pod for SockConfig {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for SockRevKey6 {}
    unsafe impl aya::Pod for SockRevValue6 {}
    unsafe impl aya::Pod for Cidr6 {}
    unsafe impl aya::Pod for AffinityKey6 {}
    unsafe impl aya::Pod for AffinityValue6 {}
    unsafe impl aya::Pod for SourceRangeKey6 {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyPortRange {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PolicyFlowKey {}
    unsafe impl aya::Pod for PolicyEvent {}
    unsafe impl aya::Pod for PolicyKey6 {}
    unsafe impl aya::Pod for PolicyFlowKey6 {}
    unsafe impl aya::Pod for PolicyEvent6 {}
    unsafe impl aya::Pod for CtTimeouts {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use core::mem::size_of;

    // The programs and the agent must agree byte for byte; implicit padding would make keys
    // hash differently depending on stack garbage.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 36);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 40);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<SourceRangeKey>(), 8);
        assert_eq!(size_of::<CtTimeouts>(), 32);
        assert_eq!(size_of::<NodeConfig>(), 16 + 8 * MAX_CLUSTER_CIDRS + 32 + 8);
        assert_eq!(size_of::<ServiceKey6>(), 20);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<CtKey6>(), 40);
        assert_eq!(size_of::<CtValue6>(), 64);
        assert_eq!(size_of::<SockConfig>(), 8);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevValue>(), 8);
        assert_eq!(size_of::<SockRevKey6>(), 32);
        assert_eq!(size_of::<SockRevValue6>(), 20);
        assert_eq!(size_of::<NodeConfig6>(), 24 + 32 * MAX_CLUSTER_CIDRS);
        assert_eq!(size_of::<AffinityKey6>(), 20);
        assert_eq!(size_of::<AffinityValue6>(), 32);
        assert_eq!(size_of::<SourceRangeKey6>(), 20);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicyValue>(), 4 + 4 * MAX_POLICY_PORT_RANGES);
        assert_eq!(size_of::<PolicyFlowKey>(), 16);
        assert_eq!(size_of::<PolicyEvent>(), 32);
        assert_eq!(size_of::<PolicyKey6>(), 36);
        assert_eq!(size_of::<PolicyFlowKey6>(), 40);
        assert_eq!(size_of::<PolicyEvent6>(), 56);
    }

    #[test]
    fn tcp_state_follows_syn_reply_fins_and_rst() {
        const SYN: u8 = 0x02;
        const ACK: u8 = 0x10;
        const FIN: u8 = 0x01;
        const RST: u8 = 0x04;
        let t = CtTimeouts::DEFAULT;
        let syn = ct_next_state(0, PROTO_TCP, CT_DIR_FORWARD, SYN);
        assert_eq!(t.timeout_ns(PROTO_TCP, syn), 120_000_000_000);
        let established = ct_next_state(syn, PROTO_TCP, CT_DIR_REPLY, SYN | ACK);
        assert_eq!(established, CT_S_SEEN_REPLY);
        assert_eq!(t.timeout_ns(PROTO_TCP, established), 86_400_000_000_000);
        let half = ct_next_state(established, PROTO_TCP, CT_DIR_FORWARD, FIN | ACK);
        assert_eq!(t.timeout_ns(PROTO_TCP, half), 3_600_000_000_000);
        assert!(!ct_closed(half));
        let both = ct_next_state(half, PROTO_TCP, CT_DIR_REPLY, FIN | ACK);
        assert!(ct_closed(both));
        assert_eq!(t.timeout_ns(PROTO_TCP, both), 10_000_000_000);
        let reset = ct_next_state(established, PROTO_TCP, CT_DIR_REPLY, RST);
        assert!(ct_closed(reset));
        // A new SYN on the tuple starts over.
        assert_eq!(ct_next_state(both, PROTO_TCP, CT_DIR_FORWARD, SYN), 0);
        // UDP: unreplied, then a stream; flags mean nothing.
        let udp = ct_next_state(0, PROTO_UDP, CT_DIR_FORWARD, 0);
        assert_eq!(t.timeout_ns(PROTO_UDP, udp), 30_000_000_000);
        let stream = ct_next_state(udp, PROTO_UDP, CT_DIR_REPLY, 0);
        assert_eq!(t.timeout_ns(PROTO_UDP, stream), 120_000_000_000);
        assert_eq!(t.timeout_ns(PROTO_SCTP, stream), 210_000_000_000);
    }

    #[test]
    fn configured_timeouts_replace_the_defaults_and_expiry_tolerates_a_later_refresh() {
        let t = CtTimeouts {
            udp_ms: 500,
            ..CtTimeouts::default()
        };
        assert_eq!(t.timeout_ns(PROTO_UDP, 0), 500_000_000);
        assert_eq!(t.timeout_ns(PROTO_UDP, CT_S_SEEN_REPLY), 120_000_000_000);
        assert!(!t.expired(PROTO_UDP, 0, 1_000_000_000, 1_500_000_000));
        assert!(t.expired(PROTO_UDP, 0, 1_000_000_000, 1_500_000_001));
        // Refreshed by another CPU after `now` was read.
        assert!(!t.expired(PROTO_UDP, 0, 2_000_000_000, 1_000_000_000));
        // Refreshes: every eighth of a short timeout, at least once a second for long ones.
        assert!(!t.refresh_due(PROTO_UDP, 0, 1_000_000_000, 1_062_000_000));
        assert!(t.refresh_due(PROTO_UDP, 0, 1_000_000_000, 1_063_000_000));
        let established = CT_S_SEEN_REPLY;
        assert!(!t.refresh_due(PROTO_TCP, established, 0, 999_999_999));
        assert!(t.refresh_due(PROTO_TCP, established, 0, 1_000_000_000));
    }

    #[test]
    fn peers_of_plain_and_masqueraded_flows_find_each_other() {
        for snat in [false, true] {
            let forward = CtKey {
                saddr: 1,
                daddr: 2,
                sport: 10,
                dport: 20,
                proto: PROTO_TCP,
                dir: CT_DIR_FORWARD,
                _pad: 0,
            };
            let value = CtValue {
                nat_addr: 3,
                nat_port: 30,
                flags: if snat { CT_F_SNAT } else { 0 },
                snat_addr: if snat { 4 } else { 0 },
                snat_port: if snat { 40 } else { 0 },
                state: 0,
                _pad: 0,
                service_id: 1,
                backend_slot: 0,
                created_ns: 0,
                last_seen_ns: 0,
            };
            let reply = forward.peer(&value);
            assert_eq!(reply.dir, CT_DIR_REPLY);
            assert_eq!((reply.saddr, reply.sport), (3, 30));
            let reply_value = CtValue {
                nat_addr: 2,
                nat_port: 20,
                snat_addr: if snat { 1 } else { 0 },
                snat_port: if snat { 10 } else { 0 },
                ..value
            };
            assert_eq!(reply.peer(&reply_value), forward);
        }
    }

    #[test]
    fn the_masquerade_port_range_defaults_when_unset() {
        let mut config = NodeConfig::default();
        assert_eq!(config.snat_ports(), (1_024, 64_512));
        config.snat_port_min = 62_000;
        config.snat_port_max = 62_000;
        assert_eq!(config.snat_ports(), (62_000, 1));
    }

    /// Every index maps to a distinct usable port, the skipped ports are never produced, and
    /// `is_snat_port` agrees, for ranges around, inside, overlapping and outside the skipped
    /// ones.
    #[test]
    fn the_masquerade_port_space_skips_the_ephemeral_ports() {
        let config = |min, max, skip_min, skip_max| NodeConfig {
            snat_port_min: min,
            snat_port_max: max,
            skip_port_min: skip_min,
            skip_port_max: skip_max,
            ..NodeConfig::default()
        };
        // The default: 1024-65535 less Linux's default 32768-60999.
        let space = config(0, 0, 32_768, 60_999).snat_port_space();
        assert_eq!(space.1, 36_280);
        assert_eq!(NodeConfig::snat_port(space, 0), 1_024);
        assert_eq!(NodeConfig::snat_port(space, 31_743), 32_767);
        assert_eq!(NodeConfig::snat_port(space, 31_744), 61_000);
        assert_eq!(NodeConfig::snat_port(space, 36_279), 65_535);
        let cases = [
            (100, 200, 0, 0),
            (100, 200, 150, 160),
            (100, 200, 50, 120),
            (100, 200, 180, 300),
            (100, 200, 300, 400),
            (100, 200, 100, 200), // all skipped: the whole range is used
            (100, 200, 99, 199),
            (100, 200, 160, 150), // not a range: nothing skipped
        ];
        for (min, max, skip_min, skip_max) in cases {
            let space = config(min, max, skip_min, skip_max).snat_port_space();
            let ports: Vec<u16> = (0..space.1)
                .map(|i| NodeConfig::snat_port(space, i))
                .collect();
            let usable: Vec<u16> = (min..=max)
                .filter(|p| NodeConfig::is_snat_port(space, *p))
                .collect();
            assert_eq!(ports, usable, "{min}-{max} less {skip_min}-{skip_max}");
            let whole = skip_max < skip_min || (skip_min <= min && skip_max >= max);
            for p in min..=max {
                let skipped = !whole && p >= skip_min && p <= skip_max;
                assert_eq!(ports.contains(&p), !skipped, "{p} of {min}-{max}");
            }
            assert!(!NodeConfig::is_snat_port(space, min - 1));
            assert!(!NodeConfig::is_snat_port(space, max + 1));
        }
    }

    #[test]
    fn every_reason_has_a_name() {
        for reason in 1..=REASON_LAST {
            assert_ne!(reason_name(reason), "unknown", "{reason}");
        }
        assert_eq!(reason_name(REASON_LAST + 1), "unknown");
        const { assert!(REASON_LAST < REASON_COUNT) };
    }
}
