//! Long-lived API tokens for scripts: scoped to one tenant and a role, stored only as a
//! SHA-256, shown once at creation, listed without their secret, revoked at any time.
//! Only a signed-in admin creates or revokes them (a token cannot mint tokens).
//!
//! - `GET|POST /api-tokens`, `DELETE /api-tokens/{id}`

use actix_web::{delete, get, post, web, HttpResponse};
use chrono::{DateTime, Duration, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{record_audit, Actor, Ctx, PageQuery};
use super::error::{ApiError, ApiResult};
use super::tenants::check_name;
use crate::auth::{new_secret, Role, API_TOKEN_PREFIX};
use crate::db::schema::api_tokens;
use utoipa_actix_web::service_config::ServiceConfig;

/// Longest lifetime a token may be given.
pub const MAX_TOKEN_DAYS: i64 = 3650;

#[derive(utoipa::ToSchema, Queryable, Selectable, Serialize, Debug)]
#[diesel(table_name = api_tokens)]
pub struct ApiToken {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub role: String,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// None: never expires (until revoked).
    pub expires_in_days: Option<i64>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct CreatedToken {
    #[serde(flatten)]
    token: ApiToken,
    /// The secret; shown this once.
    secret: String,
}

fn require_signed_in_admin(ctx: &Ctx) -> ApiResult<Uuid> {
    match ctx.principal.actor {
        Actor::Operator { id, .. } if ctx.principal.role.can_write() => Ok(id),
        Actor::Operator { .. } => Err(ApiError::forbidden("viewers cannot manage API tokens")),
        Actor::ApiToken { .. } => Err(ApiError::forbidden(
            "API tokens cannot manage API tokens; sign in",
        )),
    }
}

#[utoipa::path(operation_id = "list_api_tokens", tag = "api-tokens", params(PageQuery), security(("bearer" = [])), responses((status = 200, body = crate::api::context::List<ApiToken>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/api-tokens")]
async fn list(ctx: Ctx, query: web::Query<PageQuery>) -> ApiResult<HttpResponse> {
    let page = query.page()?;
    let rows = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let mut q = api_tokens::table.select(ApiToken::as_select()).into_boxed();
                q = crate::after_cursor!(q, page, api_tokens::created_at, api_tokens::id);
                Ok(q.order((api_tokens::created_at, api_tokens::id))
                    .limit(page.limit + 1)
                    .load::<ApiToken>(conn)
                    .await?)
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(page.finish(rows, |t| (t.created_at, t.id))))
}

#[utoipa::path(operation_id = "create_api_tokens", tag = "api-tokens", request_body = CreateToken, security(("bearer" = [])), responses((status = 201, body = CreatedToken, description = "the token; its secret is shown only here"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/api-tokens")]
async fn create(ctx: Ctx, body: web::Json<CreateToken>) -> ApiResult<HttpResponse> {
    let (token, secret) = create_api_token(&ctx, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(CreatedToken { token, secret }))
}

/// Create an API token of the acting tenant (signed-in admins only, rate-limited), audited:
/// the token and its secret, shown once. Shared by the API and the portal.
pub(crate) async fn create_api_token(
    ctx: &Ctx,
    body: CreateToken,
) -> ApiResult<(ApiToken, String)> {
    let creator = require_signed_in_admin(ctx)?;
    let tenant = ctx.tenant()?;
    super::context::rate_limit(&ctx.state, &format!("api-token-create:{creator}"), 30, 3600)
        .await?;
    check_name("name", &body.name)?;
    if body.role == Role::MspAdmin {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "API tokens are tenant_admin or tenant_viewer",
        ));
    }
    let expires_at = match body.expires_in_days {
        Some(days) if (1..=MAX_TOKEN_DAYS).contains(&days) => {
            Some(Utc::now() + Duration::days(days))
        }
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_value",
                format!("expires_in_days must be 1-{MAX_TOKEN_DAYS}"),
            ))
        }
        None => None,
    };
    let (secret, hash) = new_secret(API_TOKEN_PREFIX);
    let id = Uuid::new_v4();
    let audit = ctx.audit(
        "api_token.create",
        "api_token",
        id,
        serde_json::json!({ "name": body.name, "role": body.role }),
    );
    let token = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let row = diesel::insert_into(api_tokens::table)
                    .values((
                        api_tokens::id.eq(id),
                        api_tokens::tenant_id.eq(tenant.0),
                        api_tokens::name.eq(&body.name),
                        api_tokens::token_hash.eq(hash),
                        api_tokens::role.eq(body.role.as_str()),
                        api_tokens::created_by.eq(Some(creator)),
                        api_tokens::expires_at.eq(expires_at),
                    ))
                    .returning(ApiToken::as_returning())
                    .get_result(conn)
                    .await?;
                record_audit(conn, audit).await?;
                Ok(row)
            })
        })
        .await?;
    Ok((token, secret))
}

#[utoipa::path(operation_id = "revoke_api_tokens", tag = "api-tokens", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 204, description = "revoked"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[delete("/api-tokens/{id}")]
async fn revoke(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    revoke_api_token(&ctx, id.into_inner().id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Revoke an API token of the acting tenant, audited. Shared by the API and the portal.
pub(crate) async fn revoke_api_token(ctx: &Ctx, id: Uuid) -> ApiResult<()> {
    require_signed_in_admin(ctx)?;
    let audit = ctx.audit("api_token.revoke", "api_token", id, serde_json::json!({}));
    let revoked = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let n = diesel::update(
                    api_tokens::table
                        .find(id)
                        .filter(api_tokens::revoked_at.is_null()),
                )
                .set(api_tokens::revoked_at.eq(Some(Utc::now())))
                .execute(conn)
                .await?;
                if n > 0 {
                    record_audit(conn, audit).await?;
                }
                Ok(n)
            })
        })
        .await?;
    if revoked == 0 {
        return Err(ApiError::not_found("API token"));
    }
    Ok(())
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list).service(create).service(revoke);
}
