//! Fault injection for `sluice agent`'s API source: while a client pod keeps requesting an
//! existing Service, the test API server goes through one fault after another: (1) every
//! watch cut in the middle of an event, (2) 500s on every watch, (3) a 410 Gone event and
//! 500s on the relist it forces, (4) an HTTP 410 after changes only a relist sees, (5) lists
//! and watches delayed by seconds, (6) watches that end right after they start. Every request
//! through the existing Service must succeed all along (checked in every phase); the changes
//! made at the server during each fault (a new Service, a Service deleted, an endpoint
//! removed) must not show while the fault holds them back and must reach the datapath within
//! a bound once it ends (or while it lasts, where it only slows things); a change made after
//! that must arrive at once, and every one of the six watches must deliver again (the
//! watches are live, not waiting for a resync: the agent runs with a one-hour
//! `--resync-interval`); a cut watch resumes without a relist; and while the server answers
//! 500s or ends watches at once, the agent must back off (a few requests per resource, not a
//! tight loop) and log each failed attempt once, naming the resource.
//!
//! Layout: a two-node cluster, the client pod on node 1 (whose agent does the DNAT), the
//! backends `web-a`, `web-b`, `web-c` on node 2 (its agent is not started: node 1's is the
//! one that matters).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use sluice_testbed::{
    apiserver::{Gone, RequestRecord, Requests},
    client, retry_until,
    sluice::SluiceCluster,
    Pod,
};

/// Each request's timeout.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Far longer than the test: what reaches the datapath came through a list or a watch.
const NO_RESYNC: &[&str] = &["--resync-interval", "3600"];
/// How soon a change must reach the datapath through a live watch (it takes tens of
/// milliseconds; the margin is for a loaded machine, far below the hour-long resync).
const PROPAGATION: Duration = Duration::from_secs(5);
/// How soon the changes made during a fault must reach the datapath once it ends, and every
/// resource must be listed or watched again: the agent's next attempt comes after its
/// backoff (0.8 s doubling to 30 s, each jittered up to twice that, kept over errors of the
/// last two minutes).
const CONVERGENCE: Duration = Duration::from_secs(65);
/// How long the server answers 500s in each error phase.
const ERROR_WINDOW: Duration = Duration::from_secs(8);
/// The most requests one resource may make while the server answers 500s for
/// [`ERROR_WINDOW`]: exponential backoff from 0.8 s tries at 0, 0.8, 2.4 and 5.6 s at the
/// earliest (the next at 12 s); a fixed 0.8 to 1.6 s retry makes five or more.
const MAX_ATTEMPTS_IN_WINDOW: usize = 4;
/// The slow-response phase's delay.
const DELAY: Duration = Duration::from_secs(3);
/// The traffic loop's pace (one request per interval at most) and bounds.
const PACE: Duration = Duration::from_millis(10);
const TRAFFIC_MAX_TIME: Duration = Duration::from_secs(400);
const TRAFFIC_MAX_REQUESTS: usize = 40_000;

/// The Service the client keeps requesting.
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 70, 10);
/// Every resource the agent watches, by path.
const PATHS: [&str; 6] = [
    "/api/v1/services",
    "/apis/discovery.k8s.io/v1/endpointslices",
    "/api/v1/nodes",
    "/api/v1/pods",
    "/api/v1/namespaces",
    "/apis/networking.k8s.io/v1/networkpolicies",
];
const SERVICES: &str = PATHS[0];
const SLICES: &str = PATHS[1];

/// A Service `name` on `vip`:80 and its EndpointSlice `<name>-abc` with `pods` (ready, on
/// node 2, port 8080).
fn service(name: &str, vip: Ipv4Addr, pods: &[&Pod]) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Service\n\
         metadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n\
         ---\n{}",
        slice(name, pods)
    )
}

fn slice(name: &str, pods: &[&Pod]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|pod| {
            format!(
                "- {{addresses: [\"{}\"], nodeName: node-2, conditions: {{ready: true}}}}\n",
                pod.ip()
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\n\
         kind: EndpointSlice\n\
         metadata:\n  name: {name}-abc\n  namespace: shop\n  \
         labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\n\
         endpoints:\n{endpoints}\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    )
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name().to_string()).collect()
}

/// Who answered `n` requests to `vip`:80; an error if any failed.
fn answered_by(client: &Pod, vip: Ipv4Addr, n: usize) -> anyhow::Result<BTreeSet<String>> {
    let dst = SocketAddrV4::new(vip, 80);
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let reply = client
            .tcp_request_any(dst, TIMEOUT)
            .map_err(|e| anyhow::anyhow!("a request to {dst} failed: {e}"))?;
        seen.insert(reply.text);
    }
    Ok(seen)
}

struct Bed {
    cluster: SluiceCluster,
    client: Pod,
    web_a: Pod,
    web_b: Pod,
    web_c: Pod,
}

/// The changes one phase makes at the server, on Services of its own (number `k`): `new-k`
/// is created (backend `web-c`), `old-k` (created at setup, backend `web-c`) is deleted with
/// its slice, and `web-b` is removed from `pair-k` (created at setup with `web-a`, `web-b`).
#[derive(Clone, Copy)]
struct Changes {
    k: u8,
}

impl Changes {
    fn new_vip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, 71, self.k)
    }
    fn old_vip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, 72, self.k)
    }
    fn pair_vip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, 73, self.k)
    }

    /// The Services the setup creates for this phase.
    fn initial(self, bed: &Bed) -> String {
        format!(
            "{}---\n{}",
            service(&format!("old-{}", self.k), self.old_vip(), &[&bed.web_c]),
            service(
                &format!("pair-{}", self.k),
                self.pair_vip(),
                &[&bed.web_a, &bed.web_b]
            )
        )
    }

    fn make(self, bed: &Bed) {
        let api = bed.cluster.api();
        let k = self.k;
        api.apply(&service(&format!("new-{k}"), self.new_vip(), &[&bed.web_c]))
            .unwrap();
        api.delete("v1", "Service", "shop", &format!("old-{k}"))
            .unwrap();
        api.delete(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "shop",
            &format!("old-{k}-abc"),
        )
        .unwrap();
        api.apply(&slice(&format!("pair-{k}"), &[&bed.web_a]))
            .unwrap();
    }

    /// Whether every change is in the datapath.
    fn arrived(self, bed: &Bed) -> anyhow::Result<()> {
        let new = answered_by(&bed.client, self.new_vip(), 3)?;
        anyhow::ensure!(
            new == names(&[&bed.web_c]),
            "new-{} answered by {new:?}",
            self.k
        );
        let dst = SocketAddrV4::new(self.old_vip(), 80);
        if let Ok(reply) = bed.client.tcp_request_any(dst, Duration::from_millis(500)) {
            anyhow::bail!("the deleted old-{} still answers: {reply:?}", self.k);
        }
        let pair = answered_by(&bed.client, self.pair_vip(), 12)?;
        anyhow::ensure!(
            pair == names(&[&bed.web_a]),
            "pair-{} answered by {pair:?}",
            self.k
        );
        Ok(())
    }

    /// Asserts that none of the changes is in the datapath (the fault holds them back).
    fn assert_none_arrived(self, bed: &Bed) {
        let k = self.k;
        let dst = SocketAddrV4::new(self.new_vip(), 80);
        let new = bed.client.tcp_request_any(dst, Duration::from_millis(500));
        assert!(new.is_err(), "new-{k} answers during the fault: {new:?}");
        assert_eq!(
            answered_by(&bed.client, self.old_vip(), 3).unwrap(),
            names(&[&bed.web_c]),
            "old-{k}"
        );
        assert_eq!(
            answered_by(&bed.client, self.pair_vip(), 20).unwrap(),
            names(&[&bed.web_a, &bed.web_b]),
            "pair-{k}"
        );
    }

    /// Waits for every change to reach the datapath; how long it took.
    fn wait_arrived(self, bed: &Bed, within: Duration, after: &str) -> Duration {
        let start = Instant::now();
        retry_until(within, Duration::from_millis(50), || self.arrived(bed))
            .unwrap_or_else(|e| panic!("phase {}: {after}: {e:#}", self.k));
        start.elapsed()
    }

    /// Makes the phase's changes while a fault is on, holds the fault for `hold`, and asserts
    /// the traffic never failed and none of the changes arrived meanwhile.
    fn make_during_fault(self, bed: &Bed, traffic: &Traffic, hold: Duration) {
        self.make(bed);
        std::thread::sleep(hold);
        traffic.assert_no_failures(&format!("phase {}, the fault on", self.k));
        self.assert_none_arrived(bed);
    }

    /// After the fault: a later change arrives within [`PROPAGATION`], every watch is live,
    /// and the traffic never failed. (How long the first two took.)
    fn assert_live_again(self, bed: &mut Bed, traffic: &Traffic) -> (Duration, Duration) {
        let live = self.assert_watching(bed, PROPAGATION);
        let all = assert_all_watching(bed, self.k);
        traffic.assert_no_failures(&format!("phase {}", self.k));
        (live, all)
    }

    /// Puts `web-b` back into `pair-k` and asserts it serves again `within`: the watches are
    /// live after the fault.
    fn assert_watching(self, bed: &Bed, within: Duration) -> Duration {
        let k = self.k;
        bed.cluster
            .api()
            .apply(&slice(&format!("pair-{k}"), &[&bed.web_a, &bed.web_b]))
            .unwrap();
        let start = Instant::now();
        let expected = names(&[&bed.web_a, &bed.web_b]);
        retry_until(within, Duration::from_millis(50), || {
            let seen = answered_by(&bed.client, self.pair_vip(), 20)?;
            anyhow::ensure!(seen == expected, "pair-{k} answered by {seen:?}");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("phase {k}: a change after the fault: {e:#}"));
        start.elapsed()
    }
}

/// What the traffic loop saw in one phase.
#[derive(Debug, Default, Clone)]
struct PhaseTraffic {
    ok: usize,
    answered_by: BTreeSet<String>,
    failures: Vec<String>,
}

/// The client pod requesting the web Service back to back (one request per [`PACE`] at
/// most) until stopped, at most [`TRAFFIC_MAX_TIME`] and [`TRAFFIC_MAX_REQUESTS`]; each
/// outcome is filed under the phase current when it was sent.
struct Traffic {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<PhaseTraffic>>>,
    /// Whether the loop ran until stopped (not into its bounds).
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Traffic {
    fn start(client: &Pod, phases: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(vec![PhaseTraffic::default(); phases]));
        let (client, stop_flag, current, record) = (
            client.clone(),
            Arc::clone(&stop),
            Arc::clone(&phase),
            Arc::clone(&seen),
        );
        let thread = std::thread::spawn(move || {
            let dst = SocketAddrV4::new(WEB_VIP, 80);
            client
                .run(|| {
                    let start = Instant::now();
                    let mut sent = 0;
                    while !stop_flag.load(Ordering::Relaxed) {
                        if start.elapsed() > TRAFFIC_MAX_TIME || sent >= TRAFFIC_MAX_REQUESTS {
                            return false;
                        }
                        let phase = current.load(Ordering::Relaxed);
                        let sent_at = Instant::now();
                        let outcome = client::tcp_request(dst, TIMEOUT);
                        let mut seen = record.lock().unwrap_or_else(|e| e.into_inner());
                        let phase = &mut seen[phase];
                        match outcome {
                            Ok(reply) if reply.peer == dst => {
                                phase.ok += 1;
                                phase.answered_by.insert(reply.text);
                            }
                            Ok(reply) => phase
                                .failures
                                .push(format!("a reply from the wrong peer: {reply:?}")),
                            Err(e) => phase
                                .failures
                                .push(format!("{:.3}s: {e:#}", start.elapsed().as_secs_f64())),
                        }
                        drop(seen);
                        sent += 1;
                        std::thread::sleep(PACE.saturating_sub(sent_at.elapsed()));
                    }
                    true
                })
                .expect("entering the client's netns")
        });
        Traffic {
            stop,
            phase,
            seen,
            thread: Some(thread),
        }
    }

    fn phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    /// Asserts that no request has failed so far (`when`: where the test is).
    fn assert_no_failures(&self, when: &str) {
        let failures: BTreeMap<usize, Vec<String>> = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.failures.is_empty())
            .map(|(phase, t)| (phase, t.failures.clone()))
            .collect();
        assert!(
            failures.is_empty(),
            "{when}: requests to the existing Service failed (by phase): {failures:#?}"
        );
    }

    /// Stops the loop; what each phase saw, and whether the loop ran until stopped.
    fn finish(mut self) -> (Vec<PhaseTraffic>, bool) {
        self.stop.store(true, Ordering::Relaxed);
        let ran_until_stopped = self
            .thread
            .take()
            .expect("finished once")
            .join()
            .expect("the traffic loop panicked");
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (seen, ran_until_stopped)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The requests of `path` answered `status` since `since`.
fn answered_with(
    requests: &[RequestRecord],
    path: &str,
    status: u16,
    since: Instant,
) -> Vec<Instant> {
    requests
        .iter()
        .filter(|r| r.path == path && r.status == status && r.at >= since)
        .map(|r| r.at)
        .collect()
}

/// The seconds between consecutive `times`, "1.2/2.5/…" (the first 8).
fn gaps(times: &[Instant]) -> String {
    let gaps: Vec<String> = times
        .windows(2)
        .map(|w| format!("{:.1}", (w[1] - w[0]).as_secs_f64()))
        .collect();
    match gaps.len() {
        0..=8 => gaps.join("/"),
        n => format!("{}/… ({n} gaps)", gaps[..8].join("/")),
    }
}

/// The agent's log from byte `from` on.
fn log_since(bed: &mut Bed, from: usize) -> String {
    let log = bed.cluster.agent_mut(1).unwrap().log();
    log.get(from..).unwrap_or_default().to_string()
}

fn log_len(bed: &mut Bed) -> usize {
    bed.cluster.agent_mut(1).unwrap().log().len()
}

/// The agent's warnings about `resource` (its plural) in `log`.
fn warnings_about(log: &str, resource: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" WARN ") && l.contains(&format!("resource=\"{resource}\"")))
        .map(str::to_string)
        .collect()
}

/// While the server answers 500s (to lists or watches, `what`) since `since`: every resource
/// was retried, with backoff (at most [`MAX_ATTEMPTS_IN_WINDOW`] requests), and the 500s are
/// in the log, naming the resource, with at most one warning per failed request (the agent
/// warns once per failed attempt, each saying when it retries: no flood beyond the backoff).
/// Returns a summary line.
fn assert_backs_off(bed: &mut Bed, what: &str, since: Instant, log_from: usize) -> String {
    let requests = bed.cluster.api().requests();
    let log = log_since(bed, log_from);
    let mut summary = Vec::new();
    for path in PATHS {
        let failed = answered_with(&requests, path, 500, since);
        let resource = path.rsplit('/').next().unwrap();
        let gaps = gaps(&failed);
        // The backoff starts afresh in each phase ([`assert_all_watching`]): the second
        // attempt comes 0.8 to 1.6 s after the first, the third 1.6 to 3.2 s later.
        assert!(
            failed.len() >= 2,
            "{what}: {resource} was not retried during {ERROR_WINDOW:?} of 500s: {} attempt(s)",
            failed.len()
        );
        assert!(
            failed.len() <= MAX_ATTEMPTS_IN_WINDOW,
            "{what}: {resource} made {} requests in {ERROR_WINDOW:?} of 500s (gaps {gaps} s): \
             no backoff",
            failed.len()
        );
        let warnings: Vec<String> = warnings_about(&log, resource)
            .into_iter()
            .filter(|w| w.contains("code: 500"))
            .collect();
        assert!(
            !warnings.is_empty(),
            "{what}: the 500s of {resource} are not in the log:\n{log}"
        );
        assert!(
            warnings.len() <= failed.len(),
            "{what}: {} warnings about the 500s of {resource} for {} failed requests:\n{}",
            warnings.len(),
            failed.len(),
            warnings.join("\n")
        );
        summary.push(format!(
            "{resource}: {} requests (gaps {}), {} warnings",
            failed.len(),
            gaps,
            warnings.len()
        ));
    }
    summary.join("; ")
}

/// Changes one object of every watched kind (none that changes what is served) and waits
/// until the agent has each change: seen through its watch (its debug log's "API change"),
/// or in a list the server answered after the change (a reflector still relisting),
/// within [`CONVERGENCE`]: no reflector gave up. An event also resets the agent's backoff
/// for that resource, so the next phase starts from the same place whatever this one did.
/// `n` makes each touch a change. Returns how long it took.
fn assert_all_watching(bed: &mut Bed, n: u8) -> Duration {
    let log_from = log_len(bed);
    let start = Instant::now();
    let api = bed.cluster.api();
    api.apply(&service("web", WEB_VIP, &[&bed.web_a, &bed.web_b]))
        .unwrap();
    api.apply(&bed.cluster.cluster.node_manifests()).unwrap();
    api.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{touched: \"{n}\"}}}}\n\
         ---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: touch-{n}, namespace: touch}}\n\
         spec: {{containers: [{{name: c, image: none}}]}}\n\
         ---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: touch-{n}, namespace: touch}}\n\
         spec: {{podSelector: {{matchLabels: {{touch: none}}}}, policyTypes: [Ingress]}}\n"
    ))
    .unwrap();
    let touched = Instant::now();
    let log_path = bed.cluster.agent_mut(1).unwrap().log_path().to_path_buf();
    retry_until(CONVERGENCE, Duration::from_millis(50), || {
        let log = String::from_utf8_lossy(&std::fs::read(&log_path)?).into_owned();
        let log = log.get(log_from..).unwrap_or_default();
        let requests = bed.cluster.api().requests();
        let unseen: Vec<&str> = PATHS
            .iter()
            .filter(|path| {
                let resource = format!("resource=\"{}\"", path.rsplit('/').next().unwrap());
                let logged = |what: &str| {
                    log.lines()
                        .any(|l| l.contains(what) && l.contains(&resource))
                };
                let listed_after = requests
                    .iter()
                    .any(|r| r.path == **path && !r.watch && r.status == 200 && r.at >= touched);
                !(logged("API change") || listed_after && logged("list complete"))
            })
            .copied()
            .collect();
        anyhow::ensure!(unseen.is_empty(), "no change seen for {unseen:?}");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("after phase {n}: {e:#}"));
    start.elapsed()
}

/// How many lists of each of [`PATHS`] the server has answered.
fn lists(bed: &Bed) -> Vec<usize> {
    PATHS
        .iter()
        .map(|p| bed.cluster.api().lists_of(p))
        .collect()
}

fn setup() -> Bed {
    let cluster = SluiceCluster::with_api_server("api-faults", 2).unwrap();
    let client = cluster
        .node(1)
        .add_pod("client", cluster.node(1).pod_ip(10))
        .unwrap();
    let web = |name: &str, n: u8| {
        let pod = cluster
            .node(2)
            .add_pod(name, cluster.node(2).pod_ip(n))
            .unwrap();
        pod.serve(&[8080]).unwrap();
        pod
    };
    let (web_a, web_b, web_c) = (web("web-a", 21), web("web-b", 22), web("web-c", 23));
    Bed {
        cluster,
        client,
        web_a,
        web_b,
        web_c,
    }
}

#[test]
fn traffic_never_stops_and_the_datapath_converges_through_api_server_faults() {
    let test_start = Instant::now();
    let mut bed = setup();
    let phases: Vec<Changes> = (1..=6).map(|k| Changes { k }).collect();
    bed.cluster
        .api()
        .apply(&service("web", WEB_VIP, &[&bed.web_a, &bed.web_b]))
        .unwrap();
    for changes in &phases {
        bed.cluster.api().apply(&changes.initial(&bed)).unwrap();
    }
    bed.cluster.start_agent(1, NO_RESYNC).unwrap();
    let web = names(&[&bed.web_a, &bed.web_b]);
    retry_until(PROPAGATION, Duration::from_millis(50), || {
        let seen = answered_by(&bed.client, WEB_VIP, 20)?;
        anyhow::ensure!(seen == web, "web answered by {seen:?}");
        Ok(())
    })
    .unwrap();
    for changes in &phases {
        changes.assert_none_arrived(&bed);
    }
    eprintln!("set up in {:.1?}", test_start.elapsed());

    // Phase 0 is the steady state before any fault; phase k is fault k.
    let traffic = Traffic::start(&bed.client, phases.len() + 1);
    std::thread::sleep(Duration::from_secs(1));
    let mut report = Vec::new();

    // 1. Watches cut in the middle of an event after every event they deliver: each change
    //    costs the agent a reconnect, resumed from its last version (no relist).
    let p = phases[0];
    traffic.phase(1);
    let lists_before = lists(&bed);
    bed.cluster.api().cut_watches_after(1);
    p.make(&bed);
    let took = p.wait_arrived(&bed, CONVERGENCE, "watches cut mid-event");
    let cut = bed.cluster.api().watches_cut();
    bed.cluster.api().heal();
    // Services: 2 events (one cut), slices: 3 (two cuts).
    assert!(cut >= 3, "only {cut} watches were cut");
    let lists_after = lists(&bed);
    assert_eq!(
        lists_after, lists_before,
        "a cut watch was relisted, not resumed"
    );
    let (live, all) = p.assert_live_again(&mut bed, &traffic);
    report.push(format!(
        "1 watch cut mid-event: {cut} cuts, converged in {took:.1?} during the fault, \
         no relist; a later change in {live:.1?}, every watch live in {all:.1?}"
    ));

    // 2. 500s on every watch: the open watches are cut, and every re-watch is answered 500
    //    for ERROR_WINDOW. Changes made meanwhile cannot arrive; the agent must back off,
    //    then resume its watches (from its last version: no relist) once the 500s stop.
    let p = phases[1];
    traffic.phase(2);
    let log_from = log_len(&mut bed);
    let lists_before = lists(&bed);
    let since = Instant::now();
    bed.cluster.api().fail(500, Requests::Watches);
    bed.cluster.api().drop_connections();
    p.make_during_fault(&bed, &traffic, ERROR_WINDOW);
    bed.cluster.api().heal();
    let healed = Instant::now();
    let backoff = assert_backs_off(&mut bed, "500s on watches", since, log_from);
    p.wait_arrived(&bed, CONVERGENCE, "500s on watches ended");
    let since_heal = healed.elapsed();
    let lists_after = lists(&bed);
    assert_eq!(
        lists_after, lists_before,
        "a watch that failed with 500 was relisted"
    );
    let (live, all) = p.assert_live_again(&mut bed, &traffic);
    report.push(format!(
        "2 500s on watches for {ERROR_WINDOW:?}: {backoff}; converged {since_heal:.1?} after \
         the heal; a later change in {live:.1?}, every watch live in {all:.1?}"
    ));

    // 3. A 410 Gone event on every watch while lists are answered 500: the relist fails for
    //    ERROR_WINDOW. The stores (and the datapath) must keep what they had until a list
    //    succeeds, and the relists must back off.
    let p = phases[2];
    traffic.phase(3);
    let log_from = log_len(&mut bed);
    let since = Instant::now();
    bed.cluster.api().fail(500, Requests::All);
    bed.cluster.api().expire(Gone::Event);
    p.make_during_fault(&bed, &traffic, ERROR_WINDOW);
    bed.cluster.api().heal();
    let healed = Instant::now();
    let backoff = assert_backs_off(&mut bed, "500s on the relist", since, log_from);
    p.wait_arrived(&bed, CONVERGENCE, "500s on the relist ended");
    let since_heal = healed.elapsed();
    let (live, all) = p.assert_live_again(&mut bed, &traffic);
    report.push(format!(
        "3 410 event, then 500s on the relist for {ERROR_WINDOW:?}: {backoff}; converged \
         {since_heal:.1?} after the heal; a later change in {live:.1?}, every watch live in \
         {all:.1?}"
    ));

    // 4. 410 Gone as HTTP: the watches stop delivering, the changes are made (a deletion
    //    among them: only a relist can see it), then the history is compacted and every
    //    re-watch is refused with 410. The relist must bring every change.
    let p = phases[3];
    traffic.phase(4);
    let since = Instant::now();
    let lists_before = bed.cluster.api().lists_of(SLICES);
    bed.cluster.api().freeze_watches();
    p.make_during_fault(&bed, &traffic, Duration::from_secs(1));
    bed.cluster.api().expire(Gone::Http);
    let took = p.wait_arrived(&bed, CONVERGENCE, "a 410 Gone");
    let requests = bed.cluster.api().requests();
    for path in [SERVICES, SLICES] {
        assert!(
            requests
                .iter()
                .any(|r| r.path == path && r.watch && r.status == 410 && r.at >= since),
            "no watch of {path} was answered 410"
        );
    }
    assert!(
        bed.cluster.api().lists_of(SLICES) > lists_before,
        "no relist"
    );
    let (live, all) = p.assert_live_again(&mut bed, &traffic);
    report.push(format!(
        "4 410 Gone (HTTP) after changes made behind frozen watches: converged in {took:.1?}; \
         a later change in {live:.1?}, every watch live in {all:.1?}"
    ));

    // 5. Slow responses: every list and watch start waits DELAY, and a 410 makes the agent
    //    relist through them (a slow 410, a slow list, a slow watch). The changes arrive
    //    while the delay lasts.
    let p = phases[4];
    traffic.phase(5);
    let lists_before = bed.cluster.api().lists_of(SLICES);
    bed.cluster.api().delay(DELAY, Requests::All);
    bed.cluster.api().expire(Gone::Http);
    p.make(&bed);
    let took = p.wait_arrived(&bed, CONVERGENCE, "slow responses");
    assert!(
        took >= DELAY,
        "the changes arrived in {took:?}, before the {DELAY:?} delay: not delayed"
    );
    assert!(
        bed.cluster.api().lists_of(SLICES) > lists_before,
        "no relist"
    );
    // The watches work through the delay (each new one starts DELAY after the list).
    let live = p.assert_watching(&bed, PROPAGATION + DELAY);
    bed.cluster.api().heal();
    let all = assert_all_watching(&mut bed, p.k);
    traffic.assert_no_failures(&format!("phase {}", p.k));
    report.push(format!(
        "5 {DELAY:?} delays on lists and watches, and a 410: converged in {took:.1?} during \
         the delay; a later change in {live:.1?}, every watch live in {all:.1?} after"
    ));

    // 6. Watches that end as soon as they start, before any event (a proxy or an API server
    //    with a far too short request timeout): the agent must not re-watch in a tight loop
    //    (it did: kube-rs re-watches at once when a stream ends), but back off as after an
    //    error, and resume once watches last again.
    let p = phases[5];
    traffic.phase(6);
    let log_from = log_len(&mut bed);
    let since = Instant::now();
    bed.cluster.api().end_watches_after(Duration::ZERO);
    p.make_during_fault(&bed, &traffic, ERROR_WINDOW);
    bed.cluster.api().heal();
    let requests = bed.cluster.api().requests();
    let log = log_since(&mut bed, log_from);
    let mut rewatches = Vec::new();
    for path in PATHS {
        let resource = path.rsplit('/').next().unwrap();
        let watches: Vec<Instant> = requests
            .iter()
            .filter(|r| r.path == path && r.watch && r.at >= since)
            .map(|r| r.at)
            .collect();
        let gaps = gaps(&watches);
        assert!(
            (2..=MAX_ATTEMPTS_IN_WINDOW).contains(&watches.len()),
            "watches ending at once: {resource} watched {} times in {ERROR_WINDOW:?} (gaps \
             {gaps} s); expected 2 to {MAX_ATTEMPTS_IN_WINDOW} (backoff)",
            watches.len()
        );
        let warnings: Vec<String> = warnings_about(&log, resource)
            .into_iter()
            .filter(|w| w.contains("without an event"))
            .collect();
        assert!(
            !warnings.is_empty() && warnings.len() <= watches.len(),
            "watches ending at once: {} warnings about {resource} for {} watches:\n{log}",
            warnings.len(),
            watches.len()
        );
        rewatches.push(format!(
            "{resource}: {} watches (gaps {}), {} warnings",
            watches.len(),
            gaps,
            warnings.len()
        ));
    }
    let healed = Instant::now();
    p.wait_arrived(&bed, CONVERGENCE, "watches ending at once");
    let since_heal = healed.elapsed();
    let (live, all) = p.assert_live_again(&mut bed, &traffic);
    report.push(format!(
        "6 watches ending at once for {ERROR_WINDOW:?}: {}; converged {since_heal:.1?} after \
         the heal; a later change in {live:.1?}, every watch live in {all:.1?}",
        rewatches.join("; ")
    ));

    // The end: nothing failed, and everything is as the server has it.
    std::thread::sleep(Duration::from_secs(1));
    traffic.assert_no_failures("at the end");
    let (traffic, ran_until_stopped) = traffic.finish();
    assert!(
        ran_until_stopped,
        "the traffic loop hit its bound before the test ended"
    );
    for (phase, seen) in traffic.iter().enumerate() {
        eprintln!(
            "phase {phase}: {} requests answered by {:?}, {} failed",
            seen.ok,
            seen.answered_by,
            seen.failures.len()
        );
    }
    for (phase, seen) in traffic.iter().enumerate() {
        assert!(seen.ok > 0, "no request in phase {phase}");
        assert_eq!(seen.answered_by, web, "phase {phase}");
    }
    for p in &phases {
        let left: anyhow::Result<()> = (|| {
            let new = answered_by(&bed.client, p.new_vip(), 3)?;
            anyhow::ensure!(new == names(&[&bed.web_c]), "new-{}: {new:?}", p.k);
            let gone = bed.client.tcp_request_any(
                SocketAddrV4::new(p.old_vip(), 80),
                Duration::from_millis(500),
            );
            anyhow::ensure!(gone.is_err(), "old-{}: {gone:?}", p.k);
            let pair = answered_by(&bed.client, p.pair_vip(), 20)?;
            anyhow::ensure!(pair == web, "pair-{}: {pair:?}", p.k);
            Ok(())
        })();
        left.unwrap();
    }
    assert!(bed.cluster.agent_mut(1).unwrap().is_running());
    for line in &report {
        eprintln!("{line}");
    }
    eprintln!("the whole test took {:.1?}", test_start.elapsed());
}

#[test]
fn the_test_api_server_injects_errors_delays_and_cut_watches() {
    use sluice_testbed::apiserver::{raw_get, ApiServer};
    let node = sluice_testbed::Node::new("api-faults-proto").unwrap();
    let mut api = ApiServer::new();
    let port = api.listen_in(node.netns_path()).unwrap();
    let quiet = Duration::from_millis(700);
    let get = |target: &str| raw_get(node.netns_path(), port, target, quiet).unwrap();
    let services = |n: u8| -> String {
        (0..n)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: shop}}\n\
                     spec: {{clusterIP: 10.96.80.{i}, ports: [{{port: 80}}]}}\n---\n"
                )
            })
            .collect()
    };
    api.apply(&services(1)).unwrap();
    let version = api.resource_version();
    let watch_from = |v: u64| format!("{SERVICES}?watch=true&resourceVersion={v}");

    // 500s: a Status as the kube-apiserver writes it, for the requests asked for only.
    api.fail(500, Requests::Lists);
    let list = get(SERVICES);
    assert_eq!(list.status, 500);
    let status = &list.documents[0];
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "InternalError");
    assert_eq!(status["code"], 500);
    assert!(status["message"]
        .as_str()
        .unwrap()
        .starts_with("Internal error occurred: "));
    assert!(status["details"]["causes"][0]["message"].is_string());
    assert_eq!(get(&watch_from(version)).status, 200);
    api.fail(500, Requests::All);
    assert_eq!(get(&watch_from(version)).status, 500);
    api.heal();
    assert_eq!(get(SERVICES).status, 200);
    let failed = api.requests().iter().filter(|r| r.status == 500).count();
    assert_eq!(failed, 2, "{:#?}", api.requests());

    // Delays: lists wait, watches do not.
    api.delay(Duration::from_secs(1), Requests::Lists);
    let slow = get(SERVICES);
    assert_eq!(slow.status, 200);
    assert!(slow.first_byte >= Duration::from_secs(1), "{slow:?}");
    let watch = get(&watch_from(version));
    assert!(watch.first_byte < Duration::from_millis(500), "{watch:?}");
    api.heal();
    assert!(get(SERVICES).first_byte < Duration::from_millis(500));

    // Cut after 2 events: the watch gets 2 and half of the third, then the connection ends;
    // a watch resumed from the last version it got has the third (and stays open).
    api.cut_watches_after(2);
    api.apply(&services(3)).unwrap(); // s0 modified, s1 and s2 added
    let cut = get(&watch_from(version));
    assert_eq!(cut.documents.len(), 2, "{cut:?}");
    assert!(cut.truncated && cut.ended, "{cut:?}");
    assert_eq!(api.watches_cut(), 1);
    let last = cut.documents[1]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let resumed = get(&watch_from(last.parse().unwrap()));
    assert_eq!(resumed.documents.len(), 1, "{resumed:?}");
    assert_eq!(resumed.documents[0]["object"]["metadata"]["name"], "s2");
    assert!(!resumed.truncated && !resumed.ended, "{resumed:?}");
    // A watch with no version starts with an ADDED per object: those count too.
    let initial = get(&format!("{SERVICES}?watch=true"));
    assert_eq!(initial.documents.len(), 2);
    assert!(initial.truncated);
    api.heal();
    let healed = get(&watch_from(version));
    assert_eq!(healed.documents.len(), 3);
    assert!(!healed.truncated && !healed.ended);
    assert_eq!(api.watches_cut(), 2);

    // Watches that end at once: an open one ends (cleanly), and a new one gets the head and
    // the closing chunk, no event though 3 wait.
    let current = api.resource_version();
    let open = std::thread::scope(|s| {
        let open = s.spawn(|| {
            let quiet = Duration::from_secs(5);
            raw_get(node.netns_path(), port, &watch_from(current), quiet).unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let set = Instant::now();
        api.end_watches_after(Duration::ZERO);
        (open.join().unwrap(), set.elapsed())
    });
    assert!(open.0.ended && !open.0.truncated && open.0.documents.is_empty());
    assert!(
        open.1 < Duration::from_secs(1),
        "the open watch ended {:?} after",
        open.1
    );
    let ended = get(&watch_from(version));
    assert_eq!(ended.status, 200);
    assert!(
        ended.documents.is_empty() && ended.ended && !ended.truncated,
        "{ended:?}"
    );
    api.heal();
    assert_eq!(get(&watch_from(version)).documents.len(), 3);
}
