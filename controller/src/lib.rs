//! `patronus-controller`: the brain an MSP hosts for many tenants.
//!
//! It keeps the truth in PostgreSQL (tenants, sites, paths, policies, metrics), computes each
//! site's [`patronus_proto::SiteIntent`] and publishes it over NATS JetStream, and serves
//! operators over HTTP. Modules:
//!
//! - [`admin`]: first-run bootstrap of an MSP and its admin.
//! - [`api`]: the REST API under `/api/v1` (authentication, tenancy, resources).
//! - [`auth`]: roles, password hashing, secrets and session tokens.
//! - [`config`]: the one typed configuration (TOML file, environment, flags), validated at start.
//! - [`db`]: the PostgreSQL pool, tenant-scoped transactions (row-level security) and the
//!   embedded migrations.
//! - [`edge_events`]: what edges report applying (per-tenant NATS queue subscriptions), for
//!   the intent publisher's key rotations.
//! - [`enrollment`]: enrollment tokens (zero-touch provisioning).
//! - [`events`]: controller events and the WebSocket stream `/ws/sdwan`.
//! - [`flows_ingest`]: edges' flow reports (per-tenant NATS subscriptions) into `flows`.
//! - [`health`]: `/healthz` and `/readyz`.
//! - [`intents`]: compile each site's intent and publish it (singleton, under a Redis lease).
//! - [`lease`]: Redis leases for singleton work shared by replicas.
//! - [`metrics`]: Prometheus text at `/metrics`.
//! - [`metrics_ingest`]: edges' path metrics (a JetStream work queue and a shared durable
//!   consumer per tenant) into `path_metrics`, the paths' status, Redis and the event stream.
//! - [`nats`]: NATS operator mode: account per tenant, JWTs, the controller's connections.
//! - [`pki`]: tenant CAs, CSR checks and site certificates (pure).
//! - [`portal`]: the operator web portal under `/portal` (askama templates from `templates/`,
//!   session cookie, CSRF, strict CSP), built on the API's own functions.
//! - [`server`]: the actix-web application and its lifecycle.
//! - [`topology`]: the pure topology engine (who peers with whom, over which uplinks).

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod db;
pub mod edge_events;
pub mod enrollment;
pub mod events;
pub mod flows_ingest;
pub mod health;
pub mod intents;
pub mod lease;
pub mod metrics;
pub mod metrics_ingest;
pub mod nats;
pub mod pki;
pub mod portal;
pub mod server;
pub mod topology;
