//! The routing-policy form (pure): form fields → the API's policy body, a stored policy →
//! form fields, and the API's validation messages → the form field they are about, so the
//! portal shows each error beside its field.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::policies::{PolicyBody, PolicyKind};

/// Path preferences the form offers (the `kind` tags of `PathPreference`), with labels.
pub const PREFERENCES: &[(&str, &str)] = &[
    ("lowest_latency", "lowest latency"),
    ("lowest_jitter", "lowest jitter"),
    ("lowest_loss", "lowest loss"),
    ("highest_bandwidth", "highest bandwidth"),
    ("lowest_cost", "lowest cost"),
    ("prefer_uplink", "prefer an uplink"),
];

/// Load-balancing modes (the `LoadBalancing` tags), with labels.
pub const BALANCING: &[(&str, &str)] = &[
    ("flow_hash", "flow hash"),
    ("weighted_bandwidth", "weighted by bandwidth"),
    ("round_robin", "round robin of new flows"),
    ("least_flows", "least active flows"),
    ("active_backup", "active/backup"),
];

pub const PROTOCOLS: &[&str] = &["", "tcp", "udp", "icmp", "icmpv6"];

/// The routing-policy form as submitted (every field text, as browsers send them).
#[derive(Deserialize, Default, Clone, Debug)]
#[serde(default)]
pub struct RoutingForm {
    pub csrf: String,
    pub name: String,
    pub priority: String,
    /// A checkbox: present ("on") when checked.
    pub enabled: Option<String>,
    pub app_class: String,
    pub protocol: String,
    pub dst_ports: String,
    pub src_ports: String,
    pub dst_prefixes: String,
    pub src_prefixes: String,
    pub dscp: String,
    pub path_preference: String,
    pub prefer_uplink: String,
    pub load_balancing: String,
    pub max_latency_ms: String,
    pub max_jitter_ms: String,
    pub max_loss_pct: String,
    pub probe_interval_ms: String,
}

/// Errors by form field name.
pub type FieldErrors = BTreeMap<String, String>;

fn list(text: &str) -> impl Iterator<Item = &str> {
    text.split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// `"80, 443, 16384-32767"` → port ranges.
pub fn parse_ports(text: &str) -> Result<Vec<Value>, String> {
    list(text)
        .map(|item| {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let port = |p: &str| {
                p.trim().parse::<u16>().map_err(|_| {
                    format!("{item:?} is not a port (0-65535) or a range like 10000-20000")
                })
            };
            Ok(json!({ "start": port(a)?, "end": port(b)? }))
        })
        .collect()
}

fn parse_prefixes(text: &str) -> Result<Vec<Value>, String> {
    list(text)
        .map(|item| {
            item.parse::<IpNet>()
                .map(|n| Value::String(n.to_string()))
                .map_err(|_| format!("{item:?} is not a prefix like 10.20.0.0/24 or fd00::/64"))
        })
        .collect()
}

fn optional_number(text: &str, what: &str) -> Result<Option<Value>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let number: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of {what}"))?;
    Ok(Some(json!(number)))
}

fn optional_integer(text: &str, what: &str) -> Result<Option<Value>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let number: u64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number of {what}"))?;
    Ok(Some(json!(number)))
}

/// The API body of a submitted routing-policy form, or the errors of the fields that do not
/// even parse (the API checks the rest).
pub fn to_body(form: &RoutingForm) -> Result<PolicyBody, FieldErrors> {
    let mut errors = FieldErrors::new();
    let mut note = |field: &str, result: Result<Option<Value>, String>| -> Option<Value> {
        result
            .map_err(|e| {
                errors.insert(field.to_owned(), e);
            })
            .ok()
            .flatten()
    };
    let priority = note(
        "priority",
        optional_integer(&form.priority, "priority (0-65535)"),
    )
    .and_then(|v| v.as_u64())
    .unwrap_or(100);
    let mut rules = Map::new();
    for (field, parsed) in [
        ("dst_ports", parse_ports(&form.dst_ports)),
        ("src_ports", parse_ports(&form.src_ports)),
        ("dst_prefixes", parse_prefixes(&form.dst_prefixes)),
        ("src_prefixes", parse_prefixes(&form.src_prefixes)),
    ] {
        if let Some(Value::Array(items)) = note(field, parsed.map(|v| Some(Value::Array(v)))) {
            if !items.is_empty() {
                rules.insert(field.to_owned(), Value::Array(items));
            }
        }
    }
    if !form.protocol.trim().is_empty() {
        rules.insert("protocol".into(), json!(form.protocol.trim()));
    }
    if let Some(dscp) = note("dscp", optional_integer(&form.dscp, "DSCP (0-63)")) {
        rules.insert("dscp".into(), dscp);
    }
    let mut sla = Map::new();
    for (field, what) in [
        ("max_latency_ms", "milliseconds"),
        ("max_jitter_ms", "milliseconds"),
        ("max_loss_pct", "percent"),
    ] {
        let text = match field {
            "max_latency_ms" => &form.max_latency_ms,
            "max_jitter_ms" => &form.max_jitter_ms,
            _ => &form.max_loss_pct,
        };
        if let Some(v) = note(field, optional_number(text, what)) {
            sla.insert(field.to_owned(), v);
        }
    }
    let preference = if form.path_preference == "prefer_uplink" {
        json!({ "kind": "prefer_uplink", "uplink": form.prefer_uplink.trim() })
    } else {
        json!({ "kind": form.path_preference.trim() })
    };
    let probe = note(
        "probe_interval_ms",
        optional_integer(&form.probe_interval_ms, "milliseconds"),
    );
    if priority > u64::from(u16::MAX) {
        errors.insert("priority".into(), "priority is 0-65535".into());
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut spec = Map::new();
    spec.insert("match".into(), Value::Object(rules));
    spec.insert("app_class".into(), json!(form.app_class.trim()));
    spec.insert("path_preference".into(), preference);
    if !form.load_balancing.trim().is_empty() {
        spec.insert("load_balancing".into(), json!(form.load_balancing.trim()));
    }
    if !sla.is_empty() {
        spec.insert("sla".into(), Value::Object(sla));
    }
    if let Some(probe) = probe {
        spec.insert("probe_interval_ms".into(), probe);
    }
    Ok(PolicyBody {
        name: form.name.trim().to_owned(),
        kind: PolicyKind::Routing,
        priority: u16::try_from(priority).unwrap_or(u16::MAX),
        enabled: form.enabled.is_some(),
        site_ids: None,
        spec: Value::Object(spec),
    })
}

fn ports_text(value: Option<&Value>) -> String {
    value
        .and_then(Value::as_array)
        .map(|ranges| {
            ranges
                .iter()
                .filter_map(|r| Some((r.get("start")?.as_u64()?, r.get("end")?.as_u64()?)))
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn strings_text(value: Option<&Value>) -> String {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn number_text(value: Option<&Value>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// A stored routing policy as form fields (for editing).
pub fn from_stored(name: &str, priority: i32, enabled: bool, spec: &Value) -> RoutingForm {
    let rules = spec.get("match");
    let rule = |key: &str| rules.and_then(|r| r.get(key));
    let sla = |key: &str| spec.get("sla").and_then(|s| s.get(key));
    RoutingForm {
        csrf: String::new(),
        name: name.to_owned(),
        priority: priority.to_string(),
        enabled: enabled.then(|| "on".to_owned()),
        app_class: spec
            .get("app_class")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        protocol: rule("protocol")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        dst_ports: ports_text(rule("dst_ports")),
        src_ports: ports_text(rule("src_ports")),
        dst_prefixes: strings_text(rule("dst_prefixes")),
        src_prefixes: strings_text(rule("src_prefixes")),
        dscp: number_text(rule("dscp")),
        path_preference: spec
            .get("path_preference")
            .and_then(|p| p.get("kind"))
            .and_then(Value::as_str)
            .unwrap_or("lowest_latency")
            .to_owned(),
        prefer_uplink: spec
            .get("path_preference")
            .and_then(|p| p.get("uplink"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        load_balancing: spec
            .get("load_balancing")
            .and_then(Value::as_str)
            .unwrap_or("flow_hash")
            .to_owned(),
        max_latency_ms: number_text(sla("max_latency_ms")),
        max_jitter_ms: number_text(sla("max_jitter_ms")),
        max_loss_pct: number_text(sla("max_loss_pct")),
        probe_interval_ms: number_text(spec.get("probe_interval_ms")),
    }
}

/// The form field an API validation message is about (`spec.match.dst_ports[0]: ...` →
/// `dst_ports`), or `None` for a message about the whole policy.
pub fn field_of(detail: &str) -> Option<&'static str> {
    let path = detail.split(':').next().unwrap_or_default().trim();
    const FIELDS: &[(&str, &str)] = &[
        ("spec.match.dst_ports", "dst_ports"),
        ("spec.match.src_ports", "src_ports"),
        ("spec.match.dst_prefixes", "dst_prefixes"),
        ("spec.match.src_prefixes", "src_prefixes"),
        ("spec.match.dscp", "dscp"),
        ("spec.match.protocol", "protocol"),
        ("spec.match", "dst_prefixes"),
        ("spec.app_class", "app_class"),
        ("spec.path_preference.uplink", "prefer_uplink"),
        ("spec.path_preference", "path_preference"),
        ("spec.load_balancing", "load_balancing"),
        ("spec.sla.max_latency_ms", "max_latency_ms"),
        ("spec.sla.max_jitter_ms", "max_jitter_ms"),
        ("spec.sla.max_loss_pct", "max_loss_pct"),
        ("spec.probe_interval_ms", "probe_interval_ms"),
        ("spec.name", "name"),
        ("name", "name"),
        ("priority", "priority"),
    ];
    FIELDS
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix))
        .map(|(_, field)| *field)
        .or_else(|| {
            // serde's messages name the field in backquotes: "spec: unknown variant `x`,
            // expected one of ..." for the preference or balancing mode.
            (detail.contains("variant") && detail.contains("lowest_latency"))
                .then_some("path_preference")
                .or_else(|| {
                    (detail.contains("variant") && detail.contains("flow_hash"))
                        .then_some("load_balancing")
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voip_form() -> RoutingForm {
        RoutingForm {
            name: "VoIP".into(),
            priority: "200".into(),
            enabled: Some("on".into()),
            app_class: "voip".into(),
            protocol: "udp".into(),
            dst_ports: "5060-5061, 16384-32767".into(),
            dst_prefixes: "10.2.0.0/16".into(),
            path_preference: "lowest_latency".into(),
            load_balancing: "active_backup".into(),
            max_loss_pct: "1".into(),
            probe_interval_ms: "50".into(),
            ..RoutingForm::default()
        }
    }

    #[test]
    fn a_form_becomes_a_policy_the_api_accepts_and_comes_back_the_same() {
        let body = to_body(&voip_form()).expect("parses");
        assert_eq!((body.priority, body.enabled), (200, true));
        let compiled = crate::api::policies::compile(
            uuid::Uuid::nil(),
            &body.name,
            body.kind,
            body.priority,
            body.enabled,
            &body.spec,
        );
        assert!(compiled.is_ok(), "{:?}", compiled.err());
        let back = from_stored(&body.name, 200, true, &body.spec);
        assert_eq!(back.dst_ports, "5060-5061, 16384-32767");
        assert_eq!(back.dst_prefixes, "10.2.0.0/16");
        assert_eq!(back.max_loss_pct, "1.0");
        assert_eq!(back.probe_interval_ms, "50");
        assert_eq!(back.load_balancing, "active_backup");
        assert_eq!(to_body(&back).expect("round trip").spec, body.spec);
    }

    #[test]
    fn unparsable_fields_are_named() {
        let form = RoutingForm {
            dst_ports: "5060, http".into(),
            dst_prefixes: "10.2.0.0/33".into(),
            max_latency_ms: "fast".into(),
            ..voip_form()
        };
        let errors = to_body(&form).expect_err("bad fields");
        assert_eq!(
            errors.keys().map(String::as_str).collect::<Vec<_>>(),
            ["dst_ports", "dst_prefixes", "max_latency_ms"]
        );
        assert!(errors["dst_ports"].contains("\"http\""));
    }

    #[test]
    fn api_messages_land_on_their_field() {
        assert_eq!(
            field_of("spec.match.dst_ports[0]: start 9 is above end 1"),
            Some("dst_ports")
        );
        assert_eq!(
            field_of("spec.probe_interval_ms: 5 ms is outside 10-60000 ms"),
            Some("probe_interval_ms")
        );
        assert_eq!(
            field_of("spec.app_class: application class \"X\" must be ..."),
            Some("app_class")
        );
        assert_eq!(
            field_of("name must be 1-128 printable characters"),
            Some("name")
        );
        assert_eq!(field_of("something about the whole thing"), None);
    }
}
