//! Which paths each application class may use toward each peer site, in which order (pure).
//!
//! A data-plane path is one tunnel interface (local uplink `l`, remote uplink `r`): index
//! `8·l + r`, firewall mark = its routing table (`desired::table_of`), so a marked packet is
//! routed by the tunnel's table (which holds every peer's prefixes; a destination it lacks
//! falls through to the main table's default path). A tunnel carries one path per peer, and
//! it can be down toward one peer and fine toward another, so the plan is per (class,
//! destination site): every peer gets a stable slot ([`SiteSlots`]), its prefixes (overlay
//! address, LANs, transit) point at the slot, and each (class, slot) gets its own ranked
//! paths.
//!
//! Ranking: the class's path preference over what the probes measured ([`PathView`]), with
//! what the intent says about the uplinks as the tie-break and as the stand-in before the
//! first measurement (fiber before cable before LTE before satellite; bandwidth; cost,
//! metered last). Health decides which paths qualify: a path that is down never does; a path
//! that is up, past its failback hold-down and within the class's SLA does; the others
//! (degraded, recovering, out of SLA) only when no path qualifies. [`next_class_paths`]
//! turns a plan into the map value, raising the generation only when it changed, so
//! re-applying the same intent or the same health moves no flow.

use std::collections::{BTreeMap, BTreeSet};

use patronus_proto::metrics::PathStatus;
use patronus_proto::policy::{LinkKind, LoadBalancing, PathPreference};
use patronus_proto::{PathId, SiteId, SiteIntent};

use crate::classifier::{prefix_of, Compiled, Prefix};
use crate::dataplane::abi::{
    ClassPaths, LbMode, PathEntry, CLASS_REPIN, MAX_SITES, PATHS_PER_CLASS,
};
use crate::desired::table_of;

/// One (class, destination) plan: ranked paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPlan {
    pub lb_mode: LbMode,
    /// Path indexes, best first (at most PATHS_PER_CLASS): every path the class may use
    /// now; flows on any of them stay.
    pub paths: Vec<u32>,
    /// New flows choose among the first `pick` paths (the best tier).
    pub pick: usize,
    /// Per path, for weighted modes (the local uplink's bandwidth in Mbit/s, at least 1).
    pub weights: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SteeringPlan {
    pub paths: BTreeMap<u32, PathEntry>,
    /// (class id, destination slot) → ranked paths.
    pub classes: BTreeMap<(u16, u16), ClassPlan>,
    /// Destination prefix → slot of the peer site behind it.
    pub dests: BTreeMap<Prefix, u16>,
}

/// Stable destination slots for peer sites: a peer keeps its slot while it stays in the
/// intent (flows remember the slot they were created with), a removed peer's slot is freed,
/// and slot 0 stays "no known site".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteSlots {
    slots: BTreeMap<SiteId, u16>,
}

impl SiteSlots {
    /// Keep the slots of `peers` that have one, free the others', give new peers the lowest
    /// free slots. Peers beyond the data plane's capacity get none (their traffic takes the
    /// default route).
    pub fn update(&mut self, peers: impl IntoIterator<Item = SiteId>) {
        let wanted: BTreeSet<SiteId> = peers.into_iter().collect();
        self.slots.retain(|site, _| wanted.contains(site));
        let mut used: BTreeSet<u16> = self.slots.values().copied().collect();
        let mut next = 1u16;
        for site in wanted {
            if self.slots.contains_key(&site) {
                continue;
            }
            while used.contains(&next) {
                next += 1;
            }
            if u32::from(next) >= MAX_SITES {
                break;
            }
            self.slots.insert(site, next);
            used.insert(next);
        }
    }

    pub fn slot(&self, site: SiteId) -> Option<u16> {
        self.slots.get(&site).copied()
    }
}

/// What the monitor knows about one path now: the input of selection.
#[derive(Debug, Clone, PartialEq)]
pub struct PathView {
    pub status: PathStatus,
    /// Past its failback hold-down (or never failed): may take traffic back.
    pub preferred: bool,
    pub latency_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    /// Classes whose SLA the path does not meet now (or has not met for the hold-down).
    pub sla_blocked: BTreeSet<u16>,
    /// Another path leaving by the same local uplink just went down and this one has not
    /// answered since: likely cut too (the uplink itself failed), so it serves only when
    /// nothing else qualifies. A class failing over then goes straight to another uplink
    /// instead of hopping through its sibling first.
    pub suspect: bool,
}

impl Default for PathView {
    /// Not measured yet: usable, ranked by what the intent says.
    fn default() -> Self {
        Self {
            status: PathStatus::Unknown,
            preferred: true,
            latency_ms: None,
            jitter_ms: None,
            loss_pct: None,
            sla_blocked: BTreeSet::new(),
            suspect: false,
        }
    }
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

/// One path toward one peer, with what ranking needs.
#[derive(Debug, Clone)]
struct Candidate {
    id: PathId,
    local: u8,
    remote: u8,
    /// Link-kind proxy for latency (before measurements, and as tie-break).
    kind_latency: u32,
    bandwidth: u32,
    /// (metered, cost per GB in milli-units)
    cost: (bool, u64),
    local_name: String,
}

/// A measurement as an integer sort key (tenths), unmeasured after every measured one.
fn measured(value: Option<f64>) -> u64 {
    match value {
        Some(v) if v.is_finite() && v >= 0.0 => (v * 10.0).round().min(1e15) as u64,
        _ => u64::MAX,
    }
}

/// Rank the site's paths for every (class of `compiled`, peer site) given the paths' health.
pub fn plan(
    intent: &SiteIntent,
    compiled: &Compiled,
    slots: &SiteSlots,
    views: &BTreeMap<PathId, PathView>,
) -> SteeringPlan {
    let unmeasured = PathView::default();
    let mut plan = SteeringPlan::default();
    let mut by_site: BTreeMap<SiteId, Vec<Candidate>> = BTreeMap::new();
    for path in &intent.paths {
        let Some(uplink) = intent.uplinks.iter().find(|u| u.index == path.local_uplink) else {
            continue;
        };
        let Some(peer) = intent.peers.iter().find(|p| p.site == path.remote_site) else {
            continue;
        };
        let remote_kind = peer
            .endpoints
            .iter()
            .find(|e| e.uplink_index == path.remote_uplink)
            .and_then(|e| e.kind);
        plan.paths.insert(
            path_index(path.local_uplink, path.remote_uplink),
            PathEntry {
                mark: table_of(path.local_uplink, path.remote_uplink),
                flags: 0,
            },
        );
        by_site.entry(peer.site).or_default().push(Candidate {
            id: path.id,
            local: path.local_uplink,
            remote: path.remote_uplink,
            kind_latency: 2 * kind_rank(Some(uplink.kind)) + kind_rank(remote_kind),
            bandwidth: uplink.bandwidth_mbps.unwrap_or(1).max(1),
            cost: (
                uplink.metered,
                (uplink.cost_per_gb.max(0.0) * 1000.0) as u64,
            ),
            local_name: uplink.name.clone(),
        });
    }
    for peer in &intent.peers {
        let Some(slot) = slots.slot(peer.site) else {
            continue;
        };
        let prefixes = std::iter::once(ipnet::IpNet::from(peer.overlay_address))
            .chain(peer.lan_prefixes.iter().copied())
            .chain(peer.transit_prefixes.iter().copied());
        for net in prefixes {
            plan.dests.insert(prefix_of(&net), slot);
        }
    }
    for (site, candidates) in &by_site {
        let Some(slot) = slots.slot(*site) else {
            continue;
        };
        for class in &compiled.classes {
            let view = |c: &Candidate| views.get(&c.id).unwrap_or(&unmeasured);
            // The measurement a preference ranks by (tenths), unmeasured last.
            let metric = |c: &Candidate| -> Option<(u64, u64)> {
                let v = view(c);
                match &class.path_preference {
                    PathPreference::LowestJitter => Some((measured(v.jitter_ms), 10)),
                    PathPreference::LowestLoss => Some((measured(v.loss_pct), 5)),
                    PathPreference::LowestLatency | PathPreference::Weighted { .. } => {
                        Some((measured(v.latency_ms), 50))
                    }
                    _ => None,
                }
            };
            // Tiers are measured from the best candidate (within 5 ms, 1 ms jitter or 0.5 %
            // loss of it = the first tier), not cut at fixed boundaries, so two paths a hair
            // apart never land in different tiers because of noise.
            let best = candidates
                .iter()
                .filter_map(|c| metric(c).map(|(value, _)| value))
                .filter(|v| *v != u64::MAX)
                .min();
            // The class's preference as (tier, exact value), lower is better; the spreading
            // modes use the whole best tier; ties are broken by the link-kind proxy, then the
            // exact value, cost and index, so the order is stable.
            let tier = |c: &Candidate| -> (u64, u64) {
                let v = view(c);
                match &class.path_preference {
                    PathPreference::LowestCost => ((u64::from(c.cost.0) << 48) | c.cost.1, 0),
                    PathPreference::HighestBandwidth => (u64::from(u32::MAX - c.bandwidth), 0),
                    PathPreference::PreferUplink { uplink } => {
                        (u64::from(&c.local_name != uplink), measured(v.latency_ms))
                    }
                    _ => match (metric(c), best) {
                        (Some((value, width)), Some(best)) if value != u64::MAX => {
                            ((value - best.min(value)) / width, value)
                        }
                        _ => (u64::MAX, u64::MAX),
                    },
                }
            };
            let qualifies = |c: &Candidate| {
                let v = view(c);
                matches!(v.status, PathStatus::Up | PathStatus::Unknown)
                    && v.preferred
                    && !v.suspect
                    && !v.sla_blocked.contains(&class.id)
            };
            let usable: Vec<&Candidate> = candidates
                .iter()
                .filter(|c| view(c).status != PathStatus::Down)
                .collect();
            let mut ranked: Vec<&Candidate> = if usable.iter().any(|c| qualifies(c)) {
                usable.into_iter().filter(|c| qualifies(c)).collect()
            } else {
                usable
            };
            // Within a tier (measurements in the same bucket), the link-kind proxy before the
            // exact measurement: sub-millisecond noise between equal paths must not reorder
            // them at every refresh.
            ranked.sort_by_key(|c| {
                let (bucket, exact) = tier(c);
                (bucket, c.kind_latency, exact, c.cost, c.local, c.remote)
            });
            // Every qualifying path is listed, best first, so a flow on a healthy path that
            // is merely outranked stays there. Active-backup uses the first (the next on
            // failover); the spreading modes spread new flows over the best tier only:
            // hashing bulk traffic onto the expensive link because it is also up is not
            // what "lowest cost" means.
            ranked.truncate(PATHS_PER_CLASS);
            let pick = match (class.load_balancing, ranked.first().map(|c| tier(c).0)) {
                (LoadBalancing::ActiveBackup, _) | (_, None) => ranked.len(),
                (_, Some(best)) => ranked.iter().take_while(|c| tier(c).0 == best).count(),
            };
            plan.classes.insert(
                (class.id, slot),
                ClassPlan {
                    lb_mode: lb_mode(class.load_balancing),
                    paths: ranked
                        .iter()
                        .map(|c| path_index(c.local, c.remote))
                        .collect(),
                    pick,
                    weights: ranked.iter().map(|c| c.bandwidth).collect(),
                },
            );
        }
    }
    plan
}

/// The failovers between two plans: for every (class, destination), each path that was
/// listed before and is not any more (it is down, degraded, recovering or out of the class's
/// SLA: flows on it move), paired with the new first path, as path ids `(from, to, reason)`,
/// each pair once. A path still listed is not reported: its flows stay.
pub fn failovers(
    intent: &SiteIntent,
    slots: &SiteSlots,
    before: &SteeringPlan,
    after: &SteeringPlan,
    views: &BTreeMap<PathId, PathView>,
) -> Vec<(PathId, PathId, String)> {
    let id_of = |slot: u16, index: u32| {
        intent
            .paths
            .iter()
            .find(|p| {
                slots.slot(p.remote_site) == Some(slot)
                    && path_index(p.local_uplink, p.remote_uplink) == index
            })
            .map(|p| p.id)
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (key @ (class, slot), old) in &before.classes {
        let Some(new) = after.classes.get(key) else {
            continue;
        };
        let Some(&to) = new.paths.first() else {
            continue;
        };
        for &from in old.paths.iter().filter(|p| !new.paths.contains(p)) {
            let (Some(from_id), Some(to_id)) = (id_of(*slot, from), id_of(*slot, to)) else {
                continue;
            };
            if !seen.insert((from_id, to_id)) {
                continue;
            }
            let reason = match views.get(&from_id) {
                Some(v) if v.status == PathStatus::Down => "path down".to_string(),
                Some(v) if v.suspect => {
                    "uplink suspect: another path leaving by it went down".to_string()
                }
                Some(v) if v.status == PathStatus::Degraded => "path degraded".to_string(),
                Some(v) if v.sla_blocked.contains(class) => {
                    format!("SLA of class {class} not met")
                }
                Some(v) if !v.preferred => "path recovering (hold-down)".to_string(),
                _ => "path withdrawn".to_string(),
            };
            out.push((from_id, to_id, reason));
        }
    }
    out
}

/// The map value for `class`, given what the map holds now: the generation rises only when
/// the paths or the mode change (a new generation makes flows re-check their path).
pub fn next_class_paths(current: Option<&ClassPaths>, class: &ClassPlan) -> ClassPaths {
    let mut value = ClassPaths {
        generation: 0,
        lb_mode: class.lb_mode as u8,
        count: class.paths.len().min(PATHS_PER_CLASS) as u8,
        flags: 0,
        pick: class.pick.min(class.paths.len()).min(PATHS_PER_CLASS) as u8,
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
    // Active-backup failback: a path that was not listed comes back at the top, so the
    // class's flows return to it (the hold-down already passed, or it would not be listed).
    if let Some(c) = current {
        let listed = &c.paths[..usize::from(c.count).min(PATHS_PER_CLASS)];
        if class.lb_mode == LbMode::ActiveBackup
            && c.count > 0
            && class
                .paths
                .first()
                .is_some_and(|first| !listed.contains(first))
        {
            value.flags |= CLASS_REPIN;
        }
    }
    match current {
        // Unchanged: the same generation and flags (a re-pin still pending for idle flows
        // stays in force).
        Some(c)
            if ClassPaths {
                generation: c.generation,
                flags: 0,
                ..value
            } == ClassPaths { flags: 0, ..*c } =>
        {
            *c
        }
        Some(c) => ClassPaths {
            generation: c.generation.wrapping_add(1).max(1),
            ..value
        },
        None => ClassPaths {
            generation: 1,
            ..value
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::compile;
    use patronus_proto::intent::{Peer, PeerEndpoint};
    use patronus_proto::policy::{AppClass, MatchRules, RoutingPolicy, Sla};
    use patronus_proto::{PolicyId, ProbeKey, WgPublicKey};

    const PEER_A: u128 = 99;
    const PEER_B: u128 = 98;

    fn site(n: u128) -> SiteId {
        SiteId(uuid::Uuid::from_u128(n))
    }

    /// Path id of (local, peer, remote).
    fn path_id(local: u8, peer: u128, remote: u8) -> PathId {
        PathId(uuid::Uuid::from_u128(
            peer * 1000 + u128::from(local) * 10 + u128::from(remote) + 1,
        ))
    }

    fn peer(n: u128, lan: &str) -> Peer {
        Peer {
            site: site(n),
            name: format!("peer{n}"),
            public_key: WgPublicKey([n as u8; 32]),
            overlay_address: format!("100.64.0.{n}").parse().unwrap(),
            lan_prefixes: vec![lan.parse().unwrap()],
            transit_prefixes: vec![],
            endpoints: (0..2)
                .map(|i| PeerEndpoint {
                    uplink_index: i,
                    ip: format!("198.18.{n}.{i}").parse().unwrap(),
                    kind: Some(if i == 0 {
                        LinkKind::Fiber
                    } else {
                        LinkKind::Lte
                    }),
                })
                .collect(),
            listen_port_base: 51820,
            region: None,
            hub: false,
            probe_key: ProbeKey([1; 32]),
            next_public_key: None,
        }
    }

    /// An intent with the given uplinks and peers A (and B when `two_peers`), every
    /// (local, remote) path to each.
    fn intent_with(uplinks: &[(&str, LinkKind, u32, f64, bool)], two_peers: bool) -> SiteIntent {
        let mut intent: SiteIntent = serde_json::from_value(serde_json::json!({
            "schema_version": "1.0", "tenant": uuid::Uuid::nil(), "site": uuid::Uuid::nil(),
            "site_name": "a", "revision": 1, "generated_at_unix_ms": 0,
            "overlay": {"address": "100.64.0.1", "network": "100.64.0.0/16", "lan_prefixes": []},
            "uplinks": [], "wireguard": {"public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "listen_port_base": 51820, "mtu": 1420, "persistent_keepalive_s": 25},
            "peers": [], "paths": []
        }))
        .expect("a minimal intent");
        intent.peers.push(peer(PEER_A, "10.99.0.0/24"));
        if two_peers {
            intent.peers.push(peer(PEER_B, "10.98.0.0/24"));
        }
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
        }
        for p in intent.peers.clone() {
            let n = p.site.0.as_u128();
            for l in 0..uplinks.len() as u8 {
                for r in 0..2u8 {
                    intent.paths.push(patronus_proto::intent::PathSpec {
                        id: path_id(l, n, r),
                        local_uplink: l,
                        remote_site: p.site,
                        remote_uplink: r,
                    });
                }
            }
        }
        intent
    }

    fn fiber_and_lte(two_peers: bool) -> SiteIntent {
        intent_with(
            &[
                ("fiber", LinkKind::Fiber, 1000, 5.0, false),
                ("lte", LinkKind::Lte, 100, 0.0, false),
            ],
            two_peers,
        )
    }

    fn slots_for(intent: &SiteIntent) -> SiteSlots {
        let mut slots = SiteSlots::default();
        slots.update(intent.peers.iter().map(|p| p.site));
        slots
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
            probe_interval_ms: None,
        }
    }

    fn voip_and_backup() -> Compiled {
        compile(&[
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
        .unwrap()
    }

    fn down() -> PathView {
        PathView {
            status: PathStatus::Down,
            preferred: false,
            ..PathView::default()
        }
    }

    fn measured_view(latency_ms: f64) -> PathView {
        PathView {
            status: PathStatus::Up,
            latency_ms: Some(latency_ms),
            jitter_ms: Some(1.0),
            loss_pct: Some(0.0),
            ..PathView::default()
        }
    }

    #[test]
    fn voip_prefers_fiber_and_backup_the_cheap_uplink() {
        let intent = fiber_and_lte(false);
        let slots = slots_for(&intent);
        let plan = plan(&intent, &voip_and_backup(), &slots, &BTreeMap::new());
        assert_eq!(plan.paths.len(), 4);
        assert_eq!(plan.paths[&path_index(1, 0)].mark, table_of(1, 0));
        let a = slots.slot(site(PEER_A)).unwrap();
        let voip = &plan.classes[&(1, a)];
        let backup = &plan.classes[&(2, a)];
        assert_eq!(voip.lb_mode, LbMode::ActiveBackup);
        // Active-backup: all four, best first.
        assert_eq!(voip.paths.len(), 4);
        assert_eq!(voip.paths[..2], [path_index(0, 0), path_index(0, 1)]);
        // Flow hash: new flows only on the cheapest tier, so none is hashed onto the dear
        // uplink; the dear paths are listed after it (a flow already there stays).
        assert_eq!(backup.pick, 2);
        assert_eq!(backup.paths[..2], [path_index(1, 0), path_index(1, 1)]);
        assert_eq!(backup.paths.len(), 4);
        assert_eq!(backup.weights[0], 100);
        // The peer's overlay address and LAN lead to its slot.
        assert_eq!(plan.dests.len(), 2);
        assert!(plan.dests.values().all(|s| *s == a));
    }

    #[test]
    fn a_path_down_toward_one_peer_leaves_the_other_peer_alone() {
        let intent = fiber_and_lte(true);
        let slots = slots_for(&intent);
        let views = BTreeMap::from([(path_id(0, PEER_A, 0), down())]);
        let plan = plan(&intent, &voip_and_backup(), &slots, &views);
        let (a, b) = (
            slots.slot(site(PEER_A)).unwrap(),
            slots.slot(site(PEER_B)).unwrap(),
        );
        assert_ne!(a, b);
        assert_eq!(plan.classes[&(1, a)].paths[0], path_index(0, 1));
        assert!(!plan.classes[&(1, a)].paths.contains(&path_index(0, 0)));
        assert_eq!(plan.classes[&(1, b)].paths[0], path_index(0, 0));
    }

    #[test]
    fn measured_latency_ranks_before_the_link_kind() {
        let intent = fiber_and_lte(false);
        let slots = slots_for(&intent);
        let a = slots.slot(site(PEER_A)).unwrap();
        // The fiber is slow today; the LTE path (1, 1) is fastest.
        let views = BTreeMap::from([
            (path_id(0, PEER_A, 0), measured_view(80.0)),
            (path_id(0, PEER_A, 1), measured_view(90.0)),
            (path_id(1, PEER_A, 0), measured_view(40.0)),
            (path_id(1, PEER_A, 1), measured_view(20.0)),
        ]);
        let plan = plan(&intent, &voip_and_backup(), &slots, &views);
        assert_eq!(
            plan.classes[&(1, a)].paths,
            [
                path_index(1, 1),
                path_index(1, 0),
                path_index(0, 0),
                path_index(0, 1)
            ]
        );
    }

    #[test]
    fn degraded_sla_blocked_and_recovering_paths_serve_only_when_nothing_qualifies() {
        let intent = fiber_and_lte(false);
        let slots = slots_for(&intent);
        let a = slots.slot(site(PEER_A)).unwrap();
        let compiled = voip_and_backup();
        let mut views = BTreeMap::new();
        views.insert(
            path_id(0, PEER_A, 0),
            PathView {
                status: PathStatus::Degraded,
                ..measured_view(10.0)
            },
        );
        views.insert(
            path_id(0, PEER_A, 1),
            PathView {
                sla_blocked: BTreeSet::from([1]),
                ..measured_view(11.0)
            },
        );
        views.insert(
            path_id(1, PEER_A, 0),
            PathView {
                preferred: false,
                ..measured_view(12.0)
            },
        );
        views.insert(path_id(1, PEER_A, 1), measured_view(50.0));
        let p = plan(&intent, &compiled, &slots, &views);
        assert_eq!(p.classes[&(1, a)].paths, [path_index(1, 1)]);
        // A suspect path (its uplink's sibling just went down) is no better.
        views.insert(
            path_id(1, PEER_A, 1),
            PathView {
                suspect: true,
                ..measured_view(50.0)
            },
        );
        let p = plan(&intent, &compiled, &slots, &views);
        assert_eq!(
            p.classes[&(1, a)].paths,
            [
                path_index(0, 0),
                path_index(0, 1),
                path_index(1, 0),
                path_index(1, 1)
            ],
            "with nothing qualifying, every usable path serves, best first"
        );
        views.insert(path_id(1, PEER_A, 1), measured_view(50.0));
        // The only qualifying path goes down: the rest serve, best first, down excluded.
        views.insert(path_id(1, PEER_A, 1), down());
        let p = plan(&intent, &compiled, &slots, &views);
        assert_eq!(
            p.classes[&(1, a)].paths,
            [path_index(0, 0), path_index(0, 1), path_index(1, 0)]
        );
        // Everything down: no path, so the class takes the default route.
        for l in 0..2 {
            for r in 0..2 {
                views.insert(path_id(l, PEER_A, r), down());
            }
        }
        let p = plan(&intent, &compiled, &slots, &views);
        assert!(p.classes[&(1, a)].paths.is_empty());
    }

    #[test]
    fn slots_are_stable_and_reused() {
        let mut slots = SiteSlots::default();
        slots.update([site(1), site(2), site(3)]);
        let two = slots.slot(site(2));
        slots.update([site(2), site(3)]);
        assert_eq!(slots.slot(site(2)), two);
        assert_eq!(slots.slot(site(1)), None);
        slots.update([site(2), site(3), site(4)]);
        assert_eq!(slots.slot(site(4)), Some(1), "the freed slot is reused");
        assert!(slots.slots.values().all(|s| *s >= 1));
    }

    #[test]
    fn the_generation_moves_only_when_the_paths_change() {
        let class = ClassPlan {
            lb_mode: LbMode::ActiveBackup,
            paths: vec![0, 1],
            pick: 2,
            weights: vec![1, 1],
        };
        let first = next_class_paths(None, &class);
        assert_eq!(first.generation, 1);
        assert_eq!(next_class_paths(Some(&first), &class), first);
        let failed_over = ClassPlan {
            paths: vec![1],
            pick: 1,
            weights: vec![1],
            ..class.clone()
        };
        let second = next_class_paths(Some(&first), &failed_over);
        assert_eq!(
            (
                second.generation,
                second.count,
                second.paths[0],
                second.flags
            ),
            (2, 1, 1, 0)
        );
        // Failback: path 0 returns at the top, so flows are re-pinned to it.
        let third = next_class_paths(Some(&second), &class);
        assert_eq!((third.generation, third.flags), (3, CLASS_REPIN));
        // Re-applying keeps the pending re-pin.
        assert_eq!(next_class_paths(Some(&third), &class), third);
        // Spreading modes never re-pin.
        let hashed = ClassPlan {
            lb_mode: LbMode::FlowHash,
            ..class
        };
        let h1 = next_class_paths(
            None,
            &ClassPlan {
                paths: vec![1],
                pick: 1,
                weights: vec![1],
                ..hashed.clone()
            },
        );
        assert_eq!(next_class_paths(Some(&h1), &hashed).flags, 0);
    }

    #[test]
    fn a_failover_is_reported_once_per_pair_with_its_reason() {
        let intent = fiber_and_lte(false);
        let slots = slots_for(&intent);
        let compiled = voip_and_backup();
        let before = plan(&intent, &compiled, &slots, &BTreeMap::new());
        let views = BTreeMap::from([(path_id(0, PEER_A, 0), down())]);
        let after = plan(&intent, &compiled, &slots, &views);
        let found = failovers(&intent, &slots, &before, &after, &views);
        // VoIP's first path is gone (to its next); the backup class listed it too (its flows
        // there move to the cheap tier's first).
        assert_eq!(
            found,
            vec![
                (
                    path_id(0, PEER_A, 0),
                    path_id(0, PEER_A, 1),
                    "path down".to_string()
                ),
                (
                    path_id(0, PEER_A, 0),
                    path_id(1, PEER_A, 0),
                    "path down".to_string()
                ),
            ]
        );
        // The same plan again: nothing to report.
        assert!(failovers(&intent, &slots, &after, &after, &views).is_empty());
    }

    #[test]
    fn an_outranked_healthy_path_keeps_its_flows_in_spreading_modes() {
        let intent = fiber_and_lte(false);
        let slots = slots_for(&intent);
        let a = slots.slot(site(PEER_A)).unwrap();
        let compiled = compile(&[policy(
            1,
            "video",
            PathPreference::LowestLatency,
            LoadBalancing::FlowHash,
        )])
        .unwrap();
        let mut views = BTreeMap::from([
            (path_id(0, PEER_A, 0), measured_view(2.0)),
            (path_id(0, PEER_A, 1), measured_view(3.0)),
            (path_id(1, PEER_A, 0), measured_view(30.0)),
            (path_id(1, PEER_A, 1), measured_view(31.0)),
        ]);
        let before = plan(&intent, &compiled, &slots, &views);
        assert_eq!(before.classes[&(1, a)].pick, 2);
        // (0, 1) slows down: new flows avoid it, but it stays listed, so the flows hashed
        // onto it do not move (the map value keeps it among `count`).
        views.insert(path_id(0, PEER_A, 1), measured_view(12.0));
        let after = plan(&intent, &compiled, &slots, &views);
        let class = &after.classes[&(1, a)];
        assert_eq!(class.pick, 1);
        assert!(class.paths.contains(&path_index(0, 1)));
        let value = next_class_paths(None, class);
        assert_eq!((value.count, value.pick), (4, 1));
    }

    #[test]
    fn noise_between_equal_paths_does_not_reorder_them() {
        let intent = fiber_and_lte(false);
        let slots = slots_for(&intent);
        let a = slots.slot(site(PEER_A)).unwrap();
        // Fiber to fiber is a hair slower this second; it still ranks first.
        let views = BTreeMap::from([
            (path_id(0, PEER_A, 0), measured_view(2.4)),
            (path_id(0, PEER_A, 1), measured_view(2.1)),
            (path_id(1, PEER_A, 0), measured_view(2.2)),
            (path_id(1, PEER_A, 1), measured_view(2.3)),
        ]);
        let p = plan(&intent, &voip_and_backup(), &slots, &views);
        assert_eq!(p.classes[&(1, a)].paths[0], path_index(0, 0));
    }
}
