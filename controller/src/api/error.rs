//! The one error shape of the API: an HTTP status and `{"error": "<code>", "detail": "<what to
//! do>"}`. Database and internal errors are logged with the request id and answered with a
//! generic 500, so nothing internal (SQL, secrets) reaches a client.

use std::fmt;

use actix_web::http::header::{HeaderValue, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub retry_after_s: Option<u64>,
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    /// A stable code, e.g. `not_found`, `invalid_body`, `rate_limited`.
    pub error: &'a str,
    /// What went wrong and what to do about it.
    pub detail: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after_s: None,
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }

    /// Also what another tenant's resource gets, so existence does not leak.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what} (or it belongs to another tenant)"),
        )
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    pub fn too_many_requests(retry_after_s: u64) -> Self {
        Self {
            retry_after_s: Some(retry_after_s.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many attempts; retry after {} s", retry_after_s.max(1)),
            )
        }
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// An internal failure: log `cause` (never sent to the client) and answer 500.
    pub fn internal(cause: impl fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the controller failed; the error is logged with this request's X-Request-Id",
        )
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.detail)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after_s {
            response.insert_header((RETRY_AFTER, HeaderValue::from(secs)));
        }
        response.json(ErrorBody {
            error: self.code,
            detail: &self.detail,
        })
    }
}

/// Database errors: constraint violations are the client's (409/422, naming the constraint);
/// anything else is internal.
impl From<DieselError> for ApiError {
    fn from(e: DieselError) -> Self {
        match &e {
            DieselError::NotFound => ApiError::not_found("resource"),
            DieselError::DatabaseError(kind, info) => {
                let constraint = info.constraint_name().unwrap_or("a constraint");
                match kind {
                    DatabaseErrorKind::UniqueViolation => ApiError::conflict(format!(
                        "already exists ({constraint}); choose another name or value"
                    )),
                    DatabaseErrorKind::ForeignKeyViolation => ApiError::unprocessable(
                        "invalid_reference",
                        format!(
                            "refers to something that does not exist in this tenant ({constraint})"
                        ),
                    ),
                    DatabaseErrorKind::CheckViolation => ApiError::unprocessable(
                        "invalid_value",
                        format!("a value is out of range ({constraint})"),
                    ),
                    DatabaseErrorKind::NotNullViolation => ApiError::unprocessable(
                        "missing_value",
                        format!(
                            "a required value is missing ({})",
                            info.column_name().unwrap_or("column")
                        ),
                    ),
                    _ => ApiError::internal(e),
                }
            }
            _ => ApiError::internal(e),
        }
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        match e {
            crate::db::DbError::Query(q) => q.into(),
            crate::db::DbError::Pool(p) => {
                tracing::error!(error = %p, "database pool");
                ApiError::unavailable("the database is unreachable; retry shortly")
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        tracing::error!(error = %e, "redis");
        ApiError::unavailable("Redis is unreachable; retry shortly")
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
