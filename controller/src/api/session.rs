//! Sign-in: `POST /auth/login`, `POST /auth/refresh`, `POST /auth/logout`, `GET /auth/me`.
//!
//! Login returns a short-lived session token (JWT) and a refresh token. A refresh token works
//! once: redeeming it (an atomic GETDEL in Redis) returns a new pair, so a stolen and replayed
//! refresh token fails for whoever comes second. Logout deny-lists the session until it
//! expires. Login and refresh are rate-limited per source address and per account.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{get, post, web, HttpMessage, HttpRequest, HttpResponse};
use diesel::prelude::*;
use diesel::sql_types::{Bool, Nullable, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use patronus_proto::TenantId;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{key_hash, rate_limit, record_audit, Actor, AuditEntry, Ctx};
use super::error::{ApiError, ApiResult};
use crate::auth::{self, new_secret, secret_hash, Role, SessionKeys, REFRESH_TOKEN_PREFIX};
use crate::db::{self, schema, Scope};
use crate::server::AppState;

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(utoipa::ToSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogoutRequest {
    pub refresh_token: Option<String>,
}

#[derive(utoipa::ToSchema, Serialize)]
pub struct OperatorSummary {
    pub id: Uuid,
    pub email: String,
    pub msp_id: Uuid,
    pub tenant_id: Option<Uuid>,
    pub role: Role,
}

#[derive(utoipa::ToSchema, Serialize)]
pub struct TokenPair {
    pub session_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_in: u64,
    pub operator: OperatorSummary,
}

/// What Redis keeps for a refresh token (under the token's hash).
#[derive(Serialize, Deserialize)]
struct RefreshRecord {
    operator: Uuid,
    email: String,
    msp: Uuid,
    tenant: Option<Uuid>,
    role: Role,
}

#[derive(QueryableByName)]
struct LoginRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    msp_id: Uuid,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    tenant_id: Option<Uuid>,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Text)]
    role: String,
    #[diesel(sql_type = Text)]
    password_hash: String,
    #[diesel(sql_type = Bool)]
    disabled: bool,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn refresh_key(token: &str) -> String {
    let hex: String = secret_hash(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("patronus:refresh:{hex}")
}

fn revoked_key(jti: Uuid) -> String {
    format!("patronus:session-revoked:{jti}")
}

pub async fn is_revoked(state: &AppState, jti: Uuid) -> ApiResult<bool> {
    let mut redis = state.redis().await?;
    Ok(redis.exists(revoked_key(jti)).await?)
}

fn source_key(req: &HttpRequest) -> String {
    req.peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

async fn issue_pair(state: &AppState, record: RefreshRecord) -> ApiResult<TokenPair> {
    let ttl = state.auth.session_ttl_s;
    let tenant = record.tenant.map(TenantId);
    let mut claims = SessionKeys::new_claims(
        record.operator,
        record.msp,
        tenant,
        record.role,
        now_unix(),
        ttl,
    );
    claims.label = record.email.clone();
    let session_token = state
        .session_keys
        .issue(&claims)
        .map_err(ApiError::internal)?;
    let (refresh_token, _) = new_secret(REFRESH_TOKEN_PREFIX);
    let value = serde_json::to_string(&record).map_err(ApiError::internal)?;
    let mut redis = state.redis().await?;
    let () = redis
        .set_ex(refresh_key(&refresh_token), value, state.auth.refresh_ttl_s)
        .await?;
    Ok(TokenPair {
        session_token,
        token_type: "Bearer",
        expires_in: ttl,
        refresh_token,
        refresh_expires_in: state.auth.refresh_ttl_s,
        operator: OperatorSummary {
            id: record.operator,
            email: record.email,
            msp_id: record.msp,
            tenant_id: record.tenant,
            role: record.role,
        },
    })
}

#[utoipa::path(operation_id = "auth_login", tag = "auth", request_body = LoginRequest, responses((status = 200, body = TokenPair), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/auth/login")]
pub async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<LoginRequest>,
) -> ApiResult<HttpResponse> {
    let LoginRequest { email, password } = body.into_inner();
    let pair = password_login(&state, &req, email, password).await?;
    Ok(HttpResponse::Ok().json(pair))
}

/// Check an operator's e-mail and password (rate-limited per source and per account, the
/// same answer for an unknown account and a wrong password), record the login in the audit
/// log and issue a session. Shared by the API and the portal's sign-in form.
pub(crate) async fn password_login(
    state: &AppState,
    req: &HttpRequest,
    email: String,
    password: String,
) -> ApiResult<TokenPair> {
    if email.is_empty() || email.len() > 254 || password.len() > auth::MAX_PASSWORD_LEN * 4 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "email and password are required",
        ));
    }
    let auth_config = &state.auth;
    rate_limit(
        state,
        &format!("login:src:{}", source_key(req)),
        auth_config.login_per_minute_per_source,
        60,
    )
    .await?;
    rate_limit(
        state,
        &format!("login:acct:{}", key_hash(&email)),
        auth_config.login_per_minute_per_account,
        60,
    )
    .await?;

    let mut conn = state.db.get().await.map_err(db::DbError::from)?;
    let row: Option<LoginRow> = diesel::sql_query(
        "SELECT id, msp_id, tenant_id, email, role, password_hash, disabled FROM patronus_operator_for_login($1)",
    )
    .bind::<Text, _>(&email)
    .get_result(&mut conn)
    .await
    .optional()?;
    let stored = row
        .as_ref()
        .map(|r| r.password_hash.clone())
        .unwrap_or_else(|| auth::dummy_password_hash().to_owned());
    let matches = web::block(move || auth::verify_password(&password, &stored))
        .await
        .map_err(ApiError::internal)?;
    let bad = || ApiError::unauthorized("wrong e-mail or password");
    let row = match row {
        Some(row) if matches => row,
        _ => {
            tracing::info!(reason = "bad_credentials", "login refused");
            return Err(bad());
        }
    };
    if row.disabled {
        return Err(ApiError::unauthorized(
            "this account is disabled; ask an administrator",
        ));
    }
    let role = Role::parse(&row.role)
        .ok_or_else(|| ApiError::internal("operator with an unknown role"))?;
    let scope = Scope::Msp {
        msp: row.msp_id,
        tenant: row.tenant_id.map(TenantId),
    };
    let operator_id = row.id;
    let audit = AuditEntry {
        msp_id: row.msp_id,
        tenant_id: row.tenant_id,
        actor_kind: "operator",
        actor_id: row.id,
        actor_label: row.email.clone(),
        action: "operator.login",
        target_kind: "operator",
        target_id: row.id.to_string(),
        detail: serde_json::json!({}),
        request_id: req
            .extensions()
            .get::<super::context::RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default(),
        source_ip: req.peer_addr().map(|a| a.ip()),
    };
    db::in_scope(&mut conn, scope, move |conn| {
        Box::pin(async move {
            diesel::update(schema::operators::table.find(operator_id))
                .set(schema::operators::last_login_at.eq(diesel::dsl::now))
                .execute(conn)
                .await?;
            record_audit(conn, audit).await
        })
    })
    .await?;
    tracing::info!(operator = %row.id, msp = %row.msp_id, "login");
    issue_pair(
        state,
        RefreshRecord {
            operator: row.id,
            email: row.email.clone(),
            msp: row.msp_id,
            tenant: row.tenant_id,
            role,
        },
    )
    .await
}

/// End the session of `token` (a session JWT) before it expires: later requests with it are
/// refused. An invalid token is already no session.
pub(crate) async fn revoke_session(state: &AppState, token: &str) -> ApiResult<()> {
    if let Ok(claims) = state.session_keys.verify(token) {
        let mut redis = state.redis().await?;
        let remaining = claims.exp.saturating_sub(now_unix()).max(1);
        let () = redis.set_ex(revoked_key(claims.jti), 1, remaining).await?;
    }
    Ok(())
}

#[utoipa::path(operation_id = "auth_refresh", tag = "auth", request_body = RefreshRequest, responses((status = 200, body = TokenPair), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/auth/refresh")]
pub async fn refresh(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<RefreshRequest>,
) -> ApiResult<HttpResponse> {
    rate_limit(
        &state,
        &format!("refresh:src:{}", source_key(&req)),
        state.auth.login_per_minute_per_source,
        60,
    )
    .await?;
    let token = body.into_inner().refresh_token;
    if !token.starts_with(REFRESH_TOKEN_PREFIX) || token.len() > 256 {
        return Err(ApiError::unauthorized("not a refresh token"));
    }
    let mut redis = state.redis().await?;
    let value: Option<String> = redis::cmd("GETDEL")
        .arg(refresh_key(&token))
        .query_async(&mut redis)
        .await?;
    let record: RefreshRecord = value
        .and_then(|v| serde_json::from_str(&v).ok())
        .ok_or_else(|| {
            ApiError::unauthorized("the refresh token is unknown, used or expired; log in again")
        })?;
    // The operator must still exist and be enabled.
    let mut conn = state.db.get().await.map_err(db::DbError::from)?;
    let scope = Scope::Msp {
        msp: record.msp,
        tenant: record.tenant.map(TenantId),
    };
    let operator = record.operator;
    let disabled: Option<Option<chrono::DateTime<chrono::Utc>>> =
        db::in_scope(&mut conn, scope, move |conn| {
            Box::pin(async move {
                schema::operators::table
                    .find(operator)
                    .select(schema::operators::disabled_at)
                    .first(conn)
                    .await
                    .optional()
            })
        })
        .await?;
    match disabled {
        Some(None) => Ok(HttpResponse::Ok().json(issue_pair(&state, record).await?)),
        _ => Err(ApiError::unauthorized("the account is gone or disabled")),
    }
}

#[utoipa::path(operation_id = "auth_logout", tag = "auth", request_body(content = Option<LogoutRequest>), security(("bearer" = [])), responses((status = 204, description = "logged out"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/auth/logout")]
pub async fn logout(
    ctx: Ctx,
    req: HttpRequest,
    body: Option<web::Json<LogoutRequest>>,
) -> ApiResult<HttpResponse> {
    if let Ok(token) = super::context::bearer(&req) {
        revoke_session(&ctx.state, &token).await?;
    }
    let mut redis = ctx.state.redis().await?;
    if let Some(refresh_token) = body.and_then(|b| b.into_inner().refresh_token) {
        let _: u64 = redis.del(refresh_key(&refresh_token)).await?;
    }
    Ok(HttpResponse::NoContent().finish())
}

#[derive(utoipa::ToSchema, Serialize)]
struct Me {
    actor_kind: &'static str,
    id: Uuid,
    label: String,
    msp_id: Uuid,
    tenant_id: Option<Uuid>,
    acting_tenant_id: Option<Uuid>,
    role: Role,
}

#[utoipa::path(operation_id = "auth_me", tag = "auth", security(("bearer" = [])), responses((status = 200, body = Me), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/auth/me")]
pub async fn me(ctx: Ctx) -> ApiResult<HttpResponse> {
    let (actor_kind, id, label) = match &ctx.principal.actor {
        Actor::Operator { id, label } => ("operator", *id, label.clone()),
        Actor::ApiToken { id, label } => ("api_token", *id, label.clone()),
    };
    Ok(HttpResponse::Ok().json(Me {
        actor_kind,
        id,
        label,
        msp_id: ctx.principal.msp,
        tenant_id: ctx.principal.tenant.map(|t| t.0),
        acting_tenant_id: ctx.tenant.map(|t| t.0),
        role: ctx.principal.role,
    }))
}
