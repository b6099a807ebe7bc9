//! The HTTP server: shared state, the actix-web application, and its lifecycle (graceful
//! shutdown on SIGINT/SIGTERM, in-flight requests get `http.shutdown_grace_s`).

use actix_web::{web, App, HttpResponse, HttpServer};
use tokio::sync::OnceCell;

use crate::config::{redact_url, ControllerConfig};
use crate::db::{self, DbError, DbPool};
use crate::health;

/// What every request handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: DbPool,
    redis_client: redis::Client,
    redis_conn: std::sync::Arc<OnceCell<redis::aio::ConnectionManager>>,
    pub nats: async_nats::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("redis url is not valid: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl AppState {
    /// Set up clients. Nothing here waits for a service to be up: PostgreSQL and Redis connect
    /// on first use and NATS keeps retrying in the background, so the controller starts (and
    /// `/readyz` says what is missing) even when a service is down.
    pub async fn connect(config: &ControllerConfig) -> Result<Self, StartError> {
        let db = db::pool(&config.database.url, config.database.pool_size)?;
        let redis_client = redis::Client::open(config.redis.url.as_str())?;
        let nats = async_nats::ConnectOptions::new()
            .name("patronus-controller")
            .retry_on_initial_connect()
            .connect(config.nats.url.as_str())
            .await
            .map_err(|e| StartError::Nats(format!("{} ({})", e, redact_url(&config.nats.url))))?;
        Ok(Self {
            db,
            redis_client,
            redis_conn: Default::default(),
            nats,
        })
    }

    /// The shared Redis connection (reconnects by itself once established).
    pub async fn redis(&self) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
        self.redis_conn
            .get_or_try_init(|| redis::aio::ConnectionManager::new(self.redis_client.clone()))
            .await
            .cloned()
    }
}

/// Any path we do not serve gets the standard JSON error.
async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({
        "error": "not_found",
        "detail": "no such endpoint; see /api/v1/openapi.json once the API is served",
    }))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(health::healthz).service(health::readyz);
}

/// Serve until SIGINT/SIGTERM.
pub async fn serve(config: ControllerConfig, state: AppState) -> Result<(), StartError> {
    let addr = config.http.listen;
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(configure)
            .default_service(web::to(not_found))
    })
    .shutdown_timeout(config.shutdown_grace().as_secs())
    .bind(addr)
    .map_err(|source| StartError::Bind { addr, source })?;
    for bound in server.addrs() {
        tracing::info!(listen = %bound, "controller listening");
    }
    server
        .run()
        .await
        .map_err(|source| StartError::Bind { addr, source })
}
