//! Path metrics from edges: JetStream → PostgreSQL, Redis and the event stream.
//!
//! Edges publish [`PathMetricsBatch`]es with a plain (core) publish on
//! `sdwan.<tenant>.<site>.metrics` inside their tenant's NATS account; the stream
//! [`METRICS_STREAM`] of that account captures them (edges have no JetStream API permission).
//! The stream is a work queue bounded by age, message count and message size: it holds what the
//! controller has not processed yet, and what is older than [`STREAM_MAX_AGE`] is discarded.
//!
//! Every replica pulls from one durable consumer per tenant ([`CONSUMER_NAME`], explicit acks,
//! `metrics.max_ack_pending` in flight), so replicas split a tenant's batches between them.
//! Messages are gathered for up to `metrics.write_linger_ms` or `metrics.write_batch_samples`
//! samples and written in one transaction in the tenant's RLS scope, up to
//! `metrics.write_concurrency` transactions at once per replica:
//!
//! - a message that does not decode or validate, that comes on another subject, or whose body
//!   names another tenant or site than its subject is terminated (never delivered again),
//!   logged with tenant and site and counted by reason;
//! - samples outside the accepted time window, with impossible values the database would
//!   refuse, or whose path the database does not know as one starting at the reporting site
//!   are dropped and counted; the rest of the batch is stored;
//! - samples go into `path_metrics` with one multi-row `INSERT … ON CONFLICT DO NOTHING`, so a
//!   redelivered batch adds nothing (the `path_metrics_1m` rollup is filled by a trigger from
//!   the rows actually inserted); `paths.status/score` follow each path's newest sample;
//! - a write that fails for a reason the data carries (a constraint) is retried one message at
//!   a time and the guilty message is terminated; any other failure (database unreachable)
//!   hands the messages back with a delay (`metrics.retry_delay_ms`);
//! - after commit and acknowledgement, each path's newest sample goes to the Redis hash
//!   [`state_key`] (newer wins, checked in the script) and, at most once per path per
//!   `metrics.event_interval_ms`, to WebSocket clients as a `path_metrics` event.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream, AckKind};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, Float4, Int2, Int4, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use patronus_proto::codec::{self, DecodeError};
use patronus_proto::events::SdwanEvent;
use patronus_proto::metrics::{PathMetricsBatch, PathSample, PathStatus};
use patronus_proto::subjects::{self, Channel, METRICS_STREAM};
use patronus_proto::{PathId, SiteId, TenantId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::config::MetricsConfig;
use crate::db::{self, Scope};
use crate::server::AppState;

/// The durable pull consumer every replica shares.
pub const CONSUMER_NAME: &str = "controller-metrics";
/// Batches older than this are discarded by the stream.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(3600);
/// Most batches a tenant's stream holds unprocessed; the oldest go first.
pub const STREAM_MAX_MESSAGES: i64 = 100_000;
/// How often tenants without a consumer are looked for.
pub const RESCAN: Duration = Duration::from_secs(30);
/// A sample measured longer ago than this is dropped (its daily partition may not exist).
pub const MAX_SAMPLE_AGE: chrono::TimeDelta = chrono::TimeDelta::hours(24);
/// A sample measured further in the future than this is dropped (the edge's clock is off).
pub const MAX_SAMPLE_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(10);
/// Unacknowledged messages are delivered again after this.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// Messages asked for by one pull request.
const PULL_BATCH: usize = 512;
/// Path entries the event throttle remembers before it forgets the quiet ones.
const THROTTLE_PRUNE_AT: usize = 50_000;

/// Why a consumer could not run.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("NATS link of tenant {tenant}: {detail}")]
    Link { tenant: TenantId, detail: String },
    #[error("the {METRICS_STREAM} stream: {0}")]
    Stream(String),
    #[error("the {CONSUMER_NAME} consumer: {0}")]
    Consumer(String),
}

/// The stream of one tenant's account capturing every site's metrics subject.
pub fn stream_config(tenant: TenantId) -> stream::Config {
    stream::Config {
        name: METRICS_STREAM.to_owned(),
        description: Some("path metrics from every site, until the controller stores them".into()),
        subjects: vec![subjects::tenant_wildcard(tenant, Channel::Metrics)],
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::Old,
        max_age: STREAM_MAX_AGE,
        max_messages: STREAM_MAX_MESSAGES,
        max_message_size: codec::MAX_MESSAGE_BYTES as i32,
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    }
}

/// Create the tenant's metrics stream unless it exists (an existing one is left as it is).
pub async fn ensure_stream(
    js: &jetstream::Context,
    tenant: TenantId,
) -> Result<stream::Stream, IngestError> {
    js.get_or_create_stream(stream_config(tenant))
        .await
        .map_err(|e| IngestError::Stream(e.to_string()))
}

/// The shared durable consumer's settings.
pub fn consumer_config(settings: &MetricsConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER_NAME.to_owned()),
        description: Some("controller replicas storing path metrics".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: settings.max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// A batch refused whole, with the `reason` label it is counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: &'static str,
    /// The site the subject names, when it names one.
    pub site: Option<SiteId>,
    pub detail: String,
}

fn decode_reason(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::Invalid { source, .. } if source.field == "samples" => "too_many_samples",
        other => other.reason(),
    }
}

/// Check one message of `tenant`'s stream: the subject must be a site's metrics subject of this
/// tenant, the payload a valid batch naming the same tenant and site.
pub fn check(
    tenant: TenantId,
    subject: &str,
    payload: &[u8],
) -> Result<(SiteId, PathMetricsBatch), Refused> {
    let (subject_tenant, site) = match subjects::parse_site_subject(subject) {
        Ok((t, s, Channel::Metrics)) => (t, s),
        _ => {
            return Err(Refused {
                reason: "subject",
                site: None,
                detail: format!("{subject:?} is not a site's metrics subject"),
            })
        }
    };
    if subject_tenant != tenant {
        return Err(Refused {
            reason: "wrong_tenant",
            site: Some(site),
            detail: format!("subject names tenant {subject_tenant}"),
        });
    }
    let batch = codec::decode::<PathMetricsBatch>(payload).map_err(|e| Refused {
        reason: decode_reason(&e),
        site: Some(site),
        detail: e.to_string(),
    })?;
    if batch.tenant != tenant {
        return Err(Refused {
            reason: "wrong_tenant",
            site: Some(site),
            detail: format!("the batch names tenant {}", batch.tenant),
        });
    }
    if batch.site != site {
        return Err(Refused {
            reason: "wrong_site",
            site: Some(site),
            detail: format!("the batch names site {}", batch.site),
        });
    }
    Ok((site, batch))
}

/// One sample the database can take.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub site: SiteId,
    pub sample: PathSample,
    pub measured_at: DateTime<Utc>,
}

/// Samples dropped from a batch, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SampleDrops(pub Vec<(&'static str, u64)>);

impl SampleDrops {
    fn add(&mut self, reason: &'static str) {
        match self.0.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.0.push((reason, 1)),
        }
    }
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }
}

/// The samples of a checked batch the database can take; the others are counted in the drops:
/// `out_of_window` (measured more than [`MAX_SAMPLE_AGE`] ago or [`MAX_SAMPLE_SKEW`] ahead of
/// `now`), `invalid_sample` (an MTU under 68, probe counts beyond the column's range).
pub fn accept_samples(
    site: SiteId,
    batch: PathMetricsBatch,
    now: DateTime<Utc>,
) -> (Vec<Row>, SampleDrops) {
    let mut drops = SampleDrops::default();
    let mut out = Vec::with_capacity(batch.samples.len());
    for sample in batch.samples {
        let measured_at = i64::try_from(sample.metrics.measured_at_unix_ms)
            .ok()
            .and_then(DateTime::from_timestamp_millis);
        let Some(measured_at) =
            measured_at.filter(|at| *at >= now - MAX_SAMPLE_AGE && *at <= now + MAX_SAMPLE_SKEW)
        else {
            drops.add("out_of_window");
            continue;
        };
        if sample.metrics.mtu.is_some_and(|m| m < 68) || i32::try_from(sample.probes_sent).is_err()
        {
            drops.add("invalid_sample");
            continue;
        }
        out.push(Row {
            site,
            sample,
            measured_at,
        });
    }
    (out, drops)
}

fn status_text(status: PathStatus) -> &'static str {
    match status {
        PathStatus::Up => "up",
        PathStatus::Degraded => "degraded",
        PathStatus::Down => "down",
        PathStatus::Unknown => "unknown",
    }
}

/// Rows as the column arrays the write binds (owned: they move into the transaction).
#[derive(Default)]
struct Columns {
    path: Vec<Uuid>,
    site: Vec<Uuid>,
    at: Vec<DateTime<Utc>>,
    latency: Vec<f32>,
    jitter: Vec<f32>,
    loss: Vec<f32>,
    bandwidth: Vec<Option<f32>>,
    mtu: Vec<Option<i32>>,
    score: Vec<i16>,
    status: Vec<&'static str>,
    sent: Vec<i32>,
    lost: Vec<i32>,
}

impl Columns {
    fn of(rows: &[&Row]) -> Self {
        let mut c = Columns::default();
        for row in rows {
            let m = &row.sample.metrics;
            c.path.push(row.sample.path.0);
            c.site.push(row.site.0);
            c.at.push(row.measured_at);
            c.latency.push(m.latency_ms as f32);
            c.jitter.push(m.jitter_ms as f32);
            c.loss.push(m.packet_loss_pct as f32);
            c.bandwidth.push(m.bandwidth_mbps.map(|b| b as f32));
            c.mtu.push(m.mtu.map(i32::from));
            c.score.push(i16::from(m.score));
            c.status.push(status_text(row.sample.status));
            c.sent
                .push(i32::try_from(row.sample.probes_sent).unwrap_or(i32::MAX));
            c.lost
                .push(i32::try_from(row.sample.probes_lost).unwrap_or(i32::MAX));
        }
        c
    }

    fn keep(self, mask: &[bool]) -> Self {
        fn pick<T>(v: Vec<T>, mask: &[bool]) -> Vec<T> {
            v.into_iter()
                .zip(mask)
                .filter_map(|(x, keep)| keep.then_some(x))
                .collect()
        }
        Columns {
            path: pick(self.path, mask),
            site: pick(self.site, mask),
            at: pick(self.at, mask),
            latency: pick(self.latency, mask),
            jitter: pick(self.jitter, mask),
            loss: pick(self.loss, mask),
            bandwidth: pick(self.bandwidth, mask),
            mtu: pick(self.mtu, mask),
            score: pick(self.score, mask),
            status: pick(self.status, mask),
            sent: pick(self.sent, mask),
            lost: pick(self.lost, mask),
        }
    }
}

#[derive(QueryableByName)]
struct KnownPath {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    src_site_id: Uuid,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no database connection: {0}")]
    Pool(String),
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
}

impl WriteError {
    /// Whether the write failed because of what the rows hold (the same rows fail again), as
    /// opposed to the database being unreachable, overloaded or in a deadlock.
    pub fn is_data_error(&self) -> bool {
        match self {
            WriteError::Pool(_) => false,
            WriteError::Query(e) => is_data_error(e),
        }
    }
}

/// Why the latest states could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("encoding a path state: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What one write did.
#[derive(Debug, Default)]
pub struct Written {
    /// Rows inserted (the others were already stored).
    pub inserted: usize,
    /// Per row given: whether its path is known as one starting at its site.
    pub known: Vec<bool>,
}

/// Write `rows` of one tenant in one transaction of its scope: insert the samples whose path
/// starts at their site (the rollup trigger then merges them into their minutes, in key
/// order), and move each path's current status to its newest sample.
///
/// Concurrent writers (replicas, or one replica's overlapping writes) cannot deadlock: every
/// transaction locks rollup rows in (path, minute) order, then path rows in id order, and never
/// a rollup row after a path row. (The foreign-key checks of the insert take KEY SHARE locks on
/// paths, which do not conflict with the status update's NO KEY UPDATE locks.)
pub async fn write(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    rows: &[&Row],
) -> Result<Written, WriteError> {
    let columns = Columns::of(rows);
    db::in_scope(conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            let mut ids: Vec<Uuid> = columns.path.clone();
            ids.sort_unstable();
            ids.dedup();
            let known: Vec<KnownPath> =
                diesel::sql_query("SELECT id, src_site_id FROM paths WHERE id = ANY($1)")
                    .bind::<Array<SqlUuid>, _>(&ids)
                    .load(conn)
                    .await?;
            let starts: HashMap<Uuid, Uuid> =
                known.into_iter().map(|k| (k.id, k.src_site_id)).collect();
            let mask: Vec<bool> = columns
                .path
                .iter()
                .zip(&columns.site)
                .map(|(path, site)| starts.get(path) == Some(site))
                .collect();
            let kept = columns.keep(&mask);
            if kept.path.is_empty() {
                return Ok(Written {
                    inserted: 0,
                    known: mask,
                });
            }
            // Each path's newest sample, for its current status.
            let mut newest: HashMap<Uuid, usize> = HashMap::new();
            for (i, path) in kept.path.iter().enumerate() {
                let slot = newest.entry(*path).or_insert(i);
                if kept.at[i] > kept.at[*slot] {
                    *slot = i;
                }
            }
            let mut latest: Vec<usize> = newest.into_values().collect();
            latest.sort_unstable_by_key(|&i| kept.path[i]);
            let inserted = diesel::sql_query(
                "INSERT INTO path_metrics (tenant_id, path_id, measured_at, latency_ms, jitter_ms,
                    packet_loss_pct, bandwidth_mbps, mtu, score, status, probes_sent, probes_lost)
                 SELECT $1, u.* FROM unnest($2::uuid[], $3::timestamptz[], $4::real[], $5::real[],
                    $6::real[], $7::real[], $8::integer[], $9::smallint[], $10::text[],
                    $11::integer[], $12::integer[]) AS u
                 ON CONFLICT (path_id, measured_at) DO NOTHING",
            )
            .bind::<SqlUuid, _>(tenant.0)
            .bind::<Array<SqlUuid>, _>(&kept.path)
            .bind::<Array<Timestamptz>, _>(&kept.at)
            .bind::<Array<Float4>, _>(&kept.latency)
            .bind::<Array<Float4>, _>(&kept.jitter)
            .bind::<Array<Float4>, _>(&kept.loss)
            .bind::<Array<Nullable<Float4>>, _>(&kept.bandwidth)
            .bind::<Array<Nullable<Int4>>, _>(&kept.mtu)
            .bind::<Array<Int2>, _>(&kept.score)
            .bind::<Array<Text>, _>(&kept.status)
            .bind::<Array<Int4>, _>(&kept.sent)
            .bind::<Array<Int4>, _>(&kept.lost)
            .execute(conn)
            .await?;
            let pick_uuid: Vec<Uuid> = latest.iter().map(|&i| kept.path[i]).collect();
            let pick_status: Vec<&str> = latest.iter().map(|&i| kept.status[i]).collect();
            let pick_score: Vec<i16> = latest.iter().map(|&i| kept.score[i]).collect();
            let pick_at: Vec<DateTime<Utc>> = latest.iter().map(|&i| kept.at[i]).collect();
            diesel::sql_query(
                "SELECT 1 FROM paths WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
            )
            .bind::<Array<SqlUuid>, _>(&pick_uuid)
            .execute(conn)
            .await?;
            diesel::sql_query(
                "UPDATE paths AS p SET status = v.status, score = v.score, metrics_at = v.at,
                    status_changed_at = CASE WHEN p.status IS DISTINCT FROM v.status
                                             THEN v.at ELSE p.status_changed_at END
                 FROM unnest($1::uuid[], $2::text[], $3::smallint[], $4::timestamptz[])
                    AS v(id, status, score, at)
                 WHERE p.id = v.id AND (p.metrics_at IS NULL OR p.metrics_at < v.at)",
            )
            .bind::<Array<SqlUuid>, _>(&pick_uuid)
            .bind::<Array<Text>, _>(&pick_status)
            .bind::<Array<Int2>, _>(&pick_score)
            .bind::<Array<Timestamptz>, _>(&pick_at)
            .execute(conn)
            .await?;
            Ok::<_, WriteError>(Written {
                inserted,
                known: mask,
            })
        })
    })
    .await
}

/// Whether a query failed because of what the rows hold (see [`WriteError::is_data_error`]).
pub fn is_data_error(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as K, Error};
    match e {
        Error::DatabaseError(
            K::CheckViolation | K::NotNullViolation | K::ForeignKeyViolation | K::UniqueViolation,
            _,
        ) => true,
        Error::DatabaseError(K::Unknown, info) => {
            let m = info.message();
            m.contains("out of range") || m.contains("invalid input")
        }
        Error::SerializationError(_) => true,
        _ => false,
    }
}

/// A path's newest sample as Redis keeps it and the path API shows it.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PathState {
    /// The site that measured it (where the path starts).
    pub site_id: Uuid,
    /// `up`, `degraded`, `down` or `unknown`.
    pub status: String,
    pub score: u8,
    pub latency_ms: f64,
    pub jitter_ms: f64,
    pub packet_loss_pct: f64,
    pub bandwidth_mbps: Option<f64>,
    pub mtu: Option<u16>,
    pub probes_sent: u32,
    pub probes_lost: u32,
    pub measured_at: DateTime<Utc>,
    pub measured_at_unix_ms: u64,
}

impl PathState {
    pub fn of(row: &Row) -> Self {
        let m = &row.sample.metrics;
        PathState {
            site_id: row.site.0,
            status: status_text(row.sample.status).to_owned(),
            score: m.score,
            latency_ms: m.latency_ms,
            jitter_ms: m.jitter_ms,
            packet_loss_pct: m.packet_loss_pct,
            bandwidth_mbps: m.bandwidth_mbps,
            mtu: m.mtu,
            probes_sent: row.sample.probes_sent,
            probes_lost: row.sample.probes_lost,
            measured_at: row.measured_at,
            measured_at_unix_ms: m.measured_at_unix_ms,
        }
    }
}

/// The Redis hash of a tenant's latest path states: field = path id, value = [`PathState`]
/// JSON. Namespaced by the deployment like the leases.
pub fn state_key(deployment: &str, tenant: TenantId) -> String {
    format!("patronus:pathstate:{deployment}:{tenant}")
}

/// KEYS[1] the hash; ARGV[1] its TTL in seconds; then (path, measured_at_unix_ms, JSON)
/// triples. A field is replaced only by a newer measurement.
const STATE_SCRIPT: &str = r#"
for i = 2, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  local newer = true
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and type(decoded) == 'table' and decoded['measured_at_unix_ms']
       and tonumber(decoded['measured_at_unix_ms']) >= tonumber(ARGV[i + 1]) then
      newer = false
    end
  end
  if newer then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
"#;

async fn store_states(
    state: &AppState,
    tenant: TenantId,
    latest: &[&Row],
) -> Result<(), StateError> {
    let mut redis = state.redis().await?;
    let script = redis::Script::new(STATE_SCRIPT);
    let mut invocation = script.key(state_key(&state.deployment, tenant));
    invocation.arg(state.metrics_config.latest_state_ttl_s);
    for row in latest {
        let json = serde_json::to_string(&PathState::of(row))?;
        invocation
            .arg(row.sample.path.0.to_string())
            .arg(row.sample.metrics.measured_at_unix_ms)
            .arg(json);
    }
    invocation.invoke_async::<i64>(&mut redis).await?;
    Ok(())
}

/// The latest states of `paths` of a tenant that are younger than `metrics.latest_state_ttl_s`.
pub async fn latest_states(
    state: &AppState,
    tenant: TenantId,
    paths: &[Uuid],
) -> Result<HashMap<Uuid, PathState>, redis::RedisError> {
    if paths.is_empty() {
        return Ok(HashMap::new());
    }
    let mut redis = state.redis().await?;
    let fields: Vec<String> = paths.iter().map(Uuid::to_string).collect();
    let values: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(state_key(&state.deployment, tenant))
        .arg(&fields)
        .query_async(&mut redis)
        .await?;
    let oldest =
        Utc::now() - chrono::TimeDelta::seconds(state.metrics_config.latest_state_ttl_s as i64);
    Ok(paths
        .iter()
        .zip(values)
        .filter_map(|(path, value)| {
            let parsed: PathState = serde_json::from_str(value.as_deref()?).ok()?;
            (parsed.measured_at >= oldest).then_some((*path, parsed))
        })
        .collect())
}

/// At most one event per path per interval.
pub struct EventThrottle {
    interval: Duration,
    last: HashMap<PathId, Instant>,
}

impl EventThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
        }
    }

    /// Whether an event for `path` may go out at `now` (and if so, remember it).
    pub fn admit(&mut self, path: PathId, now: Instant) -> bool {
        if self.last.len() >= THROTTLE_PRUNE_AT {
            let interval = self.interval;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < interval);
        }
        match self.last.get(&path) {
            Some(at) if now.saturating_duration_since(*at) < self.interval => false,
            _ => {
                self.last.insert(path, now);
                true
            }
        }
    }

    pub fn remembered(&self) -> usize {
        self.last.len()
    }
}

/// A message taken from the consumer, checked.
struct Taken {
    message: jetstream::Message,
    checked: Result<(SiteId, PathMetricsBatch), Refused>,
}

impl Taken {
    fn new(tenant: TenantId, message: jetstream::Message) -> Self {
        let checked = check(tenant, message.subject.as_str(), &message.payload);
        Self { message, checked }
    }

    fn samples(&self) -> usize {
        self.checked
            .as_ref()
            .map(|(_, b)| b.samples.len())
            .unwrap_or(0)
    }
}

/// A checked message's rows.
struct Prepared {
    message: jetstream::Message,
    site: SiteId,
    seq: u64,
    rows: Vec<Row>,
}

async fn settle(message: &jetstream::Message, kind: AckKind, tenant: TenantId) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(tenant = %tenant, error = %e, "could not acknowledge a metrics message; it will be delivered again");
    }
}

fn seconds_since(published: time::OffsetDateTime) -> f64 {
    (time::OffsetDateTime::now_utc() - published)
        .as_seconds_f64()
        .max(0.0)
}

/// Store one gathered group of messages and settle each of them.
async fn process(
    state: &AppState,
    tenant: TenantId,
    taken: Vec<Taken>,
    events: &std::sync::Mutex<EventThrottle>,
) {
    let metrics = &state.metrics;
    let now = Utc::now();
    let mut prepared = Vec::with_capacity(taken.len());
    for Taken { message, checked } in taken {
        if let Ok(info) = message.info() {
            metrics
                .metric_ingest_lag_seconds
                .observe(seconds_since(info.published));
        }
        match checked {
            Err(refused) => {
                metrics.metric_batches_dropped.inc(refused.reason);
                tracing::warn!(
                    tenant = %tenant,
                    site = %refused.site.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                    reason = refused.reason,
                    error = %refused.detail,
                    "path-metric batch dropped"
                );
                settle(&message, AckKind::Term, tenant).await;
            }
            Ok((site, batch)) => {
                let seq = batch.seq;
                let (rows, drops) = accept_samples(site, batch, now);
                if drops.total() > 0 {
                    for (reason, n) in &drops.0 {
                        metrics.metric_samples_dropped.add(reason, *n);
                    }
                    tracing::warn!(tenant = %tenant, site = %site, seq, dropped = ?drops.0, "samples dropped from a path-metric batch");
                }
                prepared.push(Prepared {
                    message,
                    site,
                    seq,
                    rows,
                });
            }
        }
    }
    if prepared.is_empty() {
        return;
    }
    match write_group(state, tenant, &prepared).await {
        Ok(written) => finish(state, tenant, &prepared, written, events).await,
        Err(e) if e.is_data_error() => {
            tracing::warn!(tenant = %tenant, error = %e, messages = prepared.len(), "the database refused a group of path-metric batches; writing them one by one");
            for one in prepared {
                let single = [one];
                match write_group(state, tenant, &single).await {
                    Ok(written) => finish(state, tenant, &single, written, events).await,
                    Err(e) if e.is_data_error() => {
                        let [one] = single;
                        metrics.metric_batches_dropped.inc("rejected");
                        tracing::warn!(tenant = %tenant, site = %one.site, seq = one.seq, error = %e, "path-metric batch dropped: the database refused it");
                        settle(&one.message, AckKind::Term, tenant).await;
                    }
                    Err(e) => {
                        let [one] = single;
                        retry(state, tenant, std::slice::from_ref(&one), &e).await;
                    }
                }
            }
        }
        Err(e) => retry(state, tenant, &prepared, &e).await,
    }
}

async fn retry(state: &AppState, tenant: TenantId, prepared: &[Prepared], error: &WriteError) {
    state
        .metrics
        .metric_batches_retried
        .add(prepared.len() as u64);
    tracing::warn!(tenant = %tenant, error = %error, messages = prepared.len(), "writing path metrics failed; they will be delivered again");
    let delay = Duration::from_millis(state.metrics_config.retry_delay_ms);
    for p in prepared {
        settle(&p.message, AckKind::Nak(Some(delay)), tenant).await;
    }
}

async fn write_group(
    state: &AppState,
    tenant: TenantId,
    prepared: &[Prepared],
) -> Result<Written, WriteError> {
    let rows: Vec<&Row> = prepared.iter().flat_map(|p| &p.rows).collect();
    if rows.is_empty() {
        return Ok(Written::default());
    }
    let started = Instant::now();
    let mut conn = state
        .db
        .get()
        .await
        .map_err(|e| WriteError::Pool(e.to_string()))?;
    let written = write(&mut conn, tenant, &rows).await?;
    state
        .metrics
        .metric_write_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(written)
}

/// After a committed write: count, acknowledge, then the latest states and events.
async fn finish(
    state: &AppState,
    tenant: TenantId,
    prepared: &[Prepared],
    written: Written,
    events: &std::sync::Mutex<EventThrottle>,
) {
    let metrics = &state.metrics;
    let mut known = written.known.iter();
    let mut stored: Vec<&Row> = Vec::new();
    for p in prepared {
        let mut unknown = 0u64;
        for row in &p.rows {
            if known.next().copied().unwrap_or(false) {
                stored.push(row);
            } else {
                unknown += 1;
            }
        }
        if unknown > 0 {
            metrics.metric_samples_dropped.add("unknown_path", unknown);
            tracing::warn!(tenant = %tenant, site = %p.site, seq = p.seq, samples = unknown, "samples for paths this site does not have dropped");
        }
        settle(&p.message, AckKind::Ack, tenant).await;
    }
    metrics.metric_batches_stored.add(prepared.len() as u64);
    metrics.metric_samples_stored.add(written.inserted as u64);
    metrics
        .metric_samples_duplicate
        .add(stored.len().saturating_sub(written.inserted) as u64);
    if stored.is_empty() {
        return;
    }
    let mut newest: HashMap<PathId, &Row> = HashMap::new();
    for row in stored {
        let slot = newest.entry(row.sample.path).or_insert(row);
        if row.measured_at > slot.measured_at {
            *slot = row;
        }
    }
    let latest: Vec<&Row> = newest.into_values().collect();
    if let Err(e) = store_states(state, tenant, &latest).await {
        metrics.metric_state_write_failures.inc();
        tracing::warn!(tenant = %tenant, error = %e, "could not store the latest path states in Redis");
    }
    let now = Instant::now();
    let admitted: Vec<&Row> = match events.lock() {
        Ok(mut throttle) => latest
            .into_iter()
            .filter(|row| throttle.admit(row.sample.path, now))
            .collect(),
        Err(_) => Vec::new(),
    };
    for row in admitted {
        metrics.metric_events_emitted.inc();
        state
            .emit(
                tenant,
                Some(row.site),
                SdwanEvent::PathMetrics {
                    path: row.sample.path,
                    metrics: row.sample.metrics.clone(),
                },
            )
            .await;
    }
}

/// Pull from the tenant's consumer until `stop`, or until the consumer fails.
async fn consume(
    state: &AppState,
    tenant: TenantId,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let settings = state.metrics_config.clone();
    let link = state
        .tenant_nats(tenant)
        .await
        .map_err(|e| IngestError::Link {
            tenant,
            detail: e.to_string(),
        })?;
    let js = jetstream::new(link.client.clone());
    let stream = ensure_stream(&js, tenant).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(CONSUMER_NAME, consumer_config(&settings))
        .await
        .map_err(|e| IngestError::Consumer(e.to_string()))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH)
        .expires(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| IngestError::Consumer(e.to_string()))?;
    tracing::info!(tenant = %tenant, "consuming path metrics");
    let linger = Duration::from_millis(settings.write_linger_ms);
    let events = std::sync::Arc::new(std::sync::Mutex::new(EventThrottle::new(
        Duration::from_millis(settings.event_interval_ms),
    )));
    let mut writes = tokio::task::JoinSet::new();
    let result = loop {
        let next = tokio::select! {
            _ = stop.changed() => break Ok(()),
            next = messages.next() => next,
        };
        let first = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                tracing::debug!(tenant = %tenant, "missed a heartbeat of the metrics consumer");
                continue;
            }
            Some(Err(e)) => break Err(IngestError::Consumer(e.to_string())),
            None => break Err(IngestError::Consumer("the message stream ended".into())),
        };
        let mut group = vec![Taken::new(tenant, first)];
        let mut samples = group[0].samples();
        let deadline = tokio::time::Instant::now() + linger;
        let mut failure = None;
        while samples < settings.write_batch_samples {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(message))) => {
                    let taken = Taken::new(tenant, message);
                    samples += taken.samples();
                    group.push(taken);
                }
                Ok(Some(Err(e)))
                    if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {}
                Ok(Some(Err(e))) => {
                    failure = Some(IngestError::Consumer(e.to_string()));
                    break;
                }
                Ok(None) => {
                    failure = Some(IngestError::Consumer("the message stream ended".into()));
                    break;
                }
                Err(_) => break,
            }
        }
        while writes.len() >= settings.write_concurrency {
            writes.join_next().await;
        }
        let (state, events) = (state.clone(), events.clone());
        writes.spawn(async move { process(&state, tenant, group, &events).await });
        if let Some(e) = failure {
            break Err(e);
        }
    };
    // Let the writes in flight finish (their messages are settled either way).
    while writes.join_next().await.is_some() {}
    result
}

/// One tenant's consumer, restarted with a backoff when it fails, until `stop`.
async fn follow(state: AppState, tenant: TenantId, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match consume(&state, tenant, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, retry_in_ms = backoff.as_millis() as u64, "path-metrics consumer stopped; restarting");
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Consume every tenant's path metrics, now and as tenants appear, until `stop`.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut tasks: HashMap<TenantId, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut rescan = tokio::time::interval(RESCAN);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = rescan.tick() => {
                let tenants = match crate::intents::service::all_tenants(&state).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list tenants for path metrics yet");
                        continue;
                    }
                };
                let current: HashSet<TenantId> = tenants.iter().copied().collect();
                tasks.retain(|tenant, task| {
                    if !current.contains(tenant) {
                        task.abort();
                        false
                    } else {
                        !task.is_finished()
                    }
                });
                for tenant in tenants {
                    tasks.entry(tenant).or_insert_with(|| {
                        tokio::spawn(follow(state.clone(), tenant, stop.clone()))
                    });
                }
            }
        }
    }
    // Each consumer stops between writes; give them a moment, then stop waiting.
    for (_, task) in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Retention of the one-minute rollups (singleton work of the lease holder): delete each
/// tenant's rows older than `metrics.rollup_retention_days`, in the tenant's scope.
pub async fn prune_rollups(state: &AppState) -> Result<usize, String> {
    let tenants = crate::intents::service::all_tenants(state).await?;
    let days = i32::try_from(state.metrics_config.rollup_retention_days).unwrap_or(i32::MAX);
    let mut deleted = 0;
    let mut conn = state.db.get().await.map_err(|e| e.to_string())?;
    for tenant in tenants {
        deleted += db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
            Box::pin(async move {
                diesel::sql_query(
                    "DELETE FROM path_metrics_1m
                     WHERE tenant_id = $1 AND minute < now() - make_interval(days => $2)",
                )
                .bind::<SqlUuid, _>(tenant.0)
                .bind::<Int4, _>(days)
                .execute(conn)
                .await
            })
        })
        .await
        .map_err(|e: diesel::result::Error| format!("tenant {tenant}: {e}"))?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use patronus_proto::metrics::PathMetrics;
    use patronus_proto::SCHEMA_VERSION;

    fn ids() -> (TenantId, SiteId) {
        (TenantId(Uuid::from_u128(1)), SiteId(Uuid::from_u128(2)))
    }

    fn sample(path: u128, at_ms: u64) -> PathSample {
        PathSample {
            path: PathId(Uuid::from_u128(path)),
            status: PathStatus::Up,
            metrics: PathMetrics {
                latency_ms: 12.5,
                jitter_ms: 1.0,
                packet_loss_pct: 0.0,
                bandwidth_mbps: None,
                mtu: Some(1420),
                score: 97,
                measured_at_unix_ms: at_ms,
            },
            probes_sent: 10,
            probes_lost: 0,
        }
    }

    fn batch(tenant: TenantId, site: SiteId, samples: Vec<PathSample>) -> PathMetricsBatch {
        PathMetricsBatch {
            schema_version: SCHEMA_VERSION,
            tenant,
            site,
            seq: 1,
            sent_at_unix_ms: 0,
            samples,
        }
    }

    #[test]
    fn a_batch_must_name_the_tenant_and_site_of_its_subject() {
        let (t, s) = ids();
        let subject = subjects::metrics_subject(t, s);
        let good = codec::encode(&batch(t, s, vec![sample(9, 1)]));
        assert_eq!(check(t, &subject, &good).map(|(site, _)| site), Ok(s));

        let other_tenant = TenantId(Uuid::from_u128(3));
        let foreign = codec::encode(&batch(other_tenant, s, vec![]));
        assert_eq!(
            check(t, &subject, &foreign).unwrap_err().reason,
            "wrong_tenant"
        );
        let other_site = codec::encode(&batch(t, SiteId(Uuid::from_u128(4)), vec![]));
        let refused = check(t, &subject, &other_site).unwrap_err();
        assert_eq!((refused.reason, refused.site), ("wrong_site", Some(s)));
        // A subject of another tenant (never delivered by this tenant's stream, but checked).
        let elsewhere = subjects::metrics_subject(other_tenant, s);
        assert_eq!(
            check(t, &elsewhere, &good).unwrap_err().reason,
            "wrong_tenant"
        );
        assert_eq!(
            check(t, &subjects::events_subject(t, s), &good)
                .unwrap_err()
                .reason,
            "subject"
        );
    }

    #[test]
    fn malformed_batches_are_refused_with_a_stable_reason() {
        let (t, s) = ids();
        let subject = subjects::metrics_subject(t, s);
        assert_eq!(
            check(t, &subject, b"{not json").unwrap_err().reason,
            "syntax"
        );
        assert_eq!(
            check(t, &subject, br#"{"tenant":"x"}"#).unwrap_err().reason,
            "missing_schema_version"
        );
        let mut bad = sample(9, 1);
        bad.metrics.packet_loss_pct = 140.0;
        let invalid = codec::encode(&batch(t, s, vec![bad]));
        assert_eq!(check(t, &subject, &invalid).unwrap_err().reason, "invalid");
        let many = codec::encode(&batch(
            t,
            s,
            vec![sample(9, 1); patronus_proto::metrics::MAX_SAMPLES_PER_BATCH + 1],
        ));
        assert_eq!(
            check(t, &subject, &many).unwrap_err().reason,
            "too_many_samples"
        );
    }

    #[test]
    fn samples_outside_the_window_or_impossible_for_the_database_are_dropped() {
        let (t, s) = ids();
        let now = DateTime::from_timestamp_millis(1_800_000_000_000).unwrap();
        let ms = |at: DateTime<Utc>| at.timestamp_millis() as u64;
        let mut tiny_mtu = sample(1, ms(now));
        tiny_mtu.metrics.mtu = Some(20);
        let mut huge_probes = sample(1, ms(now));
        huge_probes.probes_sent = u32::MAX;
        let (kept, drops) = accept_samples(
            s,
            batch(
                t,
                s,
                vec![
                    sample(1, ms(now)),
                    sample(2, ms(now - chrono::TimeDelta::hours(23))),
                    sample(3, ms(now - chrono::TimeDelta::hours(25))),
                    sample(4, ms(now + chrono::TimeDelta::minutes(30))),
                    sample(5, u64::MAX),
                    tiny_mtu,
                    huge_probes,
                ],
            ),
            now,
        );
        assert_eq!(
            kept.iter()
                .map(|r| r.sample.path.0.as_u128())
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(kept[0].measured_at, now);
        assert_eq!(kept[0].site, s);
        assert_eq!(drops.0, vec![("out_of_window", 3), ("invalid_sample", 2)]);
        assert_eq!(drops.total(), 5);
    }

    #[test]
    fn events_are_throttled_per_path_and_the_memory_is_bounded() {
        let mut throttle = EventThrottle::new(Duration::from_secs(1));
        let start = Instant::now();
        let a = PathId(Uuid::from_u128(1));
        let b = PathId(Uuid::from_u128(2));
        assert!(throttle.admit(a, start));
        assert!(throttle.admit(b, start));
        assert!(!throttle.admit(a, start + Duration::from_millis(999)));
        assert!(throttle.admit(a, start + Duration::from_secs(1)));
        for i in 0..THROTTLE_PRUNE_AT as u128 + 10 {
            throttle.admit(PathId(Uuid::from_u128(1000 + i)), start);
        }
        let later = start + Duration::from_secs(5);
        throttle.admit(PathId(Uuid::from_u128(7)), later);
        assert!(throttle.remembered() < 100, "{}", throttle.remembered());
    }

    #[test]
    fn the_stream_captures_only_this_tenants_metrics_and_is_bounded() {
        let (t, _) = ids();
        let config = stream_config(t);
        assert_eq!(config.name, METRICS_STREAM);
        assert_eq!(config.subjects, vec![format!("sdwan.{t}.*.metrics")]);
        assert_eq!(config.max_age, STREAM_MAX_AGE);
        assert!(config.max_messages > 0);
        assert_eq!(config.max_message_size as usize, codec::MAX_MESSAGE_BYTES);
        let consumer = consumer_config(&MetricsConfig::default());
        assert_eq!(consumer.durable_name.as_deref(), Some(CONSUMER_NAME));
        assert_eq!(consumer.ack_policy, consumer::AckPolicy::Explicit);
        assert!(consumer.max_ack_pending > 0);
    }

    #[test]
    fn constraint_failures_are_data_errors_and_lost_connections_are_not() {
        use diesel::result::{DatabaseErrorKind as K, Error};
        let check = Error::DatabaseError(K::CheckViolation, Box::new("no partition".to_owned()));
        assert!(is_data_error(&check));
        let gone = Error::DatabaseError(K::ClosedConnection, Box::new("closed".to_owned()));
        assert!(!is_data_error(&gone));
        let deadlock = Error::DatabaseError(K::Unknown, Box::new("deadlock detected".to_owned()));
        assert!(!is_data_error(&deadlock));
        assert!(!is_data_error(&Error::BrokenTransactionManager));
    }
}
