//! The data plane's flow table as the controller sees it (pure): the top flows by bytes, each
//! with its application class, the policy that classified it and the path carrying it, for
//! a [`FlowReport`] on `sdwan.<tenant>.<site>.flows`.
//!
//! The XDP program sits on the LAN side, so it counts what the LAN sends (`bytes_tx`,
//! `packets_tx`); the return direction is not seen there and is reported as 0.

use std::net::{IpAddr, Ipv6Addr};

use patronus_proto::flows::{FlowKey, FlowRecord};
use patronus_proto::policy::AppClass;
use patronus_proto::SiteIntent;

use crate::classifier::Compiled;
use crate::dataplane::abi::{self, FlowValue, NO_PATH, NO_POLICY};

/// Flows per report (the proto allows more; the busiest are what operators look at).
pub const TOP_FLOWS: usize = 1000;

fn address(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Turn flow-table entries into records, busiest first, at most `top`.
///
/// `now_mono_ns` is the monotonic clock the BPF side stamps with (`bpf_ktime_get_ns`),
/// `now_unix_ms` the wall clock at the same moment.
pub fn records(
    entries: &[(abi::FlowKey, FlowValue)],
    intent: &SiteIntent,
    compiled: &Compiled,
    now_mono_ns: u64,
    now_unix_ms: u64,
    top: usize,
) -> Vec<FlowRecord> {
    let mut busiest: Vec<&(abi::FlowKey, FlowValue)> = entries.iter().collect();
    busiest.sort_by_key(|entry| std::cmp::Reverse(entry.1.bytes));
    busiest.truncate(top);
    let wall = |mono: u64| now_unix_ms.saturating_sub(now_mono_ns.saturating_sub(mono) / 1_000_000);
    busiest
        .into_iter()
        .map(|(key, value)| {
            let dst = address(key.dst_addr);
            let class = compiled
                .classes
                .iter()
                .find(|c| c.id == value.class_id)
                .map(|c| c.name.clone())
                .unwrap_or_else(|| AppClass::new(AppClass::BEST_EFFORT));
            let policy = (value.policy_index != NO_POLICY)
                .then(|| compiled.rules.get(usize::from(value.policy_index)))
                .flatten()
                .map(|r| r.policy);
            // Path index 8·l + r toward the site whose LAN holds the destination.
            let path = (value.path != NO_PATH)
                .then(|| {
                    let remote = intent
                        .peers
                        .iter()
                        .find(|p| p.lan_prefixes.iter().any(|n| n.contains(&dst)))?;
                    intent
                        .paths
                        .iter()
                        .find(|p| {
                            p.remote_site == remote.site
                                && crate::steering::path_index(p.local_uplink, p.remote_uplink)
                                    == value.path
                        })
                        .map(|p| p.id)
                })
                .flatten();
            let started = wall(value.first_seen_ns);
            FlowRecord {
                key: FlowKey {
                    src_ip: address(key.src_addr),
                    dst_ip: dst,
                    src_port: u16::from_be(key.src_port),
                    dst_port: u16::from_be(key.dst_port),
                    protocol: key.protocol,
                },
                app_class: class,
                policy,
                path,
                started_at_unix_ms: started,
                last_packet_at_unix_ms: wall(value.last_seen_ns).max(started),
                bytes_tx: value.bytes,
                bytes_rx: 0,
                packets_tx: value.packets,
                packets_rx: 0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::packet::flow_key_ipv4;

    #[test]
    fn busiest_first_with_wall_clock_times_and_the_default_class() {
        let intent: SiteIntent = serde_json::from_value(serde_json::json!({
            "schema_version": "1.0", "tenant": uuid::Uuid::nil(), "site": uuid::Uuid::nil(),
            "site_name": "a", "revision": 1, "generated_at_unix_ms": 0,
            "overlay": {"address": "100.64.0.1", "network": "100.64.0.0/16", "lan_prefixes": []},
            "uplinks": [], "wireguard": {"public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "listen_port_base": 51820, "mtu": 1420, "persistent_keepalive_s": 25},
            "peers": [], "paths": []
        }))
        .unwrap();
        let compiled = crate::classifier::compile(&[]).unwrap();
        let flow = |port: u16, bytes: u64| {
            (
                flow_key_ipv4([10, 1, 0, 10], [10, 2, 0, 10], 17, port, 5060),
                FlowValue {
                    bytes,
                    packets: 1,
                    first_seen_ns: 1_000_000_000,
                    last_seen_ns: 3_000_000_000,
                    path: NO_PATH,
                    policy_index: NO_POLICY,
                    ..FlowValue::default()
                },
            )
        };
        let entries = vec![flow(1, 10), flow(2, 30), flow(3, 20)];
        let out = records(&entries, &intent, &compiled, 5_000_000_000, 100_000, 2);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].key.src_port, out[0].bytes_tx), (2, 30));
        assert_eq!(out[0].key.src_ip, "10.1.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(out[0].started_at_unix_ms, 96_000);
        assert_eq!(out[0].last_packet_at_unix_ms, 98_000);
        assert_eq!(out[0].app_class.0, AppClass::BEST_EFFORT);
        assert_eq!((out[0].policy, out[0].path), (None, None));
    }
}
