//! Property tests of the wire contract: every message survives encode → decode unchanged, and
//! no input — random, truncated, oversized — makes a decoder panic.

use std::net::{IpAddr, Ipv4Addr};

use patronus_proto::codec::{self, DecodeError, MAX_MESSAGE_BYTES};
use patronus_proto::command::{Command, CommandRequest};
use patronus_proto::events::{
    DataplaneMode, EventEnvelope, SdwanEvent, SiteStatus, TopologyChange,
};
use patronus_proto::flows::{FlowKey, FlowRecord, FlowReport};
use patronus_proto::ids::FlowId;
use patronus_proto::intent::{
    FailoverSettings, Overlay, PathSpec, Peer, PeerEndpoint, ProbeSettings, SiteIntent, Uplink,
    WireguardSettings,
};
use patronus_proto::metrics::{PathMetrics, PathMetricsBatch, PathSample, PathStatus};
use patronus_proto::policy::{
    AppClass, LinkKind, LoadBalancing, MatchRules, PathPreference, PolicySet, PortRange, Protocol,
    RoutingPolicy, Sla,
};
use patronus_proto::probe::{self, ProbeKind, ProbePacket};
use patronus_proto::{PathId, PolicyId, ProbeKey, SiteId, TenantId, WgPublicKey, SCHEMA_VERSION};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use uuid::Uuid;

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn metrics() -> impl Strategy<Value = PathMetrics> {
    (
        0.0..5000.0f64,
        0.0..500.0f64,
        0.0..=100.0f64,
        proptest::option::of(0.0..100_000.0f64),
        proptest::option::of(576u16..9000),
        0u8..=100,
        any::<u64>(),
    )
        .prop_map(
            |(latency_ms, jitter_ms, packet_loss_pct, bandwidth_mbps, mtu, score, at)| {
                PathMetrics {
                    latency_ms,
                    jitter_ms,
                    packet_loss_pct,
                    bandwidth_mbps,
                    mtu,
                    score,
                    measured_at_unix_ms: at,
                }
            },
        )
}

fn status() -> impl Strategy<Value = PathStatus> {
    prop_oneof![
        Just(PathStatus::Up),
        Just(PathStatus::Degraded),
        Just(PathStatus::Down),
        Just(PathStatus::Unknown)
    ]
}

fn metrics_batch() -> impl Strategy<Value = PathMetricsBatch> {
    let sample =
        (uuid(), status(), metrics(), 0u32..1000).prop_map(|(p, status, metrics, sent)| {
            PathSample {
                path: PathId(p),
                status,
                metrics,
                probes_sent: sent,
                probes_lost: sent / 3,
            }
        });
    (
        uuid(),
        uuid(),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(sample, 0..20),
    )
        .prop_map(|(t, s, seq, at, samples)| PathMetricsBatch {
            schema_version: SCHEMA_VERSION,
            tenant: TenantId(t),
            site: SiteId(s),
            seq,
            sent_at_unix_ms: at,
            samples,
        })
}

fn event() -> impl Strategy<Value = SdwanEvent> {
    prop_oneof![
        (uuid(), "[a-z][a-z0-9 -]{0,30}").prop_map(|(s, n)| SdwanEvent::SiteJoined {
            site: SiteId(s),
            site_name: n
        }),
        uuid().prop_map(|s| SdwanEvent::SiteLeft { site: SiteId(s) }),
        uuid().prop_map(|s| SdwanEvent::SiteStatusChanged {
            site: SiteId(s),
            status: SiteStatus::Degraded
        }),
        (uuid(), uuid(), uuid()).prop_map(|(p, a, b)| SdwanEvent::PathEstablished {
            path: PathId(p),
            src: SiteId(a),
            dst: SiteId(b)
        }),
        (uuid(), ".{0,40}").prop_map(|(p, r)| SdwanEvent::PathFailed {
            path: PathId(p),
            reason: r
        }),
        (uuid(), metrics()).prop_map(|(p, m)| SdwanEvent::PathDegraded {
            path: PathId(p),
            metrics: m
        }),
        (uuid(), uuid(), ".{0,40}").prop_map(|(a, b, r)| SdwanEvent::FailoverTriggered {
            from_path: PathId(a),
            to_path: PathId(b),
            reason: r
        }),
        (uuid(), uuid(), uuid()).prop_map(|(f, p, q)| SdwanEvent::PolicyApplied {
            flow: FlowId(f),
            policy: PolicyId(p),
            path: PathId(q)
        }),
        (uuid(), metrics()).prop_map(|(p, m)| SdwanEvent::PathMetrics {
            path: PathId(p),
            metrics: m
        }),
        Just(SdwanEvent::TopologyChanged {
            change: TopologyChange::PeeringChanged
        }),
        any::<u64>().prop_map(|r| SdwanEvent::IntentApplied { revision: r }),
        (any::<u64>(), ".{0,40}").prop_map(|(r, reason)| SdwanEvent::IntentRejected {
            revision: r,
            reason
        }),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(r, up, n)| SdwanEvent::Heartbeat {
            applied_revision: r,
            uptime_s: up,
            tunnels_up: n,
            paths_up: n,
            paths_total: n,
            dataplane: DataplaneMode::Ebpf,
        }),
    ]
}

fn envelope() -> impl Strategy<Value = EventEnvelope> {
    (uuid(), proptest::option::of(uuid()), any::<u64>(), event()).prop_map(|(t, s, at, event)| {
        EventEnvelope {
            schema_version: SCHEMA_VERSION,
            tenant: TenantId(t),
            site: s.map(SiteId),
            at_unix_ms: at,
            event,
        }
    })
}

fn flow_report() -> impl Strategy<Value = FlowReport> {
    let flow = (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
        any::<u8>(),
        0u64..1 << 40,
        any::<u32>(),
        any::<[u64; 4]>(),
        proptest::option::of(uuid()),
    )
        .prop_map(
            |(src, dst, sp, dp, proto, start, dur, counts, path)| FlowRecord {
                key: FlowKey {
                    src_ip: IpAddr::V4(Ipv4Addr::from(src)),
                    dst_ip: IpAddr::V4(Ipv4Addr::from(dst)),
                    src_port: sp,
                    dst_port: dp,
                    protocol: proto,
                },
                app_class: AppClass::new(AppClass::WEB),
                policy: None,
                path: path.map(PathId),
                started_at_unix_ms: start,
                last_packet_at_unix_ms: start + u64::from(dur),
                bytes_tx: counts[0],
                bytes_rx: counts[1],
                packets_tx: counts[2],
                packets_rx: counts[3],
            },
        );
    (
        uuid(),
        uuid(),
        any::<u64>(),
        proptest::collection::vec(flow, 0..10),
    )
        .prop_map(|(t, s, at, flows)| FlowReport {
            schema_version: SCHEMA_VERSION,
            tenant: TenantId(t),
            site: SiteId(s),
            sent_at_unix_ms: at,
            flows,
        })
}

fn peer(site: SiteId, n: u8) -> Peer {
    Peer {
        site,
        name: format!("peer-{n}"),
        public_key: WgPublicKey([n; 32]),
        overlay_address: IpAddr::V4(Ipv4Addr::new(100, 64, 0, n)),
        lan_prefixes: vec![format!("10.{n}.0.0/16").parse().unwrap()],
        transit_prefixes: vec![],
        endpoints: (0..2)
            .map(|u| PeerEndpoint {
                uplink_index: u,
                ip: IpAddr::V4(Ipv4Addr::new(198, 18, n, u + 1)),
                kind: Some(LinkKind::Fiber),
            })
            .collect(),
        listen_port_base: 51820,
        region: Some("eu-west".into()),
        hub: n == 2,
        probe_key: ProbeKey([n; 32]),
        next_public_key: None,
    }
}

/// A valid intent: up to five peers with two uplinks each, every path, a VoIP policy.
fn intent() -> impl Strategy<Value = SiteIntent> {
    (
        uuid(),
        uuid(),
        1u64..u64::MAX / 2,
        0u8..6,
        1u8..=2,
        0u16..1000,
    )
        .prop_map(|(t, s, revision, peers, uplinks, policy_seed)| {
            let site = SiteId(s);
            let uplink_list: Vec<Uplink> = (0..uplinks)
                .map(|i| Uplink {
                    index: i,
                    name: format!("wan{i}"),
                    kind: if i == 0 {
                        LinkKind::Fiber
                    } else {
                        LinkKind::Lte
                    },
                    interface: Some(format!("eth{i}")),
                    bandwidth_mbps: Some(100),
                    cost_per_gb: f64::from(i) * 0.1,
                    metered: i > 0,
                })
                .collect();
            let peer_list: Vec<Peer> = (0..peers)
                .map(|p| {
                    let id = SiteId(Uuid::from_u128(s.as_u128() ^ (u128::from(p) + 1)));
                    peer(id, p + 2)
                })
                .collect();
            let mut paths = Vec::new();
            for peer in &peer_list {
                for l in 0..uplinks {
                    for r in 0..2u8 {
                        paths.push(PathSpec {
                            id: PathId(Uuid::from_u128(
                                peer.site.0.as_u128()
                                    ^ (u128::from(l) << 64)
                                    ^ (u128::from(r) << 72),
                            )),
                            local_uplink: l,
                            remote_site: peer.site,
                            remote_uplink: r,
                        });
                    }
                }
            }
            let routing = vec![RoutingPolicy {
                id: PolicyId(Uuid::from_u128(u128::from(policy_seed) + 1)),
                name: "VoIP Priority".into(),
                priority: policy_seed,
                enabled: true,
                match_rules: MatchRules {
                    protocol: Some(Protocol::Udp),
                    dst_ports: vec![PortRange {
                        start: 5060,
                        end: 5061,
                    }],
                    ..Default::default()
                },
                app_class: AppClass::new(AppClass::VOIP),
                path_preference: PathPreference::LowestLatency,
                load_balancing: LoadBalancing::FlowHash,
                sla: Sla {
                    max_latency_ms: Some(150.0),
                    max_jitter_ms: Some(30.0),
                    max_loss_pct: Some(1.0),
                },
                probe_interval_ms: Some(20),
            }];
            SiteIntent {
                schema_version: SCHEMA_VERSION,
                tenant: TenantId(t),
                site,
                site_name: "branch".into(),
                revision,
                generated_at_unix_ms: 1_700_000_000_000,
                overlay: Overlay {
                    address: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
                    network: "100.64.0.0/16".parse().unwrap(),
                    lan_prefixes: vec!["10.1.0.0/16".parse().unwrap()],
                },
                uplinks: uplink_list,
                wireguard: WireguardSettings {
                    public_key: WgPublicKey([1; 32]),
                    listen_port_base: 51820,
                    mtu: 1420,
                    persistent_keepalive_s: 25,
                },
                peers: peer_list,
                paths,
                policies: PolicySet {
                    routing,
                    ..Default::default()
                },
                probe: ProbeSettings::default(),
                failover: FailoverSettings::default(),
            }
        })
}

fn probe_packet() -> impl Strategy<Value = ProbePacket> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<[u8; 16]>(),
        0u16..2000,
    )
        .prop_map(
            |(reply, mtu, tag, seq, sent, echo, hold, nonce, pad)| ProbePacket {
                kind: if reply {
                    ProbeKind::Reply
                } else {
                    ProbeKind::Request
                },
                mtu_probe: mtu,
                path_tag: tag,
                sequence: seq,
                sent_ns: sent,
                echo_sent_ns: echo,
                reflector_hold_ns: hold,
                nonce,
                pad_len: pad,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn intent_round_trips(intent in intent()) {
        let bytes = codec::encode(&intent);
        let back: SiteIntent = codec::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &intent);
        prop_assert_eq!(back.content_digest(), intent.content_digest());
    }

    #[test]
    fn intent_digest_ignores_only_revision_and_time(intent in intent(), bump in 1u64..1000) {
        let mut next = intent.clone();
        next.revision = intent.revision + bump;
        next.generated_at_unix_ms += 1;
        prop_assert_eq!(next.content_digest(), intent.content_digest());
        next.wireguard.mtu -= 1;
        prop_assert_ne!(next.content_digest(), intent.content_digest());
    }

    #[test]
    fn metrics_batch_round_trips(batch in metrics_batch()) {
        let back: PathMetricsBatch = codec::decode(&codec::encode(&batch)).unwrap();
        prop_assert_eq!(back, batch);
    }

    #[test]
    fn event_round_trips(envelope in envelope()) {
        let back: EventEnvelope = codec::decode(&codec::encode(&envelope)).unwrap();
        prop_assert_eq!(back, envelope);
    }

    #[test]
    fn flow_report_round_trips(report in flow_report()) {
        let back: FlowReport = codec::decode(&codec::encode(&report)).unwrap();
        prop_assert_eq!(back, report);
    }

    #[test]
    fn probe_round_trips(packet in probe_packet(), key in any::<[u8; 32]>(), signed in any::<bool>()) {
        let key = ProbeKey(key);
        let bytes = packet.encode(signed.then_some(&key)).unwrap();
        let decoded = probe::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded.packet, &packet);
        prop_assert_eq!(decoded.is_signed(), signed);
        if signed {
            prop_assert!(decoded.verify(&key).is_ok());
        }
    }

    #[test]
    fn probe_decoder_survives_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(decoded) = probe::decode(&bytes) {
            let _ = decoded.verify(&ProbeKey([0; 32]));
        }
    }

    #[test]
    fn probe_decoder_survives_mutated_probes(
        packet in probe_packet(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let key = ProbeKey([5; 32]);
        let mut bytes = packet.encode(Some(&key)).unwrap();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Ok(decoded) = probe::decode(&bytes) {
            let _ = decoded.verify(&key);
        }
    }

    #[test]
    fn probe_decoder_refuses_every_truncation(packet in probe_packet(), signed in any::<bool>()) {
        let key = ProbeKey([5; 32]);
        let bytes = packet.encode(signed.then_some(&key)).unwrap();
        for cut in 0..bytes.len() {
            prop_assert!(probe::decode(&bytes[..cut]).is_err(), "truncated at {} decoded", cut);
        }
    }

    #[test]
    fn json_decoders_survive_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        prop_assert!(codec::decode::<SiteIntent>(&bytes).is_err());
        prop_assert!(codec::decode::<PathMetricsBatch>(&bytes).is_err());
        prop_assert!(codec::decode::<EventEnvelope>(&bytes).is_err());
        prop_assert!(codec::decode::<FlowReport>(&bytes).is_err());
        prop_assert!(codec::decode::<CommandRequest>(&bytes).is_err());
    }

    #[test]
    fn json_decoders_refuse_truncated_messages(intent in intent()) {
        let bytes = codec::encode(&intent);
        // Every proper prefix of a JSON object is incomplete JSON.
        for cut in (0..bytes.len()).step_by(7) {
            prop_assert!(codec::decode::<SiteIntent>(&bytes[..cut]).is_err());
        }
    }
}

#[test]
fn oversized_message_is_refused_before_parsing() {
    let bytes = vec![b' '; MAX_MESSAGE_BYTES + 1];
    assert!(matches!(
        codec::decode::<SiteIntent>(&bytes),
        Err(DecodeError::TooLarge { .. })
    ));
}

fn sample_intent() -> SiteIntent {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    loop {
        let intent = intent().new_tree(&mut runner).unwrap().current();
        if intent.peers.len() >= 2 {
            return intent;
        }
    }
}

#[test]
fn extra_fields_from_a_newer_minor_version_decode() {
    let mut value = serde_json::to_value(sample_intent()).unwrap();
    value["schema_version"] = "1.7".into();
    value["future_top_level"] = serde_json::json!({"nested": [1, 2, 3]});
    value["uplinks"][0]["future_uplink_field"] = "x".into();
    value["probe"]["future_probe_field"] = 5.into();
    let bytes = serde_json::to_vec(&value).unwrap();
    let decoded: SiteIntent = codec::decode(&bytes).unwrap();
    assert_eq!(decoded.uplinks[0].name, "wan0");

    let event = serde_json::json!({
        "schema_version": "1.3",
        "tenant": Uuid::from_u128(1),
        "at_unix_ms": 5,
        "event": {"type": "quantum_entangled", "qubits": 3},
        "added_later": true,
    });
    let decoded: EventEnvelope = codec::decode(&serde_json::to_vec(&event).unwrap()).unwrap();
    assert_eq!(decoded.event, SdwanEvent::Unknown);
}

#[test]
fn a_peers_next_key_is_optional_on_the_wire_and_round_trips() {
    let mut intent = sample_intent();
    // Absent, it is not written: an intent without a rotation encodes as before.
    let value = serde_json::to_value(&intent).unwrap();
    assert!(value["peers"][0].get("next_public_key").is_none());
    // Set, it survives the trip; an older agent ignores it like any unknown field.
    intent.peers[0].next_public_key = Some(WgPublicKey([0xab; 32]));
    let decoded: SiteIntent = codec::decode(&codec::encode(&intent)).unwrap();
    assert_eq!(decoded, intent);
    assert_ne!(decoded.content_digest(), sample_intent().content_digest());
}

#[test]
fn another_major_version_is_refused() {
    let mut value = serde_json::to_value(sample_intent()).unwrap();
    value["schema_version"] = "2.0".into();
    let err = codec::decode::<SiteIntent>(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert_eq!(err.reason(), "unsupported_schema");
    value.as_object_mut().unwrap().remove("schema_version");
    let err = codec::decode::<SiteIntent>(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert_eq!(err.reason(), "missing_schema_version");
}

fn sample_peer() -> Peer {
    let mut extra = peer(SiteId(Uuid::from_u128(0xfeed)), 0xee);
    extra.lan_prefixes = vec!["172.16.0.0/24".parse().unwrap()];
    extra
}

type Mutation = Box<dyn Fn(&mut SiteIntent)>;

#[test]
fn invalid_intents_are_refused_with_the_field_named() {
    let base = sample_intent();
    let cases: Vec<(&str, Mutation)> = vec![
        ("revision", Box::new(|i| i.revision = 0)),
        ("uplinks", Box::new(|i| i.uplinks.clear())),
        (
            "overlay.address",
            Box::new(|i| i.overlay.address = "10.0.0.1".parse().unwrap()),
        ),
        ("wireguard.mtu", Box::new(|i| i.wireguard.mtu = 100)),
        ("probe.interval_ms", Box::new(|i| i.probe.interval_ms = 1)),
        ("failover", Box::new(|i| i.failover.down_below_score = 90)),
        (
            "peers[0]",
            Box::new(|i| {
                i.peers[0].site = i.site;
            }),
        ),
        (
            "peers[1].public_key",
            Box::new(|i| {
                i.peers[1].public_key = i.peers[0].public_key;
            }),
        ),
        (
            "peers[1].next_public_key",
            Box::new(|i| {
                i.peers[1].next_public_key = Some(i.peers[0].public_key);
            }),
        ),
        (
            "peers[0].next_public_key",
            Box::new(|i| {
                i.peers[0].next_public_key = Some(i.wireguard.public_key);
            }),
        ),
        (
            "paths[0].local_uplink",
            Box::new(|i| {
                i.paths[0].local_uplink = 7;
            }),
        ),
        (
            "paths[0].remote_site",
            Box::new(|i| {
                i.paths[0].remote_site = SiteId(Uuid::from_u128(0xabc));
            }),
        ),
        (
            "lan_prefixes",
            Box::new(|i| {
                let mut extra = sample_peer();
                extra.lan_prefixes = vec!["10.1.2.0/24".parse().unwrap()];
                i.peers.push(extra);
            }),
        ),
        (
            "policies.routing[0].match.dst_ports[0]",
            Box::new(|i| {
                i.policies.routing[0].match_rules.dst_ports = vec![PortRange { start: 9, end: 1 }];
            }),
        ),
        (
            "policies.routing[0].path_preference.uplink",
            Box::new(|i| {
                i.policies.routing[0].path_preference = PathPreference::PreferUplink {
                    uplink: "nope".into(),
                };
            }),
        ),
    ];
    for (field, mutate) in cases {
        let mut intent = base.clone();
        mutate(&mut intent);
        match codec::decode::<SiteIntent>(&codec::encode(&intent)) {
            Err(DecodeError::Invalid { source, .. }) => {
                assert!(
                    source.field.starts_with(field),
                    "expected {field}, got {source}"
                )
            }
            other => panic!("expected {field} to be invalid, got {other:?}"),
        }
    }
}

#[test]
fn command_request_checks_durations() {
    let ok = CommandRequest {
        schema_version: SCHEMA_VERSION,
        request_id: "r1".into(),
        command: Command::PathTest {
            path: PathId(Uuid::from_u128(3)),
            duration_s: 5,
        },
    };
    assert!(codec::decode::<CommandRequest>(&codec::encode(&ok)).is_ok());
    let bad = CommandRequest {
        command: Command::PathTest {
            path: PathId(Uuid::from_u128(3)),
            duration_s: 0,
        },
        ..ok
    };
    assert!(codec::decode::<CommandRequest>(&codec::encode(&bad)).is_err());
}

#[test]
fn acceptance_checks_tenant_site_and_revision() {
    let intent = sample_intent();
    assert!(intent
        .check_acceptable(intent.tenant, intent.site, None)
        .is_ok());
    assert!(intent
        .check_acceptable(intent.tenant, intent.site, Some(intent.revision - 1))
        .is_ok());
    assert!(intent
        .check_acceptable(intent.tenant, intent.site, Some(intent.revision))
        .is_err());
    assert!(intent
        .check_acceptable(TenantId(Uuid::nil()), intent.site, None)
        .is_err());
    assert!(intent
        .check_acceptable(intent.tenant, SiteId(Uuid::nil()), None)
        .is_err());
}
