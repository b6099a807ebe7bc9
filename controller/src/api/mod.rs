//! The REST API under `/api/v1`.
//!
//! Every route is mounted twice: at `/api/v1/...` (the caller's own tenant, or the one named
//! in `X-Patronus-Tenant`) and at `/api/v1/tenants/{tenant}/...` (an MSP admin naming the
//! tenant in the path). Modules:
//! - [`error`]: the `{"error", "detail"}` error shape and how database errors map to it.
//! - [`context`]: authentication, tenant resolution, scoped transactions, audit, pagination,
//!   rate limits.
//! - [`session`]: login, refresh, logout, me.
//! - [`tenants`], [`operators`], [`tokens`]: MSP and tenant administration.
//! - [`sites`], [`policies`], [`paths`], [`flows`], [`topology`], [`audit`]: the tenant's
//!   network, what flows over it, and its history.

pub mod audit;
pub mod context;
pub mod edge;
pub mod enrollment;
pub mod error;
pub mod flows;
pub mod operators;
pub mod paths;
pub mod pki;
pub mod policies;
pub mod session;
pub mod sites;
pub mod tenants;
pub mod tokens;
pub mod topology;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{get, web, HttpMessage};
use tracing::Instrument;

use context::{RequestId, REQUEST_ID_HEADER};
use error::ApiError;
use utoipa_actix_web::service_config::ServiceConfig;

/// Largest JSON body accepted.
pub const MAX_JSON_BYTES: usize = 256 * 1024;

/// Give every request an id (the client's `X-Request-Id` if sane, else a new one), log it on
/// every line of the request, and echo it in the response.
pub async fn request_id(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.path());
    let started = std::time::Instant::now();
    let mut response = next
        .call(req)
        .instrument(span.clone())
        .await?
        .map_into_boxed_body();
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "request"
        )
    });
    if response.status() == actix_web::http::StatusCode::METHOD_NOT_ALLOWED {
        // actix answers an unrouted method with an empty body; give it the API's error shape.
        let (request, _) = response.into_parts();
        let error = ApiError::new(
            actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not take that method",
        );
        response = ServiceResponse::new(request, actix_web::ResponseError::error_response(&error));
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    Ok(response)
}

/// Any path or method the API does not serve.
pub async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::not_found("endpoint (or method) under /api/v1"))
}

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_JSON_BYTES)
        .error_handler(|err, _req| {
            let detail = match &err {
                actix_web::error::JsonPayloadError::ContentType => {
                    "send Content-Type: application/json".to_owned()
                }
                actix_web::error::JsonPayloadError::Overflow { limit }
                | actix_web::error::JsonPayloadError::OverflowKnownLength { limit, .. } => {
                    format!("body is over {limit} bytes")
                }
                other => other.to_string(),
            };
            ApiError::bad_request("invalid_body", detail).into()
        })
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|err, _req| ApiError::bad_request("invalid_query", err.to_string()).into())
}

fn path_config() -> web::PathConfig {
    // A malformed id cannot name anything that exists.
    web::PathConfig::default().error_handler(|_err, _req| ApiError::not_found("resource").into())
}

/// Routes that act within one tenant (or, for an MSP admin naming none, at the MSP level).
fn routes(cfg: &mut ServiceConfig) {
    cfg.service(session::me)
        .service(session::logout)
        .configure(operators::routes)
        .configure(tokens::routes)
        .configure(enrollment::routes)
        .configure(pki::routes)
        .configure(sites::routes)
        .configure(policies::routes)
        .configure(paths::routes)
        .configure(flows::routes)
        .configure(topology::routes)
        .configure(audit::routes);
}

/// Register the whole API. The same function feeds the server and the OpenAPI document, so
/// the document cannot drift from what is served.
fn register(cfg: &mut ServiceConfig) {
    cfg.app_data(json_config())
        .app_data(query_config())
        .app_data(path_config())
        .service(
            utoipa_actix_web::scope("/api/v1")
                .service(session::login)
                .service(session::refresh)
                .service(enrollment::enroll)
                .configure(edge::routes)
                .service(openapi_json)
                .configure(tenants::item_routes)
                // The same routes again under the tenant prefix an MSP admin may use (documented
                // once, at their plain paths, with the `X-Patronus-Tenant` alternative).
                .map(|scope| {
                    scope.service(
                        web::scope("/tenants/{tenant}")
                            .configure(|c| routes(&mut ServiceConfig::new(c)))
                            .default_service(web::to(not_found)),
                    )
                })
                .configure(tenants::collection_routes)
                .configure(routes)
                .default_service(web::to(not_found)),
        );
}

/// Mount the API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    register(&mut ServiceConfig::new(cfg));
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "a session token from /api/v1/auth/login, or an API token (pat_...)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI 3 document of the API, built from the registered handlers.
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        use utoipa::Modify as _;
        use utoipa_actix_web::AppExt as _;
        let (_, mut doc) = actix_web::App::new()
            .into_utoipa_app()
            .configure(register)
            .split_for_parts();
        doc.info.title = "Patronus SD-WAN controller API".into();
        doc.info.version = env!("CARGO_PKG_VERSION").into();
        doc.info.description = Some(
            "Every route also answers under /api/v1/tenants/{tenant}/..., where an MSP admin names \
             the tenant (or sends X-Patronus-Tenant). Errors are {\"error\", \"detail\"}."
                .into(),
        );
        BearerAuth.modify(&mut doc);
        doc
    })
}

#[utoipa::path(tag = "meta", responses((status = 200, description = "this OpenAPI document")))]
#[get("/openapi.json")]
async fn openapi_json() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok().json(openapi())
}
