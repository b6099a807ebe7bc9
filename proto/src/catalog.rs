//! The built-in application catalog: what the well-known application classes match when a
//! routing policy names the class but not the traffic.
//!
//! An operator who writes "VoIP prefers the fiber" should not have to know that SIP is 5060 and
//! RTP lives in 16384-32767. A routing policy whose class is in the catalog and whose match
//! rules name **no protocol and no destination ports** matches the catalog's signatures for
//! that class instead of everything; its prefixes, source ports and DSCP still apply (so "VoIP
//! to 10.9.0.0/16" is one policy). A policy that names a protocol or destination ports is taken
//! literally, whatever its class: the catalog never overrides what an operator wrote.
//!
//! Port-based identification is a heuristic: traffic on the catalog's ports is classed as the
//! application, and an application on other ports needs an explicit policy. The signatures
//! are the vendors' documented defaults (IANA for SIP/DNS/web/FTP/SMB/rsync; the RTP range of
//! Cisco and most PBXs; Microsoft Teams and Zoom media ports; Veeam, Bacula, NetBackup, NDMP).

use crate::policy::{AppClass, MatchRules, PortRange, Protocol};

/// One signature: a protocol and the destination ports it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature {
    pub protocol: Protocol,
    /// Inclusive `(first, last)` ranges.
    pub dst_ports: &'static [(u16, u16)],
}

/// A catalog entry: a well-known class and its signatures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Application {
    pub class: &'static str,
    pub description: &'static str,
    pub signatures: &'static [Signature],
}

const fn sig(protocol: Protocol, dst_ports: &'static [(u16, u16)]) -> Signature {
    Signature {
        protocol,
        dst_ports,
    }
}

/// Every built-in application, in the order the portal lists them.
pub const CATALOG: &[Application] = &[
    Application {
        class: AppClass::VOIP,
        description: "SIP signalling (5060, 5061 TLS) and RTP media (UDP 16384-32767)",
        signatures: &[
            sig(Protocol::Udp, &[(5060, 5061), (16384, 32767)]),
            sig(Protocol::Tcp, &[(5060, 5061)]),
        ],
    },
    Application {
        class: AppClass::VIDEO_CONFERENCE,
        description: "STUN/TURN and Teams media (UDP 3478-3481), Zoom (UDP 8801-8810), Webex (UDP 9000)",
        signatures: &[sig(
            Protocol::Udp,
            &[(3478, 3481), (8801, 8810), (9000, 9000)],
        )],
    },
    Application {
        class: AppClass::DNS,
        description: "DNS (UDP and TCP 53) and DNS over TLS (TCP 853)",
        signatures: &[
            sig(Protocol::Udp, &[(53, 53)]),
            sig(Protocol::Tcp, &[(53, 53), (853, 853)]),
        ],
    },
    Application {
        class: AppClass::WEB,
        description: "HTTP and HTTPS (TCP 80, 443, 8080, 8443) and QUIC (UDP 443)",
        signatures: &[
            sig(Protocol::Tcp, &[(80, 80), (443, 443), (8080, 8080), (8443, 8443)]),
            sig(Protocol::Udp, &[(443, 443)]),
        ],
    },
    Application {
        class: AppClass::FILE_TRANSFER,
        description: "FTP (TCP 20-21), SSH/SFTP (TCP 22), SMB (TCP 445), rsync (TCP 873), NFS (2049)",
        signatures: &[
            sig(
                Protocol::Tcp,
                &[(20, 22), (445, 445), (873, 873), (2049, 2049)],
            ),
            sig(Protocol::Udp, &[(2049, 2049)]),
        ],
    },
    Application {
        class: AppClass::BACKUP,
        description: "Veeam (TCP 6160-6162, 2500-3300), Bacula (TCP 9101-9103), NetBackup (TCP 1556), NDMP (TCP 10000)",
        signatures: &[sig(
            Protocol::Tcp,
            &[
                (1556, 1556),
                (2500, 3300),
                (6160, 6162),
                (9101, 9103),
                (10000, 10000),
            ],
        )],
    },
];

/// The catalog entry of a class, if it is a built-in one.
pub fn application(class: &AppClass) -> Option<&'static Application> {
    CATALOG.iter().find(|app| app.class == class.0)
}

/// Whether these rules leave the traffic to the catalog (no protocol, no destination ports).
pub fn leaves_traffic_to_catalog(rules: &MatchRules) -> bool {
    rules.protocol.is_none() && rules.dst_ports.is_empty()
}

/// What a policy of `class` with `rules` matches: one set of rules per signature when the
/// catalog fills in the traffic, otherwise the rules as written. A packet matches the policy
/// when it matches any of them.
pub fn effective_rules(class: &AppClass, rules: &MatchRules) -> Vec<MatchRules> {
    match application(class) {
        Some(app) if leaves_traffic_to_catalog(rules) => app
            .signatures
            .iter()
            .map(|signature| MatchRules {
                protocol: Some(signature.protocol),
                dst_ports: signature
                    .dst_ports
                    .iter()
                    .map(|&(start, end)| PortRange { start, end })
                    .collect(),
                ..rules.clone()
            })
            .collect(),
        _ => vec![rules.clone()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signature_is_valid_match_rules() {
        for app in CATALOG {
            assert!(AppClass::new(app.class).validate("class").is_ok());
            for rules in effective_rules(&AppClass::new(app.class), &MatchRules::default()) {
                rules.validate(app.class).unwrap();
                assert!(!rules.dst_ports.is_empty(), "{}", app.class);
            }
        }
    }

    #[test]
    fn catalog_fills_in_only_what_the_operator_left_open() {
        let voip = AppClass::new(AppClass::VOIP);
        let to_hq = MatchRules {
            dst_prefixes: vec!["10.9.0.0/16".parse().unwrap()],
            dscp: Some(46),
            ..MatchRules::default()
        };
        let expanded = effective_rules(&voip, &to_hq);
        assert_eq!(expanded.len(), 2);
        for rules in &expanded {
            assert_eq!(rules.dst_prefixes, to_hq.dst_prefixes);
            assert_eq!(rules.dscp, Some(46));
        }
        assert!(expanded[0].dst_ports.contains(&PortRange {
            start: 16384,
            end: 32767
        }));

        // A protocol or ports written by the operator are taken literally.
        let literal = MatchRules {
            protocol: Some(Protocol::Udp),
            ..MatchRules::default()
        };
        assert_eq!(effective_rules(&voip, &literal), vec![literal.clone()]);
        // Operator-defined classes match what they say (empty: everything).
        let custom = AppClass::new("erp");
        assert_eq!(
            effective_rules(&custom, &MatchRules::default()),
            vec![MatchRules::default()]
        );
        assert!(application(&AppClass::new(AppClass::BEST_EFFORT)).is_none());
    }
}
