//! The singleton intent publisher.
//!
//! Every replica runs this loop; only the one holding the Redis lease `intent-publisher`
//! publishes. Replicas announce "tenant T changed" on a core NATS subject after committing a
//! change; the leader collects these per tenant for `debounce` (a burst of API calls gives one
//! publish) and then publishes that tenant. On taking the lease, and every
//! `reconcile_interval`, it republishes every tenant (a no-op where nothing changed), which
//! also covers a signal lost while no replica led. The leader also keeps the path-metrics
//! partitions (created `metrics.partitions_ahead_days` ahead, dropped after
//! `metrics.retention_days`) and deletes one-minute rollups older than
//! `metrics.rollup_retention_days`.
//!
//! Key rotations: a round that records an announcement publishes the tenant again at once
//! (its peers may already have reported), and one with a rotation still announcing publishes
//! it again when that rotation's commit timeout runs out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diesel::sql_types::Uuid as SqlUuid;
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use futures_util::StreamExt;
use patronus_proto::TenantId;
use tokio::sync::watch;
use uuid::Uuid;

use super::publish::{publish_tenant_with, PublishSettings};
use crate::lease::Lease;
use crate::server::{intents_changed_subject, AppState};

#[derive(QueryableByName)]
struct TenantRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// Every tenant of the deployment (all MSPs), through the database's definer function.
pub(crate) async fn all_tenants(state: &AppState) -> Result<Vec<TenantId>, String> {
    let mut conn = state.db.get().await.map_err(|e| e.to_string())?;
    let rows: Vec<TenantRow> = diesel::sql_query("SELECT id FROM patronus_all_tenants()")
        .load(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.into_iter().map(|r| TenantId(r.id)).collect())
}

/// Publish one tenant, logging (not propagating) failures: the next signal or reconcile
/// retries. Returns when the tenant must be published again by itself (a key rotation
/// committing by its timeout).
pub async fn publish_one(state: &AppState, tenant: TenantId) -> Option<Instant> {
    let started = Instant::now();
    let bucket = match state.tenant_nats(tenant).await {
        Ok(link) => link.intents,
        Err(e) => {
            tracing::warn!(tenant = %tenant, error = %e, "intents bucket unavailable; will retry");
            state.metrics.intent_publish_failures.inc();
            return None;
        }
    };
    let settings = PublishSettings {
        rotation_commit_timeout_ms: state
            .provisioning
            .wireguard_commit_timeout_s
            .saturating_mul(1000),
    };
    match publish_tenant_with(&state.db, &bucket, tenant, &state.probe_secret, settings).await {
        Ok(outcome) => {
            if !outcome.announced.is_empty() {
                // The peers may have reported applying before the announcement was recorded:
                // look again soon rather than at the next report or reconcile.
                state.intents_changed(tenant).await;
            }
            state
                .metrics
                .intents_published
                .add(outcome.published.len() as u64);
            state
                .metrics
                .intent_publish_seconds
                .observe(started.elapsed().as_secs_f64());
            if !outcome.published.is_empty()
                || outcome.withdrawn > 0
                || !outcome.committed.is_empty()
            {
                tracing::info!(
                    tenant = %tenant,
                    published = outcome.published.len(),
                    unchanged = outcome.unchanged,
                    withdrawn = outcome.withdrawn,
                    keys_announced = outcome.announced.len(),
                    keys_committed = outcome.committed.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "tenant intents published"
                );
            }
            outcome.next_commit_due_unix_ms.map(|due| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                Instant::now() + Duration::from_millis(due.saturating_sub(now))
            })
        }
        Err(e) => {
            state.metrics.intent_publish_failures.inc();
            tracing::warn!(tenant = %tenant, error = %e, "publishing intents failed; will retry");
            None
        }
    }
}

/// Publish `tenant` again at `at` (or earlier if it is due sooner anyway).
fn schedule(pending: &mut HashMap<TenantId, Instant>, tenant: TenantId, at: Option<Instant>) {
    if let Some(at) = at {
        let due = pending.entry(tenant).or_insert(at);
        *due = (*due).min(at);
    }
}

/// Metrics retention (singleton work under the same lease): create daily partitions ahead and
/// drop those past the retention period.
async fn maintain_metrics_partitions(state: &AppState) {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        n: i32,
    }
    let ahead = state.metrics_config.partitions_ahead_days as i32 + 1;
    let keep = state.metrics_config.retention_days as i32;
    let result = async {
        let mut conn = state.db.get().await.map_err(|e| e.to_string())?;
        let created: Count = diesel::sql_query(
            "SELECT patronus_ensure_path_metrics_partitions((now() AT TIME ZONE 'UTC')::date - 1, $1) AS n",
        )
        .bind::<diesel::sql_types::Integer, _>(ahead)
        .get_result(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
        let dropped: Count = diesel::sql_query(
            "SELECT patronus_drop_path_metrics_partitions_before((now() AT TIME ZONE 'UTC')::date - $1) AS n",
        )
        .bind::<diesel::sql_types::Integer, _>(keep)
        .get_result(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
        Ok::<_, String>((created.n, dropped.n))
    }
    .await;
    match result {
        Ok((0, 0)) => {}
        Ok((created, dropped)) => {
            tracing::info!(created, dropped, "path-metrics partitions maintained")
        }
        Err(e) => {
            tracing::warn!(error = %e, "path-metrics partition maintenance failed; will retry")
        }
    }
}

async fn reconcile_all(state: &AppState, pending: &mut HashMap<TenantId, Instant>) {
    match all_tenants(state).await {
        Ok(tenants) => {
            for tenant in tenants {
                let again = publish_one(state, tenant).await;
                schedule(pending, tenant, again);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list tenants for reconcile"),
    }
}

/// Run until `stop` turns true. Releases the lease on the way out.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let settings = state.intents.clone();
    let lease = Lease::new(
        &format!("{}:intent-publisher", state.deployment),
        &state.replica_id,
        Duration::from_millis(settings.lease_ttl_ms),
    );
    let debounce = Duration::from_millis(settings.debounce_ms);
    let reconcile_every = Duration::from_secs(settings.reconcile_interval_s);
    let mut subscription = None;
    let mut leader = false;
    let mut pending: HashMap<TenantId, Instant> = HashMap::new();
    let mut last_reconcile: Option<Instant> = None;
    let mut renew = tokio::time::interval(lease.ttl() / 5);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush =
        tokio::time::interval(Duration::from_millis((settings.debounce_ms / 2).max(10)));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if subscription.is_none() {
            match state
                .nats
                .subscribe(intents_changed_subject(&state.deployment))
                .await
            {
                Ok(sub) => subscription = Some(sub),
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to intent changes yet"),
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            message = async {
                match subscription.as_mut() {
                    Some(sub) => sub.next().await,
                    None => std::future::pending().await,
                }
            } => match message {
                Some(message) => {
                    if leader {
                        match std::str::from_utf8(&message.payload).ok().and_then(|t| t.parse::<TenantId>().ok()) {
                            Some(tenant) => {
                                // Also ahead of a later wake-up (a rotation's commit timeout).
                                schedule(&mut pending, tenant, Some(Instant::now() + debounce));
                            }
                            None => tracing::warn!("ignoring a malformed intent-change signal"),
                        }
                    }
                }
                None => subscription = None,
            },
            _ = renew.tick() => {
                let held = match state.redis().await {
                    Ok(mut redis) => lease.acquire_or_renew(&mut redis).await.unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "lease renewal failed");
                        false
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis unreachable; cannot hold the publisher lease");
                        false
                    }
                };
                if held && !leader {
                    tracing::info!(replica = %state.replica_id, "this replica now publishes intents");
                    last_reconcile = None;
                } else if !held && leader {
                    tracing::warn!(replica = %state.replica_id, "lost the intent publisher lease");
                    pending.clear();
                }
                leader = held;
                state.metrics.intent_publisher_leader.set(i64::from(leader));
                if leader && last_reconcile.is_none_or(|t| t.elapsed() >= reconcile_every) {
                    last_reconcile = Some(Instant::now());
                    reconcile_all(&state, &mut pending).await;
                    maintain_metrics_partitions(&state).await;
                    match crate::metrics_ingest::prune_rollups(&state).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(deleted = n, "old path-metric rollups deleted"),
                        Err(e) => tracing::warn!(error = %e, "path-metric rollup retention failed; will retry"),
                    }
                }
            }
            _ = flush.tick(), if leader && !pending.is_empty() => {
                let now = Instant::now();
                let due: Vec<TenantId> = pending.iter().filter(|(_, at)| **at <= now).map(|(t, _)| *t).collect();
                for tenant in due {
                    pending.remove(&tenant);
                    let again = publish_one(&state, tenant).await;
                    schedule(&mut pending, tenant, again);
                }
            }
        }
    }
    if leader {
        if let Ok(mut redis) = state.redis().await {
            if let Err(e) = lease.release(&mut redis).await {
                tracing::warn!(error = %e, "could not release the publisher lease; it expires by itself");
            }
        }
        state.metrics.intent_publisher_leader.set(0);
    }
}
