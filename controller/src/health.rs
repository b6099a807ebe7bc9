//! Liveness and readiness.
//!
//! `GET /healthz` answers 200 while the process serves HTTP. `GET /readyz` checks PostgreSQL,
//! Redis and NATS (each with a short timeout, all at once) and answers 200 only when all three
//! are reachable, else 503 with what failed, so a load balancer stops sending traffic to a
//! replica that cannot do its work.

use std::time::Duration;

use actix_web::{get, web, HttpResponse};
use diesel_async::RunQueryDsl;
use serde::Serialize;

use crate::server::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct Check {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Check {
    fn from_result(result: Result<Result<(), String>, tokio::time::error::Elapsed>) -> Self {
        match result {
            Ok(Ok(())) => Check {
                ok: true,
                detail: None,
            },
            Ok(Err(detail)) => Check {
                ok: false,
                detail: Some(detail),
            },
            Err(_) => Check {
                ok: false,
                detail: Some(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
            },
        }
    }
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    postgres: Check,
    redis: Check,
    nats: Check,
}

#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

async fn check_postgres(state: &AppState) -> Result<(), String> {
    let mut conn = state.db.get().await.map_err(|e| e.to_string())?;
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn check_redis(state: &AppState) -> Result<(), String> {
    let mut conn = state.redis().await.map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn check_nats(state: &AppState) -> Result<(), String> {
    match state.nats.connection_state() {
        async_nats::connection::State::Connected => {
            state.nats.flush().await.map_err(|e| e.to_string())
        }
        other => Err(format!("connection is {other}")),
    }
}

#[get("/readyz")]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (postgres, redis, nats) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, check_postgres(&state)),
        tokio::time::timeout(CHECK_TIMEOUT, check_redis(&state)),
        tokio::time::timeout(CHECK_TIMEOUT, check_nats(&state)),
    );
    let readiness = Readiness {
        status: "ready",
        postgres: Check::from_result(postgres),
        redis: Check::from_result(redis),
        nats: Check::from_result(nats),
    };
    if readiness.postgres.ok && readiness.redis.ok && readiness.nats.ok {
        HttpResponse::Ok().json(readiness)
    } else {
        let failed: Vec<&str> = [
            ("postgres", &readiness.postgres),
            ("redis", &readiness.redis),
            ("nats", &readiness.nats),
        ]
        .into_iter()
        .filter(|(_, c)| !c.ok)
        .map(|(name, _)| name)
        .collect();
        tracing::warn!(failed = ?failed, "not ready");
        HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "error": "not_ready",
            "detail": format!("unreachable: {}; check that scripts/setup started the services", failed.join(", ")),
            "postgres": readiness.postgres,
            "redis": readiness.redis,
            "nats": readiness.nats,
        }))
    }
}
