//! Events (seed: `SdwanEvent`). Edges publish them on `sdwan.<tenant>.<site>.events`; the
//! controller adds its own (site joined, topology changed) and forwards all of them, filtered
//! by tenant, to WebSocket clients on `/ws/sdwan`.

use serde::{Deserialize, Serialize};

use crate::codec::{Message, SchemaVersion, ValidationError};
use crate::ids::{FlowId, PathId, PolicyId, SiteId, TenantId};
use crate::metrics::PathMetrics;

/// Longest free-text `reason` an event may carry.
pub const MAX_REASON_LEN: usize = 1024;

/// Lifecycle state of a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteStatus {
    /// Created, not yet enrolled.
    Pending,
    Active,
    Inactive,
    Degraded,
    Revoked,
    #[serde(other)]
    Unknown,
}

/// What changed in a tenant's topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyChange {
    SiteAdded,
    SiteRemoved,
    PeeringChanged,
    ModeChanged,
    Optimized,
    #[serde(other)]
    Other,
}

/// Whether the data plane steers with eBPF or only with routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataplaneMode {
    Ebpf,
    RoutesOnly,
    #[serde(other)]
    Unknown,
}

/// Every event of the seed design, plus the edge's intent and liveness reports.
/// A kind added by a newer peer decodes as [`SdwanEvent::Unknown`] instead of failing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SdwanEvent {
    SiteJoined {
        site: SiteId,
        site_name: String,
    },
    SiteLeft {
        site: SiteId,
    },
    SiteStatusChanged {
        site: SiteId,
        status: SiteStatus,
    },
    PathEstablished {
        path: PathId,
        src: SiteId,
        dst: SiteId,
    },
    PathFailed {
        path: PathId,
        reason: String,
    },
    PathDegraded {
        path: PathId,
        metrics: PathMetrics,
    },
    FailoverTriggered {
        from_path: PathId,
        to_path: PathId,
        reason: String,
    },
    PolicyApplied {
        flow: FlowId,
        policy: PolicyId,
        path: PathId,
    },
    PathMetrics {
        path: PathId,
        metrics: PathMetrics,
    },
    TopologyChanged {
        change: TopologyChange,
    },
    /// The edge applied this intent revision.
    IntentApplied {
        revision: u64,
    },
    /// The edge refused this intent revision and kept the previous one.
    IntentRejected {
        revision: u64,
        reason: String,
    },
    /// Periodic liveness and summary of an edge.
    Heartbeat {
        applied_revision: u64,
        uptime_s: u64,
        tunnels_up: u32,
        paths_up: u32,
        paths_total: u32,
        dataplane: DataplaneMode,
    },
    #[serde(other)]
    Unknown,
}

/// An event with where and when it happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub schema_version: SchemaVersion,
    pub tenant: TenantId,
    /// The site it concerns or came from; none for tenant-wide controller events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteId>,
    pub at_unix_ms: u64,
    pub event: SdwanEvent,
}

impl Message for EventEnvelope {
    const KIND: &'static str = "event";

    fn validate(&self) -> Result<(), ValidationError> {
        let reason = match &self.event {
            SdwanEvent::PathFailed { reason, .. }
            | SdwanEvent::FailoverTriggered { reason, .. }
            | SdwanEvent::IntentRejected { reason, .. } => Some(reason),
            SdwanEvent::SiteJoined { site_name, .. } => Some(site_name),
            _ => None,
        };
        if let Some(text) = reason {
            if text.len() > MAX_REASON_LEN {
                return Err(ValidationError::new(
                    "event",
                    format!("text of {} bytes, at most {MAX_REASON_LEN}", text.len()),
                ));
            }
        }
        match &self.event {
            SdwanEvent::PathDegraded { metrics, .. } | SdwanEvent::PathMetrics { metrics, .. } => {
                metrics.validate("event.metrics")
            }
            _ => Ok(()),
        }
    }
}
