//! The HTTP server: shared state, the actix-web application, and its lifecycle (graceful
//! shutdown on SIGINT/SIGTERM, in-flight requests get `http.shutdown_grace_s`).

use actix_web::{middleware, web, App, HttpServer};
use tokio::sync::OnceCell;

use crate::auth::SessionKeys;
use crate::config::{redact_url, AuthConfig, ControllerConfig, IntentsConfig};
use crate::db::{self, DbError, DbPool};
use crate::health;
use crate::metrics::Metrics;

/// A pool held without keeping it open.
type WeakDbPool = Box<dyn Fn() -> Option<DbPool> + Send + Sync>;

fn weak(pool: &DbPool) -> WeakDbPool {
    let weak = pool.weak();
    Box::new(move || weak.upgrade())
}

/// How long [`AppState::warm_up`] waits for the pool's connections before leaving the rest to
/// first use.
const WARM_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// The pool this copy's queries use: the shared pool for background work, or in an
    /// HTTP worker's copy ([`AppState::for_worker`]) that worker's own.
    pub db: DbPool,
    /// Every pool of the process by name, for `/metrics`; held weakly, so a stopped
    /// worker's pool (and its connections) goes with the worker.
    pools: std::sync::Arc<std::sync::Mutex<Vec<(String, WeakDbPool)>>>,
    database_url: String,
    worker_pool_size: usize,
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
        let pools = std::sync::Arc::new(std::sync::Mutex::new(vec![(
            "shared".to_owned(),
            weak(&db),
        )]));
        let redis_client = redis::Client::open(config.redis.url.as_str())?;
        let hub = crate::nats::NatsHub::connect(&config.nats.url, &config.nats.credentials_dir)
            .await
            .map_err(|e| StartError::Nats(format!("{} ({})", e, redact_url(&config.nats.url))))?;
        let nats = hub.control().clone();
        Ok(Self {
            db,
            pools,
            database_url: config.database.url.clone(),
            worker_pool_size: config.database.worker_pool_size,
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

    /// A copy of this state for one HTTP worker, with a database pool and a Redis connection
    /// of its own, whose connections open in the background right away ([`Self::warm_up`]).
    /// Call it on the worker's thread (the `HttpServer::new` factory runs there): a
    /// connection's I/O is driven by the runtime that opened it, and with one pool for all
    /// workers most queries crossed threads twice (handler → the runtime driving the
    /// connection → handler). In the API bench at 1,000 policy updates/s that was p50 4.3 /
    /// p99 15.2 ms against 2.7 / 7.8 ms with the connections on the handler's own thread.
    pub fn for_worker(&self) -> Self {
        let db = match db::pool(&self.database_url, self.worker_pool_size) {
            Ok(db) => db,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build a worker's database pool; this worker uses the shared pool");
                return self.clone();
            }
        };
        if let Ok(mut pools) = self.pools.lock() {
            let name = format!("worker-{}", pools.len() - 1);
            pools.push((name, weak(&db)));
        }
        let worker = Self {
            db,
            redis_conn: Default::default(),
            ..self.clone()
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let warm = worker.clone();
                runtime.spawn(async move { warm.warm_up().await });
            }
            Err(_) => tracing::debug!(
                "no runtime on this thread: the worker's connections open on first use"
            ),
        }
        worker
    }

    /// Every live database pool of the process and its name (`shared`, `worker-N`).
    pub fn pools(&self) -> Vec<(String, DbPool)> {
        self.pools
            .lock()
            .map(|pools| {
                pools
                    .iter()
                    .filter_map(|(name, pool)| Some((name.clone(), pool()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Open the database pool's connections (each primed: [`db::prime`]) and the Redis
    /// connection before requests need them. A new PostgreSQL connection costs a backend
    /// start and authentication, and a backend's first query of a table loads its catalog
    /// entries: without this, the first burst of traffic after a start or a failover to this
    /// replica queues behind that (in the API bench, 146 of the first 200 requests took over
    /// 10 ms, up to 70 ms). Best effort and bounded: a service that is down is connected on
    /// first use as before. Returns the connections opened.
    pub async fn warm_up(&self) -> usize {
        let started = std::time::Instant::now();
        let wanted = self.db.status().max_size;
        // Hold every checkout until all are done so the pool opens `wanted` distinct
        // connections instead of handing one back and forth.
        let checkouts = futures_util::future::join_all((0..wanted).map(|_| async {
            let mut conn = self.db.get().await.map_err(DbError::from)?;
            db::prime(&mut conn).await?;
            Ok::<_, DbError>(conn)
        }));
        let (opened, first_error) = match tokio::time::timeout(WARM_UP_TIMEOUT, checkouts).await {
            Ok(results) => {
                let first_error = results
                    .iter()
                    .find_map(|r| r.as_ref().err())
                    .map(|e| e.to_string());
                (results.iter().filter(|r| r.is_ok()).count(), first_error)
            }
            Err(_) => (0, Some(format!("no answer within {WARM_UP_TIMEOUT:?}"))),
        };
        let redis = self.redis().await.err().map(|e| e.to_string());
        match (&first_error, &redis) {
            (None, None) => tracing::info!(
                database_connections = opened,
                took_ms = started.elapsed().as_millis() as u64,
                "database pool and Redis connection open"
            ),
            _ => tracing::warn!(
                database_connections = opened,
                wanted,
                database_error = first_error.as_deref().unwrap_or("none"),
                redis_error = redis.as_deref().unwrap_or("none"),
                "could not open every connection ahead of traffic; the rest connect on first use (/readyz tells what is down)"
            ),
        }
        opened
    }

    /// This copy's Redis connection (each HTTP worker has its own; it reconnects by itself
    /// once established).
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
        let data = web::Data::new(app_data.for_worker());
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
