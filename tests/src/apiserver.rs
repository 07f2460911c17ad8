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
//! after a relist), [`ApiServer::expire`] (compacts the history and answers 410),
//! [`ApiServer::forbid`] (403 for one resource), [`ApiServer::fail`] (lists and/or watches
//! answered with an error `Status`, e.g. 500 InternalError, as an overloaded or broken API
//! server does), [`ApiServer::delay`] (lists and/or watch starts answered only after a
//! while), [`ApiServer::cut_watches_after`] (every watch is cut in the middle of an
//! event once it has delivered N; resumed watches too) and [`ApiServer::end_watches_after`]
//! (watches end cleanly soon after they start, even before any event). [`ApiServer::heal`]
//! ends the last four.
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

/// Which requests a fault ([`ApiServer::fail`], [`ApiServer::delay`]) applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requests {
    /// List requests (no `watch=true`).
    Lists,
    /// Watch requests (the response that starts the stream).
    Watches,
    /// Both.
    All,
}

impl Requests {
    fn covers(self, watch: bool) -> bool {
        match self {
            Requests::Lists => !watch,
            Requests::Watches => watch,
            Requests::All => true,
        }
    }
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
    /// When the request arrived (a delayed one is answered later).
    pub at: Instant,
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
    /// [`ApiServer::fail`]: the status code answered and to which requests.
    failing: Option<(u16, Requests)>,
    /// [`ApiServer::delay`]: how long responses wait and which.
    delayed: Option<(Duration, Requests)>,
    /// [`ApiServer::cut_watches_after`]: the event count, and the fault's number (a watch
    /// counts its events anew for each new fault).
    cut_after: Option<(usize, u64)>,
    cut_faults: u64,
    watches_cut: usize,
    /// [`ApiServer::end_watches_after`].
    watch_lifetime: Option<Duration>,
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

    /// Answers every list and/or watch request (`which`) with HTTP `code` and a `Status`
    /// object as the kube-apiserver writes one (for 500: reason `InternalError`, message
    /// "Internal error occurred: …", a cause), until [`ApiServer::heal`]. Open watches are
    /// not touched: [`ApiServer::drop_connections`] or [`ApiServer::expire`] make the
    /// clients come back and meet the errors. 404 and 403 ([`ApiServer::forbid`]) come first.
    pub fn fail(&self, code: u16, which: Requests) {
        self.inner.lock().failing = Some((code, which));
    }

    /// Every list and/or watch request (`which`) arriving from now on is answered only after
    /// `by` (a watch: its response head and first event), until [`ApiServer::heal`]; a request
    /// already waiting keeps waiting its whole delay. An error ([`ApiServer::fail`]) is
    /// delayed too.
    pub fn delay(&self, by: Duration, which: Requests) {
        self.inner.lock().delayed = Some((by, which));
    }

    /// Every watch, open or new, is cut once it has delivered `events` events (ADDED,
    /// MODIFIED, DELETED; bookmarks do not count) from now on: the server writes the first
    /// half of the next event's chunk and shuts the connection down, as when the API server
    /// or a proxy in between dies mid-write. A client resuming from the last version it got
    /// loses nothing (the history stays), and its new watch is cut after `events` again.
    /// Until [`ApiServer::heal`].
    pub fn cut_watches_after(&self, events: usize) {
        let mut state = self.inner.lock();
        state.cut_faults += 1;
        state.cut_after = Some((events, state.cut_faults));
        drop(state);
        self.inner.changed.notify_all();
    }

    /// Every watch, open or new, ends once it is `after` old, cleanly (the closing chunk, as
    /// at its `timeoutSeconds`; open ones older than that at once), until
    /// [`ApiServer::heal`]: an API server or a proxy in between with a far too short request
    /// timeout. `Duration::ZERO` ends each new watch right after its response head, before
    /// any event (but a watch without a resourceVersion's initial `ADDED`s).
    pub fn end_watches_after(&self, after: Duration) {
        self.inner.lock().watch_lifetime = Some(after);
        self.inner.changed.notify_all();
    }

    /// How many watches [`ApiServer::cut_watches_after`] has cut.
    pub fn watches_cut(&self) -> usize {
        self.inner.lock().watches_cut
    }

    /// Ends [`ApiServer::fail`], [`ApiServer::delay`], [`ApiServer::cut_watches_after`] and
    /// [`ApiServer::end_watches_after`].
    pub fn heal(&self) {
        let mut state = self.inner.lock();
        state.failing = None;
        state.delayed = None;
        state.cut_after = None;
        state.watch_lifetime = None;
        drop(state);
        self.inner.changed.notify_all();
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

/// What [`raw_get`] read.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Each complete JSON document of the body: the one document of a plain response, or
    /// each complete chunk of a chunked one (a watch's events).
    pub documents: Vec<Value>,
    /// A chunked body that ended in the middle of a chunk (a watch cut mid-event).
    pub truncated: bool,
    /// Whether the body ended (the closing chunk, the whole Content-Length or the connection
    /// closed) rather than `quiet` passing with nothing more.
    pub ended: bool,
    /// From sending the request to the status line.
    pub first_byte: Duration,
}

/// A raw HTTP/1.1 `GET target` to the listener on `port` in `netns`, for tests of the server
/// itself: reads until the body ends or, after the head, `quiet` passes without a byte (an
/// open watch).
pub fn raw_get(netns: &Path, port: u16, target: &str, quiet: Duration) -> Result<RawResponse> {
    let mut stream = crate::in_netns(netns, || TcpStream::connect((Ipv4Addr::LOCALHOST, port)))?
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    // The head may be delayed ([`ApiServer::delay`]); the body's quiet time starts after it.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let sent = Instant::now();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the status line")?;
    let first_byte = sent.elapsed();
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {line:?}"))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.trim().eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    reader.get_ref().set_read_timeout(Some(quiet))?;
    let mut response = RawResponse {
        status,
        documents: Vec::new(),
        truncated: false,
        ended: false,
        first_byte,
    };
    if !chunked {
        let mut body = vec![0; length.unwrap_or(0)];
        reader.read_exact(&mut body)?;
        response.documents.push(serde_json::from_slice(&body)?);
        response.ended = true;
        return Ok(response);
    }
    loop {
        let mut size = String::new();
        match reader.read_line(&mut size) {
            Ok(0) => {
                response.ended = true;
                return Ok(response);
            }
            Ok(_) => {}
            Err(_) => return Ok(response), // quiet
        }
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| anyhow!("not a chunk size: {size:?}"))?;
        if size == 0 {
            response.ended = true;
            return Ok(response);
        }
        let mut chunk = Vec::new();
        let read = (&mut reader).take(size as u64 + 2).read_to_end(&mut chunk);
        if read.is_err() || chunk.len() < size + 2 {
            response.truncated = true;
            response.ended = read.is_ok();
            return Ok(response);
        }
        response
            .documents
            .push(serde_json::from_slice(&chunk[..size])?);
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
    arrived: Instant,
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
        arrived: Instant::now(),
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
        at: request.arrived,
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
    let (delayed, failing) = {
        let state = inner.lock();
        (state.delayed, state.failing)
    };
    if let Some((by, _)) = delayed.filter(|(_, which)| which.covers(watch)) {
        if !sleep_unless_shut_down(inner, by) {
            return false;
        }
    }
    if inner.lock().forbidden.contains(&request.path) {
        record(inner, request, watch, 403);
        let status = status_json(
            403,
            "Forbidden",
            &format!("{} is forbidden for this test", request.path),
        );
        return write_json(out, 403, &status).is_ok();
    }
    if let Some((code, _)) = failing.filter(|(_, which)| which.covers(watch)) {
        record(inner, request, watch, code);
        return write_json(out, code, &error_status(code, request)).is_ok();
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
    let started = Instant::now();

    let mut cut = CutCount::default();
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
            let cut_after = state.cut_after;
            drop(state);
            record(inner, request, true, 200);
            if write_head(out).is_err() {
                return;
            }
            for object in initial {
                if cut.cut_next(cut_after) {
                    cut_watch(inner, out, "ADDED", &object);
                    return;
                }
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
        let too_old = state.watch_lifetime.is_some_and(|l| started.elapsed() >= l);
        if too_old || deadline.is_some_and(|d| Instant::now() >= d) {
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
                let cut_after = state.cut_after;
                drop(state);
                for event in &pending {
                    if cut.cut_next(cut_after) {
                        cut_watch(inner, out, event.type_, &event.object);
                        return;
                    }
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

/// A watch's events counted against [`ApiServer::cut_watches_after`].
#[derive(Default)]
struct CutCount {
    /// The fault the count is for.
    fault: u64,
    sent: usize,
}

impl CutCount {
    /// Whether the next event must be cut under `cut_after` (the state's setting); counts it
    /// otherwise.
    fn cut_next(&mut self, cut_after: Option<(usize, u64)>) -> bool {
        let Some((events, fault)) = cut_after else {
            return false;
        };
        if fault != self.fault {
            self.fault = fault;
            self.sent = 0;
        }
        if self.sent >= events {
            return true;
        }
        self.sent += 1;
        false
    }
}

/// Writes the chunk-size line and the first half of the event, then shuts the connection
/// down: a watch broken mid-event.
fn cut_watch(inner: &Inner, out: &mut TcpStream, type_: &str, object: &Value) {
    // Counted first: a client that sees the cut may ask at once.
    inner.lock().watches_cut += 1;
    let line = format!("{}\n", json!({"type": type_, "object": object}));
    let half = &line.as_bytes()[..line.len() / 2];
    let _ = out
        .write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .and_then(|()| out.write_all(half))
        .and_then(|()| out.flush());
    let _ = out.shutdown(Shutdown::Both);
}

/// Sleeps `duration` in [`POLL`] steps; false if the server shut down meanwhile.
fn sleep_unless_shut_down(inner: &Inner, duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        if inner.lock().shutdown {
            return false;
        }
        std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
    }
    true
}

/// The `Status` the kube-apiserver answers with `code` (for [`ApiServer::fail`]).
fn error_status(code: u16, request: &Request) -> Value {
    let (reason, message) = match code {
        500 => (
            "InternalError",
            format!(
                "Internal error occurred: injected fault serving {}",
                request.path
            ),
        ),
        503 => (
            "ServiceUnavailable",
            "the server is currently unable to handle the request".to_string(),
        ),
        504 => (
            "Timeout",
            "the server was unable to return a response in the time allotted".to_string(),
        ),
        429 => (
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later"
                .to_string(),
        ),
        _ => ("", format!("injected fault {code}")),
    };
    let mut status = status_json(code, reason, &message);
    if code == 500 {
        status["details"] = json!({"causes": [{"message": message}]});
    }
    status
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
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
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
