//! `sluice agent`: keeps the node's datapath equal to what the Kubernetes objects describe,
//! read from a manifests directory or from the API server ([`Source`]).
//!
//! Three event sources drive one loop, so the datapath is only ever touched from one place:
//! object changes (inotify on the manifests directory, or the API reflectors' change
//! notifications), interface changes (rtnetlink notifications), and a periodic resync that
//! repairs anything missed: it also checks that every program is still attached and every pin
//! still names the agent's own map or link, and puts back what is not (datapath/repair.rs).
//! Every pass is a diff: an unchanged input writes nothing to the kernel.

use std::{
    collections::BTreeSet,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::sync::mpsc;

use crate::{
    datapath::{
        repair::{Level, RepairLog},
        Datapath, MapSizes,
    },
    health::{self, ProxyHealth, ServiceHealthServers},
    interfaces,
    kube_source::{self, ApiSource},
    manifests,
    node::{self, NodeContext, NodeOptions},
    policy,
    state::DesiredState,
    translate,
};

/// How long a reload waits for manifest files being parsed before it programs without them
/// (their previous objects stay in effect; a reload follows when they are done).
const PARSE_BUDGET: Duration = Duration::from_secs(1);

/// Where the agent's Kubernetes objects come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of manifests, watched with inotify (`--manifests`).
    Manifests(PathBuf),
    /// The API server: list/watch reflectors (the default).
    Api(kube_source::ApiOptions),
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: Source,
    pub node: NodeOptions,
    pub pin_path: PathBuf,
    /// Capacities of the services, backends and conntrack maps (`--max-services`,
    /// `--max-backends`, `--max-conntrack`).
    pub map_sizes: MapSizes,
    pub resync_interval: Duration,
    /// How often expired conntrack entries are deleted (`Datapath::collect_garbage`).
    pub conntrack_gc_interval: Duration,
    /// Where `/healthz` and `/livez` are served (kube-proxy's healthzBindAddress); `None`
    /// disables them.
    pub healthz_bind_address: Option<SocketAddr>,
    /// Where healthCheckNodePort servers listen (kube-proxy binds them on all addresses).
    pub health_check_bind_ip: IpAddr,
    /// The cgroup v2 whose processes of this network namespace get the socket programs
    /// (host traffic, `datapath::sock`); `None`: none attached (and an earlier agent's removed).
    pub cgroup_root: Option<PathBuf>,
}

/// Runs the agent until `shutdown` completes. The pinned datapath stays in place afterwards.
pub async fn run(
    mut config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    for line in crate::datapath::features::KernelFeatures::get().missing() {
        tracing::warn!("{line}");
    }
    let tc_attach = crate::datapath::TC_ATTACH_ENV;
    if std::env::var_os(tc_attach).is_some_and(|v| v == "netlink") {
        tracing::warn!(
            "{tc_attach}=netlink: programs are attached with a clsact qdisc and tc filters, as \
             on kernels before 6.6"
        );
    }
    let mut datapath =
        Datapath::load_with(&config.pin_path, &config.map_sizes).with_context(|| {
            format!(
                "loading the datapath pinned at {}",
                config.pin_path.display()
            )
        })?;
    let cgroup_root = config
        .cgroup_root
        .as_ref()
        .filter(|_| crate::datapath::features::KernelFeatures::get().netns_cookie);
    match cgroup_root {
        Some(cgroup) => {
            datapath.attach_cgroup(cgroup).with_context(|| {
                format!(
                    "attaching the socket programs (host traffic) to cgroup {}",
                    cgroup.display()
                )
            })?;
        }
        None => {
            datapath
                .detach_cgroup()
                .context("detaching an earlier agent's socket programs")?;
        }
    }

    match node::ephemeral_ports() {
        Ok(ports) => config.node.ephemeral_ports = Some(ports),
        Err(e) => tracing::warn!(
            "cannot read the node's ephemeral ports ({e:#}): masquerading uses all of \
             --masquerade-port-range, and may collide with connections of the node itself"
        ),
    }
    match node::describe_masquerade_ports(
        &config.node.masquerade_port_range,
        config.node.ephemeral_ports.as_ref(),
    ) {
        (line, true) => tracing::warn!("{line}"),
        (line, false) => tracing::info!("{line}"),
    }
    // kube-proxy's healthTimeout: twice its sync period.
    let proxy_health = Arc::new(ProxyHealth::new(config.resync_interval * 2));
    let _healthz = match config.healthz_bind_address {
        Some(address) => {
            Some(health::serve_proxy_health(address, Arc::clone(&proxy_health)).await?)
        }
        None => None,
    };
    tokio::pin!(shutdown);
    let (manifest_tx, mut manifest_rx) = mpsc::channel::<()>(1);
    let objects = match &config.source {
        Source::Manifests(dir) => {
            let parsed = {
                let (tx, health) = (manifest_tx.clone(), Arc::clone(&proxy_health));
                Arc::new(move || {
                    health.queued();
                    let _ = tx.try_send(());
                })
            };
            ObjectSource::Manifests {
                dir,
                // The first load waits for every file: ready means all of them programmed.
                cache: std::sync::Mutex::new(manifests::ManifestCache::with_budget(None, parsed)),
                _watcher: watch_manifests(dir, manifest_tx, Arc::clone(&proxy_health))?,
            }
        }
        Source::Api(options) => {
            let client = kube_source::client(options).await?;
            // Every change notification marks a change queued for /healthz, even while the
            // loop is busy, then wakes the loop.
            let (api_tx, mut api_rx) = mpsc::channel::<()>(1);
            let health = Arc::clone(&proxy_health);
            tokio::spawn(async move {
                while let Some(()) = api_rx.recv().await {
                    health.queued();
                    let _ = manifest_tx.try_send(());
                }
            });
            let api = ApiSource::start(client, api_tx);
            // Nothing is programmed from a partial view of the cluster.
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = api.wait_synced() => {}
            }
            tracing::info!("initial lists synced from the API server");
            ObjectSource::Api(api)
        }
    };
    let (iface_tx, mut iface_rx) = mpsc::channel::<()>(1);
    interfaces::watch(iface_tx)?;
    let netlink = interfaces::connect()?;

    let mut agent = Agent {
        config: &config,
        objects: &objects,
        datapath: &mut datapath,
        context: NodeContext::default(),
        translator: translate::Translator::default(),
        last_problems: Vec::new(),
        attached: BTreeSet::new(),
        external: BTreeSet::new(),
        health_checks: ServiceHealthServers::new(config.health_check_bind_ip),
        proxy_health: &proxy_health,
        repairs: RepairLog::default(),
    };
    agent.reload_manifests().await;
    objects.set_parse_budget(PARSE_BUDGET);
    agent.rescan_interfaces(&netlink).await;
    // Every pinned link runs this agent's programs now: maps resized at load get the entries
    // the previous programs added since.
    match agent.datapath.finish_map_resize() {
        Ok(stats) if stats.copied > 0 => {
            tracing::info!(entries = stats.copied, "map resize: copied late entries")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("map resize: {e:#}"),
    }
    // What the resync checks, checked once now: nothing should need repair yet.
    agent.verify_datapath();
    tracing::info!(
        source = %objects,
        pin_path = %config.pin_path.display(),
        "sluice agent ready"
    );

    let mut resync = tokio::time::interval(config.resync_interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is immediate; we just synced
    let mut conntrack_gc = tokio::time::interval(config.conntrack_gc_interval);
    conntrack_gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    conntrack_gc.tick().await;
    let mut pressure =
        crate::pressure::Pressure::new(&agent.datapath.drop_counts().unwrap_or_default());
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // A change is applied at once, with no settling delay: a file is read once it is
            // complete (`changes_manifests`), and changes arriving during a reload are taken
            // together by the next one, so a burst (a rollout updating many EndpointSlices)
            // costs as many reloads as the agent has time for, not one per change. A reload
            // is a diff writing only what changed (kube-proxy with minSyncPeriod 0).
            Some(()) = manifest_rx.recv() => {
                while manifest_rx.try_recv().is_ok() {}
                agent.reload_manifests().await;
                // The node's addresses may have changed with its Node object.
                agent.rescan_interfaces(&netlink).await;
            }
            Some(()) = iface_rx.recv() => {
                agent.rescan_interfaces(&netlink).await;
            }
            _ = resync.tick() => {
                // A full read now and then: nothing a file's timestamps hid stays unseen.
                objects.verify_files();
                agent.reload_manifests().await;
                agent.rescan_interfaces(&netlink).await;
                agent.verify_datapath();
            }
            _ = conntrack_gc.tick() => {
                match agent.datapath.collect_garbage() {
                    Ok(stats) if stats.removed + stats.removed6 + stats.policy_removed > 0 => {
                        tracing::info!(
                            removed = stats.removed,
                            removed_ipv6 = stats.removed6,
                            live = stats.live,
                            live_ipv6 = stats.live6,
                            policy_flows_removed = stats.policy_removed,
                            "conntrack gc: removed expired entries"
                        )
                    }
                    Ok(stats) => tracing::debug!(
                        live = stats.live,
                        live_ipv6 = stats.live6,
                        "conntrack gc: nothing expired"
                    ),
                    Err(e) => tracing::warn!("conntrack gc: {e:#}"),
                }
                match agent.datapath.drop_counts() {
                    Ok(counts) => {
                        for moved in pressure.check(&counts) {
                            tracing::warn!(
                                reason = moved.reason,
                                new = moved.new,
                                total = moved.total,
                                "{}",
                                moved.meaning
                            );
                        }
                    }
                    Err(e) => tracing::warn!("reading the drop counters: {e:#}"),
                }
            }
        }
    }
    tracing::info!("stopping; the pinned datapath stays in place (`sluice cleanup` removes it)");
    Ok(())
}

/// The started source of objects.
enum ObjectSource<'a> {
    Manifests {
        dir: &'a Path,
        /// Files parsed before, reused while unchanged; cleared by the periodic resync.
        cache: std::sync::Mutex<manifests::ManifestCache>,
        _watcher: notify::RecommendedWatcher,
    },
    Api(ApiSource),
}

impl ObjectSource<'_> {
    /// Makes the next load read every manifest file and parse those whose content changed.
    fn verify_files(&self) {
        if let ObjectSource::Manifests { cache, .. } = self {
            cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .verify();
        }
    }

    /// How long later loads wait for files being parsed.
    fn set_parse_budget(&self, budget: Duration) {
        if let ObjectSource::Manifests { cache, .. } = self {
            cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .set_budget(Some(budget));
        }
    }

    /// The objects as the source has them now, and the problems of files that did not parse.
    fn load(&self) -> anyhow::Result<manifests::Loaded> {
        match self {
            ObjectSource::Manifests { dir, cache, .. } => cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .load_dir(dir),
            ObjectSource::Api(api) => Ok(manifests::Loaded {
                objects: api.objects(),
                errors: Vec::new(),
                notes: Vec::new(),
                parsing: 0,
            }),
        }
    }
}

impl std::fmt::Display for ObjectSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectSource::Manifests { dir, .. } => write!(f, "manifests {}", dir.display()),
            ObjectSource::Api(_) => write!(f, "API server"),
        }
    }
}

struct Agent<'a> {
    config: &'a AgentConfig,
    objects: &'a ObjectSource<'a>,
    datapath: &'a mut Datapath,
    /// This node as the last reload resolved it.
    context: NodeContext,
    /// Remembers each service's translation while its objects are unchanged.
    translator: translate::Translator,
    /// Problems reported by the last reload, so a periodic resync does not repeat them.
    last_problems: Vec<String>,
    /// Pod interfaces the programs are attached to.
    attached: BTreeSet<u32>,
    /// External interfaces (carrying a node IP) found by the last scan.
    external: BTreeSet<u32>,
    health_checks: ServiceHealthServers,
    proxy_health: &'a ProxyHealth,
    /// Repairs of the datapath since start, and their log's rate limit.
    repairs: RepairLog,
}

impl Agent<'_> {
    /// Reads the objects (manifests or API stores), translates them and syncs the difference
    /// into the maps and the health servers. Bad files and objects are reported and skipped;
    /// what is valid is still programmed.
    async fn reload_manifests(&mut self) {
        let started = std::time::Instant::now();
        let loaded = match self.objects.load() {
            Ok(loaded) => loaded,
            Err(e) => {
                // Keep what is programmed: a vanished directory must not empty the datapath.
                tracing::error!("{e:#}; keeping the current datapath state");
                self.proxy_health.failed();
                return;
            }
        };
        for note in &loaded.notes {
            tracing::info!("{note}");
        }
        let objects = loaded.objects;
        let mut problems: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        self.context = node::resolve(&self.config.node, &objects).unwrap_or_else(|unknown| {
            // The Node object may simply not be written yet: program what does not need it.
            problems.push(unknown.to_string());
            let without_name = NodeOptions {
                node_name: None,
                ..self.config.node.clone()
            };
            node::resolve(&without_name, &objects)
                .expect("resolving without a node name cannot fail")
        });
        match self.datapath.set_node_config(&self.context) {
            Ok(true) => tracing::info!(
                node_ips = ?self.context.node_ips,
                cluster_cidrs = ?self.context.cluster_cidrs,
                masquerade_all = self.context.masquerade_all,
                conntrack_timeouts = ?self.context.conntrack,
                masquerade_ports = ?self.context.masquerade_ports,
                "node configuration programmed"
            ),
            Ok(false) => {}
            Err(e) => problems.push(format!("programming the node configuration: {e:#}")),
        }
        let (desired, translate_errors) = self.translator.translate(&objects, &self.context);
        let (wire_policy, policy_errors) = policy::program(&objects, &self.context);
        problems.extend(
            translate_errors
                .iter()
                .chain(&policy_errors)
                .map(|e| objects.describe(&e.object, &e.message)),
        );
        if problems != self.last_problems {
            for problem in &problems {
                tracing::warn!("skipped: {problem}");
            }
            self.last_problems = problems;
        }
        let programmed = self.sync(&desired, &objects, started) & self.sync_policy(&wire_policy);
        for (port, error) in self.health_checks.sync(&desired.health_checks).await {
            tracing::warn!(port, "{error}");
        }
        if !programmed {
            self.proxy_health.failed();
        } else if loaded.parsing == 0 {
            self.proxy_health.synced(started);
        }
        // Otherwise programmed, but not yet what the files being parsed say: still queued.
    }

    /// Programs `desired` (made from `objects`, whose files name what failed); false when
    /// anything could not be programmed. `started`: when the reload began (its time to the
    /// datapath is logged).
    fn sync(
        &mut self,
        desired: &DesiredState,
        objects: &manifests::Objects,
        started: std::time::Instant,
    ) -> bool {
        match self.datapath.sync(desired) {
            Ok(stats) => {
                for (frontend, error) in &stats.failed {
                    let service = desired
                        .services
                        .get(frontend)
                        .map_or("", |e| e.name.as_str());
                    // `namespace/name:port` -> the file of `Service namespace/name`, if any.
                    let object = format!("Service {}", service.split(':').next().unwrap_or(""));
                    let file = objects
                        .origins
                        .get(&object)
                        .map(|f| f.display().to_string())
                        .unwrap_or_default();
                    tracing::error!(%frontend, service, file, "not programmed: {error}");
                }
                for leftover in &stats.leftovers_failed {
                    tracing::error!("could not remove stale map entry: {leftover}");
                }
                if stats.purged > 0 {
                    tracing::info!(
                        entries = stats.purged,
                        "removed UDP/SCTP conntrack and affinity entries of removed endpoints"
                    );
                }
                if stats.map_writes == 0 {
                    tracing::debug!(services = desired.services.len(), "datapath unchanged");
                } else {
                    tracing::info!(
                        services = desired.services.len(),
                        added = stats.added,
                        updated = stats.updated,
                        removed = stats.removed,
                        map_writes = stats.map_writes,
                        ipv6 = stats.ipv6_programmed,
                        took_ms = started.elapsed().as_secs_f64() * 1e3,
                        "datapath synced"
                    );
                }
                stats.is_complete()
            }
            Err(e) => {
                tracing::error!("datapath sync failed: {e:#}");
                false
            }
        }
    }

    /// Programs the compiled NetworkPolicy; false when part of it could not be written.
    fn sync_policy(&mut self, wire: &policy::WirePolicy) -> bool {
        let stats = self.datapath.sync_policy(wire);
        for failure in &stats.failed {
            tracing::error!("policy not fully programmed: {failure}");
        }
        if stats.map_writes > 0 {
            tracing::info!(
                isolated_pods = wire.isolated.len(),
                entries = wire.entries.len(),
                map_writes = stats.map_writes,
                "network policy synced"
            );
        }
        stats.failed.is_empty()
    }

    /// Checks that every program is attached where this agent attached it and every pin names
    /// the agent's own object, repairs what is not, and logs each repair (rate-limited) with
    /// the running count.
    fn verify_datapath(&mut self) {
        let repairs = self.datapath.verify_and_repair();
        if repairs.is_empty() {
            return;
        }
        let done = repairs.iter().filter(|r| r.outcome.is_ok()).count() as u64;
        if let Err(e) = self
            .datapath
            .count_event(sluice_common::REASON_DATAPATH_REPAIRED, done)
        {
            tracing::warn!("counting repairs: {e:#}");
        }
        let lines = self.repairs.record(&repairs, std::time::Instant::now());
        let (repaired, failed) = (self.repairs.repaired, self.repairs.failed);
        for (level, line) in lines {
            match level {
                Level::Warn => {
                    tracing::warn!(repairs_total = repaired, failed_total = failed, "{line}")
                }
                Level::Error => {
                    tracing::error!(repairs_total = repaired, failed_total = failed, "{line}")
                }
            }
        }
    }

    /// Attaches the programs to new pod interfaces and forgets vanished ones. An interface
    /// that disappears between the scan and the attach is retried at the next scan.
    async fn rescan_interfaces(&mut self, netlink: &rtnetlink::Handle) {
        let found = match interfaces::scan(netlink, &self.context.node_ips).await {
            Ok(found) => found,
            Err(e) => {
                tracing::error!("scanning interfaces: {e:#}");
                return;
            }
        };
        for (&ifindex, name) in &found.pods {
            if self.attached.contains(&ifindex) {
                continue;
            }
            match self.datapath.attach(ifindex, name) {
                Ok(()) => {
                    tracing::info!(interface = %name, ifindex, "attached to pod interface");
                    self.attached.insert(ifindex);
                }
                Err(e) => tracing::warn!(interface = %name, ifindex, "attach failed: {e:#}"),
            }
        }
        for (&ifindex, name) in &found.external {
            if self.external.contains(&ifindex) {
                continue;
            }
            match self.datapath.attach_external(ifindex, name) {
                Ok(()) => {
                    tracing::info!(interface = %name, ifindex, "attached to external interface (carries a node IP)");
                    self.external.insert(ifindex);
                }
                Err(e) => tracing::warn!(interface = %name, ifindex, "attach failed: {e:#}"),
            }
        }
        let pods: BTreeSet<u32> = found.pods.keys().copied().collect();
        let external: BTreeSet<u32> = found.external.keys().copied().collect();
        for gone in self.attached.difference(&pods) {
            tracing::info!(ifindex = gone, "pod interface gone");
        }
        for gone in self.external.difference(&external) {
            tracing::info!(
                ifindex = gone,
                "external interface gone or no longer a node IP's"
            );
        }
        self.attached.retain(|i| pods.contains(i));
        self.external.retain(|i| external.contains(i));
        let present: BTreeSet<u32> = found
            .pods
            .keys()
            .chain(found.external.keys())
            .copied()
            .collect();
        if let Err(e) = self.datapath.forget_interfaces_except(&present) {
            tracing::warn!("forgetting vanished interfaces: {e:#}");
        }
    }
}

/// Whether a file event means a manifest may read differently now. Only manifest files count
/// (a tool's temporary file, renamed into place afterwards, must not cost a reload of its
/// own). A file written in place counts when it is closed (its writes alone would have it
/// read half-written); creations, renames and removals count at once.
fn changes_manifests(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
    // An event without paths (say, a queue overflow) may hide anything.
    if !event.paths.is_empty() && !event.paths.iter().any(|p| manifests::is_manifest_file(p)) {
        return false;
    }
    match &event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        // A rename within the directory also comes as its two halves (From, To), each
        // counted on its own; counting the pair as well cost every rename a second reload,
        // and a change arriving during it waited for it.
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => false,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_)) => false,
        // Create, Remove, renames, and what the watcher cannot classify (say, a queue
        // overflow): read again.
        _ => true,
    }
}

/// Watches `dir` for changes; each burst of events sends a `()` (coalesced by the channel).
fn watch_manifests(
    dir: &Path,
    changed: mpsc::Sender<()>,
    health: Arc<ProxyHealth>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if !changes_manifests(&event) => {}
            Ok(_) => {
                // Queued from the watcher's thread: /healthz sees a change the loop has not
                // taken in yet, however busy the loop is.
                health.queued();
                let _ = changed.try_send(());
            }
            Err(e) => tracing::warn!("manifest watch: {e}"),
        })
        .context("creating the manifest watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching manifest directory {}", dir.display()))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, Event, EventKind, ModifyKind, RemoveKind,
        RenameMode,
    };

    use super::changes_manifests;

    fn event(kind: EventKind, paths: &[&str]) -> Event {
        paths
            .iter()
            .fold(Event::new(kind), |e, p| e.add_path(p.into()))
    }

    /// What inotify reports while a tool writes `.svc.yaml.tmp` and renames it to `svc.yaml`
    /// (as `kubectl`-like tools and the testbed do) costs exactly one reload.
    #[test]
    fn a_file_renamed_into_place_costs_one_reload() {
        let tmp = "/m/.svc.yaml.tmp";
        let yaml = "/m/svc.yaml";
        let events = [
            event(EventKind::Create(CreateKind::File), &[tmp]),
            event(EventKind::Access(AccessKind::Open(AccessMode::Any)), &[tmp]),
            event(EventKind::Modify(ModifyKind::Data(DataChange::Any)), &[tmp]),
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &[tmp],
            ),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::From)),
                &[tmp],
            ),
            event(EventKind::Modify(ModifyKind::Name(RenameMode::To)), &[yaml]),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                &[tmp, yaml],
            ),
        ];
        let reloads: Vec<&Event> = events.iter().filter(|e| changes_manifests(e)).collect();
        assert_eq!(reloads.len(), 1, "{reloads:?}");
        assert_eq!(
            reloads[0].kind,
            EventKind::Modify(ModifyKind::Name(RenameMode::To))
        );
    }

    /// A manifest written in place counts once it is closed, not at each write; removals and
    /// renames out of the directory count; an event without paths (an overflow) counts.
    #[test]
    fn in_place_writes_count_when_closed() {
        let yaml = "/m/svc.yaml";
        assert!(!changes_manifests(&event(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            &[yaml]
        )));
        assert!(changes_manifests(&event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &[yaml]
        )));
        assert!(changes_manifests(&event(
            EventKind::Remove(RemoveKind::File),
            &[yaml]
        )));
        assert!(changes_manifests(&event(
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            &[yaml]
        )));
        assert!(changes_manifests(&event(EventKind::Other, &[])));
        assert!(!changes_manifests(&event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &["/m/notes.txt"]
        )));
    }
}
