//! Events: what the controller itself announces, and the WebSocket stream `/ws/sdwan`.
//!
//! Edges publish on `sdwan.<tenant>.<site>.events`; the controller publishes its own events
//! (site added or removed, topology changed) on `patronus.events.<tenant>`. Every replica
//! subscribes with core NATS, so a WebSocket client on any replica sees every event of its
//! tenant(s).
//!
//! Each client gets a bounded buffer: when it fills (the client reads too slowly) the socket is
//! closed with a reason, and the server never waits on a slow client. Query parameters:
//! `tenant` (an MSP admin picking one tenant; all of the MSP's otherwise), `site`, and `types`
//! (comma-separated event types such as `path_failed,failover_triggered`).

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{get, web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use futures_util::StreamExt;
use patronus_proto::events::{EventEnvelope, SdwanEvent};
use patronus_proto::subjects::parse_site_subject;
use patronus_proto::{codec, SiteId, TenantId, SCHEMA_VERSION};
use serde::Deserialize;

use crate::api::context::Ctx;
use crate::api::error::{ApiError, ApiResult};
use crate::db::schema::tenants;
use crate::server::AppState;

/// Events a client may have queued before it counts as too slow and is disconnected.
pub const CLIENT_BUFFER: usize = 256;
const CONTROLLER_EVENTS: &str = "patronus.events";

/// Where the controller announces a tenant's events to every replica (`patronus.events.<tenant>`).
pub fn controller_subject(tenant: TenantId) -> String {
    format!("{CONTROLLER_EVENTS}.{tenant}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Events kept per tenant for the portal's "recent events" (newest first).
pub const RECENT_EVENTS: isize = 500;

fn recent_key(tenant: TenantId) -> String {
    format!("patronus:events:{tenant}")
}

/// Whether an event is worth keeping in the tenant's recent history: everything an operator
/// would look for, not the periodic heartbeats and metrics.
pub fn worth_keeping(event: &SdwanEvent) -> bool {
    !matches!(
        event,
        SdwanEvent::Heartbeat { .. } | SdwanEvent::PathMetrics { .. } | SdwanEvent::Unknown
    )
}

/// Keep `envelope` in its tenant's recent events (a capped Redis list). Best effort: the live
/// stream does not depend on it.
pub async fn remember(state: &AppState, envelope: &EventEnvelope) {
    if !worth_keeping(&envelope.event) {
        return;
    }
    let Ok(json) = serde_json::to_string(envelope) else {
        return;
    };
    let key = recent_key(envelope.tenant);
    let stored = async {
        let mut redis = state.redis().await?;
        redis::pipe()
            .lpush(&key, json)
            .ltrim(&key, 0, RECENT_EVENTS - 1)
            .query_async::<()>(&mut redis)
            .await
    }
    .await;
    if let Err(e) = stored {
        tracing::debug!(tenant = %envelope.tenant, error = %e, "event not kept in the recent history");
    }
}

/// The tenant's `limit` most recent events, newest first (undecodable entries skipped).
pub async fn recent(
    state: &AppState,
    tenant: TenantId,
    limit: usize,
) -> Result<Vec<EventEnvelope>, redis::RedisError> {
    let mut redis = state.redis().await?;
    let stop = isize::try_from(limit)
        .unwrap_or(RECENT_EVENTS)
        .clamp(1, RECENT_EVENTS)
        - 1;
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(recent_key(tenant))
        .arg(0)
        .arg(stop)
        .query_async(&mut redis)
        .await?;
    Ok(raw
        .iter()
        .filter_map(|json| serde_json::from_str::<EventEnvelope>(json).ok())
        .filter(|e| e.tenant == tenant)
        .collect())
}

impl AppState {
    /// Announce a controller event to every replica's WebSocket clients. Best effort.
    pub async fn emit(&self, tenant: TenantId, site: Option<SiteId>, event: SdwanEvent) {
        let envelope = EventEnvelope {
            schema_version: SCHEMA_VERSION,
            tenant,
            site,
            at_unix_ms: now_ms(),
            event,
        };
        remember(self, &envelope).await;
        if let Err(e) = self
            .nats
            .publish(controller_subject(tenant), codec::encode(&envelope).into())
            .await
        {
            tracing::warn!(tenant = %tenant, error = %e, "could not publish an event");
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    pub tenant: Option<TenantId>,
    pub site: Option<SiteId>,
    pub types: Option<String>,
}

/// The tenant an event came from, trusting the subject (which NATS permissions bind to the
/// publisher) over the body.
fn subject_tenant(subject: &str) -> Option<TenantId> {
    if let Ok((tenant, _, _)) = parse_site_subject(subject) {
        return Some(tenant);
    }
    subject
        .strip_prefix(CONTROLLER_EVENTS)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|t| t.parse().ok())
}

fn event_type(event: &SdwanEvent) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

#[get("/ws/sdwan")]
pub async fn stream(
    ctx: Ctx,
    req: HttpRequest,
    body: web::Payload,
    query: web::Query<StreamQuery>,
) -> ApiResult<HttpResponse> {
    let query = query.into_inner();
    let state = ctx.state.clone();
    // Which tenants this client may see.
    let tenants: HashSet<TenantId> = match (ctx.principal.tenant, query.tenant) {
        (Some(own), Some(other)) if own != other => return Err(ApiError::not_found("tenant")),
        (Some(own), _) => [own].into(),
        (None, wanted) => {
            let msp = ctx.principal.msp;
            let ids: Vec<uuid::Uuid> = ctx
                .msp_tx(move |conn| {
                    Box::pin(async move {
                        Ok(tenants::table
                            .filter(tenants::msp_id.eq(msp))
                            .select(tenants::id)
                            .load(conn)
                            .await?)
                    })
                })
                .await?;
            let all: HashSet<TenantId> = ids.into_iter().map(TenantId).collect();
            match wanted {
                Some(t) if all.contains(&t) => [t].into(),
                Some(_) => return Err(ApiError::not_found("tenant")),
                None => all,
            }
        }
    };
    let types: Option<HashSet<String>> = query.types.map(|t| {
        t.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    });
    let site_filter = query.site;

    let subjects: Vec<String> = if tenants.len() == 1 {
        let tenant = *tenants.iter().next().expect("one tenant");
        vec![
            format!("sdwan.{tenant}.*.events"),
            controller_subject(tenant),
        ]
    } else {
        vec!["sdwan.*.*.events".into(), format!("{CONTROLLER_EVENTS}.*")]
    };
    let mut subscriptions = Vec::new();
    for subject in subjects {
        subscriptions.push(
            state
                .nats
                .subscribe(subject)
                .await
                .map_err(|e| ApiError::unavailable(format!("event stream unavailable: {e}")))?,
        );
    }
    let (response, mut session, mut incoming) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::bad_request("not_websocket", e.to_string()))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(CLIENT_BUFFER);
    let (overflow_tx, mut overflow_rx) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(tenants = tenants.len(), "event stream opened");

    // Reader: NATS → filter → bounded buffer. Never waits on the client.
    let mut merged = futures_util::stream::select_all(subscriptions);
    let reader = actix_web::rt::spawn(async move {
        let mut overflow_tx = Some(overflow_tx);
        while let Some(message) = merged.next().await {
            let Some(tenant) = subject_tenant(&message.subject) else {
                continue;
            };
            if !tenants.contains(&tenant) {
                continue;
            }
            let Ok(envelope) = codec::decode::<EventEnvelope>(&message.payload) else {
                tracing::debug!(subject = %message.subject, "malformed event dropped");
                continue;
            };
            if envelope.tenant != tenant {
                tracing::warn!(subject = %message.subject, "event claiming another tenant dropped");
                continue;
            }
            if site_filter.is_some_and(|s| envelope.site != Some(s)) {
                continue;
            }
            if types
                .as_ref()
                .is_some_and(|t| !t.contains(&event_type(&envelope.event)))
            {
                continue;
            }
            let text = String::from_utf8_lossy(&codec::encode(&envelope)).into_owned();
            match tx.try_send(text) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    if let Some(signal) = overflow_tx.take() {
                        let _ = signal.send(());
                    }
                    break;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    });

    // Writer: buffer → socket; also answers pings and notices the client leaving. A send to a
    // client that stopped reading can block; the overflow signal interrupts it.
    let metrics = state.metrics.clone();
    actix_web::rt::spawn(async move {
        let mut slow = false;
        loop {
            tokio::select! {
                _ = &mut overflow_rx => { slow = true; break; }
                next = rx.recv() => match next {
                    Some(text) => {
                        tokio::select! {
                            sent = session.text(text) => if sent.is_err() { break },
                            _ = &mut overflow_rx => { slow = true; break; }
                        }
                    }
                    None => break,
                },
                message = incoming.next() => match message {
                    Some(Ok(Message::Ping(bytes))) => {
                        if session.pong(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        reader.abort();
        let reason = slow.then(|| CloseReason {
            code: CloseCode::Policy,
            description: Some(format!(
                "client too slow: more than {CLIENT_BUFFER} events queued"
            )),
        });
        if slow {
            metrics.ws_slow_clients_dropped.inc();
            tracing::warn!("event stream client too slow; disconnecting");
        }
        // The close frame may itself be stuck behind unread data: give it a moment, then drop
        // the session, which ends the connection either way.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(1), session.close(reason)).await;
        tracing::info!("event stream closed");
    });
    Ok(response)
}
