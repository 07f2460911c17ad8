//! kube-proxy's configuration file (`sluice agent --config FILE`): a KubeProxyConfiguration
//! (kubeproxy.config.k8s.io/v1alpha1), so the ConfigMap a cluster already has for kube-proxy
//! works unchanged.
//!
//! The fields that mean something for an eBPF datapath are applied ([`KubeProxyConfig`]);
//! fields of the other proxy modes (iptables, ipvs, nftables, winkernel sections, `mode`, ...)
//! and unknown fields are reported as warnings, never fatal: a kube-proxy configuration must
//! not stop the node's service proxy. A file that is not YAML, not a KubeProxyConfiguration,
//! or has a field of the wrong type is an error naming the file and the field. Flags override
//! the file ([`KubeProxyConfig::fill`] only sets what the flags left unset).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use ipnet::IpNet;
use serde_yaml::{Mapping, Value};

use crate::node::NodeOptions;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";
/// kube-proxy's healthz port, used when healthzBindAddress has no port.
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;

/// kube-proxy's conntrack timeouts (`conntrack.*`); `None` where the file does not set one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    pub tcp_established: Option<Duration>,
    pub tcp_close_wait: Option<Duration>,
    pub udp: Option<Duration>,
    pub udp_stream: Option<Duration>,
}

/// The fields of a KubeProxyConfiguration that Sluice applies; `None` / empty where the file
/// does not set them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeProxyConfig {
    /// `clusterCIDR` (comma separated in the file).
    pub cluster_cidr: Vec<IpNet>,
    /// `nodePortAddresses`.
    pub nodeport_addresses: Vec<IpNet>,
    /// `iptables.masqueradeAll` (v1alpha1's place for it) or a top-level `masqueradeAll`.
    pub masquerade_all: Option<bool>,
    /// `healthzBindAddress`: `Some(None)` when the file disables it (an empty string).
    pub healthz_bind_address: Option<Option<SocketAddr>>,
    /// `hostnameOverride`: the Node object that is this node.
    pub hostname_override: Option<String>,
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    pub conntrack: ConntrackTimeouts,
    /// Everything set in the file that Sluice does not apply, one message per field.
    pub warnings: Vec<String>,
}

/// The agent settings a configuration file can provide and flags can override.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSettings {
    pub node: NodeOptions,
    /// `None`: not set (the default applies); `Some(None)`: disabled.
    pub healthz_bind_address: Option<Option<SocketAddr>>,
    pub kubeconfig: Option<PathBuf>,
}

impl KubeProxyConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> anyhow::Result<KubeProxyConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("configuration file {}", path.display()))
    }

    /// Parses a KubeProxyConfiguration document.
    pub fn parse(text: &str) -> anyhow::Result<KubeProxyConfig> {
        let value: Value =
            serde_yaml::from_str(text).map_err(|e| anyhow!("not valid YAML: {e}"))?;
        let Value::Mapping(fields) = value else {
            bail!("not a KubeProxyConfiguration: the document is not a mapping");
        };
        let api_version = fields.get("apiVersion").and_then(Value::as_str);
        let kind = fields.get("kind").and_then(Value::as_str);
        if api_version != Some(API_VERSION) || kind != Some(KIND) {
            bail!(
                "expected apiVersion {API_VERSION} and kind {KIND}, found apiVersion {} and kind {}",
                api_version.unwrap_or("<none>"),
                kind.unwrap_or("<none>")
            );
        }
        let mut config = KubeProxyConfig::default();
        for (key, value) in &fields {
            let Some(key) = key.as_str() else {
                config.warn(format!("ignoring a non-string key {key:?}"));
                continue;
            };
            config.field(key, value)?;
        }
        Ok(config)
    }

    fn warn(&mut self, message: String) {
        self.warnings.push(message);
    }

    /// Applies (or warns about) one top-level field.
    fn field(&mut self, key: &str, value: &Value) -> anyhow::Result<()> {
        match key {
            "apiVersion" | "kind" => {}
            "clusterCIDR" => {
                self.cluster_cidr = cidr_list(key, string(key, value)?.split(','))?;
            }
            "nodePortAddresses" => {
                let entries = string_list(key, value)?;
                if entries.iter().any(|e| e == "primary") {
                    // "primary" (the node's primary IPs) is what Sluice does with no list.
                    self.warn(
                        "nodePortAddresses: \"primary\" is treated as all node IPs of the Node object"
                            .into(),
                    );
                }
                self.nodeport_addresses = cidr_list(
                    key,
                    entries
                        .iter()
                        .map(String::as_str)
                        .filter(|e| *e != "primary"),
                )?;
            }
            "masqueradeAll" => self.masquerade_all = Some(boolean(key, value)?),
            "healthzBindAddress" => {
                self.healthz_bind_address = Some(bind_address(key, value)?);
            }
            "metricsBindAddress" => {
                let address = string(key, value)?;
                if !address.is_empty() {
                    self.warn(format!(
                        "metricsBindAddress {address:?}: Sluice serves no metrics endpoint yet; not applied"
                    ));
                }
            }
            "hostnameOverride" => {
                let name = string(key, value)?.trim().to_lowercase();
                if !name.is_empty() {
                    self.hostname_override = Some(name);
                }
            }
            "bindAddress" => {
                let address = string(key, value)?;
                if !address.is_empty() {
                    let ip = address.parse::<IpAddr>().map_err(|e| {
                        anyhow!("bindAddress: {address:?} is not an IP address: {e}")
                    })?;
                    // kube-proxy uses a specific bindAddress as the node's primary IP.
                    if !ip.is_unspecified() {
                        self.warn(format!(
                            "bindAddress {ip}: not applied; node IPs come from the Node object"
                        ));
                    }
                }
            }
            "clientConnection" => {
                for (sub, sub_value) in mapping(key, value)? {
                    let sub = sub.as_str().unwrap_or_default();
                    match sub {
                        "kubeconfig" => {
                            let path = string("clientConnection.kubeconfig", sub_value)?;
                            if !path.is_empty() {
                                self.kubeconfig = Some(path.into());
                            }
                        }
                        "acceptContentTypes" | "contentType" | "qps" | "burst" => {
                            if !is_unset(sub_value) {
                                self.warn(format!(
                                    "clientConnection.{sub}: does not apply to Sluice; ignored"
                                ));
                            }
                        }
                        _ => self.warn(format!("clientConnection.{sub}: unknown field; ignored")),
                    }
                }
            }
            "conntrack" => {
                for (sub, sub_value) in mapping(key, value)? {
                    let sub = sub.as_str().unwrap_or_default();
                    let name = format!("conntrack.{sub}");
                    let slot = match sub {
                        "tcpEstablishedTimeout" => &mut self.conntrack.tcp_established,
                        "tcpCloseWaitTimeout" => &mut self.conntrack.tcp_close_wait,
                        "udpTimeout" => &mut self.conntrack.udp,
                        "udpStreamTimeout" => &mut self.conntrack.udp_stream,
                        "maxPerCore" | "min" | "tcpBeLiberal" => {
                            if is_unset(sub_value) {
                                continue;
                            }
                            self.warn(format!(
                                "{name}: tunes the kernel's nf_conntrack, which Sluice does not use; ignored"
                            ));
                            continue;
                        }
                        _ => {
                            self.warn(format!("{name}: unknown field; ignored"));
                            continue;
                        }
                    };
                    // kube-proxy leaves a timeout alone when it is null or 0s.
                    if !sub_value.is_null() {
                        let duration = duration(&name, sub_value)?;
                        *slot = (!duration.is_zero()).then_some(duration);
                    }
                }
            }
            "iptables" => {
                for (sub, sub_value) in mapping(key, value)? {
                    let sub = sub.as_str().unwrap_or_default();
                    if sub == "masqueradeAll" {
                        self.masquerade_all = Some(boolean("iptables.masqueradeAll", sub_value)?);
                    } else if !is_unset(sub_value) {
                        self.warn(format!(
                            "iptables.{sub}: applies to the iptables proxy mode only; ignored"
                        ));
                    }
                }
            }
            "mode" => {
                let mode = string(key, value)?;
                if !mode.is_empty() {
                    self.warn(format!(
                        "mode {mode:?}: Sluice is its own proxy mode (eBPF); ignored"
                    ));
                }
            }
            "detectLocalMode" => {
                let mode = string(key, value)?;
                if !mode.is_empty() && mode != "ClusterCIDR" {
                    self.warn(format!(
                        "detectLocalMode {mode:?}: Sluice tells pod traffic by clusterCIDR; ignored"
                    ));
                }
            }
            "ipvs"
            | "nftables"
            | "winkernel"
            | "featureGates"
            | "detectLocal"
            | "logging"
            | "oomScoreAdj"
            | "configSyncPeriod"
            | "portRange"
            | "bindAddressHardFail"
            | "enableProfiling"
            | "showHiddenMetricsForVersion"
            | "syncPeriod"
            | "minSyncPeriod"
            | "windowsRunAsService" => {
                if !is_unset(value) {
                    self.warn(format!("{key}: does not apply to Sluice; ignored"));
                }
            }
            _ => self.warn(format!("{key}: unknown field; ignored")),
        }
        Ok(())
    }

    /// Sets what the flags left unset in `settings` from this file.
    pub fn fill(&self, settings: &mut AgentSettings) {
        let node = &mut settings.node;
        if node.cluster_cidr.is_empty() {
            node.cluster_cidr = self.cluster_cidr.clone();
        }
        if node.nodeport_addresses.is_empty() {
            node.nodeport_addresses = self.nodeport_addresses.clone();
        }
        // A boolean flag can only turn masquerading on; the file decides when it is absent.
        if !node.masquerade_all {
            node.masquerade_all = self.masquerade_all.unwrap_or(false);
        }
        if node.node_name.is_none() {
            node.node_name = self.hostname_override.clone();
        }
        if settings.healthz_bind_address.is_none() {
            settings.healthz_bind_address = self.healthz_bind_address;
        }
        if settings.kubeconfig.is_none() {
            settings.kubeconfig = self.kubeconfig.clone();
        }
        // A timeout flag left at its default yields to the file's value (clap cannot tell a
        // flag given with its default value from one not given at all).
        let defaults = crate::node::ConntrackOptions::flag_defaults();
        let timeouts = &mut settings.node.conntrack;
        for (flag, default, file) in [
            (
                &mut timeouts.conntrack_tcp_timeout_established,
                defaults.conntrack_tcp_timeout_established,
                self.conntrack.tcp_established,
            ),
            (
                &mut timeouts.conntrack_tcp_timeout_close_wait,
                defaults.conntrack_tcp_timeout_close_wait,
                self.conntrack.tcp_close_wait,
            ),
            (
                &mut timeouts.conntrack_udp_timeout,
                defaults.conntrack_udp_timeout,
                self.conntrack.udp,
            ),
            (
                &mut timeouts.conntrack_udp_timeout_stream,
                defaults.conntrack_udp_timeout_stream,
                self.conntrack.udp_stream,
            ),
        ] {
            // 0s: kube-proxy leaves the kernel's value, Sluice its default.
            if let Some(value) = file.filter(|v| *flag == default && !v.is_zero()) {
                *flag = value;
            }
        }
    }
}

/// Null, false, 0, an empty string (or `0s`), map or list: kube-proxy's defaulted output
/// (`--write-config-to`, kubeadm's ConfigMap) writes those for what it does not use, and they
/// deserve no warning.
fn is_unset(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "0s",
        Value::Mapping(m) => m.values().all(is_unset),
        Value::Sequence(s) => s.is_empty(),
        _ => false,
    }
}

fn string(field: &str, value: &Value) -> anyhow::Result<String> {
    match value {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        other => bail!("{field}: expected a string, found {}", describe(other)),
    }
}

fn boolean(field: &str, value: &Value) -> anyhow::Result<bool> {
    match value {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        other => bail!("{field}: expected true or false, found {}", describe(other)),
    }
}

fn mapping<'a>(field: &str, value: &'a Value) -> anyhow::Result<Vec<(&'a Value, &'a Value)>> {
    static EMPTY: std::sync::OnceLock<Mapping> = std::sync::OnceLock::new();
    match value {
        Value::Null => Ok(EMPTY.get_or_init(Mapping::new).iter().collect()),
        Value::Mapping(m) => Ok(m.iter().collect()),
        other => bail!("{field}: expected a mapping, found {}", describe(other)),
    }
}

fn string_list(field: &str, value: &Value) -> anyhow::Result<Vec<String>> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Sequence(items) => items.iter().map(|item| string(field, item)).collect(),
        other => bail!(
            "{field}: expected a list of strings, found {}",
            describe(other)
        ),
    }
}

fn cidr_list<'a>(
    field: &str,
    entries: impl Iterator<Item = &'a str>,
) -> anyhow::Result<Vec<IpNet>> {
    entries
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.parse::<IpNet>()
                .map_err(|error| anyhow!("{field}: {e:?} is not a CIDR: {error}"))
        })
        .collect()
}

/// kube-proxy's healthzBindAddress: `ip:port`, or an IP alone (port 10256); empty disables.
fn bind_address(field: &str, value: &Value) -> anyhow::Result<Option<SocketAddr>> {
    let text = string(field, value)?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(Some(address));
    }
    match text
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => Ok(Some(SocketAddr::new(ip, DEFAULT_HEALTHZ_PORT))),
        Err(_) => bail!("{field}: {text:?} is not an ip:port or an IP address"),
    }
}

fn duration(field: &str, value: &Value) -> anyhow::Result<Duration> {
    let text = string(field, value)?;
    parse_go_duration(&text).map_err(|e| anyhow!("{field}: {text:?} is not a duration: {e}"))
}

/// A Go `time.Duration` string as Kubernetes writes them: `24h0m0s`, `1h`, `30s`, `1.5m`,
/// `300ms`; a bare `0` is zero.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty".into());
    }
    if text.starts_with('-') {
        return Err("negative".into());
    }
    let mut total = 0f64;
    let mut rest = text.trim_start_matches('+');
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or("a number without a unit")?;
        if number_len == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| format!("bad number {:?}", &rest[..number_len]))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            unit => return Err(format!("unknown unit {unit:?}")),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|e| e.to_string())
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A KubeProxyConfiguration as `kube-proxy --write-config-to` writes it (kubeadm's
    /// ConfigMap), with Sluice-relevant values changed from the defaults.
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: true
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 30s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: true
  masqueradeBit: null
  minSyncPeriod: 1s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: true
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
metricsBindAddress: 127.0.0.1:10249
mode: iptables
nodePortAddresses: [172.18.0.0/16]
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: true
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn a_kubeadm_configuration_maps_what_applies_and_warns_about_the_rest() {
        let config = KubeProxyConfig::parse(KUBEADM).unwrap();
        let cidrs: Vec<String> = config
            .cluster_cidr
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["10.244.0.0/16", "fd00:10:244::/56"]);
        assert_eq!(
            config.nodeport_addresses,
            ["172.18.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(config.masquerade_all, Some(true));
        assert_eq!(
            config.healthz_bind_address,
            Some(Some("0.0.0.0:10256".parse().unwrap()))
        );
        assert_eq!(config.hostname_override, None);
        assert_eq!(
            config.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(
            config.conntrack,
            ConntrackTimeouts {
                tcp_established: Some(Duration::from_secs(24 * 3600)),
                tcp_close_wait: Some(Duration::from_secs(3600)),
                udp: Some(Duration::from_secs(30)),
                udp_stream: None, // 0s: leave the default
            }
        );
        let warned = |needle: &str| config.warnings.iter().any(|w| w.starts_with(needle));
        for field in [
            "metricsBindAddress",
            "mode \"iptables\"",
            "iptables.minSyncPeriod",
            "ipvs:",
            "winkernel:",
            "clientConnection.qps",
            "conntrack.tcpBeLiberal",
        ] {
            assert!(
                warned(field),
                "no warning for {field}: {:?}",
                config.warnings
            );
        }
        // Defaulted empty sections and values Sluice matches are not worth a warning.
        for quiet in [
            "detectLocal",
            "bindAddress",
            "oomScoreAdj",
            "portRange",
            "hostnameOverride",
            "configSyncPeriod",
            "enableProfiling",
            "iptables.syncPeriod",
            "clientConnection.burst",
            "conntrack.maxPerCore",
        ] {
            assert!(
                !warned(quiet),
                "warned about {quiet}: {:?}",
                config.warnings
            );
        }
    }

    #[test]
    fn conntrack_timeouts_apply_unless_their_flag_was_changed() {
        use std::time::Duration;
        let config = KubeProxyConfig::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             conntrack: {tcpEstablishedTimeout: 2h, tcpCloseWaitTimeout: 30m, udpTimeout: 10s, \
             udpStreamTimeout: 0s}\n",
        )
        .unwrap();
        let defaults = crate::node::ConntrackOptions::flag_defaults();
        assert_eq!(
            defaults.conntrack_udp_timeout_stream,
            Duration::from_secs(120)
        );
        let mut settings = AgentSettings::default();
        settings.node.conntrack = defaults.clone();
        // --conntrack-udp-timeout given: it wins.
        settings.node.conntrack.conntrack_udp_timeout = Duration::from_secs(5);
        config.fill(&mut settings);
        let applied = &settings.node.conntrack;
        assert_eq!(
            applied.conntrack_tcp_timeout_established,
            Duration::from_secs(7200)
        );
        assert_eq!(
            applied.conntrack_tcp_timeout_close_wait,
            Duration::from_secs(1800)
        );
        assert_eq!(applied.conntrack_udp_timeout, Duration::from_secs(5));
        // 0s keeps the default.
        assert_eq!(
            applied.conntrack_udp_timeout_stream,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn flags_override_the_file() {
        let config = KubeProxyConfig::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             clusterCIDR: 10.244.0.0/16\nhostnameOverride: Kind-Worker\n\
             healthzBindAddress: \"\"\nmasqueradeAll: true\n\
             clientConnection: {kubeconfig: /etc/kube/config}\n",
        )
        .unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);

        // Nothing on the command line: the file decides.
        let mut settings = AgentSettings::default();
        config.fill(&mut settings);
        assert_eq!(settings.node.node_name.as_deref(), Some("kind-worker"));
        assert_eq!(
            settings.node.cluster_cidr,
            ["10.244.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert!(settings.node.masquerade_all);
        assert_eq!(
            settings.healthz_bind_address,
            Some(None),
            "\"\" disables healthz"
        );
        assert_eq!(settings.kubeconfig, Some(PathBuf::from("/etc/kube/config")));

        // Flags win.
        let mut settings = AgentSettings {
            node: NodeOptions {
                node_name: Some("node-1".into()),
                cluster_cidr: vec!["10.0.0.0/8".parse().unwrap()],
                ..Default::default()
            },
            healthz_bind_address: Some(Some("127.0.0.1:9999".parse().unwrap())),
            kubeconfig: Some("/flag".into()),
        };
        config.fill(&mut settings);
        assert_eq!(settings.node.node_name.as_deref(), Some("node-1"));
        assert_eq!(
            settings.node.cluster_cidr,
            ["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            settings.healthz_bind_address,
            Some(Some("127.0.0.1:9999".parse().unwrap()))
        );
        assert_eq!(settings.kubeconfig, Some(PathBuf::from("/flag")));
    }

    #[test]
    fn healthz_without_a_port_gets_10256() {
        let config = KubeProxyConfig::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             healthzBindAddress: \"::\"\n",
        )
        .unwrap();
        assert_eq!(
            config.healthz_bind_address,
            Some(Some("[::]:10256".parse().unwrap()))
        );
    }

    #[test]
    fn unknown_fields_are_warnings() {
        let config = KubeProxyConfig::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             frobnicate: 3\nconntrack: {tcpFooTimeout: 1s}\n",
        )
        .unwrap();
        assert_eq!(
            config.warnings,
            [
                "frobnicate: unknown field; ignored",
                "conntrack.tcpFooTimeout: unknown field; ignored"
            ]
        );
    }

    #[test]
    fn bad_files_are_errors_naming_the_file_and_field() {
        let dir = std::env::temp_dir().join(format!("sluice-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kube-proxy.yaml");
        let error_of = |text: &str| {
            std::fs::write(&path, text).unwrap();
            format!("{:#}", KubeProxyConfig::load(&path).unwrap_err())
        };
        let header = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

        let error = error_of("clusterCIDR: [unclosed\n");
        assert!(
            error.starts_with(&format!(
                "configuration file {}: not valid YAML",
                path.display()
            )),
            "{error}"
        );
        let error = error_of("apiVersion: v1\nkind: ConfigMap\n");
        assert!(error.contains("expected apiVersion kubeproxy.config.k8s.io/v1alpha1 and kind KubeProxyConfiguration, found apiVersion v1 and kind ConfigMap"), "{error}");
        let error = error_of(&format!("{header}masqueradeAll: \"yes\"\n"));
        assert!(
            error.ends_with("masqueradeAll: expected true or false, found the string \"yes\""),
            "{error}"
        );
        let error = error_of(&format!("{header}clusterCIDR: 10.244.0.0/33\n"));
        assert!(
            error.contains("clusterCIDR: \"10.244.0.0/33\" is not a CIDR"),
            "{error}"
        );
        let error = error_of(&format!("{header}conntrack: {{udpTimeout: 30 seconds}}\n"));
        assert!(
            error.contains("conntrack.udpTimeout: \"30 seconds\" is not a duration"),
            "{error}"
        );
        let error = error_of(&format!("{header}healthzBindAddress: nowhere:80\n"));
        assert!(
            error.contains("healthzBindAddress: \"nowhere:80\" is not an ip:port"),
            "{error}"
        );
        let missing = dir.join("missing.yaml");
        let error = format!("{:#}", KubeProxyConfig::load(&missing).unwrap_err());
        assert!(
            error.starts_with(&format!("reading configuration file {}", missing.display())),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("24h0m0s"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_go_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_go_duration("30").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("1d").is_err());
        assert!(parse_go_duration("").is_err());
    }
}
