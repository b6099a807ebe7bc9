//! Policies: routing, QoS, security and cost, as `patronus-proto` defines them.
//!
//! - `GET|POST /policies`, `GET|PUT|DELETE /policies/{id}`
//! - `GET /app-classes`: the built-in application catalog (what a routing policy of class
//!   `voip`, `dns`, `web`, … matches when it names no protocol or ports)
//!
//! The body names the policy (`name`, `kind`, `priority`, `enabled`, `site_ids`) and carries
//! the kind's own fields in `spec`. The controller compiles `spec` with the same types and
//! validation the edge uses, so a policy the edge would refuse (a reversed port range, ports
//! with ICMP, an unknown field) is refused here with 422 and the field named.

use actix_web::{delete, get, post, put, web, HttpResponse};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use patronus_proto::policy::{CostPolicy, QosPolicy, RoutingPolicy, SecurityPolicy};
use patronus_proto::PolicyId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::context::{record_audit, Ctx};
use super::error::{ApiError, ApiResult};
use super::tenants::check_name;
use crate::db::schema::{policies, sites};
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Queryable, Selectable, Serialize, Debug, Clone)]
#[diesel(table_name = policies)]
pub struct PolicyRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub kind: String,
    pub priority: i32,
    pub enabled: bool,
    #[schema(value_type = Object)]
    pub spec: Value,
    pub site_ids: Option<Vec<Uuid>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(utoipa::ToSchema, Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Routing,
    Qos,
    Security,
    Cost,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Routing => "routing",
            PolicyKind::Qos => "qos",
            PolicyKind::Security => "security",
            PolicyKind::Cost => "cost",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            PolicyKind::Routing,
            PolicyKind::Qos,
            PolicyKind::Security,
            PolicyKind::Cost,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

#[derive(utoipa::ToSchema, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    pub name: String,
    pub kind: PolicyKind,
    #[serde(default = "default_priority")]
    pub priority: u16,
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Sites it applies to; absent means every site of the tenant.
    pub site_ids: Option<Vec<Uuid>>,
    #[schema(value_type = Object)]
    pub spec: Value,
}

fn default_priority() -> u16 {
    100
}

fn default_enabled() -> bool {
    true
}

/// A policy compiled into its proto type.
#[derive(Debug, Clone)]
pub enum CompiledPolicy {
    Routing(RoutingPolicy),
    Qos(QosPolicy),
    Security(SecurityPolicy),
    Cost(CostPolicy),
}

/// Keys of `spec` that the typed policy did not use (so a misspelt field is refused, not
/// silently ignored). Keys with null or empty values are allowed to be dropped.
fn unknown_keys(input: &Value, parsed: &Value, path: &str, out: &mut Vec<String>) {
    if let (Value::Object(given), Value::Object(kept)) = (input, parsed) {
        for (key, value) in given {
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match kept.get(key) {
                Some(next) => unknown_keys(value, next, &here, out),
                None => {
                    let empty = value.is_null()
                        || value.as_array().is_some_and(Vec::is_empty)
                        || value.as_object().is_some_and(Map::is_empty);
                    if !empty {
                        out.push(here);
                    }
                }
            }
        }
    }
}

/// Compile a stored or submitted policy into its proto type, validated.
pub fn compile(
    id: Uuid,
    name: &str,
    kind: PolicyKind,
    priority: u16,
    enabled: bool,
    spec: &Value,
) -> ApiResult<CompiledPolicy> {
    let Value::Object(fields) = spec else {
        return Err(ApiError::unprocessable(
            "invalid_policy",
            "spec must be a JSON object",
        ));
    };
    for reserved in ["id", "name", "priority", "enabled"] {
        if fields.contains_key(reserved) {
            return Err(ApiError::unprocessable(
                "invalid_policy",
                format!(
                    "spec.{reserved}: give {reserved} at the top level of the policy, not in spec"
                ),
            ));
        }
    }
    let mut full = fields.clone();
    full.insert("id".into(), Value::String(id.to_string()));
    full.insert("name".into(), Value::String(name.to_owned()));
    if kind == PolicyKind::Qos && priority > u16::from(u8::MAX) {
        return Err(ApiError::unprocessable(
            "invalid_policy",
            "priority of a qos policy is 0-255",
        ));
    }
    if kind != PolicyKind::Cost {
        full.insert("priority".into(), Value::from(priority));
    }
    if kind == PolicyKind::Routing {
        full.insert("enabled".into(), Value::Bool(enabled));
    }
    let full = Value::Object(full);
    let shape =
        |e: serde_json::Error| ApiError::unprocessable("invalid_policy", format!("spec: {e}"));
    let invalid = |e: patronus_proto::codec::ValidationError| {
        let field = e
            .field
            .strip_prefix("policy.")
            .unwrap_or(&e.field)
            .to_owned();
        ApiError::unprocessable("invalid_policy", format!("spec.{field}: {}", e.problem))
    };
    let (compiled, reparsed) = match kind {
        PolicyKind::Routing => {
            let p: RoutingPolicy = serde_json::from_value(full.clone()).map_err(shape)?;
            p.validate("policy").map_err(invalid)?;
            let v = serde_json::to_value(&p).map_err(ApiError::internal)?;
            (CompiledPolicy::Routing(p), v)
        }
        PolicyKind::Qos => {
            let p: QosPolicy = serde_json::from_value(full.clone()).map_err(shape)?;
            p.validate("policy").map_err(invalid)?;
            let v = serde_json::to_value(&p).map_err(ApiError::internal)?;
            (CompiledPolicy::Qos(p), v)
        }
        PolicyKind::Security => {
            let p: SecurityPolicy = serde_json::from_value(full.clone()).map_err(shape)?;
            p.validate("policy").map_err(invalid)?;
            let v = serde_json::to_value(&p).map_err(ApiError::internal)?;
            (CompiledPolicy::Security(p), v)
        }
        PolicyKind::Cost => {
            let p: CostPolicy = serde_json::from_value(full.clone()).map_err(shape)?;
            p.validate("policy").map_err(invalid)?;
            let v = serde_json::to_value(&p).map_err(ApiError::internal)?;
            (CompiledPolicy::Cost(p), v)
        }
    };
    let mut unknown = Vec::new();
    unknown_keys(&full, &reparsed, "", &mut unknown);
    if !unknown.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_policy",
            format!("spec has unknown fields: {}", unknown.join(", ")),
        ));
    }
    Ok(compiled)
}

impl CompiledPolicy {
    pub fn id(&self) -> PolicyId {
        match self {
            CompiledPolicy::Routing(p) => p.id,
            CompiledPolicy::Qos(p) => p.id,
            CompiledPolicy::Security(p) => p.id,
            CompiledPolicy::Cost(p) => p.id,
        }
    }
}

/// Accept a submitted policy (writer role, names, and compiled exactly as the edge will) and
/// describe it for the audit log.
fn admit(
    ctx: &Ctx,
    id: Uuid,
    body: &PolicyBody,
    action: &'static str,
) -> ApiResult<super::context::AuditEntry> {
    ctx.require_write()?;
    check_name("name", &body.name)?;
    if body.site_ids.as_ref().is_some_and(|s| s.len() > 10_000) {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "site_ids: at most 10000 sites",
        ));
    }
    compile(
        id,
        &body.name,
        body.kind,
        body.priority,
        body.enabled,
        &body.spec,
    )?;
    Ok(ctx.audit(
        action,
        "policy",
        id,
        serde_json::json!({ "name": body.name, "kind": body.kind, "priority": body.priority, "enabled": body.enabled, "spec": body.spec }),
    ))
}

async fn check_sites_exist(
    conn: &mut diesel_async::AsyncPgConnection,
    site_ids: &Option<Vec<Uuid>>,
) -> ApiResult<()> {
    if let Some(ids) = site_ids {
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        let found: i64 = sites::table
            .filter(sites::id.eq_any(&unique))
            .count()
            .get_result(conn)
            .await?;
        if found != unique.len() as i64 {
            return Err(ApiError::unprocessable(
                "invalid_reference",
                "site_ids names a site that does not exist in this tenant",
            ));
        }
    }
    Ok(())
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PolicyQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    pub kind: Option<PolicyKind>,
}

#[utoipa::path(operation_id = "list_policies", tag = "policies", params(PolicyQuery), security(("bearer" = [])), responses((status = 200, body = crate::api::context::List<PolicyRow>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/policies")]
async fn list(ctx: Ctx, query: web::Query<PolicyQuery>) -> ApiResult<HttpResponse> {
    let query = query.into_inner();
    let page = super::context::Page::parse(query.limit, query.cursor.as_deref())?;
    let rows = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let mut q = policies::table.select(PolicyRow::as_select()).into_boxed();
                if let Some(kind) = query.kind {
                    q = q.filter(policies::kind.eq(kind.as_str()));
                }
                q = crate::after_cursor!(q, page, policies::created_at, policies::id);
                Ok(q.order((policies::created_at, policies::id))
                    .limit(page.limit + 1)
                    .load::<PolicyRow>(conn)
                    .await?)
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(page.finish(rows, |p| (p.created_at, p.id))))
}

#[utoipa::path(operation_id = "create_policies", tag = "policies", request_body = PolicyBody, security(("bearer" = [])), responses((status = 201, body = PolicyRow), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/policies")]
async fn create(ctx: Ctx, body: web::Json<PolicyBody>) -> ApiResult<HttpResponse> {
    let row = create_policy(&ctx, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(row))
}

/// Create a policy (writer role; compiled and validated exactly as the edge will), audited;
/// the tenant's intents are recompiled. Shared by the API and the portal.
pub(crate) async fn create_policy(ctx: &Ctx, body: PolicyBody) -> ApiResult<PolicyRow> {
    let tenant = ctx.tenant()?;
    let id = Uuid::new_v4();
    let audit = admit(ctx, id, &body, "policy.create")?;
    let row = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                check_sites_exist(conn, &body.site_ids).await?;
                let row = diesel::insert_into(policies::table)
                    .values((
                        policies::id.eq(id),
                        policies::tenant_id.eq(tenant.0),
                        policies::name.eq(&body.name),
                        policies::kind.eq(body.kind.as_str()),
                        policies::priority.eq(i32::from(body.priority)),
                        policies::enabled.eq(body.enabled),
                        policies::spec.eq(&body.spec),
                        policies::site_ids.eq(&body.site_ids),
                    ))
                    .returning(PolicyRow::as_returning())
                    .get_result(conn)
                    .await?;
                record_audit(conn, audit).await?;
                Ok(row)
            })
        })
        .await?;
    ctx.state.intents_changed(tenant).await;
    Ok(row)
}

#[utoipa::path(operation_id = "get_policies", tag = "policies", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 200, body = PolicyRow), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/policies/{id}")]
async fn get(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    let id = id.into_inner().id;
    let row = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                Ok(policies::table
                    .find(id)
                    .select(PolicyRow::as_select())
                    .first(conn)
                    .await
                    .optional()?)
            })
        })
        .await?;
    row.map(|p| HttpResponse::Ok().json(p))
        .ok_or_else(|| ApiError::not_found("policy"))
}

#[utoipa::path(operation_id = "replace_policies", tag = "policies", params(("id" = Uuid, Path, description = "id of the resource")), request_body = PolicyBody, security(("bearer" = [])), responses((status = 200, body = PolicyRow), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[put("/policies/{id}")]
async fn replace(
    ctx: Ctx,
    id: web::Path<super::context::IdPath>,
    body: web::Json<PolicyBody>,
) -> ApiResult<HttpResponse> {
    let row = replace_policy(&ctx, id.into_inner().id, body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(row))
}

/// Replace a policy (as [`create_policy`] checks it), audited. Shared by the API and the
/// portal.
pub(crate) async fn replace_policy(ctx: &Ctx, id: Uuid, body: PolicyBody) -> ApiResult<PolicyRow> {
    let tenant = ctx.tenant()?;
    let audit = admit(ctx, id, &body, "policy.update")?;
    let row = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                check_sites_exist(conn, &body.site_ids).await?;
                // The update and its audit row go out pipelined (one round trip); when the
                // policy is not there, the error rolls the audit row back with the rest.
                let conn: &diesel_async::AsyncPgConnection = conn;
                let update = diesel::update(policies::table.find(id))
                    .set((
                        policies::name.eq(&body.name),
                        policies::kind.eq(body.kind.as_str()),
                        policies::priority.eq(i32::from(body.priority)),
                        policies::enabled.eq(body.enabled),
                        policies::spec.eq(&body.spec),
                        policies::site_ids.eq(&body.site_ids),
                        policies::updated_at.eq(diesel::dsl::now),
                    ))
                    .returning(PolicyRow::as_returning())
                    .get_result::<PolicyRow>(&mut &*conn);
                let (row, audited) =
                    futures_util::future::join(update, record_audit(conn, audit)).await;
                let row = row
                    .optional()?
                    .ok_or_else(|| ApiError::not_found("policy"))?;
                audited?;
                Ok(row)
            })
        })
        .await?;
    ctx.state.intents_changed(tenant).await;
    Ok(row)
}

#[utoipa::path(operation_id = "delete_policies", tag = "policies", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 204, description = "deleted"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[delete("/policies/{id}")]
async fn delete(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    delete_policy(&ctx, id.into_inner().id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Delete a policy, audited. Shared by the API and the portal.
pub(crate) async fn delete_policy(ctx: &Ctx, id: Uuid) -> ApiResult<()> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let audit = ctx.audit("policy.delete", "policy", id, serde_json::json!({}));
    let n = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let n = diesel::delete(policies::table.find(id))
                    .execute(conn)
                    .await?;
                if n > 0 {
                    record_audit(conn, audit).await?;
                }
                Ok(n)
            })
        })
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("policy"));
    }
    ctx.state.intents_changed(tenant).await;
    Ok(())
}

#[derive(utoipa::ToSchema, Serialize, Debug)]
pub struct AppClassSignature {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Inclusive `[first, last]` destination port ranges.
    pub dst_ports: Vec<[u16; 2]>,
}

#[derive(utoipa::ToSchema, Serialize, Debug)]
pub struct AppClassInfo {
    pub class: String,
    pub description: String,
    pub signatures: Vec<AppClassSignature>,
}

#[utoipa::path(operation_id = "list_app_classes", tag = "policies", security(("bearer" = [])), responses((status = 200, body = Vec<AppClassInfo>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/app-classes")]
async fn app_classes(_ctx: Ctx) -> ApiResult<HttpResponse> {
    let catalog: Vec<AppClassInfo> = patronus_proto::catalog::CATALOG
        .iter()
        .map(|app| AppClassInfo {
            class: app.class.to_owned(),
            description: app.description.to_owned(),
            signatures: app
                .signatures
                .iter()
                .map(|s| AppClassSignature {
                    protocol: match s.protocol {
                        patronus_proto::policy::Protocol::Tcp => "tcp",
                        patronus_proto::policy::Protocol::Udp => "udp",
                        patronus_proto::policy::Protocol::Icmp => "icmp",
                        patronus_proto::policy::Protocol::Icmpv6 => "icmpv6",
                    }
                    .to_owned(),
                    dst_ports: s.dst_ports.iter().map(|&(a, b)| [a, b]).collect(),
                })
                .collect(),
        })
        .collect();
    Ok(HttpResponse::Ok().json(catalog))
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(app_classes)
        .service(list)
        .service(create)
        .service(get)
        .service(replace)
        .service(delete);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn voip() -> Value {
        json!({
            "match": { "protocol": "udp", "dst_ports": [{ "start": 5060, "end": 5061 }] },
            "app_class": "voip",
            "path_preference": { "kind": "lowest_latency" },
            "sla": { "max_latency_ms": 150.0 }
        })
    }

    #[test]
    fn a_routing_policy_compiles() {
        let compiled =
            compile(Uuid::nil(), "VoIP", PolicyKind::Routing, 200, true, &voip()).unwrap();
        assert!(
            matches!(compiled, CompiledPolicy::Routing(p) if p.priority == 200 && p.app_class.0 == "voip")
        );
    }

    #[test]
    fn bad_policies_name_the_field() {
        let mut reversed = voip();
        reversed["match"]["dst_ports"] = json!([{ "start": 9, "end": 1 }]);
        let err = compile(Uuid::nil(), "x", PolicyKind::Routing, 1, true, &reversed).unwrap_err();
        assert!(
            err.detail.contains("spec.routing") || err.detail.contains("dst_ports"),
            "{}",
            err.detail
        );

        let mut misspelt = voip();
        misspelt["match"]["dst_prots"] = json!([1]);
        let err = compile(Uuid::nil(), "x", PolicyKind::Routing, 1, true, &misspelt).unwrap_err();
        assert!(err.detail.contains("match.dst_prots"), "{}", err.detail);

        let mut icmp_ports = voip();
        icmp_ports["match"]["protocol"] = json!("icmp");
        assert!(compile(Uuid::nil(), "x", PolicyKind::Routing, 1, true, &icmp_ports).is_err());

        let mut reserved = voip();
        reserved["priority"] = json!(5);
        assert!(compile(Uuid::nil(), "x", PolicyKind::Routing, 1, true, &reserved).is_err());

        assert!(compile(
            Uuid::nil(),
            "x",
            PolicyKind::Routing,
            1,
            true,
            &json!([1, 2])
        )
        .is_err());
        assert!(compile(
            Uuid::nil(),
            "x",
            PolicyKind::Qos,
            1,
            true,
            &json!({ "classes": [] })
        )
        .is_err());
    }

    #[test]
    fn other_kinds_compile() {
        assert!(compile(
            Uuid::nil(),
            "q",
            PolicyKind::Qos,
            1,
            true,
            &json!({ "classes": ["voip"], "dscp": 46 })
        )
        .is_ok());
        assert!(compile(
            Uuid::nil(),
            "s",
            PolicyKind::Security,
            1,
            true,
            &json!({ "action": "deny" })
        )
        .is_ok());
        assert!(compile(
            Uuid::nil(),
            "c",
            PolicyKind::Cost,
            1,
            true,
            &json!({ "max_cost_per_gb": 0.05, "prefer_unmetered": true })
        )
        .is_ok());
    }
}
