//! kube-proxy's Service behaviours on a node: NodePort, external traffic, masquerade, REJECT, affinity, ICMP errors.

use crate::support::*;

#[test]
fn nodeport_from_outside_to_a_local_backend_keeps_the_client_address() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(
                nodeport,
                entry(FrontendKind::NodePort, &[backend], &[backend]),
            )],
            &node_context(false),
        );
        let client = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);

        // Entering from outside, the flow skips the host's routing: redirected to the pod.
        let syn = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&syn),
            flow(PROTO_TCP, OUTSIDER, 40_000, LOCAL_POD, 8080)
        );
        let ack = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_PSH_ACK),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&ack).dst, LOCAL_POD);

        // The pod's answer enters at its veth and leaves from the NodePort: a local source,
        // which the stack would drop as martian, so it is redirected too.
        let answer = tcp_packet(&client.reply_from(backend), TCP_SYN | TCP_ACK);
        let out = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&out), client.reversed());
        // Already translated: the external interface's egress leaves it alone.
        assert_eq!(
            expect(datapath.to_world(), &out, Some(ifs.ext), TC_ACT_OK),
            out
        );

        let entries = datapath.conntrack_entries().unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries
            .iter()
            .all(|(_, v)| v.flags & CT_F_REDIRECT != 0 && v.flags & CT_F_SNAT == 0));
    });
}

#[test]
fn nodeport_from_outside_to_a_remote_backend_is_masqueraded_and_its_reply_restored() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(REMOTE_POD, 8080);
        let tcp = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let udp = frontend(NODE_IP, NODE_PORT, Protocol::Udp);
        let datapath = node_datapath(
            vec![
                (tcp, entry(FrontendKind::NodePort, &[backend], &[])),
                (udp, entry(FrontendKind::NodePort, &[backend], &[])),
            ],
            &node_context(false),
        );

        // externalTrafficPolicy Cluster, backend on another node: the source becomes the node
        // (keeping the client's port when it is free), so the answer comes back here.
        let first = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&first, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        crate::conntrack::assert_masqueraded(
            &out,
            flow(PROTO_TCP, NODE_IP, 40_000, REMOTE_POD, 8080),
        );

        // Another client with the same port to the same backend: the node's port 40000 is
        // taken, the flow gets another one.
        let second = flow(
            PROTO_TCP,
            Ipv4Addr::new(192, 0, 2, 11),
            40_000,
            NODE_IP,
            NODE_PORT,
        );
        let out2 = expect(
            datapath.from_world(),
            &tcp_packet(&second, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        let masqueraded = tuple_of(&out2);
        assert_eq!((masqueraded.src, masqueraded.dst), (NODE_IP, REMOTE_POD));
        assert!(is_masquerade_port(masqueraded.sport), "{masqueraded}");

        // The backend's answers come back through the external interface and reach each
        // client from the NodePort.
        for (client, sent) in [(first, out), (second, out2)] {
            let answer = tcp_packet(&tuple_of(&sent).reversed(), TCP_SYN | TCP_ACK);
            let back = expect(
                datapath.from_world(),
                &answer,
                Some(ifs.ext),
                TC_ACT_REDIRECT,
            );
            assert_eq!(tuple_of(&back), client.reversed());
        }
        // Later packets keep their translation.
        let ack = expect(
            datapath.from_world(),
            &tcp_packet(&second, TCP_PSH_ACK),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&ack), masqueraded);

        // UDP without a checksum keeps none through both translations.
        let client = flow(PROTO_UDP, OUTSIDER, 50_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &udp_packet(&client, false),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        crate::conntrack::assert_masqueraded(
            &out,
            flow(PROTO_UDP, NODE_IP, 50_000, REMOTE_POD, 8080),
        );
        assert_eq!(l4_checksum_field(&out), 0);
        let back = expect(
            datapath.from_world(),
            &udp_packet(&tuple_of(&out).reversed(), false),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&back), client.reversed());
        assert_eq!(l4_checksum_field(&back), 0);

        let entries = datapath.conntrack_entries().unwrap();
        assert_eq!(entries.len(), 6);
        assert!(entries.iter().all(|(_, v)| v.flags & CT_F_SNAT != 0));
    });
}

#[test]
fn external_and_load_balancer_ips_are_translated_from_outside_and_from_pods() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let external_ip = frontend(Ipv4Addr::new(203, 0, 113, 50), 80, Protocol::Tcp);
        let lb_ip = frontend(Ipv4Addr::new(198, 51, 100, 7), 443, Protocol::Tcp);
        let datapath = node_datapath(
            vec![
                (
                    external_ip,
                    entry(FrontendKind::ExternalIp, &[backend], &[backend]),
                ),
                (
                    lb_ip,
                    entry(FrontendKind::LoadBalancer, &[backend], &[backend]),
                ),
            ],
            &node_context(false),
        );
        for f in [external_ip, lb_ip] {
            // From outside: DNAT, redirected to the pod, the client's address kept.
            let outside = flow(PROTO_TCP, OUTSIDER, 40_001, v4(f.ip), f.port);
            let out = expect(
                datapath.from_world(),
                &tcp_packet(&outside, TCP_SYN),
                Some(ifs.ext),
                TC_ACT_REDIRECT,
            );
            assert_eq!(dnat_target(&outside, &out), backend);

            // From a pod of the cluster: DNAT through the host's routing, no masquerade; the
            // answer is restored on the way to the client pod.
            let inside = flow(PROTO_TCP, LOCAL_CLIENT, 40_002, v4(f.ip), f.port);
            let out = expect(
                datapath.from_pod(),
                &tcp_packet(&inside, TCP_SYN),
                Some(ifs.pod),
                TC_ACT_OK,
            );
            assert_eq!(dnat_target(&inside, &out), backend);
            let answer = tcp_packet(&inside.reply_from(backend), TCP_SYN | TCP_ACK);
            // Its flow went through the stack: the backend's veth leaves the answer alone ...
            assert_eq!(
                expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_OK),
                answer
            );
            // ... and the client's veth restores the frontend.
            let back = expect(datapath.to_pod(), &answer, Some(ifs.pod), TC_ACT_OK);
            assert_eq!(tuple_of(&back), inside.reversed());
        }
    });
}

#[test]
fn a_pod_reaches_a_nodeport_of_its_node() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(REMOTE_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(nodeport, entry(FrontendKind::NodePort, &[backend], &[]))],
            &node_context(false),
        );
        // A pod's address routes back to it: no masquerade, even for a backend elsewhere.
        let client = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, LOCAL_CLIENT, 40_000, REMOTE_POD, 8080)
        );
        // The answer arrives from the other node untouched by from_world, and leaves the
        // client's veth from the NodePort.
        let answer = tcp_packet(&client.reply_from(backend), TCP_SYN | TCP_ACK);
        assert_eq!(
            expect(datapath.from_world(), &answer, Some(ifs.ext), TC_ACT_OK),
            answer
        );
        let back = expect(datapath.to_pod(), &answer, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(tuple_of(&back), client.reversed());
    });
}

#[test]
fn external_traffic_policy_local_never_masquerades_and_drops_without_local_endpoints() {
    let node = FibNode::new();
    node.run(|ifs| {
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let empty = frontend(NODE_IP, NODE_PORT + 1, Protocol::Tcp);
        let mut local = entry(
            FrontendKind::NodePort,
            &[be(LOCAL_POD, 8080)],
            &[be(LOCAL_POD, 8080)],
        );
        local.external_local = true;
        // The translation gives a Local frontend this node's endpoints only; even a backend
        // not marked local is not masqueraded (the client's address is the policy's point).
        let mut odd = entry(FrontendKind::NodePort, &[be(REMOTE_POD, 8080)], &[]);
        odd.external_local = true;
        let mut none = entry(FrontendKind::NodePort, &[], &[]);
        none.external_local = true;
        none.when_empty = WhenEmpty::Drop;
        let mut datapath = node_datapath(
            vec![(nodeport, local), (empty, none)],
            &node_context(true), // not even masqueradeAll masquerades it
        );
        let client = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, OUTSIDER, 40_000, LOCAL_POD, 8080)
        );

        resync(&mut datapath, vec![(nodeport, odd)]);
        let client = flow(PROTO_TCP, OUTSIDER, 40_001, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&out).src, OUTSIDER);

        // No local endpoint: dropped silently, and counted.
        let mut none = entry(FrontendKind::NodePort, &[], &[]);
        none.external_local = true;
        none.when_empty = WhenEmpty::Drop;
        resync(&mut datapath, vec![(empty, none)]);
        let client = flow(PROTO_TCP, OUTSIDER, 40_002, NODE_IP, NODE_PORT + 1);
        let ran = run_at(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
        );
        assert_eq!(ran.return_value, TC_ACT_SHOT);
        assert_eq!(ran.reason, Some(REASON_DROP_NO_LOCAL_ENDPOINTS));
        assert_eq!(
            datapath
                .drop_counts()
                .unwrap()
                .get(&REASON_DROP_NO_LOCAL_ENDPOINTS),
            Some(&1)
        );
    });
}

#[test]
fn pods_reach_an_external_traffic_policy_local_nodeport_through_every_endpoint() {
    let node = FibNode::new();
    node.run(|ifs| {
        // This node has no endpoint of the service; another node has one.
        let backend = be(REMOTE_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let mut none_here = entry(FrontendKind::NodePort, &[], &[]);
        none_here.external_local = true;
        none_here.when_empty = WhenEmpty::Drop;
        none_here.cluster_backends = Some(vec![backend]);
        let mut datapath = node_datapath(vec![(nodeport, none_here.clone())], &node_context(false));

        // From a pod: the cluster-wide endpoint, the pod's address kept.
        let client = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, LOCAL_CLIENT, 40_000, REMOTE_POD, 8080)
        );
        let answer = tcp_packet(&client.reply_from(backend), TCP_SYN | TCP_ACK);
        let back = expect(datapath.to_pod(), &answer, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(tuple_of(&back), client.reversed());

        // The same packet from outside the node: no local endpoint, dropped.
        let ran = run_at(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
        );
        assert_eq!(ran.return_value, TC_ACT_SHOT);
        assert_eq!(ran.reason, Some(REASON_DROP_NO_LOCAL_ENDPOINTS));

        // Resyncing the same state writes nothing; without the pods' set, pods are dropped too.
        let stats = resync(&mut datapath, vec![(nodeport, none_here.clone())]);
        assert_eq!(stats.map_writes, 0, "{stats:?}");
        let mut local_only = none_here;
        local_only.cluster_backends = None;
        resync(&mut datapath, vec![(nodeport, local_only)]);
        let client = flow(PROTO_TCP, LOCAL_CLIENT, 40_001, NODE_IP, NODE_PORT);
        let ran = run_at(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
        );
        assert_eq!(ran.return_value, TC_ACT_SHOT);
        assert_eq!(ran.reason, Some(REASON_DROP_NO_LOCAL_ENDPOINTS));
    });
}

#[test]
fn cluster_ip_traffic_from_outside_the_cluster_cidr_is_masqueraded() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let vip = frontend(VIP, 80, Protocol::Tcp);
        let services = vec![(vip, entry(FrontendKind::ClusterIp, &[backend], &[backend]))];
        let mut datapath = node_datapath(services.clone(), &node_context(false));

        // kube-proxy's `! -s clusterCIDR` rule: even to a local backend.
        let outside = flow(PROTO_TCP, OUTSIDER, 40_000, VIP, 80);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        crate::conntrack::assert_masqueraded(
            &out,
            flow(PROTO_TCP, NODE_IP, 40_000, LOCAL_POD, 8080),
        );
        let answer = tcp_packet(&tuple_of(&out).reversed(), TCP_SYN | TCP_ACK);
        let back = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&back), outside.reversed());

        // A pod of another node (inside the cluster CIDR) keeps its address.
        let pod = flow(PROTO_TCP, REMOTE_POD, 40_000, VIP, 80);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&pod, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&out).src, REMOTE_POD);

        // Without a cluster CIDR every source counts as a pod: no masquerade.
        let no_cidr = NodeContext {
            cluster_cidrs: vec![],
            ..node_context(false)
        };
        assert!(datapath.set_node_config(&no_cidr).unwrap());
        let outside = flow(PROTO_TCP, OUTSIDER, 40_001, VIP, 80);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&out).src, OUTSIDER);

        // Without a node address nothing can be masqueraded.
        let no_ip = NodeContext {
            node_ips: vec![],
            ..node_context(false)
        };
        assert!(datapath.set_node_config(&no_ip).unwrap());
        let outside = flow(PROTO_TCP, OUTSIDER, 40_002, VIP, 80);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&out).src, OUTSIDER);
    });
}

#[test]
fn masquerade_all_masquerades_pod_flows_too() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let vip = frontend(VIP, 80, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(vip, entry(FrontendKind::ClusterIp, &[backend], &[backend]))],
            &node_context(true),
        );
        let client = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, VIP, 80);
        // The source becomes the node: redirected past the stack's martian check.
        let out = expect(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
            TC_ACT_REDIRECT,
        );
        crate::conntrack::assert_masqueraded(
            &out,
            flow(PROTO_TCP, NODE_IP, 40_000, LOCAL_POD, 8080),
        );
        let answer = tcp_packet(&tuple_of(&out).reversed(), TCP_SYN | TCP_ACK);
        let back = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&back), client.reversed());
    });
}

#[test]
fn hairpin_traffic_is_masqueraded_to_the_service_loopback_and_sent_back() {
    let node = FibNode::new();
    node.run(|ifs| {
        let itself = be(LOCAL_POD, 8080);
        let vip = frontend(VIP, 80, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(vip, entry(FrontendKind::ClusterIp, &[itself], &[itself]))],
            &node_context(false),
        );
        // The pod reaches itself through its service: it must not see its own address as the
        // source, and the packet goes straight back out its veth.
        let client = flow(PROTO_TCP, LOCAL_POD, 40_000, VIP, 80);
        let syn = tcp_packet(&client, TCP_SYN);
        let out = expect(datapath.from_pod(), &syn, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, HAIRPIN_ADDR, 40_000, LOCAL_POD, 8080)
        );
        assert_bounced(&syn, &out);

        // Its answer to the loopback address comes back from the service.
        let answer = tcp_packet(&tuple_of(&out).reversed(), TCP_SYN | TCP_ACK);
        let back = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&back), client.reversed());
        assert_bounced(&answer, &back);
    });
}

#[test]
fn a_service_without_endpoints_rejects_with_a_reset_or_port_unreachable() {
    let tcp = frontend(VIP, 80, Protocol::Tcp);
    let udp = frontend(VIP, 53, Protocol::Udp);
    let sctp = frontend(VIP, 3868, Protocol::Sctp);
    let mut datapath = datapath_with(&[(tcp, vec![]), (udp, vec![]), (sctp, vec![])]);
    let programmed = datapath.programmed_services();
    assert!(programmed.iter().all(|s| s.backend_count == 0));

    // A SYN: RST|ACK from the service, acknowledging the SYN, sent back out the interface.
    let client = Flow::tcp(40_000, VIP, 80);
    for program in [datapath.from_pod(), datapath.from_world()] {
        let syn = tcp_packet(&client, TCP_SYN);
        let ran = run_at(program, &syn, None);
        assert_eq!(ran.return_value, TC_ACT_REDIRECT);
        assert_eq!(ran.reason, Some(REASON_REJECT_NO_ENDPOINTS));
        let rst = ran.packet;
        assert_checksums_valid(&rst);
        assert_bounced(&syn, &rst);
        assert_eq!(rst.len(), ETH_HLEN + IPV4_HLEN + 20);
        assert_eq!(tuple_of(&rst), client.reversed());
        let tcp_header = &rst[L4_OFF..];
        assert_eq!(tcp_header[13], TCP_RST | TCP_ACK);
        assert_eq!(tcp_header[4..8], [0, 0, 0, 0], "seq");
        assert_eq!(
            tcp_header[8..12],
            0x0102_0305u32.to_be_bytes(),
            "ack = seq + 1"
        );
    }
    // A segment with ACK (and data): RST whose seq is that ack.
    let data = tcp_packet(&Flow::tcp(40_001, VIP, 80), TCP_PSH_ACK);
    let rst = expect(datapath.from_pod(), &data, None, TC_ACT_REDIRECT);
    assert_eq!(rst[L4_OFF + 13], TCP_RST);
    assert_eq!(rst[L4_OFF + 4..L4_OFF + 8], 0x0a0b_0c0du32.to_be_bytes());
    // A RST is never answered.
    let reset = tcp_packet(&Flow::tcp(40_002, VIP, 80), TCP_RST);
    assert_eq!(
        run_at(datapath.from_pod(), &reset, None).return_value,
        TC_ACT_SHOT
    );

    // UDP and SCTP: ICMP port unreachable from the service quoting the IP header and 8 bytes,
    // also with IP options (quoted too).
    let options = [7, 7, 4, 0, 0, 0, 0, 1]; // record route, padded
    for (packet, client) in [
        (
            udp_packet(&Flow::udp(50_000, VIP, 53), true),
            Flow::udp(50_000, VIP, 53),
        ),
        (
            with_ip_options(&udp_packet(&Flow::udp(50_001, VIP, 53), false), &options),
            Flow::udp(50_001, VIP, 53),
        ),
        (
            packet::sctp_packet(&flow(PROTO_SCTP, CLIENT, 50_002, VIP, 3868), false),
            flow(PROTO_SCTP, CLIENT, 50_002, VIP, 3868),
        ),
    ] {
        let icmp = expect(datapath.from_pod(), &packet, None, TC_ACT_REDIRECT);
        assert_bounced(&packet, &icmp);
        let (src, dst, quoted) = icmp_about(&icmp);
        assert_eq!((src, dst, quoted), (VIP, CLIENT, client));
        let L4::Icmp {
            icmp_type, code, ..
        } = decoded(&icmp).l4
        else {
            unreachable!()
        };
        assert_eq!((icmp_type, code), PORT_UNREACHABLE);
        let ihl = l4_offset(&packet) - ETH_HLEN;
        assert_eq!(icmp.len(), ETH_HLEN + IPV4_HLEN + 8 + ihl + 8);
        assert_eq!(
            icmp[ETH_HLEN + IPV4_HLEN + 8..],
            packet[ETH_HLEN..ETH_HLEN + ihl + 8],
            "the quote is the packet's beginning"
        );
    }
    assert!(datapath.conntrack_entries().unwrap().is_empty());
    // 2 SYNs, the data segment, the RST (dropped, not answered, counted as well), 3 datagrams.
    assert_eq!(
        datapath
            .drop_counts()
            .unwrap()
            .get(&REASON_REJECT_NO_ENDPOINTS),
        Some(&7)
    );

    // Endpoints appear: the same service translates from the next flow on.
    datapath
        .sync(&desired(&[(tcp, two_backends()), (udp, vec![])]))
        .unwrap();
    let flow = Flow::tcp(40_003, VIP, 80);
    let out = from_pod(&datapath, &first_packet(&flow));
    assert!(two_backends().contains(&dnat_target(&flow, &out)));
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend() {
    let four: Vec<BackendAddr> = (1..=4)
        .map(|i| be(Ipv4Addr::new(10, 244, 2, i), 8080))
        .collect();
    let sticky = frontend(VIP, 80, Protocol::Tcp);
    let short = frontend(VIP, 81, Protocol::Tcp);
    let mut sticky_entry = entry(FrontendKind::ClusterIp, &four, &[]);
    sticky_entry.affinity_timeout = Some(10_800);
    let mut short_entry = entry(FrontendKind::ClusterIp, &four, &[]);
    short_entry.affinity_timeout = Some(1);
    let datapath = node_datapath(
        vec![(sticky, sticky_entry), (short, short_entry)],
        &node_context(false),
    );
    let backend_of = |client: Ipv4Addr, sport: u16, port: u16| {
        let f = flow(PROTO_TCP, client, sport, VIP, port);
        dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)))
    };
    let last_used = |client: Ipv4Addr, port: u16| {
        let id = datapath
            .affinity_id(&frontend(VIP, port, Protocol::Tcp))
            .unwrap();
        datapath
            .affinity_entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.affinity_id == id && k.client == u32::from_ne_bytes(client.octets()))
            .map(|(_, v)| v.last_used_ns)
            .expect("an affinity entry")
    };

    // Every new connection of a client goes to its first backend (a random choice would
    // differ in 30 tries with probability 1 - 4^-29), refreshing the entry.
    let first = backend_of(CLIENT, 20_000, 80);
    let mut used = last_used(CLIENT, 80);
    for sport in 20_001..20_030 {
        assert_eq!(backend_of(CLIENT, sport, 80), first);
        let now = last_used(CLIENT, 80);
        assert!(now > used, "every new flow refreshes the affinity");
        used = now;
    }
    // Other clients are balanced on their own: over 40 clients more than one backend shows.
    let others: BTreeSet<BackendAddr> = (1..=40)
        .map(|i| backend_of(Ipv4Addr::new(10, 244, 3, i), 20_000, 80))
        .collect();
    assert!(others.len() > 1, "{others:?}");

    // Past the timeout the client is balanced again, and sticks to the new choice.
    backend_of(CLIENT, 21_000, 81);
    let chosen_at = last_used(CLIENT, 81);
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let after = backend_of(CLIENT, 21_001, 81);
    assert!(last_used(CLIENT, 81) > chosen_at + 1_000_000_000);
    assert_eq!(backend_of(CLIENT, 21_002, 81), after);
}

#[test]
fn source_ranges_admit_only_their_sources() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let lb = frontend(Ipv4Addr::new(198, 51, 100, 7), 443, Protocol::Tcp);
        let with_ranges = |ranges: &[&str]| {
            let mut e = entry(FrontendKind::LoadBalancer, &[backend], &[backend]);
            e.source_ranges = ranges
                .iter()
                .map(|r| r.parse::<ipnet::IpNet>().unwrap())
                .collect();
            vec![(lb, e)]
        };
        let mut datapath = node_datapath(
            with_ranges(&["192.0.2.0/24", "203.0.113.7/32"]),
            &node_context(false),
        );
        let mut sport = 40_000;
        let mut verdict_for = |datapath: &Datapath, src: [u8; 4]| {
            sport += 1;
            let f = flow(PROTO_TCP, Ipv4Addr::from(src), sport, v4(lb.ip), lb.port);
            let ran = run_at(
                datapath.from_world(),
                &tcp_packet(&f, TCP_SYN),
                Some(ifs.ext),
            );
            (ran.return_value, ran.reason)
        };
        let admitted = (TC_ACT_REDIRECT, None);
        let refused = (TC_ACT_SHOT, Some(REASON_DROP_SOURCE_RANGE));
        assert_eq!(verdict_for(&datapath, [192, 0, 2, 10]), admitted);
        assert_eq!(verdict_for(&datapath, [192, 0, 2, 255]), admitted);
        assert_eq!(verdict_for(&datapath, [203, 0, 113, 7]), admitted);
        assert_eq!(verdict_for(&datapath, [203, 0, 113, 8]), refused);
        assert_eq!(verdict_for(&datapath, [198, 51, 100, 1]), refused);

        // New ranges replace the old ones: one range written, two deleted.
        let stats = resync(&mut datapath, with_ranges(&["198.51.100.0/24"]));
        assert_eq!((stats.updated, stats.map_writes), (1, 3), "{stats:?}");
        assert_eq!(verdict_for(&datapath, [198, 51, 100, 1]), admitted);
        assert_eq!(verdict_for(&datapath, [192, 0, 2, 10]), refused);
        // No ranges: every source is admitted.
        let stats = resync(&mut datapath, with_ranges(&[]));
        assert_eq!((stats.updated, stats.map_writes), (1, 2), "{stats:?}");
        assert_eq!(verdict_for(&datapath, [192, 0, 2, 10]), admitted);
        assert_eq!(
            datapath
                .drop_counts()
                .unwrap()
                .get(&REASON_DROP_SOURCE_RANGE),
            Some(&3)
        );
    });
}

#[test]
fn removed_backends_lose_their_udp_flows_at_once() {
    let (gone, stays) = (
        be(Ipv4Addr::new(10, 244, 2, 1), 5353),
        be(Ipv4Addr::new(10, 244, 2, 2), 5353),
    );
    let dns = frontend(VIP, 53, Protocol::Udp);
    let web = frontend(VIP, 80, Protocol::Tcp);
    let sticky = frontend(VIP, 54, Protocol::Udp);
    let mut sticky_entry = entry(FrontendKind::ClusterIp, &[gone], &[]);
    sticky_entry.affinity_timeout = Some(10_800);
    let services = |backends: &[BackendAddr]| {
        let mut sticky_now = sticky_entry.clone();
        // One backend: the first (the one that goes, then the one that stays).
        sticky_now.backends = backends[..1].to_vec();
        vec![
            (dns, entry(FrontendKind::ClusterIp, backends, &[])),
            (
                web,
                entry(
                    FrontendKind::ClusterIp,
                    &backends.iter().map(|b| be(b.ip, 8080)).collect::<Vec<_>>(),
                    &[],
                ),
            ),
            (sticky, sticky_now),
        ]
    };
    let mut datapath = node_datapath(services(&[gone, stays]), &node_context(false));
    let dns_id = datapath.service_id(&dns).unwrap();

    // UDP flows on both backends, and a TCP connection on the one that goes.
    let mut on: BTreeMap<BackendAddr, Vec<Flow>> = BTreeMap::new();
    for sport in 50_000..50_040 {
        let f = Flow::udp(sport, VIP, 53);
        on.entry(dnat_target(&f, &from_pod(&datapath, &udp_packet(&f, true))))
            .or_default()
            .push(f);
    }
    assert_eq!(on.len(), 2, "40 flows use both backends");
    let tcp = (40_000..40_100)
        .map(|sport| Flow::tcp(sport, VIP, 80))
        .find(|f| dnat_target(f, &from_pod(&datapath, &tcp_packet(f, TCP_SYN))).ip == gone.ip)
        .expect("a TCP flow on the backend that goes");
    let sticky_flow = Flow::udp(51_000, VIP, 54);
    assert_eq!(
        dnat_target(
            &sticky_flow,
            &from_pod(&datapath, &udp_packet(&sticky_flow, true))
        ),
        gone
    );
    assert_eq!(datapath.affinity_entries().unwrap().len(), 1);

    let stats = resync(&mut datapath, services(&[stays]));
    let removed: Vec<(u32, Vec<BackendAddr>)> = stats
        .removed_backends
        .iter()
        .map(|r| (r.service_id, r.backends.iter().copied().collect()))
        .collect();
    assert!(removed.contains(&(dns_id, vec![gone])), "{removed:?}");
    let gone_flows = on[&gone].len();
    // Two entries per UDP flow on the removed backend (both services), and the affinity entry.
    assert_eq!(stats.purged, 2 * gone_flows + 2 + 1, "{stats:?}");
    assert!(datapath.affinity_entries().unwrap().is_empty());

    // The next datagram of a flow that was on the removed backend goes to the live one at once;
    // the others keep theirs.
    for f in &on[&gone] {
        assert_eq!(
            dnat_target(f, &from_pod(&datapath, &udp_packet(f, true))),
            stays
        );
    }
    for f in &on[&stays] {
        assert_eq!(
            dnat_target(f, &from_pod(&datapath, &udp_packet(f, true))),
            stays
        );
    }
    // TCP connections drain on their backend.
    assert_eq!(
        dnat_target(&tcp, &from_pod(&datapath, &tcp_packet(&tcp, TCP_PSH_ACK))).ip,
        gone.ip
    );
}

#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    let node = FibNode::new();
    node.run(|ifs| {
        let local_dns = be(LOCAL_POD, 5353);
        let remote_web = be(REMOTE_POD, 8080);
        let dns = frontend(VIP, 53, Protocol::Udp);
        let web = frontend(VIP, 80, Protocol::Tcp);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let datapath = node_datapath(
            vec![
                (
                    dns,
                    entry(FrontendKind::ClusterIp, &[local_dns], &[local_dns]),
                ),
                (web, entry(FrontendKind::ClusterIp, &[remote_web], &[])),
                (nodeport, entry(FrontendKind::NodePort, &[remote_web], &[])),
            ],
            &node_context(false),
        );

        // A pod's UDP query to a local backend that has no socket: the backend's port
        // unreachable reaches the client about the service address it used.
        let query = flow(PROTO_UDP, LOCAL_CLIENT, 50_000, VIP, 53);
        let sent = expect(
            datapath.from_pod(),
            &udp_packet(&query, true),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        let error = icmp_error(
            LOCAL_POD,
            LOCAL_CLIENT,
            PORT_UNREACHABLE,
            0,
            &sent,
            IPV4_HLEN + 8,
        );
        // The flow goes through the host's routing: the backend's veth lets it pass ...
        assert_eq!(
            expect(datapath.from_pod(), &error, Some(ifs.pod), TC_ACT_OK),
            error
        );
        // ... the client's veth translates it.
        let seen = expect(datapath.to_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(icmp_about(&seen), (VIP, LOCAL_CLIENT, query));

        // The same with the whole datagram quoted (as Linux does): the ICMP checksum covers it.
        let error = icmp_error(
            LOCAL_POD,
            LOCAL_CLIENT,
            PORT_UNREACHABLE,
            0,
            &sent,
            sent.len() - ETH_HLEN,
        );
        let seen = expect(datapath.to_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(icmp_about(&seen), (VIP, LOCAL_CLIENT, query));

        // The client answers a reply it cannot place with a port unreachable to the service:
        // the backend gets it about its own address.
        let reply = tcp_or_udp_answer(&query.reversed());
        let error = icmp_error(
            LOCAL_CLIENT,
            VIP,
            PORT_UNREACHABLE,
            0,
            &reply,
            IPV4_HLEN + 8,
        );
        let seen = expect(datapath.from_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(
            icmp_about(&seen),
            (
                LOCAL_CLIENT,
                LOCAL_POD,
                flow(PROTO_UDP, LOCAL_POD, 5353, LOCAL_CLIENT, 50_000)
            )
        );

        // A router's fragmentation needed about a pod's DNATed segment to another node: the
        // external interface lets it pass, the client's veth translates it; the MTU stays.
        let connection = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, VIP, 80);
        expect(
            datapath.from_pod(),
            &tcp_packet(&connection, TCP_SYN),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        let sent = expect(
            datapath.from_pod(),
            &tcp_packet(&connection, TCP_PSH_ACK),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        let error = icmp_error(
            ROUTER,
            LOCAL_CLIENT,
            FRAG_NEEDED,
            1400,
            &sent,
            IPV4_HLEN + 8,
        );
        assert_eq!(
            expect(datapath.from_world(), &error, Some(ifs.ext), TC_ACT_OK),
            error
        );
        let seen = expect(datapath.to_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(icmp_about(&seen), (ROUTER, LOCAL_CLIENT, connection));
        assert_eq!(
            seen[ETH_HLEN + IPV4_HLEN + 4..ETH_HLEN + IPV4_HLEN + 8],
            1400u32.to_be_bytes()
        );

        // A router's fragmentation needed about a masqueraded NodePort flow reaches the
        // outside client about the NodePort, redirected to it.
        let outside = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        let sent = expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_PSH_ACK),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&sent).src, NODE_IP);
        let error = icmp_error(ROUTER, NODE_IP, FRAG_NEEDED, 1400, &sent, IPV4_HLEN + 8);
        let seen = expect(
            datapath.from_world(),
            &error,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(icmp_about(&seen), (ROUTER, OUTSIDER, outside));
        // The backend itself refusing: the error comes from the NodePort's address.
        let error = icmp_error(
            REMOTE_POD,
            NODE_IP,
            PORT_UNREACHABLE,
            0,
            &sent,
            IPV4_HLEN + 8,
        );
        let seen = expect(
            datapath.from_world(),
            &error,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(icmp_about(&seen), (NODE_IP, OUTSIDER, outside));

        // An error about no translated flow passes untouched.
        let stranger = first_packet(&flow(
            PROTO_UDP,
            LOCAL_CLIENT,
            9,
            Ipv4Addr::new(10, 244, 0, 99),
            9,
        ));
        let error = icmp_error(
            ROUTER,
            LOCAL_CLIENT,
            PORT_UNREACHABLE,
            0,
            &stranger,
            IPV4_HLEN + 8,
        );
        for (program, at) in [
            (datapath.from_world(), ifs.ext),
            (datapath.to_pod(), ifs.pod),
        ] {
            assert_eq!(expect(program, &error, Some(at), TC_ACT_OK), error);
        }
    });
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_and_a_later_one_is_balanced_again() {
    let many: Vec<BackendAddr> = (1..=8)
        .map(|i| be(Ipv4Addr::new(10, 244, 2, i), 8080))
        .collect();
    let datapath = node_datapath(
        vec![(
            frontend(VIP, 80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &many, &[]),
        )],
        &node_context(false),
    );
    // A SYN sent again at once is a retransmission: same backend (40 flows, 8 backends).
    for sport in 30_000..30_040 {
        let f = Flow::tcp(sport, VIP, 80);
        let first = dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)));
        let again = dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)));
        assert_eq!(first, again, "{f}");
    }
    // A SYN on the tuple after the retransmission window opens a new connection: balanced
    // again (its conntrack entry is a new one).
    let f = Flow::tcp(31_000, VIP, 80);
    from_pod(&datapath, &tcp_packet(&f, TCP_SYN));
    let created = |datapath: &Datapath| {
        datapath
            .conntrack_entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.dir == CT_DIR_FORWARD && k.sport == 31_000u16.to_be())
            .map(|(_, v)| v.created_ns)
            .unwrap()
    };
    let before = created(&datapath);
    from_pod(&datapath, &tcp_packet(&f, TCP_SYN));
    assert_eq!(
        created(&datapath),
        before,
        "retransmission: the entry stays"
    );
    std::thread::sleep(std::time::Duration::from_millis(1_600));
    from_pod(&datapath, &tcp_packet(&f, TCP_SYN));
    assert!(created(&datapath) > before, "new connection: a new entry");

    // Within the window too, a SYN is not kept on a backend the service no longer has.
    let vip = frontend(VIP, 80, Protocol::Tcp);
    let mut datapath = datapath;
    for sport in 32_000..32_020 {
        let f = Flow::tcp(sport, VIP, 80);
        let chosen = dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)));
        let rest: Vec<BackendAddr> = many.iter().copied().filter(|b| *b != chosen).collect();
        resync(
            &mut datapath,
            vec![(vip, entry(FrontendKind::ClusterIp, &rest, &[]))],
        );
        let again = dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)));
        assert_ne!(again, chosen, "{f}: SYN kept on the removed {chosen}");
        resync(
            &mut datapath,
            vec![(vip, entry(FrontendKind::ClusterIp, &many, &[]))],
        );
    }
}

#[test]
fn sctp_flows_are_translated_with_their_crc_updated() {
    let node = FibNode::new();
    node.run(|ifs| {
        let local = be(LOCAL_POD, 3869);
        let remote = be(REMOTE_POD, 3870);
        let vip = frontend(VIP, 3868, Protocol::Sctp);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Sctp);
        let datapath = node_datapath(
            vec![
                (vip, entry(FrontendKind::ClusterIp, &[local], &[local])),
                (nodeport, entry(FrontendKind::NodePort, &[remote], &[])),
            ],
            &node_context(false),
        );
        // Address and port change; the CRC32c is checked from scratch by assert_checksums_valid.
        let client = flow(PROTO_SCTP, LOCAL_CLIENT, 50_000, VIP, 3868);
        let out = expect(
            datapath.from_pod(),
            &packet::sctp_packet(&client, false),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_SCTP, LOCAL_CLIENT, 50_000, LOCAL_POD, 3869)
        );
        let answer = packet::sctp_packet(&client.reply_from(local), true);
        let back = expect(datapath.to_pod(), &answer, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(tuple_of(&back), client.reversed());

        // From outside to a backend elsewhere: masqueraded too.
        let outside = flow(PROTO_SCTP, OUTSIDER, 50_001, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &packet::sctp_packet(&outside, false),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        crate::conntrack::assert_masqueraded(
            &out,
            flow(PROTO_SCTP, NODE_IP, 50_001, REMOTE_POD, 3870),
        );
        let answer = packet::sctp_packet(&tuple_of(&out).reversed(), true);
        let back = expect(
            datapath.from_world(),
            &answer,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&back), outside.reversed());

        // Another client with the same port: another masquerade port, CRC still right.
        let second = flow(
            PROTO_SCTP,
            Ipv4Addr::new(192, 0, 2, 11),
            50_001,
            NODE_IP,
            NODE_PORT,
        );
        let out = expect(
            datapath.from_world(),
            &packet::sctp_packet(&second, false),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert!(
            is_masquerade_port(tuple_of(&out).sport),
            "{}",
            tuple_of(&out)
        );
        let answer = packet::sctp_packet(&tuple_of(&out).reversed(), true);
        let back = expect(
            datapath.from_world(),
            &answer,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&back), second.reversed());
    });
}

#[test]
fn without_a_forwarding_route_the_stack_gets_the_packet() {
    // A namespace without routes and with forwarding off: the FIB lookup fails.
    let netns = TestNetns::with_veth("ext0", "ext0-peer");
    netns.ip(&["link", "set", "dev", "ext0", "up"]);
    netns.ip(&["link", "set", "dev", "ext0-peer", "up"]);
    netns.run(|| {
        let backend = be(REMOTE_POD, 8080);
        let datapath = node_datapath(
            vec![(
                frontend(NODE_IP, NODE_PORT, Protocol::Tcp),
                entry(FrontendKind::NodePort, &[backend], &[]),
            )],
            &node_context(false),
        );
        let client = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifindex("ext0")),
            TC_ACT_OK,
        );
        crate::conntrack::assert_masqueraded(
            &out,
            flow(PROTO_TCP, NODE_IP, 40_000, REMOTE_POD, 8080),
        );
    });
}

#[test]
fn node_config_and_service_settings_are_written_only_when_they_change() {
    let mut datapath = load_private();
    let node = node_context(false);
    assert!(datapath.set_node_config(&node).unwrap());
    assert!(
        !datapath.set_node_config(&node).unwrap(),
        "unchanged: not written"
    );
    assert!(datapath.set_node_config(&node_context(true)).unwrap());
    assert_eq!(
        datapath.node_config().node_ip.to_ne_bytes(),
        NODE_IP.octets()
    );

    let vip = frontend(VIP, 80, Protocol::Tcp);
    let base = entry(FrontendKind::ClusterIp, &two_backends(), &[]);
    resync(&mut datapath, vec![(vip, base.clone())]);
    let mut changed = base.clone();
    changed.affinity_timeout = Some(60);
    changed.when_empty = WhenEmpty::Drop;
    let stats = resync(&mut datapath, vec![(vip, changed.clone())]);
    assert_eq!((stats.updated, stats.map_writes), (1, 1), "{stats:?}");
    let stats = resync(&mut datapath, vec![(vip, changed.clone())]);
    assert_eq!((stats.unchanged, stats.map_writes), (1, 0), "{stats:?}");
    // A backend becoming local rewrites its slot and the entry's copy of it (the first slots
    // are copied into the entry, INLINE_BACKENDS), nothing else.
    let mut local = changed.clone();
    local.local_backends = [two_backends()[0]].into();
    let stats = resync(&mut datapath, vec![(vip, local)]);
    assert_eq!((stats.updated, stats.map_writes), (1, 2), "{stats:?}");
    let programmed = &datapath.programmed_services()[0];
    assert_eq!(programmed.local_backends, vec![two_backends()[0]]);
    assert_eq!(programmed.settings.affinity_timeout, 60);
}
