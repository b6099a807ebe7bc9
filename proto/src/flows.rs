//! Flow records an edge reports on `sdwan.<tenant>.<site>.flows`: its top flows with the path
//! the data plane chose and their byte counts (seed: `sdwan_flows`, `FlowState`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::codec::{Message, SchemaVersion, ValidationError};
use crate::ids::{PathId, PolicyId, SiteId, TenantId};
use crate::policy::AppClass;

/// Most flows one report may carry.
pub const MAX_FLOWS_PER_REPORT: usize = 10_000;

/// A flow's 5-tuple (seed: `FlowKey`). `protocol` is the IANA number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowKey {
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
}

/// One flow as the data plane's flow table saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub key: FlowKey,
    pub app_class: AppClass,
    /// The routing policy that classified it, if any (none: default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyId>,
    /// The path carrying it now; none when it goes by the default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathId>,
    pub started_at_unix_ms: u64,
    pub last_packet_at_unix_ms: u64,
    pub bytes_tx: u64,
    pub bytes_rx: u64,
    pub packets_tx: u64,
    pub packets_rx: u64,
}

/// A batch of flow records from one site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowReport {
    pub schema_version: SchemaVersion,
    pub tenant: TenantId,
    pub site: SiteId,
    pub sent_at_unix_ms: u64,
    pub flows: Vec<FlowRecord>,
}

impl Message for FlowReport {
    const KIND: &'static str = "flow_report";

    fn validate(&self) -> Result<(), ValidationError> {
        if self.flows.len() > MAX_FLOWS_PER_REPORT {
            return Err(ValidationError::new(
                "flows",
                format!(
                    "{} flows, at most {MAX_FLOWS_PER_REPORT} per report",
                    self.flows.len()
                ),
            ));
        }
        for (i, flow) in self.flows.iter().enumerate() {
            flow.app_class.validate(&format!("flows[{i}].app_class"))?;
            if flow.last_packet_at_unix_ms < flow.started_at_unix_ms {
                return Err(ValidationError::new(
                    format!("flows[{i}].last_packet_at_unix_ms"),
                    "last packet is before the flow started",
                ));
            }
            if flow.key.src_ip.is_ipv4() != flow.key.dst_ip.is_ipv4() {
                return Err(ValidationError::new(
                    format!("flows[{i}].key"),
                    "source and destination are of different address families",
                ));
            }
        }
        Ok(())
    }
}
