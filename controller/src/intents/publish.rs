//! Publishing a tenant's intents to the JetStream KV bucket `intents`.
//!
//! For each site: compile, compare the content digest with the last published one
//! (`site_intents`), and only if it changed take a new revision from `intent_revision_seq`,
//! put the intent under `<tenant>.<site>`, and record revision and digest. The KV write comes
//! first: if recording fails the next round republishes the same content under a newer
//! revision, which the edge applies as a no-op; the reverse order could lose a publish.
//!
//! Key rotations ([`super::rotation`]) are recorded only after the round's intents are out: the
//! announcing revision once the peers' intents carrying a next key are published, the new key
//! once the intents naming it are.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv, stream};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer};
use diesel_async::RunQueryDsl;
use futures_util::StreamExt;
use patronus_proto::subjects::{intent_key, INTENTS_BUCKET};
use patronus_proto::{codec, SiteId, TenantId};
use uuid::Uuid;

/// JetStream puts in flight at once while publishing a tenant.
const PUBLISH_CONCURRENCY: usize = 64;

/// Path syncs per publish round at most; more is only needed while sites keep enrolling
/// during the round, and the next round (their enrollment signals one) catches up.
const MAX_PATH_SYNC_ROUNDS: usize = 4;

use super::compile::{compile, CompileError, KeyPhase, KeyRotation};
use super::rotation;
use super::store::{load_snapshot, sync_paths, PathKey, StoreError};
use crate::db::{self, schema::site_intents, DbPool, Scope};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Compile(#[from] CompileError),
    #[error("database: {0}")]
    Db(#[from] db::DbError),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("recording a key rotation: {0}")]
    Rotation(String),
}

impl From<diesel::result::Error> for PublishError {
    fn from(e: diesel::result::Error) -> Self {
        PublishError::Db(db::DbError::Query(e))
    }
}

/// Open the `intents` bucket, creating its stream if needed. (nats-server 2.9 answers the
/// account query `create_key_value` relies on in a form async-nats cannot parse, so the KV's
/// stream is created here with the settings a KV bucket has.)
pub async fn open_bucket(js: &jetstream::Context) -> Result<kv::Store, PublishError> {
    let config = stream::Config {
        name: format!("KV_{INTENTS_BUCKET}"),
        description: Some("last intent of every site".into()),
        subjects: vec![format!("$KV.{INTENTS_BUCKET}.>")],
        max_messages_per_subject: 1,
        max_message_size: patronus_proto::codec::MAX_MESSAGE_BYTES as i32,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| PublishError::Nats(format!("creating the {INTENTS_BUCKET} stream: {e}")))?;
    js.get_key_value(INTENTS_BUCKET)
        .await
        .map_err(|e| PublishError::Nats(format!("opening the {INTENTS_BUCKET} bucket: {e}")))
}

/// What one publish of a tenant did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Sites published, with their new revision.
    pub published: Vec<(SiteId, u64)>,
    /// Sites whose intent had not changed.
    pub unchanged: usize,
    /// Sites whose intent was withdrawn (deleted, revoked, no longer eligible).
    pub withdrawn: usize,
    /// Sites whose next WireGuard key was announced to their peers in this round (the
    /// announcing revision is recorded; the commit can follow as soon as the peers report).
    pub announced: Vec<SiteId>,
    /// Sites whose key rotation was committed in this round (the next key is now theirs).
    pub committed: Vec<SiteId>,
    /// The earliest time (Unix ms) a rotation still announcing commits by its timeout: the
    /// tenant must be published again then.
    pub next_commit_due_unix_ms: Option<u64>,
}

/// Settings of a publish that come from the controller's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishSettings {
    /// See [`super::compile::TenantSnapshot::rotation_commit_timeout_ms`].
    pub rotation_commit_timeout_ms: u64,
}

impl Default for PublishSettings {
    fn default() -> Self {
        Self {
            rotation_commit_timeout_ms: super::store::DEFAULT_ROTATION_COMMIT_TIMEOUT_MS,
        }
    }
}

#[derive(QueryableByName)]
struct Revision {
    #[diesel(sql_type = BigInt)]
    revision: i64,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Compile and publish every changed intent of one tenant, with default settings.
pub async fn publish_tenant(
    pool: &DbPool,
    bucket: &kv::Store,
    tenant: TenantId,
    probe_secret: &[u8],
) -> Result<PublishOutcome, PublishError> {
    publish_tenant_with(
        pool,
        bucket,
        tenant,
        probe_secret,
        PublishSettings::default(),
    )
    .await
}

/// Compile and publish every changed intent of one tenant.
pub async fn publish_tenant_with(
    pool: &DbPool,
    bucket: &kv::Store,
    tenant: TenantId,
    probe_secret: &[u8],
    settings: PublishSettings,
) -> Result<PublishOutcome, PublishError> {
    let mut conn = pool.get().await.map_err(db::DbError::from)?;
    let secret = probe_secret.to_vec();
    // Compile, bringing the paths table in step with the topology first.
    let (compiled, published) = db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            let mut snapshot = load_snapshot(conn, tenant).await?;
            snapshot.rotation_commit_timeout_ms = settings.rotation_commit_timeout_ms;
            let mut compiled = compile(&snapshot, &secret, now_unix_ms())?;
            // Reloading after the sync can see a site that enrolled meanwhile (each statement
            // sees what is committed), whose paths the sync did not know to create: sync
            // again until the compiled intents miss no path, so no site is published with
            // peers but without the paths to them.
            for _ in 0..MAX_PATH_SYNC_ROUNDS {
                let wanted: BTreeSet<PathKey> = compiled
                    .topology
                    .peerings
                    .iter()
                    .flat_map(|((a, b), paths)| {
                        paths
                            .iter()
                            .flat_map(move |(ua, ub)| [(*a, *ua, *b, *ub), (*b, *ub, *a, *ua)])
                    })
                    .collect();
                let (created, deleted) = sync_paths(conn, tenant, &wanted).await?;
                if created == 0 && deleted == 0 && compiled.missing_paths.is_empty() {
                    break;
                }
                tracing::info!(tenant = %tenant, created, deleted, "paths synced with topology");
                snapshot = load_snapshot(conn, tenant).await?;
                snapshot.rotation_commit_timeout_ms = settings.rotation_commit_timeout_ms;
                compiled = compile(&snapshot, &secret, now_unix_ms())?;
                if compiled.missing_paths.is_empty() {
                    break;
                }
            }
            let published: HashMap<Uuid, (Vec<u8>, i64)> = site_intents::table
                .select((
                    site_intents::site_id,
                    site_intents::digest,
                    site_intents::revision,
                ))
                .load::<(Uuid, Vec<u8>, i64)>(conn)
                .await?
                .into_iter()
                .map(|(site, digest, revision)| (site, (digest, revision)))
                .collect();
            Ok::<_, PublishError>((compiled, published))
        })
    })
    .await?;

    let mut outcome = PublishOutcome::default();
    let rotations = compiled.rotations.clone();
    outcome.next_commit_due_unix_ms = rotations.iter().filter_map(|r| r.commit_due_unix_ms).min();
    // Each site's latest published revision, updated below with this round's.
    let mut latest: HashMap<SiteId, u64> = published
        .iter()
        .map(|(site, (_, revision))| (SiteId(*site), u64::try_from(*revision).unwrap_or(0)))
        .collect();
    let compiled_sites: BTreeSet<Uuid> = compiled.intents.iter().map(|i| i.site.0).collect();
    let withdrawn: Vec<Uuid> = published
        .keys()
        .copied()
        .filter(|id| !compiled_sites.contains(id))
        .collect();
    let changed: Vec<_> = compiled
        .intents
        .into_iter()
        .filter_map(|intent| {
            let digest = intent.content_digest();
            if published
                .get(&intent.site.0)
                .is_some_and(|(d, _)| d.as_slice() == digest)
            {
                outcome.unchanged += 1;
                None
            } else {
                Some((intent, digest))
            }
        })
        .collect();

    if !changed.is_empty() {
        let count = changed.len() as i32;
        let revisions: Vec<Revision> = diesel::sql_query(
            "SELECT nextval('intent_revision_seq') AS revision FROM generate_series(1, $1)",
        )
        .bind::<Integer, _>(count)
        .load(&mut conn)
        .await?;
        // Puts go out concurrently; each waits for its JetStream acknowledgement.
        let puts = changed
            .into_iter()
            .zip(revisions)
            .map(|((mut intent, digest), revision)| {
                let revision = u64::try_from(revision.revision).unwrap_or(0);
                intent.revision = revision;
                let key = intent_key(tenant, intent.site);
                let payload: bytes::Bytes = codec::encode(&intent).into();
                async move {
                    bucket
                        .put(&key, payload)
                        .await
                        .map_err(|e| PublishError::Nats(format!("putting {key}: {e}")))?;
                    Ok::<_, PublishError>((intent.site, revision, digest))
                }
            });
        let recorded: Vec<(SiteId, u64, [u8; 32])> = futures_util::stream::iter(puts)
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        for (site, revision, _) in &recorded {
            tracing::debug!(tenant = %tenant, site = %site, revision, "intent published");
            outcome.published.push((*site, *revision));
            latest.insert(*site, *revision);
        }
        db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
            Box::pin(async move {
                use diesel::upsert::excluded;
                for chunk in recorded.chunks(1000) {
                    let rows: Vec<_> = chunk
                        .iter()
                        .map(|(site, revision, digest)| {
                            (
                                site_intents::tenant_id.eq(tenant.0),
                                site_intents::site_id.eq(site.0),
                                site_intents::revision.eq(*revision as i64),
                                site_intents::digest.eq(digest.to_vec()),
                            )
                        })
                        .collect();
                    diesel::insert_into(site_intents::table)
                        .values(rows)
                        .on_conflict(site_intents::site_id)
                        .do_update()
                        .set((
                            site_intents::revision.eq(excluded(site_intents::revision)),
                            site_intents::digest.eq(excluded(site_intents::digest)),
                            site_intents::published_at.eq(diesel::dsl::now),
                        ))
                        .execute(conn)
                        .await?;
                }
                Ok::<_, PublishError>(())
            })
        })
        .await?;
    }
    // Sites that no longer get an intent (revoked, un-enrolled, hub list changed...): their
    // key goes, so a stale intent cannot be applied by a returning edge.
    for site in &withdrawn {
        let key = intent_key(tenant, SiteId(*site));
        bucket
            .purge(&key)
            .await
            .map_err(|e| PublishError::Nats(format!("purging {key}: {e}")))?;
        tracing::info!(tenant = %tenant, site = %site, "intent withdrawn");
    }
    if !withdrawn.is_empty() {
        outcome.withdrawn = withdrawn.len();
        db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
            Box::pin(async move {
                diesel::delete(
                    site_intents::table.filter(site_intents::site_id.eq_any(&withdrawn)),
                )
                .execute(conn)
                .await?;
                Ok::<_, PublishError>(())
            })
        })
        .await?;
    }
    if !rotations.is_empty() {
        let (announced, committed) =
            record_rotations(&mut conn, tenant, rotations, &latest).await?;
        outcome.announced = announced;
        outcome.committed = committed;
    }
    Ok(outcome)
}

/// Record the key rotations of a round whose intents are all out (see the module docs).
async fn record_rotations(
    conn: &mut diesel_async::AsyncPgConnection,
    tenant: TenantId,
    rotations: Vec<KeyRotation>,
    latest: &HashMap<SiteId, u64>,
) -> Result<(Vec<SiteId>, Vec<SiteId>), PublishError> {
    let latest = latest.clone();
    db::in_scope(conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            let (mut announced, mut committed) = (Vec::new(), Vec::new());
            for rotation in rotations {
                match rotation.phase {
                    KeyPhase::Announce { next } if rotation.announce_revision.is_none() => {
                        // Every peer's latest intent carries the next key: the lowest of their
                        // revisions is the one each peer must have applied.
                        let revisions: Option<Vec<u64>> = rotation
                            .peers
                            .iter()
                            .map(|peer| latest.get(peer).copied())
                            .collect();
                        let Some(revision) = revisions.and_then(|r| r.into_iter().min()) else {
                            continue;
                        };
                        if rotation::record_announced(conn, rotation.site, next, revision).await? {
                            tracing::info!(tenant = %tenant, site = %rotation.site, revision, "next WireGuard key announced to the site's peers");
                            announced.push(rotation.site);
                        }
                    }
                    KeyPhase::Announce { .. } => {}
                    KeyPhase::Commit { next } => {
                        let done = rotation::record_committed(conn, tenant, rotation.site, next)
                            .await
                            .map_err(|e| PublishError::Rotation(e.to_string()))?;
                        if done {
                            tracing::info!(tenant = %tenant, site = %rotation.site, "WireGuard key rotation committed");
                            committed.push(rotation.site);
                        }
                    }
                }
            }
            Ok::<_, PublishError>((announced, committed))
        })
    })
    .await
}

/// Remove a deleted site's intent key (its `site_intents` row went with the site).
pub async fn purge_site(
    bucket: &kv::Store,
    tenant: TenantId,
    site: SiteId,
) -> Result<(), PublishError> {
    let key = intent_key(tenant, site);
    bucket
        .purge(&key)
        .await
        .map_err(|e| PublishError::Nats(format!("purging {key}: {e}")))
}
