//! The tenant's PKI, for operators and for anything that checks site certificates:
//!
//! - `GET /pki/ca`: the tenant CA certificate (created on first use).
//! - `GET /pki/crl`: the current revocation list, signed by the tenant CA, and the revoked
//!   serials as plain data.

use actix_web::{get, HttpResponse};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::context::Ctx;
use super::error::{ApiError, ApiResult};
use crate::db::schema::site_certificates;
use crate::pki::{self, RevokedSerial};
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Serialize)]
struct CaCertificate {
    certificate_pem: String,
}

#[derive(utoipa::ToSchema, Serialize)]
struct RevokedEntry {
    serial: String,
    revoked_at: DateTime<Utc>,
    reason: Option<String>,
}

#[derive(utoipa::ToSchema, Serialize)]
struct RevocationList {
    /// X.509 CRL (PEM) signed by the tenant CA.
    crl_pem: String,
    next_update: DateTime<Utc>,
    /// Revoked certificates that have not expired yet.
    revoked: Vec<RevokedEntry>,
}

#[utoipa::path(operation_id = "get_pki_ca", tag = "pki", security(("bearer" = [])), responses((status = 200, body = CaCertificate), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/pki/ca")]
async fn ca(ctx: Ctx) -> ApiResult<HttpResponse> {
    let tenant = ctx.tenant()?;
    let master_key = ctx.state.master_key.0;
    let lifetime = ctx.state.provisioning.ca_lifetime_days;
    let (certificate_pem, _) = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                super::enrollment::tenant_ca(conn, tenant, &master_key, lifetime).await
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(CaCertificate { certificate_pem }))
}

#[utoipa::path(operation_id = "get_pki_crl", tag = "pki", security(("bearer" = [])), responses((status = 200, body = RevocationList), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/pki/crl")]
async fn crl(ctx: Ctx) -> ApiResult<HttpResponse> {
    let tenant = ctx.tenant()?;
    let master_key = ctx.state.master_key.0;
    let lifetime = ctx.state.provisioning.ca_lifetime_days;
    let (ca_pem, ca_key, revoked) = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let (ca_pem, ca_key) =
                    super::enrollment::tenant_ca(conn, tenant, &master_key, lifetime).await?;
                let revoked: Vec<(String, Option<DateTime<Utc>>, Option<String>)> =
                    site_certificates::table
                        .filter(site_certificates::revoked_at.is_not_null())
                        .filter(site_certificates::not_after.gt(diesel::dsl::now))
                        .order(site_certificates::revoked_at)
                        .select((
                            site_certificates::serial,
                            site_certificates::revoked_at,
                            site_certificates::revocation_reason,
                        ))
                        .load(conn)
                        .await?;
                Ok((ca_pem, ca_key, revoked))
            })
        })
        .await?;
    let now = Utc::now();
    let entries: Vec<RevokedEntry> = revoked
        .into_iter()
        .map(|(serial, revoked_at, reason)| RevokedEntry {
            serial,
            revoked_at: revoked_at.unwrap_or(now),
            reason,
        })
        .collect();
    let serials: Vec<RevokedSerial> = entries
        .iter()
        .map(|e| RevokedSerial {
            serial_hex: e.serial.clone(),
            revoked_at: e.revoked_at,
        })
        .collect();
    let crl_pem = pki::build_crl(&ca_pem, &ca_key, &serials, now).map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok().json(RevocationList {
        crl_pem,
        next_update: now + chrono::Duration::hours(pki::CRL_VALIDITY_HOURS),
        revoked: entries,
    }))
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(ca).service(crl);
}
