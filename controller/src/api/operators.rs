//! Operators: people who sign in. An MSP admin manages the MSP's admins (no tenant named) and
//! every tenant's operators; a tenant admin manages its own tenant's operators.
//!
//! - `GET|POST /operators`, `GET|PATCH|DELETE /operators/{id}`

use actix_web::{delete, get, patch, post, web, HttpResponse};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{record_audit, Ctx, PageQuery};
use super::error::{ApiError, ApiResult};
use crate::auth::{self, Role};
use crate::db::schema::operators;
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Queryable, Selectable, Serialize, Debug)]
#[diesel(table_name = operators)]
pub struct Operator {
    pub id: Uuid,
    pub msp_id: Uuid,
    pub tenant_id: Option<Uuid>,
    pub email: String,
    pub display_name: String,
    pub role: String,
    pub disabled_at: Option<DateTime<Utc>>,
    pub last_login_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOperator {
    pub email: String,
    pub password: String,
    pub role: Role,
    #[serde(default)]
    pub display_name: String,
}

#[derive(utoipa::ToSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateOperator {
    pub display_name: Option<String>,
    pub role: Option<Role>,
    pub password: Option<String>,
    pub disabled: Option<bool>,
}

fn check_email(email: &str) -> ApiResult<()> {
    let ok = email.len() <= 254
        && email.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty()
                && !host.is_empty()
                && !email.chars().any(char::is_whitespace)
                && !host.contains('@')
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_value",
            "email is not an e-mail address",
        ))
    }
}

/// Which operators a request manages: an acting tenant's, or (MSP admin, no tenant) the MSP's.
fn managed_tenant(ctx: &Ctx) -> Option<Uuid> {
    ctx.tenant.map(|t| t.0)
}

fn check_can_manage(ctx: &Ctx, role: Role) -> ApiResult<()> {
    match (role, managed_tenant(ctx)) {
        (Role::MspAdmin, None) => ctx.require_msp_admin(),
        (Role::MspAdmin, Some(_)) => Err(ApiError::unprocessable(
            "invalid_value",
            "an msp_admin belongs to no tenant; create it without naming a tenant",
        )),
        (_, None) => Err(ApiError::bad_request(
            "tenant_required",
            "tenant roles need a tenant: /api/v1/tenants/{tenant}/operators or X-Patronus-Tenant",
        )),
        (_, Some(_)) => {
            if matches!(ctx.principal.role, Role::MspAdmin | Role::TenantAdmin)
                && matches!(ctx.principal.actor, super::context::Actor::Operator { .. })
            {
                Ok(())
            } else {
                Err(ApiError::forbidden(
                    "only an admin, signed in, manages operators",
                ))
            }
        }
    }
}

#[utoipa::path(operation_id = "list_operators", tag = "operators", params(PageQuery), security(("bearer" = [])), responses((status = 200, body = crate::api::context::List<Operator>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/operators")]
async fn list(ctx: Ctx, query: web::Query<PageQuery>) -> ApiResult<HttpResponse> {
    let page = query.page()?;
    let tenant = managed_tenant(&ctx);
    let rows = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                let mut q = operators::table.select(Operator::as_select()).into_boxed();
                q = match tenant {
                    Some(t) => q.filter(operators::tenant_id.eq(t)),
                    None => q.filter(operators::tenant_id.is_null()),
                };
                q = crate::after_cursor!(q, page, operators::created_at, operators::id);
                Ok(q.order((operators::created_at, operators::id))
                    .limit(page.limit + 1)
                    .load::<Operator>(conn)
                    .await?)
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(page.finish(rows, |o| (o.created_at, o.id))))
}

#[utoipa::path(operation_id = "create_operators", tag = "operators", request_body = CreateOperator, security(("bearer" = [])), responses((status = 201, body = Operator), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/operators")]
async fn create(ctx: Ctx, body: web::Json<CreateOperator>) -> ApiResult<HttpResponse> {
    let row = create_operator(&ctx, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(row))
}

/// Create an operator of the acting tenant (or, for an MSP admin naming none, of the MSP),
/// audited. Shared by the API and the portal.
pub(crate) async fn create_operator(ctx: &Ctx, body: CreateOperator) -> ApiResult<Operator> {
    check_can_manage(ctx, body.role)?;
    check_email(&body.email)?;
    if body.display_name.chars().count() > 128 {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "display_name is at most 128 characters",
        ));
    }
    auth::check_password_policy(&body.password)
        .map_err(|e| ApiError::unprocessable("weak_password", e.to_string()))?;
    let password = body.password;
    let hash = web::block(move || auth::hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let id = Uuid::new_v4();
    let msp = ctx.principal.msp;
    let tenant = managed_tenant(ctx);
    let audit = ctx.audit(
        "operator.create",
        "operator",
        id,
        serde_json::json!({ "email": body.email, "role": body.role }),
    );
    ctx.msp_tx(move |conn| {
        Box::pin(async move {
            let row = diesel::insert_into(operators::table)
                .values((
                    operators::id.eq(id),
                    operators::msp_id.eq(msp),
                    operators::tenant_id.eq(tenant),
                    operators::email.eq(&body.email),
                    operators::display_name.eq(&body.display_name),
                    operators::password_hash.eq(hash),
                    operators::role.eq(body.role.as_str()),
                ))
                .returning(Operator::as_returning())
                .get_result(conn)
                .await?;
            record_audit(conn, audit).await?;
            Ok(row)
        })
    })
    .await
}

async fn find(ctx: &Ctx, id: Uuid) -> ApiResult<Operator> {
    let tenant = managed_tenant(ctx);
    let row = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                let mut q = operators::table
                    .filter(operators::id.eq(id))
                    .select(Operator::as_select())
                    .into_boxed();
                q = match tenant {
                    Some(t) => q.filter(operators::tenant_id.eq(t)),
                    None => q.filter(operators::tenant_id.is_null()),
                };
                Ok(q.first(conn).await.optional()?)
            })
        })
        .await?;
    row.ok_or_else(|| ApiError::not_found("operator"))
}

#[utoipa::path(operation_id = "get_operators", tag = "operators", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 200, body = Operator), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/operators/{id}")]
async fn get(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(find(&ctx, id.into_inner().id).await?))
}

#[utoipa::path(operation_id = "update_operators", tag = "operators", params(("id" = Uuid, Path, description = "id of the resource")), request_body = UpdateOperator, security(("bearer" = [])), responses((status = 200, body = Operator), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[patch("/operators/{id}")]
async fn update(
    ctx: Ctx,
    id: web::Path<super::context::IdPath>,
    body: web::Json<UpdateOperator>,
) -> ApiResult<HttpResponse> {
    let row = update_operator(&ctx, id.into_inner().id, body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(row))
}

/// Change an operator (name, role between the tenant roles, password, disabled), audited.
/// Shared by the API and the portal.
pub(crate) async fn update_operator(
    ctx: &Ctx,
    id: Uuid,
    body: UpdateOperator,
) -> ApiResult<Operator> {
    let existing = find(ctx, id).await?;
    let current_role =
        Role::parse(&existing.role).ok_or_else(|| ApiError::internal("unknown role"))?;
    check_can_manage(ctx, current_role)?;
    if let Some(role) = body.role {
        if (role == Role::MspAdmin) != (current_role == Role::MspAdmin) {
            return Err(ApiError::unprocessable(
                "invalid_value",
                "role can change between tenant_admin and tenant_viewer only",
            ));
        }
    }
    if body
        .display_name
        .as_ref()
        .is_some_and(|n| n.chars().count() > 128)
    {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "display_name is at most 128 characters",
        ));
    }
    let hash = match body.password {
        Some(password) => {
            auth::check_password_policy(&password)
                .map_err(|e| ApiError::unprocessable("weak_password", e.to_string()))?;
            Some(
                web::block(move || auth::hash_password(&password))
                    .await
                    .map_err(ApiError::internal)?
                    .map_err(ApiError::internal)?,
            )
        }
        None => None,
    };
    let audit = ctx.audit(
        "operator.update",
        "operator",
        id,
        serde_json::json!({
            "role": body.role,
            "disabled": body.disabled,
            "password_changed": hash.is_some(),
            "display_name": body.display_name,
        }),
    );
    ctx.msp_tx(move |conn| {
        Box::pin(async move {
            let target = operators::table.find(id);
            if let Some(name) = body.display_name {
                diesel::update(target)
                    .set(operators::display_name.eq(name))
                    .execute(conn)
                    .await?;
            }
            if let Some(role) = body.role {
                diesel::update(target)
                    .set(operators::role.eq(role.as_str()))
                    .execute(conn)
                    .await?;
            }
            if let Some(hash) = hash {
                diesel::update(target)
                    .set(operators::password_hash.eq(hash))
                    .execute(conn)
                    .await?;
            }
            match body.disabled {
                Some(true) => {
                    diesel::update(target)
                        .set(operators::disabled_at.eq(Some(Utc::now())))
                        .execute(conn)
                        .await?;
                }
                Some(false) => {
                    diesel::update(target)
                        .set(operators::disabled_at.eq(None::<DateTime<Utc>>))
                        .execute(conn)
                        .await?;
                }
                None => {}
            }
            record_audit(conn, audit).await?;
            Ok(target.select(Operator::as_select()).first(conn).await?)
        })
    })
    .await
}

#[utoipa::path(operation_id = "delete_operators", tag = "operators", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 204, description = "deleted"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[delete("/operators/{id}")]
async fn delete(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    let id = id.into_inner().id;
    let existing = find(&ctx, id).await?;
    check_can_manage(
        &ctx,
        Role::parse(&existing.role).ok_or_else(|| ApiError::internal("unknown role"))?,
    )?;
    if matches!(ctx.principal.actor, super::context::Actor::Operator { id: me, .. } if me == id) {
        return Err(ApiError::conflict(
            "you cannot delete yourself; ask another admin",
        ));
    }
    let audit = ctx.audit(
        "operator.delete",
        "operator",
        id,
        serde_json::json!({ "email": existing.email }),
    );
    ctx.msp_tx(move |conn| {
        Box::pin(async move {
            diesel::delete(operators::table.find(id))
                .execute(conn)
                .await?;
            record_audit(conn, audit).await
        })
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list)
        .service(create)
        .service(get)
        .service(update)
        .service(delete);
}
