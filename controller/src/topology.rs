//! The topology engine: which sites peer with which, over which uplink pairs, and how a site
//! reaches one it does not peer with. Pure functions over plain data (no I/O, no clock), so
//! the same input always gives the same output, whatever order the sites come in.
//!
//! Modes (seed: "Mesh Topology"):
//! - `full_mesh`: every site peers with every other.
//! - `hub_and_spoke`: the hubs peer with each other; every other site (a spoke) peers with up
//!   to [`TopologySettings::hubs_per_spoke`] hubs, the least loaded first, so losing one hub
//!   leaves every spoke a second one.
//! - `hierarchical`: hub-and-spoke where spokes attach to the hubs of their own region first
//!   (regional hubs, full mesh between hubs).
//! - `hybrid`: `full_mesh_sites` and `hub_sites` form one full-mesh core; the rest are spokes of
//!   the hubs (or, with no hubs, of the core), attached nearest-first when `nearest_hub` is set.
//!
//! In every mode `same_region_mesh` also peers spokes of one region with each other, and
//! `max_peers` caps every site's peer count except hubs' (unless `hubs_exempt_from_max_peers`
//! is off). A site reaches a site it does not peer with through hubs: spoke → hub → (hub →)
//! destination, at most three hops; [`Topology::next_hops`] gives the ordered choices.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use patronus_proto::SiteId;
use serde::{Deserialize, Serialize};

/// How the tenant's sites are meshed.
#[derive(utoipa::ToSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyMode {
    #[default]
    FullMesh,
    HubAndSpoke,
    Hierarchical,
    Hybrid,
}

/// A tenant's topology settings (stored in `tenants.topology`).
#[derive(utoipa::ToSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologySettings {
    pub mode: TopologyMode,
    /// Critical sites meshed with each other (hybrid).
    #[schema(value_type = Vec<String>)]
    pub full_mesh_sites: Vec<SiteId>,
    /// Hubs (hub-and-spoke, hierarchical, hybrid).
    #[schema(value_type = Vec<String>)]
    pub hub_sites: Vec<SiteId>,
    /// Spokes attach to hubs of their own region first.
    pub nearest_hub: bool,
    /// Spokes of one region also peer with each other (within `max_peers`).
    pub same_region_mesh: bool,
    /// Most peers a site may have.
    pub max_peers: usize,
    /// Hubs may exceed `max_peers` (they carry the spokes).
    pub hubs_exempt_from_max_peers: bool,
    /// Hubs each spoke attaches to, for redundancy.
    pub hubs_per_spoke: usize,
}

impl Default for TopologySettings {
    fn default() -> Self {
        Self {
            mode: TopologyMode::FullMesh,
            full_mesh_sites: Vec::new(),
            hub_sites: Vec::new(),
            nearest_hub: true,
            same_region_mesh: false,
            max_peers: 64,
            hubs_exempt_from_max_peers: true,
            hubs_per_spoke: 2,
        }
    }
}

/// One site as the topology engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologySite {
    pub id: SiteId,
    /// Free-form region label such as `us-east`; `None` is a region of its own.
    pub region: Option<String>,
    /// Indexes of the site's uplinks.
    pub uplinks: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("max_peers must be at least 1")]
    ZeroMaxPeers,
    #[error("hubs_per_spoke must be at least 1")]
    ZeroHubsPerSpoke,
    #[error("{list} names site {site}, which is not a site of this tenant")]
    UnknownSite { list: &'static str, site: SiteId },
    #[error("{mode} needs at least one hub in hub_sites")]
    NoHubs { mode: &'static str },
    #[error("spoke {spoke} finds {found} of the {needed} hubs it needs with room under max_peers {max_peers}; add hubs, raise max_peers or exempt hubs from it")]
    HubsFull {
        spoke: SiteId,
        found: usize,
        needed: usize,
        max_peers: usize,
    },
    #[error("a full mesh of {members} sites gives each {needed} peers, above max_peers {max_peers}; raise max_peers or use hub_and_spoke or hybrid")]
    MeshExceedsMaxPeers {
        members: usize,
        needed: usize,
        max_peers: usize,
    },
}

/// FxHash: site ids are random UUIDs, so a fast non-cryptographic hash spreads them well, and
/// route lookups (one per site pair when compiling intents) dominate compile time.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

/// How a pair that does not peer directly is connected (see [`Topology::route`]).
enum Via {
    Direct,
    One(SiteId),
    Two(SiteId, SiteId),
}

/// The computed topology.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    /// Peered pairs, keyed `(a, b)` with `a < b`, each with its paths as
    /// `(a's uplink, b's uplink)`.
    pub peerings: BTreeMap<(SiteId, SiteId), Vec<(u8, u8)>>,
    /// Sites that carry transit for others.
    pub hubs: BTreeSet<SiteId>,
    /// Each spoke's hubs, preferred first.
    pub spoke_hubs: BTreeMap<SiteId, Vec<SiteId>>,
    adjacency: BTreeMap<SiteId, BTreeSet<SiteId>>,
    /// Fast lookups, derived from the fields above.
    peer_pairs: FastSet<(SiteId, SiteId)>,
    primary: FastMap<SiteId, SiteId>,
}

impl PartialEq for Topology {
    fn eq(&self, other: &Self) -> bool {
        self.peerings == other.peerings
            && self.hubs == other.hubs
            && self.spoke_hubs == other.spoke_hubs
    }
}

impl Eq for Topology {}

fn ordered(a: SiteId, b: SiteId) -> (SiteId, SiteId) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

impl Topology {
    pub fn is_peered(&self, a: SiteId, b: SiteId) -> bool {
        self.peer_pairs.contains(&ordered(a, b))
    }

    /// Sites `site` peers with, in id order.
    pub fn peers_of(&self, site: SiteId) -> impl Iterator<Item = SiteId> + '_ {
        self.adjacency.get(&site).into_iter().flatten().copied()
    }

    pub fn peer_count(&self, site: SiteId) -> usize {
        self.adjacency.get(&site).map_or(0, BTreeSet::len)
    }

    /// Paths between a peered pair as `(uplink of a, uplink of b)`.
    pub fn paths(&self, a: SiteId, b: SiteId) -> Vec<(u8, u8)> {
        let key = ordered(a, b);
        match self.peerings.get(&key) {
            Some(paths) if key.0 == a => paths.clone(),
            Some(paths) => paths.iter().map(|&(x, y)| (y, x)).collect(),
            None => Vec::new(),
        }
    }

    /// The one path traffic between `a` and `b` takes, both ways: `[a, ..., b]`, or `None` if
    /// they cannot reach each other.
    ///
    /// WireGuard routes by source too (a peer only accepts packets from its allowed IPs), so
    /// transit must be symmetric and consistent: `route(b, a)` is `route(a, b)` reversed, and
    /// every hop on the way computes the rest of the same path (`route(path[1], b) ==
    /// path[1..]`). The rule, for a pair that does not peer directly (`a < b` by id):
    /// 1. through `a`'s primary hub if `a` is a spoke and that hub peers `b`;
    /// 2. else through `b`'s primary hub if `b` is a spoke and that hub peers `a`;
    /// 3. else through the lowest-id hub peering both;
    /// 4. else (two spokes with no hub in common) `a` → primary(a) → primary(b) → `b`.
    pub fn route(&self, a: SiteId, b: SiteId) -> Option<Vec<SiteId>> {
        if a == b {
            return Some(vec![a]);
        }
        let (low, high) = ordered(a, b);
        let mut path = match self.via(low, high)? {
            Via::Direct => vec![low, high],
            Via::One(hub) => vec![low, hub, high],
            Via::Two(hl, hh) => vec![low, hl, hh, high],
        };
        if a != low {
            path.reverse();
        }
        Some(path)
    }

    /// The rule of [`Topology::route`] for `low < high`.
    fn via(&self, low: SiteId, high: SiteId) -> Option<Via> {
        if self.is_peered(low, high) {
            return Some(Via::Direct);
        }
        let primary = |s: SiteId| self.primary.get(&s).copied();
        if let Some(hub) = primary(low).filter(|h| self.is_peered(*h, high)) {
            return Some(Via::One(hub));
        }
        if let Some(hub) = primary(high).filter(|h| self.is_peered(*h, low)) {
            return Some(Via::One(hub));
        }
        if let Some(hub) = self
            .hubs
            .iter()
            .copied()
            .find(|h| self.is_peered(*h, low) && self.is_peered(*h, high))
        {
            return Some(Via::One(hub));
        }
        match (primary(low), primary(high)) {
            (Some(hl), Some(hh)) if self.is_peered(hl, hh) => Some(Via::Two(hl, hh)),
            _ => None,
        }
    }

    /// The peer `src` hands traffic for `dst` to (the second site of [`Topology::route`]).
    pub fn next_hop(&self, src: SiteId, dst: SiteId) -> Option<SiteId> {
        if src == dst {
            return None;
        }
        let (low, high) = ordered(src, dst);
        Some(match self.via(low, high)? {
            Via::Direct => dst,
            Via::One(hub) => hub,
            Via::Two(hl, hh) => {
                if src == low {
                    hl
                } else {
                    hh
                }
            }
        })
    }

    /// The peers `src` can hand traffic for `dst` to, preferred first; empty if none.
    pub fn next_hops(&self, src: SiteId, dst: SiteId) -> Vec<SiteId> {
        if src == dst {
            return Vec::new();
        }
        if self.is_peered(src, dst) {
            return vec![dst];
        }
        let reaches = |hub: SiteId| {
            self.is_peered(hub, dst)
                || self
                    .spoke_hubs
                    .get(&dst)
                    .is_some_and(|hubs| hubs.iter().any(|h| *h == hub || self.is_peered(hub, *h)))
        };
        if let Some(hubs) = self.spoke_hubs.get(&src) {
            return hubs.iter().copied().filter(|h| reaches(*h)).collect();
        }
        // A hub or core site: through the destination's hubs it peers with.
        self.spoke_hubs
            .get(&dst)
            .map(|hubs| {
                hubs.iter()
                    .copied()
                    .filter(|h| self.is_peered(src, *h))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn peer(&mut self, a: &TopologySite, b: &TopologySite) {
        if a.id == b.id || self.is_peered(a.id, b.id) {
            return;
        }
        let (first, second) = if a.id < b.id { (a, b) } else { (b, a) };
        let paths = first
            .uplinks
            .iter()
            .flat_map(|&x| second.uplinks.iter().map(move |&y| (x, y)))
            .collect();
        self.peerings.insert((first.id, second.id), paths);
        self.peer_pairs.insert((first.id, second.id));
        self.adjacency.entry(a.id).or_default().insert(b.id);
        self.adjacency.entry(b.id).or_default().insert(a.id);
    }
}

/// A stable pseudo-random rank of a pair, to spread ties deterministically.
fn pair_rank(a: SiteId, b: SiteId) -> u64 {
    // FNV-1a over both ids: stable across runs and platforms, unlike std's RandomState.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.0.as_bytes().iter().chain(b.0.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// 0: same region; 1: same region family (`us-east` / `us-west`); 2: anything else.
fn region_distance(a: Option<&str>, b: Option<&str>) -> u8 {
    match (a, b) {
        (Some(a), Some(b)) if a == b => 0,
        (Some(a), Some(b)) if a.split('-').next() == b.split('-').next() => 1,
        _ => 2,
    }
}

/// Compute the topology of one tenant.
pub fn compute(
    sites: &[TopologySite],
    settings: &TopologySettings,
) -> Result<Topology, TopologyError> {
    if settings.max_peers == 0 {
        return Err(TopologyError::ZeroMaxPeers);
    }
    if settings.hubs_per_spoke == 0 {
        return Err(TopologyError::ZeroHubsPerSpoke);
    }
    let mut sorted: Vec<&TopologySite> = sites.iter().collect();
    sorted.sort_by_key(|s| s.id);
    sorted.dedup_by_key(|s| s.id);
    let by_id: BTreeMap<SiteId, &TopologySite> = sorted.iter().map(|s| (s.id, *s)).collect();
    let known = |list: &'static str, ids: &[SiteId]| -> Result<BTreeSet<SiteId>, TopologyError> {
        ids.iter()
            .map(|id| {
                by_id
                    .contains_key(id)
                    .then_some(*id)
                    .ok_or(TopologyError::UnknownSite { list, site: *id })
            })
            .collect()
    };
    let full_mesh_sites = known("full_mesh_sites", &settings.full_mesh_sites)?;
    let hub_sites = known("hub_sites", &settings.hub_sites)?;

    let mut topology = Topology::default();
    let (core, hubs, nearest): (BTreeSet<SiteId>, BTreeSet<SiteId>, bool) = match settings.mode {
        TopologyMode::FullMesh => (by_id.keys().copied().collect(), BTreeSet::new(), false),
        TopologyMode::HubAndSpoke | TopologyMode::Hierarchical => {
            if hub_sites.is_empty() && sorted.len() > 1 {
                return Err(TopologyError::NoHubs {
                    mode: if settings.mode == TopologyMode::HubAndSpoke {
                        "hub_and_spoke"
                    } else {
                        "hierarchical"
                    },
                });
            }
            let nearest = settings.mode == TopologyMode::Hierarchical || settings.nearest_hub;
            (hub_sites.clone(), hub_sites, nearest)
        }
        TopologyMode::Hybrid => {
            let hubs = if hub_sites.is_empty() {
                full_mesh_sites.clone()
            } else {
                hub_sites
            };
            if hubs.is_empty() && sorted.len() > 1 {
                return Err(TopologyError::NoHubs { mode: "hybrid" });
            }
            (
                full_mesh_sites.union(&hubs).copied().collect(),
                hubs,
                settings.nearest_hub,
            )
        }
    };

    // The core is one full mesh; its non-hub members must fit within max_peers.
    let core_needed = core.len().saturating_sub(1);
    let core_bound = core
        .iter()
        .any(|id| !(hubs.contains(id) && settings.hubs_exempt_from_max_peers));
    if core_bound && core_needed > settings.max_peers {
        return Err(TopologyError::MeshExceedsMaxPeers {
            members: core.len(),
            needed: core_needed,
            max_peers: settings.max_peers,
        });
    }
    let core_sites: Vec<&TopologySite> = core.iter().map(|id| by_id[id]).collect();
    for (i, a) in core_sites.iter().enumerate() {
        for b in &core_sites[i + 1..] {
            topology.peer(a, b);
        }
    }
    topology.hubs = hubs.clone();

    // Spokes attach to hubs: nearest region first (when asked), then the least loaded, then a
    // stable per-pair rank so equal hubs share spokes evenly.
    let spokes: Vec<&TopologySite> = sorted
        .iter()
        .copied()
        .filter(|s| !core.contains(&s.id))
        .collect();
    let hub_list: Vec<&TopologySite> = hubs.iter().map(|id| by_id[id]).collect();
    let per_spoke = settings
        .hubs_per_spoke
        .min(settings.max_peers)
        .min(hub_list.len());
    let mut load: BTreeMap<SiteId, usize> = hubs.iter().map(|h| (*h, 0)).collect();
    for spoke in &spokes {
        let mut ranked: Vec<(u8, usize, u64, &TopologySite)> = hub_list
            .iter()
            .filter(|hub| {
                settings.hubs_exempt_from_max_peers
                    || topology.peer_count(hub.id) < settings.max_peers
            })
            .map(|hub| {
                let distance = if nearest {
                    region_distance(spoke.region.as_deref(), hub.region.as_deref())
                } else {
                    0
                };
                (distance, load[&hub.id], pair_rank(spoke.id, hub.id), *hub)
            })
            .collect();
        ranked.sort_by_key(|&(distance, load, rank, hub)| (distance, load, rank, hub.id));
        let chosen: Vec<SiteId> = ranked.iter().take(per_spoke).map(|r| r.3.id).collect();
        // Redundancy is part of the contract: a spoke gets all the hubs it should, or the
        // configuration is refused, never silently a single point of failure.
        if chosen.len() < per_spoke {
            return Err(TopologyError::HubsFull {
                spoke: spoke.id,
                found: chosen.len(),
                needed: per_spoke,
                max_peers: settings.max_peers,
            });
        }
        for hub_id in &chosen {
            topology.peer(spoke, by_id[hub_id]);
            if let Some(count) = load.get_mut(hub_id) {
                *count += 1;
            }
        }
        if let Some(first) = chosen.first() {
            topology.primary.insert(spoke.id, *first);
        }
        topology.spoke_hubs.insert(spoke.id, chosen);
    }

    // Spokes of one region peer directly, while both stay within max_peers.
    if settings.same_region_mesh {
        let mut regions: BTreeMap<&str, Vec<&TopologySite>> = BTreeMap::new();
        for spoke in &spokes {
            if let Some(region) = spoke.region.as_deref() {
                regions.entry(region).or_default().push(spoke);
            }
        }
        for members in regions.values() {
            let mut pairs: Vec<(u64, &TopologySite, &TopologySite)> = Vec::new();
            for (i, a) in members.iter().enumerate() {
                for b in &members[i + 1..] {
                    pairs.push((pair_rank(a.id, b.id), a, b));
                }
            }
            pairs.sort_by_key(|&(rank, a, b)| (rank, a.id, b.id));
            for (_, a, b) in pairs {
                if topology.peer_count(a.id) < settings.max_peers
                    && topology.peer_count(b.id) < settings.max_peers
                {
                    topology.peer(a, b);
                }
            }
        }
    }
    Ok(topology)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn site(n: u128, region: Option<&str>, uplinks: u8) -> TopologySite {
        TopologySite {
            id: SiteId(Uuid::from_u128(n)),
            region: region.map(str::to_owned),
            uplinks: (0..uplinks).collect(),
        }
    }

    fn id(n: u128) -> SiteId {
        SiteId(Uuid::from_u128(n))
    }

    /// Follow preferred next hops from `src`; `Some(hops)` if `dst` is reached, avoiding `down`.
    fn route(t: &Topology, src: SiteId, dst: SiteId, down: Option<SiteId>) -> Option<usize> {
        let mut at = src;
        for hops in 1..=4 {
            let next = t
                .next_hops(at, dst)
                .into_iter()
                .find(|h| Some(*h) != down)?;
            if !t.is_peered(at, next) {
                return None;
            }
            if next == dst {
                return Some(hops);
            }
            at = next;
        }
        None
    }

    #[test]
    fn full_mesh_peers_everyone_over_every_uplink_pair() {
        let sites: Vec<_> = (1..=4).map(|n| site(n, None, 2)).collect();
        let t = compute(&sites, &TopologySettings::default()).unwrap();
        assert_eq!(t.peerings.len(), 6);
        assert!(t.peerings.values().all(|paths| paths.len() == 4));
        assert_eq!(t.paths(id(2), id(1)), vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
    }

    #[test]
    fn hub_and_spoke_gives_each_spoke_two_hubs_and_balances_them() {
        let mut sites: Vec<_> = (1..=20).map(|n| site(n, None, 1)).collect();
        sites.push(site(100, None, 1));
        sites.push(site(101, None, 1));
        let settings = TopologySettings {
            mode: TopologyMode::HubAndSpoke,
            hub_sites: vec![id(100), id(101)],
            ..Default::default()
        };
        let t = compute(&sites, &settings).unwrap();
        assert!(t.is_peered(id(100), id(101)));
        for n in 1..=20 {
            assert_eq!(t.peer_count(id(n)), 2);
            assert_eq!(route(&t, id(n), id((n % 20) + 1), None), Some(2));
        }
        let three_hubs: Vec<_> = (1..=30)
            .map(|n| site(n, None, 1))
            .chain((100..103).map(|n| site(n, None, 1)))
            .collect();
        let settings = TopologySettings {
            mode: TopologyMode::HubAndSpoke,
            hub_sites: vec![id(100), id(101), id(102)],
            ..Default::default()
        };
        let t = compute(&three_hubs, &settings).unwrap();
        let loads: Vec<usize> = (100..103).map(|h| t.peer_count(id(h)) - 2).collect();
        assert_eq!(loads.iter().sum::<usize>(), 60);
        assert!(loads.iter().all(|l| *l == 20), "unbalanced: {loads:?}");
    }

    #[test]
    fn hierarchical_prefers_the_spokes_own_region() {
        let sites = vec![
            site(1, Some("eu-west"), 1),
            site(2, Some("us-east"), 1),
            site(10, Some("eu-west"), 1),
            site(11, Some("eu-central"), 1),
            site(12, Some("us-east"), 1),
            site(13, Some("us-west"), 1),
        ];
        let settings = TopologySettings {
            mode: TopologyMode::Hierarchical,
            hub_sites: vec![id(10), id(11), id(12), id(13)],
            ..Default::default()
        };
        let t = compute(&sites, &settings).unwrap();
        assert_eq!(t.spoke_hubs[&id(1)], vec![id(10), id(11)]);
        assert_eq!(t.spoke_hubs[&id(2)], vec![id(12), id(13)]);
        assert_eq!(route(&t, id(1), id(2), None), Some(3));
    }

    #[test]
    fn hybrid_meshes_the_core_and_hangs_branches_off_hubs() {
        let sites = vec![
            site(1, Some("us"), 2),
            site(2, Some("us"), 2),
            site(3, Some("us"), 1),
            site(4, Some("us"), 1),
            site(5, Some("eu"), 1),
        ];
        let settings = TopologySettings {
            mode: TopologyMode::Hybrid,
            full_mesh_sites: vec![id(1), id(2)],
            same_region_mesh: true,
            max_peers: 3,
            ..Default::default()
        };
        let t = compute(&sites, &settings).unwrap();
        assert!(t.is_peered(id(1), id(2)));
        assert!(t.is_peered(id(3), id(4)), "same-region spokes peer");
        assert!(!t.is_peered(id(3), id(5)));
        let mut via: Vec<SiteId> = t.next_hops(id(5), id(3));
        via.sort();
        assert_eq!(
            via,
            vec![id(1), id(2)],
            "the eu branch reaches a us branch through either core hub"
        );
    }

    #[test]
    fn configuration_errors_are_named() {
        let sites: Vec<_> = (1..=5).map(|n| site(n, None, 1)).collect();
        let small = TopologySettings {
            max_peers: 3,
            ..Default::default()
        };
        assert!(matches!(
            compute(&sites, &small),
            Err(TopologyError::MeshExceedsMaxPeers { .. })
        ));
        let no_hubs = TopologySettings {
            mode: TopologyMode::HubAndSpoke,
            ..Default::default()
        };
        assert!(matches!(
            compute(&sites, &no_hubs),
            Err(TopologyError::NoHubs { .. })
        ));
        let unknown = TopologySettings {
            mode: TopologyMode::HubAndSpoke,
            hub_sites: vec![id(99)],
            ..Default::default()
        };
        assert!(matches!(
            compute(&sites, &unknown),
            Err(TopologyError::UnknownSite { .. })
        ));
        let zero = TopologySettings {
            max_peers: 0,
            ..Default::default()
        };
        assert_eq!(compute(&sites, &zero), Err(TopologyError::ZeroMaxPeers));
    }

    fn arb_case() -> impl Strategy<Value = (Vec<TopologySite>, TopologySettings)> {
        let regions = prop::sample::select(vec![
            None,
            Some("us-east"),
            Some("us-west"),
            Some("eu-west"),
            Some("ap"),
        ]);
        (
            prop::collection::vec((regions, 1u8..=3), 1..40),
            0usize..4,
            0usize..3,
            prop::sample::select(vec![
                TopologyMode::FullMesh,
                TopologyMode::HubAndSpoke,
                TopologyMode::Hierarchical,
                TopologyMode::Hybrid,
            ]),
            any::<bool>(),
            any::<bool>(),
            2usize..50,
            1usize..4,
            any::<bool>(),
        )
            .prop_map(
                |(specs, hubs, core, mode, nearest, region_mesh, max_peers, per_spoke, exempt)| {
                    let sites: Vec<TopologySite> = specs
                        .iter()
                        .enumerate()
                        .map(|(i, (region, uplinks))| site(i as u128 + 1, *region, *uplinks))
                        .collect();
                    let n = sites.len();
                    let hub_sites: Vec<SiteId> = (0..hubs.min(n)).map(|i| sites[i].id).collect();
                    let full_mesh_sites: Vec<SiteId> =
                        (0..core.min(n)).map(|i| sites[n - 1 - i].id).collect();
                    let settings = TopologySettings {
                        mode,
                        full_mesh_sites,
                        hub_sites,
                        nearest_hub: nearest,
                        same_region_mesh: region_mesh,
                        max_peers,
                        hubs_exempt_from_max_peers: exempt,
                        hubs_per_spoke: per_spoke,
                    };
                    (sites, settings)
                },
            )
    }

    proptest! {
        #[test]
        fn every_site_reaches_every_other_within_three_hops((sites, settings) in arb_case()) {
            if let Ok(t) = compute(&sites, &settings) {
                for a in &sites {
                    for b in &sites {
                        if a.id != b.id {
                            let hops = route(&t, a.id, b.id, None);
                            prop_assert!(hops.is_some_and(|h| h <= 3), "{:?} -> {:?}: {:?}", a.id, b.id, hops);
                        }
                    }
                }
            }
        }

        #[test]
        fn routes_are_symmetric_consistent_and_use_only_peerings((sites, settings) in arb_case()) {
            if let Ok(t) = compute(&sites, &settings) {
                for a in &sites {
                    for b in &sites {
                        if a.id == b.id {
                            continue;
                        }
                        let path = t.route(a.id, b.id);
                        prop_assert!(path.is_some(), "{:?} -> {:?} has no route", a.id, b.id);
                        let path = path.unwrap_or_default();
                        prop_assert!(path.len() <= 4, "route longer than three hops: {:?}", path);
                        prop_assert!(path.windows(2).all(|w| t.is_peered(w[0], w[1])), "route uses a missing peering: {:?}", path);
                        let mut back = t.route(b.id, a.id).unwrap_or_default();
                        back.reverse();
                        prop_assert_eq!(&back, &path, "route is not symmetric");
                        // Every hop continues the same path (WireGuard allowed-IPs agree).
                        for i in 1..path.len() - 1 {
                            prop_assert_eq!(t.route(path[i], b.id).unwrap_or_default(), path[i..].to_vec());
                        }
                    }
                }
            }
        }

        #[test]
        fn no_site_but_a_hub_exceeds_max_peers((sites, settings) in arb_case()) {
            if let Ok(t) = compute(&sites, &settings) {
                for s in &sites {
                    if !(t.hubs.contains(&s.id) && settings.hubs_exempt_from_max_peers) {
                        prop_assert!(t.peer_count(s.id) <= settings.max_peers);
                    }
                }
            }
        }

        #[test]
        fn the_result_does_not_depend_on_input_order((sites, settings) in arb_case(), seed in any::<u64>()) {
            let mut shuffled = sites.clone();
            // A deterministic shuffle from the seed.
            let len = shuffled.len();
            for i in (1..len).rev() {
                let j = (seed.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(compute(&sites, &settings), compute(&shuffled, &settings));
        }

        #[test]
        fn losing_one_hub_leaves_every_spoke_a_way_when_a_second_hub_exists((sites, settings) in arb_case()) {
            if let Ok(t) = compute(&sites, &settings) {
                if t.hubs.len() >= 2 && settings.hubs_per_spoke >= 2 && settings.max_peers >= 2 {
                    for hub in &t.hubs {
                        for a in sites.iter().filter(|s| t.spoke_hubs.contains_key(&s.id)) {
                            for b in sites.iter().filter(|s| s.id != a.id && s.id != *hub) {
                                prop_assert!(
                                    route(&t, a.id, b.id, Some(*hub)).is_some(),
                                    "with hub {:?} down, {:?} cannot reach {:?}", hub, a.id, b.id
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
