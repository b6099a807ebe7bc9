//! `patronus-proto`: the only contract between the Patronus controller and its edge agents.
//!
//! Everything that crosses the wire between the two lives here, and nothing here does I/O:
//!
//! - [`ids`]: typed identifiers (tenant, site, path, policy) and WireGuard/probe key types.
//! - [`intent`]: [`SiteIntent`], the whole desired state of one site, versioned by a rising
//!   revision, plus its validation.
//! - [`policy`]: routing, QoS, security and cost policies carried inside an intent;
//!   [`catalog`]: what the built-in application classes (VoIP, DNS, web, …) match.
//! - [`metrics`], [`events`], [`flows`]: what an edge reports back.
//! - [`command`]: controller → edge requests on the `.cmd` subject and their replies.
//! - [`enroll`]: the enrollment request and answer (`POST /api/v1/enroll`).
//! - [`edge_auth`]: how an enrolled edge signs its control-plane requests.
//! - [`probe`]: the binary path-probe wire format (versioned, HMAC-signed, nonce-carrying).
//! - [`subjects`]: every NATS subject and KV key, built from typed ids so they cannot be misspelt.
//! - [`codec`]: JSON encoding with a schema version check and a size limit; every decoder
//!   returns a typed error and never panics.
//!
//! Compatibility rule: every JSON message carries `schema_version` (`"major.minor"`). A decoder
//! accepts any minor version of its own major (unknown fields from a newer peer are ignored,
//! unknown event kinds decode to [`events::SdwanEvent::Unknown`]) and refuses another major.

pub mod catalog;
pub mod codec;
pub mod command;
pub mod edge_auth;
pub mod enroll;
pub mod events;
pub mod flows;
pub mod ids;
pub mod intent;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod subjects;

pub use codec::{decode, encode, DecodeError, Message, SchemaVersion, SCHEMA_VERSION};
pub use ids::{PathId, PolicyId, ProbeKey, SiteId, TenantId, WgPublicKey};
pub use intent::SiteIntent;
