//! Path measurements an edge reports on `sdwan.<tenant>.<site>.metrics` (seed: `PathMetrics`).

use serde::{Deserialize, Serialize};

use crate::codec::{Message, SchemaVersion, ValidationError};
use crate::ids::{PathId, SiteId, TenantId};

/// Most samples one batch may carry (20 paths × 60 s of history, with room to spare).
pub const MAX_SAMPLES_PER_BATCH: usize = 4096;

/// State of a path as its edge sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathStatus {
    Up,
    Degraded,
    Down,
    /// Not yet measured, or a state a newer peer knows and we do not.
    #[serde(other)]
    Unknown,
}

/// One measurement of one path (seed: `PathMetrics`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathMetrics {
    /// Round-trip time, milliseconds.
    pub latency_ms: f64,
    /// RFC 3550 interarrival jitter, milliseconds.
    pub jitter_ms: f64,
    /// Loss over the measurement window, percent (0-100).
    pub packet_loss_pct: f64,
    /// Available bandwidth when known, Mbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<f64>,
    /// Path MTU when known, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Quality score 0-100 (seed: `calculate_path_score`).
    pub score: u8,
    /// When the window ended, Unix milliseconds.
    pub measured_at_unix_ms: u64,
}

impl PathMetrics {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let non_negative = |name: &str, v: f64, max: f64| {
            if v.is_finite() && (0.0..=max).contains(&v) {
                Ok(())
            } else {
                Err(ValidationError::new(
                    format!("{field}.{name}"),
                    format!("{v} is outside 0..={max}"),
                ))
            }
        };
        non_negative("latency_ms", self.latency_ms, 3_600_000.0)?;
        non_negative("jitter_ms", self.jitter_ms, 3_600_000.0)?;
        non_negative("packet_loss_pct", self.packet_loss_pct, 100.0)?;
        if let Some(bw) = self.bandwidth_mbps {
            non_negative("bandwidth_mbps", bw, 10_000_000.0)?;
        }
        if self.mtu.is_some_and(|m| m < 68) {
            return Err(ValidationError::new(
                format!("{field}.mtu"),
                "below 68, the smallest IPv4 MTU",
            ));
        }
        if self.score > 100 {
            return Err(ValidationError::new(
                format!("{field}.score"),
                format!("{} is above 100", self.score),
            ));
        }
        Ok(())
    }
}

/// One path's state and latest measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathSample {
    pub path: PathId,
    pub status: PathStatus,
    pub metrics: PathMetrics,
    /// Probes sent and lost in this window (the raw counts behind `packet_loss_pct`).
    #[serde(default)]
    pub probes_sent: u32,
    #[serde(default)]
    pub probes_lost: u32,
}

/// A batch of path samples from one site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathMetricsBatch {
    pub schema_version: SchemaVersion,
    pub tenant: TenantId,
    pub site: SiteId,
    /// Rises by one per batch from one agent process; a gap means batches were lost.
    pub seq: u64,
    pub sent_at_unix_ms: u64,
    pub samples: Vec<PathSample>,
}

impl Message for PathMetricsBatch {
    const KIND: &'static str = "path_metrics_batch";

    fn validate(&self) -> Result<(), ValidationError> {
        if self.samples.len() > MAX_SAMPLES_PER_BATCH {
            return Err(ValidationError::new(
                "samples",
                format!(
                    "{} samples, at most {MAX_SAMPLES_PER_BATCH} per batch",
                    self.samples.len()
                ),
            ));
        }
        for (i, sample) in self.samples.iter().enumerate() {
            sample.metrics.validate(&format!("samples[{i}].metrics"))?;
            if sample.probes_lost > sample.probes_sent {
                return Err(ValidationError::new(
                    format!("samples[{i}].probes_lost"),
                    "more probes lost than sent",
                ));
            }
        }
        Ok(())
    }
}
