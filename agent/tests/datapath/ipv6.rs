//! The IPv6 path.

use crate::support::*;

/// An IPv6 frontend without endpoints answers a TCP SYN with RST|ACK and UDP with an ICMPv6
/// port unreachable quoting the packet, from the frontend, bounced back out the interface; the
/// answers equal the packets built from scratch. A Local policy's frontend drops instead.
#[test]
fn an_ipv6_frontend_without_endpoints_rejects_with_a_reset_or_port_unreachable() {
    use packet::{icmp6_packet, ipv6_packet, tcp6_packet, udp6_packet, Flow6};
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let client6: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
    let frontend6 = |port, proto| Frontend {
        ip: vip6.into(),
        port,
        proto,
    };
    let mut dropping = entry(FrontendKind::NodePort, &[], &[]);
    dropping.when_empty = WhenEmpty::Drop;
    let node_ip6: Ipv6Addr = "fc00:f853:ccd:e793::3".parse().unwrap();
    let services = vec![
        (
            frontend6(80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[], &[]),
        ),
        (
            frontend6(53, Protocol::Udp),
            entry(FrontendKind::ClusterIp, &[], &[]),
        ),
        (
            Frontend {
                ip: node_ip6.into(),
                port: NODE_PORT,
                proto: Protocol::Tcp,
            },
            dropping,
        ),
    ];
    let datapath = node_datapath(services, &node_context(false));

    let syn_flow = Flow6 {
        proto: PROTO_TCP,
        src: client6,
        sport: 40_000,
        dst: vip6,
        dport: 80,
    };
    let syn = tcp6_packet(&syn_flow, TCP_SYN, b"data");
    let ran = run_at(datapath.from_pod(), &syn, None);
    assert_eq!(ran.return_value, TC_ACT_REDIRECT);
    assert_eq!(ran.reason, Some(REASON_REJECT_NO_ENDPOINTS));
    assert_bounced(&syn, &ran.packet);
    packet::verify_checksums6(&ran.packet).unwrap();
    // RST|ACK, seq 0, ack = the SYN's seq + 1 (SYN) + 4 (payload), window 0.
    let mut rst = Vec::new();
    rst.extend_from_slice(&80u16.to_be_bytes());
    rst.extend_from_slice(&40_000u16.to_be_bytes());
    rst.extend_from_slice(&0u32.to_be_bytes());
    rst.extend_from_slice(&(0x0102_0304u32 + 5).to_be_bytes());
    rst.extend_from_slice(&[5 << 4, TCP_RST | TCP_ACK, 0, 0, 0, 0, 0, 0]);
    let expected = ipv6_packet(vip6, client6, PROTO_TCP, rst, Some(16));
    assert_eq!(ran.packet[ETH_HLEN..], expected[ETH_HLEN..], "the RST");

    let udp_flow = Flow6 {
        proto: PROTO_UDP,
        dport: 53,
        ..syn_flow
    };
    let datagram = udp6_packet(&udp_flow, PAYLOAD);
    let ran = run_at(datapath.from_pod(), &datagram, None);
    assert_eq!(ran.return_value, TC_ACT_REDIRECT);
    assert_eq!(ran.reason, Some(REASON_REJECT_NO_ENDPOINTS));
    assert_bounced(&datagram, &ran.packet);
    packet::verify_checksums6(&ran.packet).unwrap();
    let mut body = vec![0; 4]; // unused
    body.extend_from_slice(&datagram[ETH_HLEN..ETH_HLEN + 48]);
    let expected = icmp6_packet(vip6, client6, 1, 4, &body);
    assert_eq!(
        ran.packet[ETH_HLEN..],
        expected[ETH_HLEN..],
        "the port unreachable"
    );

    // externalTrafficPolicy Local without local endpoints: dropped.
    let to_node_port = tcp6_packet(
        &Flow6 {
            dst: node_ip6,
            dport: NODE_PORT,
            ..syn_flow
        },
        TCP_SYN,
        &[],
    );
    let ran = run_at(datapath.from_world(), &to_node_port, None);
    assert_eq!(
        (ran.return_value, ran.reason),
        (TC_ACT_SHOT, Some(REASON_DROP_NO_LOCAL_ENDPOINTS))
    );
    assert!(datapath.conntrack6_entries().unwrap().is_empty());
}

/// A removed IPv6 backend loses its UDP flows at once (their next packet is balanced over the
/// live backends); its TCP flows drain.
#[test]
fn removed_ipv6_backends_lose_their_udp_flows_at_once() {
    use packet::{tcp6_packet, udp6_packet, Flow6};
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let a = be("fd00:10:244::7".parse::<Ipv6Addr>().unwrap(), 8080);
    let b = be("fd00:10:244::8".parse::<Ipv6Addr>().unwrap(), 8080);
    let services = |backends: &[BackendAddr]| {
        [Protocol::Udp, Protocol::Tcp]
            .map(|proto| {
                (
                    Frontend {
                        ip: vip6.into(),
                        port: 80,
                        proto,
                    },
                    entry(FrontendKind::ClusterIp, backends, backends),
                )
            })
            .to_vec()
    };
    let mut datapath = node_datapath(services(&[a]), &node_context(false));
    let flow = Flow6 {
        proto: PROTO_UDP,
        src: "fd00:10:244::5".parse().unwrap(),
        sport: 40_000,
        dst: vip6,
        dport: 80,
    };
    let tcp = Flow6 {
        proto: PROTO_TCP,
        ..flow
    };
    let out = expect6(
        datapath.from_pod(),
        &udp6_packet(&flow, PAYLOAD),
        None,
        TC_ACT_OK,
    );
    assert_eq!(be(ipv6_dst(&out).0, ipv6_dst(&out).1), a);
    expect6(
        datapath.from_pod(),
        &tcp6_packet(&tcp, TCP_SYN, &[]),
        None,
        TC_ACT_OK,
    );
    assert_eq!(datapath.conntrack6_entries().unwrap().len(), 4);

    let stats = resync(&mut datapath, services(&[b]));
    assert_eq!(stats.purged, 2, "{stats:?}");
    let left = datapath.conntrack6_entries().unwrap();
    assert!(left.iter().all(|(k, _)| k.proto == PROTO_TCP), "{left:?}");
    let out = expect6(
        datapath.from_pod(),
        &udp6_packet(&flow, PAYLOAD),
        None,
        TC_ACT_OK,
    );
    assert_eq!(be(ipv6_dst(&out).0, ipv6_dst(&out).1), b);
}

/// A pod reaching itself through an IPv6 ClusterIP: source-NATed to the IPv6 service
/// loopback address and sent back out its interface; its reply is reverse-translated and sent
/// back too. Both packets equal the ones built from scratch with the new tuples.
#[test]
fn ipv6_hairpin_is_masqueraded_to_the_service_loopback_and_sent_back() {
    use packet::{tcp6_packet, Flow6};
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let pod: Ipv6Addr = "fd00:10:244::7".parse().unwrap();
    let loopback = Ipv6Addr::from(sluice_common::HAIRPIN6_SNAT_ADDR);
    assert_eq!(loopback, "fd00:a9fe:2a01::1".parse::<Ipv6Addr>().unwrap());
    let backend = be(pod, 8080);
    let datapath = node_datapath(
        vec![(
            Frontend {
                ip: vip6.into(),
                port: 80,
                proto: Protocol::Tcp,
            },
            entry(FrontendKind::ClusterIp, &[backend], &[backend]),
        )],
        &node_context(false),
    );
    let flow = Flow6 {
        proto: PROTO_TCP,
        src: pod,
        sport: 40_000,
        dst: vip6,
        dport: 80,
    };
    let syn = tcp6_packet(&flow, TCP_SYN, &[]);
    let out = expect6(datapath.from_pod(), &syn, None, TC_ACT_REDIRECT);
    assert_bounced(&syn, &out);
    let hairpinned = Flow6 {
        proto: PROTO_TCP,
        src: loopback,
        sport: 40_000, // free: kept
        dst: pod,
        dport: 8080,
    };
    // Sent back without the kernel's forwarding: the program decremented the hop limit.
    assert_eq!(
        out[ETH_HLEN..],
        with_hop_limit(&tcp6_packet(&hairpinned, TCP_SYN, &[]), 63)[ETH_HLEN..]
    );

    let answer = tcp6_packet(&hairpinned.reversed(), TCP_SYN | TCP_ACK, &[]);
    let out = expect6(datapath.from_pod(), &answer, None, TC_ACT_REDIRECT);
    assert_bounced(&answer, &out);
    assert_eq!(
        out[ETH_HLEN..],
        with_hop_limit(&tcp6_packet(&flow.reversed(), TCP_SYN | TCP_ACK, &[]), 63)[ETH_HLEN..]
    );
}

/// An IPv6 ClusterIP's TCP and UDP flows from a pod: destination NAT to a backend, every later
/// packet to the same backend, replies reverse-NATed to the frontend; every rewritten packet
/// equals, byte for byte, the packet built from scratch with the new tuple (so its L4 checksum
/// is the one computed over the new pseudo header), and its checksum verifies independently.
#[test]
fn ipv6_cluster_ip_flows_are_dnated_and_reverse_natted_with_valid_checksums() {
    use packet::{tcp6_packet, udp6_packet, verify_checksums6, Flow6};
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let client6: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
    let backends6 = [
        be("fd00:10:244::7".parse::<Ipv6Addr>().unwrap(), 8080),
        be("fd00:10:244:1::9".parse::<Ipv6Addr>().unwrap(), 8080),
    ];
    let mut services = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        services.push((
            Frontend {
                ip: vip6.into(),
                port: 80,
                proto,
            },
            entry(FrontendKind::ClusterIp, &backends6, &backends6[..1]),
        ));
    }
    let mut node = node_context(false);
    node.node_ips.push("fc00:f853:ccd:e793::3".parse().unwrap());
    let mut datapath = load_private();
    assert!(datapath.set_node_config(&node).expect("config"));
    let stats = datapath
        .sync(&DesiredState {
            services: services.into_iter().map(|(f, e)| (f, e.into())).collect(),
            ..Default::default()
        })
        .expect("sync");
    assert_eq!(stats.ipv6_programmed, 2, "{stats:?}");
    let programmed = datapath.programmed_services6();
    assert_eq!(programmed.len(), 2);
    assert_eq!(programmed[0].4.len(), 2);

    let mut seen = BTreeSet::new();
    for (i, proto) in [PROTO_TCP, PROTO_UDP].into_iter().enumerate() {
        for sport in 0..16u16 {
            let flow = Flow6 {
                proto,
                src: client6,
                sport: 40_000 + sport + 100 * i as u16,
                dst: vip6,
                dport: 80,
            };
            let build = |flow: &Flow6, answer: bool| {
                if proto == PROTO_TCP {
                    let flags = if answer { TCP_SYN | TCP_ACK } else { TCP_SYN };
                    tcp6_packet(flow, flags, &[])
                } else {
                    udp6_packet(flow, PAYLOAD)
                }
            };
            let first = build(&flow, false);
            let out = expect6(datapath.from_pod(), &first, None, TC_ACT_OK);
            verify_checksums6(&out).unwrap();
            let (dst, dport) = ipv6_dst(&out);
            let backend = be(dst, dport);
            assert!(backends6.contains(&backend), "DNAT to {backend}");
            seen.insert(backend);
            let dnated = Flow6 { dst, dport, ..flow };
            assert_eq!(out, build(&dnated, false), "the DNATed packet of {flow}");

            // The next packet of the flow goes to the same backend.
            let next = if proto == PROTO_TCP {
                tcp6_packet(&flow, TCP_PSH_ACK, PAYLOAD)
            } else {
                udp6_packet(&flow, b"again")
            };
            let out = expect6(datapath.from_pod(), &next, None, TC_ACT_OK);
            assert_eq!(ipv6_dst(&out), (dst, dport), "{flow} changed backend");
            verify_checksums6(&out).unwrap();

            // The backend's answer leaves towards the client from the frontend.
            let reply = build(&dnated.reversed(), true);
            let out = expect6(datapath.to_pod(), &reply, None, TC_ACT_OK);
            verify_checksums6(&out).unwrap();
            assert_eq!(out, build(&flow.reversed(), true), "the reply of {flow}");
        }
    }
    assert_eq!(seen.len(), 2, "both backends are used: {seen:?}");
    assert_eq!(datapath.conntrack6_entries().unwrap().len(), 2 * 32);
    assert!(datapath.conntrack_entries().unwrap().is_empty());

    // A ClusterIP from outside the node is balanced too (as kube-proxy does; without IPv6
    // cluster CIDRs configured nothing tells an outside source apart, so it is not
    // masqueraded: see ipv6_cluster_ip_traffic_from_outside_the_cluster_cidrs_is_masqueraded).
    let from_outside = tcp6_packet(
        &Flow6 {
            proto: PROTO_TCP,
            src: "2001:db8::1".parse().unwrap(),
            sport: 50_000,
            dst: vip6,
            dport: 80,
        },
        TCP_SYN,
        &[],
    );
    let out = expect6(datapath.from_world(), &from_outside, None, TC_ACT_OK);
    let (dst, _) = ipv6_dst(&out);
    assert!(
        backends6
            .iter()
            .any(|b| b.ip == std::net::IpAddr::from(dst)),
        "{dst} is a backend"
    );
    assert_eq!(ipv6_src(&out).0, "2001:db8::1".parse::<Ipv6Addr>().unwrap());

    // Removing the frontends empties the IPv6 maps' programming.
    let stats = resync(&mut datapath, vec![]);
    assert_eq!(stats.ipv6_programmed, 0);
    assert!(datapath.programmed_services6().is_empty());
    let out = expect6(
        datapath.from_pod(),
        &tcp6_packet(
            &Flow6 {
                proto: PROTO_TCP,
                src: client6,
                sport: 45_000,
                dst: vip6,
                dport: 80,
            },
            TCP_SYN,
            &[],
        ),
        None,
        TC_ACT_OK,
    );
    assert_eq!(ipv6_dst(&out), (vip6, 80));
}

/// Neighbour discovery, router solicitations, ICMPv6, fragments and packets with extension
/// headers pass every program byte-identical on a dual-stack node, as does TCP/UDP to IPv6
/// addresses that are no frontend; the IPv4 frontend of the same dual-stack service is still
/// translated.
#[test]
fn ipv6_control_traffic_fragments_and_extension_headers_pass_every_program_untouched() {
    use packet::{
        icmp6_packet, neighbor_solicitation, tcp6_packet, udp6_packet, verify_checksums6,
        with_ipv6_extension, Flow6, ICMPV6_ECHO_REQUEST, ICMPV6_NEIGHBOR_ADVERTISEMENT,
        ICMPV6_PACKET_TOO_BIG, ICMPV6_ROUTER_ADVERTISEMENT, ICMPV6_ROUTER_SOLICITATION,
        IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING,
    };
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let client6: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
    let backend4 = be(LOCAL_POD, 8080);
    let backend6 = be("fd00:10:244::7".parse::<Ipv6Addr>().unwrap(), 8080);
    let mut node = node_context(false);
    node.node_ips.push("fc00:f853:ccd:e793::3".parse().unwrap());
    node.cluster_cidrs.push("fd00:10:244::/56".parse().unwrap());
    let services = vec![
        (
            frontend(VIP, 80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[backend4], &[backend4]),
        ),
        (
            Frontend {
                ip: vip6.into(),
                port: 80,
                proto: Protocol::Tcp,
            },
            entry(FrontendKind::ClusterIp, &[backend6], &[backend6]),
        ),
        (
            Frontend {
                ip: vip6.into(),
                port: 53,
                proto: Protocol::Udp,
            },
            entry(FrontendKind::ClusterIp, &[], &[]),
        ),
    ];
    let mut datapath = load_private();
    assert!(datapath.set_node_config(&node).expect("config"));
    let stats = datapath
        .sync(&DesiredState {
            services: services.into_iter().map(|(f, e)| (f, e.into())).collect(),
            ..Default::default()
        })
        .expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    assert_eq!((stats.added, stats.ipv6_programmed), (1, 2), "{stats:?}");

    let tcp = Flow6 {
        proto: PROTO_TCP,
        src: client6,
        sport: 40_000,
        dst: "fd00:10:244:9::9".parse().unwrap(),
        dport: 80,
    };
    let udp = Flow6 {
        proto: PROTO_UDP,
        ..tcp
    };
    let to_vip = Flow6 { dst: vip6, ..tcp };
    let udp_to_vip = Flow6 {
        dport: 53,
        ..Flow6 { dst: vip6, ..udp }
    };
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
    let mut quoted = tcp6_packet(&tcp.reversed(), TCP_SYN | TCP_ACK, &[])[ETH_HLEN..].to_vec();
    quoted.truncate(48);
    let mut too_big = 1280u32.to_be_bytes().to_vec();
    too_big.extend_from_slice(&quoted);

    let packets: Vec<(&str, Vec<u8>)> = vec![
        (
            "neighbour solicitation for the VIP",
            neighbor_solicitation(client6, vip6),
        ),
        (
            "neighbour advertisement",
            icmp6_packet(
                vip6,
                client6,
                ICMPV6_NEIGHBOR_ADVERTISEMENT,
                0,
                &[0x60, 0, 0, 0],
            ),
        ),
        (
            "router solicitation",
            icmp6_packet(
                link_local,
                all_routers,
                ICMPV6_ROUTER_SOLICITATION,
                0,
                &[0; 4],
            ),
        ),
        (
            "router advertisement",
            icmp6_packet(
                link_local,
                client6,
                ICMPV6_ROUTER_ADVERTISEMENT,
                0,
                &[64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        ),
        (
            "echo request to the VIP",
            icmp6_packet(client6, vip6, ICMPV6_ECHO_REQUEST, 0, &[0, 1, 0, 1]),
        ),
        (
            "packet too big about a non-translated flow",
            icmp6_packet(link_local, client6, ICMPV6_PACKET_TOO_BIG, 0, &too_big),
        ),
        (
            "TCP SYN to a non-service address",
            tcp6_packet(&tcp, TCP_SYN, &[]),
        ),
        ("UDP to a non-service address", udp6_packet(&udp, PAYLOAD)),
        (
            "first fragment of a UDP datagram to the VIP",
            with_ipv6_extension(&udp6_packet(&udp_to_vip, PAYLOAD), IPV6_FRAGMENT, (0, true)),
        ),
        (
            "non-first fragment to the VIP",
            with_ipv6_extension(
                &udp6_packet(&udp_to_vip, PAYLOAD),
                IPV6_FRAGMENT,
                (2, false),
            ),
        ),
        (
            "TCP SYN to the VIP behind a routing header",
            with_ipv6_extension(
                &tcp6_packet(&to_vip, TCP_SYN, &[]),
                IPV6_ROUTING,
                (0, false),
            ),
        ),
        (
            "TCP SYN to the VIP behind hop-by-hop options",
            with_ipv6_extension(
                &tcp6_packet(&to_vip, TCP_SYN, &[]),
                IPV6_HOP_BY_HOP,
                (0, false),
            ),
        ),
        (
            "TCP SYN to the VIP behind destination options",
            with_ipv6_extension(
                &tcp6_packet(&to_vip, TCP_SYN, &[]),
                IPV6_DEST_OPTS,
                (0, false),
            ),
        ),
    ];
    for (name, packet) in &packets {
        verify_checksums6(packet).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (program, which) in [
            (datapath.from_pod(), "from_pod"),
            (datapath.from_world(), "from_world"),
            (datapath.to_pod(), "to_pod"),
            (datapath.to_world(), "to_world"),
        ] {
            let ran = run_at(program, packet, None);
            assert_eq!(
                (ran.return_value, ran.reason),
                (TC_ACT_OK, None),
                "{which} verdict for {name}"
            );
            assert_eq!(&ran.packet, packet, "{which} changed {name}");
        }
    }
    assert!(datapath.conntrack_entries().unwrap().is_empty());

    // The IPv4 frontend of the dual-stack service is translated as before.
    let flow = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, VIP, 80);
    let out = expect(datapath.from_pod(), &first_packet(&flow), None, TC_ACT_OK);
    assert_eq!(dnat_target(&flow, &out), backend4);
}

// ---------------------------------------------------------------------------------------------
// IPv6 behaviours on a node: affinity, source ranges, ICMPv6 errors, masquerade, pods and
// externalTrafficPolicy Local. Helpers at the end.

/// sessionAffinity ClientIP on IPv6 frontends: a client keeps its backend for every new flow,
/// whether it comes through the ClusterIP or the NodePort of the service port (one affinity
/// entry for both, as kube-proxy keys it by service port); once the timeout passed, a client
/// is balanced again.
#[test]
fn ipv6_session_affinity_is_shared_by_a_service_ports_frontends_and_expires() {
    use packet::{tcp6_packet, Flow6};

    let backends: Vec<BackendAddr> = (1..=8u16)
        .map(|i| be(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, i), 8080))
        .collect();
    let cluster_ip = frontend6(VIP6, 80, Protocol::Tcp);
    let node_port = frontend6(NODE6, NODE_PORT, Protocol::Tcp);
    let short = frontend6(VIP6, 81, Protocol::Tcp);
    let sticky = |kind, timeout, name: &str| {
        let mut e = entry(kind, &backends, &[]);
        e.name = name.into();
        e.affinity_timeout = Some(timeout);
        e
    };
    let services = vec![
        (
            cluster_ip,
            sticky(FrontendKind::ClusterIp, 10_800, "default/web:http"),
        ),
        (
            node_port,
            sticky(FrontendKind::NodePort, 10_800, "default/web:http"),
        ),
        (
            short,
            sticky(FrontendKind::ClusterIp, 1, "default/web:short"),
        ),
    ];
    let mut datapath = node_datapath(services.clone(), &node_context6(false));
    let backend_of = |datapath: &Datapath, to: Frontend, sport: u16| {
        let flow = Flow6 {
            proto: PROTO_TCP,
            src: CLIENT6,
            sport,
            dst: v6(to.ip),
            dport: to.port,
        };
        let out = expect6(
            datapath.from_pod(),
            &tcp6_packet(&flow, TCP_SYN, &[]),
            None,
            TC_ACT_OK,
        );
        be(ipv6_dst(&out).0, ipv6_dst(&out).1)
    };

    // 30 new connections through either frontend: all to the first one's backend (a random
    // choice would differ with probability 1 - 8^-29).
    let first = backend_of(&datapath, cluster_ip, 20_000);
    for sport in 20_001..20_030 {
        let through = if sport % 2 == 0 {
            cluster_ip
        } else {
            node_port
        };
        assert_eq!(
            backend_of(&datapath, through, sport),
            first,
            "through {through}"
        );
    }
    let entries = datapath.affinity6_entries().unwrap();
    assert_eq!(
        entries.len(),
        1,
        "one entry for both frontends: {entries:?}"
    );
    assert_eq!(Ipv6Addr::from(octets(entries[0].0.client)), CLIENT6);

    // A 1-second affinity: within it the backend stays; after it the client is balanced
    // again (over 5 expiries, 8 backends: the same backend every time with probability 8^-5).
    let mut seen = BTreeSet::new();
    for round in 0..5u16 {
        let b = backend_of(&datapath, short, 30_000 + 10 * round);
        assert_eq!(
            backend_of(&datapath, short, 30_001 + 10 * round),
            b,
            "within the timeout"
        );
        seen.insert(b);
        std::thread::sleep(std::time::Duration::from_millis(1_100));
    }
    assert!(
        seen.len() > 1,
        "expired affinity is balanced again: {seen:?}"
    );
    assert_eq!(datapath.affinity6_entries().unwrap().len(), 2);

    // The NodePort goes: the ClusterIP shares its affinity id, so the client keeps its
    // backend. The short service goes: its entry goes with its (retired) id.
    resync(&mut datapath, services[..1].to_vec());
    assert_eq!(backend_of(&datapath, cluster_ip, 20_100), first);
    let entries = datapath.affinity6_entries().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    // The last frontend of the id goes: so do its entries.
    resync(&mut datapath, vec![]);
    assert!(datapath.affinity6_entries().unwrap().is_empty());
}

/// loadBalancerSourceRanges on an IPv6 load balancer IP: sources in a range are balanced,
/// others dropped (counted); a change of ranges applies at once.
#[test]
fn ipv6_load_balancer_source_ranges_admit_only_their_sources() {
    use packet::{tcp6_packet, Flow6};

    let lb: Ipv6Addr = "2001:db8:ffff::50".parse().unwrap();
    let backend = be(LOCAL_POD6, 8443);
    let with_ranges = |ranges: &[&str]| {
        let mut e = entry(FrontendKind::LoadBalancer, &[backend], &[backend]);
        e.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        vec![(frontend6(lb, 443, Protocol::Tcp), e)]
    };
    let mut datapath = node_datapath(with_ranges(&["2001:db8:1::/48"]), &node_context6(false));
    let from = |src: &str, sport| {
        tcp6_packet(
            &Flow6 {
                proto: PROTO_TCP,
                src: src.parse().unwrap(),
                sport,
                dst: lb,
                dport: 443,
            },
            TCP_SYN,
            &[],
        )
    };
    let admitted = |datapath: &Datapath, src: &str, sport| {
        let ran = run_at(datapath.from_world(), &from(src, sport), None);
        match (ran.return_value, ran.reason) {
            (TC_ACT_OK, None) => {
                assert_eq!(
                    be(ipv6_dst(&ran.packet).0, ipv6_dst(&ran.packet).1),
                    backend
                );
                true
            }
            (TC_ACT_SHOT, Some(REASON_DROP_SOURCE_RANGE)) => false,
            other => panic!("from {src}: {other:?}"),
        }
    };
    assert!(admitted(&datapath, "2001:db8:1:2::5", 40_000));
    assert!(!admitted(&datapath, "2001:db8:2::5", 40_001));
    assert!(!admitted(&datapath, "2001:db9::5", 40_002));
    assert_eq!(
        datapath
            .drop_counts()
            .unwrap()
            .get(&REASON_DROP_SOURCE_RANGE),
        Some(&2)
    );

    resync(
        &mut datapath,
        with_ranges(&["2001:db8:2::/48", "2001:db9::5/128"]),
    );
    assert!(!admitted(&datapath, "2001:db8:1:2::5", 40_010));
    assert!(admitted(&datapath, "2001:db8:2::5", 40_011));
    assert!(admitted(&datapath, "2001:db9::5", 40_012));
    assert!(!admitted(&datapath, "2001:db9::6", 40_013));

    // Without ranges every source is admitted again.
    resync(&mut datapath, with_ranges(&[]));
    assert!(admitted(&datapath, "2001:db9::6", 40_020));
}

/// ICMPv6 errors about translated flows are translated like the flow's packets, both ways, and
/// equal the errors built from scratch about the packets each side knows (the quoted L4
/// checksum is left as it was):
/// * a backend's port unreachable about a client's datagram, toward the client (to_pod): from
///   the frontend, quoting client -> frontend;
/// * a router's time exceeded about a masqueraded packet toward a remote backend, toward the
///   client outside (from_world, redirected): quoting client -> NodePort;
/// * a router's packet too big about a reply as the client got it, toward the backend
///   (from_world, redirected): quoting backend -> masquerade address.
#[test]
fn ipv6_icmp_errors_about_translated_flows_are_translated_back() {
    use packet::{icmp6_packet, tcp6_packet, udp6_packet, Flow6};

    // The backend's port unreachable, about a ClusterIP datagram of a local pod.
    let backend = be(LOCAL_POD6, 5353);
    let datapath = node_datapath(
        vec![(
            frontend6(VIP6, 53, Protocol::Udp),
            entry(FrontendKind::ClusterIp, &[backend], &[backend]),
        )],
        &node_context6(false),
    );
    let query = udp6_packet(
        &Flow6 {
            proto: PROTO_UDP,
            src: CLIENT6,
            sport: 40_000,
            dst: VIP6,
            dport: 53,
        },
        b"query",
    );
    let dnated = expect6(datapath.from_pod(), &query, None, TC_ACT_OK);
    let unreachable = icmp6_packet(LOCAL_POD6, CLIENT6, 1, 4, &error_body(0, &dnated));
    let out = expect6(datapath.to_pod(), &unreachable, None, TC_ACT_OK);
    let expected = icmp6_packet(
        VIP6,
        CLIENT6,
        1,
        4,
        &error_body(0, &as_quoted(&query, &dnated)),
    );
    assert_eq!(
        out[ETH_HLEN..],
        expected[ETH_HLEN..],
        "the port unreachable"
    );

    // A masqueraded NodePort flow from outside to a backend on another node.
    let node = FibNode6::new();
    node.run(|ext| {
        let backend = be(REMOTE_POD6, 8080);
        let datapath = node_datapath(
            vec![(
                frontend6(NODE6, NODE_PORT, Protocol::Tcp),
                entry(FrontendKind::NodePort, &[backend], &[]),
            )],
            &node_context6(false),
        );
        let client = Flow6 {
            proto: PROTO_TCP,
            src: OUTSIDER6,
            sport: 40_000,
            dst: NODE6,
            dport: NODE_PORT,
        };
        let syn = tcp6_packet(&client, TCP_SYN, &[]);
        let masqueraded = expect6(datapath.from_world(), &syn, Some(ext), TC_ACT_REDIRECT);
        let (src, sport) = ipv6_src(&masqueraded);
        assert_eq!((src, ipv6_dst(&masqueraded)), (NODE6, (REMOTE_POD6, 8080)));

        // Time exceeded on the way to the backend: back to the client, about its own SYN.
        let exceeded = icmp6_packet(ROUTER6, NODE6, 3, 0, &error_body(0, &masqueraded));
        let out = expect6(datapath.from_world(), &exceeded, Some(ext), TC_ACT_REDIRECT);
        let expected = with_hop_limit(
            &icmp6_packet(
                ROUTER6,
                OUTSIDER6,
                3,
                0,
                &error_body(0, &as_quoted(&syn, &masqueraded)),
            ),
            63,
        );
        assert_eq!(out[ETH_HLEN..], expected[ETH_HLEN..], "the time exceeded");

        // Packet too big about the SYN-ACK as the client got it: to the backend, about the
        // SYN-ACK it sent.
        let sent = tcp6_packet(
            &Flow6 {
                proto: PROTO_TCP,
                src: REMOTE_POD6,
                sport: 8080,
                dst: NODE6,
                dport: sport,
            },
            TCP_SYN | TCP_ACK,
            b"answer",
        );
        let got = expect6(datapath.from_world(), &sent, Some(ext), TC_ACT_REDIRECT);
        assert_eq!(ipv6_dst(&got), (OUTSIDER6, 40_000));
        let too_big = icmp6_packet(ROUTER6, NODE6, 2, 0, &error_body(1280, &got));
        let out = expect6(datapath.from_world(), &too_big, Some(ext), TC_ACT_REDIRECT);
        let expected = with_hop_limit(
            &icmp6_packet(
                ROUTER6,
                REMOTE_POD6,
                2,
                0,
                &error_body(1280, &as_quoted(&sent, &got)),
            ),
            63,
        );
        assert_eq!(out[ETH_HLEN..], expected[ETH_HLEN..], "the packet too big");

        // An error about no flow passes untouched.
        let unrelated = icmp6_packet(ROUTER6, NODE6, 2, 0, &error_body(1280, &syn));
        assert_eq!(
            expect6(datapath.from_world(), &unrelated, Some(ext), TC_ACT_OK),
            unrelated
        );
    });
}

/// Masquerade of IPv6 service traffic: a ClusterIP reached from outside the IPv6 cluster CIDRs
/// gets the node's IPv6 address as source (redirected both ways, the reply restored), a pod
/// keeps its address; with masqueradeAll pods are masqueraded too.
#[test]
fn ipv6_cluster_ip_traffic_from_outside_the_cluster_cidrs_and_masquerade_all_is_masqueraded() {
    use packet::{tcp6_packet, Flow6};

    let node = FibNode6::new();
    node.run(|ext| {
        let backend = be(REMOTE_POD6, 8080);
        let services = vec![(
            frontend6(VIP6, 80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[backend], &[]),
        )];
        let syn_from = |src, sport| {
            tcp6_packet(
                &Flow6 {
                    proto: PROTO_TCP,
                    src,
                    sport,
                    dst: VIP6,
                    dport: 80,
                },
                TCP_SYN,
                &[],
            )
        };
        let datapath = node_datapath(services.clone(), &node_context6(false));
        let out = expect6(
            datapath.from_world(),
            &syn_from(OUTSIDER6, 40_000),
            Some(ext),
            TC_ACT_REDIRECT,
        );
        // The masquerade source port comes from the masquerade range, not the ephemeral ports.
        let ((src, masq_port), dst) = (ipv6_src(&out), ipv6_dst(&out));
        assert_eq!((src, dst), (NODE6, (REMOTE_POD6, 8080)));
        assert!(is_masquerade_port(masq_port), "{masq_port}");
        let answer = tcp6_packet(
            &Flow6 {
                proto: PROTO_TCP,
                src: REMOTE_POD6,
                sport: 8080,
                dst: NODE6,
                dport: masq_port,
            },
            TCP_SYN | TCP_ACK,
            &[],
        );
        let out = expect6(datapath.from_world(), &answer, Some(ext), TC_ACT_REDIRECT);
        assert_eq!(
            (ipv6_src(&out), ipv6_dst(&out)),
            ((VIP6, 80), (OUTSIDER6, 40_000))
        );
        // Both ways the packets skip the kernel's forwarding: the program decrements their
        // hop limit, and one that would reach 0 goes to the stack (translated), whose
        // forwarding discards it with a time exceeded.
        assert_eq!(hop_limit(&out), 63);
        let last_hop = with_hop_limit(&syn_from(OUTSIDER6, 40_003), 1);
        let out = expect6(datapath.from_world(), &last_hop, Some(ext), TC_ACT_OK);
        assert_eq!(
            (ipv6_dst(&out), hop_limit(&out)),
            ((REMOTE_POD6, 8080), 1),
            "translated, handed to the stack"
        );
        // A pod inside the cluster CIDRs keeps its address (through the host's routing).
        let out = expect6(
            datapath.from_pod(),
            &syn_from(CLIENT6, 40_001),
            None,
            TC_ACT_OK,
        );
        assert_eq!(ipv6_src(&out), (CLIENT6, 40_001));

        // masqueradeAll: the pod too.
        let datapath = node_datapath(services, &node_context6(true));
        let out = expect6(
            datapath.from_pod(),
            &syn_from(CLIENT6, 40_002),
            Some(ext),
            TC_ACT_REDIRECT,
        );
        let ((src, masq_port), dst) = (ipv6_src(&out), ipv6_dst(&out));
        assert_eq!((src, dst), (NODE6, (REMOTE_POD6, 8080)));
        assert!(is_masquerade_port(masq_port), "{masq_port}");
        let entries = datapath.conntrack6_entries().unwrap();
        assert!(entries.iter().all(|(_, v)| v.flags & CT_F_SNAT != 0));
    });
}

/// An IPv6 NodePort with externalTrafficPolicy Local: pods reaching it use every endpoint (its
/// pods' entry, kube-proxy's short-circuit), traffic from outside only the local one.
#[test]
fn ipv6_pods_reach_an_external_traffic_policy_local_nodeport_through_every_endpoint() {
    use packet::{tcp6_packet, Flow6};

    let local = be(LOCAL_POD6, 8080);
    let remote = be(REMOTE_POD6, 8080);
    let mut e = entry(FrontendKind::NodePort, &[local], &[local]);
    e.external_local = true;
    e.when_empty = WhenEmpty::Drop;
    e.cluster_backends = Some(vec![local, remote]);
    let datapath = node_datapath(
        vec![(frontend6(NODE6, NODE_PORT, Protocol::Tcp), e)],
        &node_context6(false),
    );
    assert_eq!(datapath.programmed_services6().len(), 2, "both entries");
    let backends_from = |program: &SchedClassifier, src: Ipv6Addr| {
        (0..40u16)
            .map(|i| {
                let flow = Flow6 {
                    proto: PROTO_TCP,
                    src,
                    sport: 41_000 + i,
                    dst: NODE6,
                    dport: NODE_PORT,
                };
                let out = expect6(program, &tcp6_packet(&flow, TCP_SYN, &[]), None, TC_ACT_OK);
                assert_eq!(ipv6_src(&out).0, src, "the client's address is kept");
                be(ipv6_dst(&out).0, ipv6_dst(&out).1)
            })
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        backends_from(datapath.from_pod(), CLIENT6),
        BTreeSet::from([local, remote])
    );
    assert_eq!(
        backends_from(datapath.from_world(), OUTSIDER6),
        BTreeSet::from([local])
    );
}

use std::net::Ipv6Addr;

/// The node and addresses of the IPv6 tests (the IPv4 ones' twins).
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 3);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 1);
const OTHER_NODE6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 4);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 5);
const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 7);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 9);
const OUTSIDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

fn frontend6(ip: Ipv6Addr, port: u16, proto: Protocol) -> Frontend {
    Frontend {
        ip: ip.into(),
        port,
        proto,
    }
}

/// The IPv6 address of a frontend or backend of these tests.
fn v6(ip: std::net::IpAddr) -> Ipv6Addr {
    match ip {
        std::net::IpAddr::V6(v6) => v6,
        std::net::IpAddr::V4(v4) => panic!("IPv4 {v4} in an IPv6 test"),
    }
}

fn octets(addr: [u32; 4]) -> [u8; 16] {
    let mut o = [0; 16];
    for (i, w) in addr.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

/// The node context of the IPv6 tests: both node IPs, both families' cluster CIDRs.
fn node_context6(masquerade_all: bool) -> NodeContext {
    let mut node = node_context(masquerade_all);
    node.node_ips.push(NODE6.into());
    node.cluster_cidrs.push("fd00:10:244::/56".parse().unwrap());
    node
}

/// The (source, source port) of an Ethernet + IPv6 + TCP/UDP packet.
fn ipv6_src(packet: &[u8]) -> (Ipv6Addr, u16) {
    let ip = ETH_HLEN;
    let src: [u8; 16] = packet[ip + 8..ip + 24].try_into().unwrap();
    let l4 = ip + 40;
    (src.into(), u16::from_be_bytes([packet[l4], packet[l4 + 1]]))
}

/// The body of an ICMPv6 error (after type, code and checksum): the 32-bit field (`mtu` of a
/// packet too big, else 0) and the whole IPv6 packet of `about` as the quote.
fn error_body(mtu: u32, about: &[u8]) -> Vec<u8> {
    let mut body = mtu.to_be_bytes().to_vec();
    body.extend_from_slice(&about[ETH_HLEN..]);
    body
}

/// `packet` with the hop limit and the L4 checksum of `other` (the same protocol): what a
/// translated quote of `other` holds, both being left as they were.
fn as_quoted(packet: &[u8], other: &[u8]) -> Vec<u8> {
    let at = ETH_HLEN
        + 40
        + match packet[ETH_HLEN + 6] {
            PROTO_TCP => 16,
            _ => 6,
        };
    let mut packet = with_hop_limit(packet, hop_limit(other));
    packet[at..at + 2].copy_from_slice(&other[at..at + 2]);
    packet
}

fn hop_limit(packet: &[u8]) -> u8 {
    packet[ETH_HLEN + 7]
}

/// `packet` with another hop limit (no IPv6 or L4 checksum covers it).
fn with_hop_limit(packet: &[u8], hop_limit: u8) -> Vec<u8> {
    let mut packet = packet.to_vec();
    packet[ETH_HLEN + 7] = hop_limit;
    packet
}

/// [`FibNode`]'s IPv6 twin: `ext0` carries NODE6/64 (default route via ROUTER6; the other
/// node OTHER_NODE6 routes fd00:10:244:1::/64), `pod0` leads to this node's pods
/// (fd00:10:244::/64); forwarding on, static neighbours, so `bpf_fib_lookup` succeeds.
struct FibNode6 {
    netns: TestNetns,
}

impl FibNode6 {
    fn new() -> FibNode6 {
        let netns = TestNetns::with_veth("ext0", "ext0-peer");
        netns.ip(&[
            "link",
            "add",
            "pod0",
            "type",
            "veth",
            "peer",
            "name",
            "pod0-peer",
        ]);
        for dev in ["lo", "ext0", "ext0-peer", "pod0", "pod0-peer"] {
            netns.ip(&["link", "set", "dev", dev, "up"]);
        }
        let node = format!("{NODE6}/64");
        netns.ip(&["-6", "addr", "add", &node, "dev", "ext0", "nodad"]);
        let router = ROUTER6.to_string();
        let other = OTHER_NODE6.to_string();
        netns.ip(&[
            "-6", "route", "add", "default", "via", &router, "dev", "ext0",
        ]);
        netns.ip(&["-6", "route", "add", "fd00:10:244::/64", "dev", "pod0"]);
        netns.ip(&[
            "-6",
            "route",
            "add",
            "fd00:10:244:1::/64",
            "via",
            &other,
            "dev",
            "ext0",
        ]);
        for (ip, mac, dev) in [
            (router.clone(), "02:00:00:00:01:01", "ext0"),
            (other.clone(), "02:00:00:00:01:04", "ext0"),
            (CLIENT6.to_string(), "02:00:00:00:02:05", "pod0"),
            (LOCAL_POD6.to_string(), "02:00:00:00:02:07", "pod0"),
        ] {
            netns.ip(&[
                "-6",
                "neigh",
                "replace",
                &ip,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        netns.run(|| {
            fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("enabling forwarding");
        });
        FibNode6 { netns }
    }

    /// Runs `f` inside the namespace with `ext0`'s ifindex.
    fn run<T: Send>(&self, f: impl FnOnce(u32) -> T + Send) -> T {
        self.netns.run(|| f(ifindex("ext0")))
    }
}

/// IPv6 flows have the IPv4 ones' state and timeouts: a silent UDP flow expires, its next
/// datagram is balanced again, the garbage collector removes expired entries, and a TCP
/// connection that is over (RST) is balanced again by its next SYN.
#[test]
fn ipv6_flows_expire_and_are_collected_like_ipv4_ones() {
    use packet::{tcp6_packet, udp6_packet, Flow6};
    use sluice_common::CtTimeouts;
    use std::{net::Ipv6Addr, thread::sleep, time::Duration};

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let a = be("fd00:10:244::7".parse::<Ipv6Addr>().unwrap(), 8080);
    let services = [Protocol::Udp, Protocol::Tcp]
        .map(|proto| {
            (
                Frontend {
                    ip: vip6.into(),
                    port: 80,
                    proto,
                },
                entry(FrontendKind::ClusterIp, &[a], &[a]),
            )
        })
        .to_vec();
    let context = NodeContext {
        conntrack: CtTimeouts {
            udp_ms: 600,
            ..CtTimeouts::default()
        },
        ..node_context(false)
    };
    let mut datapath = node_datapath(services, &context);
    let udp = Flow6 {
        proto: PROTO_UDP,
        src: "fd00:10:244::5".parse().unwrap(),
        sport: 40_000,
        dst: vip6,
        dport: 80,
    };
    let created = |datapath: &Datapath, proto: u8| {
        datapath
            .conntrack6_entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.proto == proto && k.dir == CT_DIR_FORWARD)
            .map(|(_, v)| (v.created_ns, v.last_seen_ns, v.state))
            .next()
            .expect("a forward entry")
    };
    expect6(
        datapath.from_pod(),
        &udp6_packet(&udp, PAYLOAD),
        None,
        TC_ACT_OK,
    );
    let (first, last_seen, _) = created(&datapath, PROTO_UDP);
    assert_ne!(last_seen, 0, "IPv6 entries are tracked");
    // Refreshed before its timeout, the flow lives on past it.
    sleep(Duration::from_millis(400));
    expect6(
        datapath.from_pod(),
        &udp6_packet(&udp, PAYLOAD),
        None,
        TC_ACT_OK,
    );
    sleep(Duration::from_millis(400));
    assert_eq!(datapath.collect_garbage().unwrap().removed6, 0);
    assert_eq!(created(&datapath, PROTO_UDP).0, first, "the same flow");
    // Silent past it: the collector removes both entries.
    sleep(Duration::from_millis(700));
    assert_eq!(datapath.collect_garbage().unwrap().removed6, 2);
    assert!(datapath.conntrack6_entries().unwrap().is_empty());
    // The next datagram is a new flow.
    expect6(
        datapath.from_pod(),
        &udp6_packet(&udp, PAYLOAD),
        None,
        TC_ACT_OK,
    );
    assert!(created(&datapath, PROTO_UDP).0 > first, "balanced again");

    // TCP: a RST from the client closes the connection; a SYN right after (inside the
    // retransmission window) starts a new one.
    let tcp = Flow6 {
        proto: PROTO_TCP,
        sport: 40_001,
        ..udp
    };
    expect6(
        datapath.from_pod(),
        &tcp6_packet(&tcp, TCP_SYN, &[]),
        None,
        TC_ACT_OK,
    );
    let (syn_created, _, _) = created(&datapath, PROTO_TCP);
    expect6(
        datapath.from_pod(),
        &tcp6_packet(&tcp, TCP_RST, &[]),
        None,
        TC_ACT_OK,
    );
    let (_, _, state) = created(&datapath, PROTO_TCP);
    assert_ne!(state, 0, "the RST is recorded");
    expect6(
        datapath.from_pod(),
        &tcp6_packet(&tcp, TCP_SYN, &[]),
        None,
        TC_ACT_OK,
    );
    assert!(
        created(&datapath, PROTO_TCP).0 > syn_created,
        "a SYN after a RST is a new connection"
    );
}
