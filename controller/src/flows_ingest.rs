//! Flow reports from edges into the `flows` table (served at `/api/v1/flows`).
//!
//! Edges publish [`FlowReport`]s on `sdwan.<tenant>.<site>.flows` inside their tenant's NATS
//! account, so the controller subscribes through each tenant's link: at start, and every
//! [`RESCAN`] for tenants that appeared since. A report is checked before it is stored: it
//! must decode and validate, and name the tenant and site of the subject it came on (an edge
//! can only publish its own subject, but the payload is not trusted for that); anything else
//! is logged and counted as dropped. Each report is one transaction in the tenant's scope
//! (RLS), upserting by the flow's 5-tuple and start. A policy or path id the database does
//! not know (an intent from before a change) is stored as unknown rather than refused.

use std::collections::HashSet;
use std::time::Duration;

use diesel::sql_types::{
    BigInt, Inet, Integer, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::RunQueryDsl;
use futures_util::StreamExt;
use patronus_proto::codec;
use patronus_proto::flows::FlowReport;
use patronus_proto::{SiteId, TenantId};
use tokio::sync::watch;

use crate::db::{self, Scope};
use crate::server::AppState;

/// How often tenants without a subscription are looked for.
pub const RESCAN: Duration = Duration::from_secs(30);

/// The tenant and site a flows subject names (`sdwan.<tenant>.<site>.flows`).
pub fn subject_scope(subject: &str) -> Option<(TenantId, SiteId)> {
    let mut parts = subject.split('.');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("sdwan"), Some(tenant), Some(site), Some("flows"), None) => {
            Some((tenant.parse().ok()?, site.parse().ok()?))
        }
        _ => None,
    }
}

fn unix_ms(ms: u64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Store one report; returns how many flows were written.
async fn store(state: &AppState, report: FlowReport) -> Result<usize, String> {
    let tenant = report.tenant;
    let mut conn = state.db.get().await.map_err(|e| e.to_string())?;
    db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            let mut written = 0;
            for flow in &report.flows {
                let query = diesel::sql_query(
                    "INSERT INTO flows (tenant_id, site_id, src_ip, dst_ip, src_port, dst_port, protocol,
                        app_class, policy_id, path_id, started_at, last_packet_at,
                        bytes_tx, bytes_rx, packets_tx, packets_rx, reported_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                        (SELECT id FROM policies WHERE tenant_id = $1 AND id = $9),
                        (SELECT id FROM paths WHERE tenant_id = $1 AND id = $10),
                        $11, $12, $13, $14, $15, $16, now())
                     ON CONFLICT (site_id, src_ip, dst_ip, src_port, dst_port, protocol, started_at)
                     DO UPDATE SET app_class = EXCLUDED.app_class, policy_id = EXCLUDED.policy_id,
                        path_id = EXCLUDED.path_id, last_packet_at = EXCLUDED.last_packet_at,
                        bytes_tx = EXCLUDED.bytes_tx, bytes_rx = EXCLUDED.bytes_rx,
                        packets_tx = EXCLUDED.packets_tx, packets_rx = EXCLUDED.packets_rx,
                        reported_at = now()",
                )
                .bind::<SqlUuid, _>(tenant.0)
                .bind::<SqlUuid, _>(report.site.0)
                .bind::<Inet, _>(ipnet::IpNet::from(flow.key.src_ip))
                .bind::<Inet, _>(ipnet::IpNet::from(flow.key.dst_ip))
                .bind::<Integer, _>(i32::from(flow.key.src_port))
                .bind::<Integer, _>(i32::from(flow.key.dst_port))
                .bind::<SmallInt, _>(i16::from(flow.key.protocol))
                .bind::<Text, _>(flow.app_class.0.clone())
                .bind::<Nullable<SqlUuid>, _>(flow.policy.map(|p| p.0))
                .bind::<Nullable<SqlUuid>, _>(flow.path.map(|p| p.0))
                .bind::<Timestamptz, _>(unix_ms(flow.started_at_unix_ms))
                .bind::<Timestamptz, _>(unix_ms(flow.last_packet_at_unix_ms))
                .bind::<BigInt, _>(clamp_i64(flow.bytes_tx))
                .bind::<BigInt, _>(clamp_i64(flow.bytes_rx))
                .bind::<BigInt, _>(clamp_i64(flow.packets_tx))
                .bind::<BigInt, _>(clamp_i64(flow.packets_rx));
                written += query.execute(conn).await?;
            }
            Ok::<usize, db::DbError>(written)
        })
    })
    .await
    .map_err(|e| e.to_string())
}

/// Take one tenant's flow reports until its subscription ends.
async fn follow(state: AppState, tenant: TenantId, mut reports: async_nats::Subscriber) {
    while let Some(message) = reports.next().await {
        let subject = message.subject.to_string();
        let Some((subject_tenant, subject_site)) = subject_scope(&subject) else {
            state.metrics.flow_reports_dropped.inc();
            tracing::warn!(tenant = %tenant, subject, "flow report on an unexpected subject dropped");
            continue;
        };
        let report = match codec::decode::<FlowReport>(&message.payload) {
            Ok(report) => report,
            Err(e) => {
                state.metrics.flow_reports_dropped.inc();
                tracing::warn!(tenant = %tenant, site = %subject_site, error = %e, "malformed flow report dropped");
                continue;
            }
        };
        if report.tenant != tenant || subject_tenant != tenant || report.site != subject_site {
            state.metrics.flow_reports_dropped.inc();
            tracing::warn!(tenant = %tenant, site = %subject_site, "flow report naming another tenant or site dropped");
            continue;
        }
        let site = report.site;
        match store(&state, report).await {
            Ok(n) => {
                state.metrics.flows_stored.add(n as u64);
            }
            Err(e) => {
                state.metrics.flow_reports_dropped.inc();
                tracing::warn!(tenant = %tenant, site = %site, error = %e, "storing a flow report failed");
            }
        }
    }
}

/// Subscribe to every tenant's flow reports, now and as tenants appear, until `stop`.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut following: HashSet<TenantId> = HashSet::new();
    let mut tasks = Vec::new();
    let mut rescan = tokio::time::interval(RESCAN);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = rescan.tick() => {
                let tenants = match crate::intents::service::all_tenants(&state).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list tenants for flow reports yet");
                        continue;
                    }
                };
                let new: Vec<TenantId> =
                    tenants.into_iter().filter(|t| !following.contains(t)).collect();
                for tenant in new {
                    let link = match state.tenant_nats(tenant).await {
                        Ok(link) => link,
                        Err(e) => {
                            tracing::warn!(tenant = %tenant, error = %e, "no NATS link for flow reports yet");
                            continue;
                        }
                    };
                    match link.client.subscribe(format!("sdwan.{tenant}.*.flows")).await {
                        Ok(sub) => {
                            following.insert(tenant);
                            tasks.push(tokio::spawn(follow(state.clone(), tenant, sub)));
                        }
                        Err(e) => tracing::warn!(tenant = %tenant, error = %e, "cannot subscribe to flow reports yet"),
                    }
                }
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

    #[test]
    fn the_subject_names_tenant_and_site() {
        let t = TenantId(uuid::Uuid::from_u128(1));
        let s = SiteId(uuid::Uuid::from_u128(2));
        assert_eq!(
            subject_scope(&patronus_proto::subjects::flows_subject(t, s)),
            Some((t, s))
        );
        assert_eq!(subject_scope("sdwan.x.y.flows"), None);
        assert_eq!(subject_scope(&format!("sdwan.{t}.{s}.events")), None);
        assert_eq!(subject_scope(&format!("sdwan.{t}.{s}.flows.more")), None);
    }
}
