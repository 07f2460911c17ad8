//! Map sizes chosen at load time (`--max-services`, `--max-backends`) and the replacement of
//! pinned maps of another size: entries carried over, flows kept, layout changes refused.

use sluice::datapath::{CopyStats, MapSizes};

use crate::support::*;

fn sizes(services: u32, backends: u32) -> MapSizes {
    MapSizes {
        services,
        backends,
        ..MapSizes::default()
    }
}

fn capacity(datapath: &Datapath, map: &str) -> u32 {
    datapath
        .map_sizes()
        .iter()
        .find(|m| m.name == map)
        .unwrap_or_else(|| panic!("no map {map}"))
        .max_entries
}

/// `count` ClusterIP services on 10.97.x.y:80 with `per_service` backends each.
fn many_services(count: u32, per_service: u32) -> Vec<(Frontend, Vec<BackendAddr>)> {
    (0..count)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i);
            let backends = (0..per_service)
                .map(|k| be(Ipv4Addr::new(10, 244, (i % 200) as u8, 10 + k as u8), 8080))
                .collect();
            (frontend(vip, 80, Protocol::Tcp), backends)
        })
        .collect()
}

#[test]
fn the_services_and_backends_maps_of_both_families_take_the_load_time_sizes() {
    let datapath = Datapath::load_unpinned_with(&sizes(1_000, 5_000)).expect("load");
    for (map, want) in [
        ("services", 1_000),
        ("services6", 1_000),
        ("backends", 5_000),
        ("backends6", 5_000),
        ("conntrack", sluice_common::MAX_CONNTRACK),
    ] {
        assert_eq!(capacity(&datapath, map), want, "{map}");
    }
    let default = load_private();
    assert_eq!(capacity(&default, "services"), sluice_common::MAX_SERVICES);
    assert_eq!(capacity(&default, "backends6"), sluice_common::MAX_BACKENDS);
    // Preallocated hash maps: the memory follows the size.
    let memlock = |datapath: &Datapath, map: &str| {
        datapath
            .map_sizes()
            .iter()
            .find(|m| m.name == map)
            .and_then(|m| m.memlock_bytes)
            .expect("memlock")
    };
    assert!(memlock(&datapath, "backends") < memlock(&default, "backends"));

    for bad in [sizes(0, 10), sizes(10, 0), sizes(1 << 30, 10)] {
        let error = Datapath::load_unpinned_with(&bad).err().expect("refused");
        assert!(
            format!("{error:#}").contains("must be between"),
            "{error:#}"
        );
    }
}

/// The pinned map's kernel id and capacity.
fn pinned(pin_path: &Path, map: &str) -> (u32, u32) {
    let info = aya::maps::MapInfo::from_pin(pin_path.join(map))
        .unwrap_or_else(|e| panic!("{map} is not pinned: {e}"));
    (info.id(), info.max_entries())
}

/// The reply of `backend` to `flow`, as `to_pod` delivers it: from the frontend again when the
/// flow is tracked.
fn reply_source(datapath: &Datapath, flow: &Flow, backend: BackendAddr) -> Flow {
    let reply = flow.reply_from(backend);
    tuple_of(&to_pod(datapath, &tcp_packet(&reply, TCP_SYN | TCP_ACK)))
}

#[test]
fn pinned_maps_of_another_size_are_replaced_with_their_entries_and_flows_go_on() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let services = many_services(20, 10);
    let state = desired(&services);
    let flow = Flow::tcp(40_000, v4(services[7].0.ip), 80);

    let small = MapSizes {
        conntrack: 1_000,
        ..sizes(100, 400)
    };
    let (ids, backend, flows, before) = {
        let mut datapath = Datapath::load_with(&pin_path, &small).expect("load");
        assert!(datapath.sync(&state).unwrap().is_complete());
        let backend = dnat_target(&flow, &from_pod(&datapath, &tcp_packet(&flow, TCP_SYN)));
        assert_eq!(reply_source(&datapath, &flow, backend), flow.reversed());
        let ids: Vec<_> = services
            .iter()
            .map(|(f, _)| datapath.service_id(f).unwrap())
            .collect();
        let mut flows = datapath.conntrack_entries().unwrap();
        flows.sort_by_key(|(k, _)| format!("{k:?}"));
        let before: Vec<_> = ["services", "backends", "conntrack", "affinity"]
            .map(|m| pinned(&pin_path, m))
            .into();
        (ids, backend, flows, before)
    };
    assert_eq!(before[0].1, 100);

    // The "upgraded agent" asks for larger maps: each resized map is a new map pinned in the
    // old one's place, holding its entries; the maps of unchanged size are reused.
    let larger = MapSizes {
        conntrack: 4_000,
        ..sizes(1_000, 5_000)
    };
    let mut datapath = Datapath::load_with(&pin_path, &larger).expect("load larger");
    for (map, want) in [
        ("services", 1_000),
        ("services6", 1_000),
        ("backends", 5_000),
        ("backends6", 5_000),
        ("conntrack", 4_000),
        ("conntrack6", 4_000),
    ] {
        assert_eq!(pinned(&pin_path, map).1, want, "{map}");
        assert_eq!(capacity(&datapath, map), want, "{map}");
    }
    for (i, map) in ["services", "backends", "conntrack"].iter().enumerate() {
        assert_ne!(
            pinned(&pin_path, map).0,
            before[i].0,
            "{map} was not replaced"
        );
    }
    assert_eq!(
        pinned(&pin_path, "affinity"),
        before[3],
        "affinity was replaced"
    );
    let leftovers: Vec<_> = fs::read_dir(&pin_path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("resizing-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary pins left: {leftovers:?}");
    // `sluice state maps` reads the sizes from the pins.
    let shown = sluice::inspect::read_map_sizes(&pin_path).expect("read the pinned sizes");
    let row = |map: &str| shown.iter().find(|r| r.name == map).expect(map).clone();
    assert_eq!(row("backends").max_entries, 5_000);
    assert_eq!(row("conntrack6").max_entries, 4_000);
    assert_eq!(row("services").map_type, "Hash");
    assert!(row("backends").memlock_bytes.unwrap() > row("services").memlock_bytes.unwrap());
    assert_eq!(shown.len(), 27, "{shown:?}");

    // Same services, same ids, same flows: resyncing writes nothing, the established flow
    // keeps its backend and its replies are translated back.
    let new_ids: Vec<_> = services
        .iter()
        .map(|(f, _)| datapath.service_id(f).unwrap())
        .collect();
    assert_eq!(new_ids, ids);
    let mut new_flows = datapath.conntrack_entries().unwrap();
    new_flows.sort_by_key(|(k, _)| format!("{k:?}"));
    assert_eq!(new_flows, flows);
    let stats = datapath.sync(&state).unwrap();
    assert_eq!((stats.unchanged, stats.map_writes), (20, 0), "{stats:?}");
    let ack = from_pod(&datapath, &tcp_packet(&flow, TCP_PSH_ACK));
    assert_eq!(dnat_target(&flow, &ack), backend);
    assert_eq!(reply_source(&datapath, &flow, backend), flow.reversed());
    assert_eq!(datapath.finish_map_resize().unwrap().copied, 0);
    drop(datapath);

    // Shrinking below what the maps hold is refused, naming the map and the flag, and leaves
    // the pinned maps as they were.
    let error = Datapath::load_with(
        &pin_path,
        &MapSizes {
            services: 10,
            ..larger
        },
    )
    .err()
    .expect("20 services do not fit in 10");
    let message = format!("{error:#}");
    assert!(message.contains("map `services`"), "{message}");
    assert!(message.contains("--max-services 10"), "{message}");
    assert_eq!(pinned(&pin_path, "services").1, 1_000);

    // Shrinking to what still fits works.
    let fitting = MapSizes {
        services: 25,
        backends: 250,
        conntrack: 100,
        ..MapSizes::default()
    };
    let mut datapath = Datapath::load_with(&pin_path, &fitting).expect("shrink");
    assert_eq!(pinned(&pin_path, "backends").1, 250);
    assert_eq!(datapath.sync(&state).unwrap().map_writes, 0);
    let ack = from_pod(&datapath, &tcp_packet(&flow, TCP_PSH_ACK));
    assert_eq!(dnat_target(&flow, &ack), backend);
    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
    assert!(!pin_path.exists());
}

#[test]
fn flows_the_old_programs_add_until_the_swap_are_carried_over_after_it() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let services = many_services(1, 10);
    let vip = v4(services[0].0.ip);
    let (first, second) = (Flow::tcp(41_000, vip, 80), Flow::tcp(41_001, vip, 80));

    // The running agent's programs: they keep running (on their maps) until the new agent
    // swaps its programs in.
    let mut old = Datapath::load_with(
        &pin_path,
        &MapSizes {
            conntrack: 1_000,
            ..MapSizes::default()
        },
    )
    .expect("load");
    assert!(old.sync(&desired(&services)).unwrap().is_complete());
    let first_backend = dnat_target(&first, &from_pod(&old, &tcp_packet(&first, TCP_SYN)));

    let mut new = Datapath::load_with(
        &pin_path,
        &MapSizes {
            conntrack: 3_000,
            ..MapSizes::default()
        },
    )
    .expect("load with a larger conntrack");
    assert_eq!(new.conntrack_entries().unwrap().len(), 2);
    // A flow the old programs start before the swap lands in the old map only...
    let second_backend = dnat_target(&second, &from_pod(&old, &tcp_packet(&second, TCP_SYN)));
    assert_eq!(old.conntrack_entries().unwrap().len(), 4);
    assert_eq!(new.conntrack_entries().unwrap().len(), 2);

    // ... and is copied once the new programs run everywhere; what the new map holds stays.
    let stats = new.finish_map_resize().expect("finish");
    assert_eq!((stats.copied, stats.kept), (2, 2), "{stats:?}");
    assert_eq!(new.conntrack_entries().unwrap().len(), 4);
    for (flow, backend) in [(first, first_backend), (second, second_backend)] {
        let ack = from_pod(&new, &tcp_packet(&flow, TCP_PSH_ACK));
        assert_eq!(dnat_target(&flow, &ack), backend);
        assert_eq!(reply_source(&new, &flow, backend), flow.reversed());
    }
    assert_eq!(new.finish_map_resize().unwrap(), CopyStats::default());
    drop((old, new));
    Datapath::cleanup(&pin_path).expect("cleanup");
}

#[test]
fn a_pinned_map_of_another_layout_is_refused_naming_it() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    drop(Datapath::load(&pin_path).expect("load"));
    // Another version's `services` with another key: `services6` pinned in its place.
    fs::remove_file(pin_path.join("services")).unwrap();
    fs::rename(pin_path.join("services6"), pin_path.join("services")).unwrap();
    let before = pinned(&pin_path, "services");

    for size in [sluice_common::MAX_SERVICES, 1_000] {
        let error = Datapath::load_with(
            &pin_path,
            &MapSizes {
                services: size,
                ..MapSizes::default()
            },
        )
        .err()
        .expect("refused");
        let message = format!("{error:#}");
        assert!(message.contains("map `services` pinned at"), "{message}");
        assert!(message.contains("-byte keys"), "{message}");
        assert!(message.contains("sluice cleanup"), "{message}");
        assert_eq!(
            pinned(&pin_path, "services"),
            before,
            "the pinned map was touched"
        );
    }
    Datapath::cleanup(&pin_path).expect("cleanup");
}

#[test]
fn a_full_services_or_backends_map_fails_those_frontends_only_and_names_the_flag() {
    let services = many_services(7, 2);
    let mut datapath = Datapath::load_unpinned_with(&sizes(5, 100)).expect("load");
    let stats = datapath.sync(&desired(&services)).unwrap();
    assert_eq!((stats.added, stats.failed.len()), (5, 2), "{stats:?}");
    for (_, error) in &stats.failed {
        assert!(
            error.contains("the `services` map is full (all 5 entries in use); --max-services"),
            "{error}"
        );
    }
    let check_programmed = |datapath: &Datapath, failed: &[(Frontend, String)]| {
        for (i, (frontend, backends)) in services.iter().enumerate() {
            if failed.iter().any(|(f, _)| f == frontend) {
                continue;
            }
            let flow = Flow::tcp(42_000 + i as u16, v4(frontend.ip), 80);
            let out = from_pod(datapath, &tcp_packet(&flow, TCP_SYN));
            assert!(backends.contains(&dnat_target(&flow, &out)), "{frontend}");
        }
    };
    check_programmed(&datapath, &stats.failed);

    // 7 backend slots: three services of two, and one left over that no other service fits in.
    let mut datapath = Datapath::load_unpinned_with(&sizes(100, 7)).expect("load");
    let stats = datapath.sync(&desired(&services)).unwrap();
    assert_eq!((stats.added, stats.failed.len()), (3, 4), "{stats:?}");
    for (_, error) in &stats.failed {
        assert!(
            error.contains("the `backends` map is full (all 7 entries in use); --max-backends"),
            "{error}"
        );
    }
    check_programmed(&datapath, &stats.failed);
}

#[test]
fn a_full_services6_map_fails_those_ipv6_frontends_only() {
    use std::net::Ipv6Addr;
    // Five IPv6 frontends and two IPv4 ones, maps of three entries per family.
    let mut services = many_services(2, 2);
    for i in 0..5u16 {
        let vip = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10 + i);
        let backend = be(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 7 + i), 8080);
        services.push((frontend_any(vip.into(), 80), vec![backend]));
    }
    let mut datapath = Datapath::load_unpinned_with(&sizes(3, 100)).expect("load");
    let stats = datapath
        .sync(&desired(&services))
        .expect("the sync goes on");
    assert_eq!(
        (stats.added, stats.ipv6_programmed, stats.failed.len()),
        (2, 3, 2),
        "{stats:?}"
    );
    for (frontend, error) in &stats.failed {
        assert!(frontend.ip.is_ipv6(), "{frontend}");
        assert!(
            error.contains("the `services6` map is full (all 3 entries in use); --max-services"),
            "{error}"
        );
    }
    let programmed6 = datapath.programmed_services6();
    assert_eq!(programmed6.len(), 3);
    // The failed ones are retried: still full, still reported, nothing else rewritten.
    let again = datapath.sync(&desired(&services)).expect("sync");
    assert_eq!(again.failed.len(), 2, "{again:?}");
    assert_eq!(datapath.programmed_services6(), programmed6);
}

fn frontend_any(ip: std::net::IpAddr, port: u16) -> Frontend {
    Frontend {
        ip,
        port,
        proto: Protocol::Tcp,
    }
}

/// Issue #7's largest size: 100,000 services of 10 endpoints fit in maps sized for them, and
/// their frontends balance.
#[test]
fn a_hundred_thousand_services_of_ten_endpoints_fit_in_maps_sized_for_them() {
    let services = many_services(100_000, 10);
    let sizes = MapSizes::for_services(100_000, 10);
    assert_eq!((sizes.services, sizes.backends), (100_000, 1_000_000));
    let mut datapath = Datapath::load_unpinned_with(&sizes).expect("load");
    let stats = datapath.sync(&desired(&services)).unwrap();
    assert!(stats.is_complete(), "{:?}", &stats.failed[..1]);
    assert_eq!(stats.added, 100_000);
    for i in [0, 65_536, 99_999] {
        let (frontend, backends) = &services[i];
        let flow = Flow::tcp(43_000, v4(frontend.ip), 80);
        let out = from_pod(&datapath, &tcp_packet(&flow, TCP_SYN));
        assert!(backends.contains(&dnat_target(&flow, &out)), "{frontend}");
    }
}
