//! The properties Sluice's fuzz targets check (`fuzz_targets/` only feeds them bytes), kept in
//! a library so they are ordinary, linted code:
//!
//! * [`manifests`]: bytes -> objects never panics, names its file in every error, and gives
//!   only named objects;
//! * [`translate`]: objects -> desired state (and the state -> the `services`/`backends` maps)
//!   keeps kube-proxy's promises: every frontend comes from a service and gets a service id, no
//!   backend comes from outside the service's EndpointSlices, and a service with usable
//!   endpoints never has a frontend without backends that the traffic policies do not explain;
//! * [`policy`]: NetworkPolicy's compiled longest-prefix form (and the maps' form of it) answers
//!   every probe exactly as the rule scan does;
//! * [`trace_spec`]: `sluice trace`'s packet spec parses back from what it displays, and the
//!   packet built from it decodes to the same flow.

pub mod policy;
pub mod translate;

use std::path::Path;

use sluice::manifests::{parse_file, ManifestError, Objects};

/// The file name every fuzz input is parsed as.
pub const FILE: &str = "fuzz.yaml";

/// Parses a fuzz input as a manifest file.
pub fn objects(data: &[u8]) -> (Objects, Vec<ManifestError>) {
    parse_file(Path::new(FILE), data)
}

/// At most this many Nodes are each taken as "this node" (plus no node at all).
pub const MAX_NODES: usize = 3;

/// The node contexts an input is checked under: no node (every pod local, no node IPs), then
/// each Node object of the input (its addresses, its zone), as `--node-name` would resolve it.
pub fn node_contexts(objects: &Objects) -> Vec<sluice::node::NodeContext> {
    let names =
        std::iter::once(None).chain(objects.nodes.keys().take(MAX_NODES).cloned().map(Some));
    names
        .map(|node_name| {
            let options = sluice::node::NodeOptions {
                node_name,
                ..Default::default()
            };
            sluice::node::resolve(&options, objects).expect("the node is one of the objects")
        })
        .collect()
}

pub mod manifests {
    //! `manifests::parse_file`: never panics (the caller's harness), every error names the
    //! file, every object kept has a name and is keyed by it, and what the agent drops on the
    //! way in (managedFields, unread annotations) is gone.

    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use sluice::manifests::ObjectRef;

    use super::*;

    pub fn check(data: &[u8]) {
        let (objects, errors) = objects(data);
        for error in &errors {
            assert_eq!(error.file, Path::new(FILE), "{error}");
            assert!(error.to_string().starts_with("fuzz.yaml: "), "{error}");
            assert!(!error.object.is_empty(), "{error}");
        }
        fn namespaced<T>(
            kind: &str,
            map: &BTreeMap<ObjectRef, std::sync::Arc<T>>,
            meta: impl Fn(&T) -> &ObjectMeta,
        ) {
            for (key, object) in map {
                let meta = meta(object);
                assert_eq!(
                    meta.name.as_deref(),
                    Some(key.name.as_str()),
                    "{kind} {key} is kept without its name"
                );
                assert_eq!(
                    meta.namespace.as_deref().unwrap_or("default"),
                    key.namespace,
                    "{kind} {key} is kept under another namespace"
                );
                slimmed(kind, meta);
            }
        }
        fn cluster<T>(
            kind: &str,
            map: &BTreeMap<String, std::sync::Arc<T>>,
            meta: impl Fn(&T) -> &ObjectMeta,
        ) {
            for (key, object) in map {
                let meta = meta(object);
                assert_eq!(
                    meta.name.as_deref(),
                    Some(key.as_str()),
                    "{kind} {key} is kept without its name"
                );
                slimmed(kind, meta);
            }
        }
        namespaced("Service", &objects.services, |o| &o.metadata);
        namespaced("EndpointSlice", &objects.endpoint_slices, |o| &o.metadata);
        namespaced("Pod", &objects.pods, |o| &o.metadata);
        namespaced("NetworkPolicy", &objects.network_policies, |o| &o.metadata);
        cluster("Node", &objects.nodes, |o| &o.metadata);
        cluster("Namespace", &objects.namespaces, |o| &o.metadata);

        // The same bytes give the same objects and the same problems.
        let (again, errors_again) = super::objects(data);
        assert_eq!(errors, errors_again);
        assert_eq!(describe(&objects), describe(&again));
    }

    /// What `manifests::slim` promises: no managedFields, only the annotations Sluice reads.
    fn slimmed(kind: &str, meta: &ObjectMeta) {
        assert!(meta.managed_fields.is_none(), "{kind}: managedFields kept");
        if let Some(annotations) = &meta.annotations {
            assert!(
                !annotations.is_empty(),
                "{kind}: an empty annotation map kept"
            );
            for key in annotations.keys() {
                assert!(
                    key == sluice::translate::TOPOLOGY_MODE_ANNOTATION
                        || key == sluice::translate::TOPOLOGY_HINTS_ANNOTATION,
                    "{kind}: annotation {key:?} kept"
                );
            }
        }
    }

    /// Every object, printed (`Objects` has no `PartialEq`).
    fn describe(objects: &Objects) -> String {
        format!(
            "{:?}{:?}{:?}{:?}{:?}{:?}",
            objects.services,
            objects.endpoint_slices,
            objects.nodes,
            objects.pods,
            objects.namespaces,
            objects.network_policies
        )
    }
}

pub mod trace_spec {
    //! `sluice trace`'s packet spec: never panics; a spec that parses displays (as its flow)
    //! in a form that parses back to it, and the packet built for it decodes to that flow with
    //! valid checksums.

    use sluice::{
        packet,
        state::Protocol,
        trace::spec::{self, SpecError},
    };

    pub fn check(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let parsed = match spec::parse(text) {
            Ok(parsed) => parsed,
            Err(error) => {
                // Every error has a message, and the IPv6 ones are recognised as such.
                assert!(!error.to_string().is_empty());
                if let SpecError::MixedFamilies { src, dst } = &error {
                    assert_ne!(src.is_ipv4(), dst.is_ipv4(), "{error}");
                }
                let _ = error.about_ipv6();
                return;
            }
        };
        assert_eq!(parsed.src.is_ipv4(), parsed.dst.is_ipv4(), "{text:?}");
        assert_ne!(parsed.dport, 0, "{text:?}");
        assert_ne!(parsed.sport, 0, "{text:?}");
        let flow = parsed.flow();
        assert_eq!(Protocol::from_number(flow.proto), Some(parsed.proto));
        // What `sluice trace` shows of the packet is a spec for the same packet.
        let shown = flow.to_string();
        assert_eq!(
            spec::parse(&shown),
            Ok(parsed),
            "{text:?} displays as {shown:?}"
        );
        // The packet the trace sends carries exactly this flow.
        let bytes = packet::first_ip_packet(&flow, b"fuzz");
        let decoded = packet::decode_ip(&bytes)
            .unwrap_or_else(|e| panic!("{text:?}: the packet built for it does not decode: {e}"));
        assert_eq!(decoded.flow(), Some(flow), "{text:?}");
        packet::verify_ip_checksums(&bytes)
            .unwrap_or_else(|e| panic!("{text:?}: the packet built for it: {e}"));
    }
}
