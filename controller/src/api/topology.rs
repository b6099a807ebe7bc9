//! The tenant's mesh as a graph, and its settings.
//!
//! - `GET /topology`: nodes (every site, with why it is not meshed when it is not) and edges
//!   (peered pairs with their paths), computed by the same engine the intents use.
//! - `PUT /topology`: replace the settings (validated by computing the topology first).
//! - `POST /topology/optimize`: recompute and republish now (hub assignment rebalanced).

use std::collections::HashMap;

use actix_web::{get, post, put, web, HttpResponse};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;
use uuid::Uuid;

use super::context::{record_audit, Ctx};
use super::error::{ApiError, ApiResult};
use crate::db::schema::{paths, tenants};
use crate::intents::compile::compile;
use crate::intents::store::load_snapshot;
use crate::topology::TopologySettings;
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Serialize)]
struct Node {
    id: Uuid,
    name: String,
    region: Option<String>,
    hub: bool,
    meshed: bool,
    /// Why a site is not in the mesh (not enrolled, revoked, no uplinks).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct EdgePath {
    id: Option<Uuid>,
    a_uplink: u8,
    b_uplink: u8,
    status: Option<String>,
    score: Option<i16>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct Edge {
    a: Uuid,
    b: Uuid,
    paths: Vec<EdgePath>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct Graph {
    settings: TopologySettings,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    /// Set when the settings cannot be satisfied (the intents keep their last good state).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[utoipa::path(operation_id = "get_topology", tag = "topology", security(("bearer" = [])), responses((status = 200, body = Graph), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/topology")]
async fn get(ctx: Ctx) -> ApiResult<HttpResponse> {
    graph(ctx).await
}

async fn graph(ctx: Ctx) -> ApiResult<HttpResponse> {
    let tenant = ctx.tenant()?;
    let secret = ctx.state.probe_secret.clone();
    let graph = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let snapshot = load_snapshot(conn, tenant)
                    .await
                    .map_err(ApiError::internal)?;
                let path_status: HashMap<Uuid, (String, Option<i16>)> = paths::table
                    .select((paths::id, paths::status, paths::score))
                    .load::<(Uuid, String, Option<i16>)>(conn)
                    .await?
                    .into_iter()
                    .map(|(id, status, score)| (id, (status, score)))
                    .collect();
                let compiled = compile(&snapshot, &secret, 0);
                let (topology, error) = match compiled {
                    Ok(c) => (Some(c.topology), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                let nodes = snapshot
                    .sites
                    .iter()
                    .map(|s| {
                        let reason = if s.revoked {
                            Some("revoked")
                        } else if s.public_key.is_none() {
                            Some("not enrolled")
                        } else if s.uplinks.is_empty() {
                            Some("no uplinks")
                        } else {
                            None
                        };
                        Node {
                            id: s.id.0,
                            name: s.name.clone(),
                            region: s.region.clone(),
                            hub: topology.as_ref().is_some_and(|t| t.hubs.contains(&s.id)),
                            meshed: reason.is_none() && topology.is_some(),
                            reason,
                        }
                    })
                    .collect();
                let edges = topology
                    .as_ref()
                    .map(|t| {
                        t.peerings
                            .iter()
                            .map(|((a, b), pairs)| Edge {
                                a: a.0,
                                b: b.0,
                                paths: pairs
                                    .iter()
                                    .map(|(ua, ub)| {
                                        let id =
                                            snapshot.path_ids.get(&(*a, *ua, *b, *ub)).map(|p| p.0);
                                        let state = id.and_then(|id| path_status.get(&id));
                                        EdgePath {
                                            id,
                                            a_uplink: *ua,
                                            b_uplink: *ub,
                                            status: state.map(|s| s.0.clone()),
                                            score: state.and_then(|s| s.1),
                                        }
                                    })
                                    .collect(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(Graph {
                    settings: snapshot.topology.clone(),
                    nodes,
                    edges,
                    error,
                })
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(graph))
}

#[utoipa::path(operation_id = "put_topology", tag = "topology", request_body = TopologySettings, security(("bearer" = [])), responses((status = 200, body = Graph), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[put("/topology")]
async fn put(ctx: Ctx, body: web::Json<TopologySettings>) -> ApiResult<HttpResponse> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let settings = body.into_inner();
    let secret = ctx.state.probe_secret.clone();
    let json = serde_json::to_value(&settings).map_err(ApiError::internal)?;
    let audit = ctx.audit("topology.update", "tenant", tenant, json.clone());
    ctx.tenant_tx(move |conn| {
        Box::pin(async move {
            // Refuse settings the engine cannot satisfy for the sites as they are.
            let mut snapshot = load_snapshot(conn, tenant)
                .await
                .map_err(ApiError::internal)?;
            snapshot.topology = settings;
            compile(&snapshot, &secret, 0)
                .map_err(|e| ApiError::unprocessable("invalid_topology", e.to_string()))?;
            diesel::update(tenants::table.find(tenant.0))
                .set((
                    tenants::topology.eq(json),
                    tenants::updated_at.eq(diesel::dsl::now),
                ))
                .execute(conn)
                .await?;
            record_audit(conn, audit).await
        })
    })
    .await?;
    ctx.state.intents_changed(tenant).await;
    graph(ctx).await
}

#[utoipa::path(operation_id = "optimize_topology", tag = "topology", security(("bearer" = [])), responses((status = 202, body = Object), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/topology/optimize")]
async fn optimize(ctx: Ctx) -> ApiResult<HttpResponse> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let audit = ctx.audit("topology.optimize", "tenant", tenant, serde_json::json!({}));
    ctx.tenant_tx(move |conn| Box::pin(async move { record_audit(conn, audit).await }))
        .await?;
    ctx.state.intents_changed(tenant).await;
    Ok(HttpResponse::Accepted().json(serde_json::json!({
        "status": "scheduled",
        "detail": "the topology is recomputed and changed intents are republished within a second",
    })))
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(get).service(put).service(optimize);
}
