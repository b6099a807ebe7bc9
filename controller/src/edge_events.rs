//! What edges report applying, recorded for the intent publisher; when each site was last
//! heard from (`sites.last_seen_at`, at most every [`LAST_SEEN_EVERY`]); and every edge
//! event kept in the tenant's recent history (`events::remember`) for the portal.
//!
//! Edges publish their events on `sdwan.<tenant>.<site>.events` (core NATS, inside the
//! tenant's account). `/ws/sdwan` relays them to operators; this module keeps the one fact the
//! controller itself acts on: the highest intent revision each site applied, from
//! `IntentApplied` and from every `Heartbeat` (which repeats it, so a lost event or a
//! controller restart costs one heartbeat interval). It goes to
//! `site_intents.applied_revision`, where the publisher reads it to commit WireGuard key
//! rotations ([`crate::intents::rotation`]); a rise that can complete a pending rotation
//! signals the publisher.
//!
//! A tenant is followed from its first intent-change signal (an enrollment sends one) or the
//! 30 s rescan, whichever comes first. One queue group per deployment, so each report is
//! handled by one replica. The site is the
//! subject's (which NATS permissions bind to the publisher), never the body's. A report is
//! the edge's own word: an edge claiming more than it applied only hurts its own tunnels to a
//! rotating peer (the rotation commits before it has the new key). Each replica remembers the
//! revision it last recorded per site, so a heartbeat repeating it costs no query.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use futures_util::StreamExt;
use patronus_proto::events::{EventEnvelope, SdwanEvent};
use patronus_proto::subjects::{parse_site_subject, Channel};
use patronus_proto::{codec, SiteId, TenantId};
use tokio::sync::watch;

use crate::db::schema::{site_intents, sites};
use crate::db::{self, Scope};
use crate::server::AppState;

/// The applied revision an edge event reports, if it reports one.
pub fn applied_revision(event: &SdwanEvent) -> Option<u64> {
    match event {
        SdwanEvent::IntentApplied { revision } => Some(*revision),
        SdwanEvent::Heartbeat {
            applied_revision, ..
        } => Some(*applied_revision),
        _ => None,
    }
    .filter(|r| *r > 0)
}

/// Revisions this replica recorded, per site.
type Recorded = Arc<Mutex<HashMap<SiteId, u64>>>;

/// What recording one report did.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordOutcome {
    /// The stored revision rose.
    pub rose: bool,
    /// The site has a published intent (so the stored value is now at least the report's).
    pub known: bool,
    /// A pending key rotation announced at or below this revision may now commit.
    pub rotation_waiting: bool,
}

/// Store `revision` as `site`'s applied revision if it is higher than the stored one.
pub async fn record(
    state: &AppState,
    tenant: TenantId,
    site: SiteId,
    revision: u64,
) -> Result<RecordOutcome, db::DbError> {
    let revision = i64::try_from(revision).unwrap_or(i64::MAX);
    let mut conn = state.db.get().await?;
    db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            let updated = diesel::update(
                site_intents::table
                    .filter(site_intents::site_id.eq(site.0))
                    .filter(
                        site_intents::applied_revision
                            .is_null()
                            .or(site_intents::applied_revision.lt(revision)),
                    ),
            )
            .set((
                site_intents::applied_revision.eq(Some(revision)),
                site_intents::applied_at.eq(Some(Utc::now())),
            ))
            .execute(conn)
            .await?;
            let known = updated > 0
                || diesel::select(diesel::dsl::exists(
                    site_intents::table.filter(site_intents::site_id.eq(site.0)),
                ))
                .get_result::<bool>(conn)
                .await?;
            let rotation_waiting = updated > 0
                && diesel::select(diesel::dsl::exists(
                    sites::table.filter(sites::wg_next_announce_revision.le(revision)),
                ))
                .get_result::<bool>(conn)
                .await?;
            Ok::<_, db::DbError>(RecordOutcome {
                rose: updated > 0,
                known,
                rotation_waiting,
            })
        })
    })
    .await
}

/// How often a site's `last_seen_at` is written at most (each replica), from its events.
pub const LAST_SEEN_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Note that `site` was heard from now (`sites.last_seen_at`, shown by the portal).
async fn touch(state: &AppState, tenant: TenantId, site: SiteId) -> Result<(), db::DbError> {
    let mut conn = state.db.get().await?;
    db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            diesel::update(sites::table.filter(sites::id.eq(site.0)))
                .set(sites::last_seen_at.eq(Some(Utc::now())))
                .execute(conn)
                .await?;
            Ok::<_, db::DbError>(())
        })
    })
    .await
}

/// Take one tenant's edge events until the subscription ends.
async fn follow(
    state: AppState,
    tenant: TenantId,
    mut events: async_nats::Subscriber,
    recorded: Recorded,
) {
    let mut seen: HashMap<SiteId, std::time::Instant> = HashMap::new();
    while let Some(message) = events.next().await {
        let Ok((subject_tenant, site, Channel::Events)) = parse_site_subject(&message.subject)
        else {
            continue;
        };
        if subject_tenant != tenant {
            continue;
        }
        let envelope = match codec::decode::<EventEnvelope>(&message.payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::debug!(tenant = %tenant, site = %site, error = %e, "undecodable edge event ignored");
                continue;
            }
        };
        if seen
            .get(&site)
            .is_none_or(|at| at.elapsed() >= LAST_SEEN_EVERY)
        {
            seen.insert(site, std::time::Instant::now());
            if let Err(e) = touch(&state, tenant, site).await {
                tracing::debug!(tenant = %tenant, site = %site, error = %e, "last seen not recorded");
            }
        }
        // The portal's recent events: the edge's report as received, with the subject's
        // tenant and site (never the body's).
        let mut kept = envelope.clone();
        kept.tenant = tenant;
        kept.site = Some(site);
        crate::events::remember(&state, &kept).await;
        let Some(revision) = applied_revision(&envelope.event) else {
            continue;
        };
        let seen = recorded
            .lock()
            .map(|r| r.get(&site).copied())
            .unwrap_or_default();
        if seen.is_some_and(|seen| seen >= revision) {
            continue;
        }
        match record(&state, tenant, site, revision).await {
            Ok(outcome) => {
                if outcome.known {
                    if let Ok(mut r) = recorded.lock() {
                        r.insert(site, revision);
                    }
                }
                if outcome.rotation_waiting {
                    tracing::debug!(tenant = %tenant, site = %site, revision, "a peer applied; checking pending key rotations");
                    state.intents_changed(tenant).await;
                }
            }
            Err(e) => {
                tracing::warn!(tenant = %tenant, site = %site, error = %e, "recording an applied revision failed; the next heartbeat retries")
            }
        }
    }
}

/// Subscribe to `tenant`'s edge events (one replica of the deployment's queue group gets
/// each) and follow them in a task.
async fn start_following(
    state: &AppState,
    tenant: TenantId,
    group: &str,
    recorded: &Recorded,
) -> Option<tokio::task::JoinHandle<()>> {
    let link = match state.tenant_nats(tenant).await {
        Ok(link) => link,
        Err(e) => {
            tracing::warn!(tenant = %tenant, error = %e, "no NATS link for edge events yet");
            return None;
        }
    };
    match link
        .client
        .queue_subscribe(format!("sdwan.{tenant}.*.events"), group.to_owned())
        .await
    {
        Ok(sub) => Some(tokio::spawn(follow(
            state.clone(),
            tenant,
            sub,
            recorded.clone(),
        ))),
        Err(e) => {
            tracing::warn!(tenant = %tenant, error = %e, "cannot subscribe to edge events yet");
            None
        }
    }
}

/// Follow every tenant's edge events, now and as tenants appear, until `stop`. A tenant is
/// followed from its first intent-change signal (an enrollment sends one), or at the latest
/// from the next rescan.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut following: HashSet<TenantId> = HashSet::new();
    let mut tasks = Vec::new();
    let recorded: Recorded = Arc::default();
    let group = format!("patronus-applied-{}", state.deployment);
    let mut rescan = tokio::time::interval(crate::flows_ingest::RESCAN);
    let mut signals = state
        .nats
        .subscribe(crate::server::intents_changed_subject(&state.deployment))
        .await
        .map_err(|e| tracing::warn!(error = %e, "edge events: new tenants wait for the rescan"))
        .ok();
    loop {
        let wanted: Vec<TenantId> = tokio::select! {
            _ = stop.changed() => break,
            _ = rescan.tick() => match crate::intents::service::all_tenants(&state).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list tenants for edge events yet");
                    continue;
                }
            },
            Some(signal) = async {
                match signals.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => std::str::from_utf8(&signal.payload)
                .ok()
                .and_then(|t| t.parse::<TenantId>().ok())
                .into_iter()
                .collect(),
        };
        for tenant in wanted {
            if following.contains(&tenant) {
                continue;
            }
            if let Some(task) = start_following(&state, tenant, &group, &recorded).await {
                following.insert(tenant);
                tasks.push(task);
            }
        }
    }
    for task in tasks {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patronus_proto::events::DataplaneMode;

    #[test]
    fn applied_revisions_come_from_applied_events_and_heartbeats() {
        assert_eq!(
            applied_revision(&SdwanEvent::IntentApplied { revision: 7 }),
            Some(7)
        );
        let heartbeat = |applied_revision| SdwanEvent::Heartbeat {
            applied_revision,
            uptime_s: 1,
            tunnels_up: 0,
            paths_up: 0,
            paths_total: 0,
            dataplane: DataplaneMode::RoutesOnly,
        };
        assert_eq!(applied_revision(&heartbeat(9)), Some(9));
        // Nothing applied yet.
        assert_eq!(applied_revision(&heartbeat(0)), None);
        assert_eq!(
            applied_revision(&SdwanEvent::IntentRejected {
                revision: 8,
                reason: "no".into()
            }),
            None
        );
        assert_eq!(applied_revision(&SdwanEvent::Unknown), None);
    }
}
