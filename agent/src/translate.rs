//! Kubernetes objects -> desired datapath state. Pure: no I/O, no clock, fully unit-tested.
//!
//! The rules follow kube-proxy (pkg/proxy: servicechangetracker.go, endpointslicecache.go,
//! topology.go, and the iptables proxier's choice of REJECT or DROP):
//! * ExternalName and headless (`clusterIP: None`) services get nothing programmed; so do
//!   services labelled `service.kubernetes.io/service-proxy-name` (they belong to another proxy).
//! * Every service port becomes a frontend on each cluster IP (`clusterIPs`: one per family on
//!   a dual-stack service); NodePort and LoadBalancer services add one on each node IP, IPv4
//!   and IPv6 (filtered by `--nodeport-addresses`) at the node port;
//!   `externalIPs` and LoadBalancer `status.loadBalancer.ingress` IPs (except `ipMode: Proxy`)
//!   add one at the service port.
//! * Endpoints come from the EndpointSlices labelled `kubernetes.io/service-name`, in the
//!   service's namespace, of the frontend's address type (like kube-proxy's one proxier per
//!   family, an IPv4 frontend balances over IPv4 endpoints only and an IPv6 one over IPv6
//!   endpoints only; FQDN slices are ignored); a slice port is matched to the service port by
//!   name and protocol, and its number is the backend port (that is how `targetPort` by name is
//!   resolved). Only an endpoint's first address is used, as kube-proxy does. Several slices
//!   are merged and duplicates removed. A selector-less service is treated like any other.
//! * Cluster endpoints are the ready ones (a missing `ready` counts as ready), narrowed to this
//!   node's zone when topology applies (`trafficDistribution: PreferClose` or the
//!   `service.kubernetes.io/topology-mode: Auto` annotation, every ready endpoint hinted, one
//!   hinted for this zone); when none is ready, the serving and terminating ones (KEP-1669).
//!   Local endpoints are those with `nodeName` equal to this node, ready first, else serving
//!   and terminating.
//! * ClusterIP frontends use the local endpoints with `internalTrafficPolicy: Local`, external
//!   frontends with `externalTrafficPolicy: Local`, the cluster endpoints otherwise.
//! * The choice of endpoints, the traffic policies and REJECT versus DROP are decided per
//!   family (a dual-stack service may have ready IPv4 endpoints and no IPv6 ones). A
//!   LoadBalancer frontend keeps the `loadBalancerSourceRanges` of its own family only (none
//!   of its family: open, as with kube-proxy). IPv4-mapped IPv6 addresses count as IPv4.
//! * A frontend left without backends rejects (TCP RST, ICMP port unreachable) when the service
//!   has no usable endpoint at all, and drops when a Local policy filtered the endpoints away.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointSlice},
};

use crate::{
    health::ServiceHealth,
    manifests::{ObjectRef, Objects},
    node::NodeContext,
    state::{BackendAddr, DesiredState, Frontend, FrontendKind, Protocol, ServiceEntry, WhenEmpty},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// The older name of the topology-mode annotation, still honoured by kube-proxy.
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// An object, or part of one, that could not be translated. The rest still is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateError {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    pub message: String,
}

impl fmt::Display for TranslateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Translates every service in `objects` for the node described by `node`. Problems are
/// returned next to the state; an object with a problem contributes what it correctly can.
pub fn translate(objects: &Objects, node: &NodeContext) -> (DesiredState, Vec<TranslateError>) {
    Translator::default().translate(objects, node)
}

/// [`translate`] for a long-running agent: each service's translation is remembered and
/// reused while its Service, its EndpointSlices and the node are the same objects as last
/// time ([`Arc::ptr_eq`]: the sources hand out a new object for every change), so a change
/// to one EndpointSlice translates one service, not all of them.
#[derive(Default)]
pub struct Translator {
    /// The node the remembered translations were made for; another node forgets them all.
    node: Option<NodeContext>,
    services: HashMap<ObjectRef, Remembered>,
    /// Incremented each pass; entries not seen in a pass are services that are gone.
    pass: u64,
}

struct Remembered {
    service: Arc<Service>,
    /// The service's slices as they were, in name order.
    slices: Vec<Arc<EndpointSlice>>,
    output: ServiceOutput,
    pass: u64,
}

/// An EndpointSlice with its name, as the translation takes it.
type SliceOf<'a> = (&'a ObjectRef, &'a Arc<EndpointSlice>);

/// What one service translates to, before it meets the other services.
#[derive(Default)]
struct ServiceOutput {
    /// Its frontends in the order it claimed them (a frontend another service already claimed
    /// is dropped when the outputs are merged).
    frontends: Vec<(Frontend, Arc<ServiceEntry>)>,
    health_checks: BTreeMap<u16, ServiceHealth>,
    errors: Vec<TranslateError>,
}

impl Translator {
    /// Translates every service in `objects`, reusing what is unchanged since the last call.
    pub fn translate(
        &mut self,
        objects: &Objects,
        node: &NodeContext,
    ) -> (DesiredState, Vec<TranslateError>) {
        if self.node.as_ref() != Some(node) {
            self.services.clear();
            self.node = Some(node.clone());
        }
        self.pass += 1;
        let pass = self.pass;

        // Index slices by the service they belong to, once, without copying names.
        // (A hash map: with thousands of slices, this index is rebuilt on every pass.)
        let mut slices_by_service: HashMap<(&str, &str), Vec<SliceOf>> =
            HashMap::with_capacity(objects.endpoint_slices.len());
        for (key, slice) in &objects.endpoint_slices {
            let labels = slice.metadata.labels.as_ref();
            let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
                continue;
            };
            slices_by_service
                .entry((key.namespace.as_str(), service.as_str()))
                .or_default()
                .push((key, slice));
        }

        let mut state = DesiredState::default();
        let mut errors = Vec::new();
        for (key, service) in &objects.services {
            let slices = slices_by_service
                .get(&(key.namespace.as_str(), key.name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let unchanged = |r: &Remembered| {
                Arc::ptr_eq(&r.service, service)
                    && r.slices.len() == slices.len()
                    && r.slices
                        .iter()
                        .zip(slices)
                        .all(|(a, (_, b))| Arc::ptr_eq(a, b))
            };
            let remembered = match self.services.get_mut(key) {
                Some(r) if unchanged(r) => r,
                _ => {
                    let fresh = Remembered {
                        service: Arc::clone(service),
                        slices: slices.iter().map(|(_, s)| Arc::clone(s)).collect(),
                        output: translate_service(key, service, slices, node),
                        pass,
                    };
                    match self.services.entry(key.clone()) {
                        std::collections::hash_map::Entry::Occupied(mut e) => {
                            e.insert(fresh);
                            e.into_mut()
                        }
                        std::collections::hash_map::Entry::Vacant(e) => e.insert(fresh),
                    }
                }
            };
            remembered.pass = pass;
            merge(key, &remembered.output, &mut state, &mut errors);
        }
        self.services.retain(|_, r| r.pass == pass);
        (state, errors)
    }
}

/// One service's translation, on its own.
fn translate_service(
    key: &ObjectRef,
    service: &Service,
    slices: &[SliceOf],
    node: &NodeContext,
) -> ServiceOutput {
    let mut own = DesiredState::default();
    let mut errors = Vec::new();
    let slices: Vec<(&ObjectRef, &EndpointSlice)> =
        slices.iter().map(|(k, s)| (*k, s.as_ref())).collect();
    ServiceTranslation {
        key,
        service,
        node,
        state: &mut own,
        errors: &mut errors,
    }
    .run(&slices);
    ServiceOutput {
        frontends: own.services.into_iter().collect(),
        health_checks: own.health_checks,
        errors,
    }
}

/// Adds one service's output to the node's state. Services are merged in name order, so of
/// two services claiming one frontend (say the same external IP and port) the first keeps it.
fn merge(
    key: &ObjectRef,
    output: &ServiceOutput,
    state: &mut DesiredState,
    errors: &mut Vec<TranslateError>,
) {
    errors.extend(output.errors.iter().cloned());
    for (frontend, entry) in &output.frontends {
        match state.services.entry(*frontend) {
            std::collections::btree_map::Entry::Occupied(previous) => {
                errors.push(TranslateError {
                    object: format!("Service {key}"),
                    message: format!(
                        "frontend {frontend} is already used by {}; ignoring it for {}",
                        previous.get().name,
                        entry.name
                    ),
                });
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(Arc::clone(entry));
            }
        }
    }
    for (port, health) in &output.health_checks {
        let merged = state
            .health_checks
            .entry(*port)
            .or_insert_with(|| health.clone());
        // One health check per service: its ports' local endpoints are the same pods.
        merged.local_endpoints = merged.local_endpoints.max(health.local_endpoints);
    }
}

struct ServiceTranslation<'a> {
    key: &'a ObjectRef,
    service: &'a Service,
    node: &'a NodeContext,
    state: &'a mut DesiredState,
    errors: &'a mut Vec<TranslateError>,
}

impl ServiceTranslation<'_> {
    fn error(&mut self, message: String) {
        self.errors.push(TranslateError {
            object: format!("Service {}", self.key),
            message,
        });
    }

    fn run(&mut self, slices: &[(&ObjectRef, &EndpointSlice)]) {
        let labels = self.service.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
            tracing::debug!(service = %self.key, "ignored: {SERVICE_PROXY_NAME_LABEL} names another proxy");
            return;
        }
        let Some(spec) = &self.service.spec else {
            return;
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if service_type == "ExternalName" {
            return;
        }
        let cluster_ips = self.cluster_ips(spec);
        if cluster_ips.is_empty() {
            return; // headless: DNS only
        }
        let has_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
        let is_load_balancer = service_type == "LoadBalancer";
        let external_ips = self.addresses("externalIPs", spec.external_ips.iter().flatten());
        let lb_ips = if is_load_balancer {
            self.load_balancer_ips()
        } else {
            Vec::new()
        };
        let source_ranges = if is_load_balancer {
            self.source_ranges(spec)
        } else {
            Vec::new()
        };
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let affinity_timeout = affinity_timeout(spec);
        let topology = self.topology_requested(spec);

        for port in spec.ports.iter().flatten() {
            let port_name = port.name.clone().unwrap_or_default();
            let Some(proto) = parse_protocol(port.protocol.as_deref()) else {
                let protocol = port.protocol.as_deref().unwrap_or_default();
                self.error(format!(
                    "port {port_name:?}: unsupported protocol {protocol:?}"
                ));
                continue;
            };
            let Some(number) = valid_port(port.port) else {
                self.error(format!("port {port_name:?}: invalid port {}", port.port));
                continue;
            };
            let name = if port_name.is_empty() {
                self.key.to_string()
            } else {
                format!("{}:{port_name}", self.key)
            };
            // One set of endpoints per family, as kube-proxy's per-family proxiers see them.
            let sets = [Family::V4, Family::V6].map(|family| {
                let endpoints = endpoints_for_port(port, proto, family, slices, self.errors);
                EndpointSets::categorize(&endpoints, self.node, topology)
            });
            let entry = |kind: FrontendKind, ip: &IpAddr| {
                let family = Family::of(ip);
                let sets = &sets[family as usize];
                let local = if kind.is_external() {
                    external_local
                } else {
                    internal_local
                };
                let (backends, when_empty) = sets.for_policy(local);
                // Pods reach an external frontend with a Local policy through the cluster-wide
                // endpoints.
                let cluster_backends =
                    (kind.is_external() && external_local).then(|| sets.for_policy(false).0);
                let mut local_backends = sets.local_of(&backends);
                if let Some(cluster) = &cluster_backends {
                    local_backends.extend(sets.local_of(cluster));
                }
                let source_ranges = if kind == FrontendKind::LoadBalancer {
                    source_ranges
                        .iter()
                        .filter(|net| Family::of(&net.addr()) == family)
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                };
                ServiceEntry {
                    name: name.clone(),
                    kind,
                    local_backends,
                    backends,
                    cluster_backends,
                    when_empty,
                    external_local: kind != FrontendKind::ClusterIp && external_local,
                    affinity_timeout,
                    source_ranges,
                }
            };

            for ip in &cluster_ips {
                let frontend = Frontend {
                    ip: *ip,
                    port: number,
                    proto,
                };
                self.insert(frontend, entry(FrontendKind::ClusterIp, ip));
            }
            if has_node_ports {
                match port.node_port.map(valid_port) {
                    Some(Some(node_port)) => {
                        for ip in self.node_port_addresses() {
                            let frontend = Frontend {
                                ip,
                                port: node_port,
                                proto,
                            };
                            self.insert(frontend, entry(FrontendKind::NodePort, &ip));
                        }
                    }
                    Some(None) => self.error(format!(
                        "port {port_name:?}: invalid nodePort {}",
                        port.node_port.unwrap_or_default()
                    )),
                    // Not allocated (yet), or allocateLoadBalancerNodePorts: false.
                    None => {}
                }
            }
            for ip in &external_ips {
                let frontend = Frontend {
                    ip: *ip,
                    port: number,
                    proto,
                };
                self.insert(frontend, entry(FrontendKind::ExternalIp, ip));
            }
            for ip in &lb_ips {
                let frontend = Frontend {
                    ip: *ip,
                    port: number,
                    proto,
                };
                self.insert(frontend, entry(FrontendKind::LoadBalancer, ip));
            }
            if is_load_balancer && external_local {
                // One health check server per service (kube-proxy shares it between the
                // families): it counts the family with the most local endpoints.
                let local = sets.iter().map(|s| s.local.len()).max().unwrap_or(0);
                self.health_check(spec, local);
            }
        }
    }

    fn insert(&mut self, frontend: Frontend, entry: ServiceEntry) {
        if let Some(previous) = self.state.services.get(&frontend) {
            let message = format!(
                "frontend {frontend} is already used by {}; ignoring it for {}",
                previous.name, entry.name
            );
            self.error(message);
            return;
        }
        self.state.services.insert(frontend, Arc::new(entry));
    }

    /// The cluster IPs, of both families. clusterIPs (dual stack) supersedes clusterIP; both
    /// may be set and then agree.
    fn cluster_ips(&mut self, spec: &ServiceSpec) -> Vec<IpAddr> {
        let mut cluster_ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
        if cluster_ips.is_empty() {
            cluster_ips.extend(spec.cluster_ip.as_ref());
        }
        let cluster_ips = cluster_ips
            .into_iter()
            .filter(|ip| !ip.is_empty() && *ip != "None");
        self.addresses("cluster IP", cluster_ips)
    }

    /// Parses addresses of one field, either family; invalid ones are reported.
    fn addresses<'s>(
        &mut self,
        field: &str,
        addresses: impl Iterator<Item = &'s String>,
    ) -> Vec<IpAddr> {
        let mut parsed = Vec::new();
        for address in addresses {
            match address.parse::<IpAddr>() {
                Ok(ip) => parsed.push(canonical(ip)),
                Err(_) => self.error(format!("invalid {field} {address:?}")),
            }
        }
        parsed
    }

    /// LoadBalancer ingress IPs that traffic reaches the node with. `ipMode: Proxy` means the
    /// load balancer rewrites the destination itself, so kube-proxy programs nothing for it.
    fn load_balancer_ips(&mut self) -> Vec<IpAddr> {
        let ingress = self
            .service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        let ips: Vec<&String> = ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_ref())
            .collect();
        self.addresses("load balancer ingress IP", ips.into_iter())
    }

    /// Both families' ranges; each LoadBalancer frontend keeps those of its own family.
    fn source_ranges(&mut self, spec: &ServiceSpec) -> Vec<IpNet> {
        let mut ranges = Vec::new();
        for range in spec.load_balancer_source_ranges.iter().flatten() {
            // kube-proxy accepts surrounding whitespace here.
            match range.trim().parse::<IpNet>() {
                Ok(net) => ranges.push(net.trunc()),
                Err(_) => self.error(format!("invalid loadBalancerSourceRange {range:?}")),
            }
        }
        ranges
    }

    /// This node's addresses that serve NodePorts: all node IPs, or those inside
    /// `--nodeport-addresses` when given.
    /// IPv4 and IPv6 ones alike.
    fn node_port_addresses(&self) -> Vec<IpAddr> {
        self.node
            .node_ips
            .iter()
            .filter(|ip| {
                self.node.nodeport_addresses.is_empty()
                    || self.node.nodeport_addresses.iter().any(|n| n.contains(*ip))
            })
            .map(|ip| canonical(*ip))
            .collect()
    }

    fn health_check(&mut self, spec: &ServiceSpec, local_endpoints: usize) {
        let Some(port) = spec.health_check_node_port else {
            return;
        };
        let Some(port) = valid_port(port) else {
            self.error(format!("invalid healthCheckNodePort {port}"));
            return;
        };
        let health = self
            .state
            .health_checks
            .entry(port)
            .or_insert_with(|| ServiceHealth {
                namespace: self.key.namespace.clone(),
                name: self.key.name.clone(),
                local_endpoints: 0,
            });
        // One health check per service: its ports' local endpoints are the same pods.
        health.local_endpoints = health.local_endpoints.max(local_endpoints);
    }

    /// Whether the service asks for topology-aware routing.
    fn topology_requested(&self, spec: &ServiceSpec) -> bool {
        let annotations = self.service.metadata.annotations.as_ref();
        let mode = annotations.and_then(|a| {
            a.get(TOPOLOGY_MODE_ANNOTATION)
                .or_else(|| a.get(TOPOLOGY_HINTS_ANNOTATION))
        });
        matches!(mode.map(String::as_str), Some("Auto" | "auto"))
            || spec.traffic_distribution.as_deref() == Some("PreferClose")
    }
}

/// An address family. Its value indexes the per-family endpoint sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4 = 0,
    V6 = 1,
}

impl Family {
    fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The EndpointSlice `addressType` of this family.
    fn address_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is the IPv4 address; the datapath never sees
/// one on the wire.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0);
    Some(configured.unwrap_or(DEFAULT_AFFINITY_TIMEOUT))
}

/// An endpoint of one service port, with what the choice of endpoints needs to know.
#[derive(Clone, Debug)]
struct PortEndpoint {
    backend: BackendAddr,
    ready: bool,
    serving_terminating: bool,
    node_name: Option<String>,
    zone_hints: Vec<String>,
}

/// The endpoints of one service port in the slices of `family`, merged over all the service's
/// slices, without duplicates (the first slice that lists an address wins).
fn endpoints_for_port(
    port: &ServicePort,
    proto: Protocol,
    family: Family,
    slices: &[(&ObjectRef, &EndpointSlice)],
    errors: &mut Vec<TranslateError>,
) -> Vec<PortEndpoint> {
    let wanted_name = port.name.as_deref().unwrap_or_default();
    let mut endpoints: Vec<PortEndpoint> = Vec::new();
    let mut seen = BTreeSet::new();
    for (slice_key, slice) in slices {
        if slice.address_type != family.address_type() {
            continue; // the other family's slices, and FQDN ones
        }
        let object = format!("EndpointSlice {slice_key}");
        let slice_port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == wanted_name
                && parse_protocol(p.protocol.as_deref()) == Some(proto)
        });
        let Some(slice_port) = slice_port else {
            continue;
        };
        let Some(number) = slice_port.port.and_then(valid_port) else {
            errors.push(TranslateError {
                object,
                message: format!("port {wanted_name:?}: missing or invalid port number"),
            });
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let parsed = address.parse::<IpAddr>().ok().map(canonical);
            let Some(ip) = parsed.filter(|ip| Family::of(ip) == family) else {
                errors.push(TranslateError {
                    object: object.clone(),
                    message: format!("invalid endpoint address {address:?}"),
                });
                continue;
            };
            let backend = BackendAddr { ip, port: number };
            if !seen.insert(backend) {
                continue;
            }
            let (ready, serving_terminating) = conditions(endpoint);
            endpoints.push(PortEndpoint {
                backend,
                ready,
                serving_terminating,
                node_name: endpoint.node_name.clone(),
                zone_hints: endpoint
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.clone())
                    .collect(),
            });
        }
    }
    endpoints
}

/// EndpointConditions as the API defines them and kube-proxy reads them: `ready` and
/// `serving` unset mean true; `terminating` unset means not terminating. Returns (ready,
/// serving and terminating).
fn conditions(endpoint: &Endpoint) -> (bool, bool) {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    (ready, !ready && serving && terminating)
}

/// kube-proxy's CategorizeEndpoints: the endpoints cluster-wide traffic uses and the ones
/// node-local traffic uses, each sorted.
struct EndpointSets {
    cluster: Vec<BackendAddr>,
    local: Vec<BackendAddr>,
    /// Every endpoint on this node (whatever its condition), to mark backends local.
    on_this_node: BTreeSet<BackendAddr>,
    /// Some endpoint anywhere is usable: decides between dropping and rejecting.
    any_usable: bool,
}

impl EndpointSets {
    fn categorize(endpoints: &[PortEndpoint], node: &NodeContext, topology: bool) -> Self {
        let is_local = |e: &PortEndpoint| {
            node.name.is_some() && e.node_name.as_deref() == node.name.as_deref()
        };
        let use_topology = topology && can_use_topology(endpoints, node);
        let pick = |filter: &dyn Fn(&PortEndpoint) -> bool| -> Vec<BackendAddr> {
            let mut picked: Vec<BackendAddr> = endpoints
                .iter()
                .filter(|e| filter(e))
                .map(|e| e.backend)
                .collect();
            picked.sort();
            picked
        };
        let in_zone = |e: &PortEndpoint| {
            !use_topology || node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z))
        };
        let mut cluster = pick(&|e| e.ready && in_zone(e));
        if cluster.is_empty() {
            // Nothing ready anywhere (topology would have been dropped otherwise).
            cluster = pick(&|e| e.serving_terminating);
        }
        let mut local = pick(&|e| e.ready && is_local(e));
        if local.is_empty() {
            local = pick(&|e| e.serving_terminating && is_local(e));
        }
        EndpointSets {
            cluster,
            local,
            on_this_node: endpoints
                .iter()
                .filter(|e| is_local(e))
                .map(|e| e.backend)
                .collect(),
            any_usable: endpoints.iter().any(|e| e.ready || e.serving_terminating),
        }
    }

    /// The backends of a frontend under a Local (`true`) or Cluster traffic policy, and what
    /// to do when there are none: kube-proxy drops when the policy filtered every usable
    /// endpoint away, and rejects when the service has none at all.
    fn for_policy(&self, local: bool) -> (Vec<BackendAddr>, WhenEmpty) {
        let backends = if local { &self.local } else { &self.cluster };
        let when_empty = if self.any_usable {
            WhenEmpty::Drop
        } else {
            WhenEmpty::Reject
        };
        (backends.clone(), when_empty)
    }

    fn local_of(&self, backends: &[BackendAddr]) -> BTreeSet<BackendAddr> {
        backends
            .iter()
            .filter(|b| self.on_this_node.contains(b))
            .copied()
            .collect()
    }
}

/// kube-proxy's canUseTopology: the node has a zone, every ready endpoint has zone hints, and
/// at least one is hinted for this zone. Otherwise hints are ignored, so a half-hinted
/// service never loses endpoints.
fn can_use_topology(endpoints: &[PortEndpoint], node: &NodeContext) -> bool {
    let Some(zone) = &node.zone else {
        return false;
    };
    let mut hinted_here = false;
    for endpoint in endpoints.iter().filter(|e| e.ready) {
        if endpoint.zone_hints.is_empty() {
            return false;
        }
        hinted_here |= endpoint.zone_hints.contains(zone);
    }
    hinted_here
}

fn parse_protocol(protocol: Option<&str>) -> Option<Protocol> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate_all(objects: &Objects) -> (DesiredState, Vec<TranslateError>) {
        translate(objects, &NodeContext::default())
    }

    fn objects(yaml: &str) -> Objects {
        crate::manifests::parse_valid(yaml)
    }

    fn fe(ip: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend {
            ip: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    fn be(ip: &str, port: u16) -> BackendAddr {
        BackendAddr {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    const BACKEND: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: backend-service, namespace: ecommerce}
spec:
  clusterIP: 10.96.0.1
  ports: [{port: 8080, targetPort: 8080}]
  selector: {app: backend}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: backend-service-1
  namespace: ecommerce
  labels: {kubernetes.io/service-name: backend-service}
addressType: IPv4
endpoints:
- addresses: [10.244.1.10]
  conditions: {ready: true}
- addresses: [10.244.2.15]
ports: [{port: 8080, protocol: TCP}]
"#;

    #[test]
    fn cluster_ip_service_with_its_slice() {
        let (state, errors) = translate_all(&objects(BACKEND));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.services.len(), 1);
        let entry = &state.services[&fe("10.96.0.1", 8080, Protocol::Tcp)];
        assert_eq!(entry.name, "ecommerce/backend-service");
        assert_eq!(
            entry.backends,
            vec![be("10.244.1.10", 8080), be("10.244.2.15", 8080)]
        );
    }

    #[test]
    fn headless_external_name_and_other_proxy_are_ignored() {
        let (state, errors) = translate_all(&objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: postgres-service}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: db.example.com, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata:
  name: other
  labels: {service.kubernetes.io/service-proxy-name: some-other-proxy}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
"#,
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(state.services.is_empty(), "{:?}", state.services);
    }

    #[test]
    fn multi_port_named_target_ports_and_merged_slices() {
        let (state, errors) = translate_all(&objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: http-alt}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.2]}, {addresses: [10.244.0.3]}]
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.3]}, {addresses: [10.244.0.4]}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints: [{addresses: ["fd00::1"]}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#,
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            state.services[&fe("10.96.0.20", 80, Protocol::Tcp)].backends,
            vec![
                be("10.244.0.2", 8080),
                be("10.244.0.3", 8080),
                be("10.244.0.4", 8080)
            ]
        );
        assert_eq!(
            state.services[&fe("10.96.0.20", 53, Protocol::Udp)].backends,
            vec![be("10.244.0.2", 5353), be("10.244.0.3", 5353)]
        );
        assert_eq!(
            state.services[&fe("10.96.0.20", 80, Protocol::Tcp)].name,
            "default/web:http"
        );
    }

    #[test]
    fn not_ready_endpoints_and_terminating_fallback() {
        let yaml = |second_ready: bool| {
            format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: s}}
spec: {{clusterIP: 10.96.0.30, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s-1, labels: {{kubernetes.io/service-name: s}}}}
addressType: IPv4
endpoints:
- {{addresses: [10.244.0.5], conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.244.0.6], conditions: {{ready: {second_ready}}}}}
- {{addresses: [10.244.0.7], conditions: {{ready: false, serving: false, terminating: true}}}}
- {{addresses: [10.244.0.8], conditions: {{ready: false, terminating: true}}}}
- {{addresses: [10.244.0.9], conditions: {{ready: false}}}}
ports: [{{port: 80}}]
"#
            )
        };
        let (state, _) = translate_all(&objects(&yaml(true)));
        assert_eq!(
            state.services[&fe("10.96.0.30", 80, Protocol::Tcp)].backends,
            vec![be("10.244.0.6", 80)]
        );
        // No ready endpoint: serving + terminating ones keep the service alive. `serving`
        // unset means serving, as the API says and kube-proxy reads it (found by the
        // `translate` fuzz target: Sluice read it as `ready`, and rejected).
        let (state, _) = translate_all(&objects(&yaml(false)));
        assert_eq!(
            state.services[&fe("10.96.0.30", 80, Protocol::Tcp)].backends,
            vec![be("10.244.0.5", 80), be("10.244.0.8", 80)]
        );
    }

    #[test]
    fn service_without_slices_is_programmed_without_backends() {
        let (state, errors) = translate_all(&objects(
            "apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}\n",
        ));
        assert!(errors.is_empty());
        assert!(state.services[&fe("10.96.0.40", 80, Protocol::Tcp)]
            .backends
            .is_empty());
    }

    #[test]
    fn bad_values_are_reported_by_object_and_the_rest_is_kept() {
        let (state, errors) = translate_all(&objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad-ip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-port}
spec: {clusterIP: 10.96.0.41, ports: [{name: a, port: 70000}, {name: b, port: 81, protocol: ICMP}, {name: c, port: 82}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad-port-x, labels: {kubernetes.io/service-name: bad-port}}
addressType: IPv4
endpoints: [{addresses: [not-an-ip]}, {addresses: [10.244.0.9]}]
ports: [{name: c, port: 8082}]
"#,
        ));
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            messages.contains(
                &"Service default/bad-ip: invalid cluster IP \"10.96.0.300\"".to_string()
            ),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("Service default/bad-port: port \"a\": invalid port 70000")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("unsupported protocol \"ICMP\"")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(
                |m| m.starts_with("EndpointSlice default/bad-port-x: invalid endpoint address")
            ),
            "{messages:?}"
        );
        assert_eq!(state.services.len(), 1);
        assert_eq!(
            state.services[&fe("10.96.0.41", 82, Protocol::Tcp)].backends,
            vec![be("10.244.0.9", 8082)]
        );
    }

    #[test]
    fn the_seed_platform() {
        let text = [
            include_str!("../../examples/ecommerce/services.yaml"),
            include_str!("../../examples/ecommerce/endpointslices.yaml"),
        ]
        .join("\n---\n");
        let (state, errors) = translate_all(&objects(&text));
        assert!(errors.is_empty(), "{errors:?}");
        let summary: Vec<(String, &str, usize)> = state
            .services
            .iter()
            .map(|(f, e)| (f.to_string(), e.name.as_str(), e.backends.len()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "10.96.0.1:8080/TCP".to_string(),
                    "ecommerce/backend-service",
                    2
                ),
                (
                    "10.96.0.2:3000/TCP".to_string(),
                    "ecommerce/frontend-service",
                    2
                ),
                (
                    "10.96.0.6:6379/TCP".to_string(),
                    "ecommerce/redis-service",
                    1
                ),
                // The guide's NodePort and LoadBalancer examples; without a node name there
                // are no node IPs, so no NodePort frontends.
                (
                    "10.96.0.80:8080/TCP".to_string(),
                    "ecommerce/backend-nodeport",
                    2
                ),
                ("10.96.0.81:80/TCP".to_string(), "ecommerce/frontend-lb", 2),
                ("192.0.2.80:80/TCP".to_string(), "ecommerce/frontend-lb", 2),
            ]
        );
    }

    /// A node context for node `node-1` in zone-a with one node IP.
    fn node_1() -> NodeContext {
        NodeContext {
            name: Some("node-1".into()),
            node_ips: vec!["172.18.0.11".parse().unwrap()],
            zone: Some("zone-a".into()),
            ..Default::default()
        }
    }

    /// A service of `type_` with extra spec YAML, and a slice with endpoints on node-1 and
    /// node-2.
    fn two_node_service(type_: &str, extra_spec: &str) -> Objects {
        objects(&format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: {type_}
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, nodePort: 30080, targetPort: 8080}}]
  {extra_spec}
status:
  loadBalancer:
    ingress: [{{ip: 192.0.2.10}}, {{ip: 192.0.2.11, ipMode: Proxy}}, {{hostname: lb.example.com}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
- {{addresses: [10.244.1.5], nodeName: node-1}}
- {{addresses: [10.244.2.5], nodeName: node-2}}
ports: [{{name: http, port: 8080}}]
"#
        ))
    }

    #[test]
    fn node_port_load_balancer_and_external_ips() {
        let (state, errors) = translate(
            &two_node_service("LoadBalancer", "externalIPs: [198.51.100.7]"),
            &node_1(),
        );
        assert!(errors.is_empty(), "{errors:?}");
        let kinds: Vec<(String, FrontendKind)> = state
            .services
            .iter()
            .map(|(f, e)| (f.to_string(), e.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("10.96.0.10:80/TCP".into(), FrontendKind::ClusterIp),
                ("172.18.0.11:30080/TCP".into(), FrontendKind::NodePort),
                ("192.0.2.10:80/TCP".into(), FrontendKind::LoadBalancer),
                ("198.51.100.7:80/TCP".into(), FrontendKind::ExternalIp),
            ]
        );
        for entry in state.services.values() {
            assert_eq!(
                entry.backends,
                vec![be("10.244.1.5", 8080), be("10.244.2.5", 8080)]
            );
            // Only the endpoint with nodeName node-1 is local.
            assert_eq!(
                entry.local_backends.iter().copied().collect::<Vec<_>>(),
                vec![be("10.244.1.5", 8080)]
            );
            assert!(!entry.external_local);
        }
        // Without a node name there are no node IPs, so no NodePort frontends.
        let (state, _) = translate_all(&two_node_service("NodePort", ""));
        assert_eq!(state.services.len(), 1);
    }

    #[test]
    fn nodeport_addresses_filter_node_ips() {
        let mut node = node_1();
        node.node_ips.push("10.0.0.11".parse().unwrap());
        node.nodeport_addresses = vec!["10.0.0.0/8".parse().unwrap()];
        let (state, _) = translate(&two_node_service("NodePort", ""), &node);
        let node_ports: Vec<String> = state
            .services
            .iter()
            .filter(|(_, e)| e.kind == FrontendKind::NodePort)
            .map(|(f, _)| f.to_string())
            .collect();
        assert_eq!(node_ports, vec!["10.0.0.11:30080/TCP"]);
    }

    #[test]
    fn external_traffic_policy_local() {
        let objects = two_node_service(
            "LoadBalancer",
            "externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
        );
        let (state, errors) = translate(&objects, &node_1());
        assert!(errors.is_empty(), "{errors:?}");
        let node_port = &state.services[&fe("172.18.0.11", 30080, Protocol::Tcp)];
        assert_eq!(node_port.backends, vec![be("10.244.1.5", 8080)]);
        assert!(node_port.external_local);
        // Pods use the cluster-wide endpoints.
        assert_eq!(
            node_port.cluster_backends,
            Some(vec![be("10.244.1.5", 8080), be("10.244.2.5", 8080)])
        );
        // The ClusterIP is not affected by the external policy.
        let cluster_ip = &state.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(cluster_ip.backends.len(), 2);
        assert!(!cluster_ip.external_local);
        assert_eq!(cluster_ip.cluster_backends, None);
        assert_eq!(
            state.health_checks[&32000],
            ServiceHealth {
                namespace: "shop".into(),
                name: "web".into(),
                local_endpoints: 1
            }
        );

        // On a node without a local endpoint: no backends, drop (not reject), health 0.
        let mut node_3 = node_1();
        node_3.name = Some("node-3".into());
        let (state, _) = translate(&objects, &node_3);
        let node_port = &state.services[&fe("172.18.0.11", 30080, Protocol::Tcp)];
        assert!(node_port.backends.is_empty());
        assert_eq!(node_port.when_empty, WhenEmpty::Drop);
        assert_eq!(node_port.cluster_backends.as_ref().map(Vec::len), Some(2));
        assert!(node_port.local_backends.is_empty());
        assert_eq!(state.health_checks[&32000].local_endpoints, 0);
    }

    #[test]
    fn internal_traffic_policy_local() {
        let objects = two_node_service("ClusterIP", "internalTrafficPolicy: Local");
        let (state, _) = translate(&objects, &node_1());
        let entry = &state.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(entry.backends, vec![be("10.244.1.5", 8080)]);
        let mut node_3 = node_1();
        node_3.name = Some("node-3".into());
        let (state, _) = translate(&objects, &node_3);
        let entry = &state.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert!(entry.backends.is_empty());
        assert_eq!(entry.when_empty, WhenEmpty::Drop);
    }

    #[test]
    fn no_endpoints_at_all_rejects() {
        let (state, _) = translate(
            &objects("apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}\n"),
            &node_1(),
        );
        assert_eq!(
            state.services[&fe("10.96.0.40", 80, Protocol::Tcp)].when_empty,
            WhenEmpty::Reject
        );
    }

    #[test]
    fn session_affinity_timeout() {
        let (state, _) = translate(
            &two_node_service("ClusterIP", "sessionAffinity: ClientIP"),
            &node_1(),
        );
        assert_eq!(
            state.services[&fe("10.96.0.10", 80, Protocol::Tcp)].affinity_timeout,
            Some(DEFAULT_AFFINITY_TIMEOUT)
        );
        let (state, _) = translate(
            &two_node_service(
                "ClusterIP",
                "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
            ),
            &node_1(),
        );
        assert_eq!(
            state.services[&fe("10.96.0.10", 80, Protocol::Tcp)].affinity_timeout,
            Some(60)
        );
        let (state, _) = translate(&two_node_service("ClusterIP", ""), &node_1());
        assert_eq!(
            state.services[&fe("10.96.0.10", 80, Protocol::Tcp)].affinity_timeout,
            None
        );
    }

    #[test]
    fn load_balancer_source_ranges() {
        let (state, errors) = translate(
            &two_node_service(
                "LoadBalancer",
                "loadBalancerSourceRanges: [\" 203.0.113.0/24 \", 198.51.100.9/32, nonsense]",
            ),
            &node_1(),
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("nonsense"));
        let lb = &state.services[&fe("192.0.2.10", 80, Protocol::Tcp)];
        let ranges: Vec<String> = lb.source_ranges.iter().map(ToString::to_string).collect();
        assert_eq!(ranges, vec!["203.0.113.0/24", "198.51.100.9/32"]);
        // Source ranges restrict the load balancer address only.
        assert!(state.services[&fe("172.18.0.11", 30080, Protocol::Tcp)]
            .source_ranges
            .is_empty());
    }

    /// A dual-stack NodePort/LoadBalancer service with an IPv4 and an IPv6 slice.
    const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  externalIPs: [198.51.100.7, "2001:db8:7::7"]
  loadBalancerSourceRanges: [203.0.113.0/24, "2001:db8:1::/48"]
  ports: [{name: http, port: 80, nodePort: 30080, targetPort: 8080}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.10}, {ip: "2001:db8::10"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.5], nodeName: node-1}
- {addresses: [10.244.2.5], nodeName: node-2}
ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints:
- {addresses: ["fd00:10:244:1::5"], nodeName: node-1}
- {addresses: ["fd00:10:244:2::5"], nodeName: node-2}
- {addresses: ["fd00:10:244:2::6"], nodeName: node-2, conditions: {ready: false}}
ports: [{name: http, port: 8080}]
"#;

    fn dual_stack_node() -> NodeContext {
        let mut node = node_1();
        node.node_ips
            .push("fc00:f853:ccd:e793::11".parse().unwrap());
        node
    }

    #[test]
    fn dual_stack_service_gets_frontends_of_both_families_with_their_own_backends() {
        let (state, errors) = translate(&objects(DUAL_STACK), &dual_stack_node());
        assert!(errors.is_empty(), "{errors:?}");
        let kinds: Vec<(String, FrontendKind)> = state
            .services
            .iter()
            .map(|(f, e)| (f.to_string(), e.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("10.96.0.10:80/TCP".into(), FrontendKind::ClusterIp),
                ("172.18.0.11:30080/TCP".into(), FrontendKind::NodePort),
                ("192.0.2.10:80/TCP".into(), FrontendKind::LoadBalancer),
                ("198.51.100.7:80/TCP".into(), FrontendKind::ExternalIp),
                ("[2001:db8::10]:80/TCP".into(), FrontendKind::LoadBalancer),
                ("[2001:db8:7::7]:80/TCP".into(), FrontendKind::ExternalIp),
                (
                    "[fc00:f853:ccd:e793::11]:30080/TCP".into(),
                    FrontendKind::NodePort
                ),
                ("[fd00:10:96::10]:80/TCP".into(), FrontendKind::ClusterIp),
            ]
        );
        for (frontend, entry) in &state.services {
            let (backends, local, ranges) = if frontend.ip.is_ipv4() {
                (
                    vec![be("10.244.1.5", 8080), be("10.244.2.5", 8080)],
                    be("10.244.1.5", 8080),
                    "203.0.113.0/24",
                )
            } else {
                (
                    vec![be("fd00:10:244:1::5", 8080), be("fd00:10:244:2::5", 8080)],
                    be("fd00:10:244:1::5", 8080),
                    "2001:db8:1::/48",
                )
            };
            assert_eq!(entry.backends, backends, "{frontend}");
            assert_eq!(
                entry.local_backends.iter().copied().collect::<Vec<_>>(),
                vec![local],
                "{frontend}"
            );
            // Each LoadBalancer frontend keeps the source ranges of its own family only.
            let expected: Vec<String> = if entry.kind == FrontendKind::LoadBalancer {
                vec![ranges.to_string()]
            } else {
                vec![]
            };
            let got: Vec<String> = entry
                .source_ranges
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got, expected, "{frontend}");
        }
    }

    #[test]
    fn ipv6_single_stack_service_uses_only_ipv6_slices() {
        let (state, errors) = translate_all(&objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: v6}
spec: {clusterIP: "fd00:10:96::20", clusterIPs: ["fd00:10:96::20"], ipFamilies: [IPv6], ports: [{port: 53, protocol: UDP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v6-a, labels: {kubernetes.io/service-name: v6}}
addressType: IPv6
endpoints: [{addresses: ["fd00:10:244::3"]}, {addresses: ["FD00:10:244::2"]}]
ports: [{port: 5353, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v6-stray, labels: {kubernetes.io/service-name: v6}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.9]}]
ports: [{port: 5353, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v6-fqdn, labels: {kubernetes.io/service-name: v6}}
addressType: FQDN
endpoints: [{addresses: [db.example.com]}]
ports: [{port: 5353, protocol: UDP}]
"#,
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.services.len(), 1);
        let entry = &state.services[&fe("fd00:10:96::20", 53, Protocol::Udp)];
        assert_eq!(
            entry.backends,
            vec![be("fd00:10:244::2", 5353), be("fd00:10:244::3", 5353)]
        );
    }

    #[test]
    fn rejection_and_drop_are_decided_per_family() {
        // IPv4 endpoints only: the IPv6 frontend has nothing usable in its family, so it
        // rejects, as kube-proxy's IPv6 proxier does.
        let text = DUAL_STACK
            .split(
                "
---
",
            )
            .take(2)
            .collect::<Vec<_>>()
            .join(
                "
---
",
            );
        let (state, _) = translate(&objects(&text), &dual_stack_node());
        let v6 = &state.services[&fe("fd00:10:96::10", 80, Protocol::Tcp)];
        assert!(v6.backends.is_empty());
        assert_eq!(v6.when_empty, WhenEmpty::Reject);
        assert_eq!(
            state.services[&fe("10.96.0.10", 80, Protocol::Tcp)]
                .backends
                .len(),
            2
        );
    }

    #[test]
    fn endpoint_addresses_of_the_wrong_family_are_reported() {
        let (state, errors) = translate_all(&objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
endpoints: [{addresses: ["fd00::1"]}, {addresses: [10.244.0.1]}]
ports: [{port: 80}]
"#,
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("fd00::1"), "{errors:?}");
        assert_eq!(
            state.services[&fe("10.96.0.30", 80, Protocol::Tcp)].backends,
            vec![be("10.244.0.1", 80)]
        );
    }

    #[test]
    fn topology_hints_narrow_to_this_zone_only_when_complete() {
        let service = |distribution: &str, second_hint: &str| {
            objects(&format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{clusterIP: 10.96.0.11, ports: [{{port: 80}}], {distribution}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
- {{addresses: [10.244.1.5], zone: zone-a, hints: {{forZones: [{{name: zone-a}}]}}}}
- {{addresses: [10.244.2.5], zone: zone-b{second_hint}}}
ports: [{{port: 80}}]
"#
            ))
        };
        let backends = |objects: &Objects| {
            let (state, _) = translate(objects, &node_1());
            state.services[&fe("10.96.0.11", 80, Protocol::Tcp)]
                .backends
                .clone()
        };
        let hinted = ", hints: {forZones: [{name: zone-b}]}";
        assert_eq!(
            backends(&service("trafficDistribution: PreferClose", hinted)),
            vec![be("10.244.1.5", 80)]
        );
        // An endpoint without hints: kube-proxy ignores hints altogether.
        assert_eq!(
            backends(&service("trafficDistribution: PreferClose", "")).len(),
            2
        );
        // Hints without PreferClose (or the topology-mode annotation) are not used.
        assert_eq!(backends(&service("type: ClusterIP", hinted)).len(), 2);
    }

    fn service_with_slice(name: &str, ip: &str, external_ip: &str, backend: &str) -> String {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  clusterIP: {ip}
  externalIPs: [{external_ip}]
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: shop
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints: [{{addresses: ["{backend}"]}}]
ports: [{{port: 8080}}]
"#
        )
    }

    /// A long-running agent's translator gives what a fresh translation gives, hands out the
    /// same entries for services whose objects did not change, and redoes the others.
    #[test]
    fn the_translator_redoes_only_changed_services() {
        let a = fe("10.96.0.1", 80, Protocol::Tcp);
        let b = fe("10.96.0.2", 80, Protocol::Tcp);
        let shared = fe("198.51.100.1", 80, Protocol::Tcp);
        let mut objects = objects(&format!(
            "{}---{}",
            service_with_slice("a", "10.96.0.1", "198.51.100.1", "10.244.1.1"),
            service_with_slice("b", "10.96.0.2", "198.51.100.1", "10.244.1.2")
        ));
        let node = NodeContext::default();
        let mut translator = Translator::default();
        let (first, errors) = translator.translate(&objects, &node);
        assert_eq!((first.clone(), errors.clone()), translate(&objects, &node));
        // Both claim the external IP: the first by name keeps it, the other is told.
        assert_eq!(first.services[&shared].name, "shop/a");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].object, "Service shop/b");

        // b's EndpointSlice changes (a new object, as both sources hand out).
        let b_slice = ObjectRef {
            namespace: "shop".into(),
            name: "b-1".into(),
        };
        let mut slice = (*objects.endpoint_slices[&b_slice]).clone();
        slice.endpoints.as_mut().unwrap()[0].addresses = vec!["10.244.1.9".into()];
        objects.endpoint_slices.insert(b_slice, Arc::new(slice));
        let (second, errors) = translator.translate(&objects, &node);
        assert_eq!((second.clone(), errors), translate(&objects, &node));
        assert!(Arc::ptr_eq(&first.services[&a], &second.services[&a]));
        assert!(!Arc::ptr_eq(&first.services[&b], &second.services[&b]));
        assert_eq!(second.services[&b].backends, vec![be("10.244.1.9", 8080)]);

        // a goes away: b gets the external IP, without b being translated again.
        objects.services.remove(&ObjectRef {
            namespace: "shop".into(),
            name: "a".into(),
        });
        let (third, errors) = translator.translate(&objects, &node);
        assert_eq!((third.clone(), errors.clone()), translate(&objects, &node));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(third.services[&shared].name, "shop/b");
        assert!(Arc::ptr_eq(&second.services[&b], &third.services[&b]));
        assert!(!third.services.contains_key(&a));

        // Another node: everything is made again (endpoints' locality depends on it).
        let elsewhere = NodeContext {
            name: Some("node-2".into()),
            ..NodeContext::default()
        };
        let (fourth, _) = translator.translate(&objects, &elsewhere);
        assert_eq!(fourth, translate(&objects, &elsewhere).0);
        assert!(!Arc::ptr_eq(&third.services[&b], &fourth.services[&b]));
    }
}
