//! Routing policies compiled into the data plane's classifier tables (pure, no I/O).
//!
//! The BPF classifier (`edge-ebpf/include/steer.h`) ANDs four bitmaps, one per dimension
//! (source prefix, destination prefix, protocol, destination port), each holding the rules
//! that match that value, and takes the lowest set bit: rules are numbered by rank, 0 being the
//! highest priority. Only the source port range and DSCP are checked per candidate. This
//! module builds those tables from the intent's routing policies:
//!
//! - enabled policies are ordered by priority (highest first), then id — the proto rule;
//! - a policy of a built-in application class (VoIP, DNS, web, …) that names no protocol or
//!   destination ports takes the catalog's signatures (`patronus_proto::catalog`): one entry
//!   per signature, all reporting the policy's id;
//! - an entry with several source port ranges becomes one rule per range (same class);
//! - each application class gets a small id (0 is "no policy matched"), in rank order, and
//!   takes its load balancing and path preference from its highest-priority policy;
//! - the prefix tables store, for each distinct prefix, the rules whose prefixes contain it
//!   (rules without prefixes are in `::/0`); since the prefixes containing one address are
//!   nested, the longest stored match holds exactly the rules matching that address. IPv4 is
//!   IPv4-mapped IPv6, as in the flow key; `::ffff:0:0/96` is always stored so IPv6 prefixes
//!   (even `::/0`) never cover IPv4 traffic. An IPv6 prefix written inside `::ffff:0:0/96`
//!   acts as the IPv4 prefix it maps.
//!
//! Known difference from the reference: the BPF side checks at most 32 candidates per packet
//! (rules that match on prefixes, protocol and destination port but fail their source port or
//! DSCP); past that it falls back to the default class. [`Matcher`] has no such cap.
//!
//! [`Matcher`] runs the same algorithm in Rust (tests compare it with a plain scan of the
//! policies, the reference; the criterion bench measures it).

// The run loop fills the BPF maps from `compile` once it attaches the data plane; until then
// the tests and the bench are the callers.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use patronus_proto::catalog;
use patronus_proto::policy::{
    AppClass, LoadBalancing, MatchRules, PathPreference, RoutingPolicy, Sla,
};
use patronus_proto::PolicyId;

use crate::dataplane::abi::{PolicySet, MAX_CLASSES, MAX_POLICIES};

/// One application class as the data plane sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassSpec {
    /// 1.. (0 is the default class: no policy matched).
    pub id: u16,
    pub name: AppClass,
    pub load_balancing: LoadBalancing,
    pub path_preference: PathPreference,
    pub sla: Sla,
}

/// One classifier rule; its index in [`Compiled::rules`] is its rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub policy: PolicyId,
    /// Which of the policy's catalog-expanded match rules this rule came from (internal).
    entry: usize,
    pub class_id: u16,
    pub src_port_lo: u16,
    pub src_port_hi: u16,
    pub dscp: Option<u8>,
}

/// A prefix as the LPM tries key it: length over the 16-byte (IPv4-mapped) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub len: u32,
    pub addr: [u8; 16],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub classes: Vec<ClassSpec>,
    pub rules: Vec<RuleSpec>,
    pub src: BTreeMap<Prefix, PolicySet>,
    pub dst: BTreeMap<Prefix, PolicySet>,
    /// Index: IANA protocol number (256 entries).
    pub protocol: Vec<PolicySet>,
    /// Destination ports as runs `(first, last, set)` covering 0..=65535 in order; port 0
    /// stands for "no ports" (ICMP and others).
    pub dst_ports: Vec<(u16, u16, PolicySet)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("the policies need {0} classifier rules; the data plane holds {MAX_POLICIES}")]
    TooManyRules(usize),
    #[error("the policies name {0} application classes; the data plane holds {max}", max = MAX_CLASSES - 1)]
    TooManyClasses(usize),
}

/// What the classifier looks at in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketFields {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// 0 for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
    pub dscp: u8,
}

/// 16-byte form of an address (IPv4-mapped for IPv4).
pub fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn prefix_of(net: &IpNet) -> Prefix {
    let (len, base) = match net {
        IpNet::V4(n) => (96 + u32::from(n.prefix_len()), IpAddr::V4(n.network())),
        IpNet::V6(n) => (u32::from(n.prefix_len()), IpAddr::V6(n.network())),
    };
    Prefix {
        len,
        addr: addr16(base),
    }
}

impl Prefix {
    /// An IPv4 prefix (IPv4-mapped: inside `::ffff:0:0/96`).
    fn is_v4(&self) -> bool {
        self.len >= 96 && masked(&self.addr, 96) == V4_ANY.addr
    }
}

/// Whether `outer` contains `inner`, within one address family: an IPv6 prefix never covers
/// IPv4 traffic (`::/0` is "any IPv6"), although `::ffff:0:0/96` lies inside it bitwise.
fn contains(outer: &Prefix, inner: &Prefix) -> bool {
    outer.is_v4() == inner.is_v4()
        && outer.len <= inner.len
        && masked(&inner.addr, outer.len) == masked(&outer.addr, outer.len)
}

fn masked(addr: &[u8; 16], len: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, byte) in addr.iter().enumerate() {
        let bits = (len as i64 - 8 * i as i64).clamp(0, 8) as u32;
        out[i] = if bits == 0 {
            0
        } else {
            byte & (0xffu8 << (8 - bits))
        };
    }
    out
}

/// The root of the IPv6 space: rules without prefixes, and `::/0`.
const ANY: Prefix = Prefix {
    len: 0,
    addr: [0; 16],
};
/// The root of the IPv4 space (`0.0.0.0/0` mapped): always stored, so an IPv4 address never
/// falls through to an IPv6 entry.
const V4_ANY: Prefix = Prefix {
    len: 96,
    addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0],
};

/// Enabled policies in rank order: priority high to low, then id.
pub fn ordered(policies: &[RoutingPolicy]) -> Vec<&RoutingPolicy> {
    let mut enabled: Vec<&RoutingPolicy> = policies.iter().filter(|p| p.enabled).collect();
    enabled.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
    enabled
}

fn prefix_table(rules: &[RuleSpec], entry_prefixes: &[Vec<Prefix>]) -> BTreeMap<Prefix, PolicySet> {
    let mut stored: BTreeSet<Prefix> = entry_prefixes.iter().flatten().copied().collect();
    stored.insert(ANY);
    stored.insert(V4_ANY);
    stored
        .into_iter()
        .map(|at| {
            let mut set = PolicySet::default();
            for (rank, rule) in rules.iter().enumerate() {
                let prefixes = &entry_prefixes[rule.entry];
                if prefixes.is_empty() || prefixes.iter().any(|q| contains(q, &at)) {
                    set.insert(rank as u32);
                }
            }
            (at, set)
        })
        .collect()
}

/// One policy's match rules after the application catalog filled them in (a catalog class
/// with no protocol or ports gives one entry per signature, all for the same policy).
struct Entry<'a> {
    policy: &'a RoutingPolicy,
    rules: MatchRules,
}

/// Compile the routing policies into the classifier's tables.
pub fn compile(policies: &[RoutingPolicy]) -> Result<Compiled, CompileError> {
    let ordered = ordered(policies);
    let entries: Vec<Entry> = ordered
        .iter()
        .flat_map(|policy| {
            catalog::effective_rules(&policy.app_class, &policy.match_rules)
                .into_iter()
                .map(move |rules| Entry { policy, rules })
        })
        .collect();
    let mut classes: Vec<ClassSpec> = Vec::new();
    let mut rules = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let policy = entry.policy;
        let class_id = match classes.iter().find(|c| c.name == policy.app_class) {
            Some(class) => class.id,
            None => {
                let id = classes.len() as u16 + 1;
                classes.push(ClassSpec {
                    id,
                    name: policy.app_class.clone(),
                    load_balancing: policy.load_balancing,
                    path_preference: policy.path_preference.clone(),
                    sla: policy.sla,
                });
                id
            }
        };
        let src_ranges: Vec<(u16, u16)> = if entry.rules.src_ports.is_empty() {
            vec![(0, u16::MAX)]
        } else {
            entry
                .rules
                .src_ports
                .iter()
                .map(|r| (r.start, r.end))
                .collect()
        };
        for (lo, hi) in src_ranges {
            rules.push(RuleSpec {
                policy: policy.id,
                entry: index,
                class_id,
                src_port_lo: lo,
                src_port_hi: hi,
                dscp: entry.rules.dscp,
            });
        }
    }
    if rules.len() > MAX_POLICIES as usize {
        return Err(CompileError::TooManyRules(rules.len()));
    }
    if classes.len() >= MAX_CLASSES as usize {
        return Err(CompileError::TooManyClasses(classes.len()));
    }
    let prefixes = |pick: fn(&MatchRules) -> &Vec<IpNet>| -> Vec<Vec<Prefix>> {
        entries
            .iter()
            .map(|e| pick(&e.rules).iter().map(prefix_of).collect())
            .collect()
    };
    let src = prefix_table(&rules, &prefixes(|r| &r.src_prefixes));
    let dst = prefix_table(&rules, &prefixes(|r| &r.dst_prefixes));

    let protocol = (0..=255u8)
        .map(|number| {
            let mut set = PolicySet::default();
            for (rank, rule) in rules.iter().enumerate() {
                match entries[rule.entry].rules.protocol {
                    Some(p) if p.number() != number => {}
                    _ => set.insert(rank as u32),
                }
            }
            set
        })
        .collect();

    // Runs of destination ports with the same rule set: cut at every range boundary.
    let mut cuts: BTreeSet<u32> = [0, 65536].into();
    for entry in &entries {
        for range in &entry.rules.dst_ports {
            cuts.insert(u32::from(range.start));
            cuts.insert(u32::from(range.end) + 1);
        }
    }
    let cuts: Vec<u32> = cuts.into_iter().collect();
    let mut dst_ports: Vec<(u16, u16, PolicySet)> = Vec::new();
    for window in cuts.windows(2) {
        let (first, last) = (window[0] as u16, (window[1] - 1) as u16);
        let mut set = PolicySet::default();
        for (rank, rule) in rules.iter().enumerate() {
            let ranges = &entries[rule.entry].rules.dst_ports;
            if ranges.is_empty() || ranges.iter().any(|r| r.contains(first)) {
                set.insert(rank as u32);
            }
        }
        match dst_ports.last_mut() {
            Some((_, end, previous)) if *previous == set => *end = last,
            _ => dst_ports.push((first, last, set)),
        }
    }
    Ok(Compiled {
        classes,
        rules,
        src,
        dst,
        protocol,
        dst_ports,
    })
}

/// The classifier's algorithm in Rust, over compiled tables.
pub struct Matcher {
    /// Prefix tables by length, longest first.
    src: Vec<(u32, HashMap<[u8; 16], PolicySet>)>,
    dst: Vec<(u32, HashMap<[u8; 16], PolicySet>)>,
    protocol: Vec<PolicySet>,
    dst_port: Vec<PolicySet>,
    rules: Vec<RuleSpec>,
}

fn by_length(table: &BTreeMap<Prefix, PolicySet>) -> Vec<(u32, HashMap<[u8; 16], PolicySet>)> {
    let mut lengths: BTreeMap<u32, HashMap<[u8; 16], PolicySet>> = BTreeMap::new();
    for (prefix, set) in table {
        lengths
            .entry(prefix.len)
            .or_default()
            .insert(masked(&prefix.addr, prefix.len), *set);
    }
    lengths.into_iter().rev().collect()
}

fn longest<'a>(
    table: &'a [(u32, HashMap<[u8; 16], PolicySet>)],
    addr: &[u8; 16],
) -> Option<&'a PolicySet> {
    table
        .iter()
        .find_map(|(len, entries)| entries.get(&masked(addr, *len)))
}

impl Matcher {
    pub fn new(compiled: &Compiled) -> Self {
        let mut dst_port = Vec::with_capacity(65536);
        for (first, last, set) in &compiled.dst_ports {
            dst_port.extend(std::iter::repeat_n(*set, usize::from(last - first) + 1));
        }
        Self {
            src: by_length(&compiled.src),
            dst: by_length(&compiled.dst),
            protocol: compiled.protocol.clone(),
            dst_port,
            rules: compiled.rules.clone(),
        }
    }

    /// The rank of the matching rule, as the data plane would find it.
    pub fn classify(&self, packet: &PacketFields) -> Option<usize> {
        let src = longest(&self.src, &addr16(packet.src))?;
        let dst = longest(&self.dst, &addr16(packet.dst))?;
        let protocol = self.protocol.get(usize::from(packet.protocol))?;
        let port = self.dst_port.get(usize::from(packet.dst_port))?;
        for word in 0..src.bits.len() {
            let mut candidates =
                src.bits[word] & dst.bits[word] & protocol.bits[word] & port.bits[word];
            while candidates != 0 {
                let rank = word * 64 + candidates.trailing_zeros() as usize;
                candidates &= candidates - 1;
                let rule = &self.rules[rank];
                if (rule.src_port_lo..=rule.src_port_hi).contains(&packet.src_port)
                    && rule.dscp.is_none_or(|d| d == packet.dscp)
                {
                    return Some(rank);
                }
            }
        }
        None
    }
}

/// The reference: the first policy in rank order whose rules all match (any of its
/// catalog-expanded rule sets), scanned plainly.
pub fn reference_match(policies: &[RoutingPolicy], packet: &PacketFields) -> Option<PolicyId> {
    let in_any =
        |nets: &[IpNet], addr: IpAddr| nets.is_empty() || nets.iter().any(|n| n.contains(&addr));
    ordered(policies)
        .into_iter()
        .find(|p| {
            let ports = |ranges: &[patronus_proto::policy::PortRange], port: u16| {
                ranges.is_empty() || ranges.iter().any(|r| r.contains(port))
            };
            catalog::effective_rules(&p.app_class, &p.match_rules)
                .iter()
                .any(|m| {
                    in_any(&m.src_prefixes, packet.src)
                        && in_any(&m.dst_prefixes, packet.dst)
                        && m.protocol.is_none_or(|p| p.number() == packet.protocol)
                        && ports(&m.src_ports, packet.src_port)
                        && ports(&m.dst_ports, packet.dst_port)
                        && m.dscp.is_none_or(|d| d == packet.dscp)
                })
        })
        .map(|p| p.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use patronus_proto::policy::{MatchRules, PortRange, Protocol};
    use proptest::prelude::*;

    fn policy(n: u128, priority: u16, class: &str, rules: MatchRules) -> RoutingPolicy {
        RoutingPolicy {
            id: PolicyId(uuid::Uuid::from_u128(n)),
            name: format!("p{n}"),
            priority,
            enabled: true,
            match_rules: rules,
            app_class: AppClass::new(class),
            path_preference: PathPreference::LowestLatency,
            load_balancing: LoadBalancing::FlowHash,
            sla: Sla::default(),
            probe_interval_ms: None,
        }
    }

    fn udp(dst_port: u16) -> PacketFields {
        PacketFields {
            src: "10.1.0.10".parse().unwrap(),
            dst: "10.2.0.10".parse().unwrap(),
            protocol: 17,
            src_port: 40000,
            dst_port,
            dscp: 0,
        }
    }

    #[test]
    fn voip_and_bulk_classes_by_port() {
        let policies = vec![
            policy(
                1,
                100,
                "voip",
                MatchRules {
                    protocol: Some(Protocol::Udp),
                    dst_ports: vec![
                        PortRange::single(5060),
                        PortRange {
                            start: 10000,
                            end: 20000,
                        },
                    ],
                    ..MatchRules::default()
                },
            ),
            policy(
                2,
                50,
                "backup",
                MatchRules {
                    protocol: Some(Protocol::Tcp),
                    dst_ports: vec![PortRange::single(873)],
                    ..MatchRules::default()
                },
            ),
        ];
        let compiled = compile(&policies).unwrap();
        assert_eq!(compiled.classes.len(), 2);
        let m = Matcher::new(&compiled);
        assert_eq!(m.classify(&udp(5060)), Some(0));
        assert_eq!(m.classify(&udp(15000)), Some(0));
        assert_eq!(m.classify(&udp(873)), None);
        let mut tcp = udp(873);
        tcp.protocol = 6;
        assert_eq!(
            m.classify(&tcp).map(|r| compiled.rules[r].class_id),
            Some(2)
        );
        // Runs, not 65,536 entries: 0-872, 873, 874-5059, 5060, 5061-9999, 10000-20000, rest.
        assert_eq!(compiled.dst_ports.len(), 7, "{:?}", compiled.dst_ports);
    }

    #[test]
    fn the_most_specific_prefix_holds_every_covering_policy() {
        let policies = vec![
            policy(
                1,
                10,
                "intranet",
                MatchRules {
                    dst_prefixes: vec!["10.0.0.0/8".parse().unwrap()],
                    ..MatchRules::default()
                },
            ),
            policy(
                2,
                20,
                "resolver",
                MatchRules {
                    dst_prefixes: vec!["10.2.0.0/16".parse().unwrap()],
                    dst_ports: vec![PortRange::single(53)],
                    ..MatchRules::default()
                },
            ),
        ];
        let compiled = compile(&policies).unwrap();
        let m = Matcher::new(&compiled);
        // 10.2.0.10:53 → dns (priority 20); 10.2.0.10:80 → web via the /8.
        assert_eq!(
            m.classify(&udp(53)).map(|r| compiled.rules[r].policy),
            Some(policies[1].id)
        );
        assert_eq!(
            m.classify(&udp(80)).map(|r| compiled.rules[r].policy),
            Some(policies[0].id)
        );
    }

    #[test]
    fn catalog_classes_match_their_applications_and_report_the_policy() {
        let policies = vec![
            policy(1, 100, AppClass::VOIP, MatchRules::default()),
            policy(
                2,
                90,
                AppClass::DNS,
                MatchRules {
                    dst_prefixes: vec!["10.2.0.0/16".parse().unwrap()],
                    ..MatchRules::default()
                },
            ),
            policy(3, 80, AppClass::WEB, MatchRules::default()),
            policy(4, 70, AppClass::BACKUP, MatchRules::default()),
        ];
        let compiled = compile(&policies).unwrap();
        // VoIP: UDP + TCP signatures → two rules, one class.
        assert_eq!(compiled.rules.len(), 2 + 2 + 2 + 1);
        assert_eq!(compiled.classes.len(), 4);
        let m = Matcher::new(&compiled);
        let policy_of =
            |packet: PacketFields| m.classify(&packet).map(|r| compiled.rules[r].policy);
        let tcp = |port: u16| PacketFields {
            protocol: 6,
            ..udp(port)
        };
        assert_eq!(policy_of(udp(5060)), Some(policies[0].id), "SIP");
        assert_eq!(policy_of(tcp(5061)), Some(policies[0].id), "SIP over TLS");
        assert_eq!(policy_of(udp(20000)), Some(policies[0].id), "RTP");
        assert_eq!(policy_of(udp(53)), Some(policies[1].id), "DNS to 10.2/16");
        assert_eq!(policy_of(tcp(853)), Some(policies[1].id), "DoT to 10.2/16");
        let elsewhere = PacketFields {
            dst: "10.3.0.10".parse().unwrap(),
            ..udp(53)
        };
        assert_eq!(
            policy_of(elsewhere),
            None,
            "the policy's prefix still applies"
        );
        assert_eq!(policy_of(tcp(443)), Some(policies[2].id), "HTTPS");
        assert_eq!(policy_of(udp(443)), Some(policies[2].id), "QUIC");
        assert_eq!(policy_of(tcp(6161)), Some(policies[3].id), "Veeam");
        assert_eq!(policy_of(tcp(5432)), None, "nothing in the catalog");
        assert_eq!(policy_of(udp(80)), None, "web is TCP on 80");
    }

    #[test]
    fn too_many_rules_is_an_error_not_a_truncation() {
        let policies: Vec<RoutingPolicy> = (0..1001)
            .map(|n| policy(n, 1, "erp", MatchRules::default()))
            .collect();
        assert_eq!(compile(&policies), Err(CompileError::TooManyRules(1001)));
    }

    fn arb_rules() -> impl Strategy<Value = MatchRules> {
        let prefix = prop_oneof![
            (0u8..4, 0u8..=32).prop_map(|(b, len)| IpNet::new(IpAddr::from([10, b, 0, 0]), len)
                .unwrap()
                .trunc()),
            (0u8..=64).prop_map(|len| IpNet::new("fd00::".parse().unwrap(), len).unwrap().trunc()),
        ];
        let range = (0u16..8, 0u16..8).prop_map(|(a, b)| PortRange {
            start: a.min(b) * 1000,
            end: a.max(b) * 1000 + 5,
        });
        (
            proptest::collection::vec(prefix.clone(), 0..3),
            proptest::collection::vec(prefix, 0..3),
            proptest::option::of(prop_oneof![
                Just(Protocol::Tcp),
                Just(Protocol::Udp),
                Just(Protocol::Icmp)
            ]),
            proptest::collection::vec(range.clone(), 0..3),
            proptest::collection::vec(range, 0..3),
            proptest::option::of(0u8..4),
        )
            .prop_map(
                |(src_prefixes, dst_prefixes, protocol, src_ports, dst_ports, dscp)| MatchRules {
                    src_prefixes,
                    dst_prefixes,
                    protocol,
                    src_ports,
                    dst_ports,
                    dscp,
                },
            )
    }

    fn arb_packet() -> impl Strategy<Value = PacketFields> {
        let addr = prop_oneof![
            (0u8..4, any::<u8>(), any::<u8>()).prop_map(|(b, c, d)| IpAddr::from([10, b, c, d])),
            any::<u16>().prop_map(|x| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, x])),
        ];
        (
            addr.clone(),
            addr,
            prop_oneof![Just(6u8), Just(17u8), Just(1u8)],
            0u16..8100,
            0u16..8100,
            0u8..4,
        )
            .prop_map(
                |(src, dst, protocol, src_port, dst_port, dscp)| PacketFields {
                    src,
                    dst,
                    protocol,
                    src_port,
                    dst_port,
                    dscp,
                },
            )
    }

    proptest! {
        /// The compiled tables find the same policy as scanning the policies in order.
        #[test]
        fn compiled_matches_the_reference(
            rules in proptest::collection::vec((0u16..5, arb_rules()), 1..12),
            packets in proptest::collection::vec(arb_packet(), 1..40),
        ) {
            let policies: Vec<RoutingPolicy> = rules
                .into_iter()
                .enumerate()
                .map(|(i, (priority, r))| {
                    // Operator classes and catalog ones (which expand when the rules leave
                    // protocol and ports open).
                    let class = ["a", "b", AppClass::VOIP, AppClass::WEB, AppClass::FILE_TRANSFER][i % 5];
                    policy(i as u128 + 1, priority, class, r)
                })
                .collect();
            let compiled = compile(&policies).unwrap();
            let m = Matcher::new(&compiled);
            for packet in packets {
                let got = m.classify(&packet).map(|r| compiled.rules[r].policy);
                prop_assert_eq!(got, reference_match(&policies, &packet), "{:?}", packet);
            }
        }
    }
}
