//! A test Kubernetes API server speaking the real list/watch HTTP protocol (plain HTTP, JSON),
//! for running `sluice agent` against "the API" where no real API server can be installed.
//!
//! What it serves, for the six resources the agent watches (cluster-wide paths only, e.g.
//! `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`):
//!
//! * `GET <path>`: a `<Kind>List` with `metadata.resourceVersion` (the store's current
//!   version) and every object (items without apiVersion/kind, as the API writes them);
//! * `GET <path>?watch=true&resourceVersion=N`: a chunked stream of `{"type", "object"}`
//!   lines: `ADDED` / `MODIFIED` / `DELETED` for every change after N, then new ones as they
//!   happen; `BOOKMARK`s carrying the current version every [`BOOKMARK_INTERVAL`] of quiet,
//!   only if the client sent `allowWatchBookmarks=true`; the stream ends after
//!   `timeoutSeconds`. Without N (or N = 0) the stream starts with an `ADDED` per object.
//! * 410 Gone, both ways the real API sends it ([`Gone`]): an `ERROR` event with a `Status`
//!   of code 410 in an open watch, or an HTTP 410 response to a watch whose resourceVersion
//!   is older than the compacted history.
//!
//! Faults the tests drive: [`ApiServer::drop_connections`] (every connection is cut; the
//! history stays, so clients resume), [`ApiServer::stop`] / [`ApiServer::start`] (the
//! listeners close and reopen on the same ports; the store persists like etcd),
//! [`ApiServer::freeze_watches`] (open watches stop delivering, so changes are only seen
//! after a relist) and [`ApiServer::expire`] (compacts the history and answers 410).
//!
//! Network: a listener is bound on 127.0.0.1 *inside* a namespace ([`ApiServer::listen_in`],
//! a socket created on a thread that entered the namespace stays there), so an agent in a
//! node netns reaches its node's listener on loopback; nothing listens in the root namespace.
//! Every thread stops and every socket closes on drop.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

/// How long a watch stays quiet before it gets a BOOKMARK (when the client allows them).
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// How often blocked threads look at the shutdown and connection generation flags.
const POLL: Duration = Duration::from_millis(20);

/// A resource the server serves: its cluster-wide path and the kind of its objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resource {
    path: &'static str,
    api_version: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const RESOURCES: [Resource; 6] = [
    Resource {
        path: "/api/v1/services",
        api_version: "v1",
        kind: "Service",
        namespaced: true,
    },
    Resource {
        path: "/apis/discovery.k8s.io/v1/endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Resource {
        path: "/api/v1/nodes",
        api_version: "v1",
        kind: "Node",
        namespaced: false,
    },
    Resource {
        path: "/api/v1/pods",
        api_version: "v1",
        kind: "Pod",
        namespaced: true,
    },
    Resource {
        path: "/api/v1/namespaces",
        api_version: "v1",
        kind: "Namespace",
        namespaced: false,
    },
    Resource {
        path: "/apis/networking.k8s.io/v1/networkpolicies",
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        namespaced: true,
    },
];

fn resource_of_kind(api_version: &str, kind: &str) -> Option<Resource> {
    RESOURCES
        .into_iter()
        .find(|r| r.api_version == api_version && r.kind == kind)
}

/// How [`ApiServer::expire`] tells watchers their resourceVersion is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// An `ERROR` event with a 410 Status on every open watch (the watch cache's way).
    Event,
    /// Open watches are cut; the clients' re-watch from their old version gets HTTP 410.
    Http,
}

/// One request the server answered, for tests to check what a client did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// The resource's path, e.g. `/api/v1/services`.
    pub path: String,
    pub watch: bool,
    /// The `resourceVersion` parameter, if any.
    pub resource_version: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
}

#[derive(Clone, Debug)]
struct Event {
    resource_version: u64,
    resource: &'static str,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    /// The version of the last change (etcd's revision).
    resource_version: u64,
    /// Objects by (resource path, namespace, name), with apiVersion and kind.
    objects: BTreeMap<(&'static str, String, String), Value>,
    /// Every change since the history was last compacted.
    history: Vec<Event>,
    /// Watches from a version older than this get 410 Gone.
    oldest_watchable: u64,
    /// While set, open watches deliver nothing (no events, no bookmarks).
    frozen: bool,
    /// Bumped to end every open watch stream.
    watch_generation: u64,
    /// Bumped together with `watch_generation` when the streams must end with a 410 event.
    gone_generation: u64,
    /// Listeners run while set.
    running: bool,
    shutdown: bool,
    /// Open connections, to cut them.
    connections: HashMap<u64, TcpStream>,
    next_connection: u64,
    /// Resource paths whose requests are answered 403 Forbidden (as without RBAC).
    forbidden: Vec<String>,
    requests: Vec<RequestRecord>,
    bookmarks_sent: usize,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A listener bound in a namespace, reopened on the same port by [`ApiServer::start`].
struct Listener {
    netns: PathBuf,
    port: u16,
    thread: Option<JoinHandle<()>>,
}

/// The test API server. See the module docs.
pub struct ApiServer {
    inner: Arc<Inner>,
    listeners: Vec<Listener>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    /// A server with an empty store and no listener yet.
    pub fn new() -> ApiServer {
        ApiServer {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    resource_version: 1,
                    oldest_watchable: 1,
                    running: true,
                    ..State::default()
                }),
                changed: Condvar::new(),
            }),
            listeners: Vec::new(),
        }
    }

    /// Opens a listener on 127.0.0.1 (an ephemeral port) inside the network namespace at
    /// `netns` and returns its port.
    pub fn listen_in(&mut self, netns: &Path) -> Result<u16> {
        let listener = bind_in(netns, 0)?;
        let port = listener.local_addr()?.port();
        let thread = self.spawn_accept(listener);
        self.listeners.push(Listener {
            netns: netns.to_path_buf(),
            port,
            thread: Some(thread),
        });
        Ok(port)
    }

    /// A kubeconfig for a client in the namespace of the listener on `port`.
    pub fn kubeconfig(port: u16) -> String {
        format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: sluice-test
  cluster: {{server: "http://127.0.0.1:{port}"}}
users:
- name: sluice-test
  user: {{}}
contexts:
- name: sluice-test
  context: {{cluster: sluice-test, user: sluice-test}}
current-context: sluice-test
"#
        )
    }

    fn spawn_accept(&self, listener: TcpListener) -> JoinHandle<()> {
        let inner = Arc::clone(&self.inner);
        std::thread::spawn(move || accept_loop(&inner, listener))
    }

    /// Creates or replaces every object in `yaml` (one or more documents, `kind: List`
    /// unpacked), each a change with a new resourceVersion. Namespaced objects without a
    /// namespace land in `default`.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let mut objects = Vec::new();
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(document)
                .map_err(|e| anyhow!("applying: not valid YAML: {e}"))?;
            if value.is_null() {
                continue;
            }
            if value["kind"] == "List" {
                objects.extend(value["items"].as_array().cloned().unwrap_or_default());
            } else {
                objects.push(value);
            }
        }
        let mut state = self.inner.lock();
        for object in objects {
            apply_one(&mut state, object)?;
        }
        drop(state);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds).
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let resource = resource_of_kind(api_version, kind)
            .ok_or_else(|| anyhow!("deleting: the server does not serve {api_version} {kind}"))?;
        let namespace = if resource.namespaced { namespace } else { "" };
        let mut state = self.inner.lock();
        let key = (resource.path, namespace.to_string(), name.to_string());
        let Some(mut object) = state.objects.remove(&key) else {
            bail!("deleting: no {kind} {namespace}/{name}");
        };
        state.resource_version += 1;
        let version = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        state.history.push(Event {
            resource_version: version,
            resource: resource.path,
            type_: "DELETED",
            object,
        });
        drop(state);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().resource_version
    }

    /// Cuts every open connection (lists and watches). The history stays, so clients can
    /// resume their watches where they were.
    pub fn drop_connections(&self) {
        let mut state = self.inner.lock();
        state.watch_generation += 1;
        for (_, connection) in state.connections.drain() {
            let _ = connection.shutdown(Shutdown::Both);
        }
        drop(state);
        self.inner.changed.notify_all();
    }

    /// Stops serving: the listeners close (connections are refused) and every connection is
    /// cut. The store stays for [`ApiServer::start`].
    pub fn stop(&mut self) {
        self.inner.lock().running = false;
        self.drop_connections();
        for listener in &mut self.listeners {
            if let Some(thread) = listener.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Reopens the listeners [`ApiServer::stop`] closed, on the same ports.
    pub fn start(&mut self) -> Result<()> {
        self.inner.lock().running = true;
        for i in 0..self.listeners.len() {
            if self.listeners[i].thread.is_some() {
                continue;
            }
            let (netns, port) = (self.listeners[i].netns.clone(), self.listeners[i].port);
            let listener = bind_in(&netns, port)?;
            self.listeners[i].thread = Some(self.spawn_accept(listener));
        }
        Ok(())
    }

    /// Open watches stop delivering (events are kept in the history, nothing is sent) until
    /// [`ApiServer::thaw_watches`] or [`ApiServer::expire`].
    pub fn freeze_watches(&self) {
        self.inner.lock().frozen = true;
    }

    pub fn thaw_watches(&self) {
        self.inner.lock().frozen = false;
        self.inner.changed.notify_all();
    }

    /// Compacts the history: a watch from any version before the current one is answered
    /// with 410 Gone, the way `gone` says; open watches end. Watches thaw.
    pub fn expire(&self, gone: Gone) {
        let mut state = self.inner.lock();
        state.oldest_watchable = state.resource_version;
        let oldest = state.oldest_watchable;
        state.history.retain(|e| e.resource_version > oldest);
        state.frozen = false;
        state.watch_generation += 1;
        if gone == Gone::Event {
            state.gone_generation += 1;
        }
        drop(state);
        self.inner.changed.notify_all();
    }

    /// Answers every request for the resource at `path` (e.g.
    /// `/apis/discovery.k8s.io/v1/endpointslices`) with 403 Forbidden, as the API does for a
    /// service account missing that RBAC rule, until [`ApiServer::allow`].
    pub fn forbid(&self, path: &str) {
        self.inner.lock().forbidden.push(path.to_string());
    }

    pub fn allow(&self, path: &str) {
        self.inner.lock().forbidden.retain(|p| p != path);
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.lock().requests.clone()
    }

    /// How many list (not watch) requests of the resource at `path` were answered with 200.
    pub fn lists_of(&self, path: &str) -> usize {
        self.inner
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path && !r.watch && r.status == 200)
            .count()
    }

    /// How many BOOKMARK events the watches have sent.
    pub fn bookmarks_sent(&self) -> usize {
        self.inner.lock().bookmarks_sent
    }

    /// Waits until `predicate` holds for the request log, up to `timeout`.
    pub fn wait_for_requests(
        &self,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&[RequestRecord]) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if predicate(&requests) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("no {what} within {timeout:?}; requests: {requests:#?}");
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.inner.lock().shutdown = true;
        self.stop();
    }
}

fn bind_in(netns: &Path, port: u16) -> Result<TcpListener> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = crate::in_netns(netns, || TcpListener::bind(address))?
        .with_context(|| format!("binding {address} in {}", netns.display()))?;
    // Accept polls, so the thread sees stop() and drop.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn apply_one(state: &mut State, mut object: Value) -> Result<()> {
    let api_version = object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let resource = resource_of_kind(&api_version, &kind)
        .ok_or_else(|| anyhow!("applying: the server does not serve {api_version:?} {kind:?}"))?;
    let name = object["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("applying {kind}: metadata.name is missing"))?
        .to_string();
    let namespace = if resource.namespaced {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        object["metadata"]["namespace"] = json!(namespace);
        namespace
    } else {
        String::new()
    };
    state.resource_version += 1;
    let version = state.resource_version;
    object["metadata"]["resourceVersion"] = json!(version.to_string());
    object["metadata"]["uid"] = json!(format!("uid-{kind}-{namespace}-{name}"));
    let key = (resource.path, namespace, name);
    let type_ = if state.objects.contains_key(&key) {
        "MODIFIED"
    } else {
        "ADDED"
    };
    state.objects.insert(key, object.clone());
    state.history.push(Event {
        resource_version: version,
        resource: resource.path,
        type_,
        object,
    });
    Ok(())
}

fn accept_loop(inner: &Arc<Inner>, listener: TcpListener) {
    loop {
        {
            let state = inner.lock();
            if !state.running || state.shutdown {
                return; // the listener closes here
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let inner = Arc::clone(inner);
                std::thread::spawn(move || serve_connection(&inner, stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// A parsed request: path and query parameters.
struct Request {
    path: String,
    query: HashMap<String, String>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let target = line.split_whitespace().nth(1)?.to_string();
    let mut content_length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    if content_length > 0 {
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body).ok()?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%2C", ",")))
        .collect();
    Some(Request {
        path: path.to_string(),
        query,
    })
}

fn serve_connection(inner: &Arc<Inner>, stream: TcpStream) {
    let id = {
        let mut state = inner.lock();
        let id = state.next_connection;
        state.next_connection += 1;
        match stream.try_clone() {
            Ok(clone) => {
                state.connections.insert(id, clone);
            }
            Err(_) => return,
        }
        id
    };
    let _ = stream.set_nonblocking(false);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    // HTTP/1.1 keep-alive: lists share a connection; a watch ends it.
    while let Some(request) = read_request(&mut reader) {
        let keep_open = handle(inner, &request, &mut writer);
        if !keep_open {
            break;
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
    inner.lock().connections.remove(&id);
}

fn record(inner: &Inner, request: &Request, watch: bool, status: u16) {
    let path = request.path.clone();
    inner.lock().requests.push(RequestRecord {
        path,
        watch,
        resource_version: request.query.get("resourceVersion").cloned(),
        status,
    });
}

/// Answers one request; false when the connection must close.
fn handle(inner: &Inner, request: &Request, out: &mut TcpStream) -> bool {
    let watch = matches!(
        request.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    let Some(resource) = RESOURCES.into_iter().find(|r| r.path == request.path) else {
        record(inner, request, watch, 404);
        let status = status_json(404, "NotFound", &format!("no resource at {}", request.path));
        return write_json(out, 404, &status).is_ok();
    };
    if inner.lock().forbidden.contains(&request.path) {
        record(inner, request, watch, 403);
        let status = status_json(
            403,
            "Forbidden",
            &format!("{} is forbidden for this test", request.path),
        );
        return write_json(out, 403, &status).is_ok();
    }
    if !watch {
        let state = inner.lock();
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((path, _, _), _)| *path == resource.path)
            .map(|(_, object)| {
                let mut item = object.clone();
                if let Some(map) = item.as_object_mut() {
                    map.remove("apiVersion");
                    map.remove("kind");
                }
                item
            })
            .collect();
        let list = json!({
            "apiVersion": resource.api_version,
            "kind": format!("{}List", resource.kind),
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        });
        drop(state);
        record(inner, request, false, 200);
        return write_json(out, 200, &list).is_ok();
    }
    watch_stream(inner, request, resource, out);
    false
}

fn watch_stream(inner: &Inner, request: &Request, resource: Resource, out: &mut TcpStream) {
    let from: Option<u64> = request
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let bookmarks = request
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let deadline = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|t| Instant::now() + Duration::from_secs(t));

    let mut state = inner.lock();
    let (generation, gone_generation) = (state.watch_generation, state.gone_generation);
    if from.is_some_and(|v| v < state.oldest_watchable) {
        let message = format!(
            "too old resource version: {} ({})",
            from.unwrap_or_default(),
            state.oldest_watchable
        );
        drop(state);
        record(inner, request, true, 410);
        let _ = write_json(out, 410, &status_json(410, "Expired", &message));
        return;
    }
    let mut sent_up_to = match from {
        Some(version) => version,
        None => {
            // No version: the current objects first, as ADDED.
            let initial: Vec<Value> = state
                .objects
                .iter()
                .filter(|((path, _, _), _)| *path == resource.path)
                .map(|(_, object)| object.clone())
                .collect();
            let version = state.resource_version;
            drop(state);
            record(inner, request, true, 200);
            if write_head(out).is_err() {
                return;
            }
            for object in initial {
                if write_event(out, "ADDED", &object).is_err() {
                    return;
                }
            }
            state = inner.lock();
            version
        }
    };
    if from.is_some() {
        drop(state);
        record(inner, request, true, 200);
        if write_head(out).is_err() {
            return;
        }
        state = inner.lock();
    }
    let mut last_sent = Instant::now();
    loop {
        if state.shutdown || !state.running || state.watch_generation != generation {
            let gone = state.gone_generation != gone_generation;
            drop(state);
            if gone {
                let status = status_json(410, "Expired", "too old resource version");
                let _ = write_event(out, "ERROR", &status);
            }
            let _ = out.write_all(b"0\r\n\r\n");
            return;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            drop(state);
            let _ = out.write_all(b"0\r\n\r\n");
            return;
        }
        if !state.frozen {
            // The history is in resourceVersion order: skip what was sent without walking
            // it (a bench keeps tens of thousands of events, and every change wakes every
            // watch).
            let unsent = state
                .history
                .partition_point(|e| e.resource_version <= sent_up_to);
            let pending: Vec<Event> = state.history[unsent..]
                .iter()
                .filter(|e| e.resource == resource.path)
                .cloned()
                .collect();
            let current = state.resource_version;
            if !pending.is_empty() {
                drop(state);
                for event in &pending {
                    if write_event(out, event.type_, &event.object).is_err() {
                        return;
                    }
                    sent_up_to = event.resource_version;
                }
                last_sent = Instant::now();
                state = inner.lock();
                continue;
            }
            if bookmarks && last_sent.elapsed() >= BOOKMARK_INTERVAL {
                drop(state);
                let bookmark = json!({
                    "apiVersion": resource.api_version,
                    "kind": resource.kind,
                    "metadata": {"resourceVersion": current.to_string()},
                });
                if write_event(out, "BOOKMARK", &bookmark).is_err() {
                    return;
                }
                sent_up_to = sent_up_to.max(current);
                last_sent = Instant::now();
                state = inner.lock();
                state.bookmarks_sent += 1;
                continue;
            }
        }
        state = inner
            .changed
            .wait_timeout(state, POLL * 5)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    }
}

fn write_json(out: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())
}

fn write_head(out: &mut TcpStream) -> std::io::Result<()> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
}

/// One watch event as one chunk.
fn write_event(out: &mut TcpStream, type_: &str, object: &Value) -> std::io::Result<()> {
    let line = format!("{}\n", json!({"type": type_, "object": object}));
    out.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())?;
    out.flush()
}
