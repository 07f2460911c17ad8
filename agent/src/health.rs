//! kube-proxy's HTTP health endpoints, answered the same way so load balancers and kubelet
//! probes written for kube-proxy work unchanged:
//!
//! * one server per `healthCheckNodePort` (LoadBalancer services with
//!   `externalTrafficPolicy: Local`): 200 while this node has a local endpoint of the service,
//!   503 when it has none, with kube-proxy's JSON body and `X-Load-Balancing-Endpoint-Weight`;
//! * the proxy's own `/healthz` and `/livez` (kube-proxy's `healthzBindAddress`, port 10256):
//!   200 once the datapath has been programmed and keeps being programmed, 503 otherwise:
//!   before the first sync, when programming has kept failing for the timeout, and when a
//!   change has waited longer than the timeout to be programmed (a stale datapath; kube-proxy's
//!   healthTimeout, twice the sync period).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{body::Bytes, Request, Response, StatusCode};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// What a service health check reports for one service on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// The response of a service health check, as kube-proxy writes it.
fn service_response(health: &ServiceHealth) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "service": {"namespace": health.namespace, "name": health.name},
        "localEndpoints": health.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if health.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = json_response(status, &body);
    response.headers_mut().insert(
        "X-Load-Balancing-Endpoint-Weight",
        health.local_endpoints.into(),
    );
    response
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("X-Content-Type-Options", "nosniff")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

/// Serves HTTP/1 on `listener` until the task is aborted, answering every request with
/// `respond(path)`.
fn spawn_server(
    listener: TcpListener,
    respond: impl Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> JoinHandle<()> {
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("health server accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let respond = Arc::clone(&respond);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let response = respond(request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                // A client that goes away mid-request is its own problem.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    })
}

/// The service health check servers, one per healthCheckNodePort, kept in sync with the
/// desired set. Counts change without restarting a server.
pub struct ServiceHealthServers {
    bind_ip: IpAddr,
    servers: BTreeMap<u16, (watch::Sender<ServiceHealth>, JoinHandle<()>)>,
}

impl ServiceHealthServers {
    pub fn new(bind_ip: IpAddr) -> Self {
        ServiceHealthServers {
            bind_ip,
            servers: BTreeMap::new(),
        }
    }

    /// Starts, updates and stops servers so exactly `desired` is served. A port that cannot
    /// be bound (in use, privileged) is reported and retried at the next sync; the others
    /// keep working.
    pub async fn sync(&mut self, desired: &BTreeMap<u16, ServiceHealth>) -> Vec<(u16, String)> {
        self.servers.retain(|port, (_, task)| {
            let keep = desired.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut errors = Vec::new();
        for (&port, health) in desired {
            if let Some((sender, _)) = self.servers.get(&port) {
                sender.send_if_modified(|current| {
                    let changed = current != health;
                    *current = health.clone();
                    changed
                });
                continue;
            }
            let address = SocketAddr::new(self.bind_ip, port);
            match TcpListener::bind(address).await {
                Ok(listener) => {
                    let (sender, receiver) = watch::channel(health.clone());
                    let task =
                        spawn_server(listener, move |_path| service_response(&receiver.borrow()));
                    self.servers.insert(port, (sender, task));
                }
                Err(e) => errors.push((
                    port,
                    format!(
                        "health check of {}/{} on {address}: {e}",
                        health.namespace, health.name
                    ),
                )),
            }
        }
        errors
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers.keys().copied()
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        for (_, task) in self.servers.values() {
            task.abort();
        }
    }
}

/// How the datapath programming is going, for `/healthz` and `/livez`.
#[derive(Debug)]
pub struct ProxyHealth {
    /// How long programming may keep failing before the proxy reports itself unhealthy.
    timeout: Duration,
    state: Mutex<ProxyState>,
}

#[derive(Debug, Default)]
struct ProxyState {
    last_synced: Option<(SystemTime, Instant)>,
    failing_since: Option<Instant>,
    /// When the oldest change not yet programmed arrived (kube-proxy's oldestPendingQueued).
    queued_since: Option<Instant>,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        ProxyHealth {
            timeout,
            state: Mutex::default(),
        }
    }

    /// A change arrived that the datapath does not hold yet. Called where changes are
    /// noticed (the manifest watcher's thread, the API source's notifications), not by the
    /// loop that programs them: a loop that is stuck cannot report itself.
    pub fn queued(&self) {
        let mut state = self.state.lock().expect("health state lock");
        state.queued_since.get_or_insert_with(Instant::now);
    }

    /// The datapath now holds the desired state as read from a load that began at `began`:
    /// changes queued since are still pending.
    pub fn synced(&self, began: Instant) {
        let mut state = self.state.lock().expect("health state lock");
        state.last_synced = Some((SystemTime::now(), Instant::now()));
        state.failing_since = None;
        if state.queued_since.is_some_and(|queued| queued <= began) {
            state.queued_since = None;
        }
    }

    /// Programming failed (partly); healthy until it keeps failing for the timeout.
    pub fn failed(&self) {
        let mut state = self.state.lock().expect("health state lock");
        state.failing_since.get_or_insert_with(Instant::now);
    }

    fn response(&self) -> Response<Full<Bytes>> {
        let state = self.state.lock().expect("health state lock");
        // kube-proxy's rule: unhealthy once a change has waited longer than the timeout to
        // be programmed, or programming has kept failing that long.
        let healthy = state.last_synced.is_some()
            && state
                .failing_since
                .is_none_or(|since| since.elapsed() < self.timeout)
            && state
                .queued_since
                .is_none_or(|since| since.elapsed() < self.timeout);
        let last_updated = state
            .last_synced
            .map(|(wall, _)| humantime::format_rfc3339_nanos(wall).to_string())
            .unwrap_or_default();
        let body = serde_json::json!({
            "lastUpdated": last_updated,
            "currentTime": humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            "nodeEligible": true,
        });
        let status = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(status, &body)
    }
}

/// Serves `/healthz` and `/livez` (404 elsewhere) on `address`.
pub async fn serve_proxy_health(
    address: SocketAddr,
    health: Arc<ProxyHealth>,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the health server to {address}"))?;
    Ok(spawn_server(listener, move |path| match path {
        "/healthz" | "/livez" => health.response(),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        ),
    }))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A raw HTTP/1.0 GET, so the test checks the bytes a load balancer would see.
    async fn get(address: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .unwrap()
            .unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_string(), body.to_string())
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn service_health_follows_local_endpoints() {
        let port = free_port();
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut servers = ServiceHealthServers::new(Ipv4Addr::LOCALHOST.into());
        let health = |n| ServiceHealth {
            namespace: "ecommerce".into(),
            name: "frontend-lb".into(),
            local_endpoints: n,
        };
        let errors = servers.sync(&BTreeMap::from([(port, health(2))])).await;
        assert!(errors.is_empty(), "{errors:?}");
        let (status, head, body) = get(address, "/").await;
        assert_eq!(status, 200);
        // Header names are case-insensitive; hyper writes them in lower case.
        assert!(
            head.to_ascii_lowercase()
                .contains("x-load-balancing-endpoint-weight: 2"),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "ecommerce", "name": "frontend-lb"},
                               "localEndpoints": 2, "serviceProxyHealthy": true})
        );

        // The last local endpoint goes: 503, same server.
        servers.sync(&BTreeMap::from([(port, health(0))])).await;
        let (status, _, body) = get(address, "/").await;
        assert_eq!(status, 503);
        assert!(body.contains("\"localEndpoints\":0"), "{body}");

        // The service goes: the port is closed.
        servers.sync(&BTreeMap::new()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(address).await.is_err());
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_and_the_others_still_serve() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let free = free_port();
        let mut servers = ServiceHealthServers::new(Ipv4Addr::LOCALHOST.into());
        let health = ServiceHealth {
            namespace: "a".into(),
            name: "b".into(),
            local_endpoints: 1,
        };
        let errors = servers
            .sync(&BTreeMap::from([
                (taken_port, health.clone()),
                (free, health),
            ]))
            .await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].1.contains("health check of a/b"), "{errors:?}");
        let (status, _, _) = get(SocketAddr::from((Ipv4Addr::LOCALHOST, free)), "/").await;
        assert_eq!(status, 200);
        assert_eq!(servers.ports().collect::<Vec<_>>(), vec![free]);
    }

    #[tokio::test]
    async fn proxy_healthz_reports_programming() {
        let health = Arc::new(ProxyHealth::new(Duration::from_millis(200)));
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let _server = serve_proxy_health(address, Arc::clone(&health))
            .await
            .unwrap();

        // Not programmed yet.
        assert_eq!(get(address, "/healthz").await.0, 503);
        health.synced(Instant::now());
        let (status, _, body) = get(address, "/healthz").await;
        assert_eq!(status, 200);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["nodeEligible"], true);
        assert!(
            body["lastUpdated"].as_str().unwrap().ends_with('Z'),
            "{body}"
        );
        assert_eq!(get(address, "/livez").await.0, 200);
        assert_eq!(get(address, "/other").await.0, 404);

        // Failing briefly is tolerated, failing for longer than the timeout is not.
        health.failed();
        assert_eq!(get(address, "/healthz").await.0, 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(get(address, "/healthz").await.0, 503);
        health.synced(Instant::now());
        assert_eq!(get(address, "/healthz").await.0, 200);

        // A change waits to be programmed: healthy for the timeout, then stale (503) until a
        // load that began after it is programmed; one that began before it does not count.
        let before = Instant::now();
        health.queued();
        assert_eq!(get(address, "/healthz").await.0, 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(get(address, "/healthz").await.0, 503);
        assert_eq!(get(address, "/livez").await.0, 503);
        health.synced(before);
        assert_eq!(get(address, "/healthz").await.0, 503);
        health.synced(Instant::now());
        assert_eq!(get(address, "/healthz").await.0, 200);
        // Queued again and taken in quickly: never unhealthy.
        health.queued();
        health.synced(Instant::now());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(get(address, "/healthz").await.0, 200);
    }
}
