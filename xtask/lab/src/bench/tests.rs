//! The bench's own tests (root): the kube-proxy layouts it generates are accepted by
//! `iptables-restore --test` and `nft -c` inside a network namespace the test owns, and a
//! tiny run of all three parts completes and writes the report and plots (~15 s).

use std::time::Duration;

use sluice_testbed::Node;

use super::{
    rules::{self, BenchService},
    traffic::in_node_netns,
    *,
};

fn services(n: usize) -> Vec<BenchService> {
    let endpoints: Vec<_> = (1..=3)
        .map(|k| (std::net::Ipv4Addr::new(10, 244, 7, k), 8080))
        .collect();
    traffic::bench_services(n, &endpoints)
}

#[test]
fn generated_layouts_are_accepted_by_iptables_restore_and_nft() {
    let node = Node::new("bench-rules").expect("a test netns");
    let netns = node.netns_path();
    let services = services(50);
    in_node_netns(
        netns,
        "iptables-restore",
        &["--test"],
        &rules::iptables_restore(&services),
    )
    .expect("iptables-restore --test accepts the iptables layout");
    in_node_netns(
        netns,
        "nft",
        &["-c", "-f", "-"],
        &rules::nft_script(&services),
    )
    .expect("nft -c accepts the nftables layout");
    // And both load, then go away again with the bench's own removal.
    in_node_netns(
        netns,
        "iptables-restore",
        &[],
        &rules::iptables_restore(&services),
    )
    .unwrap();
    in_node_netns(netns, "iptables-restore", &[], rules::IPTABLES_FLUSH).unwrap();
    in_node_netns(netns, "nft", &["-f", "-"], &rules::nft_script(&services)).unwrap();
    in_node_netns(netns, "nft", &["-f", "-"], rules::NFT_FLUSH).unwrap();
    let left = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["nft", "list", "ruleset"])
        .output()
        .expect("nft list ruleset");
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(
        !left.contains("kube-proxy") && !left.contains("KUBE-"),
        "{left}"
    );
}

/// `nft list ruleset` in `netns`.
fn ruleset(netns: &std::path::Path) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["nft", "list", "ruleset"])
        .output()
        .expect("nft list ruleset");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_nft_layout_in_several_transactions_is_the_same_ruleset_as_in_one() {
    let one = Node::new("bench-nft1").expect("a test netns");
    let many = Node::new("bench-nftn").expect("a test netns");
    let services = services(120);
    in_node_netns(
        one.netns_path(),
        "nft",
        &["-f", "-"],
        &rules::nft_script(&services),
    )
    .unwrap();
    let transactions = rules::nft_transactions(&services, 50);
    assert_eq!(
        transactions.len(),
        1 + 3,
        "the setup, then 50 + 50 + 20 services"
    );
    for transaction in &transactions {
        in_node_netns(many.netns_path(), "nft", &["-f", "-"], transaction).unwrap();
    }
    let (a, b) = (ruleset(one.netns_path()), ruleset(many.netns_path()));
    assert!(a.contains("numgen random mod 3 vmap"), "{a}");
    assert_eq!(a.matches("chain service-").count(), 120);
    assert_eq!(a, b);
}

#[test]
fn a_kube_proxy_load_over_the_budget_is_killed_and_leaves_nothing() {
    let node = Node::new("bench-budget").expect("a test netns");
    let netns = node.netns_path();
    // 2,000 services x 3 endpoints in one transaction: seconds, far over 100 ms.
    let script = rules::nft_script(&services(2_000));
    let took = control::load_with_budget(
        netns,
        "nft",
        &["-f", "-"],
        &script,
        Duration::from_millis(100),
    )
    .unwrap();
    assert_eq!(
        took,
        control::LoadTime::Exceeded(Duration::from_millis(100))
    );
    assert_eq!(took.to_string(), "> 0.1 s (killed)");
    let left = ruleset(netns);
    assert!(!left.contains("kube-proxy"), "{left}");
    // Within the budget it is timed, and a failing load is an error naming the program.
    let small = rules::nft_script(&services(5));
    let took =
        control::load_with_budget(netns, "nft", &["-f", "-"], &small, Duration::from_secs(60))
            .unwrap();
    assert!(matches!(took, control::LoadTime::Took(d) if d > Duration::ZERO));
    assert!(ruleset(netns).contains("service-ips"));
    let err = control::load_with_budget(
        netns,
        "nft",
        &["-f", "-"],
        "add rule ip nosuchtable nosuchchain accept\n",
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("nft -f -"), "{err:#}");
}

#[test]
fn a_tiny_run_of_every_part_writes_the_report() {
    let out = std::env::temp_dir().join(sluice_testbed::unique_name("bench-report"));
    std::fs::create_dir_all(&out).unwrap();
    let options = Options {
        parts: vec![Part::Packet, Part::Traffic, Part::Control],
        prog_run_services: vec![10],
        traffic_services: vec![10],
        control_services: vec![10],
        packets: 50,
        traffic_duration: Duration::from_millis(200),
        round_trips: 50,
        changes: 2,
        control_sources: vec![control::Source::Manifests, control::Source::Api],
        kube_proxy_load_timeout: Duration::from_secs(60),
        full: false,
    };
    let results = run_parts(&options).expect("a tiny bench run");
    assert_eq!(results.packet.len(), prog_run::CASES.len());
    assert_eq!(results.traffic.len(), 4, "four dataplanes at one size");
    assert!(results
        .traffic
        .iter()
        .all(|r| r.connections_per_s > 0.0 && r.rr_us.count == 50));
    assert_eq!(results.control.len(), 1);
    let control = &results.control[0];
    assert!(
        matches!(control.iptables_restore, control::LoadTime::Took(_))
            && matches!(control.nft_load, control::LoadTime::Took(_)),
        "{control:?}"
    );
    // Both sources, each with its agent started, measured and every change seen.
    assert_eq!(control.sluice.len(), 2, "{control:?}");
    for source in [control::Source::Manifests, control::Source::Api] {
        let m = control.source(source).expect("each source measured");
        assert_eq!(m.change_ms.count, 2, "{m:?}");
        assert!(m.agent_rss_kib > 0 && m.change_ms.p99 > 0.0, "{m:?}");
    }
    let plots = plot::draw(&out, &results).unwrap();
    let text = report::render(&options, &machine(), &results, &plots);
    for needle in [
        "## Per-packet cost",
        "| 10 | Sluice |",
        "| 10 | kube-proxy iptables |",
        "| 10 | kube-proxy nftables |",
        "| 10 | pod IP (floor) |",
        "## Control plane",
        "API server: agent start to programmed",
        "manifests: agent start to programmed",
        "## The issue's targets",
        "pkg/proxy/iptables/proxier.go",
    ] {
        assert!(
            text.contains(needle),
            "no {needle:?} in the report:\n{text}"
        );
    }
    for plot in &plots {
        let size = std::fs::metadata(out.join(plot)).unwrap().len();
        assert!(size > 1000, "{plot} is {size} bytes");
    }
    std::fs::remove_dir_all(&out).unwrap();
}
