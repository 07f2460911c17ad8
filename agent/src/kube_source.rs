//! Kubernetes objects from the API server (`sluice agent` without `--manifests`).
//!
//! One reflector per watched resource ([`WATCHED_RESOURCES`]): a kube-rs watcher (list, then
//! watch from the list's resourceVersion, resumed from the last seen version when a
//! connection ends, relisted from scratch on 410 Gone, with kube-rs' default backoff after
//! errors) feeding a reflector store; each event also updates a shared [`Objects`] (the
//! same struct the manifests produce, so the pure translation does not know where its input
//! came from).
//!
//! The edges the agent relies on:
//! * [`ApiSource::wait_synced`] returns once every initial list is in its store: nothing is
//!   programmed from a partial view (a missing EndpointSlice would blackhole a Service);
//! * a store keeps its content while the API is unreachable, and a relist replaces it only
//!   once the new list is complete, so the programmed state stays through disconnects;
//! * every change that lands in a store (an object applied or deleted, a relist done) sends a
//!   `()` on the agent's change channel at once: no periodic resync is needed to see it.

use std::{fmt::Debug, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    runtime::{
        reflector::store::{Store, Writer},
        utils::Backoff as _,
        watcher::{self, DefaultBackoff},
    },
    Api, Client, ResourceExt as _,
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::manifests::{ObjectRef, Objects};

/// A resource the agent lists and watches, as RBAC names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WatchedResource {
    /// API group ("" for the core group).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The plural resource name (RBAC's `resources`).
    pub plural: &'static str,
}

impl WatchedResource {
    const fn of<K: k8s_openapi::Resource>() -> WatchedResource {
        WatchedResource {
            group: K::GROUP,
            version: K::VERSION,
            kind: K::KIND,
            plural: K::URL_PATH_SEGMENT,
        }
    }
}

/// Every resource the agent watches, cluster-wide. The reflectors are started from exactly
/// this list ([`ApiSource::start`] checks it), and the deploy/ ClusterRole is tested against
/// it. Pods are watched in every namespace, not only this node's: NetworkPolicy peers select
/// pods anywhere in the cluster.
pub const WATCHED_RESOURCES: [WatchedResource; 6] = [
    WatchedResource::of::<Service>(),
    WatchedResource::of::<EndpointSlice>(),
    WatchedResource::of::<Node>(),
    WatchedResource::of::<Pod>(),
    WatchedResource::of::<Namespace>(),
    WatchedResource::of::<NetworkPolicy>(),
];

/// The verbs the agent uses on every watched resource (it never writes to the API).
pub const WATCH_VERBS: [&str; 2] = ["list", "watch"];

/// The longest wait between retries (kube-rs' default backoff's cap).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How often [`ApiSource::wait_synced`] says which initial lists it is still waiting for.
const SYNC_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Where the API server and credentials come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiOptions {
    /// A kubeconfig file; without one, `KUBECONFIG` / `~/.kube/config`, then the in-cluster
    /// service account (kube-rs' inference order).
    pub kubeconfig: Option<PathBuf>,
}

/// A client for the API server `options` point at. Nothing is sent yet.
pub async fn client(options: &ApiOptions) -> anyhow::Result<Client> {
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no API server configuration: no --kubeconfig, no KUBECONFIG or ~/.kube/config, \
             and not running in a pod (KUBERNETES_SERVICE_HOST unset)",
        )?,
    };
    Ok(kube::client::ClientBuilder::try_from(config)
        .context("creating the API client")?
        .with_layer(&ShortWatchBackoff::default())
        .build())
}

/// The reflector stores of every watched resource, filled by background tasks that stop when
/// this is dropped.
pub struct ApiSource {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    network_policies: Store<NetworkPolicy>,
    /// The stores' objects in the form the translation takes, kept up to date by the
    /// reflector tasks event by event, so taking a snapshot costs nothing however many
    /// objects there are (rebuilding it from the stores on every change was a large part of
    /// a change's time with thousands of services). A task changes it in place unless the
    /// agent still holds the last snapshot.
    snapshot: Snapshot,
    /// The resources the reflectors were started for, in start order.
    started: Vec<WatchedResource>,
    tasks: Vec<JoinHandle<()>>,
}

type Snapshot = Arc<std::sync::Mutex<SnapshotState>>;

#[derive(Default)]
struct SnapshotState {
    objects: Arc<Objects>,
    /// The resources whose complete list is in `objects` (the stores are ready a moment
    /// before: a snapshot taken in between would miss a whole kind).
    listed: std::collections::BTreeSet<&'static str>,
}

/// A watched kind's place in [`Objects`].
trait Reflected:
    kube::Resource<DynamicType = ()>
    + k8s_openapi::Resource
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    type Key: Ord;
    fn key(object: &Self) -> Self::Key;
    fn map(objects: &mut Objects) -> &mut std::collections::BTreeMap<Self::Key, Arc<Self>>;
}

macro_rules! reflected {
    (namespaced $kind:ty => $field:ident) => {
        impl Reflected for $kind {
            type Key = ObjectRef;
            fn key(object: &Self) -> ObjectRef {
                ObjectRef {
                    namespace: object.namespace().unwrap_or_else(|| "default".into()),
                    name: object.name_any(),
                }
            }
            fn map(objects: &mut Objects) -> &mut std::collections::BTreeMap<ObjectRef, Arc<Self>> {
                &mut objects.$field
            }
        }
    };
    (cluster $kind:ty => $field:ident) => {
        impl Reflected for $kind {
            type Key = String;
            fn key(object: &Self) -> String {
                object.name_any()
            }
            fn map(objects: &mut Objects) -> &mut std::collections::BTreeMap<String, Arc<Self>> {
                &mut objects.$field
            }
        }
    };
}
reflected!(namespaced Service => services);
reflected!(namespaced EndpointSlice => endpoint_slices);
reflected!(cluster Node => nodes);
reflected!(namespaced Pod => pods);
reflected!(cluster Namespace => namespaces);
reflected!(namespaced NetworkPolicy => network_policies);

/// Brings `K`'s part of the snapshot up to date with what `event` did to `store`.
fn update_snapshot<K: Reflected>(snapshot: &Snapshot, store: &Store<K>, event: &watcher::Event<K>) {
    let mut guard = snapshot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if matches!(event, watcher::Event::InitDone) {
        guard
            .listed
            .insert(<K as k8s_openapi::Resource>::URL_PATH_SEGMENT);
    }
    let objects = Arc::make_mut(&mut guard.objects);
    match event {
        // The store now holds the complete new list.
        watcher::Event::InitDone => {
            *K::map(objects) = store
                .state()
                .into_iter()
                .map(|object| (K::key(&object), object))
                .collect();
        }
        watcher::Event::Apply(object) => {
            // The store's own object, shared rather than copied.
            match store.get(&kube::runtime::reflector::ObjectRef::from_obj(object)) {
                Some(stored) => {
                    K::map(objects).insert(K::key(object), stored);
                }
                None => {
                    K::map(objects).insert(K::key(object), Arc::new(object.clone()));
                }
            }
        }
        watcher::Event::Delete(object) => {
            K::map(objects).remove(&K::key(object));
        }
        watcher::Event::Init | watcher::Event::InitApply(_) => {}
    }
}

impl ApiSource {
    /// Starts one reflector per watched resource. Each change that lands in a store sends a
    /// `()` on `changed` (coalesced: a full channel already means "something changed").
    pub fn start(client: Client, changed: mpsc::Sender<()>) -> ApiSource {
        let mut started = Vec::new();
        let mut tasks = Vec::new();
        let snapshot = Snapshot::default();
        macro_rules! reflect {
            ($kind:ty) => {{
                let (store, task) = spawn_reflector::<$kind>(
                    Api::all(client.clone()),
                    changed.clone(),
                    Arc::clone(&snapshot),
                );
                started.push(WatchedResource::of::<$kind>());
                tasks.push(task);
                store
            }};
        }
        let source = ApiSource {
            services: reflect!(Service),
            endpoint_slices: reflect!(EndpointSlice),
            nodes: reflect!(Node),
            pods: reflect!(Pod),
            namespaces: reflect!(Namespace),
            network_policies: reflect!(NetworkPolicy),
            snapshot,
            started,
            tasks,
        };
        assert_eq!(
            source.started, WATCHED_RESOURCES,
            "the reflectors must watch exactly WATCHED_RESOURCES (the ClusterRole is built from it)"
        );
        source
    }

    /// The resources the reflectors watch.
    pub fn watched(&self) -> &[WatchedResource] {
        &self.started
    }

    /// Waits until every store holds its complete initial list, saying every
    /// [`SYNC_PROGRESS_INTERVAL`] which lists are still missing (e.g. the API server is
    /// unreachable or RBAC forbids a list).
    pub async fn wait_synced(&self) {
        let all = async {
            // A store is ready after its first complete list; the writers live as long as
            // their tasks, which only end when this source is dropped.
            let _ = futures::join!(
                self.services.wait_until_ready(),
                self.endpoint_slices.wait_until_ready(),
                self.nodes.wait_until_ready(),
                self.pods.wait_until_ready(),
                self.namespaces.wait_until_ready(),
                self.network_policies.wait_until_ready(),
            );
        };
        let all = async {
            all.await;
            // The reflector tasks put each list into the snapshot right after their store.
            while !self.snapshot_complete() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::pin!(all);
        loop {
            match tokio::time::timeout(SYNC_PROGRESS_INTERVAL, &mut all).await {
                Ok(()) => return,
                Err(_) => tracing::warn!(
                    waiting_for = ?self.unsynced(),
                    "initial lists not complete yet; nothing is programmed until they are"
                ),
            }
        }
    }

    /// The watched resources whose initial list is not in its store yet.
    fn unsynced(&self) -> Vec<&'static str> {
        let ready = [
            is_ready(&self.services),
            is_ready(&self.endpoint_slices),
            is_ready(&self.nodes),
            is_ready(&self.pods),
            is_ready(&self.namespaces),
            is_ready(&self.network_policies),
        ];
        WATCHED_RESOURCES
            .iter()
            .zip(ready)
            .filter(|(_, ready)| !ready)
            .map(|(resource, _)| resource.plural)
            .collect()
    }

    /// A snapshot of the stores, in the form the translation takes.
    pub fn objects(&self) -> Arc<Objects> {
        Arc::clone(
            &self
                .snapshot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .objects,
        )
    }

    /// Whether every resource's complete list is in the snapshot.
    fn snapshot_complete(&self) -> bool {
        let state = self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        WATCHED_RESOURCES
            .iter()
            .all(|r| state.listed.contains(r.plural))
    }
}

impl Drop for ApiSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Whether the store holds its first complete list.
fn is_ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

/// Lists and watches `K` into a store until aborted. Errors are logged and retried with
/// kube-rs' default backoff (0.8 s doubling to 30 s, jittered, forgotten after 2 minutes
/// without an error), reset only by an answer from the server (a listed object, a list done,
/// a change): not by kube-rs' `default_backoff()`, which resets on every event the watcher
/// yields, `Init` included, and the watcher yields `Init` before each list attempt, so a
/// relist failing over and over (500s) was retried every 0.8 to 1.6 s without end. A watch
/// the server refuses to start with HTTP 410 Gone (the resourceVersion is too old; a Gone
/// *event* in the stream is already handled by the watcher) restarts the watcher, which
/// relists: kube-rs alone would retry the same resourceVersion forever.
fn spawn_reflector<K: Reflected>(
    api: Api<K>,
    changed: mpsc::Sender<()>,
    snapshot: Snapshot,
) -> (Store<K>, JoinHandle<()>) {
    let mut writer = Writer::<K>::default();
    let store = writer.as_reader();
    let store_for_snapshot = writer.as_reader();
    let resource = <K as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    let task = tokio::spawn(async move {
        let mut backoff = DefaultBackoff::default();
        loop {
            let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        if !matches!(event, watcher::Event::Init) {
                            backoff.reset();
                        }
                        let event =
                            event.modify(|object| crate::manifests::slim(object.meta_mut()));
                        writer.apply_watcher_event(&event);
                        update_snapshot(&snapshot, &store_for_snapshot, &event);
                        match &event {
                            watcher::Event::Init => {
                                tracing::debug!(resource, "listing");
                            }
                            watcher::Event::InitApply(_) => {}
                            watcher::Event::InitDone => {
                                tracing::debug!(resource, "list complete");
                                let _ = changed.try_send(());
                            }
                            watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
                                tracing::debug!(
                                    resource,
                                    object = %object_name(object),
                                    event = if matches!(event, watcher::Event::Apply(_)) { "applied" } else { "deleted" },
                                    "API change"
                                );
                                let _ = changed.try_send(());
                            }
                        }
                    }
                    Err(watcher::Error::WatchStartFailed(kube::Error::Api(status)))
                        if status.code == 410 =>
                    {
                        tracing::warn!(
                            resource,
                            "watch refused with 410 Gone ({}); relisting",
                            status.message
                        );
                        break;
                    }
                    Err(e) => {
                        let delay = backoff.next().unwrap_or(MAX_BACKOFF);
                        tracing::warn!(resource, "{e}; retrying in {delay:.1?}");
                        // The watcher does nothing until polled again.
                        tokio::time::sleep(delay).await;
                    }
                }
            }
            let delay = backoff.next().unwrap_or(MAX_BACKOFF);
            tokio::time::sleep(delay).await;
        }
    });
    (store, task)
}

fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    kube::runtime::watcher(api, config)
}

/// A watch that ends less than this after it was sent, without a byte of event, is "very
/// short" (client-go's name and threshold).
const SHORT_WATCH: Duration = Duration::from_secs(1);

type Backoffs = Arc<std::sync::Mutex<std::collections::HashMap<String, DefaultBackoff>>>;

/// The API client's layer that backs off re-watches after very short watches, as client-go's
/// reflector does ("very short watch ... Unexpected watch close") and kube-rs does not: its
/// watcher re-watches at once, within one poll and with neither event nor error to show for
/// it, whenever a watch stream ends, so an API server (or a proxy in between) that ends every
/// watch right after its response head had the agent re-watch each resource in a tight loop
/// (about 50 requests a second each in the fault test). The body of every watch response is
/// tracked: when it ends (or fails) less than [`SHORT_WATCH`] after the request, without any
/// data, its end is held back for the resource's backoff (0.8 s doubling to 30 s, jittered),
/// so the next watch waits that long; a watch that lasted, or carried anything, resets it.
#[derive(Clone, Default)]
struct ShortWatchBackoff {
    /// By request path (one per watched resource).
    backoffs: Backoffs,
}

impl<S> tower::Layer<S> for ShortWatchBackoff {
    type Service = ShortWatchService<S>;

    fn layer(&self, inner: S) -> ShortWatchService<S> {
        ShortWatchService {
            inner,
            backoffs: Arc::clone(&self.backoffs),
        }
    }
}

struct ShortWatchService<S> {
    inner: S,
    backoffs: Backoffs,
}

impl<S, B> tower::Service<hyper::Request<kube::client::Body>> for ShortWatchService<S>
where
    S: tower::Service<hyper::Request<kube::client::Body>, Response = hyper::Response<B>>,
    S::Future: Send + 'static,
    B: hyper::body::Body + Unpin,
{
    type Response = hyper::Response<WatchBody<B>>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: hyper::Request<kube::client::Body>) -> Self::Future {
        let is_watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let tracker = is_watch.then(|| WatchTracker {
            path: request.uri().path().to_string(),
            sent: std::time::Instant::now(),
            data: false,
            backoffs: Arc::clone(&self.backoffs),
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            Ok(response.await?.map(|inner| WatchBody {
                inner,
                tracker,
                held: None,
            }))
        })
    }
}

/// One watch response's body being tracked.
struct WatchTracker {
    path: String,
    sent: std::time::Instant,
    /// Whether any data came.
    data: bool,
    backoffs: Backoffs,
}

impl WatchTracker {
    /// The body ended: how long to hold its end back, if it was a very short watch.
    fn finish(self) -> Option<Duration> {
        let lasted = self.sent.elapsed();
        let mut backoffs = self
            .backoffs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let backoff = backoffs.entry(self.path.clone()).or_default();
        if self.data || lasted >= SHORT_WATCH {
            backoff.reset();
            return None;
        }
        let delay = backoff.next().unwrap_or(MAX_BACKOFF);
        tracing::warn!(
            resource = self.path.rsplit('/').next().unwrap_or_default(),
            "the watch ended {lasted:.1?} after it was sent, without an event; watching again \
             in {delay:.1?}"
        );
        Some(delay)
    }
}

/// A response body that holds its end back after a very short watch ([`ShortWatchBackoff`]).
struct WatchBody<B: hyper::body::Body> {
    inner: B,
    /// While a watch's body has not ended.
    tracker: Option<WatchTracker>,
    /// The body's last item (its end or error), until the sleep is over.
    held: Option<HeldEnd<B>>,
}

type HeldEnd<B> = (
    std::pin::Pin<Box<tokio::time::Sleep>>,
    Option<
        Result<hyper::body::Frame<<B as hyper::body::Body>::Data>, <B as hyper::body::Body>::Error>,
    >,
);

// Nothing in it is ever pinned but `inner`, which is `Unpin`.
impl<B: hyper::body::Body + Unpin> Unpin for WatchBody<B> {}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for WatchBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        use hyper::body::Buf as _;
        use std::{future::Future as _, task::Poll};
        let this = self.get_mut();
        if let Some((sleep, _)) = &mut this.held {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(this.held.take().and_then(|(_, end)| end));
        }
        let item = match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(item) => item,
            Poll::Pending => return Poll::Pending,
        };
        if let Some(Ok(frame)) = &item {
            if let (Some(tracker), Some(data)) = (&mut this.tracker, frame.data_ref()) {
                tracker.data |= data.has_remaining();
            }
            return Poll::Ready(item);
        }
        if let Some(delay) = this.tracker.take().and_then(WatchTracker::finish) {
            let mut sleep = Box::pin(tokio::time::sleep(delay));
            if sleep.as_mut().poll(cx).is_pending() {
                this.held = Some((sleep, item));
                return Poll::Pending;
            }
        }
        Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        // A tracked body is polled to its end, so the end can be held back.
        self.tracker.is_none() && self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.tracker.is_some() || self.held.is_some() {
            return hyper::body::SizeHint::default();
        }
        self.inner.size_hint()
    }
}

fn object_name<K: kube::Resource>(object: &K) -> String {
    match object.namespace() {
        Some(namespace) => format!("{namespace}/{}", object.name_any()),
        None => object.name_any(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_reflectors_watch_exactly_the_watched_resources() {
        // A client for an address nothing listens on: starting reflectors sends nothing that
        // must succeed, and the tasks are aborted on drop.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let (changed, _rx) = mpsc::channel(1);
        let source = ApiSource::start(client, changed);
        assert_eq!(source.watched(), WATCHED_RESOURCES);
        let plurals: Vec<&str> = source.watched().iter().map(|r| r.plural).collect();
        assert_eq!(
            plurals,
            [
                "services",
                "endpointslices",
                "nodes",
                "pods",
                "namespaces",
                "networkpolicies"
            ]
        );
        // Nothing is synced from an unreachable server.
        assert_eq!(source.unsynced().len(), 6);
        assert!(source.objects().services.is_empty());
    }

    fn tracker(backoffs: &Backoffs, path: &str, ago: Duration) -> WatchTracker {
        WatchTracker {
            path: path.to_string(),
            sent: std::time::Instant::now() - ago,
            data: false,
            backoffs: Arc::clone(backoffs),
        }
    }

    #[test]
    fn very_short_watches_back_off_per_resource_and_a_watch_that_lasted_or_carried_data_resets() {
        let backoffs = Backoffs::default();
        let services = "/api/v1/services";
        let short = |path| tracker(&backoffs, path, Duration::ZERO).finish();
        let in_range = |d: Option<Duration>, ms: std::ops::Range<u64>| {
            d.is_some_and(|d| ms.contains(&(d.as_millis() as u64)))
        };
        let first = short(services);
        assert!(in_range(first, 800..1600), "{first:?}");
        let second = short(services);
        assert!(in_range(second, 1600..3200), "{second:?}");
        // Another resource has its own.
        let other = short("/api/v1/pods");
        assert!(in_range(other, 800..1600), "{other:?}");
        // A watch that carried data, or lasted, is no short watch and resets the backoff.
        let mut with_data = tracker(&backoffs, services, Duration::ZERO);
        with_data.data = true;
        assert_eq!(with_data.finish(), None);
        let after = short(services);
        assert!(in_range(after, 800..1600), "{after:?}");
        assert_eq!(tracker(&backoffs, services, SHORT_WATCH).finish(), None);
        let after = short(services);
        assert!(in_range(after, 800..1600), "{after:?}");
    }

    #[tokio::test]
    async fn the_end_of_a_very_short_watch_is_held_back_and_other_bodies_pass() {
        use http_body_util::BodyExt as _;
        let backoffs = Backoffs::default();
        let body = |inner: http_body_util::Full<hyper::body::Bytes>, watch: bool| WatchBody {
            inner,
            tracker: watch.then(|| tracker(&backoffs, "/api/v1/nodes", Duration::ZERO)),
            held: None,
        };
        let start = std::time::Instant::now();
        let empty = body(http_body_util::Full::default(), true);
        assert!(!hyper::body::Body::is_end_stream(&empty));
        empty.collect().await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(800),
            "{:?}",
            start.elapsed()
        );
        let start = std::time::Instant::now();
        let events = body(http_body_util::Full::new("{}\n".into()), true);
        assert_eq!(events.collect().await.unwrap().to_bytes(), "{}\n");
        let list = body(http_body_util::Full::default(), false);
        list.collect().await.unwrap();
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }
}
