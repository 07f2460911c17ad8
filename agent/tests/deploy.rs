//! deploy/ and the Dockerfile checked against the agent: every manifest parses into its
//! k8s-openapi type, the ClusterRole grants exactly what the reflectors use
//! ([`WATCHED_RESOURCES`] x [`WATCH_VERBS`]), the DaemonSet has what a kube-proxy replacement
//! needs (and only the capabilities it needs), the ConfigMap's KubeProxyConfiguration is one
//! the agent applies without warnings, the agent accepts the DaemonSet's command line, and the
//! image builds the eBPF toolchain `cargo xtask setup` checks for.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use sluice::{
    config::KubeProxyConfig,
    kube_source::{WATCHED_RESOURCES, WATCH_VERBS},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(relative: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The manifests `kubectl apply -k deploy/` applies, in kustomization order.
fn resources() -> Vec<String> {
    let kustomization = yaml("deploy/kustomization.yaml");
    kustomization["resources"]
        .as_sequence()
        .expect("kustomization resources")
        .iter()
        .map(|r| format!("deploy/{}", r.as_str().unwrap()))
        .collect()
}

fn parse<K: serde::de::DeserializeOwned + k8s_openapi::Resource>(relative: &str) -> K {
    let value = yaml(relative);
    assert_eq!(
        value["apiVersion"].as_str(),
        Some(K::API_VERSION),
        "{relative}"
    );
    assert_eq!(value["kind"].as_str(), Some(K::KIND), "{relative}");
    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{relative} as {}: {e}", K::KIND))
}

#[test]
fn every_manifest_parses_and_kustomize_applies_them_all() {
    let listed: BTreeSet<String> = resources().into_iter().collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(root().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml"))
        // Not Kubernetes objects: kind's cluster config and the kustomization itself.
        .filter(|name| name != "kind.yaml" && name != "kustomization.yaml")
        .map(|name| format!("deploy/{name}"))
        .collect();
    assert_eq!(
        listed, on_disk,
        "every manifest in deploy/ must be in kustomization.yaml"
    );
    for path in &listed {
        let kind = yaml(path)["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "ServiceAccount" => drop(parse::<ServiceAccount>(path)),
            "ClusterRole" => drop(parse::<ClusterRole>(path)),
            "ClusterRoleBinding" => drop(parse::<ClusterRoleBinding>(path)),
            "ConfigMap" => drop(parse::<ConfigMap>(path)),
            "DaemonSet" => drop(parse::<DaemonSet>(path)),
            other => panic!("{path}: unexpected kind {other:?}"),
        }
    }
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_watches() {
    let role: ClusterRole = parse("deploy/clusterrole.yaml");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(
            rule.resource_names.is_none(),
            "a rule limited to names: {rule:?}"
        );
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "wildcards grant more than the agent uses: {group}/{resource} {verb}"
                    );
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = WATCHED_RESOURCES
        .iter()
        .flat_map(|r| {
            WATCH_VERBS
                .iter()
                .map(|verb| (r.group.to_string(), r.plural.to_string(), verb.to_string()))
        })
        .collect();
    assert_eq!(granted, used);

    // Bound to the ServiceAccount the DaemonSet runs as.
    let binding: ClusterRoleBinding = parse("deploy/clusterrolebinding.yaml");
    let account: ServiceAccount = parse("deploy/serviceaccount.yaml");
    let daemonset: DaemonSet = parse("deploy/daemonset.yaml");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
    assert_eq!(daemonset.metadata.namespace, account.metadata.namespace);
    let pod = daemonset.spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name, account.metadata.name);
}

fn agent_container(daemonset: &DaemonSet) -> Container {
    let pod = daemonset.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1);
    pod.containers[0].clone()
}

#[test]
fn the_daemon_set_runs_on_every_node_as_a_node_critical_host_network_proxy() {
    let daemonset: DaemonSet = parse("deploy/daemonset.yaml");
    let spec = &daemonset.spec;
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // A toleration with no key and operator Exists tolerates every taint.
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations.iter().any(|t| t.key.is_none()
            && t.operator.as_deref() == Some("Exists")
            && t.effect.is_none()),
        "{tolerations:?}"
    );

    let agent = agent_container(&daemonset);
    for (probe, path) in [
        (agent.readiness_probe.as_ref(), "/healthz"),
        (agent.liveness_probe.as_ref(), "/livez"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
        );
    }

    // Only the capabilities the agent needs, and nothing privileged in the long-running
    // container.
    let security = agent.security_context.clone().unwrap();
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.unwrap();
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));
    let added: BTreeSet<String> = capabilities.add.unwrap().into_iter().collect();
    let needed: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into();
    assert_eq!(added, needed);

    // bpffs (shared with the host, where the init container mounts it) and the cgroup root.
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    assert_eq!(host_path("bpffs").as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(host_path("cgroup").as_deref(), Some("/sys/fs/cgroup"));
    let mounts = agent.volume_mounts.clone().unwrap_or_default();
    let bpffs = mounts.iter().find(|m| m.name == "bpffs").unwrap();
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    let init = pod.init_containers.clone().unwrap_or_default();
    assert!(init.iter().any(|c| c
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == "bpffs" && m.mount_propagation.as_deref() == Some("Bidirectional"))));

    // The node name comes from the pod's node.
    let env = agent.env.clone().unwrap_or_default();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    // The API server is reached directly on kind's control plane node, named after the
    // cluster in kind.yaml.
    let kind = yaml("deploy/kind.yaml");
    let host = env
        .iter()
        .find(|e| e.name == "KUBERNETES_SERVICE_HOST")
        .and_then(|e| e.value.clone());
    assert_eq!(
        host,
        Some(format!("{}-control-plane", kind["name"].as_str().unwrap()))
    );
}

#[test]
fn the_config_map_is_a_kube_proxy_configuration_the_agent_applies_without_warnings() {
    let config_map: ConfigMap = parse("deploy/configmap.yaml");
    let data = config_map.data.unwrap();
    let text = data.get("config.yaml").expect("config.yaml key");
    let config = KubeProxyConfig::parse(text).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    // kind's default pod subnet (kind.yaml does not change it).
    assert_eq!(config.cluster_cidr, ["10.244.0.0/16".parse().unwrap()]);

    // The DaemonSet mounts it where --config points.
    let daemonset: DaemonSet = parse("deploy/daemonset.yaml");
    let agent = agent_container(&daemonset);
    let command = agent.command.clone().unwrap();
    let config_arg = command
        .iter()
        .position(|a| a == "--config")
        .map(|i| command[i + 1].clone())
        .expect("--config in the command");
    let mount = agent
        .volume_mounts
        .unwrap()
        .into_iter()
        .find(|m| m.name == "config")
        .unwrap();
    assert_eq!(config_arg, format!("{}/config.yaml", mount.mount_path));
    let pod = daemonset.spec.template.spec.unwrap();
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "config")
        .unwrap();
    assert_eq!(
        volume.config_map.map(|c| c.name),
        config_map.metadata.name.clone()
    );
}

#[test]
fn the_agent_accepts_the_daemon_set_command_line() {
    let daemonset: DaemonSet = parse("deploy/daemonset.yaml");
    let command = agent_container(&daemonset).command.unwrap();
    assert_eq!(command[0], "/usr/local/bin/sluice");
    // clap rejects an unknown flag or a bad value before it reaches --help.
    assert!(accepts(&command[1..]));
    assert!(
        !accepts(&[&command[1..], &["--no-such-flag".to_owned()]].concat()),
        "the check above cannot fail"
    );

    // The init container runs the same image, whose only file is the binary.
    let init = daemonset
        .spec
        .template
        .spec
        .and_then(|s| s.init_containers)
        .expect("an init container");
    let command = init[0].command.clone().unwrap();
    assert_eq!(command[..], ["/usr/local/bin/sluice", "mount-bpffs"]);
    assert!(accepts(&command[1..]));
}

/// Whether the binary accepts `args` (parsed up to `--help`, which stops before running).
fn accepts(args: &[String]) -> bool {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    if !output.status.success() {
        eprintln!("{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    output.status.success()
}

#[test]
fn kind_runs_without_kube_proxy() {
    let kind = yaml("deploy/kind.yaml");
    assert_eq!(kind["apiVersion"].as_str(), Some("kind.x-k8s.io/v1alpha4"));
    assert_eq!(kind["kind"].as_str(), Some("Cluster"));
    assert_eq!(kind["networking"]["kubeProxyMode"].as_str(), Some("none"));
}

/// `const NAME: &str = "value";` in `text`.
fn const_str(text: &str, name: &str) -> String {
    let start = text
        .find(&format!("const {name}: &str = \""))
        .unwrap_or_else(|| panic!("no const {name}"));
    let rest = &text[start..];
    let value = rest.split('"').nth(1).unwrap();
    value.to_string()
}

#[test]
fn the_image_builds_the_toolchain_xtask_setup_checks_for() {
    let dockerfile = read("Dockerfile");
    let xtask = read("xtask/src/setup.rs");
    let linker = const_str(&xtask, "BPF_LINKER_VERSION");
    assert!(
        dockerfile.contains(&format!("ARG BPF_LINKER_VERSION={linker}\n")),
        "the Dockerfile must install bpf-linker {linker}"
    );
    // The nightly xtask tells people to install (the one built on the LLVM bpf-linker links).
    let nightly = xtask
        .split("e.g. `rustup toolchain install ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("xtask names the nightly to install");
    assert!(
        dockerfile.contains(&format!("ARG NIGHTLY={nightly}\n")),
        "the Dockerfile must install {nightly}"
    );
    assert!(dockerfile.contains("--component rust-src"));
    // The static agent: the target and the C toolchain setup installs for it.
    let target = const_str(&xtask, "IMAGE_TARGET");
    assert!(
        dockerfile.contains(&format!("ARG TARGET={target}\n")),
        "the Dockerfile must build for {target}"
    );
    assert!(xtask.contains("\"musl-tools\")") && dockerfile.contains("musl-tools"));
    // Multi-stage: the builder pinned by digest, the runtime image is the binary alone (`cargo
    // xtask image` runs it in an empty root).
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    let digest = stages[0]
        .split_whitespace()
        .next()
        .and_then(|image| image.split_once("@sha256:"))
        .map(|(_, digest)| digest)
        .unwrap_or_else(|| panic!("the builder is not pinned by digest: {}", stages[0]));
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{digest}"
    );
    assert_eq!(stages[1], "scratch");
}
