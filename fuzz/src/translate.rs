//! Objects -> desired state, checked against kube-proxy's rules as written out here
//! independently of `translate.rs`, then the state -> the IPv4 `services`/`backends` maps.
//!
//! For every frontend a service asks for (each valid cluster IP, node IP at the nodePort,
//! external IP and load balancer IP, at each valid port), with the endpoints of that port and
//! family in the service's EndpointSlices (matched by port name and protocol; an endpoint's
//! first address; one address may be listed by several slices, as during a slice migration):
//!
//! * the state has the frontend (for this service, or for one that claimed it first);
//! * every frontend of the state is one a service asks for, of the kind it asks for;
//! * backends are sorted, unique, of the frontend's family, and each is an address and port
//!   of the service's slices, usable (ready, or serving and terminating) in some listing; under
//!   a Local traffic policy also listed on this node;
//! * never zero backends when an endpoint is usable in every listing (Cluster policy), or
//!   usable and on this node in every listing (Local policy): the terminating fallback
//!   (KEP-1669) and topology never leave a service with usable endpoints without backends;
//! * without topology, the Cluster policy's backends are exactly the ready endpoints when every
//!   listing agrees on readiness;
//! * an empty frontend drops when a usable endpoint exists (a Local policy filtered it away)
//!   and rejects when none is usable anywhere;
//! * `cluster_backends` exactly for external frontends with `externalTrafficPolicy: Local`,
//!   checked like Cluster-policy backends; `local_backends` are backends listed on this node;
//! * sessionAffinity's timeout and the source ranges' family;
//!
//! and the IPv4 sync programs every IPv4 frontend under a service id of its own (never 0, never
//! shared), with exactly its backends reachable, writes nothing when synced again, and leaves
//! nothing behind when the state is emptied. A [`sluice::translate::Translator`] reusing its
//! last pass gives what a fresh translation gives.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use sluice::{
    datapath::{sync::ServiceSync, sync6, wire},
    manifests::{ObjectRef, Objects},
    node::NodeContext,
    state::{BackendAddr, DesiredState, Frontend, FrontendKind, Protocol, ServiceEntry, WhenEmpty},
    translate::{
        translate, Translator, DEFAULT_AFFINITY_TIMEOUT, SERVICE_NAME_LABEL,
        SERVICE_PROXY_NAME_LABEL, TOPOLOGY_HINTS_ANNOTATION, TOPOLOGY_MODE_ANNOTATION,
    },
};

use sluice::datapath::memory_maps::MemoryMaps;

pub fn check(data: &[u8]) {
    let (objects, _) = crate::objects(data);
    for node in crate::node_contexts(&objects) {
        check_node(&objects, &node);
    }
}

pub fn check_node(objects: &Objects, node: &NodeContext) {
    let (state, _errors) = translate(objects, node);

    // The incremental translator: its first pass, and a pass reusing everything, are the
    // fresh translation.
    let mut translator = Translator::default();
    assert_eq!(translator.translate(objects, node).0, state);
    assert_eq!(translator.translate(objects, node).0, state);

    for (frontend, entry) in &state.services {
        entry_is_well_formed(frontend, entry);
    }

    // Every frontend some service asks for, with what the checks need to know about it.
    let mut wanted: BTreeMap<Frontend, Vec<Wanted>> = BTreeMap::new();
    for (key, service) in &objects.services {
        frontends_of(key, service, objects, node, &mut wanted);
    }
    for (frontend, candidates) in &wanted {
        let entry = state.services.get(frontend).unwrap_or_else(|| {
            panic!(
                "frontend {frontend} of {} is missing from the state",
                candidates[0].name
            )
        });
        let matching: Vec<&Wanted> = candidates
            .iter()
            .filter(|w| w.name == entry.name && w.kind == entry.kind)
            .collect();
        // Names are `namespace/name[:port]`: invalid names (with a `:`) can make two services'
        // ports look alike; the entry is then checked as neither.
        let services: BTreeSet<&ObjectRef> = matching.iter().map(|w| &w.service).collect();
        if services.len() == 1 {
            for want in matching {
                check_entry(frontend, entry, want, node);
            }
        }
    }
    for (frontend, entry) in &state.services {
        let claimed = wanted.get(frontend).is_some_and(|c| {
            c.iter()
                .any(|w| w.name == entry.name && w.kind == entry.kind)
        });
        assert!(
            claimed,
            "frontend {frontend} ({} {}) is not one any service asks for",
            entry.kind, entry.name
        );
    }

    check_sync(&state);
}

/// What holds for any entry on its own.
fn entry_is_well_formed(frontend: &Frontend, entry: &ServiceEntry) {
    let family = frontend.ip.is_ipv4();
    assert_eq!(
        canonical(frontend.ip),
        frontend.ip,
        "{frontend}: IPv4-mapped"
    );
    assert_ne!(frontend.port, 0, "{frontend}: port 0");
    let sorted_unique = |list: &[BackendAddr], what: &str| {
        assert!(
            list.windows(2).all(|w| w[0] < w[1]),
            "{frontend}: {what} not sorted and unique: {list:?}"
        );
        for backend in list {
            assert_eq!(backend.ip.is_ipv4(), family, "{frontend}: {what} {backend}");
            assert_eq!(
                canonical(backend.ip),
                backend.ip,
                "{frontend}: {what} {backend}"
            );
            assert_ne!(backend.port, 0, "{frontend}: {what} {backend}");
        }
    };
    sorted_unique(&entry.backends, "backends");
    if let Some(cluster) = &entry.cluster_backends {
        sorted_unique(cluster, "cluster_backends");
    }
    for local in &entry.local_backends {
        assert!(
            entry.backends.contains(local)
                || entry
                    .cluster_backends
                    .as_ref()
                    .is_some_and(|c| c.contains(local)),
            "{frontend}: local backend {local} is not a backend"
        );
    }
    assert_eq!(
        entry.external_local,
        entry.cluster_backends.is_some(),
        "{frontend}: externalTrafficPolicy Local without cluster-wide backends for pods, or the reverse"
    );
    assert!(
        !entry.external_local || entry.kind.is_external(),
        "{frontend}: a ClusterIP frontend with externalTrafficPolicy Local"
    );
    assert!(
        entry.source_ranges.is_empty() || entry.kind == FrontendKind::LoadBalancer,
        "{frontend}: source ranges on a {} frontend",
        entry.kind
    );
    for range in &entry.source_ranges {
        assert_eq!(range.addr().is_ipv4(), family, "{frontend}: range {range}");
        assert_eq!(
            range.trunc(),
            *range,
            "{frontend}: range {range} has host bits"
        );
    }
    assert!(
        entry.affinity_timeout != Some(0),
        "{frontend}: affinity timeout 0"
    );
}

/// One service port's claim on a frontend.
struct Wanted {
    service: ObjectRef,
    name: String,
    kind: FrontendKind,
    /// Local traffic policy for this frontend's kind.
    local: bool,
    topology: bool,
    affinity_timeout: Option<u32>,
    /// The endpoints of the port in the frontend's family, by backend: every listing of it.
    listings: Arc<BTreeMap<BackendAddr, Vec<Listing>>>,
}

#[derive(Clone, Copy, Debug)]
struct Listing {
    ready: bool,
    serving_terminating: bool,
    on_this_node: bool,
}

impl Listing {
    fn usable(&self) -> bool {
        self.ready || self.serving_terminating
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn protocol(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

fn addresses<'a>(list: impl IntoIterator<Item = &'a String>) -> Vec<IpAddr> {
    list.into_iter()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(canonical)
        .collect()
}

/// The frontends `service` asks for, as kube-proxy's rules (the module documentation of
/// `translate.rs`) say.
fn frontends_of(
    key: &ObjectRef,
    service: &Service,
    objects: &Objects,
    node: &NodeContext,
    wanted: &mut BTreeMap<Frontend, Vec<Wanted>>,
) {
    let labels = service.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return;
    }
    let Some(spec) = &service.spec else {
        return;
    };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return;
    }
    let mut cluster_ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.as_ref());
    }
    let cluster_ips = addresses(
        cluster_ips
            .into_iter()
            .filter(|ip| !ip.is_empty() && *ip != "None"),
    );
    if cluster_ips.is_empty() {
        return; // headless (or no valid cluster IP)
    }
    let node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    let load_balancer = service_type == "LoadBalancer";
    let external_ips = addresses(spec.external_ips.iter().flatten());
    let lb_ips = if load_balancer {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        addresses(
            ingress
                .into_iter()
                .flatten()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_ref()),
        )
    } else {
        Vec::new()
    };
    let node_ips: Vec<IpAddr> = node
        .node_ips
        .iter()
        .filter(|ip| {
            node.nodeport_addresses.is_empty()
                || node.nodeport_addresses.iter().any(|n| n.contains(*ip))
        })
        .map(|ip| canonical(*ip))
        .collect();
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let annotations = service.metadata.annotations.as_ref();
    let mode = annotations.and_then(|a| {
        a.get(TOPOLOGY_MODE_ANNOTATION)
            .or_else(|| a.get(TOPOLOGY_HINTS_ANNOTATION))
    });
    let topology = matches!(mode.map(String::as_str), Some("Auto" | "auto"))
        || spec.traffic_distribution.as_deref() == Some("PreferClose");
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });

    for port in spec.ports.iter().flatten() {
        let (Some(proto), Some(number)) =
            (protocol(port.protocol.as_deref()), port_number(port.port))
        else {
            continue;
        };
        let name = match port.name.as_deref().unwrap_or_default() {
            "" => key.to_string(),
            port_name => format!("{key}:{port_name}"),
        };
        let listings =
            [true, false].map(|v4| Arc::new(listings(key, port, proto, v4, objects, node)));
        let mut add = |ip: IpAddr, port: u16, kind: FrontendKind| {
            let frontend = Frontend { ip, port, proto };
            wanted.entry(frontend).or_default().push(Wanted {
                service: key.clone(),
                name: name.clone(),
                kind,
                local: if kind.is_external() {
                    external_local
                } else {
                    internal_local
                },
                topology: topology && node.zone.is_some(),
                affinity_timeout,
                listings: Arc::clone(&listings[usize::from(!ip.is_ipv4())]),
            });
        };
        for ip in &cluster_ips {
            add(*ip, number, FrontendKind::ClusterIp);
        }
        if node_ports {
            if let Some(node_port) = port.node_port.and_then(port_number) {
                for ip in &node_ips {
                    add(*ip, node_port, FrontendKind::NodePort);
                }
            }
        }
        for ip in &external_ips {
            add(*ip, number, FrontendKind::ExternalIp);
        }
        for ip in &lb_ips {
            add(*ip, number, FrontendKind::LoadBalancer);
        }
    }
}

/// Every listing of every endpoint of `port` in the service's slices of one family.
fn listings(
    key: &ObjectRef,
    port: &ServicePort,
    proto: Protocol,
    v4: bool,
    objects: &Objects,
    node: &NodeContext,
) -> BTreeMap<BackendAddr, Vec<Listing>> {
    let wanted_name = port.name.as_deref().unwrap_or_default();
    let address_type = if v4 { "IPv4" } else { "IPv6" };
    let mut listings: BTreeMap<BackendAddr, Vec<Listing>> = BTreeMap::new();
    for (slice_key, slice) in &objects.endpoint_slices {
        let labels = slice.metadata.labels.as_ref();
        if slice_key.namespace != key.namespace
            || labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) != Some(&key.name)
            || slice.address_type != address_type
        {
            continue;
        }
        // The slice's first port of that name and protocol.
        let slice_port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == wanted_name
                && protocol(p.protocol.as_deref()) == Some(proto)
        });
        let Some(number) = slice_port.and_then(|p| p.port).and_then(port_number) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .map(canonical)
                .filter(|ip| ip.is_ipv4() == v4)
            else {
                continue;
            };
            // EndpointConditions as the API documents them and kube-proxy reads them
            // (endpointslicecache.go): ready and serving unset mean true, terminating unset
            // means false.
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            listings
                .entry(BackendAddr { ip, port: number })
                .or_default()
                .push(Listing {
                    ready,
                    serving_terminating: !ready && serving && terminating,
                    on_this_node: node.name.is_some()
                        && endpoint.node_name.as_deref() == node.name.as_deref(),
                });
        }
    }
    listings
}

fn check_entry(frontend: &Frontend, entry: &ServiceEntry, want: &Wanted, node: &NodeContext) {
    let listings = &want.listings;
    let all = |b: &BackendAddr, f: &dyn Fn(&Listing) -> bool| listings[b].iter().all(f);
    let any = |b: &BackendAddr, f: &dyn Fn(&Listing) -> bool| listings[b].iter().any(f);
    let what = format!("{frontend} ({} {})", entry.kind, entry.name);

    // No backend from outside the slices, none that no listing makes usable.
    let from_slices = |list: &[BackendAddr], local: bool| {
        for backend in list {
            assert!(
                listings.contains_key(backend),
                "{what}: backend {backend} is in none of the service's EndpointSlices"
            );
            assert!(
                any(backend, &Listing::usable),
                "{what}: backend {backend} is neither ready nor serving and terminating"
            );
            if local {
                assert!(
                    any(backend, &|l| l.on_this_node),
                    "{what}: backend {backend} of a Local policy is not on node {:?}",
                    node.name
                );
            }
        }
    };
    from_slices(&entry.backends, want.local);
    if let Some(cluster) = &entry.cluster_backends {
        from_slices(cluster, false);
    }
    for local in &entry.local_backends {
        assert!(
            any(local, &|l| l.on_this_node),
            "{what}: backend {local} is marked local but is not on node {:?}",
            node.name
        );
    }
    for backend in entry
        .backends
        .iter()
        .chain(entry.cluster_backends.iter().flatten())
    {
        if all(backend, &|l| l.on_this_node) {
            assert!(
                entry.local_backends.contains(backend),
                "{what}: backend {backend} on this node is not marked local"
            );
        }
    }

    // Never zero backends while an endpoint is usable (by every listing of it).
    let usable = listings.keys().find(|b| all(b, &Listing::usable));
    let usable_here = listings
        .keys()
        .find(|b| all(b, &|l| l.usable() && l.on_this_node));
    let cluster_policy = |list: &[BackendAddr], which: &str| {
        if let Some(endpoint) = usable {
            assert!(
                !list.is_empty(),
                "{what}: no {which} although endpoint {endpoint} is usable"
            );
        }
        // Without topology, exactly the ready endpoints when the listings agree.
        let agreed = listings
            .keys()
            .all(|b| all(b, &|l| l.ready) || all(b, &|l| !l.ready));
        let ready: Vec<BackendAddr> = listings
            .keys()
            .filter(|b| all(b, &|l| l.ready))
            .copied()
            .collect();
        if !want.topology && agreed && !ready.is_empty() {
            assert_eq!(list, ready, "{what}: {which} are not the ready endpoints");
        }
    };
    if want.local {
        if let Some(endpoint) = usable_here {
            assert!(
                !entry.backends.is_empty(),
                "{what}: no backends although endpoint {endpoint} on this node is usable"
            );
        }
    } else {
        cluster_policy(&entry.backends, "backends");
    }
    if let Some(cluster) = &entry.cluster_backends {
        cluster_policy(cluster, "cluster-wide backends for pods");
    }

    // REJECT when nothing is usable anywhere, DROP when a Local policy filtered it away.
    if entry.backends.is_empty() {
        if let Some(endpoint) = usable {
            assert_eq!(
                entry.when_empty,
                WhenEmpty::Drop,
                "{what}: rejects although endpoint {endpoint} is usable"
            );
        }
        if !listings.keys().any(|b| any(b, &Listing::usable)) {
            assert_eq!(
                entry.when_empty,
                WhenEmpty::Reject,
                "{what}: drops although no endpoint is usable"
            );
        }
    }

    assert_eq!(entry.affinity_timeout, want.affinity_timeout, "{what}");
}

/// The state through the IPv4 sync engine: every IPv4 frontend programmed under an id of its
/// own with exactly its backends; a second sync writes nothing; an empty state clears the maps.
fn check_sync(state: &DesiredState) {
    let mut sync = ServiceSync::read_back(MemoryMaps::default()).expect("empty maps read back");
    let stats = sync.sync(state);
    assert!(stats.is_complete(), "{stats:?}");
    let programmed = sync.programmed();
    let by_key: BTreeMap<_, _> = programmed.iter().map(|p| (p.key, p)).collect();
    let mut ids = BTreeSet::new();
    for p in &programmed {
        assert_ne!(p.id, 0, "{:?}: service id 0", p.frontend);
        assert!(ids.insert(p.id), "service id {} used twice", p.id);
    }
    let mut expected_entries = 0;
    for (frontend, entry) in &state.services {
        let Some(key) = wire::service_key(frontend) else {
            // IPv6: its maps' keys and values can be made.
            assert!(sync6::service_key6(frontend).is_some(), "{frontend}");
            for backend in entry
                .backends
                .iter()
                .chain(entry.cluster_backends.iter().flatten())
            {
                assert!(
                    sync6::backend6_value(backend, false).is_some(),
                    "{frontend}: backend {backend}"
                );
            }
            continue;
        };
        let id = sync.service_id(frontend);
        assert!(
            id.is_some_and(|id| id != 0),
            "{frontend} ({}) has no valid service id: {id:?}",
            entry.name
        );
        let reachable = |key, backends: &[BackendAddr]| {
            let p = by_key
                .get(&key)
                .unwrap_or_else(|| panic!("{frontend}: {key:?} not programmed"));
            let got: BTreeSet<BackendAddr> = p.backends.iter().copied().collect();
            let want: BTreeSet<BackendAddr> = backends.iter().copied().collect();
            assert_eq!(got, want, "{frontend}: reachable backends");
            assert_eq!(p.backend_count as usize, backends.len(), "{frontend}");
        };
        reachable(key, &entry.backends);
        expected_entries += 1;
        if let Some(cluster) = &entry.cluster_backends {
            let pod_key = wire::pod_service_key(frontend).expect("an IPv4 frontend");
            reachable(pod_key, cluster);
            expected_entries += 1;
        }
    }
    assert_eq!(
        programmed.len(),
        expected_entries,
        "entries without a frontend"
    );

    let again = sync.sync(state);
    assert_eq!(
        again.map_writes, 0,
        "an unchanged state was written again: {again:?}"
    );
    let ids_again: BTreeSet<u32> = sync.programmed().iter().map(|p| p.id).collect();
    assert_eq!(ids, ids_again, "service ids changed without a change");

    let cleared = sync.sync(&DesiredState::default());
    assert!(cleared.is_complete(), "{cleared:?}");
    let maps = sync.maps();
    assert!(
        maps.services.is_empty() && maps.backends.is_empty() && maps.ranges.is_empty(),
        "left behind: {:?} {:?} {:?}",
        maps.services,
        maps.backends,
        maps.ranges
    );
}
