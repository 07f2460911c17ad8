//! How long a run will take, printed before it starts so a `--full` run is not a surprise.
//!
//! A rough model per part and size, its constants measured on the bench machine (2 shared
//! logical CPUs, Linux 6.18, iptables-nft 1.8.9, nft 1.0.6); a faster machine finishes
//! sooner. The kube-proxy loads of the control part are capped at the load budget.

use std::time::Duration;

use super::{control::ENDPOINTS_PER_SERVICE, prog_run::CASES, Options, Part};

/// iptables-restore (iptables-nft) of kube-proxy's nat layout of N services of 10
/// endpoints: a linear and a quadratic part (0.8 s for 1,000, 21 s for 10,000, over 120 s
/// for 26,214).
const IPTABLES_RESTORE_PER_SERVICE: f64 = 0.7e-3;
const IPTABLES_RESTORE_PER_SERVICE_SQUARED: f64 = 1.4e-7;
/// One nftables transaction of N services of 10 endpoints costs ~1.4 s x (N/1000)^2 (the
/// anonymous vmaps; see rules::nft_script): 1.1 s for 1,000, 146 s for 10,000.
const NFT_SECONDS_AT_1000: f64 = 1.4;
/// The traffic part's loads (one endpoint per service; nftables in transactions of 500
/// services), per service, loading and removing.
const TRAFFIC_LOADS_PER_SERVICE: f64 = 0.8e-3;
/// Agent start to ready (release build), fixed part and per service.
const AGENT_START: f64 = 1.0;
const AGENT_PER_SERVICE: f64 = 0.15e-3;
/// The test API server taking the N services and slices (YAML parsed in the bench), and the
/// agent's initial lists over HTTP.
const API_PER_SERVICE: f64 = 0.5e-3;
/// One EndpointSlice change to datapath: fixed part and per service (each change still
/// translates every service).
const CHANGE: f64 = 0.01;
const CHANGE_PER_SERVICE: f64 = 20e-6;
/// Creating and removing a cluster of namespaces, pods and servers.
const CLUSTER: f64 = 3.0;
/// One BPF_PROG_RUN with its syscall and the packet build.
const PROG_RUN: f64 = 15e-6;
/// Filling the maps for the per-packet part, per service.
const MAPS_PER_SERVICE: f64 = 40e-6;
/// One TCP_RR round trip.
const ROUND_TRIP: f64 = 25e-6;

/// Seconds per part (0 for a part not run).
pub fn seconds(options: &Options) -> [(Part, f64); 3] {
    let budget = options.kube_proxy_load_timeout.as_secs_f64();
    let packet: f64 = options
        .prog_run_services
        .iter()
        .map(|&n| {
            2.0 + n as f64 * MAPS_PER_SERVICE + (options.packets * CASES.len()) as f64 * PROG_RUN
        })
        .sum();
    let per_dataplane =
        options.traffic_duration.as_secs_f64() + 0.25 + options.round_trips as f64 * ROUND_TRIP;
    let traffic: f64 = options
        .traffic_services
        .iter()
        .map(|&n| {
            let n = n as f64;
            CLUSTER
                + 4.0 * per_dataplane
                + n * TRAFFIC_LOADS_PER_SERVICE
                + AGENT_START
                + n * AGENT_PER_SERVICE
        })
        .sum();
    let control: f64 = options
        .control_services
        .iter()
        .map(|&requested| {
            let n = requested as f64;
            let iptables = (n * IPTABLES_RESTORE_PER_SERVICE
                + n * n * IPTABLES_RESTORE_PER_SERVICE_SQUARED)
                .min(budget);
            let nft = (NFT_SECONDS_AT_1000 * (n / 1000.0).powi(2)).min(budget);
            let sources: f64 = options
                .control_sources
                .iter()
                .map(|source| {
                    let apply = match source {
                        super::control::Source::Api => n * API_PER_SERVICE,
                        super::control::Source::Manifests => 0.0,
                    };
                    CLUSTER
                        + apply
                        + AGENT_START
                        + n * AGENT_PER_SERVICE
                        + options.changes as f64 * (CHANGE + n * CHANGE_PER_SERVICE)
                })
                .sum();
            1.0 + iptables + nft + sources
        })
        .sum();
    let on = |part: Part, s: f64| {
        if options.parts.contains(&part) {
            s
        } else {
            0.0
        }
    };
    [
        (Part::Packet, on(Part::Packet, packet)),
        (Part::Traffic, on(Part::Traffic, traffic)),
        (Part::Control, on(Part::Control, control)),
    ]
}

fn minutes(s: f64) -> String {
    let d = Duration::from_secs_f64(s.max(0.0));
    if d.as_secs() < 120 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.0} min", d.as_secs_f64() / 60.0)
    }
}

/// One line for the start of a run.
pub fn describe(options: &Options) -> String {
    let parts = seconds(options);
    let total: f64 = parts.iter().map(|(_, s)| s).sum();
    let each: Vec<String> = parts
        .iter()
        .filter(|(part, _)| options.parts.contains(part))
        .map(|(part, s)| {
            let sizes = match part {
                Part::Packet => format!("at {:?} services", options.prog_run_services),
                Part::Traffic => format!("at {:?} services", options.traffic_services),
                Part::Control => format!(
                    "at {:?} services x {ENDPOINTS_PER_SERVICE} endpoints, each kube-proxy load capped at {:.0} s",
                    options.control_services,
                    options.kube_proxy_load_timeout.as_secs_f64()
                ),
            };
            format!("{} ~{} {sizes}", format!("{part:?}").to_lowercase(), minutes(*s))
        })
        .collect();
    format!(
        "bench: estimated time ~{} ({})",
        minutes(total),
        each.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(control: Vec<usize>, budget: f64) -> Options {
        Options {
            parts: vec![Part::Control],
            prog_run_services: vec![],
            traffic_services: vec![],
            control_services: control,
            packets: 0,
            traffic_duration: Duration::ZERO,
            round_trips: 0,
            changes: 0,
            control_sources: vec![],
            kube_proxy_load_timeout: Duration::from_secs_f64(budget),
            full: false,
        }
    }

    #[test]
    fn the_budget_caps_the_quadratic_nft_load() {
        // 10,000 services: ~140 s of nft uncapped, 10 s capped.
        let uncapped = seconds(&options(vec![10_000], 1e6))[2].1;
        let capped = seconds(&options(vec![10_000], 10.0))[2].1;
        assert!(uncapped > capped + 120.0, "{uncapped} vs {capped}");
        assert!(capped < 10.0 + 10.0 + 1.0 + 1.0, "{capped}");
        assert_eq!(seconds(&options(vec![10_000], 10.0))[0].1, 0.0);
        let line = describe(&options(vec![10_000], 10.0));
        assert!(
            line.contains("control ~") && !line.contains("packet"),
            "{line}"
        );
    }
}
