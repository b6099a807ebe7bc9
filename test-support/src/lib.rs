//! Helpers for the cross-crate integration tests.
//!
//! The tests talk to the real services `scripts/setup` starts; their addresses and credentials
//! come from the environment or, when unset, from `/var/lib/patronus/patronus.env`. Each test
//! that needs a schema gets its own throwaway database, so tests run in parallel and never
//! touch the demo's data.

pub mod browser;
pub mod http;
pub mod lab;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

/// Where `scripts/setup` writes the service environment.
pub const ENV_FILE: &str = "/var/lib/patronus/patronus.env";

/// Service addresses and credentials.
#[derive(Clone, Debug)]
pub struct TestEnv {
    pub database_url: String,
    pub database_owner_url: String,
    pub redis_url: String,
    pub nats_url: String,
    pub session_secret: String,
    pub probe_secret: String,
    pub nats_credentials_dir: String,
    pub token_signing_key: String,
    pub master_key: String,
}

fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

impl TestEnv {
    /// Load the environment, or fail with what to run.
    pub fn load() -> anyhow::Result<Self> {
        let file = std::fs::read_to_string(ENV_FILE)
            .map(|t| parse_env_file(&t))
            .unwrap_or_default();
        let get = |name: &str| -> anyhow::Result<String> {
            std::env::var(name)
                .ok()
                .or_else(|| file.get(name).cloned())
                .with_context(|| {
                    format!("{name} is not set and {ENV_FILE} lacks it: run scripts/setup (as root) first")
                })
        };
        Ok(Self {
            database_url: get("PATRONUS_DATABASE_URL")?,
            database_owner_url: get("PATRONUS_DATABASE_OWNER_URL")?,
            redis_url: get("PATRONUS_REDIS_URL")?,
            nats_url: get("PATRONUS_NATS_URL")?,
            session_secret: get("PATRONUS_SESSION_SECRET")?,
            probe_secret: get("PATRONUS_PROBE_SECRET")?,
            nats_credentials_dir: get("PATRONUS_NATS_CREDENTIALS_DIR")?,
            token_signing_key: get("PATRONUS_TOKEN_SIGNING_KEY")?,
            master_key: get("PATRONUS_MASTER_KEY")?,
        })
    }
}

impl TestEnv {
    /// A valid controller configuration for `database_url`, pointing at the real services.
    pub fn controller_config(
        &self,
        database_url: &str,
    ) -> anyhow::Result<patronus_controller::config::ControllerConfig> {
        use patronus_controller::config::{ControllerConfig, Secret};
        let mut config = ControllerConfig::default();
        config.database.url = database_url.to_owned();
        config.redis.url = self.redis_url.clone();
        config.nats.url = self.nats_url.clone();
        config.auth.session_secret = Secret(self.session_secret.clone());
        config.intents.probe_secret = Secret(self.probe_secret.clone());
        config.nats.credentials_dir = self.nats_credentials_dir.clone().into();
        config.provisioning.token_signing_key = Secret(self.token_signing_key.clone());
        config.provisioning.master_key = Secret(self.master_key.clone());
        config.validate()?;
        Ok(config)
    }
}

/// A controller serving on a loopback port of this process (its own thread and runtime, as
/// actix-web wants), for tests that need real HTTP: edge binaries, concurrent clients.
pub struct RunningController {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningController {
    /// Start serving `config` on a free loopback port; returns once it accepts connections.
    pub fn start(config: patronus_controller::config::ControllerConfig) -> anyhow::Result<Self> {
        Self::serve(std::net::TcpListener::bind("127.0.0.1:0")?, config)
    }

    /// Start serving on `config.http.listen`.
    pub fn start_on(config: patronus_controller::config::ControllerConfig) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(config.http.listen)
            .with_context(|| format!("binding {}", config.http.listen))?;
        Self::serve(listener, config)
    }

    fn serve(
        listener: std::net::TcpListener,
        config: patronus_controller::config::ControllerConfig,
    ) -> anyhow::Result<Self> {
        let url = format!("http://{}", listener.local_addr()?);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let started = tx.clone();
            let ran = actix_web::rt::System::new().block_on(async move {
                let state = patronus_controller::server::AppState::connect(&config).await?;
                patronus_controller::server::serve_on(listener, config, state, move |handle| {
                    let _ = started.send(Ok(handle));
                })
                .await?;
                anyhow::Ok(())
            });
            if let Err(e) = ran {
                let _ = tx.send(Err(e));
            }
        });
        let handle = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .context("the controller did not start within 30 s")??;
        Ok(Self {
            url,
            handle,
            thread: Some(thread),
        })
    }

    /// Stop serving and wait for the thread (its connections close with it).
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Replace the database name at the end of a PostgreSQL URL.
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let Some((base, _)) = url.rsplit_once('/') else {
        bail!("database URL has no database name");
    };
    Ok(format!("{base}/{database}"))
}

/// A database created for one test, dropped by [`TestDatabase::drop_now`].
pub struct TestDatabase {
    pub name: String,
    /// The owner role on this database (migrations, fixtures).
    pub owner_url: String,
    /// The application role on this database (what the controller uses).
    pub app_url: String,
    admin_url: String,
    nats_url: String,
    nats_credentials_dir: String,
}

const TEST_DB_PREFIX: &str = "patronus_test_";
/// Test databases older than this are leftovers of crashed runs and are swept.
const STALE_AFTER_S: u64 = 3600;

impl TestDatabase {
    /// Create an empty database owned by the owner role.
    pub async fn create(env: &TestEnv) -> anyhow::Result<Self> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let name = format!(
            "{TEST_DB_PREFIX}{now}_{}",
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..12)
                .unwrap_or("0")
        );
        let admin_url = env.database_owner_url.clone();
        let mut admin = AsyncPgConnection::establish(&admin_url)
            .await
            .context("connecting as the owner role: is PostgreSQL running? run scripts/setup")?;
        sweep_stale(&mut admin, now).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating test database {name}"))?;
        Ok(Self {
            owner_url: with_database(&env.database_owner_url, &name)?,
            app_url: with_database(&env.database_url, &name)?,
            name,
            admin_url,
            nats_url: env.nats_url.clone(),
            nats_credentials_dir: env.nats_credentials_dir.clone(),
        })
    }

    /// Drop the database (call at the end of a test; leftovers are swept after an hour).
    ///
    /// Connections the test dropped close asynchronously, and the owner role may not terminate
    /// the application role's sessions, so this retries for a few seconds until they are gone.
    pub async fn drop_now(self) -> anyhow::Result<()> {
        self.purge_nats_accounts().await?;
        let mut admin = AsyncPgConnection::establish(&self.admin_url).await?;
        let sql = format!("DROP DATABASE IF EXISTS {}", self.name);
        for attempt in 0.. {
            match admin.batch_execute(&sql).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if attempt < 100 && e.to_string().contains("being accessed by other users") =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("dropping test database {}", self.name));
                }
            }
        }
        Ok(())
    }
}

impl TestDatabase {
    /// Delete the streams of every tenant the test created (a tenant's NATS account outlives
    /// the database otherwise, and JetStream keeps its bucket on disk).
    async fn purge_nats_accounts(&self) -> anyhow::Result<()> {
        let mut owner = AsyncPgConnection::establish(&self.owner_url).await?;
        let tenants: Vec<TenantRow> = match diesel::sql_query("SELECT id FROM tenants")
            .load(&mut owner)
            .await
        {
            Ok(rows) => rows,
            // No schema (a test that never migrated): nothing to purge.
            Err(_) => return Ok(()),
        };
        drop(owner);
        if tenants.is_empty() {
            return Ok(());
        }
        let hub = patronus_controller::nats::NatsHub::connect(
            &self.nats_url,
            std::path::Path::new(&self.nats_credentials_dir),
        )
        .await?;
        for tenant in tenants {
            hub.purge_tenant(patronus_proto::TenantId(tenant.id))
                .await
                .with_context(|| {
                    format!("purging the NATS account of test tenant {}", tenant.id)
                })?;
        }
        Ok(())
    }
}

#[derive(diesel::QueryableByName)]
struct TenantRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
}

#[derive(diesel::QueryableByName)]
struct DatabaseName {
    #[diesel(sql_type = diesel::sql_types::Text)]
    datname: String,
}

async fn sweep_stale(admin: &mut AsyncPgConnection, now: u64) {
    let Ok(names) = diesel::sql_query(
        "SELECT datname FROM pg_database WHERE datname LIKE 'patronus\\_test\\_%'",
    )
    .load::<DatabaseName>(admin)
    .await
    else {
        return;
    };
    for db in names {
        let created = db
            .datname
            .strip_prefix(TEST_DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|t| now.saturating_sub(t) > STALE_AFTER_S) {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {}", db.datname))
                .await;
        }
    }
}
