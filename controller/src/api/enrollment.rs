//! Zero-touch enrollment over HTTP.
//!
//! - `GET|POST /enrollment-tokens`, `DELETE /enrollment-tokens/{id}` (tenant-scoped, admins):
//!   a token names one site (created `pending` if it does not exist) and is shown once.
//! - `POST /enroll` (no session; the token is the credential): burns the token in the same
//!   transaction that signs the site's CSR with the tenant CA, records its keys and uplinks and
//!   issues its NATS user, so either all of it happens or none of it, and two concurrent
//!   redemptions of one token give exactly one success (the row lock serialises them and the
//!   loser finds `redeemed_at` set).

use std::collections::HashMap;

use actix_web::{delete, get, post, web, HttpMessage, HttpRequest, HttpResponse};
use chrono::{DateTime, Duration, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ipnet::IpNet;
use patronus_proto::enroll::{EnrollRequest, EnrollResponse, IntentLocation, NatsGrant};
use patronus_proto::{subjects, SiteId, TenantId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::context::{record_audit, Actor, AuditEntry, Ctx, IdPath, PageQuery};
use super::error::{ApiError, ApiResult};
use super::sites::{check_create_site, check_uplinks, insert_site, replace_uplinks, CreateUplink};
use crate::db::schema::{
    enrollment_tokens, site_certificates, site_nats_users, sites, tenant_cas, tenants,
};
use crate::db::{self, Scope};
use crate::enrollment::TokenError;
use crate::pki;
use crate::server::AppState;
use utoipa_actix_web::service_config::ServiceConfig;

#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    /// Name of the site this token enrolls; created (pending) if the tenant has no such site.
    pub site: String,
    /// Only used when the site is created.
    pub region: Option<String>,
    /// Only used when the site is created.
    pub role: Option<super::sites::SiteRole>,
    /// Only used when the site is created.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub lan_prefixes: Vec<IpNet>,
    /// Lifetime in seconds (default: the controller's `provisioning.token_ttl_s`).
    pub ttl_s: Option<u64>,
}

/// A token as listed (never its secret part).
#[derive(utoipa::ToSchema, Serialize, Debug)]
pub struct EnrollmentToken {
    pub id: Uuid,
    pub site_id: Uuid,
    pub site_name: Option<String>,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub redeemed_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// `pending`, `redeemed`, `revoked` or `expired`.
    pub state: &'static str,
}

#[derive(utoipa::ToSchema, Serialize)]
pub struct CreatedEnrollmentToken {
    #[serde(flatten)]
    pub token: EnrollmentToken,
    /// The token itself; shown this once.
    pub secret: String,
    /// The command to run on the edge.
    pub command: String,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = enrollment_tokens)]
struct TokenRow {
    id: Uuid,
    site_id: Uuid,
    created_by: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    redeemed_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl TokenRow {
    fn state(&self, now: DateTime<Utc>) -> &'static str {
        if self.redeemed_at.is_some() {
            "redeemed"
        } else if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at <= now {
            "expired"
        } else {
            "pending"
        }
    }

    fn into_api(self, site_name: Option<String>, now: DateTime<Utc>) -> EnrollmentToken {
        EnrollmentToken {
            state: self.state(now),
            id: self.id,
            site_id: self.site_id,
            site_name,
            created_by: self.created_by,
            created_at: self.created_at,
            expires_at: self.expires_at,
            redeemed_at: self.redeemed_at,
            revoked_at: self.revoked_at,
        }
    }
}

/// A new token row for the named site (created pending if missing), in the current tenant
/// transaction. Returns the token id, the site id and its name. Shared by the API and the CLI.
pub async fn insert_token(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    body: &CreateEnrollmentToken,
    expires_at: DateTime<Utc>,
    created_by: Option<Uuid>,
) -> ApiResult<(Uuid, Uuid)> {
    let existing: Option<(Uuid, String)> = sites::table
        .filter(sites::name.eq(&body.site))
        .select((sites::id, sites::status))
        .first(conn)
        .await
        .optional()?;
    let site_id = match existing {
        Some((_, status)) if status == "revoked" => {
            return Err(ApiError::conflict(format!(
                "site {:?} is revoked; delete it, then create a token for a new site",
                body.site
            )))
        }
        Some((id, _)) => id,
        None => {
            let site = super::sites::CreateSite {
                name: body.site.clone(),
                region: body.region.clone(),
                role: body.role,
                lan_prefixes: body.lan_prefixes.clone(),
                listen_port_base: None,
                uplinks: Vec::new(),
            };
            check_create_site(&site)?;
            let id = Uuid::new_v4();
            insert_site(conn, tenant, id, &site).await?;
            id
        }
    };
    let token_id = Uuid::new_v4();
    diesel::insert_into(enrollment_tokens::table)
        .values((
            enrollment_tokens::id.eq(token_id),
            enrollment_tokens::tenant_id.eq(tenant.0),
            enrollment_tokens::site_id.eq(site_id),
            enrollment_tokens::created_by.eq(created_by),
            enrollment_tokens::expires_at.eq(expires_at),
        ))
        .execute(conn)
        .await?;
    Ok((token_id, site_id))
}

/// A token made from the command line (`patronus-controller token create`): same rows and
/// audit trail as the API, with the actor `system`/`cli`. Returns the token and its row.
pub async fn create_from_cli(
    pool: &crate::db::DbPool,
    keys: &crate::enrollment::TokenKeys,
    tenant: TenantId,
    site: &str,
    lan_prefixes: Vec<IpNet>,
    lifetime: Duration,
) -> ApiResult<(String, EnrollmentToken)> {
    let now = Utc::now();
    let expires_at = now + lifetime;
    let body = CreateEnrollmentToken {
        site: site.to_owned(),
        region: None,
        role: None,
        lan_prefixes,
        ttl_s: None,
    };
    let mut conn = pool.get().await.map_err(db::DbError::from)?;
    let (token_id, site_id) = db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            let msp: Option<Uuid> = tenants::table
                .find(tenant.0)
                .select(tenants::msp_id)
                .first(conn)
                .await
                .optional()?;
            let msp = msp.ok_or_else(|| ApiError::not_found("tenant"))?;
            let (token_id, site_id) = insert_token(conn, tenant, &body, expires_at, None).await?;
            record_audit(
                conn,
                AuditEntry {
                    msp_id: msp,
                    tenant_id: Some(tenant.0),
                    actor_kind: "system",
                    actor_id: Uuid::nil(),
                    actor_label: "patronus-controller token create".into(),
                    action: "enrollment_token.create",
                    target_kind: "enrollment_token",
                    target_id: token_id.to_string(),
                    detail: serde_json::json!({ "site": body.site, "expires_at": expires_at }),
                    request_id: String::new(),
                    source_ip: None,
                },
            )
            .await?;
            Ok::<_, ApiError>((token_id, site_id))
        })
    })
    .await?;
    let secret = keys
        .mint(tenant.0, site_id, site, token_id, now, expires_at)
        .map_err(ApiError::internal)?;
    Ok((
        secret,
        EnrollmentToken {
            id: token_id,
            site_id,
            site_name: Some(site.to_owned()),
            created_by: None,
            created_at: now,
            expires_at,
            redeemed_at: None,
            revoked_at: None,
            state: "pending",
        },
    ))
}

/// Check a token request's lifetime against the configuration.
pub fn token_lifetime(state: &AppState, ttl_s: Option<u64>) -> ApiResult<Duration> {
    let ttl = ttl_s.unwrap_or(state.provisioning.token_ttl_s);
    if !(60..=7 * 86_400).contains(&ttl) {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "ttl_s must be 60 s to 7 days",
        ));
    }
    Ok(Duration::seconds(ttl as i64))
}

/// The controller's URL as edges reach it: `provisioning.edge_url`, else the scheme and host
/// the request came to.
pub fn edge_facing_url(state: &AppState, req: &HttpRequest) -> String {
    match &state.provisioning.edge_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let info = req.connection_info();
            format!("{}://{}", info.scheme(), info.host())
        }
    }
}

/// The line an operator pastes on the edge.
pub fn enroll_command(controller_url: &str, token: &str) -> String {
    format!("patronus-edge enroll --controller {controller_url} --token {token}")
}

#[utoipa::path(operation_id = "list_enrollment_tokens", tag = "enrollment", params(PageQuery), security(("bearer" = [])), responses((status = 200, body = crate::api::context::List<EnrollmentToken>), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[get("/enrollment-tokens")]
async fn list(ctx: Ctx, query: web::Query<PageQuery>) -> ApiResult<HttpResponse> {
    let page = query.page()?;
    let (rows, names) = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let mut q = enrollment_tokens::table
                    .select(TokenRow::as_select())
                    .into_boxed();
                q = crate::after_cursor!(
                    q,
                    page,
                    enrollment_tokens::created_at,
                    enrollment_tokens::id
                );
                let rows = q
                    .order((enrollment_tokens::created_at, enrollment_tokens::id))
                    .limit(page.limit + 1)
                    .load::<TokenRow>(conn)
                    .await?;
                let site_ids: Vec<Uuid> = rows.iter().map(|r| r.site_id).collect();
                let names: HashMap<Uuid, String> = sites::table
                    .filter(sites::id.eq_any(site_ids))
                    .select((sites::id, sites::name))
                    .load::<(Uuid, String)>(conn)
                    .await?
                    .into_iter()
                    .collect();
                Ok((rows, names))
            })
        })
        .await?;
    let now = Utc::now();
    let tokens: Vec<EnrollmentToken> = rows
        .into_iter()
        .map(|r| {
            let name = names.get(&r.site_id).cloned();
            r.into_api(name, now)
        })
        .collect();
    Ok(HttpResponse::Ok().json(page.finish(tokens, |t| (t.created_at, t.id))))
}

#[utoipa::path(operation_id = "create_enrollment_tokens", tag = "enrollment", request_body = CreateEnrollmentToken, security(("bearer" = [])), responses((status = 201, body = CreatedEnrollmentToken, description = "the token; shown only here"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/enrollment-tokens")]
async fn create(
    ctx: Ctx,
    req: HttpRequest,
    body: web::Json<CreateEnrollmentToken>,
) -> ApiResult<HttpResponse> {
    let controller_url = edge_facing_url(&ctx.state, &req);
    let created = create_token(&ctx, body.into_inner(), &controller_url).await?;
    Ok(HttpResponse::Created().json(created))
}

/// Create a one-time enrollment token (and the pending site it names, if new), audited: the
/// token and the command to run on the edge against `controller_url`. Shared by the API and
/// the portal's onboarding page.
pub(crate) async fn create_token(
    ctx: &Ctx,
    body: CreateEnrollmentToken,
    controller_url: &str,
) -> ApiResult<CreatedEnrollmentToken> {
    ctx.require_write()?;
    let tenant = ctx.tenant()?;
    let lifetime = token_lifetime(&ctx.state, body.ttl_s)?;
    let created_by = match ctx.principal.actor {
        Actor::Operator { id, .. } => Some(id),
        Actor::ApiToken { .. } => None,
    };
    let now = Utc::now();
    let expires_at = now + lifetime;
    let audit_template = ctx.audit(
        "enrollment_token.create",
        "enrollment_token",
        "",
        serde_json::json!({ "site": body.site, "expires_at": expires_at }),
    );
    let (token_id, site_id) = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                let (token_id, site_id) =
                    insert_token(conn, tenant, &body, expires_at, created_by).await?;
                let mut audit = audit_template;
                audit.target_id = token_id.to_string();
                record_audit(conn, audit).await?;
                Ok((token_id, site_id))
            })
        })
        .await?;
    let site_name = ctx
        .tenant_tx(move |conn| {
            Box::pin(async move {
                Ok(sites::table
                    .find(site_id)
                    .select(sites::name)
                    .first::<String>(conn)
                    .await?)
            })
        })
        .await?;
    let secret = ctx
        .state
        .enrollment_keys
        .mint(tenant.0, site_id, &site_name, token_id, now, expires_at)
        .map_err(ApiError::internal)?;
    tracing::info!(tenant = %tenant, site = %site_id, token = %token_id, "enrollment token created");
    Ok(CreatedEnrollmentToken {
        command: enroll_command(controller_url, &secret),
        secret,
        token: EnrollmentToken {
            id: token_id,
            site_id,
            site_name: Some(site_name),
            created_by,
            created_at: now,
            expires_at,
            redeemed_at: None,
            revoked_at: None,
            state: "pending",
        },
    })
}

#[utoipa::path(operation_id = "revoke_enrollment_tokens", tag = "enrollment", params(("id" = Uuid, Path, description = "id of the resource")), security(("bearer" = [])), responses((status = 204, description = "revoked (or already revoked)"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[delete("/enrollment-tokens/{id}")]
async fn revoke(ctx: Ctx, id: web::Path<IdPath>) -> ApiResult<HttpResponse> {
    ctx.require_write()?;
    let id = id.into_inner().id;
    let audit = ctx.audit(
        "enrollment_token.revoke",
        "enrollment_token",
        id,
        serde_json::json!({}),
    );
    ctx.tenant_tx(move |conn| {
        Box::pin(async move {
            let row: Option<TokenRow> = enrollment_tokens::table
                .find(id)
                .select(TokenRow::as_select())
                .for_update()
                .first(conn)
                .await
                .optional()?;
            match row {
                None => Err(ApiError::not_found("enrollment token")),
                Some(r) if r.redeemed_at.is_some() => Err(ApiError::conflict(
                    "the token was already used; revoke the site instead",
                )),
                Some(r) if r.revoked_at.is_some() => Ok(()),
                Some(_) => {
                    diesel::update(enrollment_tokens::table.find(id))
                        .set(enrollment_tokens::revoked_at.eq(Some(Utc::now())))
                        .execute(conn)
                        .await?;
                    record_audit(conn, audit).await
                }
            }
        })
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

fn invalid_token(detail: impl Into<String>) -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::UNAUTHORIZED,
        "invalid_token",
        detail,
    )
}

/// Record a certificate just issued to a site and the NATS user that goes with it, in the
/// current tenant transaction (enrollment and renewal).
pub(crate) async fn record_issued(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    site: SiteId,
    issued: &pki::IssuedCertificate,
    nats_public_key: &str,
) -> ApiResult<()> {
    diesel::insert_into(site_certificates::table)
        .values((
            site_certificates::tenant_id.eq(tenant.0),
            site_certificates::site_id.eq(Some(site.0)),
            site_certificates::serial.eq(&issued.serial_hex),
            site_certificates::subject.eq(&issued.subject),
            site_certificates::not_before.eq(issued.not_before),
            site_certificates::not_after.eq(issued.not_after),
            site_certificates::certificate_pem.eq(&issued.certificate_pem),
        ))
        .execute(conn)
        .await?;
    let inserted = diesel::insert_into(site_nats_users::table)
        .values((
            site_nats_users::public_key.eq(nats_public_key),
            site_nats_users::tenant_id.eq(tenant.0),
            site_nats_users::site_id.eq(Some(site.0)),
            site_nats_users::expires_at.eq(issued.not_after),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    if inserted == 0 {
        return Err(ApiError::conflict(
            "this NATS public key was already issued; generate a new key pair",
        ));
    }
    Ok(())
}

/// A CSR that failed its checks, as the API answers it.
pub(crate) fn csr_refused(e: pki::CsrError) -> ApiError {
    let code = match e {
        pki::CsrError::WeakKey(_) => "weak_key",
        pki::CsrError::WrongSubject(_) => "wrong_subject",
        _ => "invalid_csr",
    };
    ApiError::unprocessable(code, e.to_string())
}

/// A NATS user public nkey, or a 422 saying what it should be.
pub(crate) fn check_user_nkey(key: &str) -> ApiResult<()> {
    let key = nkeys::KeyPair::from_public_key(key).map_err(|_| {
        ApiError::unprocessable("invalid_value", "nats_public_key is not a NATS public nkey")
    })?;
    if key.key_pair_type() != nkeys::KeyPairType::User {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "nats_public_key must be a user nkey (it starts with U)",
        ));
    }
    Ok(())
}

/// Everything checked before the transaction: no database needed to refuse these.
fn check_enroll_body(
    body: &EnrollRequest,
    tenant: TenantId,
    site: SiteId,
) -> ApiResult<pki::CheckedCsr> {
    check_user_nkey(&body.nats_public_key)?;
    if body.uplinks.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_value",
            "uplinks: at least one WAN uplink is needed",
        ));
    }
    for (i, uplink) in body.uplinks.iter().enumerate() {
        let a = uplink.address;
        if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
            return Err(ApiError::unprocessable(
                "invalid_value",
                format!("uplinks[{i}].address {a} cannot be reached by peers"),
            ));
        }
    }
    check_uplinks(&uplinks_of(body))?;
    pki::check_csr(&body.csr_pem, tenant, site).map_err(csr_refused)
}

fn uplinks_of(body: &EnrollRequest) -> Vec<CreateUplink> {
    body.uplinks
        .iter()
        .map(|u| CreateUplink {
            name: u.name.clone(),
            address: u.address,
            interface_type: u.interface_type,
            bandwidth_mbps: u.bandwidth_mbps,
            cost_per_gb: u.cost_per_gb,
            metered: u.metered,
        })
        .collect()
}

/// Burn the token or say why it cannot be used.
async fn burn_token(
    conn: &mut AsyncPgConnection,
    jti: Uuid,
    site: Uuid,
    source: Option<IpNet>,
) -> ApiResult<()> {
    let burned = diesel::update(
        enrollment_tokens::table
            .find(jti)
            .filter(enrollment_tokens::site_id.eq(site))
            .filter(enrollment_tokens::redeemed_at.is_null())
            .filter(enrollment_tokens::revoked_at.is_null())
            .filter(enrollment_tokens::expires_at.gt(diesel::dsl::now)),
    )
    .set((
        enrollment_tokens::redeemed_at.eq(Some(Utc::now())),
        enrollment_tokens::redeemed_from.eq(source),
    ))
    .execute(conn)
    .await?;
    if burned == 1 {
        return Ok(());
    }
    let row: Option<TokenRow> = enrollment_tokens::table
        .find(jti)
        .filter(enrollment_tokens::site_id.eq(site))
        .select(TokenRow::as_select())
        .first(conn)
        .await
        .optional()?;
    Err(match row.map(|r| r.state(Utc::now())) {
        Some("redeemed") => ApiError::conflict(
            "this enrollment token was already used; create a new one for this site",
        ),
        Some("revoked") => invalid_token("the token was revoked; create a new one"),
        Some("expired") => invalid_token("the token has expired; create a new one"),
        _ => invalid_token("the token was not issued by this controller for this site"),
    })
}

#[derive(Queryable)]
struct CaRow {
    certificate_pem: String,
    private_key_sealed: Vec<u8>,
}

pub(crate) async fn load_ca(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
) -> Result<Option<(String, Vec<u8>)>, diesel::result::Error> {
    tenant_cas::table
        .find(tenant.0)
        .select((tenant_cas::certificate_pem, tenant_cas::private_key_sealed))
        .first::<(String, Vec<u8>)>(conn)
        .await
        .optional()
}

/// The tenant's CA, created on first use. Concurrent first uses race on the primary key; the
/// loser's insert does nothing and both read the winner's row.
pub(crate) async fn tenant_ca(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    master_key: &[u8; 32],
    lifetime_days: u32,
) -> ApiResult<(String, String)> {
    let row = match load_ca(conn, tenant).await? {
        Some((certificate_pem, private_key_sealed)) => CaRow {
            certificate_pem,
            private_key_sealed,
        },
        None => {
            let ca =
                pki::create_ca(tenant, Utc::now(), lifetime_days).map_err(ApiError::internal)?;
            diesel::insert_into(tenant_cas::table)
                .values((
                    tenant_cas::tenant_id.eq(tenant.0),
                    tenant_cas::certificate_pem.eq(&ca.certificate_pem),
                    tenant_cas::private_key_sealed.eq(pki::seal(
                        master_key,
                        tenant,
                        ca.private_key_pem.as_bytes(),
                    )),
                    tenant_cas::not_after.eq(ca.not_after),
                ))
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
            tracing::info!(tenant = %tenant, "tenant CA created");
            let (certificate_pem, private_key_sealed) = load_ca(conn, tenant)
                .await?
                .ok_or_else(|| ApiError::internal("tenant CA vanished"))?;
            CaRow {
                certificate_pem,
                private_key_sealed,
            }
        }
    };
    let key = pki::unseal(master_key, tenant, &row.private_key_sealed).map_err(|e| {
        tracing::error!(tenant = %tenant, error = %e, "tenant CA key does not open");
        ApiError::internal(e)
    })?;
    let key = String::from_utf8(key).map_err(ApiError::internal)?;
    Ok((row.certificate_pem, key))
}

#[utoipa::path(operation_id = "enroll", tag = "enrollment", request_body = EnrollRequest, responses((status = 200, body = EnrollResponse, description = "the site's certificate, NATS credentials and intent location"), (status = "4XX", description = "the request was refused; see error and detail", body = crate::api::error::ErrorBody)))]
#[post("/enroll")]
pub async fn enroll(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<EnrollRequest>,
) -> ApiResult<HttpResponse> {
    let body = body.into_inner();
    let claims = state.enrollment_keys.verify(&body.token).map_err(|e| match e {
        TokenError::Expired => invalid_token("the token has expired; create a new one"),
        TokenError::Invalid(_) => invalid_token(
            "the token is not a valid enrollment token of this controller; copy it again or create a new one",
        ),
    })?;
    let tenant = TenantId(claims.tenant);
    let site = SiteId(claims.sub);
    let csr = check_enroll_body(&body, tenant, site)?;
    let source = req.peer_addr().map(|a| IpNet::from(a.ip()));
    let hub = state.nats_hub.clone();
    let master_key = state.master_key.0;
    let provisioning = state.provisioning.clone();
    let uplinks = uplinks_of(&body);
    let request_id = req
        .extensions()
        .get::<super::context::RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let wg_key = body.wg_public_key.to_base64();
    let nats_key = body.nats_public_key.clone();

    let mut conn = state.db.get().await.map_err(db::DbError::from)?;
    let outcome = db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            burn_token(conn, claims.jti, site.0, source).await?;
            // Locks the site row: a concurrent revoke or re-enrollment waits for us.
            let (name, status, overlay, port_base): (String, String, Option<IpNet>, i32) =
                sites::table
                    .find(site.0)
                    .select((
                        sites::name,
                        sites::status,
                        sites::overlay_address,
                        sites::listen_port_base,
                    ))
                    .for_update()
                    .first(conn)
                    .await?;
            let msp: Uuid = tenants::table
                .find(tenant.0)
                .select(tenants::msp_id)
                .first(conn)
                .await?;
            if status == "revoked" {
                return Err(ApiError::conflict(
                    "the site was revoked after this token was issued; it cannot enroll",
                ));
            }
            let (ca_pem, ca_key) =
                tenant_ca(conn, tenant, &master_key, provisioning.ca_lifetime_days).await?;
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
            // A re-enrollment supersedes the previous certificate and NATS user, and any other
            // token still outstanding for this site.
            let superseded = revoke_site_credentials(conn, site.0, "superseded").await?;
            record_issued(conn, tenant, site, &issued, &nats_key).await?;
            // Another site's pending next key is as taken as its current one (the unique
            // constraint covers current keys).
            let pending_elsewhere: bool = diesel::select(diesel::dsl::exists(
                sites::table
                    .filter(sites::wg_next_public_key.eq(&wg_key))
                    .filter(sites::id.ne(site.0)),
            ))
            .get_result(conn)
            .await?;
            if pending_elsewhere {
                return Err(ApiError::conflict(
                    "this WireGuard public key belongs to another site; generate a new key pair",
                ));
            }
            // A new enrollment brings a new key and ends any rotation under way.
            let updated = diesel::update(sites::table.find(site.0))
                .set((
                    sites::wg_public_key.eq(Some(&wg_key)),
                    sites::status.eq("active"),
                    sites::enrolled_at.eq(Some(Utc::now())),
                    sites::updated_at.eq(Utc::now()),
                    sites::wg_next_public_key.eq(None::<String>),
                    sites::wg_next_submitted_at.eq(None::<DateTime<Utc>>),
                    sites::wg_next_announce_revision.eq(None::<i64>),
                    sites::wg_next_announced_at.eq(None::<DateTime<Utc>>),
                    sites::wg_key_rotated_at.eq(None::<DateTime<Utc>>),
                ))
                .execute(conn)
                .await;
            match updated {
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    _,
                )) => return Err(ApiError::conflict(
                    "this WireGuard public key belongs to another site; generate a new key pair",
                )),
                other => {
                    other?;
                }
            }
            replace_uplinks(conn, tenant, site.0, &uplinks).await?;
            record_audit(
                conn,
                AuditEntry {
                    msp_id: msp,
                    tenant_id: Some(tenant.0),
                    actor_kind: "site",
                    actor_id: site.0,
                    actor_label: format!("site {name} (enrollment)"),
                    action: "site.enroll",
                    target_kind: "site",
                    target_id: site.0.to_string(),
                    detail: serde_json::json!({
                        "token": claims.jti,
                        "certificate_serial": issued.serial_hex,
                        "uplinks": uplinks.len(),
                    }),
                    request_id,
                    source_ip: source.map(|s| s.addr()),
                },
            )
            .await?;
            let user_jwt = hub
                .site_user_jwt(tenant, site, &nats_key, issued.not_after.timestamp())
                .map_err(ApiError::internal)?;
            Ok((
                name, overlay, port_base, ca_pem, issued, user_jwt, superseded,
            ))
        })
    })
    .await?;
    drop(conn);
    let (site_name, overlay, port_base, ca_pem, issued, user_jwt, superseded) = outcome;

    // The edge connects next: make sure its account is on the server (and, after a
    // re-enrollment, that the superseded user is revoked there).
    let pushed = if superseded > 0 {
        state
            .nats_hub
            .push_account(&state.db, tenant)
            .await
            .map(|_| ())
    } else {
        state.tenant_nats(tenant).await.map(|_| ())
    };
    if let Err(e) = pushed {
        tracing::warn!(tenant = %tenant, site = %site, error = %e, "tenant NATS account not pushed; the edge will retry connecting");
    }
    tracing::info!(tenant = %tenant, site = %site, serial = %issued.serial_hex, "site enrolled");
    state
        .emit(
            tenant,
            Some(site),
            patronus_proto::events::SdwanEvent::SiteJoined {
                site,
                site_name: site_name.clone(),
            },
        )
        .await;
    state.intents_changed(tenant).await;
    Ok(HttpResponse::Ok().json(EnrollResponse {
        tenant_id: tenant,
        site_id: site,
        site_name,
        overlay_address: overlay
            .map(|o| o.addr())
            .ok_or_else(|| ApiError::internal("site has no overlay address"))?,
        listen_port_base: u16::try_from(port_base).map_err(ApiError::internal)?,
        certificate_pem: issued.certificate_pem,
        ca_certificate_pem: ca_pem,
        expires_at: issued.not_after.timestamp(),
        nats: NatsGrant {
            url: state.nats_edge_url.clone(),
            user_jwt,
            inbox_prefix: subjects::edge_inbox_prefix(site),
        },
        intent: IntentLocation {
            bucket: subjects::INTENTS_BUCKET.into(),
            key: subjects::intent_key(tenant, site),
            kv_subject: subjects::intent_kv_subject(tenant, site),
            direct_get_subject: subjects::intent_direct_get_subject(tenant, site),
        },
    }))
}

/// Revoke everything that lets a site in, in the current tenant transaction: its
/// certificates (the serials join the revocation list), its NATS users and its unused
/// enrollment tokens. Returns how many NATS users were revoked (the account must be pushed
/// after commit for the server to drop them).
pub async fn revoke_site_credentials(
    conn: &mut AsyncPgConnection,
    site: Uuid,
    reason: &'static str,
) -> ApiResult<usize> {
    let now = Utc::now();
    diesel::update(
        site_certificates::table
            .filter(site_certificates::site_id.eq(site))
            .filter(site_certificates::revoked_at.is_null()),
    )
    .set((
        site_certificates::revoked_at.eq(Some(now)),
        site_certificates::revocation_reason.eq(Some(reason)),
    ))
    .execute(conn)
    .await?;
    let users = diesel::update(
        site_nats_users::table
            .filter(site_nats_users::site_id.eq(site))
            .filter(site_nats_users::revoked_at.is_null()),
    )
    .set(site_nats_users::revoked_at.eq(Some(now)))
    .execute(conn)
    .await?;
    diesel::update(
        enrollment_tokens::table
            .filter(enrollment_tokens::site_id.eq(site))
            .filter(enrollment_tokens::redeemed_at.is_null())
            .filter(enrollment_tokens::revoked_at.is_null()),
    )
    .set(enrollment_tokens::revoked_at.eq(Some(now)))
    .execute(conn)
    .await?;
    Ok(users)
}

/// After a revocation commits: push the tenant account so the NATS server closes the site's
/// connection and refuses it from now on, and withdraw its intent key.
pub async fn enforce_revocation(state: &AppState, tenant: TenantId, site: SiteId) {
    if let Err(e) = state.nats_hub.push_account(&state.db, tenant).await {
        tracing::error!(tenant = %tenant, site = %site, error = %e, "could not push the revocation to NATS; retrying on the next account push");
    }
    match state.tenant_nats(tenant).await {
        Ok(link) => {
            if let Err(e) = crate::intents::publish::purge_site(&link.intents, tenant, site).await {
                tracing::warn!(tenant = %tenant, site = %site, error = %e, "could not withdraw the site's intent");
            }
        }
        Err(e) => {
            tracing::warn!(tenant = %tenant, site = %site, error = %e, "intents bucket unavailable")
        }
    }
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list).service(create).service(revoke);
}
