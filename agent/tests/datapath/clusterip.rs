//! ClusterIP basics: DNAT, reverse NAT, spreading, resync.

use crate::support::*;

#[test]
fn tcp_flow_to_a_vip_is_dnated_kept_on_its_backend_and_reverse_natted() {
    let svc = frontend(VIP, 80, Protocol::Tcp);
    let datapath = datapath_with(&[(svc, two_backends())]);
    let flow = Flow::tcp(40_000, VIP, 80);

    let syn = from_pod(&datapath, &tcp_packet(&flow, TCP_SYN));
    let backend = dnat_target(&flow, &syn);
    assert!(two_backends().contains(&backend), "SYN went to {backend}");

    // Later packets of the flow (not SYNs: no new balancing) follow the conntrack entry.
    for _ in 0..20 {
        let packet = from_pod(&datapath, &tcp_packet(&flow, TCP_PSH_ACK));
        assert_eq!(dnat_target(&flow, &packet), backend);
        assert_eq!(&packet[packet.len() - PAYLOAD.len()..], PAYLOAD);
    }

    // The backend's reply reaches the client as coming from the VIP.
    let reply_flow = flow.reply_from(backend);
    let reply = to_pod(&datapath, &tcp_packet(&reply_flow, TCP_SYN | TCP_ACK));
    assert_eq!(
        tuple_of(&reply),
        Flow {
            src: VIP,
            sport: 80,
            ..reply_flow
        }
    );

    // The flow is recorded twice: forward (client -> VIP) and reply (backend -> client).
    let entries = datapath.conntrack_entries().expect("conntrack");
    assert_eq!(entries.len(), 2, "{entries:?}");
    let service_id = datapath.service_id(&svc).expect("programmed");
    for (key, value) in &entries {
        assert_eq!(value.service_id, service_id);
        match key.dir {
            CT_DIR_FORWARD => assert_eq!(
                (key.sport, value.nat_port),
                (40_000u16.to_be(), 8080u16.to_be())
            ),
            CT_DIR_REPLY => assert_eq!(
                (key.sport, value.nat_port),
                (8080u16.to_be(), 80u16.to_be())
            ),
            other => panic!("unknown direction {other}"),
        }
    }
}

#[test]
fn udp_flow_is_translated_both_ways_and_a_zero_checksum_stays_zero() {
    let svc = frontend(VIP, 53, Protocol::Udp);
    let datapath = datapath_with(&[(svc, two_backends())]);
    let flow = Flow::udp(50_000, VIP, 53);

    let first = from_pod(&datapath, &udp_packet(&flow, true));
    let backend = dnat_target(&flow, &first);
    assert!(two_backends().contains(&backend));
    assert_ne!(l4_checksum_field(&first), 0);
    for _ in 0..20 {
        let packet = from_pod(&datapath, &udp_packet(&flow, true));
        assert_eq!(dnat_target(&flow, &packet), backend);
    }

    let reply_flow = flow.reply_from(backend);
    let reply = to_pod(&datapath, &udp_packet(&reply_flow, true));
    assert_eq!(
        tuple_of(&reply),
        Flow {
            src: VIP,
            sport: 53,
            ..reply_flow
        }
    );

    // Without a checksum (0), the rewritten packets keep "no checksum", in both directions and
    // for a new flow as well as a known one.
    for sport in [50_000, 50_001] {
        let flow = Flow::udp(sport, VIP, 53);
        let out = from_pod(&datapath, &udp_packet(&flow, false));
        let backend = dnat_target(&flow, &out);
        assert_eq!(
            l4_checksum_field(&out),
            0,
            "DNAT of a datagram without checksum"
        );
        let reply = to_pod(&datapath, &udp_packet(&flow.reply_from(backend), false));
        assert_eq!(tuple_of(&reply).src, VIP);
        assert_eq!(
            l4_checksum_field(&reply),
            0,
            "reverse NAT of a datagram without checksum"
        );
    }
}

#[test]
fn new_flows_are_spread_uniformly_over_the_backends() {
    let three = backends(&[
        ([10, 244, 1, 2], 8080),
        ([10, 244, 2, 3], 8080),
        ([10, 244, 3, 4], 9090),
    ]);
    let datapath = datapath_with(&[(frontend(VIP, 80, Protocol::Tcp), three.clone())]);

    let mut hits: BTreeMap<BackendAddr, usize> = BTreeMap::new();
    for sport in 10_000..10_300 {
        let flow = Flow::tcp(sport, VIP, 80);
        let out = from_pod(&datapath, &tcp_packet(&flow, TCP_SYN));
        *hits.entry(dnat_target(&flow, &out)).or_default() += 1;
    }
    assert_eq!(hits.keys().copied().collect::<Vec<_>>(), three, "{hits:?}");
    // 100 expected each; 50 is more than 6 standard deviations away.
    for (backend, n) in &hits {
        assert!(*n >= 50, "{backend} got only {n} of 300 flows: {hits:?}");
    }
}

#[test]
fn ports_and_protocols_of_one_vip_have_their_own_backends() {
    let http = backends(&[([10, 244, 1, 1], 8080)]);
    let https = backends(&[([10, 244, 2, 2], 8443)]);
    let dns = backends(&[([10, 244, 3, 3], 5353)]);
    let datapath = datapath_with(&[
        (frontend(VIP, 80, Protocol::Tcp), http.clone()),
        (frontend(VIP, 443, Protocol::Tcp), https.clone()),
        (frontend(VIP, 80, Protocol::Udp), dns.clone()),
    ]);
    for (flow, expected) in [
        (Flow::tcp(40_001, VIP, 80), http[0]),
        (Flow::tcp(40_002, VIP, 443), https[0]),
        (Flow::udp(40_003, VIP, 80), dns[0]),
    ] {
        let out = from_pod(&datapath, &first_packet(&flow));
        assert_eq!(dnat_target(&flow, &out), expected, "{flow:?}");
    }
    // A port of the VIP without a service is not translated.
    let other_port = first_packet(&Flow::tcp(40_004, VIP, 8080));
    assert_eq!(from_pod(&datapath, &other_port), other_port);
}

#[test]
fn packets_with_ip_options_are_translated() {
    let datapath = datapath_with(&[
        (frontend(VIP, 80, Protocol::Tcp), two_backends()),
        (frontend(VIP, 53, Protocol::Udp), two_backends()),
    ]);
    // Record route (7, 11 bytes, pointer 4) padded with end-of-options: 12 bytes of options.
    let options = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for flow in [Flow::tcp(40_000, VIP, 80), Flow::udp(40_000, VIP, 53)] {
        let packet = with_ip_options(&first_packet(&flow), &options);
        assert_checksums_valid(&packet);
        let out = from_pod(&datapath, &packet);
        let backend = dnat_target(&flow, &out);
        assert!(
            two_backends().contains(&backend),
            "{flow:?} went to {backend}"
        );
        assert_eq!(
            out[L4_OFF..L4_OFF + options.len()],
            options,
            "options untouched"
        );

        let reply = with_ip_options(&next_packet(&flow.reply_from(backend)), &options);
        let out = to_pod(&datapath, &reply);
        assert_eq!(
            (tuple_of(&out).src, tuple_of(&out).sport),
            (VIP, flow.dport)
        );
    }
}

#[test]
fn traffic_that_is_not_for_a_service_passes_byte_identical() {
    let datapath = datapath_with(&[(frontend(VIP, 80, Protocol::Tcp), two_backends())]);

    let tcp_elsewhere = tcp_packet(
        &Flow::tcp(40_000, Ipv4Addr::new(10, 244, 9, 9), 80),
        TCP_SYN,
    );
    let udp_elsewhere = udp_packet(&Flow::udp(40_000, Ipv4Addr::new(10, 244, 9, 9), 80), true);

    let mut arp = ethernet(0x0806);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    arp.extend_from_slice(&CLIENT.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VIP.octets());

    let mut ipv6 = ethernet(0x86dd);
    ipv6.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, PROTO_TCP, 64]);
    ipv6.extend_from_slice(&[0xfd; 16]); // src
    ipv6.extend_from_slice(&[0xfe; 16]); // dst
    let mut tcp6 = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, TCP_SYN];
    tcp6.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    ipv6.extend_from_slice(&tcp6);

    // ICMP echo request to the VIP itself.
    let mut echo = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    echo.extend_from_slice(PAYLOAD);
    let csum = internet_checksum(&echo);
    echo[2..4].copy_from_slice(&csum.to_be_bytes());
    let icmp = ipv4_packet(CLIENT, VIP, 1, echo, None);

    // Shorter than the headers the programs read.
    let truncated = tcp_packet(&Flow::tcp(40_000, VIP, 80), TCP_SYN)[..L4_OFF + 10].to_vec();
    // (BPF_PROG_RUN itself refuses an IPv4 frame shorter than an IPv4 header.)
    let mut not_ipv4 = tcp_packet(&Flow::tcp(40_000, VIP, 80), TCP_SYN);
    not_ipv4[ETH_HLEN] = 0x65; // version 6 behind the IPv4 ethertype

    for (name, packet) in [
        ("TCP to a non-service address", &tcp_elsewhere),
        ("UDP to a non-service address", &udp_elsewhere),
        ("ARP", &arp),
        ("IPv6", &ipv6),
        ("ICMP to the VIP", &icmp),
        ("truncated TCP to the VIP", &truncated),
        ("IPv4 ethertype, other IP version", &not_ipv4),
    ] {
        for (program, which) in [
            (datapath.from_pod(), "from_pod"),
            (datapath.to_pod(), "to_pod"),
        ] {
            let (verdict, out) = run(program, packet);
            assert_eq!(verdict, TC_ACT_OK, "{which} verdict for {name}");
            assert_eq!(&out, packet, "{which} changed {name}");
        }
    }
    assert!(datapath.conntrack_entries().unwrap().is_empty());
}

#[test]
fn a_removed_service_no_longer_translates_new_flows() {
    let svc = frontend(VIP, 80, Protocol::Tcp);
    let mut datapath = datapath_with(&[(svc, two_backends())]);
    let established = Flow::tcp(40_000, VIP, 80);
    let backend = dnat_target(
        &established,
        &from_pod(&datapath, &tcp_packet(&established, TCP_SYN)),
    );

    let stats = datapath.sync(&desired(&[])).unwrap();
    assert_eq!((stats.removed, stats.map_writes), (1, 3), "{stats:?}");
    assert!(datapath.programmed_services().is_empty());

    for sport in [40_001, 40_002, 40_003] {
        let syn = tcp_packet(&Flow::tcp(sport, VIP, 80), TCP_SYN);
        assert_eq!(from_pod(&datapath, &syn), syn, "new flow after removal");
    }
    // A new connection reusing the established flow's tuple is not translated either ...
    let syn = tcp_packet(&established, TCP_SYN);
    assert_eq!(from_pod(&datapath, &syn), syn);
    // ... while, like with netfilter, packets of an established connection keep their backend
    // until their conntrack entry is purged.
    let ack = from_pod(
        &datapath,
        &tcp_packet(&Flow::tcp(40_000, VIP, 80), TCP_PSH_ACK),
    );
    assert_eq!(dnat_target(&established, &ack), backend);
    let purged = datapath.purge_conntrack(|_, _| true).unwrap();
    assert_eq!(purged, 2);
    let ack = tcp_packet(&established, TCP_PSH_ACK);
    assert_eq!(from_pod(&datapath, &ack), ack);
}

#[test]
fn resyncing_the_kernel_maps_writes_only_differences() {
    let services: Vec<(Frontend, Vec<BackendAddr>)> = (0..200u16)
        .map(|i| {
            let ip = Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8);
            let b = backends(&[([10, 244, 1, (i % 250) as u8], 8080), ([10, 244, 2, 1], 80)]);
            (frontend(ip, 80, Protocol::Tcp), b)
        })
        .collect();
    let mut datapath = load_private();
    let first = datapath.sync(&desired(&services)).unwrap();
    assert_eq!((first.added, first.map_writes), (200, 600));
    let again = datapath.sync(&desired(&services)).unwrap();
    assert_eq!((again.unchanged, again.map_writes), (200, 0), "{again:?}");

    // One backend replaced in one service: its slot rewritten, then the service entry, which
    // carries copies of its first slots (INLINE_BACKENDS), and the new backend is used.
    let mut changed = services.clone();
    changed[7].1 = backends(&[([10, 244, 1, 7], 8080), ([10, 244, 3, 3], 80)]);
    let stats = datapath.sync(&desired(&changed)).unwrap();
    assert_eq!((stats.updated, stats.map_writes), (1, 2), "{stats:?}");
    let programmed = datapath.programmed_services();
    let seven = programmed
        .iter()
        .find(|s| s.frontend == Some(changed[7].0))
        .unwrap();
    assert_eq!(
        seven.backends.iter().copied().collect::<BTreeSet<_>>(),
        changed[7].1.iter().copied().collect()
    );
}
