//! Kubernetes objects read from a directory of manifests (`sluice agent --manifests DIR`).
//!
//! Every `*.yaml`, `*.yml` and `*.json` file in DIR is read; YAML files may hold several
//! documents, and `kind: List` documents are unpacked. v1 Services, v1 Nodes and
//! discovery.k8s.io/v1 EndpointSlices are kept; other kinds are skipped with a debug log. A file or object that
//! does not parse is reported with the file and object name, and the rest is still used.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::Deserialize as _;

pub mod cache;
pub mod limits;

pub use cache::{Loaded, ManifestCache};

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        ObjectRef {
            namespace: meta
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_string()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Annotations Sluice reads (on Services: topology-aware routing); every other annotation is
/// dropped when an object is taken in.
const READ_ANNOTATIONS: &[&str] = &[
    crate::translate::TOPOLOGY_MODE_ANNOTATION,
    crate::translate::TOPOLOGY_HINTS_ANNOTATION,
];

/// Drops what nothing in Sluice reads from an object as it is taken in (from a file or the
/// API): managedFields and annotations other than [`READ_ANNOTATIONS`]. In real clusters they
/// are often most of an object (`kubectl apply` stores the whole object in an annotation), and
/// the agent keeps every object it watches.
pub fn slim(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|key, _| READ_ANNOTATIONS.contains(&key.as_str()));
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// The objects the translation consumes, keyed by namespace/name (Nodes by name).
///
/// Objects are shared (`Arc`), never copied: the API source hands out the reflector stores'
/// own objects and the manifests source its parsed files', so a snapshot costs one map entry
/// per object, and the translation recognises an object it has seen by pointer
/// ([`Arc::ptr_eq`]) to reuse what it made of it.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: BTreeMap<ObjectRef, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectRef, Arc<EndpointSlice>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    pub pods: BTreeMap<ObjectRef, Arc<Pod>>,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub network_policies: BTreeMap<ObjectRef, Arc<NetworkPolicy>>,
    /// The file each object comes from, by `Kind namespace/name` (`Kind name` for Nodes and
    /// Namespaces), as problems name objects: empty for the API source.
    pub origins: BTreeMap<String, PathBuf>,
}

impl Objects {
    /// `Kind namespace/name` of every object.
    pub fn names(&self) -> Vec<String> {
        fn of<K: fmt::Display, V>(kind: &str, map: &BTreeMap<K, V>) -> Vec<String> {
            map.keys().map(|k| format!("{kind} {k}")).collect()
        }
        [
            of("Service", &self.services),
            of("EndpointSlice", &self.endpoint_slices),
            of("Node", &self.nodes),
            of("Pod", &self.pods),
            of("Namespace", &self.namespaces),
            of("NetworkPolicy", &self.network_policies),
        ]
        .concat()
    }

    /// A problem about `object` (`Kind namespace/name`), with the file that defines it when
    /// it comes from one: `file: object: message`.
    pub fn describe(&self, object: &str, message: &str) -> String {
        match self.origins.get(object) {
            Some(file) => format!("{}: {object}: {message}", file.display()),
            None => format!("{object}: {message}"),
        }
    }
}

/// A problem with one file or one object in it. The rest of the directory is still used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Kind namespace/name` when the document got that far, else `document N`.
    pub object: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.object,
            self.message
        )
    }
}

/// Whether `path` names a manifest (`*.yaml`, `*.yml`, `*.json`).
pub fn is_manifest_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The manifest files of `dir`, sorted so a later file deterministically overrides an earlier
/// one that defines the same object.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_manifest_file(&path) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every manifest in `dir`. An unreadable directory is an error; everything below it
/// (an unreadable file, a bad document) is reported in the returned list.
/// The objects are decided as the agent decides them ([`ManifestCache`]).
pub fn load_dir(dir: &Path) -> anyhow::Result<(Objects, Vec<ManifestError>)> {
    let loaded = ManifestCache::default().load_dir(dir)?;
    let objects = Arc::try_unwrap(loaded.objects).unwrap_or_else(|shared| (*shared).clone());
    Ok((objects, loaded.errors))
}

/// Parses the content of one manifest file (`file` names it in errors): everything a file's
/// bytes go through on their way to objects. The bytes are checked against [`limits`] before
/// the YAML parser sees them.
pub fn parse_file(file: &Path, bytes: &[u8]) -> (Objects, Vec<ManifestError>) {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    let text = limits::check(bytes).and_then(|()| {
        std::str::from_utf8(bytes).map_err(|_| "stream did not contain valid UTF-8".to_string())
    });
    match text {
        Ok(text) => parse_into(file, text, &mut objects, &mut errors),
        Err(message) => errors.push(ManifestError {
            file: file.to_path_buf(),
            object: "file".to_string(),
            message,
        }),
    }
    (objects, errors)
}

/// Parses one file's text (YAML, possibly multi-document, or JSON) into `objects`.
pub fn parse_into(file: &Path, text: &str, objects: &mut Objects, errors: &mut Vec<ManifestError>) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let chunks = split_documents(text, threads);
    if chunks.len() < 2 {
        parse_documents(file, text, objects, errors);
        return;
    }
    // A big file (thousands of objects in one file) is parsed on every CPU: YAML scanning is
    // most of an agent's start. Each chunk holds whole documents; they are put together in
    // order afterwards, numbered as one stream.
    let parsed: Vec<(Objects, Vec<ManifestError>, usize, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                scope.spawn(move || {
                    let mut objects = Objects::default();
                    let mut errors = Vec::new();
                    let (documents, broken) =
                        parse_documents(file, chunk, &mut objects, &mut errors);
                    (objects, errors, documents, broken)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a manifest parsing thread panicked"))
            .collect()
    });
    let mut before = 0;
    for ((chunk_objects, chunk_errors, documents, broken), chunk) in parsed.into_iter().zip(&chunks)
    {
        // Lines before the chunk, for the positions YAML syntax errors give.
        let lines_before = text[..chunk.as_ptr() as usize - text.as_ptr() as usize]
            .matches('\n')
            .count();
        errors.extend(chunk_errors.into_iter().map(|mut e| {
            e.object = renumber(&e.object, "document ", before);
            e.message = renumber_all(&e.message, "line ", lines_before);
            e
        }));
        objects.add_all(chunk_objects, file);
        before += documents;
        if broken {
            // After a syntax error the rest of the stream cannot be trusted.
            return;
        }
    }
}

/// Parses a run of documents into `objects`; returns how many documents it saw and whether
/// it stopped at a syntax error.
fn parse_documents(
    file: &Path,
    text: &str,
    objects: &mut Objects,
    errors: &mut Vec<ManifestError>,
) -> (usize, bool) {
    let mut documents = 0;
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        documents = index + 1;
        let what = format!("document {}", index + 1);
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue, // empty document, e.g. after a trailing ---
            Ok(v) => v,
            Err(e) => {
                errors.push(ManifestError {
                    file: file.to_path_buf(),
                    object: what,
                    message: format!("not valid YAML: {e}"),
                });
                // After a syntax error the rest of the stream cannot be trusted.
                return (documents, true);
            }
        };
        add_value(file, &what, value, objects, errors);
    }
    (documents, false)
}

/// Below this size a file is parsed on one thread.
const PARALLEL_PARSE_BYTES: usize = 1 << 20;

/// Splits a YAML stream into up to `parts` runs of whole documents, cut before a `---` line
/// (a document start marker at column 0, which YAML forbids inside any scalar, so a cut there
/// never splits a document).
fn split_documents(text: &str, parts: usize) -> Vec<&str> {
    if parts < 2 || text.len() < PARALLEL_PARSE_BYTES {
        return vec![text];
    }
    let mut chunks = Vec::with_capacity(parts);
    let mut start = 0;
    for part in 1..parts {
        let target = text.len() * part / parts;
        if target <= start {
            continue;
        }
        let Some(cut) = next_document_start(text, target) else {
            break;
        };
        if cut > start {
            chunks.push(&text[start..cut]);
            start = cut;
        }
    }
    chunks.push(&text[start..]);
    chunks
}

/// The offset of the first `---` line starting at or after `from`.
fn next_document_start(text: &str, from: usize) -> Option<usize> {
    let mut at = from;
    // Move to the start of the next line unless `from` already is one.
    if at > 0 && text.as_bytes()[at - 1] != b'\n' {
        at += text[at..].find('\n')? + 1;
    }
    while at < text.len() {
        let line = &text[at..];
        if let Some(rest) = line.strip_prefix("---") {
            if rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r']) {
                return Some(at);
            }
        }
        at += line.find('\n')? + 1;
    }
    None
}

/// `{word}N...` (say `document 3 item 2`) as numbered in a chunk that follows `before`
/// documents (or lines) of the file; other text as it is.
fn renumber(text: &str, word: &str, before: usize) -> String {
    let Some(rest) = text.strip_prefix(word) else {
        return text.to_string();
    };
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    match rest[..digits].parse::<usize>() {
        Ok(n) => format!("{word}{}{}", n + before, &rest[digits..]),
        Err(_) => text.to_string(),
    }
}

/// [`renumber`] at every `{word}N` in `text` (`at line 12 column 1, ... at line 11`).
fn renumber_all(text: &str, word: &str, before: usize) -> String {
    let mut parts = text.split(word);
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        out.push_str(&renumber(&format!("{word}{part}"), word, before));
    }
    out
}

impl Objects {
    /// Adds a later part of `file`'s objects (a later definition wins, as within a file).
    fn add_all(&mut self, later: Objects, file: &Path) {
        fn kind<K: Ord + fmt::Display, V>(
            into: &mut BTreeMap<K, Arc<V>>,
            from: BTreeMap<K, Arc<V>>,
            file: &Path,
            what: &str,
        ) {
            for (key, object) in from {
                if into.contains_key(&key) {
                    tracing::warn!(file = %file.display(), object = %key, "{what} defined twice; the later definition wins");
                }
                into.insert(key, object);
            }
        }
        kind(&mut self.services, later.services, file, "a Service");
        kind(
            &mut self.endpoint_slices,
            later.endpoint_slices,
            file,
            "an EndpointSlice",
        );
        kind(&mut self.nodes, later.nodes, file, "a Node");
        kind(&mut self.pods, later.pods, file, "a Pod");
        kind(&mut self.namespaces, later.namespaces, file, "a Namespace");
        kind(
            &mut self.network_policies,
            later.network_policies,
            file,
            "a NetworkPolicy",
        );
    }
}

fn add_value(
    file: &Path,
    what: &str,
    value: serde_yaml::Value,
    objects: &mut Objects,
    errors: &mut Vec<ManifestError>,
) {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let api_version = field("apiVersion");
    let kind = field("kind");
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<no name>")
        .to_string();
    let described = format!("{kind} {name}");
    let error = |message: String| ManifestError {
        file: file.to_path_buf(),
        object: described.clone(),
        message,
    };

    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let Some(items) = value.get("items").and_then(|i| i.as_sequence()) else {
                errors.push(error("List without items".into()));
                return;
            };
            for (i, item) in items.iter().enumerate() {
                let what = format!("{what} item {}", i + 1);
                add_value(file, &what, item.clone(), objects, errors);
            }
        }
        ("v1", "Service") => {
            namespaced(file, &described, value, &mut objects.services, errors);
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            namespaced(
                file,
                &described,
                value,
                &mut objects.endpoint_slices,
                errors,
            );
        }
        ("v1", "Pod") => {
            namespaced(file, &described, value, &mut objects.pods, errors);
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            namespaced(
                file,
                &described,
                value,
                &mut objects.network_policies,
                errors,
            );
        }
        ("v1", "Namespace") => {
            cluster_scoped(file, &described, value, &mut objects.namespaces, errors);
        }
        ("v1", "Node") => {
            cluster_scoped(file, &described, value, &mut objects.nodes, errors);
        }
        ("", _) | (_, "") => errors.push(ManifestError {
            file: file.to_path_buf(),
            object: what.to_string(),
            message: "not a Kubernetes object (apiVersion and kind are required)".into(),
        }),
        _ => {
            tracing::debug!(file = %file.display(), %api_version, %kind, %name, "skipping object of a kind Sluice does not use");
        }
    }
}

/// Adds a namespaced object of kind `K` to `into`, or reports why it cannot be.
fn namespaced<K>(
    file: &Path,
    described: &str,
    value: serde_yaml::Value,
    into: &mut BTreeMap<ObjectRef, Arc<K>>,
    errors: &mut Vec<ManifestError>,
) where
    K: k8s_openapi::Resource
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>
        + serde::de::DeserializeOwned,
{
    let error = |message: String| ManifestError {
        file: file.to_path_buf(),
        object: described.to_string(),
        message,
    };
    match serde_yaml::from_value::<K>(value) {
        Ok(mut object) if object.metadata().name.is_some() => {
            slim(object.metadata_mut());
            let key = ObjectRef::of(object.metadata());
            if into.insert(key.clone(), Arc::new(object)).is_some() {
                tracing::warn!(file = %file.display(), object = %key, "{} defined twice; the later definition wins", K::KIND);
            }
        }
        Ok(_) => errors.push(error("metadata.name is missing".into())),
        Err(e) => errors.push(error(format!("invalid {}: {e}", K::KIND))),
    }
}

/// Adds a cluster-scoped object of kind `K` (keyed by name) to `into`, or reports why it
/// cannot be.
fn cluster_scoped<K>(
    file: &Path,
    described: &str,
    value: serde_yaml::Value,
    into: &mut BTreeMap<String, Arc<K>>,
    errors: &mut Vec<ManifestError>,
) where
    K: k8s_openapi::Resource
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>
        + serde::de::DeserializeOwned,
{
    let error = |message: String| ManifestError {
        file: file.to_path_buf(),
        object: described.to_string(),
        message,
    };
    match serde_yaml::from_value::<K>(value) {
        Ok(mut object) => match object.metadata().name.clone() {
            Some(name) => {
                slim(object.metadata_mut());
                into.insert(name, Arc::new(object));
            }
            None => errors.push(error("metadata.name is missing".into())),
        },
        Err(e) => errors.push(error(format!("invalid {}: {e}", K::KIND))),
    }
}

/// Parses YAML that must be free of problems, for other modules' tests.
#[cfg(test)]
pub(crate) fn parse_valid(text: &str) -> Objects {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    parse_into(Path::new("test.yaml"), text, &mut objects, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Objects, Vec<ManifestError>) {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        parse_into(Path::new("test.yaml"), text, &mut objects, &mut errors);
        (objects, errors)
    }

    #[test]
    fn multi_document_yaml_with_other_kinds() {
        let (objects, errors) = parse(
            r#"
apiVersion: v1
kind: Service
metadata: {name: backend-service, namespace: ecommerce}
spec:
  clusterIP: 10.96.0.1
  ports: [{port: 8080, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: backend}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: backend-service-abc
  namespace: ecommerce
  labels: {kubernetes.io/service-name: backend-service}
addressType: IPv4
endpoints: [{addresses: [10.244.1.10]}]
ports: [{port: 8080, protocol: TCP}]
---
"#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.endpoint_slices.len(), 1);
        let key = ObjectRef {
            namespace: "ecommerce".into(),
            name: "backend-service".into(),
        };
        assert!(objects.services.contains_key(&key));
    }

    #[test]
    fn json_and_lists() {
        let (objects, errors) = parse(
            r#"{"apiVersion":"v1","kind":"List","items":[
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"10.96.0.9","ports":[{"port":80}]}},
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"b"},"spec":{"clusterIP":"10.96.0.10","ports":[{"port":81}]}}]}"#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.services.len(), 2);
        // No namespace means "default", as kubectl applies it.
        assert!(objects.services.keys().all(|k| k.namespace == "default"));
    }

    #[test]
    fn a_bad_object_is_reported_by_name_and_the_rest_is_kept() {
        let (objects, errors) = parse(
            r#"
apiVersion: v1
kind: Service
metadata: {name: broken}
spec:
  ports: [{port: "not-a-number"}]
---
apiVersion: v1
kind: Service
metadata: {name: fine}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
---
just: a map
"#,
        );
        assert_eq!(objects.services.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].object, "Service broken");
        assert!(
            errors[0].message.contains("invalid Service"),
            "{}",
            errors[0]
        );
        assert_eq!(errors[1].object, "document 3");
    }

    /// A big file is parsed in parallel chunks and gives exactly what one pass gives: the
    /// same objects, the same problems numbered as one stream, a later duplicate winning, and
    /// nothing after a syntax error.
    #[test]
    fn a_big_file_parses_in_parallel_as_in_one_pass() {
        let service = |i: usize| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
                 spec:\n  clusterIP: 10.96.{}.{}\n  ports:\n  - {{name: http, port: 80}}\n",
                i / 250,
                i % 250
            )
        };
        let mut docs: Vec<String> = (0..9_000).map(service).collect();
        docs[4_000] =
            "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: x}]}\n"
                .into();
        // A redefinition in another part of the file, and a document with a block scalar.
        docs[8_500] = service(10).replace("10.96.0.10", "10.96.200.200");
        docs[6_000] = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  labels: {a: b}\n\
                       # a comment ---\n"
            .into();
        let text = format!("---\n{}", docs.join("---\n"));
        assert!(text.len() > PARALLEL_PARSE_BYTES);
        let one_pass = |text: &str| {
            let mut objects = Objects::default();
            let mut errors = Vec::new();
            parse_documents(Path::new("test.yaml"), text, &mut objects, &mut errors);
            (objects, errors)
        };
        let names = |o: &Objects| -> Vec<String> {
            o.services
                .iter()
                .map(|(k, v)| format!("{k}={:?}", v.spec.as_ref().unwrap().cluster_ip))
                .chain(o.namespaces.keys().cloned())
                .collect()
        };
        assert!(split_documents(&text, 4).len() > 1);
        let (parallel, parallel_errors) = parse(&text);
        let (serial, serial_errors) = one_pass(&text);
        assert_eq!(names(&parallel), names(&serial));
        assert_eq!(parallel_errors, serial_errors);
        assert_eq!(parallel_errors.len(), 1);
        assert_eq!(parallel_errors[0].object, "Service broken");
        assert_eq!(parallel.services.len(), 8_997);
        assert!(names(&parallel).contains(&"bench/svc-10=Some(\"10.96.200.200\")".to_string()));

        // A syntax error two thirds in: nothing after it, and it is numbered as one stream.
        docs[6_000] = "apiVersion: v1\nkind: [unclosed\n".into();
        let text = format!("---\n{}", docs.join("---\n"));
        let (parallel, parallel_errors) = parse(&text);
        let (serial, serial_errors) = one_pass(&text);
        assert_eq!(names(&parallel), names(&serial));
        assert_eq!(parallel_errors, serial_errors);
        assert_eq!(parallel_errors.last().unwrap().object, "document 6001");
        assert!(parallel.services.len() < 6_000);
    }

    /// Objects are kept without what Sluice never reads.
    #[test]
    fn unread_metadata_is_dropped_on_the_way_in() {
        let (objects, errors) = parse(
            r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"big": "object"}'
    service.kubernetes.io/topology-mode: Auto
  managedFields: [{manager: kubectl, operation: Apply}]
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: "2026-01-01T00:00:00Z"}
addressType: IPv4
endpoints: []
"#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let web = objects.services.values().next().unwrap();
        assert_eq!(
            web.metadata.annotations,
            Some(BTreeMap::from([(
                "service.kubernetes.io/topology-mode".to_string(),
                "Auto".to_string()
            )]))
        );
        assert_eq!(web.metadata.managed_fields, None);
        let slice = objects.endpoint_slices.values().next().unwrap();
        assert_eq!(slice.metadata.annotations, None);
        assert!(slice.metadata.labels.is_some());
    }

    #[test]
    fn invalid_yaml_is_reported_with_the_file() {
        let (objects, errors) =
            parse("apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n");
        assert!(objects.services.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(errors[0]
            .to_string()
            .starts_with("test.yaml: document 1: not valid YAML"));
    }
}
