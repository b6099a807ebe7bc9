//! Sites and their uplinks.
//!
//! - `GET|POST /sites`, `GET|PATCH|DELETE /sites/{id}`
//!
//! A site gets its overlay address from the tenant's overlay network when it is created. LAN
//! prefixes must be network addresses and must not overlap another site's, or routing between
//! them would be ambiguous. Every change marks the tenant's intents for recompilation.

use std::collections::HashSet;
use std::net::IpAddr;

use actix_web::{delete, get, patch, post, web, HttpResponse};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ipnet::IpNet;
use patronus_proto::intent::MAX_UPLINKS;
use patronus_proto::policy::LinkKind;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{record_audit, Ctx};
use super::error::{ApiError, ApiResult};
use super::tenants::check_name;
use crate::db::schema::{endpoints, sites, tenants};
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Queryable, Selectable, Serialize, Debug, Clone)]
#[diesel(table_name = sites)]
pub struct SiteRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub region: Option<String>,
    pub role: String,
    pub status: String,
    pub wg_public_key: Option<String>,
    #[schema(value_type = Option<String>)]
    pub overlay_address: Option<IpNet>,
    #[schema(value_type = Vec<String>)]
    pub lan_prefixes: Vec<IpNet>,
    pub listen_port_base: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub enrolled_at: Option<DateTime<Utc>>,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// The WireGuard key being rotated in (its edge made it), while a rotation runs.
    pub wg_next_public_key: Option<String>,
    /// When the current WireGuard key was committed by a rotation (none: the enrollment's).
    pub wg_key_rotated_at: Option<DateTime<Utc>>,
}

#[derive(utoipa::ToSchema, Queryable, Selectable, Serialize, Debug, Clone)]
#[diesel(table_name = endpoints)]
pub struct UplinkRow {
    pub id: Uuid,
    pub site_id: Uuid,
    pub uplink_index: i16,
    pub name: String,
    #[schema(value_type = String)]
    pub address: IpNet,
    pub interface_type: String,
    pub bandwidth_mbps: Option<i32>,
    pub cost_per_gb: f64,
    pub metered: bool,
}

#[derive(utoipa::ToSchema, Serialize)]
pub struct Site {
    #[serde(flatten)]
    pub site: SiteRow,
    pub uplinks: Vec<UplinkRow>,
}

#[derive(utoipa::ToSchema, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum SiteRole {
    Edge,
    Hub,
}

impl SiteRole {
    fn as_str(self) -> &'static str {
        match self {
            SiteRole::Edge => "edge",
            SiteRole::Hub => "hub",
        }
    }
}

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUplink {
    pub name: String,
    #[schema(value_type = String)]
    pub address: IpAddr,
    #[schema(value_type = String)]
    pub interface_type: LinkKind,
    pub bandwidth_mbps: Option<u32>,
    #[serde(default)]
    pub cost_per_gb: f64,
    #[serde(default)]
    pub metered: bool,
}

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    pub name: String,
    pub region: Option<String>,
    pub role: Option<SiteRole>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub lan_prefixes: Vec<IpNet>,
    pub listen_port_base: Option<u16>,
    #[serde(default)]
    pub uplinks: Vec<CreateUplink>,
}

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSite {
    pub name: Option<String>,
    /// An empty string clears the region.
    pub region: Option<String>,
    pub role: Option<SiteRole>,
    #[schema(value_type = Option<Vec<String>>)]
    pub lan_prefixes: Option<Vec<IpNet>>,
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SiteQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    pub status: Option<String>,
    pub region: Option<String>,
}

const SITE_STATUSES: [&str; 5] = ["pending", "active", "inactive", "degraded", "revoked"];
/// Most LAN prefixes per site (the intent's limit).
const MAX_LAN_PREFIXES: usize = patronus_proto::intent::MAX_PREFIXES;

fn link_kind_str(kind: LinkKind) -> &'static str {
    match kind {
        LinkKind::Fiber => "fiber",
        LinkKind::Cable => "cable",
        LinkKind::Dsl => "dsl",
        LinkKind::Ethernet => "ethernet",
        LinkKind::Mpls => "mpls",
        LinkKind::Lte => "lte",
        LinkKind::FiveG => "five_g",
        LinkKind::Starlink => "starlink",
        LinkKind::Satellite => "satellite",
        LinkKind::Other => "other",
    }
}

/// The first host address of `network` not in `used` (skipping the network address itself).
pub fn allocate_overlay(network: IpNet, used: &HashSet<IpAddr>) -> Option<IpAddr> {
    network
        .hosts()
        .filter(|a| *a != network.network())
        .find(|a| !used.contains(a))
}

fn check_region(region: &str) -> ApiResult<()> {
    let ok = !region.is_empty()
        && region.len() <= 64
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_value",
            "region must be 1-64 characters of letters, digits, - and _ (e.g. us-east)",
        ))
    }
}

fn check_lan_prefixes(prefixes: &[IpNet], overlay: IpNet) -> ApiResult<()> {
    if prefixes.len() > MAX_LAN_PREFIXES {
        return Err(ApiError::unprocessable(
            "invalid_value",
            format!("at most {MAX_LAN_PREFIXES} LAN prefixes per site"),
        ));
    }
    for (i, p) in prefixes.iter().enumerate() {
        if p.trunc() != *p {
            return Err(ApiError::unprocessable(
                "invalid_value",
                format!(
                    "lan_prefixes[{i}]: {p} has host bits set; did you mean {}?",
                    p.trunc()
                ),
            ));
        }
        if p.contains(&overlay.network()) || overlay.contains(&p.network()) {
            return Err(ApiError::unprocessable(
                "invalid_value",
                format!("lan_prefixes[{i}]: {p} overlaps the tenant's overlay network {overlay}"),
            ));
        }
        for q in &prefixes[i + 1..] {
            if p.contains(&q.network()) || q.contains(&p.network()) {
                return Err(ApiError::unprocessable(
                    "invalid_value",
                    format!("lan_prefixes: {p} overlaps {q}"),
                ));
            }
        }
    }
    Ok(())
}

/// Refuse prefixes that overlap another site's LAN in the same tenant.
async fn check_no_lan_conflict(
    conn: &mut AsyncPgConnection,
    site: Option<Uuid>,
    prefixes: &[IpNet],
) -> ApiResult<()> {
    let mut query = sites::table
        .select((sites::name, sites::lan_prefixes))
        .into_boxed();
    if let Some(site) = site {
        query = query.filter(sites::id.ne(site));
    }
    let others: Vec<(String, Vec<IpNet>)> = query.load(conn).await?;
    for (name, theirs) in others {
        for p in prefixes {
            if let Some(q) = theirs
                .iter()
                .find(|q| p.contains(&q.network()) || q.contains(&p.network()))
            {
                return Err(ApiError::conflict(format!(
                    "{p} overlaps {q} of site {name:?}"
                )));
            }
        }
    }
    Ok(())
}

pub(crate) async fn load_site(conn: &mut AsyncPgConnection, id: Uuid) -> ApiResult<Option<Site>> {
    // Both statements at once (pipelined): the uplinks of a site that does not exist are none.
    let conn: &AsyncPgConnection = conn;
    let site = sites::table
        .find(id)
        .select(SiteRow::as_select())
        .first::<SiteRow>(&mut &*conn);
    let uplinks = endpoints::table
        .filter(endpoints::site_id.eq(id))
        .order(endpoints::uplink_index)
        .select(UplinkRow::as_select())
        .load::<UplinkRow>(&mut &*conn);
    let (site, uplinks) = futures_util::future::join(site, uplinks).await;
    let Some(site) = site.optional()? else {
        return Ok(None);
    };
    Ok(Some(Site {
        site,
        uplinks: uplinks?,
    }))
}

/// Sites in their order, each with its uplinks (`uplinks` ordered by site, then index).
fn with_uplinks(rows: Vec<SiteRow>, uplinks: Vec<UplinkRow>) -> Vec<Site> {
    let mut by_site: std::collections::HashMap<Uuid, Vec<UplinkRow>> =
        std::collections::HashMap::new();
    for uplink in uplinks {
        by_site.entry(uplink.site_id).or_default().push(uplink);
    }
    rows.into_iter()
        .map(|site| {
            let uplinks = by_site.remove(&site.id).unwrap_or_default();
            Site { site, uplinks }
        })
        .collect()
}

#[utoipa::path(operation_id = "list_sites", tag = "sites", params(SiteQuery), security(("bearer" = [])), responses((status = 200, body = crate::api::context::List<Site>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/sites")]
async fn list(ctx: Ctx, query: web::Query<SiteQuery>) -> ApiResult<HttpResponse> {
    let query = query.into_inner();
    let page = super::context::Page::parse(query.limit, query.cursor.as_deref())?;
    if let Some(status) = &query.status {
        if !SITE_STATUSES.contains(&status.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("status must be one of {}", SITE_STATUSES.join(", ")),
            ));
        }
    }
    let sites = ctx
        .tenant_read(move |conn| {
            Box::pin(async move {
                // The page's sites, as a query to run and as the subquery that picks their
                // uplinks: the two statements do not wait for each other and go out
                // pipelined, one round trip for both.
                let page_of_sites = || {
                    let mut q = sites::table.into_boxed();
                    if let Some(status) = &query.status {
                        q = q.filter(sites::status.eq(status.clone()));
                    }
                    if let Some(region) = &query.region {
                        q = q.filter(sites::region.eq(region.clone()));
                    }
                    crate::after_cursor!(q, page, sites::created_at, sites::id)
                        .order((sites::created_at, sites::id))
                        .limit(page.limit + 1)
                };
                let conn: &AsyncPgConnection = conn;
                let rows = page_of_sites()
                    .select(SiteRow::as_select())
                    .load::<SiteRow>(&mut &*conn);
                let uplinks = endpoints::table
                    .filter(endpoints::site_id.eq_any(page_of_sites().select(sites::id)))
                    .order((endpoints::site_id, endpoints::uplink_index))
                    .select(UplinkRow::as_select())
                    .load::<UplinkRow>(&mut &*conn);
                let (rows, uplinks) = futures_util::future::try_join(rows, uplinks).await?;
                Ok(with_uplinks(rows, uplinks))
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(page.finish(sites, |s| (s.site.created_at, s.site.id))))
}

/// Check a site's uplinks: at most [`MAX_UPLINKS`], unique names, sane numbers.
pub(crate) fn check_uplinks(uplinks: &[CreateUplink]) -> ApiResult<()> {
    if uplinks.len() > usize::from(MAX_UPLINKS) {
        return Err(ApiError::unprocessable(
            "invalid_value",
            format!("at most {MAX_UPLINKS} uplinks per site"),
        ));
    }
    let mut uplink_names = HashSet::new();
    for (i, uplink) in uplinks.iter().enumerate() {
        check_name(&format!("uplinks[{i}].name"), &uplink.name)?;
        if !uplink_names.insert(uplink.name.as_str()) {
            return Err(ApiError::unprocessable(
                "invalid_value",
                format!("uplinks[{i}].name repeats {:?}", uplink.name),
            ));
        }
        if !(uplink.cost_per_gb.is_finite() && uplink.cost_per_gb >= 0.0) {
            return Err(ApiError::unprocessable(
                "invalid_value",
                format!("uplinks[{i}].cost_per_gb must be 0 or more"),
            ));
        }
        if uplink.bandwidth_mbps == Some(0)
            || uplink.bandwidth_mbps.is_some_and(|b| b > i32::MAX as u32)
        {
            return Err(ApiError::unprocessable(
                "invalid_value",
                format!("uplinks[{i}].bandwidth_mbps must be above 0"),
            ));
        }
    }
    Ok(())
}

/// Replace the site's uplinks with `uplinks` (indexes in the given order).
pub(crate) async fn replace_uplinks(
    conn: &mut diesel_async::AsyncPgConnection,
    tenant: patronus_proto::TenantId,
    site: Uuid,
    uplinks: &[CreateUplink],
) -> ApiResult<()> {
    diesel::delete(endpoints::table.filter(endpoints::site_id.eq(site)))
        .execute(conn)
        .await?;
    for (index, uplink) in uplinks.iter().enumerate() {
        let address = IpNet::from(uplink.address);
        diesel::insert_into(endpoints::table)
            .values((
                endpoints::tenant_id.eq(tenant.0),
                endpoints::site_id.eq(site),
                endpoints::uplink_index.eq(index as i16),
                endpoints::name.eq(&uplink.name),
                endpoints::address.eq(address),
                endpoints::interface_type.eq(link_kind_str(uplink.interface_type)),
                endpoints::bandwidth_mbps.eq(uplink.bandwidth_mbps.map(|b| b as i32)),
                endpoints::cost_per_gb.eq(uplink.cost_per_gb),
                endpoints::metered.eq(uplink.metered),
            ))
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Check a site creation body before touching the database.
pub(crate) fn check_create_site(body: &CreateSite) -> ApiResult<()> {
    check_name("name", &body.name)?;
    if let Some(region) = &body.region {
        check_region(region)?;
    }
    check_uplinks(&body.uplinks)?;
    let port_base = i32::from(body.listen_port_base.unwrap_or(51820));
    if !(1024..=65471).contains(&port_base) {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "listen_port_base must be 1024-65471",
        ));
    }
    Ok(())
}

/// Insert a checked site (and its uplinks) in the current tenant transaction, allocating its
/// overlay address.
pub(crate) async fn insert_site(
    conn: &mut diesel_async::AsyncPgConnection,
    tenant: patronus_proto::TenantId,
    id: Uuid,
    body: &CreateSite,
) -> ApiResult<()> {
    let port_base = i32::from(body.listen_port_base.unwrap_or(51820));
    let overlay: IpNet = tenants::table
        .find(tenant.0)
        .select(tenants::overlay_network)
        .first(conn)
        .await?;
    check_lan_prefixes(&body.lan_prefixes, overlay)?;
    check_no_lan_conflict(conn, None, &body.lan_prefixes).await?;
    // Serialise address allocation within the tenant; the unique constraint is the
    // backstop.
    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext(patronus_current_tenant()::text))")
        .execute(conn)
        .await?;
    let used: HashSet<IpAddr> = sites::table
        .select(sites::overlay_address)
        .load::<Option<IpNet>>(conn)
        .await?
        .into_iter()
        .flatten()
        .map(|n| n.addr())
        .collect();
    let address = allocate_overlay(overlay, &used).ok_or_else(|| {
        ApiError::conflict(format!("the overlay network {overlay} is full; widen it"))
    })?;
    let address = IpNet::new(address, overlay.max_prefix_len()).map_err(ApiError::internal)?;
    diesel::insert_into(sites::table)
        .values((
            sites::id.eq(id),
            sites::tenant_id.eq(tenant.0),
            sites::name.eq(&body.name),
            sites::region.eq(&body.region),
            sites::role.eq(body.role.unwrap_or(SiteRole::Edge).as_str()),
            sites::overlay_address.eq(Some(address)),
            sites::lan_prefixes.eq(&body.lan_prefixes),
            sites::listen_port_base.eq(port_base),
        ))
        .execute(conn)
        .await?;
    replace_uplinks(conn, tenant, id, &body.uplinks).await?;
    Ok(())
}

#[utoipa::path(operation_id = "create_sites", tag = "sites", request_body = CreateSite, security(("bearer" = [])), responses((status = 201, body = Site), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/sites")]
async fn create(ctx: Ctx, body: web::Json<CreateSite>) -> ApiResult<HttpResponse> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let body = body.into_inner();
    check_create_site(&body)?;
    let id = Uuid::new_v4();
    let audit = ctx.audit(
        "site.create",
        "site",
        id,
        serde_json::json!({ "name": body.name }),
    );
    let site = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                insert_site(conn, tenant, id, &body).await?;
                record_audit(conn, audit).await?;
                load_site(conn, id)
                    .await?
                    .ok_or_else(|| ApiError::internal("site vanished"))
            })
        })
        .await?;
    tracing::info!(tenant = %tenant, site = %id, "site created");
    ctx.state
        .emit(
            tenant,
            Some(patronus_proto::SiteId(id)),
            patronus_proto::events::SdwanEvent::TopologyChanged {
                change: patronus_proto::events::TopologyChange::SiteAdded,
            },
        )
        .await;
    ctx.state.intents_changed(tenant).await;
    Ok(HttpResponse::Created().json(site))
}

#[utoipa::path(operation_id = "get_sites", tag = "sites", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 200, body = Site), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/sites/{id}")]
async fn get(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    let id = id.into_inner().id;
    let site = ctx
        .tenant_read(move |conn| Box::pin(async move { load_site(conn, id).await }))
        .await?;
    site.map(|s| HttpResponse::Ok().json(s))
        .ok_or_else(|| ApiError::not_found("site"))
}

#[utoipa::path(operation_id = "update_sites", tag = "sites", params(("id" = Uuid, Path, description = "id of the resource")), request_body = UpdateSite, security(("bearer" = [])), responses((status = 200, body = Site), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[patch("/sites/{id}")]
async fn update(
    ctx: Ctx,
    id: web::Path<super::context::IdPath>,
    body: web::Json<UpdateSite>,
) -> ApiResult<HttpResponse> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let id = id.into_inner().id;
    let body = body.into_inner();
    if let Some(name) = &body.name {
        check_name("name", name)?;
    }
    if let Some(region) = body.region.as_deref().filter(|r| !r.is_empty()) {
        check_region(region)?;
    }
    let audit = ctx.audit(
        "site.update",
        "site",
        id,
        serde_json::json!({ "name": body.name, "region": body.region, "role": body.role.map(SiteRole::as_str), "lan_prefixes": body.lan_prefixes }),
    );
    let site = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                if load_site(conn, id).await?.is_none() {
                    return Err(ApiError::not_found("site"));
                }
                let target = sites::table.find(id);
                if let Some(name) = body.name {
                    diesel::update(target)
                        .set(sites::name.eq(name))
                        .execute(conn)
                        .await?;
                }
                if let Some(region) = body.region {
                    let region = (!region.is_empty()).then_some(region);
                    diesel::update(target)
                        .set(sites::region.eq(region))
                        .execute(conn)
                        .await?;
                }
                if let Some(role) = body.role {
                    diesel::update(target)
                        .set(sites::role.eq(role.as_str()))
                        .execute(conn)
                        .await?;
                }
                if let Some(prefixes) = body.lan_prefixes {
                    let overlay: IpNet = tenants::table
                        .find(tenant.0)
                        .select(tenants::overlay_network)
                        .first(conn)
                        .await?;
                    check_lan_prefixes(&prefixes, overlay)?;
                    check_no_lan_conflict(conn, Some(id), &prefixes).await?;
                    diesel::update(target)
                        .set(sites::lan_prefixes.eq(prefixes))
                        .execute(conn)
                        .await?;
                }
                diesel::update(target)
                    .set(sites::updated_at.eq(diesel::dsl::now))
                    .execute(conn)
                    .await?;
                record_audit(conn, audit).await?;
                load_site(conn, id)
                    .await?
                    .ok_or_else(|| ApiError::not_found("site"))
            })
        })
        .await?;
    ctx.state.intents_changed(tenant).await;
    Ok(HttpResponse::Ok().json(site))
}

#[utoipa::path(operation_id = "delete_sites", tag = "sites", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 204, description = "deleted"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[delete("/sites/{id}")]
async fn delete(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    delete_site(&ctx, id.into_inner().id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Delete a site (credentials revoked first; peers recompiled without it), audited. Shared by
/// the API and the portal.
pub(crate) async fn delete_site(ctx: &Ctx, id: Uuid) -> ApiResult<()> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let audit = ctx.audit("site.delete", "site", id, serde_json::json!({}));
    let deleted = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                // Credentials are revoked first: their rows outlive the site (site_id becomes
                // NULL) so the revocation lists keep them.
                super::enrollment::revoke_site_credentials(conn, id, "site deleted").await?;
                let n = diesel::delete(sites::table.find(id)).execute(conn).await?;
                if n > 0 {
                    record_audit(conn, audit).await?;
                }
                Ok(n)
            })
        })
        .await?;
    if deleted == 0 {
        return Err(ApiError::not_found("site"));
    }
    tracing::info!(tenant = %tenant, site = %id, "site deleted");
    // Its NATS user goes, its intent key goes (its site_intents row went with it), and the
    // peers are recompiled without it.
    super::enrollment::enforce_revocation(&ctx.state, tenant, patronus_proto::SiteId(id)).await;
    ctx.state
        .emit(
            tenant,
            Some(patronus_proto::SiteId(id)),
            patronus_proto::events::SdwanEvent::SiteLeft {
                site: patronus_proto::SiteId(id),
            },
        )
        .await;
    ctx.state.intents_changed(tenant).await;
    Ok(())
}

#[utoipa::path(operation_id = "revoke_sites", tag = "sites", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 200, body = Site, description = "the revoked site"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/sites/{id}/revoke")]
async fn revoke(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    let site = revoke_site(&ctx, id.into_inner().id).await?;
    Ok(HttpResponse::Ok().json(site))
}

/// Revoke a site (its certificates, NATS user and tokens stop working; peers drop it),
/// audited. Shared by the API and the portal.
pub(crate) async fn revoke_site(ctx: &Ctx, id: Uuid) -> ApiResult<Site> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let audit = ctx.audit("site.revoke", "site", id, serde_json::json!({}));
    let site = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let status: Option<String> = sites::table
                    .find(id)
                    .select(sites::status)
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?;
                let Some(status) = status else {
                    return Err(ApiError::not_found("site"));
                };
                // Revoking twice is harmless: credentials issued since (none can be) would
                // be revoked again.
                super::enrollment::revoke_site_credentials(conn, id, "site revoked").await?;
                if status != "revoked" {
                    diesel::update(sites::table.find(id))
                        .set((
                            sites::status.eq("revoked"),
                            sites::updated_at.eq(Utc::now()),
                        ))
                        .execute(conn)
                        .await?;
                    record_audit(conn, audit).await?;
                }
                load_site(conn, id)
                    .await?
                    .ok_or_else(|| ApiError::internal("site vanished"))
            })
        })
        .await?;
    tracing::info!(tenant = %tenant, site = %id, "site revoked");
    super::enrollment::enforce_revocation(&ctx.state, tenant, patronus_proto::SiteId(id)).await;
    ctx.state
        .emit(
            tenant,
            Some(patronus_proto::SiteId(id)),
            patronus_proto::events::SdwanEvent::SiteStatusChanged {
                site: patronus_proto::SiteId(id),
                status: patronus_proto::events::SiteStatus::Revoked,
            },
        )
        .await;
    ctx.state.intents_changed(tenant).await;
    Ok(site)
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list)
        .service(create)
        .service(get)
        .service(update)
        .service(delete)
        .service(revoke);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_allocation_skips_the_network_and_used_addresses() {
        let net: IpNet = "100.64.0.0/29".parse().unwrap();
        let mut used = HashSet::new();
        assert_eq!(
            allocate_overlay(net, &used),
            Some("100.64.0.1".parse().unwrap())
        );
        used.insert("100.64.0.1".parse().unwrap());
        used.insert("100.64.0.2".parse().unwrap());
        assert_eq!(
            allocate_overlay(net, &used),
            Some("100.64.0.3".parse().unwrap())
        );
        for i in 3..=6 {
            used.insert(format!("100.64.0.{i}").parse().unwrap());
        }
        assert_eq!(allocate_overlay(net, &used), None);
    }

    #[test]
    fn lan_prefixes_are_checked() {
        let overlay: IpNet = "100.64.0.0/16".parse().unwrap();
        assert!(check_lan_prefixes(&["10.1.0.0/24".parse().unwrap()], overlay).is_ok());
        assert!(check_lan_prefixes(&["10.1.0.1/24".parse().unwrap()], overlay).is_err());
        assert!(check_lan_prefixes(&["100.64.1.0/24".parse().unwrap()], overlay).is_err());
        assert!(check_lan_prefixes(
            &[
                "10.0.0.0/8".parse().unwrap(),
                "10.1.0.0/24".parse().unwrap()
            ],
            overlay
        )
        .is_err());
    }
}
