//! Flows the edges report (their top flows with the chosen path and byte counts).
//!
//! - `GET /flows?site=&app_class=`, `GET /flows/{id}`

use actix_web::{get, web, HttpResponse};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{Ctx, Page};
use super::error::{ApiError, ApiResult};
use crate::db::schema::flows;
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Queryable, Selectable, Serialize, Debug)]
#[diesel(table_name = flows)]
pub struct FlowRow {
    pub id: Uuid,
    pub site_id: Uuid,
    #[schema(value_type = String)]
    pub src_ip: IpNet,
    #[schema(value_type = String)]
    pub dst_ip: IpNet,
    pub src_port: i32,
    pub dst_port: i32,
    pub protocol: i16,
    pub app_class: String,
    pub policy_id: Option<Uuid>,
    pub path_id: Option<Uuid>,
    pub started_at: DateTime<Utc>,
    pub last_packet_at: DateTime<Utc>,
    pub bytes_tx: i64,
    pub bytes_rx: i64,
    pub packets_tx: i64,
    pub packets_rx: i64,
    pub reported_at: DateTime<Utc>,
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    pub site: Option<Uuid>,
    pub app_class: Option<String>,
}

#[utoipa::path(operation_id = "list_flows", tag = "flows", params(FlowQuery), security(("bearer" = [])), responses((status = 200, body = crate::api::context::List<FlowRow>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/flows")]
async fn list(ctx: Ctx, query: web::Query<FlowQuery>) -> ApiResult<HttpResponse> {
    let query = query.into_inner();
    let page = Page::parse(query.limit, query.cursor.as_deref())?;
    let rows = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let mut q = flows::table.select(FlowRow::as_select()).into_boxed();
                if let Some(site) = query.site {
                    q = q.filter(flows::site_id.eq(site));
                }
                if let Some(class) = query.app_class {
                    q = q.filter(flows::app_class.eq(class));
                }
                q = crate::after_cursor!(q, page, flows::started_at, flows::id);
                Ok(q.order((flows::started_at, flows::id))
                    .limit(page.limit + 1)
                    .load::<FlowRow>(conn)
                    .await?)
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(page.finish(rows, |f| (f.started_at, f.id))))
}

#[utoipa::path(operation_id = "get_flows", tag = "flows", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 200, body = FlowRow), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/flows/{id}")]
async fn get(ctx: Ctx, id: web::Path<super::context::IdPath>) -> ApiResult<HttpResponse> {
    let id = id.into_inner().id;
    let row = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                Ok(flows::table
                    .find(id)
                    .select(FlowRow::as_select())
                    .first(conn)
                    .await
                    .optional()?)
            })
        })
        .await?;
    row.map(|f| HttpResponse::Ok().json(f))
        .ok_or_else(|| ApiError::not_found("flow"))
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list).service(get);
}
