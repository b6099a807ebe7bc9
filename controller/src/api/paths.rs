//! Paths between sites (created by the intent publisher from the topology) and their metrics.
//!
//! - `GET /paths?site=&status=`, `GET /paths/{id}`: with each path's newest sample (`latest`)
//!   from Redis when it is younger than `metrics.latest_state_ttl_s`
//! - `GET /paths/{id}/metrics?from=&to=&step=` history, raw or bucketed by `step` seconds; a
//!   whole number of minutes from a whole minute reads the one-minute rollups (plus raw
//!   samples for the last, unfinished minute)
//! - `POST /paths/{id}/test` asks the source edge to measure the path now (NATS request to
//!   `sdwan.<tenant>.<site>.cmd`); 503 if the edge does not answer.

use std::time::Duration;

use actix_web::{get, post, web, HttpResponse};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Int4, Nullable, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use patronus_proto::command::{
    Command, CommandReply, CommandRequest, CommandResult, MAX_PATH_TEST_SECONDS,
    PATH_TEST_SETUP_SECONDS,
};
use patronus_proto::{codec, PathId, SiteId, SCHEMA_VERSION};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{record_audit, Ctx, Page};
use super::error::{ApiError, ApiResult};
use crate::db::schema::{endpoints, paths};
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Serialize, Debug, Clone)]
pub struct PathView {
    pub id: Uuid,
    pub src_site_id: Uuid,
    pub dst_site_id: Uuid,
    pub src_uplink: i16,
    pub dst_uplink: i16,
    pub src_uplink_name: String,
    pub dst_uplink_name: String,
    pub status: String,
    pub score: Option<i16>,
    pub status_changed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The newest sample the edge reported, if recent (`metrics.latest_state_ttl_s`).
    pub latest: Option<crate::metrics_ingest::PathState>,
}

type PathTuple = (
    Uuid,
    Uuid,
    Uuid,
    Option<i16>,
    String,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    i16,
    String,
    i16,
    String,
);

fn view(row: PathTuple) -> PathView {
    let (
        id,
        src_site_id,
        dst_site_id,
        score,
        status,
        status_changed_at,
        created_at,
        src_uplink,
        src_uplink_name,
        dst_uplink,
        dst_uplink_name,
    ) = row;
    PathView {
        id,
        src_site_id,
        dst_site_id,
        src_uplink,
        dst_uplink,
        src_uplink_name,
        dst_uplink_name,
        status,
        score,
        status_changed_at,
        created_at,
        latest: None,
    }
}

/// Fill in each path's latest state from Redis. Best effort: without Redis the paths are
/// still served, from PostgreSQL alone.
pub(crate) async fn with_latest(ctx: &Ctx, views: &mut [PathView]) {
    let Ok(tenant) = ctx.tenant() else {
        return;
    };
    let ids: Vec<Uuid> = views.iter().map(|v| v.id).collect();
    match crate::metrics_ingest::latest_states(&ctx.state, tenant, &ids).await {
        Ok(mut states) => {
            for view in views {
                view.latest = states.remove(&view.id);
            }
        }
        Err(e) => {
            tracing::warn!(tenant = %tenant, error = %e, "latest path states unavailable")
        }
    }
}

diesel::alias!(endpoints as dst_endpoints: DstEndpoints);

/// Paths joined with both ends' uplinks, selected as a `PathTuple`, boxed for filtering.
macro_rules! path_rows {
    () => {
        paths::table
            .inner_join(endpoints::table.on(endpoints::id.eq(paths::src_endpoint_id)))
            .inner_join(
                dst_endpoints.on(dst_endpoints
                    .field(endpoints::id)
                    .eq(paths::dst_endpoint_id)),
            )
            .select((
                paths::id,
                paths::src_site_id,
                paths::dst_site_id,
                paths::score,
                paths::status,
                paths::status_changed_at,
                paths::created_at,
                endpoints::uplink_index,
                endpoints::name,
                dst_endpoints.field(endpoints::uplink_index),
                dst_endpoints.field(endpoints::name),
            ))
            .into_boxed()
    };
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    /// Paths starting or ending at this site.
    pub site: Option<Uuid>,
    pub status: Option<String>,
}

const PATH_STATUSES: [&str; 4] = ["up", "degraded", "down", "unknown"];

#[utoipa::path(operation_id = "list_paths", tag = "paths", params(PathQuery), security(("bearer" = [])), responses((status = 200, body = crate::api::context::List<PathView>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/paths")]
async fn list(ctx: Ctx, query: web::Query<PathQuery>) -> ApiResult<HttpResponse> {
    let query = query.into_inner();
    let page = Page::parse(query.limit, query.cursor.as_deref())?;
    if query
        .status
        .as_deref()
        .is_some_and(|s| !PATH_STATUSES.contains(&s))
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("status must be one of {}", PATH_STATUSES.join(", ")),
        ));
    }
    let mut rows = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let mut q = path_rows!();
                if let Some(site) = query.site {
                    q = q.filter(paths::src_site_id.eq(site).or(paths::dst_site_id.eq(site)));
                }
                if let Some(status) = query.status {
                    q = q.filter(paths::status.eq(status));
                }
                q = crate::after_cursor!(q, page, paths::created_at, paths::id);
                let rows: Vec<PathTuple> = q
                    .order((paths::created_at, paths::id))
                    .limit(page.limit + 1)
                    .load(conn)
                    .await?;
                Ok(rows.into_iter().map(view).collect::<Vec<_>>())
            })
        })
        .await?;
    with_latest(&ctx, &mut rows).await;
    Ok(HttpResponse::Ok().json(page.finish(rows, |p| (p.created_at, p.id))))
}

/// Most paths one portal page lists (500 sites with 2 uplinks in a hub-and-spoke mesh need
/// ~4,000).
pub(crate) const MAX_LISTED_PATHS: i64 = 20_000;

/// Every path of the tenant (or those touching `site`), without their latest samples, for the
/// portal (the API pages through `GET /paths` instead).
pub(crate) async fn all_views(ctx: &Ctx, site: Option<Uuid>) -> ApiResult<Vec<PathView>> {
    ctx.tenant_tx(move |conn| {
        Box::pin(async move {
            let mut q = path_rows!();
            if let Some(site) = site {
                q = q.filter(paths::src_site_id.eq(site).or(paths::dst_site_id.eq(site)));
            }
            let rows: Vec<PathTuple> = q
                .order((paths::created_at, paths::id))
                .limit(MAX_LISTED_PATHS)
                .load(conn)
                .await?;
            Ok(rows.into_iter().map(view).collect::<Vec<_>>())
        })
    })
    .await
}

pub(crate) async fn find(ctx: &Ctx, id: Uuid) -> ApiResult<PathView> {
    let row = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let row: Option<PathTuple> = path_rows!()
                    .filter(paths::id.eq(id))
                    .first(conn)
                    .await
                    .optional()?;
                Ok(row.map(view))
            })
        })
        .await?;
    row.ok_or_else(|| ApiError::not_found("path"))
}

#[utoipa::path(operation_id = "get_paths", tag = "paths", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 200, body = PathView), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/paths/{id}")]
async fn get(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    let mut view = [find(&ctx, id.into_inner().id).await?];
    with_latest(&ctx, &mut view).await;
    let [view] = view;
    Ok(HttpResponse::Ok().json(view))
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Bucket width in seconds; absent: raw samples.
    pub step: Option<i64>,
}

/// Longest history one request may span.
const MAX_RANGE_DAYS: i64 = 31;
/// Most points one answer may hold.
const MAX_POINTS: i64 = 10_000;

#[derive(utoipa::ToSchema, QueryableByName, Serialize)]
pub(crate) struct Point {
    #[diesel(sql_type = Timestamptz)]
    pub at: DateTime<Utc>,
    #[diesel(sql_type = Double)]
    pub latency_ms: f64,
    #[diesel(sql_type = Double)]
    pub jitter_ms: f64,
    #[diesel(sql_type = Double)]
    pub packet_loss_pct: f64,
    #[diesel(sql_type = Nullable<Double>)]
    pub bandwidth_mbps: Option<f64>,
    #[diesel(sql_type = Nullable<Int4>)]
    pub mtu: Option<i32>,
    #[diesel(sql_type = Double)]
    pub score: f64,
    #[diesel(sql_type = BigInt)]
    pub samples: i64,
}

#[derive(utoipa::ToSchema, Serialize)]
struct History {
    path_id: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Option<i64>,
    points: Vec<Point>,
}

/// Whether a bucketed history can come from the one-minute rollups without changing the
/// answer: buckets of whole minutes that start on a whole minute.
fn reads_rollup(step: i64, from: DateTime<Utc>) -> bool {
    step >= 60 && step % 60 == 0 && from.timestamp() % 60 == 0 && from.timestamp_subsec_nanos() == 0
}

/// Buckets from `path_metrics_1m` for the whole minutes of [$2, $3), plus the raw samples of
/// the minute `to` falls in (not finished, or not wholly inside the range).
const ROLLUP_HISTORY: &str = "
    SELECT date_bin(make_interval(secs => $4), u.at, $2) AS at,
           (sum(u.latency_sum) / sum(u.samples))::float8 AS latency_ms,
           (sum(u.jitter_sum) / sum(u.samples))::float8 AS jitter_ms,
           (sum(u.loss_sum) / sum(u.samples))::float8 AS packet_loss_pct,
           (sum(u.bandwidth_sum) / nullif(sum(u.bandwidth_samples), 0))::float8 AS bandwidth_mbps,
           min(u.mtu) AS mtu,
           (sum(u.score_sum)::float8 / sum(u.samples))::float8 AS score,
           sum(u.samples)::bigint AS samples
    FROM (
        SELECT minute AS at, samples::bigint AS samples, latency_sum, jitter_sum,
               packet_loss_sum AS loss_sum, bandwidth_sum,
               bandwidth_samples::bigint AS bandwidth_samples, mtu_min AS mtu,
               score_sum::bigint AS score_sum
        FROM path_metrics_1m
        WHERE path_id = $1 AND minute >= $2 AND minute + interval '1 minute' <= $3
        UNION ALL
        SELECT measured_at, 1::bigint, latency_ms::float8, jitter_ms::float8,
               packet_loss_pct::float8, coalesce(bandwidth_mbps, 0)::float8,
               (bandwidth_mbps IS NOT NULL)::int::bigint, mtu, score::bigint
        FROM path_metrics
        WHERE path_id = $1 AND measured_at < $3
          AND measured_at >= greatest($2, date_bin('1 minute', $3, timestamptz '1970-01-01 00:00:00+00'))
    ) AS u
    GROUP BY 1 ORDER BY 1";

/// A path's metric history over `query`'s range (default: the last hour), raw or bucketed:
/// `(from, to, step, points)`. Shared by the API and the portal's charts.
pub(crate) async fn history(
    ctx: &Ctx,
    id: Uuid,
    query: MetricsQuery,
) -> ApiResult<(DateTime<Utc>, DateTime<Utc>, Option<i64>, Vec<Point>)> {
    find(ctx, id).await?;
    let to = query.to.unwrap_or_else(Utc::now);
    let from = query.from.unwrap_or(to - chrono::Duration::hours(1));
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_query",
            "from must be before to",
        ));
    }
    if to - from > chrono::Duration::days(MAX_RANGE_DAYS) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("a range spans at most {MAX_RANGE_DAYS} days"),
        ));
    }
    if let Some(step) = query.step {
        if step < 1 || (to - from).num_seconds() / step > MAX_POINTS {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "step must be at least 1 s and give at most {MAX_POINTS} points over the range"
                ),
            ));
        }
    }
    let step = query.step;
    let rollup = step.is_some_and(|s| reads_rollup(s, from));
    let points = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let points: Vec<Point> = match step {
                    Some(step) if rollup => {
                        diesel::sql_query(ROLLUP_HISTORY)
                            .bind::<SqlUuid, _>(id)
                            .bind::<Timestamptz, _>(from)
                            .bind::<Timestamptz, _>(to)
                            .bind::<Double, _>(step as f64)
                            .load(conn)
                            .await?
                    }
                    Some(step) => {
                        diesel::sql_query(
                            "SELECT date_bin(make_interval(secs => $4), measured_at, $2) AS at,
                                    avg(latency_ms)::float8 AS latency_ms, avg(jitter_ms)::float8 AS jitter_ms,
                                    avg(packet_loss_pct)::float8 AS packet_loss_pct,
                                    avg(bandwidth_mbps)::float8 AS bandwidth_mbps, min(mtu) AS mtu,
                                    avg(score)::float8 AS score, count(*) AS samples
                             FROM path_metrics
                             WHERE path_id = $1 AND measured_at >= $2 AND measured_at < $3
                             GROUP BY 1 ORDER BY 1",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<Timestamptz, _>(from)
                        .bind::<Timestamptz, _>(to)
                        .bind::<Double, _>(step as f64)
                        .load(conn)
                        .await?
                    }
                    None => {
                        diesel::sql_query(
                            "SELECT measured_at AS at, latency_ms::float8 AS latency_ms, jitter_ms::float8 AS jitter_ms,
                                    packet_loss_pct::float8 AS packet_loss_pct, bandwidth_mbps::float8 AS bandwidth_mbps,
                                    mtu, score::float8 AS score, 1::bigint AS samples
                             FROM path_metrics
                             WHERE path_id = $1 AND measured_at >= $2 AND measured_at < $3
                             ORDER BY measured_at LIMIT $4",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<Timestamptz, _>(from)
                        .bind::<Timestamptz, _>(to)
                        .bind::<BigInt, _>(MAX_POINTS)
                        .load(conn)
                        .await?
                    }
                };
                Ok(points)
            })
        })
        .await?;
    Ok((from, to, step, points))
}

#[utoipa::path(operation_id = "metrics_history_paths", tag = "paths", params(("id" = Uuid, Path, description = "id of the resource"), MetricsQuery), security(("bearer" = [])), responses((status = 200, body = History), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/paths/{id}/metrics")]
async fn metrics_history(
    ctx: Ctx,
    id: web::Path<super::context::IdPath>,
    query: web::Query<MetricsQuery>,
) -> ApiResult<HttpResponse> {
    let id = id.into_inner().id;
    let query = query.into_inner();
    let (from, to, step, points) = history(&ctx, id, query).await?;
    Ok(HttpResponse::Ok().json(History {
        path_id: id,
        from,
        to,
        step,
        points,
    }))
}

#[derive(utoipa::ToSchema, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TestBody {
    /// Seconds of active bandwidth test (1-60, default 5).
    pub duration_s: Option<u32>,
}

#[utoipa::path(operation_id = "test_paths", tag = "paths", params(("id" = Uuid, Path, description = "id of the resource")), request_body(content = Option<TestBody>), security(("bearer" = [])), responses((status = 200, body = Object, description = "the path's metrics as the edge measured them"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/paths/{id}/test")]
async fn test(
    ctx: Ctx,
    id: web::Path<super::context::IdPath>,
    body: Option<web::Json<TestBody>>,
) -> ApiResult<HttpResponse> {
    let duration_s = body.and_then(|b| b.into_inner().duration_s).unwrap_or(5);
    let (path, metrics) = run_test(&ctx, id.into_inner().id, duration_s).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "path_id": path, "metrics": metrics })))
}

/// Ask the path's source edge to test it now for `duration_s` seconds (audited; the caller
/// must be allowed to write): the metrics it measured. Shared by the API and the portal.
pub(crate) async fn run_test(
    ctx: &Ctx,
    id: Uuid,
    duration_s: u32,
) -> ApiResult<(Uuid, patronus_proto::metrics::PathMetrics)> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let path = find(ctx, id).await?;
    if duration_s == 0 || duration_s > MAX_PATH_TEST_SECONDS {
        return Err(ApiError::unprocessable(
            "invalid_value",
            format!("duration_s must be 1-{MAX_PATH_TEST_SECONDS}"),
        ));
    }
    let audit = ctx.audit(
        "path.test",
        "path",
        path.id,
        serde_json::json!({ "duration_s": duration_s }),
    );
    ctx.tenant_tx(move |conn| Box::pin(async move { record_audit(conn, audit).await }))
        .await?;
    let request = CommandRequest {
        schema_version: SCHEMA_VERSION,
        request_id: ctx.request_id.clone(),
        command: Command::PathTest {
            path: PathId(path.id),
            duration_s,
        },
    };
    let subject = patronus_proto::subjects::cmd_subject(tenant, SiteId(path.src_site_id));
    // The test's own seconds, its setup (connect, its turn at the sink) and the reply's trip.
    let timeout = Duration::from_secs(u64::from(duration_s + PATH_TEST_SETUP_SECONDS) + 2);
    let link = ctx.state.tenant_nats(tenant).await.map_err(|e| {
        ApiError::unavailable(format!(
            "the tenant's NATS account is not reachable ({e}); try again shortly"
        ))
    })?;
    let reply = tokio::time::timeout(
        timeout,
        link.client.request(subject, codec::encode(&request).into()),
    )
    .await;
    let message = match reply {
        Err(_) => {
            return Err(ApiError::new(
                actix_web::http::StatusCode::GATEWAY_TIMEOUT,
                "edge_timeout",
                "the site's edge did not answer in time; check that it is online",
            ))
        }
        Ok(Err(e)) => {
            return Err(ApiError::unavailable(format!(
                "the site's edge is not reachable over NATS ({}); check that it is online",
                e.kind()
            )))
        }
        Ok(Ok(message)) => message,
    };
    let reply: CommandReply = codec::decode(&message.payload).map_err(|e| {
        ApiError::new(
            actix_web::http::StatusCode::BAD_GATEWAY,
            "bad_edge_reply",
            format!("the edge answered with an unreadable reply: {e}"),
        )
    })?;
    match reply.result {
        CommandResult::PathTest { metrics, .. } => Ok((path.id, metrics)),
        CommandResult::Failed { error } => Err(ApiError::new(
            actix_web::http::StatusCode::BAD_GATEWAY,
            "edge_failed",
            error,
        )),
        _ => Err(ApiError::new(
            actix_web::http::StatusCode::BAD_GATEWAY,
            "bad_edge_reply",
            "the edge answered something other than a path test",
        )),
    }
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list)
        .service(get)
        .service(metrics_history)
        .service(test);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_minute_buckets_from_a_whole_minute_read_the_rollup() {
        let aligned = DateTime::from_timestamp(30_000_000 * 60, 0).unwrap();
        assert!(reads_rollup(60, aligned));
        assert!(reads_rollup(3600, aligned));
        assert!(!reads_rollup(90, aligned));
        assert!(!reads_rollup(30, aligned));
        assert!(!reads_rollup(60, aligned + chrono::Duration::seconds(1)));
        assert!(!reads_rollup(
            60,
            aligned + chrono::Duration::milliseconds(1)
        ));
    }
}
