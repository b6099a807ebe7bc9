//! The edge's own control-plane calls, authenticated by its site certificate
//! ([`patronus_proto::edge_auth`]): no operator session, no token.
//!
//! - `GET /edge/status`: what the controller knows of the calling site.
//! - `POST /edge/renew`: a new certificate and NATS user for keys the edge made anew.
//! - `POST /edge/wireguard-key`: the public key of the WireGuard key the edge made for its next
//!   rotation ([`crate::intents::rotation`]).
//!
//! [`verify_site_request`] checks, in order: the four headers are present and well formed;
//! the timestamp is within [`MAX_CLOCK_SKEW_S`] of ours; the certificate parses, names a site
//! and tenant, is within its validity, is signed by that tenant's CA, and is the site's
//! unrevoked certificate of that serial in the database (the revocation check); the signature
//! over the canonical request verifies with the certificate's key; the nonce was not seen in
//! the last `2 × MAX_CLOCK_SKEW_S` (Redis `SET NX`).

use actix_web::http::StatusCode;
use actix_web::{get, post, web, HttpMessage, HttpRequest, HttpResponse};
use base64::Engine;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use patronus_proto::edge_auth::{
    canonical_request, valid_nonce, CERTIFICATE_HEADER, MAX_CLOCK_SKEW_S, NONCE_HEADER,
    SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use patronus_proto::enroll::{
    EdgeStatus, NatsGrant, RenewRequest, RenewResponse, WireguardKeyRequest, WireguardKeyResponse,
    WireguardKeyState,
};
use patronus_proto::{subjects, SiteId, TenantId, WgPublicKey};
use uuid::Uuid;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
};

use super::context::{record_audit, AuditEntry};
use super::error::{ApiError, ApiResult};
use crate::db::schema::{site_certificates, site_intents, sites, tenants};
use crate::db::{self, Scope};
use crate::pki;
use crate::server::AppState;
use utoipa_actix_web::service_config::ServiceConfig;

/// Largest body a signed edge request may carry.
const MAX_EDGE_BODY: usize = 64 * 1024;

fn refused(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, detail)
}

/// The site a signed request came from.
#[derive(Debug, Clone)]
pub struct VerifiedSite {
    pub tenant: TenantId,
    pub site: SiteId,
    pub serial: String,
    pub not_after: DateTime<Utc>,
}

fn header<'r>(req: &'r HttpRequest, name: &str) -> ApiResult<&'r str> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            refused(
                "unsigned_request",
                format!("missing {name}; edge calls are signed with the site certificate (patronus-edge does this)"),
            )
        })
}

fn subject_id(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    common_name: bool,
) -> Option<Uuid> {
    let subject = cert.subject();
    let values: Vec<_> = if common_name {
        subject.iter_common_name().collect()
    } else {
        subject.iter_organization().collect()
    };
    match values.as_slice() {
        [only] => only.as_str().ok()?.parse().ok(),
        _ => None,
    }
}

/// Verify a signed edge request; see the module documentation for what is checked.
pub async fn verify_site_request(
    state: &AppState,
    req: &HttpRequest,
    body: &[u8],
) -> ApiResult<VerifiedSite> {
    let certificate_b64 = header(req, CERTIFICATE_HEADER)?;
    let timestamp = header(req, TIMESTAMP_HEADER)?;
    let nonce = header(req, NONCE_HEADER)?;
    let signature_b64 = header(req, SIGNATURE_HEADER)?;
    let timestamp: i64 = timestamp
        .parse()
        .map_err(|_| refused("unsigned_request", "the timestamp is not unix seconds"))?;
    if (Utc::now().timestamp() - timestamp).abs() > MAX_CLOCK_SKEW_S {
        return Err(refused(
            "stale_request",
            format!("the request was signed more than {MAX_CLOCK_SKEW_S} s from the controller's time; check the edge's clock (NTP)"),
        ));
    }
    if !valid_nonce(nonce) {
        return Err(refused(
            "unsigned_request",
            "the nonce is not 32 hex characters",
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let der = b64.decode(certificate_b64).map_err(|_| {
        refused(
            "invalid_certificate",
            "the certificate header is not base64",
        )
    })?;
    let signature = b64
        .decode(signature_b64)
        .map_err(|_| refused("invalid_signature", "the signature header is not base64"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| refused("invalid_certificate", "the certificate does not parse"))?;
    let (Some(site), Some(tenant)) = (subject_id(&cert, true), subject_id(&cert, false)) else {
        return Err(refused(
            "invalid_certificate",
            "the certificate is not a Patronus site certificate",
        ));
    };
    let (tenant, site) = (TenantId(tenant), SiteId(site));
    if !cert.validity().is_valid() {
        return Err(refused(
            "certificate_expired",
            "the site certificate is outside its validity; enroll the site again",
        ));
    }
    let serial = cert.raw_serial_as_string().replace(':', "");

    // The tenant CA and the certificate's record, in the tenant's scope.
    let serial_for_query = serial.clone();
    let mut conn = state.db.get().await.map_err(db::DbError::from)?;
    let (ca_pem, current) = db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            let ca = super::enrollment::load_ca(conn, tenant).await?;
            let current: Option<DateTime<Utc>> = site_certificates::table
                .inner_join(sites::table.on(sites::id.nullable().eq(site_certificates::site_id)))
                .filter(site_certificates::serial.eq(&serial_for_query))
                .filter(site_certificates::site_id.eq(Some(site.0)))
                .filter(site_certificates::revoked_at.is_null())
                .filter(sites::status.ne("revoked"))
                .select(site_certificates::not_after)
                .first(conn)
                .await
                .optional()?;
            Ok::<_, ApiError>((ca.map(|(pem, _)| pem), current))
        })
    })
    .await?;
    drop(conn);
    let (Some(ca_pem), Some(not_after)) = (ca_pem, current) else {
        return Err(refused(
            "certificate_revoked",
            "this certificate is revoked, superseded or unknown to the controller",
        ));
    };
    let ca_der = pem::parse(&ca_pem)
        .map_err(ApiError::internal)?
        .into_contents();
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).map_err(ApiError::internal)?;
    cert.verify_signature(Some(ca.public_key())).map_err(|_| {
        refused(
            "invalid_certificate",
            "the certificate is not signed by this tenant's CA",
        )
    })?;

    // Proof of possession: the request is signed with the certificate's key.
    let spki = cert.public_key();
    let algorithm: &'static dyn ring::signature::VerificationAlgorithm =
        if spki.algorithm.algorithm == OID_SIG_ED25519 {
            &ring::signature::ED25519
        } else if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            match spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
            {
                Some(c) if c == OID_EC_P256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
                Some(c) if c == OID_NIST_EC_P384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
                _ => return Err(refused("invalid_certificate", "unsupported key curve")),
            }
        } else {
            return Err(refused("invalid_certificate", "unsupported key type"));
        };
    let message = canonical_request(req.method().as_str(), req.path(), timestamp, nonce, body);
    ring::signature::UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data)
        .verify(&message, &signature)
        .map_err(|_| {
            refused(
                "invalid_signature",
                "the request signature does not match the certificate's key",
            )
        })?;

    // Replay: each nonce once within the window a timestamp is accepted.
    let mut redis = state.redis().await?;
    let fresh: Option<String> = redis::cmd("SET")
        .arg(format!("patronus:edge-nonce:{}:{nonce}", site.0))
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(2 * MAX_CLOCK_SKEW_S)
        .query_async(&mut redis)
        .await?;
    if fresh.is_none() {
        return Err(refused(
            "replayed_request",
            "this request was already received; sign every request with a new nonce",
        ));
    }
    Ok(VerifiedSite {
        tenant,
        site,
        serial,
        not_after,
    })
}

#[utoipa::path(operation_id = "edge_status", tag = "edge", responses((status = 200, body = EdgeStatus), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/edge/status")]
pub async fn edge_status(state: web::Data<AppState>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let who = verify_site_request(&state, &req, b"").await?;
    let site = who.site;
    let mut conn = state.db.get().await.map_err(db::DbError::from)?;
    let (name, site_status, revision) =
        db::in_scope(&mut conn, Scope::Tenant(who.tenant), move |conn| {
            Box::pin(async move {
                let (name, site_status): (String, String) = sites::table
                    .find(site.0)
                    .select((sites::name, sites::status))
                    .first(conn)
                    .await?;
                let revision: Option<i64> = site_intents::table
                    .find(site.0)
                    .select(site_intents::revision)
                    .first(conn)
                    .await
                    .optional()?;
                Ok::<_, ApiError>((name, site_status, revision))
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(EdgeStatus {
        site_id: site,
        site_name: name,
        status: site_status,
        published_revision: revision.map(|r| r as u64),
        certificate_serial: who.serial,
        certificate_expires_at: who.not_after.timestamp(),
    }))
}

#[utoipa::path(operation_id = "edge_renew", tag = "edge", request_body = RenewRequest, responses((status = 200, body = RenewResponse), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/edge/renew")]
pub async fn renew(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    if body.len() > MAX_EDGE_BODY {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the body is too large",
        ));
    }
    let who = verify_site_request(&state, &req, &body).await?;
    let request: RenewRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
    let (tenant, site) = (who.tenant, who.site);
    let csr =
        pki::check_csr(&request.csr_pem, tenant, site).map_err(super::enrollment::csr_refused)?;
    super::enrollment::check_user_nkey(&request.nats_public_key)?;
    let master_key = state.master_key.0;
    let provisioning = state.provisioning.clone();
    let hub = state.nats_hub.clone();
    let nats_key = request.nats_public_key.clone();
    let request_id = req
        .extensions()
        .get::<super::context::RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let source_ip = req.peer_addr().map(|a| a.ip());
    let old_serial = who.serial.clone();
    let mut conn = state.db.get().await.map_err(db::DbError::from)?;
    let (ca_pem, issued, user_jwt) = db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            let (name, site_status): (String, String) = sites::table
                .find(site.0)
                .select((sites::name, sites::status))
                .for_update()
                .first(conn)
                .await?;
            if site_status == "revoked" {
                return Err(refused("certificate_revoked", "the site is revoked"));
            }
            let msp: Uuid = tenants::table
                .find(tenant.0)
                .select(tenants::msp_id)
                .first(conn)
                .await?;
            let (ca_pem, ca_key) = super::enrollment::tenant_ca(
                conn,
                tenant,
                &master_key,
                provisioning.ca_lifetime_days,
            )
            .await?;
            let issued = pki::sign_site_certificate(
                &ca_pem,
                &ca_key,
                &csr,
                tenant,
                site,
                Utc::now(),
                provisioning.certificate_lifetime_days,
            )
            .map_err(ApiError::internal)?;
            super::enrollment::record_issued(conn, tenant, site, &issued, &nats_key).await?;
            record_audit(
                conn,
                AuditEntry {
                    msp_id: msp,
                    tenant_id: Some(tenant.0),
                    actor_kind: "site",
                    actor_id: site.0,
                    actor_label: format!("site {name}"),
                    action: "site.renew",
                    target_kind: "site",
                    target_id: site.0.to_string(),
                    detail: serde_json::json!({
                        "previous_serial": old_serial,
                        "certificate_serial": issued.serial_hex,
                    }),
                    request_id,
                    source_ip,
                },
            )
            .await?;
            let user_jwt = hub
                .site_user_jwt(tenant, site, &nats_key, issued.not_after.timestamp())
                .map_err(ApiError::internal)?;
            Ok((ca_pem, issued, user_jwt))
        })
    })
    .await?;
    tracing::info!(tenant = %tenant, site = %site, serial = %issued.serial_hex, "site certificate renewed");
    Ok(HttpResponse::Ok().json(RenewResponse {
        certificate_pem: issued.certificate_pem,
        ca_certificate_pem: ca_pem,
        expires_at: issued.not_after.timestamp(),
        nats: NatsGrant {
            url: state.nats_edge_url.clone(),
            user_jwt,
            inbox_prefix: subjects::edge_inbox_prefix(site),
        },
    }))
}

/// What the site row says when a next key arrives.
enum KeyDecision {
    /// Record it as the site's next key.
    Record { name: String, msp: Uuid },
    /// Already the answer (a repeated call).
    Answer(WireguardKeyState),
}

#[utoipa::path(operation_id = "edge_wireguard_key", tag = "edge", request_body = WireguardKeyRequest, responses((status = 200, body = WireguardKeyResponse, description = "recorded as the site's next key (or already recorded, or already its key)"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/edge/wireguard-key")]
pub async fn wireguard_key(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    if body.len() > MAX_EDGE_BODY {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the body is too large",
        ));
    }
    let who = verify_site_request(&state, &req, &body).await?;
    let request: WireguardKeyRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("expected {{\"public_key\": <base64 of 32 bytes>}}: {e}"),
        )
    })?;
    let key = request.public_key;
    // The all-zero point gives every Diffie-Hellman the same (zero) result; WireGuard refuses
    // handshakes with it.
    if key == WgPublicKey([0; 32]) {
        return Err(ApiError::unprocessable(
            "invalid_key",
            "not a usable WireGuard public key (all zero)",
        ));
    }
    let (tenant, site) = (who.tenant, who.site);
    let encoded = key.to_base64();
    let min_interval = state.provisioning.wireguard_rotation_min_interval_s;
    let request_id = req
        .extensions()
        .get::<super::context::RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let source_ip = req.peer_addr().map(|a| a.ip());
    let mut conn = state.db.get().await.map_err(db::DbError::from)?;
    let answer = db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            // One key submission at a time per tenant, so two sites cannot both claim a key
            // the other does not hold yet.
            diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended('patronus-wg-key:' || $1, 0))")
                .bind::<diesel::sql_types::Text, _>(tenant.0.to_string())
                .execute(conn)
                .await?;
            type Row = (
                String,
                String,
                Option<String>,
                Option<String>,
                Option<DateTime<Utc>>,
            );
            let (name, site_status, current, next, rotated_at): Row = sites::table
                .find(site.0)
                .select((
                    sites::name,
                    sites::status,
                    sites::wg_public_key,
                    sites::wg_next_public_key,
                    sites::wg_key_rotated_at,
                ))
                .for_update()
                .first(conn)
                .await?;
            if site_status == "revoked" {
                return Err(refused("certificate_revoked", "the site is revoked"));
            }
            let decision = if current.as_deref() == Some(encoded.as_str()) {
                KeyDecision::Answer(WireguardKeyState::Current)
            } else if next.as_deref() == Some(encoded.as_str()) {
                KeyDecision::Answer(WireguardKeyState::Pending)
            } else if next.is_some() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "rotation_pending",
                    "another next key of this site is being rotated in; keep it until the intent names it",
                ));
            } else if current.is_none() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "not_enrolled",
                    "the site has no WireGuard key on record; enroll it",
                ));
            } else {
                if let Some(rotated_at) = rotated_at {
                    let ready_at = rotated_at + chrono::Duration::seconds(min_interval as i64);
                    let wait = (ready_at - Utc::now()).num_seconds();
                    if wait > 0 {
                        let mut error = ApiError::too_many_requests(wait as u64);
                        error.code = "rotation_too_soon";
                        error.detail = format!(
                            "this site's key was rotated less than {min_interval} s ago; retry after {wait} s"
                        );
                        return Err(error);
                    }
                }
                let in_use: bool = diesel::select(diesel::dsl::exists(
                    sites::table.filter(
                        sites::wg_public_key
                            .eq(&encoded)
                            .or(sites::wg_next_public_key.eq(&encoded)),
                    ),
                ))
                .get_result(conn)
                .await?;
                if in_use {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "wireguard_key_in_use",
                        "this WireGuard public key belongs to another site; generate a new key pair",
                    ));
                }
                let msp: Uuid = tenants::table
                    .find(tenant.0)
                    .select(tenants::msp_id)
                    .first(conn)
                    .await?;
                KeyDecision::Record { name, msp }
            };
            let (name, msp) = match decision {
                KeyDecision::Answer(answer) => return Ok((answer, false)),
                KeyDecision::Record { name, msp } => (name, msp),
            };
            diesel::update(sites::table.find(site.0))
                .set((
                    sites::wg_next_public_key.eq(Some(&encoded)),
                    sites::wg_next_submitted_at.eq(Some(Utc::now())),
                    sites::wg_next_announce_revision.eq(None::<i64>),
                    sites::wg_next_announced_at.eq(None::<DateTime<Utc>>),
                    sites::updated_at.eq(Utc::now()),
                ))
                .execute(conn)
                .await?;
            record_audit(
                conn,
                AuditEntry {
                    msp_id: msp,
                    tenant_id: Some(tenant.0),
                    actor_kind: "site",
                    actor_id: site.0,
                    actor_label: format!("site {name}"),
                    action: "site.wireguard_key_submitted",
                    target_kind: "site",
                    target_id: site.0.to_string(),
                    detail: serde_json::json!({
                        "previous_public_key": current,
                        "next_public_key": encoded,
                    }),
                    request_id,
                    source_ip,
                },
            )
            .await?;
            Ok((WireguardKeyState::Pending, true))
        })
    })
    .await?;
    let (key_state, recorded) = answer;
    if recorded {
        tracing::info!(tenant = %tenant, site = %site, public_key = %key, "next WireGuard key recorded; rotating it in");
        state.intents_changed(tenant).await;
    }
    Ok(HttpResponse::Ok().json(WireguardKeyResponse {
        public_key: key,
        state: key_state,
    }))
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(edge_status)
        .service(renew)
        .service(wireguard_key);
}
