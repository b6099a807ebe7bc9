//! The HTTP server: shared state, the actix-web application, and its lifecycle (graceful
//! shutdown on SIGINT/SIGTERM, in-flight requests get `http.shutdown_grace_s`).

use actix_web::{middleware, web, App, HttpServer};
use tokio::sync::OnceCell;

use crate::auth::SessionKeys;
use crate::config::{redact_url, AuthConfig, ControllerConfig, IntentsConfig};
use crate::db::{self, DbError, DbPool};
use crate::health;
use crate::metrics::Metrics;

/// Core NATS subject on which replicas of one deployment signal that a tenant's intents need
/// recompiling (`patronus.internal.<deployment>.intents-changed`).
pub fn intents_changed_subject(deployment: &str) -> String {
    format!("patronus.internal.{deployment}.intents-changed")
}

/// A deployment's name, from its database's: replicas sharing a database are one deployment
/// and share leases and signals; another deployment on the same Redis and NATS does not.
fn deployment_name(database_url: &str) -> String {
    let name = database_url
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .unwrap_or("patronus");
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "patronus".into()
    } else {
        clean
    }
}

/// The 32-byte key sealing tenant CA keys; never printed.
#[derive(Clone)]
pub struct MasterKey(pub [u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// What every request handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: DbPool,
    redis_client: redis::Client,
    redis_conn: std::sync::Arc<OnceCell<redis::aio::ConnectionManager>>,
    /// The controller's own NATS account (signals, event fan-out between replicas).
    pub nats: async_nats::Client,
    /// Every NATS link: tenant accounts, account pushes, site credentials.
    pub nats_hub: std::sync::Arc<crate::nats::NatsHub>,
    pub session_keys: SessionKeys,
    pub auth: AuthConfig,
    pub intents: IntentsConfig,
    pub metrics_config: crate::config::MetricsConfig,
    /// Decoded `intents.probe_secret`.
    pub probe_secret: std::sync::Arc<Vec<u8>>,
    /// Identifies this process as a lease holder: host, pid and a random suffix.
    pub replica_id: String,
    /// This deployment's name (see [`intents_changed_subject`]); namespaces leases and signals.
    pub deployment: String,
    pub metrics: std::sync::Arc<Metrics>,
    pub provisioning: crate::config::ProvisioningConfig,
    /// Signs and checks enrollment tokens.
    pub enrollment_keys: crate::enrollment::TokenKeys,
    /// Seals tenant CA keys at rest.
    pub master_key: MasterKey,
    /// The URL edges are told to connect to.
    pub nats_edge_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("redis url is not valid: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("intents.probe_secret is not base64")]
    ProbeSecret,
    #[error("provisioning.{0} is not base64 of 32 bytes")]
    ProvisioningKey(&'static str),
    #[error("auth.session_secret: {0}")]
    SessionSecret(#[from] crate::auth::AuthError),
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
        let hub = crate::nats::NatsHub::connect(&config.nats.url, &config.nats.credentials_dir)
            .await
            .map_err(|e| StartError::Nats(format!("{} ({})", e, redact_url(&config.nats.url))))?;
        let nats = hub.control().clone();
        Ok(Self {
            db,
            redis_client,
            redis_conn: Default::default(),
            nats,
            nats_hub: std::sync::Arc::new(hub),
            provisioning: config.provisioning.clone(),
            enrollment_keys: crate::enrollment::TokenKeys::from_seed(
                &crate::config::secret_bytes_32(&config.provisioning.token_signing_key)
                    .ok_or(StartError::ProvisioningKey("token_signing_key"))?,
            ),
            master_key: MasterKey(
                crate::config::secret_bytes_32(&config.provisioning.master_key)
                    .ok_or(StartError::ProvisioningKey("master_key"))?,
            ),
            nats_edge_url: config
                .nats
                .edge_url
                .clone()
                .unwrap_or_else(|| config.nats.url.clone()),
            session_keys: SessionKeys::from_base64(&config.auth.session_secret.0)?,
            auth: config.auth.clone(),
            intents: config.intents.clone(),
            metrics_config: config.metrics.clone(),
            probe_secret: std::sync::Arc::new(
                base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    config.intents.probe_secret.0.trim(),
                )
                .map_err(|_| StartError::ProbeSecret)?,
            ),
            replica_id: format!(
                "{}-{}-{}",
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "host".into()),
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            metrics: Default::default(),
            deployment: deployment_name(&config.database.url),
        })
    }

    /// Tell the intent publisher (whichever replica holds its lease) that something affecting
    /// this tenant's intents changed. Best effort: the publisher also reconciles periodically.
    pub async fn intents_changed(&self, tenant: patronus_proto::TenantId) {
        if let Err(e) = self
            .nats
            .publish(
                intents_changed_subject(&self.deployment),
                tenant.to_string().into(),
            )
            .await
        {
            tracing::warn!(tenant = %tenant, error = %e, "could not signal an intent change; the periodic reconcile will pick it up");
        }
    }

    /// The controller's link into a tenant's NATS account (created on first use).
    pub async fn tenant_nats(
        &self,
        tenant: patronus_proto::TenantId,
    ) -> Result<crate::nats::TenantLink, crate::nats::HubError> {
        self.nats_hub.tenant(&self.db, tenant).await
    }

    /// The shared Redis connection (reconnects by itself once established).
    pub async fn redis(&self) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
        self.redis_conn
            .get_or_try_init(|| redis::aio::ConnectionManager::new(self.redis_client.clone()))
            .await
            .cloned()
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(health::healthz)
        .service(health::readyz)
        .service(crate::metrics::metrics)
        .service(crate::events::stream)
        .configure(crate::portal::configure)
        .configure(crate::api::configure);
}

/// Serve until SIGINT/SIGTERM.
pub async fn serve(config: ControllerConfig, state: AppState) -> Result<(), StartError> {
    let addr = config.http.listen;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
    serve_on(listener, config, state, |_| {}).await
}

/// Serve on a listener already bound (tests bind port 0), calling `started` with the server's
/// handle once it runs; returns when the server stops (signal or handle).
pub async fn serve_on(
    listener: std::net::TcpListener,
    config: ControllerConfig,
    state: AppState,
    started: impl FnOnce(actix_web::dev::ServerHandle),
) -> Result<(), StartError> {
    let addr = listener.local_addr().unwrap_or(config.http.listen);
    let data = web::Data::new(state);
    let app_data = data.clone();
    let server = HttpServer::new(move || {
        let data = app_data.clone();
        App::new()
            .wrap(middleware::from_fn(crate::api::request_id))
            .wrap(middleware::from_fn(crate::metrics::record))
            .app_data(data.clone())
            .configure(configure)
            .default_service(web::to(crate::api::not_found))
    })
    .shutdown_timeout(config.shutdown_grace().as_secs())
    .listen(listener)
    .map_err(|source| StartError::Bind { addr, source })?;
    for bound in server.addrs() {
        tracing::info!(listen = %bound, "controller listening");
    }
    // The singleton intent publisher runs beside the HTTP server on every replica; only the
    // lease holder publishes.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(crate::intents::service::run(
        data.get_ref().clone(),
        stop_rx,
    ));
    let flows = tokio::spawn(crate::flows_ingest::run(
        data.get_ref().clone(),
        stop_tx.subscribe(),
    ));
    let path_metrics = tokio::spawn(crate::metrics_ingest::run(
        data.get_ref().clone(),
        stop_tx.subscribe(),
    ));
    let edge_events = tokio::spawn(crate::edge_events::run(
        data.get_ref().clone(),
        stop_tx.subscribe(),
    ));
    let server = server.run();
    started(server.handle());
    let served = server.await;
    // The HTTP server has drained: stop the publisher, which releases its lease.
    let _ = stop_tx.send(true);
    let _ = flows.await;
    let _ = path_metrics.await;
    let _ = edge_events.await;
    if let Err(e) = publisher.await {
        tracing::warn!(error = %e, "the intent publisher ended abnormally");
    }
    served.map_err(|source| StartError::Bind { addr, source })
}
