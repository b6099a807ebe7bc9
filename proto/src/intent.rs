//! [`SiteIntent`]: the whole desired state of one site, as the controller computes it.
//!
//! The controller publishes one per site to the JetStream KV bucket `intents` under
//! `<tenant>.<site>`. Each publish carries a `revision` that only rises. The edge refuses an
//! intent that fails [`Message::validate`], is for another tenant or site, or does not rise
//! above what it applied; otherwise it diffs the intent against the kernel and applies the
//! difference, so a repeated intent changes nothing.
//!
//! Tunnels: one WireGuard interface per (local uplink, remote uplink index) pair, each holding
//! every peer once, so interfaces grow with uplinks², not with sites. [`tunnel_port`] fixes the
//! UDP port convention both ends compute independently.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{encode, Message, SchemaVersion, ValidationError};
use crate::ids::{PathId, ProbeKey, SiteId, TenantId, WgPublicKey};
use crate::policy::{LinkKind, PathPreference, PolicySet, Sla};

/// Most uplinks one site may have; also the stride of the tunnel port convention.
pub const MAX_UPLINKS: u8 = 8;
/// Most peers in one intent.
pub const MAX_PEERS: usize = 1000;
/// Most paths in one intent.
pub const MAX_PATHS: usize = 8192;
/// Most LAN or transit prefixes per site.
pub const MAX_PREFIXES: usize = 256;

/// UDP port of the WireGuard interface that a site with `listen_port_base` runs for the pair
/// (its own uplink `local_uplink`, the peer's uplink `remote_uplink`). The peer connects to
/// `tunnel_port(peer_base, its_remote = our local, ...)` mirrored, so both ends agree without
/// exchanging ports.
pub fn tunnel_port(listen_port_base: u16, local_uplink: u8, remote_uplink: u8) -> Option<u16> {
    if local_uplink >= MAX_UPLINKS || remote_uplink >= MAX_UPLINKS {
        return None;
    }
    listen_port_base
        .checked_add(u16::from(local_uplink) * u16::from(MAX_UPLINKS) + u16::from(remote_uplink))
}

/// The site's own address space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overlay {
    /// The site's address on the overlay (used for probes and as tunnel source).
    pub address: IpAddr,
    /// The overlay network of the tenant, e.g. `100.64.0.0/16`.
    pub network: IpNet,
    /// Prefixes behind this site (its LANs), routed to it by every peer.
    pub lan_prefixes: Vec<IpNet>,
}

/// One local WAN uplink of the site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Uplink {
    /// 0-based, stable: paths and tunnel ports refer to it.
    pub index: u8,
    pub name: String,
    pub kind: LinkKind,
    /// Local network device, when the controller knows it (otherwise the agent's config says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<u32>,
    #[serde(default)]
    pub cost_per_gb: f64,
    #[serde(default)]
    pub metered: bool,
}

/// Where a peer can be reached on one of its uplinks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEndpoint {
    pub uplink_index: u8,
    pub ip: IpAddr,
    #[serde(default)]
    pub kind: Option<LinkKind>,
}

/// Another site this site peers with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub site: SiteId,
    pub name: String,
    pub public_key: WgPublicKey,
    pub overlay_address: IpAddr,
    /// The peer's own LANs.
    pub lan_prefixes: Vec<IpNet>,
    /// Other sites' prefixes reached through this peer (a hub in hub-and-spoke).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transit_prefixes: Vec<IpNet>,
    pub endpoints: Vec<PeerEndpoint>,
    pub listen_port_base: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default)]
    pub hub: bool,
    /// HMAC key for probes between this site and the peer (secret; redacted in `Debug`).
    pub probe_key: ProbeKey,
    /// While the peer rotates its WireGuard key (the announce phase), its next public key: the
    /// edge configures it as a second peer entry with the same endpoint and no allowed IPs
    /// (WireGuard gives an allowed IP to one peer only), so the peer's first handshake with
    /// the new key is accepted the moment it switches. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<WgPublicKey>,
}

/// One path: (local uplink, remote site, remote uplink).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathSpec {
    pub id: PathId,
    pub local_uplink: u8,
    pub remote_site: SiteId,
    pub remote_uplink: u8,
}

/// WireGuard settings of this site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireguardSettings {
    /// The public key the controller has on record for this site. The agent runs its
    /// interfaces with the private key of this public key: its current key, or the next key
    /// it made once the controller commits a rotation (then the next key becomes current).
    /// A key the agent does not hold means its state is wrong; it keeps its current key.
    pub public_key: WgPublicKey,
    pub listen_port_base: u16,
    pub mtu: u16,
    pub persistent_keepalive_s: u16,
}

/// How paths are probed (seed: path monitor).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeSettings {
    pub interval_ms: u32,
    /// A probe unanswered after this long counts as lost.
    pub timeout_ms: u32,
    /// Consecutive losses that declare a path down (BFD-like detect multiplier).
    pub down_after_losses: u8,
    /// Samples kept per path (seed: 60).
    pub history_len: u16,
    pub mtu_discovery: bool,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            timeout_ms: 1000,
            down_after_losses: 3,
            history_len: 60,
            mtu_discovery: true,
        }
    }
}

/// When paths count as degraded or down, and how long before traffic returns to a recovered
/// path (seed: `FailoverConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverSettings {
    /// Score (0-100) under which a path is degraded.
    pub degrade_below_score: u8,
    /// Score under which a path is down even if probes still return.
    pub down_below_score: u8,
    /// A recovered path must stay good this long before traffic moves back.
    pub failback_hold_down_ms: u32,
    /// SLA for classes whose routing policy sets none.
    #[serde(default)]
    pub default_sla: Sla,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        Self {
            degrade_below_score: 60,
            down_below_score: 20,
            failback_hold_down_ms: 10_000,
            default_sla: Sla::default(),
        }
    }
}

/// The desired state of one site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteIntent {
    pub schema_version: SchemaVersion,
    pub tenant: TenantId,
    pub site: SiteId,
    pub site_name: String,
    /// Rises with every publish for this site; never reused.
    pub revision: u64,
    pub generated_at_unix_ms: u64,
    pub overlay: Overlay,
    pub uplinks: Vec<Uplink>,
    pub wireguard: WireguardSettings,
    pub peers: Vec<Peer>,
    pub paths: Vec<PathSpec>,
    #[serde(default)]
    pub policies: PolicySet,
    #[serde(default)]
    pub probe: ProbeSettings,
    #[serde(default)]
    pub failover: FailoverSettings,
}

/// Why an edge refuses an intent that decoded and validated, given what it already runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    #[error("intent is for tenant {got}, this edge belongs to {expected}")]
    WrongTenant { expected: TenantId, got: TenantId },
    #[error("intent is for site {got}, this edge is {expected}")]
    WrongSite { expected: SiteId, got: SiteId },
    #[error("intent revision {got} is not above the applied revision {applied}")]
    StaleRevision { applied: u64, got: u64 },
}

impl SiteIntent {
    /// Whether this edge (`tenant`, `site`, having applied `applied_revision`) may apply it.
    pub fn check_acceptable(
        &self,
        tenant: TenantId,
        site: SiteId,
        applied_revision: Option<u64>,
    ) -> Result<(), AcceptError> {
        if self.tenant != tenant {
            return Err(AcceptError::WrongTenant {
                expected: tenant,
                got: self.tenant,
            });
        }
        if self.site != site {
            return Err(AcceptError::WrongSite {
                expected: site,
                got: self.site,
            });
        }
        if let Some(applied) = applied_revision {
            if self.revision <= applied {
                return Err(AcceptError::StaleRevision {
                    applied,
                    got: self.revision,
                });
            }
        }
        Ok(())
    }

    /// SHA-256 of the intent's content, ignoring `revision` and `generated_at_unix_ms`: two
    /// intents with the same digest configure the site identically, so the controller does not
    /// republish and the edge has nothing to apply.
    pub fn content_digest(&self) -> [u8; 32] {
        let mut normalized = self.clone();
        normalized.revision = 0;
        normalized.generated_at_unix_ms = 0;
        Sha256::digest(encode(&normalized)).into()
    }

    pub fn peer(&self, site: SiteId) -> Option<&Peer> {
        self.peers.iter().find(|p| p.site == site)
    }
}

fn check_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.trim().is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must be 1-128 printable characters",
        ));
    }
    Ok(())
}

fn check_count(field: &str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        return Err(ValidationError::new(
            field,
            format!("{len} entries, at most {max} allowed"),
        ));
    }
    Ok(())
}

/// A prefix and the name of the site that claims it.
type Claim<'a> = (IpNet, &'a str);

/// Finds two prefixes that overlap (one contains the other). Sorting by start address makes an
/// overlap, if any exists, appear between neighbours.
fn find_overlap<'a>(prefixes: &mut [Claim<'a>]) -> Option<(Claim<'a>, Claim<'a>)> {
    prefixes.sort_by_key(|claim| (claim.0.network(), claim.0.prefix_len()));
    prefixes
        .windows(2)
        .find(|w| w[0].0.contains(&w[1].0.network()))
        .map(|w| (w[0], w[1]))
}

impl Message for SiteIntent {
    const KIND: &'static str = "site_intent";

    fn validate(&self) -> Result<(), ValidationError> {
        if self.revision == 0 {
            return Err(ValidationError::new("revision", "revisions start at 1"));
        }
        check_name("site_name", &self.site_name)?;

        // Overlay.
        if !self.overlay.network.contains(&self.overlay.address) {
            return Err(ValidationError::new(
                "overlay.address",
                format!(
                    "{} is outside the overlay network {}",
                    self.overlay.address, self.overlay.network
                ),
            ));
        }
        check_count(
            "overlay.lan_prefixes",
            self.overlay.lan_prefixes.len(),
            MAX_PREFIXES,
        )?;

        // Uplinks.
        if self.uplinks.is_empty() {
            return Err(ValidationError::new(
                "uplinks",
                "a site needs at least one uplink",
            ));
        }
        check_count("uplinks", self.uplinks.len(), usize::from(MAX_UPLINKS))?;
        let mut uplink_indexes = HashSet::new();
        let mut uplink_names = HashSet::new();
        for (i, uplink) in self.uplinks.iter().enumerate() {
            if uplink.index >= MAX_UPLINKS {
                return Err(ValidationError::new(
                    format!("uplinks[{i}].index"),
                    format!("{} is not below {MAX_UPLINKS}", uplink.index),
                ));
            }
            check_name(&format!("uplinks[{i}].name"), &uplink.name)?;
            if !uplink_indexes.insert(uplink.index) || !uplink_names.insert(uplink.name.as_str()) {
                return Err(ValidationError::new(
                    format!("uplinks[{i}]"),
                    "uplink index and name must be unique",
                ));
            }
            if !(uplink.cost_per_gb.is_finite() && uplink.cost_per_gb >= 0.0) {
                return Err(ValidationError::new(
                    format!("uplinks[{i}].cost_per_gb"),
                    "must be a number at or above 0",
                ));
            }
        }

        // WireGuard.
        let wg = &self.wireguard;
        if !(1280..=9000).contains(&wg.mtu) {
            return Err(ValidationError::new(
                "wireguard.mtu",
                format!("{} is outside 1280-9000", wg.mtu),
            ));
        }
        let max_uplink = self.uplinks.iter().map(|u| u.index).max().unwrap_or(0);
        if wg.listen_port_base == 0
            || tunnel_port(wg.listen_port_base, max_uplink, MAX_UPLINKS - 1).is_none()
        {
            return Err(ValidationError::new(
                "wireguard.listen_port_base",
                "leaves no room for one port per uplink pair below 65536",
            ));
        }

        // Peers.
        check_count("peers", self.peers.len(), MAX_PEERS)?;
        let mut peer_endpoints: HashMap<SiteId, BTreeSet<u8>> = HashMap::new();
        let mut keys = HashSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            let field = format!("peers[{i}]");
            if peer.site == self.site {
                return Err(ValidationError::new(
                    field,
                    "a site cannot peer with itself",
                ));
            }
            check_name(&format!("{field}.name"), &peer.name)?;
            if peer.public_key == wg.public_key || !keys.insert(peer.public_key) {
                return Err(ValidationError::new(
                    format!("{field}.public_key"),
                    "WireGuard public keys must be unique across the site and its peers",
                ));
            }
            if let Some(next) = peer.next_public_key {
                if next == wg.public_key || !keys.insert(next) {
                    return Err(ValidationError::new(
                        format!("{field}.next_public_key"),
                        "WireGuard public keys must be unique across the site and its peers",
                    ));
                }
            }
            if !self.overlay.network.contains(&peer.overlay_address) {
                return Err(ValidationError::new(
                    format!("{field}.overlay_address"),
                    format!("{} is outside the overlay network", peer.overlay_address),
                ));
            }
            check_count(
                &format!("{field}.lan_prefixes"),
                peer.lan_prefixes.len(),
                MAX_PREFIXES,
            )?;
            check_count(
                &format!("{field}.transit_prefixes"),
                peer.transit_prefixes.len(),
                MAX_PEERS * 4,
            )?;
            if peer.endpoints.is_empty() {
                return Err(ValidationError::new(
                    format!("{field}.endpoints"),
                    "a peer needs at least one endpoint",
                ));
            }
            let mut indexes = BTreeSet::new();
            for (j, ep) in peer.endpoints.iter().enumerate() {
                if ep.uplink_index >= MAX_UPLINKS || !indexes.insert(ep.uplink_index) {
                    return Err(ValidationError::new(
                        format!("{field}.endpoints[{j}].uplink_index"),
                        format!("must be unique and below {MAX_UPLINKS}"),
                    ));
                }
            }
            if peer.listen_port_base == 0
                || tunnel_port(peer.listen_port_base, MAX_UPLINKS - 1, MAX_UPLINKS - 1).is_none()
            {
                return Err(ValidationError::new(
                    format!("{field}.listen_port_base"),
                    "leaves no room for one port per uplink pair below 65536",
                ));
            }
            if peer_endpoints.insert(peer.site, indexes).is_some() {
                return Err(ValidationError::new(
                    field,
                    format!("site {} listed twice", peer.site),
                ));
            }
        }

        // No two sites may claim overlapping LANs, or routing would be ambiguous.
        let mut lans: Vec<(IpNet, &str)> = self
            .overlay
            .lan_prefixes
            .iter()
            .map(|p| (*p, self.site_name.as_str()))
            .chain(
                self.peers
                    .iter()
                    .flat_map(|peer| peer.lan_prefixes.iter().map(|p| (*p, peer.name.as_str()))),
            )
            .collect();
        if let Some(((a, a_site), (b, b_site))) = find_overlap(&mut lans) {
            return Err(ValidationError::new(
                "lan_prefixes",
                format!("{a} ({a_site}) overlaps {b} ({b_site})"),
            ));
        }

        // Paths must refer to uplinks and endpoints that exist.
        check_count("paths", self.paths.len(), MAX_PATHS)?;
        let mut path_ids = HashSet::new();
        let mut path_triples = HashSet::new();
        for (i, path) in self.paths.iter().enumerate() {
            let field = format!("paths[{i}]");
            if !path_ids.insert(path.id) {
                return Err(ValidationError::new(
                    field,
                    format!("path id {} appears twice", path.id),
                ));
            }
            if !uplink_indexes.contains(&path.local_uplink) {
                return Err(ValidationError::new(
                    format!("{field}.local_uplink"),
                    format!("no local uplink {}", path.local_uplink),
                ));
            }
            let Some(remote) = peer_endpoints.get(&path.remote_site) else {
                return Err(ValidationError::new(
                    format!("{field}.remote_site"),
                    format!("{} is not a peer of this site", path.remote_site),
                ));
            };
            if !remote.contains(&path.remote_uplink) {
                return Err(ValidationError::new(
                    format!("{field}.remote_uplink"),
                    format!("the peer has no endpoint on uplink {}", path.remote_uplink),
                ));
            }
            if !path_triples.insert((path.local_uplink, path.remote_site, path.remote_uplink)) {
                return Err(ValidationError::new(field, "the same path is listed twice"));
            }
        }

        // Policies.
        self.policies.validate("policies")?;
        for (i, policy) in self.policies.routing.iter().enumerate() {
            if let PathPreference::PreferUplink { uplink } = &policy.path_preference {
                if !uplink_names.contains(uplink.as_str()) {
                    return Err(ValidationError::new(
                        format!("policies.routing[{i}].path_preference.uplink"),
                        format!("no local uplink named {uplink:?}"),
                    ));
                }
            }
        }
        for (i, policy) in self.policies.cost.iter().enumerate() {
            if let Some(unknown) = policy.cost_table.keys().find(|p| !path_ids.contains(*p)) {
                return Err(ValidationError::new(
                    format!("policies.cost[{i}].cost_table"),
                    format!("path {unknown} is not a path of this site"),
                ));
            }
        }

        // Probing and failover.
        let probe = &self.probe;
        if !(10..=60_000).contains(&probe.interval_ms) {
            return Err(ValidationError::new(
                "probe.interval_ms",
                format!("{} is outside 10-60000", probe.interval_ms),
            ));
        }
        if probe.timeout_ms == 0 || probe.timeout_ms > 60_000 {
            return Err(ValidationError::new("probe.timeout_ms", "must be 1-60000"));
        }
        if probe.down_after_losses == 0 || probe.down_after_losses > 100 {
            return Err(ValidationError::new(
                "probe.down_after_losses",
                "must be 1-100",
            ));
        }
        if probe.history_len == 0 || probe.history_len > 3600 {
            return Err(ValidationError::new("probe.history_len", "must be 1-3600"));
        }
        let failover = &self.failover;
        if failover.degrade_below_score > 100
            || failover.down_below_score > failover.degrade_below_score
        {
            return Err(ValidationError::new(
                "failover",
                "need down_below_score <= degrade_below_score <= 100",
            ));
        }
        if failover.failback_hold_down_ms > 3_600_000 {
            return Err(ValidationError::new(
                "failover.failback_hold_down_ms",
                "at most one hour",
            ));
        }
        failover.default_sla.validate("failover.default_sla")
    }
}
