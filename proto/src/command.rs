//! Controller → edge requests on `sdwan.<tenant>.<site>.cmd` (NATS request/reply) and the
//! edge's replies: an on-demand path test, a re-probe, a state dump.

use serde::{Deserialize, Serialize};

use crate::codec::{Message, SchemaVersion, ValidationError};
use crate::ids::PathId;
use crate::metrics::PathMetrics;

/// Longest on-demand bandwidth test the edge accepts.
pub const MAX_PATH_TEST_SECONDS: u32 = 60;

/// The most a path test adds to its duration before it starts: connecting through the tunnel
/// and waiting for its turn at the peer's sink (one test at a time there).
pub const PATH_TEST_SETUP_SECONDS: u32 = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Measure one path now, including an active bandwidth test of `duration_s`.
    PathTest { path: PathId, duration_s: u32 },
    /// Restart probing (clears history) on one path or, with none, all paths.
    Reprobe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathId>,
    },
    /// Reply with the agent's view: applied revision, tunnels, paths.
    DumpState,
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandRequest {
    pub schema_version: SchemaVersion,
    /// Correlates the reply in logs and the audit trail.
    pub request_id: String,
    pub command: Command,
}

impl Message for CommandRequest {
    const KIND: &'static str = "command_request";

    fn validate(&self) -> Result<(), ValidationError> {
        if self.request_id.is_empty() || self.request_id.len() > 128 {
            return Err(ValidationError::new("request_id", "must be 1-128 bytes"));
        }
        match &self.command {
            Command::PathTest { duration_s, .. }
                if *duration_s == 0 || *duration_s > MAX_PATH_TEST_SECONDS =>
            {
                Err(ValidationError::new(
                    "command.duration_s",
                    format!("must be 1-{MAX_PATH_TEST_SECONDS} seconds"),
                ))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandResult {
    PathTest {
        path: PathId,
        metrics: PathMetrics,
    },
    Accepted,
    State {
        applied_revision: u64,
        /// Free-form JSON dump of the agent's state, for people.
        state: serde_json::Value,
    },
    /// The edge could not do it; `error` says why.
    Failed {
        error: String,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    pub schema_version: SchemaVersion,
    pub request_id: String,
    pub result: CommandResult,
}

impl Message for CommandReply {
    const KIND: &'static str = "command_reply";
}
