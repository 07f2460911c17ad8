//! kube-proxy's rule layouts for the same services, generated for the comparison runs.
//!
//! The structure follows kube-proxy's own generators, kubernetes/kubernetes
//! pkg/proxy/iptables/proxier.go (iptables mode) and pkg/proxy/nftables/proxier.go (nftables
//! mode), for ClusterIP services with ready endpoints:
//!
//! - iptables: nat table, `PREROUTING`/`OUTPUT` -> `KUBE-SERVICES`, one rule per service port
//!   (`-d <vip>/32 -p tcp --dport <port> -j KUBE-SVC-<hash>`, a linear walk of the chain),
//!   `KUBE-SVC-*` marking off-cluster clients with `KUBE-MARK-MASQ` then choosing an endpoint
//!   with `-m statistic --mode random --probability 1/(n-i)`, `KUBE-SEP-*` with the hairpin
//!   `KUBE-MARK-MASQ` and the `DNAT`, `KUBE-POSTROUTING` masquerading marked packets, and the
//!   `KUBE-NODEPORTS` jump last. Chain names: the first 16 characters of base32(sha256(...)),
//!   as kube-proxy's `servicePortChainName` / `servicePortEndpointChainName`.
//! - nftables: `table ip kube-proxy`, the `service-ips` verdict map keyed by
//!   `ip daddr . meta l4proto . th dport` (one lookup whatever the number of services),
//!   `service-<hash8>-<ns>/<name>/<proto>/<port>` chains with `numgen random mod N vmap`, and
//!   `endpoint-<hash8>-...__<ip>/<port>` chains with the hairpin mark and the `dnat`.
//!
//! Left out, as they do not touch ClusterIP traffic: the filter-table chains (firewall,
//! reject of services without endpoints, KUBE-FORWARD's conntrack INVALID drop), NodePorts,
//! external and load-balancer IPs, session affinity.

use std::{fmt::Write as _, net::Ipv4Addr};

use sha2::{Digest as _, Sha256};

/// One ClusterIP service port with its endpoints (all ready), as the generators see it.
#[derive(Clone, Debug)]
pub struct BenchService {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// The port name kube-proxy builds chain names from: `<ns>/<name>:<port name>`.
impl BenchService {
    fn port_name(&self) -> String {
        format!("{}/{}:p{}", self.namespace, self.name, self.port)
    }
}

/// The cluster CIDR (`--cluster-cidr`), for the "masquerade off-cluster clients" rules.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// kube-proxy's hash for chain names: base32 (RFC 4648, no padding) of sha256, cut.
fn chain_hash(text: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::new();
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for byte in digest {
        if out.len() >= len {
            break;
        }
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
        buffer &= (1 << bits) - 1;
    }
    out
}

fn svc_chain(service: &BenchService) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&format!("{}tcp", service.port_name()), 16)
    )
}

fn sep_chain(service: &BenchService, endpoint: (Ipv4Addr, u16)) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(
            &format!("{}tcp{}:{}", service.port_name(), endpoint.0, endpoint.1),
            16
        )
    )
}

/// The iptables-restore input kube-proxy's iptables mode would write for `services`
/// (nat table only; see the module doc).
pub fn iptables_restore(services: &[BenchService]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    // The jumps from the built-in chains (kube-proxy adds these with `iptables -I` once).
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    let mut per_service = String::new();
    for service in services {
        let svc = svc_chain(service);
        let name = service.port_name();
        let (vip, port) = (service.vip, service.port);
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip}/32 --dport {port} -j {svc}"
        );
        let _ = writeln!(
            per_service,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip}/32 --dport {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
        );
        let n = service.endpoints.len();
        for (i, &endpoint) in service.endpoints.iter().enumerate() {
            let sep = sep_chain(service, endpoint);
            let (ip, eport) = endpoint;
            let _ = writeln!(chains, ":{sep} - [0:0]");
            if i + 1 < n {
                let probability = 1.0 / (n - i) as f64;
                let _ = writeln!(
                    per_service,
                    "-A {svc} -m comment --comment \"{name} -> {ip}:{eport}\" -m statistic --mode random --probability {probability:.10} -j {sep}"
                );
            } else {
                let _ = writeln!(
                    per_service,
                    "-A {svc} -m comment --comment \"{name} -> {ip}:{eport}\" -j {sep}"
                );
            }
            let _ = writeln!(
                per_service,
                "-A {sep} -m comment --comment {name} -s {ip}/32 -j KUBE-MARK-MASQ\n\
                 -A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ip}:{eport}"
            );
        }
    }
    rules.push_str(&per_service);
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// The `nft -f` input kube-proxy's nftables mode would write for `services` (see the module
/// doc), as one transaction in the form kube-proxy's nft library (sigs.k8s.io/knftables)
/// writes it: one `add`/`flush` command per line, in the order of proxier.go's
/// `syncProxyRules` on a full sync: the table, base chains and maps first (`setupNFTables`),
/// then per service its endpoint chains (`add chain` + `flush chain`, `ensureChain`), its
/// service chain, its `service-ips` element (one `add element` each, `ensureElem`), the
/// masquerade rule, the `numgen` rule (`writeServiceToEndpointRules`) and the endpoint
/// chains' rules. Starts by deleting any earlier `kube-proxy` table (a cold start).
///
/// Load time: each `numgen random mod N vmap { ... }` is an anonymous map, and the kernel
/// (`__nft_set_trans_bind`, net/netfilter/nf_tables_api.c) walks the whole transaction
/// when a rule binds one, so one transaction of N services costs O(N^2): ~0.9 s for 1,000
/// services x 10 endpoints, ~14 s for 4,000, minutes for 10,000 on the bench machine; the
/// same script without the numgen rules loads 4,000 in 1.9 s. kube-proxy writes exactly
/// these anonymous maps and pays the same (kubernetes/kubernetes#130119 measured 3m14s for
/// the first sync of 10,000 services x 2 endpoints on kernel 6.8; #139328, #139513 track
/// its cold start), so the bench keeps them.
pub fn nft_script(services: &[BenchService]) -> String {
    let mut out = nft_setup();
    for service in services {
        nft_service(&mut out, service);
    }
    out
}

/// The same ruleset as [`nft_script`] in several transactions: the setup, then
/// `per_transaction` services at a time (as kubernetes/kubernetes#139546 proposes for
/// kube-proxy's cold start). The traffic part loads it this way, since only the resulting
/// ruleset matters there; the control part times the one transaction kube-proxy writes.
pub fn nft_transactions(services: &[BenchService], per_transaction: usize) -> Vec<String> {
    let mut out = vec![nft_setup()];
    for chunk in services.chunks(per_transaction.max(1)) {
        let mut text = String::new();
        for service in chunk {
            nft_service(&mut text, service);
        }
        out.push(text);
    }
    out
}

const T: &str = "ip kube-proxy";

/// `setupNFTables`: the table, the base chains, the service-ips map and its lookup.
fn nft_setup() -> String {
    format!(
        "add table {T}\ndelete table {T}\n\
         add table {T} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {T} mark-for-masquerade\n\
         flush chain {T} mark-for-masquerade\n\
         add rule {T} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {T} masquerading\n\
         flush chain {T} masquerading\n\
         add rule {T} masquerading mark and 0x4000 == 0 return\n\
         add rule {T} masquerading mark set mark xor 0x4000\n\
         add rule {T} masquerading masquerade fully-random\n\
         add chain {T} services\n\
         flush chain {T} services\n\
         add chain {T} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {T} nat-prerouting jump services\n\
         add chain {T} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {T} nat-output jump services\n\
         add chain {T} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {T} nat-postrouting jump masquerading\n\
         add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    )
}

/// One service's commands, in `syncProxyRules`' order.
fn nft_service(out: &mut String, service: &BenchService) {
    let base = format!(
        "{}/{}/tcp/p{}",
        service.namespace, service.name, service.port
    );
    let svc = format!("service-{}-{base}", chain_hash(&base, 8));
    let (vip, port) = (service.vip, service.port);
    let endpoint_chains: Vec<String> = service
        .endpoints
        .iter()
        .map(|(ip, eport)| {
            let ep_base = format!("{base}__{ip}/{eport}");
            format!("endpoint-{}-{ep_base}", chain_hash(&ep_base, 8))
        })
        .collect();
    for chain in endpoint_chains.iter().chain([&svc]) {
        let _ = writeln!(out, "add chain {T} {chain}\nflush chain {T} {chain}");
    }
    let _ = writeln!(
        out,
        "add element {T} service-ips {{ {vip} . tcp . {port} : goto {svc} }}\n\
         add rule {T} {svc} ip daddr {vip} tcp dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"
    );
    let targets: Vec<String> = endpoint_chains
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {ep}"))
        .collect();
    let _ = writeln!(
        out,
        "add rule {T} {svc} numgen random mod {} vmap {{ {} }}",
        targets.len(),
        targets.join(" , ")
    );
    for (ep, (ip, eport)) in endpoint_chains.iter().zip(&service.endpoints) {
        let _ = writeln!(
            out,
            "add rule {T} {ep} ip saddr {ip} jump mark-for-masquerade\n\
             add rule {T} {ep} meta l4proto tcp dnat to {ip}:{eport}"
        );
    }
}

/// Removes what [`iptables_restore`] loaded: the nat table flushed back to empty built-ins.
pub const IPTABLES_FLUSH: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// Removes what [`nft_script`] loaded.
pub const NFT_FLUSH: &str = "table ip kube-proxy\ndelete table ip kube-proxy\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<BenchService> {
        vec![BenchService {
            namespace: "ns1".into(),
            name: "svc1".into(),
            vip: Ipv4Addr::new(10, 96, 0, 41),
            port: 80,
            endpoints: vec![
                (Ipv4Addr::new(10, 244, 0, 1), 8080),
                (Ipv4Addr::new(10, 244, 0, 2), 8080),
                (Ipv4Addr::new(10, 244, 0, 3), 8080),
            ],
        }]
    }

    #[test]
    fn base32_of_sha256_matches_a_known_value() {
        // sha256("") = e3b0c442...; its base32 starts "4OYMIQUY7QOBJGX3".
        assert_eq!(chain_hash("", 16), "4OYMIQUY7QOBJGX3");
    }

    #[test]
    fn iptables_layout_has_kube_proxys_chains_and_probabilities() {
        let text = iptables_restore(&two());
        let svc = svc_chain(&two()[0]);
        assert!(text.contains(&format!("-j {svc}\n")), "{text}");
        assert!(text.contains("--probability 0.3333333333"), "{text}");
        assert!(text.contains("--probability 0.5000000000"), "{text}");
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 3);
        assert_eq!(text.matches(":KUBE-SEP-").count(), 3);
    }

    #[test]
    fn nft_layout_has_the_verdict_map_and_numgen() {
        let text = nft_script(&two());
        assert!(text.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(text.contains(
            "add element ip kube-proxy service-ips { 10.96.0.41 . tcp . 80 : goto service-"
        ));
        // Every chain is created before a rule names it (knftables' order).
        let svc = text
            .lines()
            .find_map(|l| l.strip_prefix("add chain ip kube-proxy service-"))
            .expect("a service chain");
        let created = text
            .find(&format!("add chain ip kube-proxy service-{svc}\n"))
            .unwrap();
        let used = text.find(&format!("goto service-{svc} }}")).unwrap();
        assert!(created < used, "{text}");
        assert_eq!(text.matches("dnat to 10.244.0.").count(), 3);
    }
}
