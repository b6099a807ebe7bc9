//! The audit log: who changed what, when, from where. Read-only through the API.
//!
//! - `GET /audit?limit=&before=&action=&target_kind=` newest first; `before` is the `id` of
//!   the last entry of the previous page.

use actix_web::{get, web, HttpResponse};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{Ctx, DEFAULT_PAGE, MAX_PAGE};
use super::error::{ApiError, ApiResult};
use crate::db::schema::audit_log;
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Queryable, Selectable, Serialize, Debug)]
#[diesel(table_name = audit_log)]
pub struct AuditRow {
    pub id: i64,
    pub msp_id: Uuid,
    pub tenant_id: Option<Uuid>,
    pub at: DateTime<Utc>,
    pub actor_kind: String,
    pub actor_id: Option<Uuid>,
    pub actor_label: String,
    pub action: String,
    pub target_kind: String,
    pub target_id: Option<String>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    pub request_id: Option<String>,
    #[schema(value_type = Option<String>)]
    pub source_ip: Option<IpNet>,
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub limit: Option<i64>,
    pub before: Option<i64>,
    pub action: Option<String>,
    pub target_kind: Option<String>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct AuditPage {
    items: Vec<AuditRow>,
    next_before: Option<i64>,
}

#[utoipa::path(operation_id = "list_audit", tag = "audit", params(AuditQuery), security(("bearer" = [])), responses((status = 200, body = AuditPage), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/audit")]
async fn list(ctx: Ctx, query: web::Query<AuditQuery>) -> ApiResult<HttpResponse> {
    let query = query.into_inner();
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1-{MAX_PAGE}"),
        ));
    }
    let tenant = ctx.tenant;
    let mut rows = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                let mut q = audit_log::table.select(AuditRow::as_select()).into_boxed();
                if let Some(t) = tenant {
                    q = q.filter(audit_log::tenant_id.eq(t.0));
                }
                if let Some(before) = query.before {
                    q = q.filter(audit_log::id.lt(before));
                }
                if let Some(action) = query.action {
                    q = q.filter(audit_log::action.eq(action));
                }
                if let Some(kind) = query.target_kind {
                    q = q.filter(audit_log::target_kind.eq(kind));
                }
                Ok(q.order(audit_log::id.desc())
                    .limit(limit + 1)
                    .load::<AuditRow>(conn)
                    .await?)
            })
        })
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_before = if more {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(AuditPage {
        items: rows,
        next_before,
    }))
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list);
}
