//! Which paths each application class may use, in which order (pure).
//!
//! A data-plane path is one tunnel interface (local uplink `l`, remote uplink `r`): index
//! `8·l + r`, firewall mark = its routing table (`desired::table_of`), so a marked packet is
//! routed by the tunnel's table (which holds every peer's prefixes; a destination it lacks
//! falls through to the main table's default path). Each class from the compiled policies
//! gets its tunnels ranked by its path preference and its load-balancing mode.
//!
//! Until the probes of the monitoring work measure paths, the ranking uses what the intent
//! says about the uplinks: link kind as the latency/jitter/loss proxy (fiber before cable
//! before LTE before satellite), bandwidth, and cost (metered last). [`next_class_paths`]
//! turns a class's plan into the map value, raising the generation only when it changed, so
//! re-applying the same intent moves no flow.

use std::collections::BTreeMap;

use patronus_proto::policy::{LinkKind, LoadBalancing, PathPreference};
use patronus_proto::SiteIntent;

use crate::classifier::Compiled;
use crate::dataplane::abi::{ClassPaths, LbMode, PathEntry, PATHS_PER_CLASS};
use crate::desired::table_of;

/// One class's ranked paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPlan {
    pub lb_mode: LbMode,
    /// Path indexes, best first (at most PATHS_PER_CLASS).
    pub paths: Vec<u32>,
    /// Per path, for weighted modes (the local uplink's bandwidth in Mbit/s, at least 1).
    pub weights: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SteeringPlan {
    pub paths: BTreeMap<u32, PathEntry>,
    pub classes: BTreeMap<u16, ClassPlan>,
}

/// Smaller is better: the usual latency of a link kind.
fn kind_rank(kind: Option<LinkKind>) -> u32 {
    match kind {
        Some(LinkKind::Fiber) => 0,
        Some(LinkKind::Ethernet | LinkKind::Mpls) => 1,
        Some(LinkKind::Cable) => 2,
        Some(LinkKind::Dsl | LinkKind::FiveG) | Some(LinkKind::Other) | None => 3,
        Some(LinkKind::Lte) => 4,
        Some(LinkKind::Starlink) => 5,
        Some(LinkKind::Satellite) => 6,
    }
}

pub fn path_index(local: u8, remote: u8) -> u32 {
    8 * u32::from(local) + u32::from(remote)
}

fn lb_mode(lb: LoadBalancing) -> LbMode {
    match lb {
        LoadBalancing::FlowHash => LbMode::FlowHash,
        LoadBalancing::WeightedBandwidth => LbMode::WeightedBandwidth,
        LoadBalancing::RoundRobin => LbMode::RoundRobin,
        LoadBalancing::LeastFlows => LbMode::LeastFlows,
        LoadBalancing::ActiveBackup => LbMode::ActiveBackup,
    }
}

#[derive(Debug, Clone)]
struct Tunnel {
    local: u8,
    remote: u8,
    latency: u32,
    bandwidth: u32,
    /// (metered, cost per GB in milli-units)
    cost: (bool, u64),
    local_name: String,
}

/// Rank the site's tunnels for every class of `compiled`.
pub fn plan(intent: &SiteIntent, compiled: &Compiled) -> SteeringPlan {
    let mut tunnels: BTreeMap<(u8, u8), Tunnel> = BTreeMap::new();
    for path in &intent.paths {
        let Some(uplink) = intent.uplinks.iter().find(|u| u.index == path.local_uplink) else {
            continue;
        };
        let remote_kind = intent
            .peers
            .iter()
            .flat_map(|p| &p.endpoints)
            .find(|e| e.uplink_index == path.remote_uplink)
            .and_then(|e| e.kind);
        tunnels
            .entry((path.local_uplink, path.remote_uplink))
            .or_insert_with(|| Tunnel {
                local: path.local_uplink,
                remote: path.remote_uplink,
                latency: 2 * kind_rank(Some(uplink.kind)) + kind_rank(remote_kind),
                bandwidth: uplink.bandwidth_mbps.unwrap_or(1).max(1),
                cost: (
                    uplink.metered,
                    (uplink.cost_per_gb.max(0.0) * 1000.0) as u64,
                ),
                local_name: uplink.name.clone(),
            });
    }
    let mut plan = SteeringPlan::default();
    for t in tunnels.values() {
        plan.paths.insert(
            path_index(t.local, t.remote),
            PathEntry {
                mark: table_of(t.local, t.remote),
                flags: 0,
            },
        );
    }
    for class in &compiled.classes {
        // The class's preference as a tier (lower is better), then ties broken by latency,
        // cost and index so the order is stable.
        let tier = |t: &Tunnel| -> (u64, u64) {
            match &class.path_preference {
                PathPreference::LowestCost => (u64::from(t.cost.0), t.cost.1),
                PathPreference::HighestBandwidth => (u64::from(u32::MAX - t.bandwidth), 0),
                PathPreference::PreferUplink { uplink } => (u64::from(&t.local_name != uplink), 0),
                PathPreference::LowestLatency
                | PathPreference::LowestJitter
                | PathPreference::LowestLoss
                | PathPreference::Weighted { .. } => (u64::from(t.latency), 0),
            }
        };
        let mut ranked: Vec<&Tunnel> = tunnels.values().collect();
        ranked.sort_by_key(|t| (tier(t), t.latency, t.cost, t.local, t.remote));
        // Active-backup lists every path, best first (the first is used, the next on
        // failover). The spreading modes spread over the best tier only: hashing bulk
        // traffic onto the expensive link because it is also up is not what "lowest cost"
        // means.
        if class.load_balancing != LoadBalancing::ActiveBackup {
            if let Some(best) = ranked.first().map(|t| tier(t)) {
                ranked.retain(|t| tier(t) == best);
            }
        }
        ranked.truncate(PATHS_PER_CLASS);
        plan.classes.insert(
            class.id,
            ClassPlan {
                lb_mode: lb_mode(class.load_balancing),
                paths: ranked
                    .iter()
                    .map(|t| path_index(t.local, t.remote))
                    .collect(),
                weights: ranked.iter().map(|t| t.bandwidth).collect(),
            },
        );
    }
    plan
}

/// The map value for `class`, given what the map holds now: the generation rises only when
/// the paths or the mode change (a new generation makes flows re-check their path).
pub fn next_class_paths(current: Option<&ClassPaths>, class: &ClassPlan) -> ClassPaths {
    let mut value = ClassPaths {
        generation: 0,
        lb_mode: class.lb_mode as u8,
        count: class.paths.len().min(PATHS_PER_CLASS) as u8,
        flags: 0,
        ..ClassPaths::default()
    };
    for (i, (path, weight)) in class
        .paths
        .iter()
        .zip(&class.weights)
        .take(PATHS_PER_CLASS)
        .enumerate()
    {
        value.paths[i] = *path;
        value.weights[i] = *weight;
    }
    value.generation = match current {
        Some(c)
            if ClassPaths {
                generation: c.generation,
                flags: 0,
                ..value
            } == ClassPaths { flags: 0, ..*c } =>
        {
            c.generation
        }
        Some(c) => c.generation.wrapping_add(1).max(1),
        None => 1,
    };
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::compile;
    use patronus_proto::policy::{AppClass, MatchRules, RoutingPolicy, Sla};
    use patronus_proto::PolicyId;

    fn intent_with(uplinks: &[(&str, LinkKind, u32, f64, bool)]) -> SiteIntent {
        let mut intent: SiteIntent = serde_json::from_value(serde_json::json!({
            "schema_version": "1.0", "tenant": uuid::Uuid::nil(), "site": uuid::Uuid::nil(),
            "site_name": "a", "revision": 1, "generated_at_unix_ms": 0,
            "overlay": {"address": "100.64.0.1", "network": "100.64.0.0/16", "lan_prefixes": []},
            "uplinks": [], "wireguard": {"public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "listen_port_base": 51820, "mtu": 1420, "persistent_keepalive_s": 25},
            "peers": [], "paths": []
        }))
        .expect("a minimal intent");
        for (i, (name, kind, bw, cost, metered)) in uplinks.iter().enumerate() {
            intent.uplinks.push(patronus_proto::intent::Uplink {
                index: i as u8,
                name: (*name).into(),
                kind: *kind,
                interface: None,
                bandwidth_mbps: Some(*bw),
                cost_per_gb: *cost,
                metered: *metered,
            });
            for r in 0..2 {
                intent.paths.push(patronus_proto::intent::PathSpec {
                    id: patronus_proto::PathId(uuid::Uuid::from_u128((i * 2 + r) as u128 + 1)),
                    local_uplink: i as u8,
                    remote_site: patronus_proto::SiteId(uuid::Uuid::from_u128(99)),
                    remote_uplink: r as u8,
                });
            }
        }
        intent
    }

    fn policy(
        n: u128,
        class: &str,
        preference: PathPreference,
        lb: LoadBalancing,
    ) -> RoutingPolicy {
        RoutingPolicy {
            id: PolicyId(uuid::Uuid::from_u128(n)),
            name: class.into(),
            priority: 10,
            enabled: true,
            match_rules: MatchRules::default(),
            app_class: AppClass::new(class),
            path_preference: preference,
            load_balancing: lb,
            sla: Sla::default(),
        }
    }

    #[test]
    fn voip_prefers_fiber_and_backup_the_cheap_uplink() {
        let intent = intent_with(&[
            ("fiber", LinkKind::Fiber, 1000, 5.0, false),
            ("lte", LinkKind::Lte, 100, 0.0, false),
        ]);
        let compiled = compile(&[
            policy(
                1,
                "voip",
                PathPreference::LowestLatency,
                LoadBalancing::ActiveBackup,
            ),
            policy(
                2,
                "backup",
                PathPreference::LowestCost,
                LoadBalancing::FlowHash,
            ),
        ])
        .unwrap();
        let plan = plan(&intent, &compiled);
        assert_eq!(plan.paths.len(), 4);
        assert_eq!(plan.paths[&path_index(1, 0)].mark, table_of(1, 0));
        let voip = &plan.classes[&1];
        let backup = &plan.classes[&2];
        assert_eq!(voip.lb_mode, LbMode::ActiveBackup);
        // Active-backup: all four, best first.
        assert_eq!(voip.paths.len(), 4);
        assert_eq!(voip.paths[..2], [path_index(0, 0), path_index(0, 1)]);
        // Flow hash: only the cheapest tier, so no flow is hashed onto the dear uplink.
        assert_eq!(backup.paths, [path_index(1, 0), path_index(1, 1)]);
        assert_eq!(backup.weights[0], 100);
    }

    #[test]
    fn the_generation_moves_only_when_the_paths_change() {
        let class = ClassPlan {
            lb_mode: LbMode::ActiveBackup,
            paths: vec![0, 1],
            weights: vec![1, 1],
        };
        let first = next_class_paths(None, &class);
        assert_eq!(first.generation, 1);
        assert_eq!(next_class_paths(Some(&first), &class), first);
        let failed_over = ClassPlan {
            paths: vec![1],
            weights: vec![1],
            ..class
        };
        let second = next_class_paths(Some(&first), &failed_over);
        assert_eq!(
            (second.generation, second.count, second.paths[0]),
            (2, 1, 1)
        );
    }
}
