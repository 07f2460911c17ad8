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
    assert_eq!(
        out[ETH_HLEN..],
        tcp6_packet(&hairpinned, TCP_SYN, &[])[ETH_HLEN..]
    );

    let answer = tcp6_packet(&hairpinned.reversed(), TCP_SYN | TCP_ACK, &[]);
    let out = expect6(datapath.from_pod(), &answer, None, TC_ACT_REDIRECT);
    assert_bounced(&answer, &out);
    assert_eq!(
        out[ETH_HLEN..],
        tcp6_packet(&flow.reversed(), TCP_SYN | TCP_ACK, &[])[ETH_HLEN..]
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
            services: services.into_iter().collect(),
            ..Default::default()
        })
        .expect("sync");
    assert_eq!(
        (stats.ipv6_programmed, stats.skipped_ipv6),
        (2, 0),
        "{stats:?}"
    );
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

    // A ClusterIP from outside the node would need masquerade: not translated.
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
    assert_eq!(out, from_outside);

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
            services: services.into_iter().collect(),
            ..Default::default()
        })
        .expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    assert_eq!(
        (stats.added, stats.ipv6_programmed, stats.skipped_ipv6),
        (1, 2, 0),
        "{stats:?}"
    );

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
