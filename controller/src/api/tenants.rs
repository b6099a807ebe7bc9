//! Tenants: an MSP admin creates, lists, renames and deletes the tenants of its MSP; a tenant's
//! own operators see (and its admins edit) their tenant only.
//!
//! - `GET /tenants`, `POST /tenants` (MSP admin)
//! - `GET|PATCH|DELETE /tenants/{tenant}`

use actix_web::{delete, get, patch, post, web, HttpResponse};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{record_audit, Ctx, PageQuery};
use super::error::{ApiError, ApiResult};
use crate::db::schema::tenants;
use crate::topology::TopologySettings;
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Queryable, Selectable, Serialize, Debug)]
#[diesel(table_name = tenants)]
pub struct Tenant {
    pub id: Uuid,
    pub msp_id: Uuid,
    pub name: String,
    pub slug: String,
    #[schema(value_type = String)]
    pub overlay_network: IpNet,
    #[schema(value_type = Object)]
    pub topology: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: String,
    pub slug: String,
    #[schema(value_type = Option<String>)]
    pub overlay_network: Option<IpNet>,
    pub topology: Option<TopologySettings>,
}

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    pub name: Option<String>,
    pub topology: Option<TopologySettings>,
}

pub(crate) fn check_name(field: &str, name: &str) -> ApiResult<()> {
    if name.trim().is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "invalid_value",
            format!("{field} must be 1-128 printable characters"),
        ));
    }
    Ok(())
}

fn check_slug(slug: &str) -> ApiResult<()> {
    let ok = !slug.is_empty()
        && slug.len() <= 63
        && slug
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !slug.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_value",
            "slug must be 1-63 characters of a-z, 0-9 and -, not starting with -",
        ))
    }
}

fn check_overlay(net: &IpNet) -> ApiResult<()> {
    let hosts = match net {
        IpNet::V4(v4) => 32 - u32::from(v4.prefix_len()),
        IpNet::V6(v6) => 128 - u32::from(v6.prefix_len()),
    };
    if hosts < 4 || net.trunc() != *net {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "overlay_network must be a network address with room for sites, e.g. 100.64.0.0/16",
        ));
    }
    Ok(())
}

fn topology_json(settings: &TopologySettings) -> ApiResult<serde_json::Value> {
    if settings.max_peers == 0 || settings.hubs_per_spoke == 0 {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "topology.max_peers and topology.hubs_per_spoke must be at least 1",
        ));
    }
    serde_json::to_value(settings).map_err(ApiError::internal)
}

#[utoipa::path(operation_id = "list_tenants", tag = "tenants", params(PageQuery), security(("bearer" = [])), responses((status = 200, body = crate::api::context::List<Tenant>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/tenants")]
async fn list(ctx: Ctx, query: web::Query<PageQuery>) -> ApiResult<HttpResponse> {
    let page = query.page()?;
    let own = ctx.principal.tenant;
    let rows = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                let mut q = tenants::table.select(Tenant::as_select()).into_boxed();
                if let Some(t) = own {
                    q = q.filter(tenants::id.eq(t.0));
                }
                q = crate::after_cursor!(q, page, tenants::created_at, tenants::id);
                Ok(q.order((tenants::created_at, tenants::id))
                    .limit(page.limit + 1)
                    .load::<Tenant>(conn)
                    .await?)
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(page.finish(rows, |t| (t.created_at, t.id))))
}

#[utoipa::path(operation_id = "create_tenants", tag = "tenants", request_body = CreateTenant, security(("bearer" = [])), responses((status = 201, body = Tenant), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/tenants")]
async fn create(ctx: Ctx, body: web::Json<CreateTenant>) -> ApiResult<HttpResponse> {
    ctx.require_msp_admin()?;
    let body = body.into_inner();
    check_name("name", &body.name)?;
    check_slug(&body.slug)?;
    let overlay = body
        .overlay_network
        .unwrap_or_else(|| "100.64.0.0/16".parse().expect("literal network"));
    check_overlay(&overlay)?;
    let topology = topology_json(&body.topology.unwrap_or_default())?;
    let msp = ctx.principal.msp;
    let id = Uuid::new_v4();
    let mut audit = ctx.audit(
        "tenant.create",
        "tenant",
        id,
        serde_json::json!({ "name": body.name, "slug": body.slug }),
    );
    audit.tenant_id = Some(id);
    let tenant = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                let tenant = diesel::insert_into(tenants::table)
                    .values((
                        tenants::id.eq(id),
                        tenants::msp_id.eq(msp),
                        tenants::name.eq(&body.name),
                        tenants::slug.eq(&body.slug),
                        tenants::overlay_network.eq(overlay),
                        tenants::topology.eq(topology),
                    ))
                    .returning(Tenant::as_returning())
                    .get_result(conn)
                    .await?;
                record_audit(conn, audit).await?;
                Ok(tenant)
            })
        })
        .await?;
    tracing::info!(tenant = %tenant.id, "tenant created");
    Ok(HttpResponse::Created().json(tenant))
}

#[utoipa::path(operation_id = "get_tenants", tag = "tenants", params(("tenant" = Uuid, Path, description = "tenant id")), security(("bearer" = [])), responses((status = 200, body = Tenant), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/tenants/{tenant}")]
async fn get(ctx: Ctx) -> ApiResult<HttpResponse> {
    let tenant = ctx.tenant()?;
    let row = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                Ok(tenants::table
                    .find(tenant.0)
                    .select(Tenant::as_select())
                    .first(conn)
                    .await
                    .optional()?)
            })
        })
        .await?;
    row.map(|t| HttpResponse::Ok().json(t))
        .ok_or_else(|| ApiError::not_found("tenant"))
}

#[utoipa::path(operation_id = "update_tenants", tag = "tenants", params(("tenant" = Uuid, Path, description = "tenant id")), request_body = UpdateTenant, security(("bearer" = [])), responses((status = 200, body = Tenant), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[patch("/tenants/{tenant}")]
async fn update(ctx: Ctx, body: web::Json<UpdateTenant>) -> ApiResult<HttpResponse> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let body = body.into_inner();
    if let Some(name) = &body.name {
        check_name("name", name)?;
    }
    let topology = body.topology.as_ref().map(topology_json).transpose()?;
    let audit = ctx.audit(
        "tenant.update",
        "tenant",
        tenant,
        serde_json::json!({ "name": body.name, "topology": topology }),
    );
    let row = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                let mut changed: Option<Tenant> = None;
                if let Some(name) = body.name {
                    changed = diesel::update(tenants::table.find(tenant.0))
                        .set((
                            tenants::name.eq(name),
                            tenants::updated_at.eq(diesel::dsl::now),
                        ))
                        .returning(Tenant::as_returning())
                        .get_result(conn)
                        .await
                        .optional()?;
                }
                if let Some(topology) = topology {
                    changed = diesel::update(tenants::table.find(tenant.0))
                        .set((
                            tenants::topology.eq(topology),
                            tenants::updated_at.eq(diesel::dsl::now),
                        ))
                        .returning(Tenant::as_returning())
                        .get_result(conn)
                        .await
                        .optional()?;
                }
                let row = match changed {
                    Some(row) => row,
                    None => tenants::table
                        .find(tenant.0)
                        .select(Tenant::as_select())
                        .first(conn)
                        .await
                        .optional()?
                        .ok_or_else(|| ApiError::not_found("tenant"))?,
                };
                record_audit(conn, audit).await?;
                Ok(row)
            })
        })
        .await?;
    ctx.state.intents_changed(tenant).await;
    Ok(HttpResponse::Ok().json(row))
}

#[utoipa::path(operation_id = "delete_tenants", tag = "tenants", params(("tenant" = Uuid, Path, description = "tenant id")), security(("bearer" = [])), responses((status = 204, description = "deleted"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[delete("/tenants/{tenant}")]
async fn delete(ctx: Ctx) -> ApiResult<HttpResponse> {
    ctx.require_msp_admin()?;
    let tenant = ctx.tenant()?;
    let audit = ctx.audit("tenant.delete", "tenant", tenant, serde_json::json!({}));
    let deleted = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                let n = diesel::delete(tenants::table.find(tenant.0))
                    .execute(conn)
                    .await?;
                if n > 0 {
                    record_audit(conn, audit).await?;
                }
                Ok(n)
            })
        })
        .await?;
    if deleted == 0 {
        return Err(ApiError::not_found("tenant"));
    }
    tracing::info!(tenant = %tenant, "tenant deleted");
    // Its NATS account goes too: streams deleted, every user revoked. The rows are gone
    // already, so a failure here is logged for the operator rather than undoing the delete.
    if let Err(e) = ctx.state.nats_hub.purge_tenant(tenant).await {
        tracing::error!(tenant = %tenant, error = %e, "could not purge the deleted tenant's NATS account; its edges can still connect; run `patronus-controller nats purge-tenant --tenant <id>`");
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `/tenants/{tenant}` itself; registered before the tenant-prefixed scope so the exact path
/// reaches these handlers.
pub fn item_routes(cfg: &mut ServiceConfig) {
    cfg.service(get).service(update).service(delete);
}

/// `/tenants`.
pub fn collection_routes(cfg: &mut ServiceConfig) {
    cfg.service(list).service(create);
}
