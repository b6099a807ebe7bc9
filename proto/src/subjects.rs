//! Every NATS subject, stream and KV key Patronus uses, built from typed ids.
//!
//! | subject / key                         | direction          | content              |
//! |---------------------------------------|--------------------|----------------------|
//! | KV `intents`, key `<tenant>.<site>`   | controller → edge  | [`crate::SiteIntent`]|
//! | `sdwan.<tenant>.<site>.metrics`       | edge → controller  | [`crate::metrics::PathMetricsBatch`] (stream `METRICS`) |
//! | `sdwan.<tenant>.<site>.events`        | edge → controller  | [`crate::events::EventEnvelope`] |
//! | `sdwan.<tenant>.<site>.flows`         | edge → controller  | [`crate::flows::FlowReport`] |
//! | `sdwan.<tenant>.<site>.cmd`           | controller → edge  | [`crate::command::CommandRequest`] (request/reply) |
//!
//! Tenant and site ids are UUIDs, which contain no `.`, `*`, `>` or whitespace, so a subject
//! built here always has exactly the tokens above, and per-site NATS permissions can be
//! written as exact subjects.

use std::fmt;

use crate::ids::{SiteId, TenantId};

pub const SUBJECT_ROOT: &str = "sdwan";
/// JetStream KV bucket holding the last intent of every site.
pub const INTENTS_BUCKET: &str = "intents";
/// JetStream stream capturing every site's metrics subject.
pub const METRICS_STREAM: &str = "METRICS";

/// The per-site channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    Metrics,
    Events,
    Flows,
    Cmd,
}

impl Channel {
    pub const ALL: [Channel; 4] = [
        Channel::Metrics,
        Channel::Events,
        Channel::Flows,
        Channel::Cmd,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Metrics => "metrics",
            Channel::Events => "events",
            Channel::Flows => "flows",
            Channel::Cmd => "cmd",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        Channel::ALL.into_iter().find(|c| c.as_str() == token)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sdwan.<tenant>.<site>.<channel>`
pub fn site_subject(tenant: TenantId, site: SiteId, channel: Channel) -> String {
    format!("{SUBJECT_ROOT}.{tenant}.{site}.{channel}")
}

pub fn metrics_subject(tenant: TenantId, site: SiteId) -> String {
    site_subject(tenant, site, Channel::Metrics)
}

pub fn events_subject(tenant: TenantId, site: SiteId) -> String {
    site_subject(tenant, site, Channel::Events)
}

pub fn flows_subject(tenant: TenantId, site: SiteId) -> String {
    site_subject(tenant, site, Channel::Flows)
}

pub fn cmd_subject(tenant: TenantId, site: SiteId) -> String {
    site_subject(tenant, site, Channel::Cmd)
}

/// `sdwan.<tenant>.*.<channel>`: one channel of every site of a tenant.
pub fn tenant_wildcard(tenant: TenantId, channel: Channel) -> String {
    format!("{SUBJECT_ROOT}.{tenant}.*.{channel}")
}

/// `sdwan.*.*.<channel>`: one channel of every site of every tenant (controller only).
pub fn all_sites_wildcard(channel: Channel) -> String {
    format!("{SUBJECT_ROOT}.*.*.{channel}")
}

/// Key of a site's intent in the `intents` bucket: `<tenant>.<site>`.
pub fn intent_key(tenant: TenantId, site: SiteId) -> String {
    format!("{tenant}.{site}")
}

/// The subject JetStream stores that key under (what NATS permissions must name).
pub fn intent_kv_subject(tenant: TenantId, site: SiteId) -> String {
    format!("$KV.{INTENTS_BUCKET}.{}", intent_key(tenant, site))
}

/// JetStream's direct-get subject for the last value of one intent key. Edges read their
/// intent with a request here (the stream allows direct gets), which needs no consumer and so
/// can be permitted for exactly one key.
pub fn intent_direct_get_subject(tenant: TenantId, site: SiteId) -> String {
    format!(
        "$JS.API.DIRECT.GET.KV_{INTENTS_BUCKET}.{}",
        intent_kv_subject(tenant, site)
    )
}

/// Inbox prefix an edge connection uses, so its reply subjects can be permitted per site.
pub fn edge_inbox_prefix(site: SiteId) -> String {
    format!("_INBOX.{site}")
}

/// Exactly what one site's NATS user may do. Everything else is denied by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgePermissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The per-site grant: publish its metrics, events and flows and ask for its own intent;
/// subscribe to its commands, its intent key's updates and its own inbox.
pub fn edge_permissions(tenant: TenantId, site: SiteId) -> EdgePermissions {
    EdgePermissions {
        publish: vec![
            metrics_subject(tenant, site),
            events_subject(tenant, site),
            flows_subject(tenant, site),
            intent_direct_get_subject(tenant, site),
        ],
        subscribe: vec![
            cmd_subject(tenant, site),
            intent_kv_subject(tenant, site),
            format!("{}.>", edge_inbox_prefix(site)),
        ],
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject {0:?} is not sdwan.<tenant>.<site>.<channel>")]
    Shape(String),
    #[error("subject {subject:?} has an invalid {what} id")]
    BadId { subject: String, what: &'static str },
    #[error("subject {0:?} names an unknown channel")]
    UnknownChannel(String),
}

fn parse_ids(subject: &str, tenant: &str, site: &str) -> Result<(TenantId, SiteId), SubjectError> {
    let tenant = tenant.parse().map_err(|_| SubjectError::BadId {
        subject: subject.to_owned(),
        what: "tenant",
    })?;
    let site = site.parse().map_err(|_| SubjectError::BadId {
        subject: subject.to_owned(),
        what: "site",
    })?;
    Ok((tenant, site))
}

/// Parse `sdwan.<tenant>.<site>.<channel>` back into its parts.
pub fn parse_site_subject(subject: &str) -> Result<(TenantId, SiteId, Channel), SubjectError> {
    let mut tokens = subject.split('.');
    let (Some(SUBJECT_ROOT), Some(tenant), Some(site), Some(channel), None) = (
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
    ) else {
        return Err(SubjectError::Shape(subject.to_owned()));
    };
    let (tenant, site) = parse_ids(subject, tenant, site)?;
    let channel =
        Channel::parse(channel).ok_or_else(|| SubjectError::UnknownChannel(subject.to_owned()))?;
    Ok((tenant, site, channel))
}

/// Parse an intent key `<tenant>.<site>`.
pub fn parse_intent_key(key: &str) -> Result<(TenantId, SiteId), SubjectError> {
    let Some((tenant, site)) = key.split_once('.') else {
        return Err(SubjectError::Shape(key.to_owned()));
    };
    parse_ids(key, tenant, site)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn ids() -> (TenantId, SiteId) {
        (TenantId(Uuid::from_u128(1)), SiteId(Uuid::from_u128(2)))
    }

    #[test]
    fn subjects_have_the_documented_shape() {
        let (t, s) = ids();
        assert_eq!(
            metrics_subject(t, s),
            "sdwan.00000000-0000-0000-0000-000000000001.00000000-0000-0000-0000-000000000002.metrics"
        );
        assert!(events_subject(t, s).ends_with(".events"));
        assert!(flows_subject(t, s).ends_with(".flows"));
        assert!(cmd_subject(t, s).ends_with(".cmd"));
        assert_eq!(
            intent_key(t, s),
            "00000000-0000-0000-0000-000000000001.00000000-0000-0000-0000-000000000002"
        );
        assert!(intent_kv_subject(t, s).starts_with("$KV.intents.00000000"));
        assert_eq!(all_sites_wildcard(Channel::Metrics), "sdwan.*.*.metrics");
        assert_eq!(tenant_wildcard(t, Channel::Events).matches('.').count(), 3);
        assert_eq!(
            intent_direct_get_subject(t, s),
            format!("$JS.API.DIRECT.GET.KV_intents.$KV.intents.{t}.{s}")
        );
    }

    #[test]
    fn edge_permissions_name_only_its_own_subjects_and_no_wildcard_but_its_inbox() {
        let (t, s) = ids();
        let grant = edge_permissions(t, s);
        for subject in grant.publish.iter().chain(&grant.subscribe) {
            assert!(
                subject.contains(&s.to_string()),
                "{subject} is not scoped to the site"
            );
            let wildcard = subject.split('.').any(|tok| tok == "*" || tok == ">");
            assert_eq!(wildcard, subject.starts_with("_INBOX."), "{subject}");
        }
        assert!(!grant.publish.contains(&cmd_subject(t, s)));
    }

    #[test]
    fn subjects_parse_back() {
        let (t, s) = ids();
        for channel in Channel::ALL {
            assert_eq!(
                parse_site_subject(&site_subject(t, s, channel)).unwrap(),
                (t, s, channel)
            );
        }
        assert_eq!(parse_intent_key(&intent_key(t, s)).unwrap(), (t, s));
    }

    #[test]
    fn malformed_subjects_are_refused() {
        let (t, s) = ids();
        assert!(matches!(
            parse_site_subject("sdwan.a.b"),
            Err(SubjectError::Shape(_))
        ));
        assert!(matches!(
            parse_site_subject(&format!("{}.extra", metrics_subject(t, s))),
            Err(SubjectError::Shape(_))
        ));
        assert!(matches!(
            parse_site_subject(&format!("sdwan.x.{s}.metrics")),
            Err(SubjectError::BadId { what: "tenant", .. })
        ));
        assert!(matches!(
            parse_site_subject(&format!("sdwan.{t}.{s}.bogus")),
            Err(SubjectError::UnknownChannel(_))
        ));
        assert!(parse_intent_key("nodot").is_err());
        assert!(parse_intent_key("a.b").is_err());
    }
}
