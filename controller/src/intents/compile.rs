//! The intent compiler: from one tenant's data (a [`TenantSnapshot`]) to every site's
//! [`SiteIntent`]. Pure: no database, no clock (the caller passes `now`), no randomness (probe
//! keys are derived from a secret), so the same snapshot always compiles to the same intents
//! and an unchanged site keeps its content digest.
//!
//! Only sites that can take part get an intent and appear as peers: enrolled (a WireGuard key),
//! addressed (an overlay address), with at least one uplink, and not revoked.
//!
//! WireGuard key rotation ([`key_phase`]): a site with a next key is in the *announce* phase
//! (its peers list the next key beside the current one, as [`Peer::next_public_key`]) until
//! every peer it has now applied an intent at or above the announcing revision, or the
//! announcement is older than the commit timeout; then it is in the *commit* phase (its own
//! intent names the next key, and its peers list only the next key, carrying the allowed IPs).

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
    /// The WireGuard key the site's edge made for its next rotation, while one is under way.
    pub next_public_key: Option<WgPublicKey>,
    /// The lowest revision among the peers' intents that first carried the next key (none
    /// until that publish is recorded).
    pub next_announce_revision: Option<u64>,
    /// When that announcement was recorded.
    pub next_announced_at_unix_ms: Option<u64>,
    /// The highest intent revision the site's edge reported applied.
    pub applied_revision: Option<u64>,
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
    /// A key rotation commits this long after its announcement even if some peer has not
    /// reported applying it (offline peers get the committed intent when they return).
    pub rotation_commit_timeout_ms: u64,
}

/// Where a site's WireGuard key rotation stands in one compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPhase {
    /// Peers list the next key beside the current one; the site keeps its current key.
    Announce { next: WgPublicKey },
    /// The site's intent names the next key; peers list only it.
    Commit { next: WgPublicKey },
}

/// A rotation in a compiled tenant, for the publisher to record once the intents are out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRotation {
    pub site: SiteId,
    pub phase: KeyPhase,
    /// The site's peers in this topology (whose published revisions set the announcing
    /// revision).
    pub peers: Vec<SiteId>,
    /// The announcing revision already recorded, if any.
    pub announce_revision: Option<u64>,
    /// While announcing: when the commit timeout makes it commit whatever the peers say.
    pub commit_due_unix_ms: Option<u64>,
}

/// The result of compiling one tenant.
#[derive(Clone, Debug)]
pub struct CompiledTenant {
    pub topology: Topology,
    pub intents: Vec<SiteIntent>,
    /// Paths the intents use that have no id yet (the caller creates them and compiles again),
    /// as (src site, src uplink, dst site, dst uplink).
    pub missing_paths: Vec<(SiteId, u8, SiteId, u8)>,
    /// Every site with a key rotation under way, and its phase in these intents.
    pub rotations: Vec<KeyRotation>,
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

/// The phase of `site`'s key rotation (none without a next key), given its current `peers`.
/// Commit once every peer reported applying a revision at or above the announcing one (a site
/// without peers commits at once: nobody needs the announcement), or once the announcement is
/// older than the tenant's commit timeout at `now_unix_ms`. Before the announcement is
/// recorded, the phase is announce.
pub fn key_phase(
    site: &SiteSnapshot,
    peers: &[&SiteSnapshot],
    commit_timeout_ms: u64,
    now_unix_ms: u64,
) -> Option<KeyPhase> {
    let next = site.next_public_key?;
    if site.public_key == Some(next) {
        return None;
    }
    let commit = peers.is_empty()
        || site.next_announce_revision.is_some_and(|announced| {
            peers.iter().all(|p| {
                p.applied_revision
                    .is_some_and(|applied| applied >= announced)
            })
        })
        || site
            .next_announced_at_unix_ms
            .is_some_and(|at| now_unix_ms >= at.saturating_add(commit_timeout_ms));
    Some(if commit {
        KeyPhase::Commit { next }
    } else {
        KeyPhase::Announce { next }
    })
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

    // Key rotations first: a site's phase decides its own key and what its peers see.
    let mut rotations = Vec::new();
    let mut phases: BTreeMap<SiteId, KeyPhase> = BTreeMap::new();
    for site in sites.values() {
        let peer_ids: Vec<SiteId> = topology.peers_of(site.id).collect();
        let peers: Vec<&SiteSnapshot> = peer_ids
            .iter()
            .filter_map(|id| sites.get(id).copied())
            .collect();
        if let Some(phase) = key_phase(
            site,
            &peers,
            snapshot.rotation_commit_timeout_ms,
            now_unix_ms,
        ) {
            phases.insert(site.id, phase);
            rotations.push(KeyRotation {
                site: site.id,
                phase,
                peers: peer_ids,
                announce_revision: site.next_announce_revision,
                commit_due_unix_ms: match phase {
                    KeyPhase::Announce { .. } => site
                        .next_announced_at_unix_ms
                        .map(|at| at.saturating_add(snapshot.rotation_commit_timeout_ms)),
                    KeyPhase::Commit { .. } => None,
                },
            });
        }
    }
    // (current key, next key) as the site itself and its peers are to use them now.
    let keys_of = |site: &SiteSnapshot| -> Option<(WgPublicKey, Option<WgPublicKey>)> {
        let current = site.public_key?;
        Some(match phases.get(&site.id) {
            None => (current, None),
            Some(KeyPhase::Announce { next }) => (current, Some(*next)),
            Some(KeyPhase::Commit { next }) => (*next, None),
        })
    };

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
            let (Some((public_key, next_public_key)), Some(overlay_address)) =
                (keys_of(peer), peer.overlay_address)
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
                next_public_key,
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
        // The site's own key: the next one once its rotation commits.
        let (Some((public_key, _)), Some(address)) = (keys_of(site), site.overlay_address) else {
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
        rotations,
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
            next_public_key: None,
            next_announce_revision: None,
            next_announced_at_unix_ms: None,
            applied_revision: None,
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
            rotation_commit_timeout_ms: 3_600_000,
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

    fn by_number(compiled: &CompiledTenant) -> BTreeMap<u8, &SiteIntent> {
        compiled
            .intents
            .iter()
            .map(|i| (i.site.0.as_u128() as u8, i))
            .collect()
    }

    fn sid(n: u8) -> SiteId {
        SiteId(Uuid::from_u128(u128::from(n)))
    }

    const NEXT: WgPublicKey = WgPublicKey([0xee; 32]);

    /// Three sites in a full mesh; site 1 rotates to `NEXT`.
    fn rotating(announce: Option<u64>, applied: [Option<u64>; 3]) -> TenantSnapshot {
        let mut sites: Vec<SiteSnapshot> = (1..=3).map(|n| site(n, false, true)).collect();
        sites[0].next_public_key = Some(NEXT);
        sites[0].next_announce_revision = announce;
        sites[0].next_announced_at_unix_ms = announce.map(|_| 1_000);
        for (s, a) in sites.iter_mut().zip(applied) {
            s.applied_revision = a;
        }
        snapshot(sites, TopologyMode::FullMesh)
    }

    #[test]
    fn an_announced_key_is_a_second_key_of_the_peer_and_the_site_keeps_its_own() {
        let compiled = compile_with_paths(rotating(None, [None; 3]));
        assert_eq!(
            compiled.rotations,
            vec![KeyRotation {
                site: sid(1),
                phase: KeyPhase::Announce { next: NEXT },
                peers: vec![sid(2), sid(3)],
                announce_revision: None,
                commit_due_unix_ms: None,
            }]
        );
        let by = by_number(&compiled);
        assert_eq!(by[&1].wireguard.public_key, WgPublicKey([1; 32]));
        assert!(by[&1].peers.iter().all(|p| p.next_public_key.is_none()));
        for n in [2, 3] {
            let peer = by[&n].peer(sid(1)).unwrap();
            assert_eq!(peer.public_key, WgPublicKey([1; 32]));
            assert_eq!(peer.next_public_key, Some(NEXT));
            // Other peers are not rotating.
            assert!(by[&n]
                .peers
                .iter()
                .filter(|p| p.site != sid(1))
                .all(|p| p.next_public_key.is_none()));
        }
        for intent in by.values() {
            intent.validate().unwrap();
        }
        // The rotating site's own intent does not change while it announces; its peers' do.
        let before = compile_with_paths(without_rotation(rotating(None, [None; 3])));
        let before = by_number(&before);
        assert_eq!(by[&1].content_digest(), before[&1].content_digest());
        assert_ne!(by[&2].content_digest(), before[&2].content_digest());
        // Recording the announcement changes nothing until the peers catch up.
        let recorded = compile_with_paths(rotating(Some(10), [Some(10), Some(10), Some(9)]));
        assert_eq!(
            recorded.rotations[0].phase,
            KeyPhase::Announce { next: NEXT }
        );
        assert_eq!(
            by_number(&recorded)[&2].content_digest(),
            by[&2].content_digest()
        );
    }

    fn without_rotation(mut snap: TenantSnapshot) -> TenantSnapshot {
        for s in &mut snap.sites {
            s.next_public_key = None;
            s.next_announce_revision = None;
            s.next_announced_at_unix_ms = None;
        }
        snap
    }

    #[test]
    fn the_key_commits_once_every_peer_applied_the_announcement() {
        // Site 1's own applied revision does not matter; peers 2 and 3 are at or above 10.
        let compiled = compile_with_paths(rotating(Some(10), [None, Some(10), Some(12)]));
        assert_eq!(compiled.rotations[0].phase, KeyPhase::Commit { next: NEXT });
        let by = by_number(&compiled);
        assert_eq!(by[&1].wireguard.public_key, NEXT);
        for n in [2, 3] {
            let peer = by[&n].peer(sid(1)).unwrap();
            assert_eq!(peer.public_key, NEXT);
            assert_eq!(peer.next_public_key, None);
        }
        for intent in by.values() {
            intent.validate().unwrap();
        }
        // Once recorded (current = next, no next key), the same intents compile again, so
        // the publisher has nothing more to publish.
        let mut done = without_rotation(rotating(None, [None, Some(10), Some(12)]));
        done.sites[0].public_key = Some(NEXT);
        let after = compile_with_paths(done);
        assert!(after.rotations.is_empty());
        let digests = |c: &CompiledTenant| {
            c.intents
                .iter()
                .map(SiteIntent::content_digest)
                .collect::<Vec<_>>()
        };
        assert_eq!(digests(&after), digests(&compiled));
    }

    #[test]
    fn a_peer_behind_holds_the_commit_until_the_timeout() {
        let behind = rotating(Some(10), [None, Some(10), Some(9)]);
        // Announced at 1 s; the timeout is an hour.
        let early = compile(&behind, b"secret", 1_000 + 3_599_999).unwrap();
        assert_eq!(early.rotations[0].phase, KeyPhase::Announce { next: NEXT });
        assert_eq!(
            early.rotations[0].commit_due_unix_ms,
            Some(1_000 + 3_600_000)
        );
        let late = compile(&behind, b"secret", 1_000 + 3_600_000).unwrap();
        assert_eq!(late.rotations[0].commit_due_unix_ms, None);
        assert_eq!(late.rotations[0].phase, KeyPhase::Commit { next: NEXT });
        // A peer that never reported anything holds it the same way.
        let silent = rotating(Some(10), [None, Some(11), None]);
        let compiled = compile(&silent, b"secret", 2_000).unwrap();
        assert_eq!(
            compiled.rotations[0].phase,
            KeyPhase::Announce { next: NEXT }
        );
    }

    #[test]
    fn a_site_without_peers_commits_at_once() {
        let mut alone = site(1, false, true);
        alone.next_public_key = Some(NEXT);
        let compiled = compile_with_paths(snapshot(vec![alone], TopologyMode::FullMesh));
        assert_eq!(compiled.rotations[0].phase, KeyPhase::Commit { next: NEXT });
        assert_eq!(compiled.intents[0].wireguard.public_key, NEXT);
        // A next key equal to the current one (never stored: the database refuses it) is no
        // rotation.
        let mut same = site(1, false, true);
        same.next_public_key = same.public_key;
        assert_eq!(key_phase(&same, &[], 0, 0), None);
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
            // Per site: rotating, its announcing revision, its applied revision.
            proptest::collection::vec(
                (
                    any::<bool>(),
                    proptest::option::of(1u64..20),
                    proptest::option::of(1u64..20),
                ),
                24,
            ),
        )
            .prop_map(|(n, mode, hubs, region_mesh, enrolled, rotation)| {
                let sites: Vec<SiteSnapshot> = (1..=n)
                    .map(|i| {
                        let mut s = site(
                            i,
                            usize::from(i) <= hubs,
                            enrolled[usize::from(i) - 1] || usize::from(i) <= hubs,
                        );
                        s.region =
                            Some(["us-east", "us-west", "eu-west"][usize::from(i) % 3].into());
                        let (rotating, announced, applied) = rotation[usize::from(i) - 1];
                        if rotating && s.public_key.is_some() {
                            s.next_public_key = Some(WgPublicKey([100 + i; 32]));
                            s.next_announce_revision = announced;
                        }
                        s.applied_revision = applied;
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
            // Every peer sees a rotating site as that site sees itself: the committed key, or
            // the current key plus the announced one.
            for rotation in &compiled.rotations {
                let own = by_site[&rotation.site].wireguard.public_key;
                for peer in &rotation.peers {
                    let seen = by_site[peer].peer(rotation.site).unwrap();
                    prop_assert_eq!(seen.public_key, own);
                    match rotation.phase {
                        KeyPhase::Announce { next } => prop_assert_eq!(seen.next_public_key, Some(next)),
                        KeyPhase::Commit { next } => {
                            prop_assert_eq!(own, next);
                            prop_assert_eq!(seen.next_public_key, None);
                        }
                    }
                }
            }
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
