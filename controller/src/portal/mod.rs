//! The operator portal: server-rendered pages (askama templates in the repository's
//! `templates/`) under `/portal`, served by the controller itself.
//!
//! - This module: the session cookie, CSRF tokens, the per-page context (who is signed in,
//!   which tenant the page acts for), security headers, error pages and static assets.
//! - [`pages`]: the pages. They read and write through the same functions as the REST API
//!   (tenant-scoped transactions under row-level security, the same validation and audit),
//!   so the portal can do nothing the API would refuse.
//! - [`chart`]: the path page's charts as inline SVG (pure).
//! - [`policy_form`]: the routing-policy form ↔ the API's policy body, and API validation
//!   messages → the field they are about (pure).
//!
//! Security: the session is the API's session JWT in a `Secure; HttpOnly; SameSite=Strict`
//! cookie; every form carries a CSRF token derived from it (a forged form from another site
//! cannot know it); the Content-Security-Policy allows scripts and styles from the portal
//! alone (no inline script); askama escapes everything rendered. Tenant pages live under
//! `/portal/t/{tenant}/`, resolved exactly like the API's `/tenants/{tenant}` prefix: another
//! tenant's URL answers 404 to a tenant operator. Live updates: `portal.js` opens the event
//! WebSocket (`/ws/sdwan`, which accepts the session cookie on a same-origin upgrade) and
//! re-renders the page's `#live` fragment when an event arrives.

pub mod chart;
pub mod pages;
pub mod policy_form;

use std::sync::LazyLock;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use askama::Template;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use patronus_proto::TenantId;
use sha2::{Digest, Sha256};

use crate::api::context::{Actor, Ctx, Principal, RequestId};
use crate::api::error::ApiError;
use crate::server::AppState;

/// The session cookie (the API's session token).
pub const SESSION_COOKIE: &str = "patronus_session";
/// A random value set with the sign-in form, so the form's CSRF token has something to be
/// derived from before there is a session.
pub(crate) const LOGIN_COOKIE: &str = "patronus_login";

static CSS: &str = include_str!("../../static/portal.css");
static JS: &str = include_str!("../../static/portal.js");

/// A short hash of the static assets, in their URLs: they are cached for a year, and a new
/// build changes the URL.
pub static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let digest = Sha256::new().chain_update(CSS).chain_update(JS).finalize();
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
});

/// The CSRF token of a session (or of a sign-in form's random value): a hash of the secret
/// the browser holds in an HttpOnly cookie, so another site can neither read nor compute it.
pub fn csrf_token(secret: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"patronus-portal-csrf\0")
        .chain_update(secret.as_bytes())
        .finalize();
    URL_SAFE_NO_PAD.encode(&digest[..24])
}

/// Compare without an early exit on the first differing byte.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The session token a same-origin WebSocket upgrade carries in the portal's cookie (browsers
/// cannot set an Authorization header on a WebSocket). Anything else, a cross-origin upgrade
/// in particular (cross-site WebSocket hijacking), gets `None`.
pub fn websocket_session(req: &HttpRequest) -> Option<String> {
    let headers = req.headers();
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))?;
    if origin_host != host {
        return None;
    }
    Some(req.cookie(SESSION_COOKIE)?.value().to_owned())
}

/// What every page's header needs.
pub struct Layout {
    pub asset_version: &'static str,
    pub csrf: String,
    pub tenant_id: String,
    pub tenant_name: String,
    /// `(id, name)` of the tenants an MSP admin may switch between.
    pub tenants: Vec<(String, String)>,
    pub operator: String,
    pub role: &'static str,
    pub can_write: bool,
    pub nav: &'static str,
    pub live: bool,
}

/// A signed-in request for one tenant's page.
pub struct PortalCtx {
    pub ctx: Ctx,
    pub tenant: TenantId,
    csrf: String,
    tenant_name: String,
    tenants: Vec<(String, String)>,
}

impl PortalCtx {
    /// The signed-in operator acting for the tenant in the URL, or the error page to show
    /// (sign-in for no or an expired session, 404 for a tenant it may not see).
    pub async fn from_request(req: &HttpRequest) -> Result<Self, PortalError> {
        let (ctx, token) = signed_in(req).await?;
        let tenant = ctx.tenant.ok_or(PortalError::NotFound)?;
        let (tenant_name, tenants) = tenant_names(&ctx, tenant).await?;
        Ok(Self {
            tenant,
            csrf: csrf_token(&token),
            tenant_name,
            tenants,
            ctx,
        })
    }

    pub fn layout(&self, nav: &'static str, live: bool) -> Layout {
        let operator = match &self.ctx.principal.actor {
            Actor::Operator { label, .. } | Actor::ApiToken { label, .. } => label.clone(),
        };
        Layout {
            asset_version: ASSET_VERSION.as_str(),
            csrf: self.csrf.clone(),
            tenant_id: self.tenant.0.to_string(),
            tenant_name: self.tenant_name.clone(),
            tenants: self.tenants.clone(),
            operator,
            role: self.ctx.principal.role.as_str(),
            can_write: self.ctx.principal.role.can_write(),
            nav,
            live,
        }
    }

    /// Check a submitted form's CSRF token and the caller's right to change things.
    pub fn check_write(&self, submitted: &str) -> Result<(), PortalError> {
        if !same(submitted, &self.csrf) {
            return Err(PortalError::Forbidden(
                "the form was stale or not sent from this portal; reload the page and try again"
                    .into(),
            ));
        }
        if !self.ctx.principal.role.can_write() {
            return Err(PortalError::Forbidden("your role is read-only".into()));
        }
        Ok(())
    }

    pub fn tenant_path(&self, rest: &str) -> String {
        format!("/portal/t/{}/{rest}", self.tenant.0)
    }
}

/// The session in the cookie, checked like the API's bearer tokens, and the tenant the URL
/// names (if any), resolved like the API's.
pub async fn signed_in(req: &HttpRequest) -> Result<(Ctx, String), PortalError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| PortalError::Internal("application state missing".into()))?;
    let token = req
        .cookie(SESSION_COOKIE)
        .map(|c| c.value().to_owned())
        .ok_or(PortalError::SignIn)?;
    let principal: Principal = crate::api::context::authenticate(&state, &token)
        .await
        .map_err(|_| PortalError::SignIn)?;
    let requested =
        crate::api::context::requested_tenant(req).map_err(|_| PortalError::NotFound)?;
    let tenant = crate::api::context::resolve_tenant(&state, &principal, requested)
        .await
        .map_err(PortalError::from)?;
    let request_id = actix_web::HttpMessage::extensions(req)
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let ctx = Ctx {
        source_ip: req.peer_addr().map(|a| a.ip()),
        state,
        principal,
        tenant,
        request_id,
    };
    Ok((ctx, token))
}

/// The tenant's name, and for an MSP admin every tenant of its MSP (for the picker).
async fn tenant_names(
    ctx: &Ctx,
    tenant: TenantId,
) -> Result<(String, Vec<(String, String)>), PortalError> {
    use crate::db::schema::tenants;
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    let msp = ctx.principal.msp;
    let all: Vec<(uuid::Uuid, String)> = ctx
        .msp_tx(move |conn| {
            Box::pin(async move {
                Ok(tenants::table
                    .filter(tenants::msp_id.eq(msp))
                    .order(tenants::name)
                    .select((tenants::id, tenants::name))
                    .load(conn)
                    .await?)
            })
        })
        .await?;
    let name = all
        .iter()
        .find(|(id, _)| *id == tenant.0)
        .map(|(_, name)| name.clone())
        .ok_or(PortalError::NotFound)?;
    let tenants = if ctx.principal.tenant.is_none() {
        all.into_iter()
            .map(|(id, name)| (id.to_string(), name))
            .collect()
    } else {
        Vec::new()
    };
    Ok((name, tenants))
}

/// Why a portal request ends on something other than its page.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("sign in first")]
    SignIn,
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for PortalError {
    fn from(e: ApiError) -> Self {
        let detail = e.detail.clone();
        match e.status {
            StatusCode::UNAUTHORIZED => PortalError::SignIn,
            StatusCode::NOT_FOUND => PortalError::NotFound,
            StatusCode::FORBIDDEN => PortalError::Forbidden(detail),
            s if s.is_client_error() => PortalError::BadRequest(detail),
            StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::BAD_GATEWAY => PortalError::Unavailable(detail),
            _ => PortalError::Internal(detail),
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    asset_version: &'a str,
    title: &'a str,
    detail: &'a str,
    anchor: &'a str,
}

impl ResponseError for PortalError {
    fn status_code(&self) -> StatusCode {
        match self {
            PortalError::SignIn => StatusCode::SEE_OTHER,
            PortalError::NotFound => StatusCode::NOT_FOUND,
            PortalError::Forbidden(_) => StatusCode::FORBIDDEN,
            PortalError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PortalError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            PortalError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let PortalError::SignIn = self {
            return HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/portal/login"))
                .finish();
        }
        if let PortalError::Internal(detail) = self {
            tracing::error!(detail = %detail, "portal page failed");
        }
        let (title, anchor, detail) = match self {
            PortalError::NotFound => (
                "Not found",
                "not-found",
                "There is no such page, or it belongs to a tenant you cannot see.".to_owned(),
            ),
            PortalError::Forbidden(d) => ("Not allowed", "forbidden", d.clone()),
            PortalError::BadRequest(d) => ("Cannot do that", "bad-request", d.clone()),
            PortalError::Unavailable(d) => ("Not available right now", "unavailable", d.clone()),
            PortalError::Internal(_) | PortalError::SignIn => (
                "Something went wrong",
                "internal-error",
                "The controller could not build this page; its log says why.".to_owned(),
            ),
        };
        let page = ErrorPage {
            asset_version: ASSET_VERSION.as_str(),
            title,
            detail: &detail,
            anchor,
        };
        html(self.status_code(), page.render())
    }
}

/// A rendered page with the portal's security headers, or the error page if rendering failed.
pub fn html(status: StatusCode, rendered: askama::Result<String>) -> HttpResponse {
    match rendered {
        Ok(body) => {
            let mut response = HttpResponse::build(status)
                .content_type("text/html; charset=utf-8")
                .body(body);
            secure_headers(response.headers_mut());
            response
        }
        Err(e) => PortalError::Internal(format!("template: {e}")).error_response(),
    }
}

/// Strict CSP (scripts, styles and connections from this origin only; the WebSocket to the
/// same host), no framing, no sniffing, no caching of pages with tenant data.
pub fn secure_headers(headers: &mut actix_web::http::header::HeaderMap) {
    let pairs = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in pairs {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

/// The session cookie: `Secure; HttpOnly; SameSite=Strict`, for the session's lifetime.
/// Browsers keep `Secure` cookies on `http://localhost` too; elsewhere serve the portal over
/// HTTPS (a TLS-terminating proxy).
pub fn session_cookie(token: &str, max_age_s: u64) -> Cookie<'static> {
    Cookie::build(SESSION_COOKIE, token.to_owned())
        .path("/")
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Strict)
        .max_age(actix_web::cookie::time::Duration::seconds(
            i64::try_from(max_age_s).unwrap_or(i64::MAX),
        ))
        .finish()
}

/// A cookie that removes `name`.
pub(crate) fn expired(name: &'static str, path: &'static str) -> Cookie<'static> {
    let mut cookie = Cookie::build(name, "")
        .path(path)
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Strict)
        .finish();
    cookie.make_removal();
    cookie
}

/// Largest form the portal reads (the policy form is well under 4 KiB).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// A redirect after a form (303: the browser follows with a GET).
pub fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location.to_owned()))
        .finish()
}

async fn static_css() -> HttpResponse {
    asset("text/css; charset=utf-8", CSS)
}

async fn static_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "public, max-age=31536000, immutable"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::ETAG, format!("\"{}\"", ASSET_VERSION.as_str())))
        .body(body)
}

/// Mount the portal.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(|| async { see_other("/portal/") }))
        .service(
            web::scope("/portal")
                // A malformed form or query gets the portal's error page, not actix's text.
                .app_data(
                    web::FormConfig::default()
                        .limit(MAX_FORM_BYTES)
                        .error_handler(|e, _| {
                            PortalError::BadRequest(format!("the form could not be read: {e}"))
                                .into()
                        }),
                )
                .app_data(web::QueryConfig::default().error_handler(|e, _| {
                    PortalError::BadRequest(format!("the address could not be read: {e}")).into()
                }))
                .route("/static/portal.css", web::get().to(static_css))
                .route("/static/portal.js", web::get().to(static_js))
                .route("/login", web::get().to(pages::login_form))
                .route("/login", web::post().to(pages::login))
                .route("/logout", web::post().to(pages::logout))
                .route("/switch", web::get().to(pages::switch_tenant))
                .route("/", web::get().to(pages::home))
                .route("", web::get().to(pages::home))
                .service(
                    web::scope("/t/{tenant}")
                        .route("/", web::get().to(pages::overview))
                        .route("", web::get().to(pages::overview))
                        .route("/sites/{id}", web::get().to(pages::site))
                        .route("/sites/{id}/revoke", web::post().to(pages::revoke_site))
                        .route("/sites/{id}/delete", web::post().to(pages::delete_site))
                        .route("/paths/{id}", web::get().to(pages::path))
                        .route("/paths/{id}/test", web::post().to(pages::test_path))
                        .route("/onboarding", web::get().to(pages::onboarding))
                        .route("/onboarding", web::post().to(pages::create_token))
                        .route("/events", web::get().to(pages::events))
                        .route("/admin", web::get().to(pages::admin))
                        .route("/admin/operators", web::post().to(pages::add_operator))
                        .route(
                            "/admin/operators/{id}/toggle",
                            web::post().to(pages::toggle_operator),
                        )
                        .route("/admin/api-tokens", web::post().to(pages::add_api_token))
                        .route(
                            "/admin/api-tokens/{id}/revoke",
                            web::post().to(pages::revoke_api_token),
                        )
                        .route("/topology", web::get().to(pages::topology))
                        .route("/policies", web::get().to(pages::policies))
                        .route("/policies", web::post().to(pages::create_policy))
                        .route("/policies/new", web::get().to(pages::new_policy))
                        .route("/policies/{id}", web::get().to(pages::edit_policy))
                        .route("/policies/{id}", web::post().to(pages::update_policy))
                        .route(
                            "/policies/{id}/toggle",
                            web::post().to(pages::toggle_policy),
                        )
                        .route("/policies/{id}/up", web::post().to(pages::raise_policy))
                        .route("/policies/{id}/down", web::post().to(pages::lower_policy))
                        .route(
                            "/policies/{id}/delete",
                            web::post().to(pages::delete_policy),
                        )
                        .default_service(web::to(|| async {
                            Err::<HttpResponse, _>(PortalError::NotFound)
                        })),
                )
                .default_service(web::to(|| async {
                    Err::<HttpResponse, _>(PortalError::NotFound)
                })),
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_depend_on_the_secret_and_compare_exactly() {
        let a = csrf_token("session-a");
        assert_eq!(a, csrf_token("session-a"));
        assert_ne!(a, csrf_token("session-b"));
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &csrf_token("session-b")));
        assert!(!same(&a, &a[..a.len() - 1]));
        assert!(!same(&a, ""));
    }

    #[test]
    fn websocket_sessions_come_only_from_same_origin_upgrades() {
        let with = |upgrade: bool, origin: Option<&str>| {
            let mut req = actix_web::test::TestRequest::get()
                .uri("/ws/sdwan")
                .insert_header((header::HOST, "127.0.0.1:8080"))
                .cookie(Cookie::new(SESSION_COOKIE, "token"));
            if upgrade {
                req = req.insert_header((header::UPGRADE, "websocket"));
            }
            if let Some(origin) = origin {
                req = req.insert_header((header::ORIGIN, origin));
            }
            websocket_session(&req.to_http_request())
        };
        assert_eq!(
            with(true, Some("http://127.0.0.1:8080")),
            Some("token".into())
        );
        assert_eq!(with(true, Some("https://evil.example")), None);
        assert_eq!(with(true, None), None);
        assert_eq!(with(false, Some("http://127.0.0.1:8080")), None);
    }
}
