//! Per-request context: who is calling (session or API token), which tenant the request acts
//! for, the request id, and helpers every handler uses (tenant-scoped transactions, audit
//! entries, pagination, rate limits).
//!
//! Tenant resolution: a tenant operator or API token always acts for its own tenant; naming
//! another (path prefix `/api/v1/tenants/{tenant}` or header `X-Patronus-Tenant`) answers 404.
//! An `msp_admin` names the tenant the same way, and gets 404 for a tenant outside its MSP.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Bytea, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use patronus_proto::TenantId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use crate::auth::{secret_hash, Role, API_TOKEN_PREFIX};
use crate::db::{self, schema, Scope, ScopedWork};
use crate::server::AppState;

/// Header an MSP admin may use instead of the `/tenants/{tenant}` path prefix.
pub const TENANT_HEADER: &str = "X-Patronus-Tenant";
pub const REQUEST_ID_HEADER: &str = "X-Request-Id";

/// The request id, set by the middleware in `api::configure`.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    Operator { id: Uuid, label: String },
    ApiToken { id: Uuid, label: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub actor: Actor,
    pub msp: Uuid,
    /// The caller's own tenant (none for an MSP admin).
    pub tenant: Option<TenantId>,
    pub role: Role,
}

impl Principal {
    fn actor_parts(&self) -> (&'static str, Uuid, &str) {
        match &self.actor {
            Actor::Operator { id, label } => ("operator", *id, label),
            Actor::ApiToken { id, label } => ("api_token", *id, label),
        }
    }
}

/// Everything a handler needs about the request.
pub struct Ctx {
    pub state: web::Data<AppState>,
    pub principal: Principal,
    /// The tenant this request acts for, if any.
    pub tenant: Option<TenantId>,
    pub request_id: String,
    pub source_ip: Option<IpAddr>,
}

#[derive(QueryableByName)]
struct TokenRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    tenant_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    msp_id: Uuid,
    #[diesel(sql_type = Text)]
    role: String,
    #[diesel(sql_type = Text)]
    name: String,
}

pub(super) fn bearer(req: &HttpRequest) -> ApiResult<String> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized("send Authorization: Bearer <session token or API token>")
        })?;
    let text = header
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not ASCII"))?;
    let token = text.strip_prefix("Bearer ").ok_or_else(|| {
        ApiError::unauthorized("use the Bearer scheme: Authorization: Bearer <token>")
    })?;
    if token.is_empty() || token.len() > 4096 {
        return Err(ApiError::unauthorized(
            "the bearer token is empty or too long",
        ));
    }
    Ok(token.to_owned())
}

pub(crate) async fn authenticate(state: &AppState, token: &str) -> ApiResult<Principal> {
    if token.starts_with(API_TOKEN_PREFIX) {
        let hash = secret_hash(token);
        let mut conn = state.db.get().await.map_err(db::DbError::from)?;
        let row: Option<TokenRow> = diesel::sql_query(
            "SELECT id, tenant_id, msp_id, role, name FROM patronus_api_token_for_hash($1)",
        )
        .bind::<Bytea, _>(hash)
        .get_result(&mut conn)
        .await
        .optional()?;
        let row = row.ok_or_else(|| {
            ApiError::unauthorized("the API token is unknown, expired or revoked")
        })?;
        let role = Role::parse(&row.role)
            .ok_or_else(|| ApiError::internal("API token with an unknown role"))?;
        diesel::sql_query("SELECT patronus_api_token_touch($1)")
            .bind::<SqlUuid, _>(row.id)
            .execute(&mut conn)
            .await?;
        return Ok(Principal {
            actor: Actor::ApiToken {
                id: row.id,
                label: row.name,
            },
            msp: row.msp_id,
            tenant: Some(TenantId(row.tenant_id)),
            role,
        });
    }
    let claims = state.session_keys.verify(token).map_err(|_| {
        ApiError::unauthorized("the session token is invalid or expired; log in again")
    })?;
    if super::session::is_revoked(state, claims.jti).await? {
        return Err(ApiError::unauthorized(
            "the session was logged out; log in again",
        ));
    }
    Ok(Principal {
        actor: Actor::Operator {
            id: claims.sub,
            label: claims.label.clone(),
        },
        msp: claims.msp,
        tenant: claims.tenant,
        role: claims.role,
    })
}

pub(crate) fn requested_tenant(req: &HttpRequest) -> ApiResult<Option<TenantId>> {
    let text = match req.match_info().get("tenant") {
        Some(t) => Some(t.to_owned()),
        None => match req.headers().get(TENANT_HEADER) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| ApiError::not_found("tenant"))?
                    .to_owned(),
            ),
            None => None,
        },
    };
    text.map(|t| {
        t.parse::<TenantId>()
            .map_err(|_| ApiError::not_found("tenant"))
    })
    .transpose()
}

pub(crate) async fn resolve_tenant(
    state: &AppState,
    principal: &Principal,
    requested: Option<TenantId>,
) -> ApiResult<Option<TenantId>> {
    match (principal.tenant, requested) {
        (Some(own), Some(other)) if own != other => Err(ApiError::not_found("tenant")),
        (Some(own), _) => Ok(Some(own)),
        (None, None) => Ok(None),
        (None, Some(wanted)) => {
            let mut conn = state.db.get().await.map_err(db::DbError::from)?;
            let msp = principal.msp;
            let found: Option<Uuid> =
                db::in_scope(&mut conn, Scope::Msp { msp, tenant: None }, move |conn| {
                    Box::pin(async move {
                        schema::tenants::table
                            .filter(schema::tenants::id.eq(wanted.0))
                            .filter(schema::tenants::msp_id.eq(msp))
                            .select(schema::tenants::id)
                            .first::<Uuid>(conn)
                            .await
                            .optional()
                    })
                })
                .await?;
            found
                .map(|id| Some(TenantId(id)))
                .ok_or_else(|| ApiError::not_found("tenant"))
        }
    }
}

impl FromRequest for Ctx {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = req
                .app_data::<web::Data<AppState>>()
                .cloned()
                .ok_or_else(|| ApiError::internal("application state missing"))?;
            let request_id = req
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default();
            let token = match bearer(&req) {
                Ok(token) => token,
                Err(no_bearer) => crate::portal::websocket_session(&req).ok_or(no_bearer)?,
            };
            let principal = authenticate(&state, &token).await?;
            let tenant = resolve_tenant(&state, &principal, requested_tenant(&req)?).await?;
            let source_ip = req.peer_addr().map(|a| a.ip());
            Ok(Ctx {
                state,
                principal,
                tenant,
                request_id,
                source_ip,
            })
        })
    }
}

impl Ctx {
    /// The tenant this request acts for; an MSP admin must name one.
    pub fn tenant(&self) -> ApiResult<TenantId> {
        self.tenant.ok_or_else(|| {
            ApiError::bad_request(
                "tenant_required",
                format!("as an MSP admin, name the tenant: /api/v1/tenants/{{tenant}}/... or the {TENANT_HEADER} header"),
            )
        })
    }

    pub fn require_write(&self) -> ApiResult<()> {
        if self.principal.role.can_write() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this role is read-only"))
        }
    }

    pub fn require_msp_admin(&self) -> ApiResult<()> {
        if self.principal.role == Role::MspAdmin {
            Ok(())
        } else {
            Err(ApiError::forbidden("only an MSP admin may do this"))
        }
    }

    /// Run `work` in one transaction scoped to the acting tenant.
    pub async fn tenant_tx<T, F>(&self, work: F) -> ApiResult<T>
    where
        T: Send,
        F: for<'r> FnOnce(&'r mut AsyncPgConnection) -> ScopedWork<'r, ApiResult<T>> + Send,
    {
        let scope = Scope::Tenant(self.tenant()?);
        let mut conn = self.state.db.get().await.map_err(db::DbError::from)?;
        db::in_scope(&mut conn, scope, work).await
    }

    /// Run read-only `work` in one transaction scoped to the acting tenant
    /// ([`db::read_in_scope`]: writes are refused, the answer does not wait for the COMMIT).
    pub async fn tenant_read<T, F>(&self, work: F) -> ApiResult<T>
    where
        T: Send,
        F: for<'r> FnOnce(&'r mut AsyncPgConnection) -> ScopedWork<'r, ApiResult<T>> + Send,
    {
        let scope = Scope::Tenant(self.tenant()?);
        let mut conn = self.state.db.get().await.map_err(db::DbError::from)?;
        db::read_in_scope(&mut conn, scope, work).await
    }

    /// Run `work` in one transaction scoped to the caller's MSP (and acting tenant, if any).
    /// Only an MSP admin gets the MSP-wide key; anyone else is scoped to their own tenant, so
    /// row-level security — not just a handler's `WHERE` — keeps them inside it.
    pub async fn msp_tx<T, F>(&self, work: F) -> ApiResult<T>
    where
        T: Send,
        F: for<'r> FnOnce(&'r mut AsyncPgConnection) -> ScopedWork<'r, ApiResult<T>> + Send,
    {
        let scope = match (self.principal.role, self.principal.tenant) {
            (Role::MspAdmin, _) => Scope::Msp {
                msp: self.principal.msp,
                tenant: self.tenant,
            },
            (_, Some(own)) => Scope::Tenant(own),
            (_, None) => return Err(ApiError::internal("a tenant role without a tenant")),
        };
        let mut conn = self.state.db.get().await.map_err(db::DbError::from)?;
        db::in_scope(&mut conn, scope, work).await
    }

    /// An audit entry for a change this request makes; insert it with [`record_audit`] in the
    /// same transaction as the change.
    pub fn audit(
        &self,
        action: &'static str,
        target_kind: &'static str,
        target_id: impl ToString,
        detail: serde_json::Value,
    ) -> AuditEntry {
        let (actor_kind, actor_id, actor_label) = self.principal.actor_parts();
        AuditEntry {
            msp_id: self.principal.msp,
            tenant_id: self.tenant.map(|t| t.0),
            actor_kind,
            actor_id,
            actor_label: actor_label.to_owned(),
            action,
            target_kind,
            target_id: target_id.to_string(),
            detail,
            request_id: self.request_id.clone(),
            source_ip: self.source_ip,
        }
    }
}

/// One audit-log row.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub msp_id: Uuid,
    pub tenant_id: Option<Uuid>,
    pub actor_kind: &'static str,
    pub actor_id: Uuid,
    pub actor_label: String,
    pub action: &'static str,
    pub target_kind: &'static str,
    pub target_id: String,
    pub detail: serde_json::Value,
    pub request_id: String,
    pub source_ip: Option<IpAddr>,
}

/// Takes the connection shared so a handler can pipeline the insert with its own change
/// (`try_join`): the transaction still commits both or neither.
pub async fn record_audit(conn: &AsyncPgConnection, entry: AuditEntry) -> ApiResult<()> {
    use schema::audit_log::dsl as a;
    diesel::insert_into(a::audit_log)
        .values((
            a::msp_id.eq(entry.msp_id),
            a::tenant_id.eq(entry.tenant_id),
            a::actor_kind.eq(entry.actor_kind),
            a::actor_id.eq(Some(entry.actor_id)),
            a::actor_label.eq(entry.actor_label),
            a::action.eq(entry.action),
            a::target_kind.eq(entry.target_kind),
            a::target_id.eq(Some(entry.target_id)),
            a::detail.eq(entry.detail),
            a::request_id.eq(Some(entry.request_id)),
            a::source_ip.eq(entry.source_ip.map(ipnet::IpNet::from)),
        ))
        .execute(&mut &*conn)
        .await?;
    Ok(())
}

/// The `{id}` of a resource path. Extracted by name, so the same handler works at
/// `/api/v1/sites/{id}` and `/api/v1/tenants/{tenant}/sites/{id}`.
#[derive(Deserialize, Debug, Clone, Copy)]
pub struct IdPath {
    pub id: Uuid,
}

/// Continue a keyset-paginated query after the page's cursor: rows strictly after
/// `(created_at, id)` of the last row seen. `$at` and `$id` are the ordering columns.
#[macro_export]
macro_rules! after_cursor {
    ($query:expr, $page:expr, $at:path, $id:path) => {
        match $page.after {
            Some((at, id)) => $query.filter($at.gt(at).or($at.eq(at).and($id.gt(id)))),
            None => $query,
        }
    };
}

/// Most items one page may hold.
pub const MAX_PAGE: i64 = 500;
pub const DEFAULT_PAGE: i64 = 50;

/// Keyset pagination: items are ordered by (created_at, id); the cursor is the last one seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

impl Page {
    pub fn parse(limit: Option<i64>, cursor: Option<&str>) -> ApiResult<Self> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("limit must be 1-{MAX_PAGE}"),
            ));
        }
        let after = cursor.map(decode_cursor).transpose()?;
        Ok(Self { limit, after })
    }

    /// Cut the over-fetched (limit + 1) rows to a page and the cursor of the next one.
    pub fn finish<T>(
        &self,
        mut rows: Vec<T>,
        key: impl Fn(&T) -> (DateTime<Utc>, Uuid),
    ) -> List<T> {
        let more = rows.len() as i64 > self.limit;
        rows.truncate(self.limit as usize);
        let next_cursor = if more {
            rows.last().map(|last| {
                let (at, id) = key(last);
                encode_cursor(at, id)
            })
        } else {
            None
        };
        List {
            items: rows,
            next_cursor,
        }
    }
}

pub fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", at.timestamp_micros(), id))
}

fn decode_cursor(cursor: &str) -> ApiResult<(DateTime<Utc>, Uuid)> {
    let bad = || ApiError::bad_request("invalid_query", "cursor is not one this API returned");
    let text = URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    let (micros, id) = text.split_once(':').ok_or_else(bad)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

/// One page of a list.
#[derive(utoipa::ToSchema, Serialize, Debug)]
pub struct List<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// `?limit=&cursor=` for lists with no other filter.
#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn page(&self) -> ApiResult<Page> {
        Page::parse(self.limit, self.cursor.as_deref())
    }
}

/// Fixed-window rate limit in Redis, per deployment: at most `limit` hits per `window_s` for
/// `key`.
pub async fn rate_limit(state: &AppState, key: &str, limit: u32, window_s: u64) -> ApiResult<()> {
    let mut redis = state.redis().await?;
    // Per deployment: controllers of other deployments sharing the Redis (another MSP's, a
    // staging one) keep their own counts.
    let full_key = format!("patronus:{}:ratelimit:{key}", state.deployment);
    let (count, ttl): (u64, i64) = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg(&full_key)
        .cmd("EXPIRE")
        .arg(&full_key)
        .arg(window_s)
        .arg("NX")
        .ignore()
        .cmd("TTL")
        .arg(&full_key)
        .query_async(&mut redis)
        .await?;
    if count > u64::from(limit) {
        return Err(ApiError::too_many_requests(ttl.max(1) as u64));
    }
    Ok(())
}

/// Hash an identifier for use in a Redis key (no e-mail addresses in Redis).
pub fn key_hash(text: &str) -> String {
    secret_hash(&text.to_lowercase())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}
