//! Intents: compile each site's desired state from the database and publish it to the
//! JetStream KV bucket `intents`, key `<tenant>.<site>`.
//!
//! - [`compile`]: pure, snapshot in, intents out (tested without I/O).
//! - [`store`]: reads a tenant's snapshot from PostgreSQL (tenant-scoped) and keeps the
//!   `paths` table in step with the topology.
//! - [`publish`]: the KV bucket, revisions from `intent_revision_seq`, and the digest check
//!   that keeps an unchanged intent from being republished.
//! - [`rotation`]: WireGuard key rotations as the database records them (announced,
//!   committed); the phases themselves are pure ([`compile::key_phase`]).
//! - [`service`]: the singleton publisher. Replicas signal changes on a core NATS subject; the
//!   replica holding the Redis lease debounces them per tenant and publishes; if it dies,
//!   another takes the lease within seconds and reconciles everything.

pub mod compile;
pub mod publish;
pub mod rotation;
pub mod service;
pub mod store;
