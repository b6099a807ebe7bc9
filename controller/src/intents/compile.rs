//! The intent compiler: from one tenant's data (a [`TenantSnapshot`]) to every site's
//! [`SiteIntent`]. Pure: no database, no clock (the caller passes `now`), no randomness (probe
//! keys are derived from a secret), so the same snapshot always compiles to the same intents
//! and an unchanged site keeps its content digest.
//!
//! Only sites that can take part get an intent and appear as peers: enrolled (a WireGuard key),
//! addressed (an overlay address), with at least one uplink, and not revoked.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use patronus_proto::intent::{
    FailoverSettings, Overlay, PathSpec, Peer, PeerEndpoint, ProbeSettings, SiteIntent, Uplink,
    WireguardSettings,
};
use patronus_proto::policy::{LinkKind, PolicySet};
use patronus_proto::{PathId, ProbeKey, SiteId, TenantId, WgPublicKey, SCHEMA_VERSION};
use sha2::Sha256;

use crate::topology::{self, Topology, TopologyError, TopologySettings, TopologySite};

/// One uplink of a site.
#[derive(Clone, Debug, PartialEq)]
pub struct UplinkSnapshot {
    pub index: u8,
    pub name: String,
    pub address: IpAddr,
    pub kind: LinkKind,
    pub bandwidth_mbps: Option<u32>,
    pub cost_per_gb: f64,
    pub metered: bool,
}

/// One site as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteSnapshot {
    pub id: SiteId,
    pub name: String,
    pub region: Option<String>,
    pub hub: bool,
    pub revoked: bool,
    pub public_key: Option<WgPublicKey>,
    pub overlay_address: Option<IpAddr>,
    pub lan_prefixes: Vec<IpNet>,
    pub listen_port_base: u16,
    pub uplinks: Vec<UplinkSnapshot>,
}

/// One enabled policy and the sites it applies to (none: all).
#[derive(Clone, Debug)]
pub struct PolicySnapshot {
    pub policy: crate::api::policies::CompiledPolicy,
    pub site_ids: Option<Vec<SiteId>>,
}

/// Everything that decides a tenant's intents.
#[derive(Clone, Debug)]
pub struct TenantSnapshot {
    pub tenant: TenantId,
    pub overlay_network: IpNet,
    pub topology: TopologySettings,
    pub sites: Vec<SiteSnapshot>,
    pub policies: Vec<PolicySnapshot>,
    /// Known path ids by (src site, src uplink, dst site, dst uplink).
    pub path_ids: BTreeMap<(SiteId, u8, SiteId, u8), PathId>,
    pub probe: ProbeSettings,
    pub failover: FailoverSettings,
    pub wireguard_mtu: u16,
    pub persistent_keepalive_s: u16,
}

/// The result of compiling one tenant.
#[derive(Clone, Debug)]
pub struct CompiledTenant {
    pub topology: Topology,
    pub intents: Vec<SiteIntent>,
    /// Paths the intents use that have no id yet (the caller creates them and compiles again),
    /// as (src site, src uplink, dst site, dst uplink).
    pub missing_paths: Vec<(SiteId, u8, SiteId, u8)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("topology: {0}")]
    Topology(#[from] TopologyError),
}

type HmacSha256 = Hmac<Sha256>;

/// The probe HMAC key of a site pair: HMAC-SHA256(secret, tenant ‖ lower site ‖ higher site).
/// Both sites of the pair get the same key; no other pair shares it.
pub fn probe_key(secret: &[u8], tenant: TenantId, a: SiteId, b: SiteId) -> ProbeKey {
    let (low, high) = if a < b { (a, b) } else { (b, a) };
    // HMAC takes keys of any length.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(b"patronus-probe-key-v1");
    mac.update(tenant.0.as_bytes());
    mac.update(low.0.as_bytes());
    mac.update(high.0.as_bytes());
    ProbeKey(mac.finalize().into_bytes().into())
}

fn eligible(site: &SiteSnapshot) -> bool {
    !site.revoked
        && site.public_key.is_some()
        && site.overlay_address.is_some()
        && !site.uplinks.is_empty()
}

/// Compile every eligible site's intent. `revision` is filled in by the publisher; here it is 1.
pub fn compile(
    snapshot: &TenantSnapshot,
    probe_secret: &[u8],
    now_unix_ms: u64,
) -> Result<CompiledTenant, CompileError> {
    let sites: BTreeMap<SiteId, &SiteSnapshot> = snapshot
        .sites
        .iter()
        .filter(|s| eligible(s))
        .map(|s| (s.id, s))
        .collect();
    let mut settings = snapshot.topology.clone();
    // Sites marked as hubs are hubs whatever the tenant's list says; listed sites that cannot
    // take part (not enrolled yet) are left out rather than failing the whole tenant.
    let mut hubs: BTreeSet<SiteId> = settings.hub_sites.iter().copied().collect();
    hubs.extend(sites.values().filter(|s| s.hub).map(|s| s.id));
    settings.hub_sites = hubs
        .into_iter()
        .filter(|id| sites.contains_key(id))
        .collect();
    settings.full_mesh_sites.retain(|id| sites.contains_key(id));
    let topology_sites: Vec<TopologySite> = sites
        .values()
        .map(|s| TopologySite {
            id: s.id,
            region: s.region.clone(),
            uplinks: s.uplinks.iter().map(|u| u.index).collect(),
        })
        .collect();
    let topology = topology::compute(&topology_sites, &settings)?;

    let mut missing = BTreeSet::new();
    let mut intents = Vec::with_capacity(sites.len());
    for site in sites.values() {
        let mut peers = Vec::new();
        let mut paths = Vec::new();
        // Which destinations each peer carries transit for.
        let mut transit: BTreeMap<SiteId, Vec<IpNet>> = BTreeMap::new();
        for dst in sites.values() {
            if dst.id == site.id || topology.is_peered(site.id, dst.id) {
                continue;
            }
            if let Some(next) = topology.next_hop(site.id, dst.id) {
                transit
                    .entry(next)
                    .or_default()
                    .extend(dst.lan_prefixes.iter().copied());
            }
        }
        for peer_id in topology.peers_of(site.id) {
            let peer = sites[&peer_id];
            let (Some(public_key), Some(overlay_address)) = (peer.public_key, peer.overlay_address)
            else {
                continue;
            };
            // Merge adjacent and nested prefixes (exactly the same address space, fewer
            // entries): a hub carrying a thousand branches' /24s often needs a handful.
            let transit_prefixes = IpNet::aggregate(&transit.remove(&peer_id).unwrap_or_default());
            peers.push(Peer {
                site: peer.id,
                name: peer.name.clone(),
                public_key,
                overlay_address,
                lan_prefixes: peer.lan_prefixes.clone(),
                transit_prefixes,
                endpoints: peer
                    .uplinks
                    .iter()
                    .map(|u| PeerEndpoint {
                        uplink_index: u.index,
                        ip: u.address,
                        kind: Some(u.kind),
                    })
                    .collect(),
                listen_port_base: peer.listen_port_base,
                region: peer.region.clone(),
                hub: topology.hubs.contains(&peer.id),
                probe_key: probe_key(probe_secret, snapshot.tenant, site.id, peer.id),
            });
            for (local, remote) in topology.paths(site.id, peer.id) {
                let key = (site.id, local, peer.id, remote);
                match snapshot.path_ids.get(&key) {
                    Some(id) => paths.push(PathSpec {
                        id: *id,
                        local_uplink: local,
                        remote_site: peer.id,
                        remote_uplink: remote,
                    }),
                    None => {
                        missing.insert(key);
                    }
                }
            }
        }
        let policies = policies_for(site.id, &snapshot.policies);
        let (Some(public_key), Some(address)) = (site.public_key, site.overlay_address) else {
            continue;
        };
        intents.push(SiteIntent {
            schema_version: SCHEMA_VERSION,
            tenant: snapshot.tenant,
            site: site.id,
            site_name: site.name.clone(),
            revision: 1,
            generated_at_unix_ms: now_unix_ms,
            overlay: Overlay {
                address,
                network: snapshot.overlay_network,
                lan_prefixes: site.lan_prefixes.clone(),
            },
            uplinks: site
                .uplinks
                .iter()
                .map(|u| Uplink {
                    index: u.index,
                    name: u.name.clone(),
                    kind: u.kind,
                    interface: None,
                    bandwidth_mbps: u.bandwidth_mbps,
                    cost_per_gb: u.cost_per_gb,
                    metered: u.metered,
                })
                .collect(),
            wireguard: WireguardSettings {
                public_key,
                listen_port_base: site.listen_port_base,
                mtu: snapshot.wireguard_mtu,
                persistent_keepalive_s: snapshot.persistent_keepalive_s,
            },
            peers,
            paths,
            policies,
            probe: snapshot.probe.clone(),
            failover: snapshot.failover.clone(),
        });
    }
    Ok(CompiledTenant {
        topology,
        intents,
        missing_paths: missing.into_iter().collect(),
    })
}

fn policies_for(site: SiteId, policies: &[PolicySnapshot]) -> PolicySet {
    use crate::api::policies::CompiledPolicy;
    let mut set = PolicySet::default();
    for p in policies {
        if p.site_ids.as_ref().is_some_and(|ids| !ids.contains(&site)) {
            continue;
        }
        match &p.policy {
            CompiledPolicy::Routing(r) => set.routing.push(r.clone()),
            CompiledPolicy::Qos(q) => set.qos.push(q.clone()),
            CompiledPolicy::Security(s) => set.security.push(s.clone()),
            CompiledPolicy::Cost(c) => set.cost.push(c.clone()),
        }
    }
    // Deterministic order: highest priority first, then id.
    set.routing
        .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
    set.security
        .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
    set.qos
        .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
    set.cost.sort_by_key(|c| c.id);
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::TopologyMode;
    use patronus_proto::codec::Message;
    use uuid::Uuid;

    fn site(n: u8, hub: bool, enrolled: bool) -> SiteSnapshot {
        SiteSnapshot {
            id: SiteId(Uuid::from_u128(u128::from(n))),
            name: format!("site{n}"),
            region: Some("eu-west".into()),
            hub,
            revoked: false,
            public_key: enrolled.then_some(WgPublicKey([n; 32])),
            overlay_address: Some(IpAddr::from([100, 64, 0, n])),
            lan_prefixes: vec![format!("10.{n}.0.0/24").parse().unwrap()],
            listen_port_base: 51820,
            uplinks: (0..2)
                .map(|u| UplinkSnapshot {
                    index: u,
                    name: format!("wan{u}"),
                    address: IpAddr::from([198, 18, n, u + 1]),
                    kind: LinkKind::Fiber,
                    bandwidth_mbps: Some(100),
                    cost_per_gb: 0.0,
                    metered: false,
                })
                .collect(),
        }
    }

    fn snapshot(sites: Vec<SiteSnapshot>, mode: TopologyMode) -> TenantSnapshot {
        TenantSnapshot {
            tenant: TenantId(Uuid::from_u128(0xabc)),
            overlay_network: "100.64.0.0/16".parse().unwrap(),
            topology: TopologySettings {
                mode,
                ..Default::default()
            },
            sites,
            policies: Vec::new(),
            path_ids: BTreeMap::new(),
            probe: ProbeSettings::default(),
            failover: FailoverSettings::default(),
            wireguard_mtu: 1420,
            persistent_keepalive_s: 25,
        }
    }

    /// Give every missing path an id and compile again, as the publisher does.
    fn compile_with_paths(mut snap: TenantSnapshot) -> CompiledTenant {
        let first = compile(&snap, b"secret", 0).unwrap();
        for (i, key) in first.missing_paths.iter().enumerate() {
            snap.path_ids
                .insert(*key, PathId(Uuid::from_u128(0x1000 + i as u128)));
        }
        let second = compile(&snap, b"secret", 0).unwrap();
        assert!(second.missing_paths.is_empty());
        second
    }

    #[test]
    fn full_mesh_intents_validate_and_list_every_peer_and_path() {
        let compiled = compile_with_paths(snapshot(
            (1..=3).map(|n| site(n, false, true)).collect(),
            TopologyMode::FullMesh,
        ));
        assert_eq!(compiled.intents.len(), 3);
        for intent in &compiled.intents {
            intent.validate().unwrap();
            assert_eq!(intent.peers.len(), 2);
            assert_eq!(intent.paths.len(), 2 * 4);
            assert!(intent.peers.iter().all(|p| p.transit_prefixes.is_empty()));
        }
    }

    #[test]
    fn sites_not_enrolled_get_no_intent_and_are_no_ones_peer() {
        let sites = vec![
            site(1, false, true),
            site(2, false, true),
            site(3, false, false),
        ];
        let compiled = compile_with_paths(snapshot(sites, TopologyMode::FullMesh));
        assert_eq!(compiled.intents.len(), 2);
        assert!(compiled.intents.iter().all(|i| i.peers.len() == 1));
    }

    #[test]
    fn spokes_reach_each_other_through_their_hub_with_matching_transit() {
        let sites = vec![
            site(1, true, true),
            site(2, false, true),
            site(3, false, true),
        ];
        let compiled = compile_with_paths(snapshot(sites, TopologyMode::HubAndSpoke));
        let by_site: BTreeMap<u8, &SiteIntent> = compiled
            .intents
            .iter()
            .map(|i| (i.site.0.as_u128() as u8, i))
            .collect();
        let spoke2 = by_site[&2];
        assert_eq!(spoke2.peers.len(), 1);
        assert_eq!(
            spoke2.peers[0].transit_prefixes,
            vec!["10.3.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(spoke2.peers[0].hub);
        let hub = by_site[&1];
        assert_eq!(hub.peers.len(), 2);
        assert!(hub.peers.iter().all(|p| p.transit_prefixes.is_empty()));
        for intent in by_site.values() {
            intent.validate().unwrap();
        }
    }

    #[test]
    fn probe_keys_are_shared_by_a_pair_and_differ_between_pairs() {
        let t = TenantId(Uuid::from_u128(1));
        let (a, b, c) = (
            SiteId(Uuid::from_u128(2)),
            SiteId(Uuid::from_u128(3)),
            SiteId(Uuid::from_u128(4)),
        );
        assert_eq!(probe_key(b"s", t, a, b), probe_key(b"s", t, b, a));
        assert_ne!(probe_key(b"s", t, a, b), probe_key(b"s", t, a, c));
        assert_ne!(probe_key(b"s", t, a, b), probe_key(b"other", t, a, b));
    }

    #[test]
    fn compiling_twice_gives_identical_digests() {
        let snap = snapshot(
            (1..=4).map(|n| site(n, false, true)).collect(),
            TopologyMode::FullMesh,
        );
        let a = compile_with_paths(snap.clone());
        let b = compile_with_paths(snap);
        let digests = |c: &CompiledTenant| {
            c.intents
                .iter()
                .map(SiteIntent::content_digest)
                .collect::<Vec<_>>()
        };
        assert_eq!(digests(&a), digests(&b));
    }

    use proptest::prelude::*;

    fn arb_snapshot() -> impl Strategy<Value = TenantSnapshot> {
        (
            2u8..24,
            prop::sample::select(vec![
                TopologyMode::FullMesh,
                TopologyMode::HubAndSpoke,
                TopologyMode::Hierarchical,
                TopologyMode::Hybrid,
            ]),
            1usize..4,
            any::<bool>(),
            proptest::collection::vec(any::<bool>(), 24),
        )
            .prop_map(|(n, mode, hubs, region_mesh, enrolled)| {
                let sites: Vec<SiteSnapshot> = (1..=n)
                    .map(|i| {
                        let mut s = site(
                            i,
                            usize::from(i) <= hubs,
                            enrolled[usize::from(i) - 1] || usize::from(i) <= hubs,
                        );
                        s.region =
                            Some(["us-east", "us-west", "eu-west"][usize::from(i) % 3].into());
                        s
                    })
                    .collect();
                let mut snap = snapshot(sites, mode);
                snap.topology.same_region_mesh = region_mesh;
                snap.topology.max_peers = 64;
                if mode == TopologyMode::Hybrid {
                    snap.topology.full_mesh_sites = vec![SiteId(Uuid::from_u128(1))];
                }
                snap
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every compiled intent passes the edge's own validation, and every destination a
        /// site does not peer with is reachable through exactly one peer's transit prefixes
        /// (WireGuard allows an address on one peer only).
        #[test]
        fn compiled_intents_validate_and_transit_is_unambiguous(snap in arb_snapshot()) {
            let compiled = compile_with_paths(snap.clone());
            let by_site: BTreeMap<SiteId, &SiteIntent> = compiled.intents.iter().map(|i| (i.site, i)).collect();
            for intent in &compiled.intents {
                prop_assert!(intent.validate().is_ok(), "{:?}", intent.validate());
                for dst in by_site.values() {
                    if dst.site == intent.site || intent.peer(dst.site).is_some() {
                        continue;
                    }
                    for lan in &dst.overlay.lan_prefixes {
                        let carriers = intent
                            .peers
                            .iter()
                            .filter(|p| p.transit_prefixes.iter().any(|t| t.contains(lan)))
                            .count();
                        prop_assert_eq!(carriers, 1, "{} reaches {} through {} peers", intent.site_name, dst.site_name, carriers);
                    }
                }
            }
        }
    }
}
