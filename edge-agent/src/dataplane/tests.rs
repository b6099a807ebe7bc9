//! `BPF_PROG_TEST_RUN` scenarios, one per test (katran/cilium style): build a packet, set up
//! the maps, run the XDP program in the kernel, check verdict, class, path and mark.
//! They need root (CAP_BPF); `scripts/test` runs as root, and without it they fail saying so.

use super::abi::*;
use super::test_run::{self, XDP_PASS};
use super::Dataplane;

const LOW_LATENCY: u32 = 0; // path index
const LOW_COST: u32 = 1;
const MARK_LOW_LATENCY: u32 = 1100;
const MARK_LOW_COST: u32 = 1101;
const VOIP: u32 = 1; // class ids
const BULK: u32 = 2;
const HASHED: u32 = 3;

/// The class's entry toward destinations no peer announces (slot 0): what these scenarios'
/// packets are, unless a test maps their destination to a site.
fn anywhere(class: u32) -> u32 {
    class_index(class as u16, 0)
}

fn loaded() -> Dataplane {
    Dataplane::load().unwrap_or_else(|e| {
        panic!("{e} — these tests need root with CAP_BPF: run them through scripts/test (as root)")
    })
}

fn class(generation: u32, mode: LbMode, paths: &[u32], flags: u8) -> ClassPaths {
    let mut c = ClassPaths {
        generation,
        lb_mode: mode as u8,
        count: paths.len() as u8,
        flags,
        ..ClassPaths::default()
    };
    c.paths[..paths.len()].copy_from_slice(paths);
    c.weights[..paths.len()].fill(1);
    c
}

/// Policies: rank 0 = UDP to 5060 → VoIP; rank 1 = TCP to 873 → bulk; rank 2 = UDP to 9000 →
/// flow-hashed. VoIP prefers the low-latency path, bulk the low-cost one.
fn steering() -> Dataplane {
    let mut dp = loaded();
    dp.set_path(
        LOW_LATENCY,
        PathEntry {
            mark: MARK_LOW_LATENCY,
            flags: 0,
        },
    )
    .unwrap();
    dp.set_path(
        LOW_COST,
        PathEntry {
            mark: MARK_LOW_COST,
            flags: 0,
        },
    )
    .unwrap();
    dp.set_class_paths(
        anywhere(VOIP),
        class(1, LbMode::ActiveBackup, &[LOW_LATENCY, LOW_COST], 0),
    )
    .unwrap();
    dp.set_class_paths(
        anywhere(BULK),
        class(1, LbMode::ActiveBackup, &[LOW_COST, LOW_LATENCY], 0),
    )
    .unwrap();
    dp.set_class_paths(
        anywhere(HASHED),
        class(1, LbMode::FlowHash, &[LOW_LATENCY, LOW_COST], 0),
    )
    .unwrap();
    let all = PolicySet::with(&[0, 1, 2]);
    dp.set_prefix_set(true, 0, [0; 16], all).unwrap();
    dp.set_prefix_set(false, 0, [0; 16], all).unwrap();
    dp.set_protocol_set(17, PolicySet::with(&[0, 2])).unwrap();
    dp.set_protocol_set(6, PolicySet::with(&[1])).unwrap();
    dp.set_dst_port_set(5060, PolicySet::with(&[0])).unwrap();
    dp.set_dst_port_set(873, PolicySet::with(&[1])).unwrap();
    dp.set_dst_port_set(9000, PolicySet::with(&[2])).unwrap();
    for (rank, class_id) in [(0, VOIP), (1, BULK), (2, HASHED)] {
        let rule = PolicyRule {
            class_id: class_id as u16,
            src_port_lo: 0,
            src_port_hi: 0xffff,
            dscp: 0xff,
            pad: 0,
        };
        dp.set_policy_rule(rank, rule).unwrap();
    }
    dp
}

// ---- packets ----------------------------------------------------------------------------

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_VLAN: u16 = 0x8100;

fn ethernet(ethertype: u16, vlan: bool) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    if vlan {
        p.extend_from_slice(&ETH_VLAN.to_be_bytes());
        p.extend_from_slice(&[0x00, 0x64]); // VLAN 100
    }
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn l4(protocol: u8, src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    match protocol {
        6 => h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]),
        17 => h.extend_from_slice(&[0, 8 + 32, 0, 0]),
        _ => h = vec![8, 0, 0, 0, 0, 1, 0, 1], // ICMP echo
    }
    h.extend_from_slice(&[0xab; 32]);
    h
}

/// IPv4 from 10.1.0.10 to 10.2.0.10; `options` 32-bit words of options; `fragment` sets MF.
fn ipv4(
    protocol: u8,
    src_port: u16,
    dst_port: u16,
    options: u8,
    fragment: bool,
    vlan: bool,
) -> Vec<u8> {
    let mut p = ethernet(ETH_IPV4, vlan);
    let payload = l4(protocol, src_port, dst_port);
    let header_len = 20 + 4 * usize::from(options);
    let total = (header_len + payload.len()) as u16;
    p.push(0x40 | (5 + options));
    p.push(0xb8); // DSCP EF
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(if fragment { &[0x20, 0] } else { &[0x40, 0] });
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&[10, 1, 0, 10, 10, 2, 0, 10]);
    p.extend(std::iter::repeat_n(1u8, 4 * usize::from(options))); // NOP options
    p.extend(payload);
    p
}

fn ipv6(protocol: u8, src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut p = ethernet(ETH_IPV6, false);
    let payload = l4(protocol, src_port, dst_port);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[protocol, 64]);
    p.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
    p.extend_from_slice(&[0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
    p.extend(payload);
    p
}

fn mapped(a: [u8; 4]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12..].copy_from_slice(&a);
    m
}

fn key4(protocol: u8, src_port: u16, dst_port: u16) -> FlowKey {
    FlowKey {
        src_addr: mapped([10, 1, 0, 10]),
        dst_addr: mapped([10, 2, 0, 10]),
        src_port: src_port.to_be(),
        dst_port: dst_port.to_be(),
        protocol,
        pad: [0; 3],
    }
}

/// Run the XDP program once; the verdict and the mark it left in the metadata.
fn run(dp: &Dataplane, packet: &[u8]) -> (u32, Option<u32>) {
    let out = test_run::run(dp.xdp_fd().unwrap(), packet, 1).expect("BPF_PROG_TEST_RUN");
    let meta = (out.data.len() == packet.len() + 8).then(|| {
        let magic = u32::from_ne_bytes(out.data[0..4].try_into().unwrap());
        assert_eq!(magic, META_MAGIC, "metadata without the magic");
        u32::from_ne_bytes(out.data[4..8].try_into().unwrap())
    });
    (out.retval, meta)
}

// ---- scenarios --------------------------------------------------------------------------

#[test]
fn voip_udp_to_5060_takes_the_low_latency_path() {
    let dp = steering();
    let (verdict, mark) = run(&dp, &ipv4(17, 40000, 5060, 0, false, false));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(mark, Some(MARK_LOW_LATENCY));
    let flow = dp
        .flow(&key4(17, 40000, 5060))
        .unwrap()
        .expect("flow entry");
    assert_eq!(
        (flow.class_id, flow.path, flow.policy_index, flow.packets),
        (VOIP as u16, LOW_LATENCY, 0, 1)
    );
    assert_eq!(dp.counter(Counter::FlowMiss).unwrap(), 1);
}

#[test]
fn bulk_tcp_to_873_takes_the_low_cost_path() {
    let dp = steering();
    let (verdict, mark) = run(&dp, &ipv4(6, 50000, 873, 0, false, false));
    assert_eq!((verdict, mark), (XDP_PASS, Some(MARK_LOW_COST)));
    let flow = dp.flow(&key4(6, 50000, 873)).unwrap().expect("flow entry");
    assert_eq!((flow.class_id, flow.path), (BULK as u16, LOW_COST));
}

#[test]
fn a_flow_table_hit_counts_packets_and_bytes() {
    let dp = steering();
    let packet = ipv4(17, 40000, 5060, 0, false, false);
    for _ in 0..3 {
        assert_eq!(run(&dp, &packet).1, Some(MARK_LOW_LATENCY));
    }
    let flow = dp.flow(&key4(17, 40000, 5060)).unwrap().unwrap();
    assert_eq!((flow.packets, flow.bytes), (3, 3 * packet.len() as u64));
    assert_eq!(dp.counter(Counter::FlowHit).unwrap(), 2);
    assert_eq!(dp.counter(Counter::FlowMiss).unwrap(), 1);
}

#[test]
fn ipv6_is_classified_like_ipv4() {
    let dp = steering();
    assert_eq!(
        run(&dp, &ipv6(17, 40000, 5060)),
        (XDP_PASS, Some(MARK_LOW_LATENCY))
    );
    assert_eq!(
        run(&dp, &ipv6(6, 50000, 873)),
        (XDP_PASS, Some(MARK_LOW_COST))
    );
    assert_eq!(dp.counter(Counter::Ipv6).unwrap(), 2);
}

#[test]
fn a_vlan_tag_is_skipped() {
    let dp = steering();
    assert_eq!(
        run(&dp, &ipv4(17, 40000, 5060, 0, false, true)),
        (XDP_PASS, Some(MARK_LOW_LATENCY))
    );
    assert_eq!(dp.counter(Counter::Vlan).unwrap(), 1);
}

#[test]
fn ipv4_options_move_the_ports_and_are_followed() {
    let dp = steering();
    assert_eq!(
        run(&dp, &ipv4(17, 40000, 5060, 3, false, false)),
        (XDP_PASS, Some(MARK_LOW_LATENCY))
    );
    assert!(dp.flow(&key4(17, 40000, 5060)).unwrap().is_some());
}

#[test]
fn unmatched_traffic_gets_no_mark_and_the_default_route() {
    let dp = steering();
    // ICMP, and UDP to a port no policy names: the default class, which has no paths.
    assert_eq!(
        run(&dp, &ipv4(1, 0, 0, 0, false, false)),
        (XDP_PASS, Some(0))
    );
    assert_eq!(
        run(&dp, &ipv4(17, 40000, 53, 0, false, false)),
        (XDP_PASS, Some(0))
    );
    let flow = dp.flow(&key4(17, 40000, 53)).unwrap().unwrap();
    assert_eq!(
        (flow.class_id, flow.path, flow.policy_index),
        (0, NO_PATH, NO_POLICY)
    );
    assert_eq!(dp.counter(Counter::Icmp).unwrap(), 1);
}

#[test]
fn fragments_are_passed_and_counted_never_classified() {
    let dp = steering();
    assert_eq!(
        run(&dp, &ipv4(17, 40000, 5060, 0, true, false)),
        (XDP_PASS, Some(0))
    );
    assert_eq!(dp.counter(Counter::Fragment).unwrap(), 1);
    assert!(dp.flows().unwrap().is_empty());
}

#[test]
fn non_ip_is_passed_and_counted() {
    let dp = steering();
    let mut arp = ethernet(0x0806, false);
    arp.extend_from_slice(&[0; 28]);
    assert_eq!(run(&dp, &arp), (XDP_PASS, Some(0)));
    assert_eq!(dp.counter(Counter::NonIp).unwrap(), 1);
}

#[test]
fn a_truncated_packet_at_every_offset_is_passed_and_never_classified() {
    let dp = steering();
    for full in [ipv4(17, 40000, 5060, 2, false, true), ipv6(6, 50000, 873)] {
        // Up to the end of the ports: cut anywhere before, nothing can be classified.
        let headers_end = full.len()
            - 32
            - if full[12..14] == ETH_IPV6.to_be_bytes() {
                16
            } else {
                4
            };
        // The kernel refuses to test-run (and no device delivers) an XDP frame shorter than
        // an Ethernet header, so the cuts start there.
        for cut in 14..headers_end {
            let (verdict, mark) = run(&dp, &full[..cut]);
            assert_eq!(verdict, XDP_PASS, "cut at {cut}");
            assert_eq!(mark, Some(0), "cut at {cut} steered");
        }
    }
    assert!(
        dp.flows().unwrap().is_empty(),
        "a truncated packet created a flow"
    );
    assert!(dp.counter(Counter::Truncated).unwrap() > 0);
}

#[test]
fn failover_is_one_map_update_and_moves_only_flows_on_the_failed_path() {
    let mut dp = steering();
    let voip = ipv4(17, 40000, 5060, 0, false, false);
    let bulk = ipv4(6, 50000, 873, 0, false, false);
    assert_eq!(run(&dp, &voip).1, Some(MARK_LOW_LATENCY));
    assert_eq!(run(&dp, &bulk).1, Some(MARK_LOW_COST));
    // The low-latency path fails: both classes lose it, at a new generation.
    dp.set_class_paths(
        anywhere(VOIP),
        class(2, LbMode::ActiveBackup, &[LOW_COST], 0),
    )
    .unwrap();
    dp.set_class_paths(
        anywhere(BULK),
        class(2, LbMode::ActiveBackup, &[LOW_COST], 0),
    )
    .unwrap();
    assert_eq!(run(&dp, &voip).1, Some(MARK_LOW_COST), "VoIP did not move");
    assert_eq!(
        run(&dp, &bulk).1,
        Some(MARK_LOW_COST),
        "bulk moved off a healthy path"
    );
    assert_eq!(dp.counter(Counter::Repath).unwrap(), 1);
    // It comes back: without a re-pin the VoIP flow stays where it is (hold-down is the
    // agent's), with one it returns.
    dp.set_class_paths(
        anywhere(VOIP),
        class(3, LbMode::ActiveBackup, &[LOW_LATENCY, LOW_COST], 0),
    )
    .unwrap();
    assert_eq!(run(&dp, &voip).1, Some(MARK_LOW_COST));
    dp.set_class_paths(
        anywhere(VOIP),
        class(
            4,
            LbMode::ActiveBackup,
            &[LOW_LATENCY, LOW_COST],
            CLASS_REPIN,
        ),
    )
    .unwrap();
    assert_eq!(run(&dp, &voip).1, Some(MARK_LOW_LATENCY));
    let flow = dp.flow(&key4(17, 40000, 5060)).unwrap().unwrap();
    assert_eq!((flow.path, flow.generation), (LOW_LATENCY, 4));
}

#[test]
fn flow_hash_keeps_each_flow_on_one_path_and_spreads_flows() {
    let dp = steering();
    let mut used = std::collections::BTreeSet::new();
    for port in 0..64u16 {
        let packet = ipv4(17, 30000 + port, 9000, 0, false, false);
        let (_, first) = run(&dp, &packet);
        for _ in 0..3 {
            assert_eq!(
                run(&dp, &packet).1,
                first,
                "flow from port {} moved",
                30000 + port
            );
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 2, "64 flows all hashed to one path: {used:?}");
}

#[test]
fn each_destination_site_has_its_own_paths_and_failover() {
    let mut dp = steering();
    // 10.2.0.0/24 is behind the peer in slot 7; toward it the low-latency path is down, so
    // VoIP to it takes the low-cost one, while VoIP elsewhere keeps the low-latency path.
    dp.set_dest(96 + 24, mapped([10, 2, 0, 0]), 7).unwrap();
    dp.set_class_paths(
        class_index(VOIP as u16, 7),
        class(1, LbMode::ActiveBackup, &[LOW_COST], 0),
    )
    .unwrap();
    let to_site = ipv4(17, 40000, 5060, 0, false, false);
    assert_eq!(run(&dp, &to_site).1, Some(MARK_LOW_COST));
    let flow = dp.flow(&key4(17, 40000, 5060)).unwrap().unwrap();
    assert_eq!((flow.site, flow.path), (7, LOW_COST));
    // A destination no peer announces uses the class's slot-0 entry.
    let mut elsewhere = to_site.clone();
    elsewhere[14 + 16..14 + 20].copy_from_slice(&[10, 3, 0, 10]);
    assert_eq!(run(&dp, &elsewhere).1, Some(MARK_LOW_LATENCY));
    // Failover toward slot 7 only: one entry rewritten; the flow elsewhere stays.
    dp.set_class_paths(
        class_index(VOIP as u16, 7),
        class(2, LbMode::ActiveBackup, &[LOW_LATENCY], 0),
    )
    .unwrap();
    assert_eq!(run(&dp, &to_site).1, Some(MARK_LOW_LATENCY));
    assert_eq!(run(&dp, &elsewhere).1, Some(MARK_LOW_LATENCY));
    assert_eq!(dp.counter(Counter::Repath).unwrap(), 1);
}

#[test]
fn new_flows_take_the_picked_tier_and_outranked_paths_keep_their_flows() {
    let mut dp = steering();
    // Spread 32 flows over both paths, then narrow new flows to the first one.
    let mut on_low_cost = Vec::new();
    for port in 0..32u16 {
        let packet = ipv4(17, 31000 + port, 9000, 0, false, false);
        if run(&dp, &packet).1 == Some(MARK_LOW_COST) {
            on_low_cost.push(packet);
        }
    }
    assert!(
        !on_low_cost.is_empty(),
        "no flow hashed onto the second path"
    );
    let mut narrowed = class(2, LbMode::FlowHash, &[LOW_LATENCY, LOW_COST], 0);
    narrowed.pick = 1;
    dp.set_class_paths(anywhere(HASHED), narrowed).unwrap();
    for packet in &on_low_cost {
        assert_eq!(
            run(&dp, packet).1,
            Some(MARK_LOW_COST),
            "a flow left a healthy path that is only outranked"
        );
    }
    for port in 0..16u16 {
        let packet = ipv4(17, 32000 + port, 9000, 0, false, false);
        assert_eq!(run(&dp, &packet).1, Some(MARK_LOW_LATENCY));
    }
    assert_eq!(dp.counter(Counter::Repath).unwrap(), 0);
}

#[test]
fn catalog_policies_compiled_by_the_agent_class_sip_rtp_and_dns_in_the_kernel() {
    use patronus_proto::policy::{
        AppClass, LoadBalancing, MatchRules, PathPreference, RoutingPolicy, Sla,
    };
    let policy = |n: u128, priority: u16, class: &str| RoutingPolicy {
        id: patronus_proto::PolicyId(uuid::Uuid::from_u128(n)),
        name: class.to_owned(),
        priority,
        enabled: true,
        match_rules: MatchRules::default(),
        app_class: AppClass::new(class),
        path_preference: PathPreference::LowestLatency,
        load_balancing: LoadBalancing::ActiveBackup,
        sla: Sla::default(),
        probe_interval_ms: None,
    };
    // Only the class is named: the catalog supplies the protocols and ports.
    let compiled =
        crate::classifier::compile(&[policy(1, 100, AppClass::VOIP), policy(2, 50, AppClass::DNS)])
            .unwrap();
    let mut dp = loaded();
    dp.apply(&compiled, &crate::steering::SteeringPlan::default())
        .unwrap();
    for (index, mark) in [(LOW_LATENCY, MARK_LOW_LATENCY), (LOW_COST, MARK_LOW_COST)] {
        dp.set_path(index, PathEntry { mark, flags: 0 }).unwrap();
    }
    let voip = compiled.classes[0].id;
    let dns = compiled.classes[1].id;
    dp.set_class_paths(
        class_index(voip, 0),
        class(1, LbMode::ActiveBackup, &[LOW_LATENCY], 0),
    )
    .unwrap();
    dp.set_class_paths(
        class_index(dns, 0),
        class(1, LbMode::ActiveBackup, &[LOW_COST], 0),
    )
    .unwrap();
    // (protocol, port, class, mark: 0 = the default class, no mark, the main table)
    for (protocol, dst_port, class_id, mark) in [
        (17, 5060, Some(voip), Some(MARK_LOW_LATENCY)), // SIP over UDP
        (6, 5061, Some(voip), Some(MARK_LOW_LATENCY)),  // SIP over TLS
        (17, 20000, Some(voip), Some(MARK_LOW_LATENCY)), // RTP
        (17, 53, Some(dns), Some(MARK_LOW_COST)),
        (6, 853, Some(dns), Some(MARK_LOW_COST)), // DNS over TLS
        (6, 20000, None, Some(0)),                // TCP in the RTP range: not VoIP
    ] {
        let (verdict, got_mark) = run(&dp, &ipv4(protocol, 41000, dst_port, 0, false, false));
        assert_eq!(
            (verdict, got_mark),
            (XDP_PASS, mark),
            "protocol {protocol} port {dst_port}"
        );
        let flow = dp.flow(&key4(protocol, 41000, dst_port)).unwrap();
        assert_eq!(
            flow.map(|f| f.class_id).filter(|c| *c != 0),
            class_id,
            "protocol {protocol} port {dst_port}"
        );
    }
}
