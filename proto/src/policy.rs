//! Policies the controller compiles into a site's intent: routing (which path a class of traffic
//! takes), QoS, security (where traffic may go) and cost. The shapes follow the seed design.
//!
//! Matching and scoring are not here: this module only says what an operator asked for and
//! checks it is self-consistent (`validate`), so the controller rejects a bad policy at the API
//! and the edge rejects a bad intent before touching the kernel.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::codec::ValidationError;
use crate::ids::{PathId, PolicyId, SiteId};

/// Maximum length of an application class name.
pub const MAX_APP_CLASS_LEN: usize = 32;
/// Maximum number of prefixes or port ranges in one match rule (the BPF maps are sized for it).
pub const MAX_MATCH_ITEMS: usize = 64;

/// An application class: a well-known one (see the constants) or one an operator defined.
/// Lower-case ASCII letters, digits, `_` and `-`, at most [`MAX_APP_CLASS_LEN`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AppClass(pub String);

impl AppClass {
    pub const VOIP: &'static str = "voip";
    pub const VIDEO_CONFERENCE: &'static str = "video_conference";
    pub const DNS: &'static str = "dns";
    pub const WEB: &'static str = "web";
    pub const BACKUP: &'static str = "backup";
    pub const FILE_TRANSFER: &'static str = "file_transfer";
    pub const BEST_EFFORT: &'static str = "best_effort";

    pub fn new(name: &str) -> Self {
        Self(name.to_owned())
    }

    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let name = &self.0;
        let ok_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        if name.is_empty() || name.len() > MAX_APP_CLASS_LEN || !name.chars().all(ok_char) {
            return Err(ValidationError::new(
                field,
                format!("application class {name:?} must be 1-{MAX_APP_CLASS_LEN} chars of a-z, 0-9, _ or -"),
            ));
        }
        Ok(())
    }
}

/// Transport protocol a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
            Protocol::Icmpv6 => 58,
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// An inclusive port range; a single port is `start == end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }
}

/// What traffic a policy applies to. Empty lists match everything; all given fields must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MatchRules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_prefixes: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst_prefixes: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_ports: Vec<PortRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst_ports: Vec<PortRange>,
    /// DSCP code point (0-63) set by the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp: Option<u8>,
}

impl MatchRules {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        for (name, len) in [
            ("src_prefixes", self.src_prefixes.len()),
            ("dst_prefixes", self.dst_prefixes.len()),
            ("src_ports", self.src_ports.len()),
            ("dst_ports", self.dst_ports.len()),
        ] {
            if len > MAX_MATCH_ITEMS {
                return Err(ValidationError::new(
                    format!("{field}.{name}"),
                    format!("{len} entries, at most {MAX_MATCH_ITEMS} allowed"),
                ));
            }
        }
        for (name, ranges) in [
            ("src_ports", &self.src_ports),
            ("dst_ports", &self.dst_ports),
        ] {
            for (i, range) in ranges.iter().enumerate() {
                if range.start > range.end {
                    return Err(ValidationError::new(
                        format!("{field}.{name}[{i}]"),
                        format!("start {} is above end {}", range.start, range.end),
                    ));
                }
            }
            if !ranges.is_empty() && self.protocol.is_some_and(|p| !p.has_ports()) {
                return Err(ValidationError::new(
                    format!("{field}.{name}"),
                    "ports only apply to tcp or udp; set protocol to tcp, udp or leave it empty",
                ));
            }
        }
        if let Some(dscp) = self.dscp {
            if dscp > 63 {
                return Err(ValidationError::new(
                    format!("{field}.dscp"),
                    format!("{dscp} is not a DSCP code point (0-63)"),
                ));
            }
        }
        let families = |prefixes: &[IpNet]| {
            (
                prefixes.iter().any(|p| matches!(p, IpNet::V4(_))),
                prefixes.iter().any(|p| matches!(p, IpNet::V6(_))),
            )
        };
        let (src4, src6) = families(&self.src_prefixes);
        let (dst4, dst6) = families(&self.dst_prefixes);
        let both_given = !self.src_prefixes.is_empty() && !self.dst_prefixes.is_empty();
        let family_shared = (src4 && dst4) || (src6 && dst6);
        if both_given && !family_shared {
            return Err(ValidationError::new(
                field,
                "source and destination prefixes share no address family, so nothing can match",
            ));
        }
        Ok(())
    }
}

/// Weights of the multi-factor path score (seed: "Multi-Factor Path Scoring"). Each in 0..=1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoringWeights {
    pub latency: f64,
    pub jitter: f64,
    pub loss: f64,
    pub bandwidth: f64,
    pub cost: f64,
}

impl ScoringWeights {
    pub const LATENCY_SENSITIVE: Self = Self {
        latency: 0.5,
        jitter: 0.3,
        loss: 0.2,
        bandwidth: 0.0,
        cost: 0.0,
    };
    pub const THROUGHPUT_FOCUSED: Self = Self {
        latency: 0.1,
        jitter: 0.0,
        loss: 0.2,
        bandwidth: 0.7,
        cost: 0.0,
    };
    pub const COST_OPTIMIZED: Self = Self {
        latency: 0.2,
        jitter: 0.1,
        loss: 0.2,
        bandwidth: 0.0,
        cost: 0.5,
    };

    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let all = [
            ("latency", self.latency),
            ("jitter", self.jitter),
            ("loss", self.loss),
            ("bandwidth", self.bandwidth),
            ("cost", self.cost),
        ];
        for (name, w) in all {
            if !(0.0..=1.0).contains(&w) {
                return Err(ValidationError::new(
                    format!("{field}.{name}"),
                    format!("weight {w} must be between 0 and 1"),
                ));
            }
        }
        if all.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            return Err(ValidationError::new(
                field,
                "at least one weight must be above 0",
            ));
        }
        Ok(())
    }
}

/// How a routing policy ranks the paths to a destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PathPreference {
    LowestLatency,
    LowestJitter,
    LowestLoss,
    HighestBandwidth,
    LowestCost,
    /// Rank by the weighted score.
    Weighted {
        weights: ScoringWeights,
    },
    /// Prefer paths leaving through the named local uplink while it meets the SLA.
    PreferUplink {
        uplink: String,
    },
}

/// How new flows of one class are spread over the paths that qualify (seed: load balancing).
/// Whatever the mode, a flow never moves between healthy paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Consistent hash of the 5-tuple over the best paths.
    #[default]
    FlowHash,
    /// Hash weighted by each path's bandwidth.
    WeightedBandwidth,
    /// New flows take the qualifying paths in turn.
    RoundRobin,
    /// New flows take the path with the fewest active flows.
    LeastFlows,
    /// Only the single best path (active/backup).
    ActiveBackup,
}

/// Service level a class needs; a path that breaks it is degraded for that class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sla {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_jitter_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_loss_pct: Option<f64>,
}

impl Sla {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        for (name, value, max) in [
            ("max_latency_ms", self.max_latency_ms, 60_000.0),
            ("max_jitter_ms", self.max_jitter_ms, 60_000.0),
            ("max_loss_pct", self.max_loss_pct, 100.0),
        ] {
            if let Some(v) = value {
                if !(v.is_finite() && v > 0.0 && v <= max) {
                    return Err(ValidationError::new(
                        format!("{field}.{name}"),
                        format!("{v} must be above 0 and at most {max}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Application-aware routing (seed: `RoutingPolicy`). Among enabled policies whose rules match a
/// packet, the one with the highest `priority` wins; equal priorities are ordered by id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutingPolicy {
    pub id: PolicyId,
    pub name: String,
    pub priority: u16,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default, rename = "match")]
    pub match_rules: MatchRules,
    /// The class this traffic belongs to (drives QoS and the class → path map at the edge).
    pub app_class: AppClass,
    pub path_preference: PathPreference,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    #[serde(default)]
    pub sla: Sla,
    /// Probe the paths this policy's traffic can take at least this often (10-60,000 ms):
    /// fast failover for one class without probing every path of the site that fast. The
    /// site's `probe.interval_ms` applies where no policy asks for less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_interval_ms: Option<u32>,
}

/// Bounds of a policy's `probe_interval_ms`.
pub const PROBE_INTERVAL_MS: std::ops::RangeInclusive<u32> = 10..=60_000;

/// Traffic priority and requirements of classes (seed: `QosPolicy`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QosPolicy {
    pub id: PolicyId,
    pub name: String,
    pub classes: Vec<AppClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_requirement_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_requirement_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_requirement_kbps: Option<u64>,
    /// 0-255, higher is served first.
    pub priority: u8,
    /// DSCP to mark on egress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp: Option<u8>,
}

/// Kinds of access link, as the seed's `interface_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    Fiber,
    Cable,
    Dsl,
    Ethernet,
    Mpls,
    Lte,
    FiveG,
    Starlink,
    Satellite,
    /// Anything else, including kinds added by a newer controller.
    #[serde(other)]
    Other,
}

/// What a security policy does with the traffic it matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityAction {
    /// Allow, but only to `allowed_sites` and over uplinks of `allowed_link_kinds`.
    #[default]
    Restrict,
    /// Drop it.
    Deny,
}

/// Where matched traffic may go (seed: `SecurityPolicy`, e.g. PCI traffic only between data
/// centres and never over LTE). All tunnels are WireGuard (ChaCha20-Poly1305) regardless.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecurityPolicy {
    pub id: PolicyId,
    pub name: String,
    pub priority: u16,
    #[serde(default, rename = "match")]
    pub match_rules: MatchRules,
    #[serde(default)]
    pub action: SecurityAction,
    /// Empty: any site of the tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_sites: Vec<SiteId>,
    /// Empty: any kind of uplink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_link_kinds: Vec<LinkKind>,
    /// Site regions (free-form labels such as `us-east`) paths may end in. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_regions: Vec<String>,
}

/// Cost-aware routing (seed: `CostPolicy`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostPolicy {
    pub id: PolicyId,
    pub name: String,
    /// Classes it applies to; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<AppClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_gb: Option<f64>,
    #[serde(default)]
    pub prefer_unmetered: bool,
    /// Per-path cost overrides, per GB; otherwise the uplinks' own cost is used.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cost_table: BTreeMap<PathId, f64>,
}

/// All policies that apply to one site.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicySet {
    #[serde(default)]
    pub routing: Vec<RoutingPolicy>,
    #[serde(default)]
    pub qos: Vec<QosPolicy>,
    #[serde(default)]
    pub security: Vec<SecurityPolicy>,
    #[serde(default)]
    pub cost: Vec<CostPolicy>,
}

/// Maximum number of routing policies per site (the BPF policy map is sized for it).
pub const MAX_ROUTING_POLICIES: usize = 1000;

fn default_true() -> bool {
    true
}

fn validate_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.trim().is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "name must be 1-128 printable characters",
        ));
    }
    Ok(())
}

fn validate_cost(field: &str, cost: f64) -> Result<(), ValidationError> {
    if !(cost.is_finite() && cost >= 0.0) {
        return Err(ValidationError::new(
            field,
            format!("cost {cost} must be a number at or above 0"),
        ));
    }
    Ok(())
}

impl RoutingPolicy {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        validate_name(&format!("{field}.name"), &self.name)?;
        self.match_rules.validate(&format!("{field}.match"))?;
        self.app_class.validate(&format!("{field}.app_class"))?;
        self.sla.validate(&format!("{field}.sla"))?;
        if let Some(ms) = self.probe_interval_ms {
            if !PROBE_INTERVAL_MS.contains(&ms) {
                return Err(ValidationError::new(
                    format!("{field}.probe_interval_ms"),
                    format!(
                        "{ms} ms is outside {}-{} ms",
                        PROBE_INTERVAL_MS.start(),
                        PROBE_INTERVAL_MS.end()
                    ),
                ));
            }
        }
        match &self.path_preference {
            PathPreference::Weighted { weights } => {
                weights.validate(&format!("{field}.path_preference.weights"))
            }
            PathPreference::PreferUplink { uplink } => {
                validate_name(&format!("{field}.path_preference.uplink"), uplink)
            }
            _ => Ok(()),
        }
    }
}

impl QosPolicy {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        validate_name(&format!("{field}.name"), &self.name)?;
        if self.classes.is_empty() {
            return Err(ValidationError::new(
                format!("{field}.classes"),
                "name at least one application class",
            ));
        }
        for (i, class) in self.classes.iter().enumerate() {
            class.validate(&format!("{field}.classes[{i}]"))?;
        }
        if self.dscp.is_some_and(|d| d > 63) {
            return Err(ValidationError::new(
                format!("{field}.dscp"),
                "not a DSCP code point (0-63)",
            ));
        }
        Ok(())
    }
}

impl SecurityPolicy {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        validate_name(&format!("{field}.name"), &self.name)?;
        self.match_rules.validate(&format!("{field}.match"))?;
        for (i, region) in self.allowed_regions.iter().enumerate() {
            validate_name(&format!("{field}.allowed_regions[{i}]"), region)?;
        }
        Ok(())
    }
}

impl CostPolicy {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        validate_name(&format!("{field}.name"), &self.name)?;
        for (i, class) in self.classes.iter().enumerate() {
            class.validate(&format!("{field}.classes[{i}]"))?;
        }
        if let Some(max) = self.max_cost_per_gb {
            validate_cost(&format!("{field}.max_cost_per_gb"), max)?;
        }
        for (path, cost) in &self.cost_table {
            validate_cost(&format!("{field}.cost_table[{path}]"), *cost)?;
        }
        Ok(())
    }
}

impl PolicySet {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if self.routing.len() > MAX_ROUTING_POLICIES {
            return Err(ValidationError::new(
                format!("{field}.routing"),
                format!(
                    "{} routing policies, at most {MAX_ROUTING_POLICIES} per site",
                    self.routing.len()
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let ids = self
            .routing
            .iter()
            .map(|p| p.id)
            .chain(self.qos.iter().map(|p| p.id))
            .chain(self.security.iter().map(|p| p.id))
            .chain(self.cost.iter().map(|p| p.id));
        for id in ids {
            if !seen.insert(id) {
                return Err(ValidationError::new(
                    field,
                    format!("policy id {id} appears twice"),
                ));
            }
        }
        for (i, p) in self.routing.iter().enumerate() {
            p.validate(&format!("{field}.routing[{i}]"))?;
        }
        for (i, p) in self.qos.iter().enumerate() {
            p.validate(&format!("{field}.qos[{i}]"))?;
        }
        for (i, p) in self.security.iter().enumerate() {
            p.validate(&format!("{field}.security[{i}]"))?;
        }
        for (i, p) in self.cost.iter().enumerate() {
            p.validate(&format!("{field}.cost[{i}]"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_link_kind_from_a_newer_peer_reads_as_other() {
        let kind: LinkKind = serde_json::from_str("\"quantum_link\"").unwrap();
        assert_eq!(kind, LinkKind::Other);
        let kind: LinkKind = serde_json::from_str("\"five_g\"").unwrap();
        assert_eq!(kind, LinkKind::FiveG);
    }

    #[test]
    fn reversed_port_range_is_rejected() {
        let rules = MatchRules {
            dst_ports: vec![PortRange { start: 10, end: 5 }],
            ..Default::default()
        };
        let err = rules.validate("match").unwrap_err();
        assert_eq!(err.field, "match.dst_ports[0]");
    }

    #[test]
    fn ports_with_icmp_are_rejected() {
        let rules = MatchRules {
            protocol: Some(Protocol::Icmp),
            dst_ports: vec![PortRange::single(53)],
            ..Default::default()
        };
        assert!(rules.validate("m").is_err());
    }

    #[test]
    fn disjoint_families_cannot_match() {
        let rules = MatchRules {
            src_prefixes: vec!["10.0.0.0/8".parse().unwrap()],
            dst_prefixes: vec!["2001:db8::/32".parse().unwrap()],
            ..Default::default()
        };
        assert!(rules.validate("m").is_err());
    }

    #[test]
    fn a_policys_probe_interval_is_bounded() {
        let mut policy: RoutingPolicy = serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::nil(), "name": "voip", "priority": 1, "app_class": "voip",
            "path_preference": { "kind": "lowest_latency" }
        }))
        .unwrap();
        assert_eq!(policy.probe_interval_ms, None);
        assert!(policy.validate("p").is_ok());
        for (ms, ok) in [(10, true), (60_000, true), (9, false), (60_001, false)] {
            policy.probe_interval_ms = Some(ms);
            let result = policy.validate("p");
            assert_eq!(result.is_ok(), ok, "{ms}: {result:?}");
            if let Err(e) = result {
                assert!(e.to_string().contains("probe_interval_ms"), "{e}");
            }
        }
    }

    #[test]
    fn app_class_names_are_checked() {
        assert!(AppClass::new(AppClass::VOIP).validate("c").is_ok());
        assert!(AppClass::new("Upper").validate("c").is_err());
        assert!(AppClass::new("").validate("c").is_err());
        assert!(AppClass::new(&"x".repeat(33)).validate("c").is_err());
    }

    #[test]
    fn weights_must_be_in_range_and_not_all_zero() {
        assert!(ScoringWeights::LATENCY_SENSITIVE.validate("w").is_ok());
        let zero = ScoringWeights {
            latency: 0.0,
            jitter: 0.0,
            loss: 0.0,
            bandwidth: 0.0,
            cost: 0.0,
        };
        assert!(zero.validate("w").is_err());
        let nan = ScoringWeights {
            latency: f64::NAN,
            ..ScoringWeights::LATENCY_SENSITIVE
        };
        assert!(nan.validate("w").is_err());
    }
}
