//! Conntrack state and timeouts (TCP SYN, reply, FIN, RST; UDP unreplied and stream),
//! expired entries treated as absent and collected, masquerade ports from their range, and the
//! TTL of packets the programs forward themselves.

use std::{thread::sleep, time::Duration};

use sluice::node::PortRange;
use sluice_common::{
    CtTimeouts, CtValue, CT_S_CLOSED, CT_S_FIN_BACKEND, CT_S_FIN_CLIENT, CT_S_RST, CT_S_SEEN_REPLY,
    REASON_DROP_NO_SNAT_PORT,
};

use crate::support::*;

const TCP_FIN: u8 = packet::TCP_FIN;

/// Checks that `packet` is `expected` masqueraded: the same but for a source port from the
/// default masquerade range (1024-65535 less the node's ephemeral ports).
pub(crate) fn assert_masqueraded(packet: &[u8], expected: Flow) {
    let out = tuple_of(packet);
    assert_eq!(
        Flow {
            sport: expected.sport,
            ..out
        },
        expected,
        "{out}"
    );
    assert!(is_masquerade_port(out.sport), "{out}");
}

/// Short timeouts: TCP closed 300 ms (closed flows need no refresh), the rest the defaults.
fn short_timeouts() -> NodeContext {
    NodeContext {
        conntrack: CtTimeouts {
            tcp_close_ms: 300,
            ..CtTimeouts::default()
        },
        ..node_context(false)
    }
}

/// A ClusterIP VIP:80 with one backend, on a private datapath with short timeouts.
fn one_backend(proto: Protocol) -> (Datapath, BackendAddr) {
    let backend = be([10, 244, 1, 2], 8080);
    let datapath = node_datapath(
        vec![(
            frontend(VIP, 80, proto),
            entry(FrontendKind::ClusterIp, &[backend], &[]),
        )],
        &short_timeouts(),
    );
    (datapath, backend)
}

/// The (forward, reply) entries of the flows in the map, by direction.
fn entries(datapath: &Datapath) -> (Vec<CtValue>, Vec<CtValue>) {
    let all = datapath.conntrack_entries().unwrap();
    let pick = |dir| {
        all.iter()
            .filter(|(k, _)| k.dir == dir)
            .map(|(_, v)| *v)
            .collect::<Vec<_>>()
    };
    (pick(CT_DIR_FORWARD), pick(CT_DIR_REPLY))
}

/// The state both entries of the map's only flow agree on.
fn flow_state(datapath: &Datapath) -> u8 {
    let (forward, reply) = entries(datapath);
    assert_eq!((forward.len(), reply.len()), (1, 1), "one flow");
    assert_eq!(forward[0].state, reply[0].state, "both entries agree");
    forward[0].state
}

#[test]
fn a_tcp_flow_goes_from_syn_to_established_to_closed_and_then_expires() {
    let (datapath, backend) = one_backend(Protocol::Tcp);
    let client = Flow::tcp(40_000, VIP, 80);
    let reply = client.reply_from(backend);

    from_pod(&datapath, &tcp_packet(&client, TCP_SYN));
    assert_eq!(flow_state(&datapath), 0, "SYN seen, not answered");
    let answered = to_pod(&datapath, &tcp_packet(&reply, TCP_SYN | TCP_ACK));
    assert_eq!(tuple_of(&answered), client.reversed());
    assert_eq!(flow_state(&datapath), CT_S_SEEN_REPLY, "established");

    from_pod(&datapath, &tcp_packet(&client, TCP_FIN | TCP_ACK));
    assert_eq!(flow_state(&datapath), CT_S_SEEN_REPLY | CT_S_FIN_CLIENT);
    to_pod(&datapath, &tcp_packet(&reply, TCP_FIN | TCP_ACK));
    assert_eq!(
        flow_state(&datapath),
        CT_S_SEEN_REPLY | CT_S_FIN_CLIENT | CT_S_FIN_BACKEND
    );
    assert_eq!(
        CT_S_CLOSED & flow_state(&datapath),
        CT_S_FIN_CLIENT | CT_S_FIN_BACKEND
    );

    // Closed: the last ACK still gets through translated, then the entries expire (300 ms).
    let last_ack = from_pod(&datapath, &tcp_packet(&client, TCP_ACK));
    assert_eq!(dnat_target(&client, &last_ack), backend);
    sleep(Duration::from_millis(400));
    // Expired: the backend's late packet is no longer translated back ...
    let late = tcp_packet(&reply, TCP_ACK);
    assert_eq!(to_pod(&datapath, &late), late);
    // ... and the garbage collection removes both entries.
    let stats = {
        let mut datapath = datapath;
        let stats = datapath.collect_garbage().unwrap();
        assert!(datapath.conntrack_entries().unwrap().is_empty());
        stats
    };
    assert_eq!((stats.removed, stats.live), (2, 0));
}

#[test]
fn an_established_flow_outlives_the_closed_timeout_and_a_reset_closes_it() {
    let (mut datapath, backend) = one_backend(Protocol::Tcp);
    let client = Flow::tcp(40_001, VIP, 80);
    let reply = client.reply_from(backend);
    from_pod(&datapath, &tcp_packet(&client, TCP_SYN));
    to_pod(&datapath, &tcp_packet(&reply, TCP_SYN | TCP_ACK));
    sleep(Duration::from_millis(400));
    // Established (24 h): nothing expired.
    assert_eq!(datapath.collect_garbage().unwrap().removed, 0);
    let data = from_pod(&datapath, &tcp_packet(&client, TCP_PSH_ACK));
    assert_eq!(dnat_target(&client, &data), backend);

    to_pod(&datapath, &tcp_packet(&reply, TCP_RST));
    assert_ne!(flow_state(&datapath) & CT_S_RST, 0);
    sleep(Duration::from_millis(400));
    assert_eq!(datapath.collect_garbage().unwrap().removed, 2);
}

#[test]
fn a_syn_after_a_reset_is_a_new_connection_even_within_the_retransmission_window() {
    let (datapath, backend) = one_backend(Protocol::Tcp);
    let client = Flow::tcp(40_002, VIP, 80);
    let reply = client.reply_from(backend);
    from_pod(&datapath, &tcp_packet(&client, TCP_SYN));
    let (first, _) = entries(&datapath);
    to_pod(&datapath, &tcp_packet(&reply, TCP_SYN | TCP_ACK));
    from_pod(&datapath, &tcp_packet(&client, TCP_RST | TCP_ACK));
    assert_ne!(flow_state(&datapath) & CT_S_RST, 0);

    // Within 1.5 s of the first SYN, but the connection is over: balanced anew, fresh state.
    sleep(Duration::from_millis(5));
    from_pod(&datapath, &tcp_packet(&client, TCP_SYN));
    let (forward, reply_entries) = entries(&datapath);
    assert_eq!((forward.len(), reply_entries.len()), (1, 1));
    assert!(forward[0].created_ns > first[0].created_ns, "a new entry");
    assert_eq!(flow_state(&datapath), 0);
}

#[test]
fn an_unanswered_udp_flow_expires_and_its_next_datagram_is_balanced_again() {
    let backend = be([10, 244, 1, 2], 8080);
    // 600 ms: a packet refreshes the flow once an eighth of that (75 ms) has passed.
    let context = NodeContext {
        conntrack: CtTimeouts {
            udp_ms: 600,
            ..CtTimeouts::default()
        },
        ..node_context(false)
    };
    let mut datapath = node_datapath(
        vec![(
            frontend(VIP, 80, Protocol::Udp),
            entry(FrontendKind::ClusterIp, &[backend], &[]),
        )],
        &context,
    );
    let client = Flow::udp(50_000, VIP, 80);
    from_pod(&datapath, &udp_packet(&client, true));
    let (first, _) = entries(&datapath);
    // Refreshed before the timeout, it lives on past it.
    sleep(Duration::from_millis(400));
    from_pod(&datapath, &udp_packet(&client, true));
    sleep(Duration::from_millis(400));
    assert_eq!(datapath.collect_garbage().unwrap().removed, 0);
    let (forward, _) = entries(&datapath);
    assert_eq!(forward[0].created_ns, first[0].created_ns, "the same flow");
    // Silent past the timeout: expired, and the next datagram is a new flow.
    sleep(Duration::from_millis(300));
    let out = from_pod(&datapath, &udp_packet(&client, true));
    assert_eq!(dnat_target(&client, &out), backend);
    let (forward, _) = entries(&datapath);
    assert!(
        forward[0].created_ns > first[0].created_ns,
        "balanced again"
    );

    // Answered, the flow is a stream: the 120 s default applies, not the 600 ms.
    to_pod(&datapath, &udp_packet(&client.reply_from(backend), true));
    assert_eq!(flow_state(&datapath), CT_S_SEEN_REPLY);
    sleep(Duration::from_millis(700));
    assert_eq!(datapath.collect_garbage().unwrap().removed, 0);
}

#[test]
fn masquerade_ports_come_from_the_configured_range() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(REMOTE_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let context = NodeContext {
            masquerade_ports: Some(PortRange {
                first: 62_000,
                last: 62_001,
            }),
            ..node_context(false)
        };
        let datapath = node_datapath(
            vec![(nodeport, entry(FrontendKind::NodePort, &[backend], &[]))],
            &context,
        );
        let mut ports = BTreeSet::new();
        // The clients' own ports are outside the range: never kept.
        for (i, sport) in [40_000u16, 62_000].into_iter().enumerate() {
            let client = flow(
                PROTO_TCP,
                Ipv4Addr::new(192, 0, 2, 20 + i as u8),
                sport,
                NODE_IP,
                NODE_PORT,
            );
            // Random picks may collide: retry the SYN a few times (it is a new flow each time
            // until it succeeds, the claim being atomic).
            let mut masqueraded = None;
            for _ in 0..20 {
                let ran = run_at(
                    datapath.from_world(),
                    &tcp_packet(&client, TCP_SYN),
                    Some(ifs.ext),
                );
                if ran.return_value == TC_ACT_REDIRECT {
                    masqueraded = Some(tuple_of(&ran.packet));
                    break;
                }
                assert_eq!(ran.reason, Some(REASON_DROP_NO_SNAT_PORT));
            }
            let out = masqueraded.expect("a masquerade port");
            assert_eq!(out.src, NODE_IP);
            assert!((62_000..=62_001).contains(&out.sport), "{out}");
            ports.insert(out.sport);
        }
        assert_eq!(ports.len(), 2, "two flows, two ports");
        // The range is used up: a third client's flow is dropped, not given a colliding port.
        let third = flow(
            PROTO_TCP,
            Ipv4Addr::new(192, 0, 2, 30),
            41_000,
            NODE_IP,
            NODE_PORT,
        );
        let ran = run_at(
            datapath.from_world(),
            &tcp_packet(&third, TCP_SYN),
            Some(ifs.ext),
        );
        assert_eq!(ran.return_value, TC_ACT_SHOT);
        assert_eq!(ran.reason, Some(REASON_DROP_NO_SNAT_PORT));
    });
}

/// `packet` with its IPv4 TTL set to `ttl`, header checksum recomputed.
fn with_ttl(mut packet: Vec<u8>, ttl: u8) -> Vec<u8> {
    let ip = ETH_HLEN;
    packet[ip + 8] = ttl;
    packet[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(&packet[ip..ip + IPV4_HLEN]);
    packet[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    packet
}

#[test]
fn redirected_packets_have_their_ttl_decremented_and_a_spent_ttl_goes_to_the_stack() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(REMOTE_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(nodeport, entry(FrontendKind::NodePort, &[backend], &[]))],
            &node_context(false),
        );
        let client = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &with_ttl(tcp_packet(&client, TCP_SYN), 64),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(out[ETH_HLEN + 8], 63);
        // The reply, reverse-translated and redirected, loses one too.
        let answer = with_ttl(tcp_packet(&tuple_of(&out).reversed(), TCP_SYN | TCP_ACK), 2);
        let back = expect(
            datapath.from_world(),
            &answer,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(back[ETH_HLEN + 8], 1);
        assert_eq!(tuple_of(&back), client.reversed());

        // TTL 1: translated, but handed to the stack, which answers with time exceeded.
        let spent = expect(
            datapath.from_world(),
            &with_ttl(tcp_packet(&client, TCP_ACK), 1),
            Some(ifs.ext),
            TC_ACT_OK,
        );
        assert_eq!(spent[ETH_HLEN + 8], 1);
        assert_eq!(tuple_of(&spent).dst, REMOTE_POD);
    });
}

/// The packet an ICMP error quotes (its whole quote, as an Ethernet frame), to check.
fn quoted_packet(error: &[u8]) -> Vec<u8> {
    let mut frame = packet::ethernet(0x0800);
    frame.extend_from_slice(&error[ETH_HLEN + IPV4_HLEN + 8..]);
    frame
}

#[test]
fn quoted_tcp_and_udp_checksums_are_translated_with_the_quote() {
    let node = FibNode::new();
    node.run(|ifs| {
        let dns = be(LOCAL_POD, 5353);
        let web = be(REMOTE_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let datapath = node_datapath(
            vec![
                (
                    frontend(VIP, 53, Protocol::Udp),
                    entry(FrontendKind::ClusterIp, &[dns], &[dns]),
                ),
                (nodeport, entry(FrontendKind::NodePort, &[web], &[])),
            ],
            &node_context(false),
        );

        // A UDP datagram quoted whole (header, payload) by the backend's port unreachable:
        // toward the client, the quote is the datagram it sent, checksum included.
        let query = flow(PROTO_UDP, LOCAL_CLIENT, 50_000, VIP, 53);
        let original = udp_packet(&query, true);
        let sent = from_pod(&datapath, &original);
        let quote_len = sent.len() - ETH_HLEN;
        let error = icmp_error(
            LOCAL_POD,
            LOCAL_CLIENT,
            PORT_UNREACHABLE,
            0,
            &sent,
            quote_len,
        );
        let seen = expect(datapath.to_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(icmp_about(&seen), (VIP, LOCAL_CLIENT, query));
        assert_eq!(quoted_packet(&seen), original);

        // A masqueraded TCP SYN (NodePort, remote backend) quoted whole by a router's time
        // exceeded on its way: toward the outside client, the quote is its own SYN again.
        let client = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let syn = tcp_packet(&client, TCP_SYN);
        let out = expect(datapath.from_world(), &syn, Some(ifs.ext), TC_ACT_REDIRECT);
        // What left the node (its TTL decremented on the way) is what a router quotes.
        let quote_len = out.len() - ETH_HLEN;
        let error = icmp_error(
            Ipv4Addr::new(172, 18, 0, 4),
            NODE_IP,
            (11, 0),
            0,
            &out,
            quote_len,
        );
        let back = expect(
            datapath.from_world(),
            &error,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        let quoted = quoted_packet(&back);
        assert_eq!(tuple_of(&quoted), client);
        assert_checksums_valid(&quoted);

        // A quote too short to hold the TCP checksum is translated without it.
        let error = icmp_error(
            Ipv4Addr::new(172, 18, 0, 4),
            NODE_IP,
            (11, 0),
            0,
            &out,
            IPV4_HLEN + 8,
        );
        let back = expect(
            datapath.from_world(),
            &error,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(icmp_about(&back).2, client);
    });
}

#[test]
fn ipv6_masquerade_ports_come_from_the_configured_range_too() {
    use packet::{tcp6_packet, Flow6};
    use std::net::Ipv6Addr;

    let node_ip6: Ipv6Addr = "fc00:f853:ccd:e793::3".parse().unwrap();
    let backend = be("fd00:10:244:1::9".parse::<Ipv6Addr>().unwrap(), 8080);
    let mut context = NodeContext {
        masquerade_ports: Some(PortRange {
            first: 62_000,
            last: 62_001,
        }),
        ..node_context(false)
    };
    context.node_ips.push(node_ip6.into());
    let datapath = node_datapath(
        vec![(
            Frontend {
                ip: node_ip6.into(),
                port: NODE_PORT,
                proto: Protocol::Tcp,
            },
            entry(FrontendKind::NodePort, &[backend], &[]),
        )],
        &context,
    );
    let client = Flow6 {
        proto: PROTO_TCP,
        src: "2001:db8::10".parse().unwrap(),
        sport: 40_000,
        dst: node_ip6,
        dport: NODE_PORT,
    };
    // No FIB route in this test's namespace: translated, then handed to the stack.
    let out = expect6(
        datapath.from_world(),
        &tcp6_packet(&client, TCP_SYN, &[]),
        None,
        TC_ACT_OK,
    );
    let ip = ETH_HLEN;
    let src: [u8; 16] = out[ip + 8..ip + 24].try_into().unwrap();
    let sport = u16::from_be_bytes([out[ip + 40], out[ip + 41]]);
    assert_eq!(Ipv6Addr::from(src), node_ip6);
    assert!(
        (62_000..=62_001).contains(&sport),
        "masqueraded from port {sport}"
    );
    assert_eq!(ipv6_dst(&out), ("fd00:10:244:1::9".parse().unwrap(), 8080));
}

#[test]
fn garbage_collection_empties_the_pinned_map_a_restarted_agent_finds() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let backend = be([10, 244, 1, 2], 8080);
    let services = vec![(
        frontend(VIP, 80, Protocol::Udp),
        entry(FrontendKind::ClusterIp, &[backend], &[]),
    )];
    let context = NodeContext {
        conntrack: CtTimeouts {
            udp_ms: 300,
            ..CtTimeouts::default()
        },
        ..node_context(false)
    };
    {
        let mut datapath = Datapath::load(&pin_path).expect("load pinned");
        datapath.set_node_config(&context).unwrap();
        resync(&mut datapath, services.clone());
        from_pod(&datapath, &udp_packet(&Flow::udp(50_000, VIP, 80), true));
        from_pod(&datapath, &udp_packet(&Flow::udp(50_001, VIP, 80), true));
        assert_eq!(datapath.conntrack_entries().unwrap().len(), 4);
    }
    sleep(Duration::from_millis(400));
    // A restarted agent: the pinned flows are there, expired; its GC deletes them from the
    // pinned map (a flow seen meanwhile stays).
    let mut datapath = Datapath::load(&pin_path).expect("reload pinned");
    datapath.set_node_config(&context).unwrap();
    from_pod(&datapath, &udp_packet(&Flow::udp(50_002, VIP, 80), true));
    let stats = datapath.collect_garbage().unwrap();
    assert_eq!((stats.removed, stats.live), (4, 2), "{stats:?}");
    drop(datapath);
    let datapath = Datapath::load(&pin_path).expect("reload pinned");
    let left = datapath.conntrack_entries().unwrap();
    assert_eq!(left.len(), 2);
    assert!(left
        .iter()
        .all(|(k, _)| k.sport == 50_002u16.to_be() || k.dport == 50_002u16.to_be()));
}
