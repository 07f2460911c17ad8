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
    assert_eq!(results.control[0].change_ms.count, 2);
    let plots = plot::draw(&out, &results).unwrap();
    let text = report::render(&options, &machine(), &results, &plots);
    for needle in [
        "## Per-packet cost",
        "| 10 | Sluice |",
        "| 10 | kube-proxy iptables |",
        "| 10 | kube-proxy nftables |",
        "| 10 | pod IP (floor) |",
        "## Control plane",
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
