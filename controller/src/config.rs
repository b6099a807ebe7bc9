//! The controller's configuration: defaults, then a TOML file, then `PATRONUS_*` environment
//! variables, then command-line flags; validated once at start with a message that says which
//! setting is wrong and how to fix it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Every setting of the controller.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub nats: NatsConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub intents: IntentsConfig,
    pub metrics: MetricsConfig,
    pub provisioning: ProvisioningConfig,
}

/// Enrollment tokens and the tenants' certificate authorities.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisioningConfig {
    /// Base64 of a 32-byte Ed25519 seed that signs enrollment tokens (EdDSA); every replica
    /// must share it.
    pub token_signing_key: Secret,
    /// Base64 of 32 random bytes sealing tenant CA private keys at rest.
    pub master_key: Secret,
    /// Default lifetime of an enrollment token.
    pub token_ttl_s: u64,
    /// Lifetime of a site certificate (and of the site's NATS credentials).
    pub certificate_lifetime_days: u32,
    /// Lifetime of a tenant CA.
    pub ca_lifetime_days: u32,
    /// A WireGuard key rotation commits once every peer of the site applied the announcement,
    /// or this long after it was announced (a peer that is offline then gets the committed
    /// intent when it returns).
    pub wireguard_commit_timeout_s: u64,
    /// Least time between two rotations of one site's WireGuard key (counted from the last
    /// commit); a site asking sooner is answered 429.
    pub wireguard_rotation_min_interval_s: u64,
    /// The controller's URL as edges reach it (`http(s)://host:port`), written into the
    /// enrollment command the API and the portal show. Unset: the address the operator's
    /// request came to (right behind a proxy with the public name; wrong when the operator
    /// reaches the controller on another address than the edges do).
    pub edge_url: Option<String>,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            token_signing_key: Secret::default(),
            master_key: Secret::default(),
            token_ttl_s: 3600,
            certificate_lifetime_days: 90,
            ca_lifetime_days: 3650,
            wireguard_commit_timeout_s: 86_400,
            wireguard_rotation_min_interval_s: 3600,
            edge_url: None,
        }
    }
}

/// Decode a base64 secret setting of exactly 32 bytes.
pub fn secret_bytes_32(secret: &Secret) -> Option<[u8; 32]> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, secret.0.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
}

/// Path-metrics ingest and storage.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Days of raw path-metrics history kept; older daily partitions are dropped.
    pub retention_days: u32,
    /// Daily partitions created ahead of time.
    pub partitions_ahead_days: u32,
    /// Days of one-minute rollups (`path_metrics_1m`) kept.
    pub rollup_retention_days: u32,
    /// Most samples written to PostgreSQL in one transaction (samples of many edge batches).
    pub write_batch_samples: usize,
    /// How long the ingest waits for more messages before writing what it has.
    pub write_linger_ms: u64,
    /// Writes of one tenant's metrics one replica runs at once (gathering the next while
    /// earlier ones are in the database).
    pub write_concurrency: usize,
    /// Messages one tenant's consumer may have delivered and not yet acknowledged, across
    /// every replica.
    pub max_ack_pending: i64,
    /// Delay before a message whose write failed (database unreachable) is delivered again.
    pub retry_delay_ms: u64,
    /// Lifetime of a path's latest state in Redis; the tenant's hash expires when no sample
    /// arrived for this long, and the API ignores a state older than this.
    pub latest_state_ttl_s: u64,
    /// At most one `path_metrics` WebSocket event per path per this interval (per replica).
    pub event_interval_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            retention_days: 30,
            partitions_ahead_days: 7,
            rollup_retention_days: 400,
            write_batch_samples: 10_000,
            write_linger_ms: 20,
            write_concurrency: 2,
            max_ack_pending: 4_000,
            retry_delay_ms: 2_000,
            latest_state_ttl_s: 300,
            event_interval_ms: 1_000,
        }
    }
}

/// The intent publisher.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntentsConfig {
    /// Base64 of at least 32 random bytes: probe HMAC keys of site pairs derive from it.
    pub probe_secret: Secret,
    /// Changes within this window give one publish.
    pub debounce_ms: u64,
    /// Every tenant is republished (a no-op when unchanged) this often.
    pub reconcile_interval_s: u64,
    /// Lifetime of the publisher lease; another replica takes over within it.
    pub lease_ttl_ms: u64,
}

impl Default for IntentsConfig {
    fn default() -> Self {
        Self {
            probe_secret: Secret::default(),
            debounce_ms: 100,
            reconcile_interval_s: 60,
            lease_ttl_ms: 5000,
        }
    }
}

/// A secret setting: never printed by `Debug`.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(<unset>)"
        } else {
            "Secret(<redacted>)"
        })
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Base64 of at least 32 random bytes; every replica must share it.
    pub session_secret: Secret,
    /// Lifetime of a session token.
    pub session_ttl_s: u64,
    /// Lifetime of a refresh token (each use replaces it).
    pub refresh_ttl_s: u64,
    /// Login attempts per minute from one source address.
    pub login_per_minute_per_source: u32,
    /// Login attempts per minute for one account.
    pub login_per_minute_per_account: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            session_secret: Secret::default(),
            session_ttl_s: 900,
            refresh_ttl_s: 7 * 24 * 3600,
            login_per_minute_per_source: 30,
            login_per_minute_per_account: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Seconds in-flight requests get to finish on shutdown.
    pub shutdown_grace_s: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// The application role (not the table owner; row-level security applies).
    pub url: String,
    /// The owner role, used only to run migrations.
    pub owner_url: Option<String>,
    /// Connections of the shared pool, which background work uses (intent publishing,
    /// ingest, leases); opened on demand.
    pub pool_size: usize,
    /// Connections each HTTP worker keeps for the requests it serves, opened at start (see
    /// `AppState::for_worker`). A replica holds at most
    /// `pool_size + workers × worker_pool_size` connections.
    pub worker_pool_size: usize,
    /// Run pending migrations at start (needs `owner_url`).
    pub migrate_on_start: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    /// What `patronus-controller nats init` wrote: the operator signing key, the system and
    /// control users' credentials.
    pub credentials_dir: PathBuf,
    /// The URL edges are told to connect to at enrollment (defaults to `url`).
    pub edge_url: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info,patronus_controller=debug`.
    pub filter: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_grace_s: 10,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            owner_url: None,
            pool_size: 16,
            worker_pool_size: 8,
            migrate_on_start: false,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            credentials_dir: PathBuf::from("/var/lib/patronus/nats/credentials"),
            edge_url: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// What went wrong loading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("environment variable {name}: {detail}")]
    Env { name: &'static str, detail: String },
    #[error("setting {setting}: {detail}")]
    Invalid {
        setting: &'static str,
        detail: String,
    },
}

/// Overrides given on the command line (highest precedence).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub migrate_on_start: Option<bool>,
}

/// Reads one environment variable through a lookup function (so tests need not touch the
/// process environment).
type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl ControllerConfig {
    /// Load from an optional file, the process environment and flags, then validate.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_with_env(file, overrides, &|name| std::env::var(name).ok())
    }

    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: EnvLookup<'_>,
    ) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_toml(&text).map_err(|detail| ConfigError::Parse {
                    path: path.to_owned(),
                    detail,
                })?
            }
            None => Self::default(),
        };
        config.apply_env(env)?;
        if let Some(listen) = overrides.listen {
            config.http.listen = listen;
        }
        if let Some(migrate) = overrides.migrate_on_start {
            config.database.migrate_on_start = migrate;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn apply_env(&mut self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        if let Some(v) = env("PATRONUS_HTTP_LISTEN") {
            self.http.listen = v.parse().map_err(|_| ConfigError::Env {
                name: "PATRONUS_HTTP_LISTEN",
                detail: format!("{v:?} is not an address like 127.0.0.1:8080"),
            })?;
        }
        if let Some(v) = env("PATRONUS_DATABASE_URL") {
            self.database.url = v;
        }
        if let Some(v) = env("PATRONUS_DATABASE_OWNER_URL") {
            self.database.owner_url = Some(v);
        }
        if let Some(v) = env("PATRONUS_REDIS_URL") {
            self.redis.url = v;
        }
        if let Some(v) = env("PATRONUS_NATS_URL") {
            self.nats.url = v;
        }
        if let Some(v) = env("PATRONUS_NATS_CREDENTIALS_DIR") {
            self.nats.credentials_dir = PathBuf::from(v);
        }
        if let Some(v) = env("PATRONUS_NATS_EDGE_URL") {
            self.nats.edge_url = Some(v);
        }
        if let Some(v) = env("PATRONUS_PROVISIONING_EDGE_URL") {
            self.provisioning.edge_url = Some(v);
        }
        if let Some(v) = env("PATRONUS_TOKEN_SIGNING_KEY") {
            self.provisioning.token_signing_key = Secret(v);
        }
        if let Some(v) = env("PATRONUS_MASTER_KEY") {
            self.provisioning.master_key = Secret(v);
        }
        if let Some(v) = env("PATRONUS_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        name: "PATRONUS_LOG_FORMAT",
                        detail: format!("{v:?} is not text or json"),
                    })
                }
            };
        }
        if let Some(v) = env("PATRONUS_LOG") {
            self.log.filter = v;
        }
        if let Some(v) = env("PATRONUS_SESSION_SECRET") {
            self.auth.session_secret = Secret(v);
        }
        if let Some(v) = env("PATRONUS_PROBE_SECRET") {
            self.intents.probe_secret = Secret(v);
        }
        Ok(())
    }

    /// Check every setting; the error names the setting and what to do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, detail: String| ConfigError::Invalid { setting, detail };
        if self.database.url.is_empty() {
            return Err(invalid(
                "database.url",
                "not set; set PATRONUS_DATABASE_URL (scripts/setup writes it to /var/lib/patronus/patronus.env)".into(),
            ));
        }
        check_scheme(
            "database.url",
            &self.database.url,
            &["postgres", "postgresql"],
        )?;
        if let Some(owner) = &self.database.owner_url {
            check_scheme("database.owner_url", owner, &["postgres", "postgresql"])?;
        }
        if self.database.migrate_on_start && self.database.owner_url.is_none() {
            return Err(invalid(
                "database.migrate_on_start",
                "needs database.owner_url (PATRONUS_DATABASE_OWNER_URL): migrations run as the owner role".into(),
            ));
        }
        for (setting, size) in [
            ("database.pool_size", self.database.pool_size),
            ("database.worker_pool_size", self.database.worker_pool_size),
        ] {
            if !(1..=512).contains(&size) {
                return Err(invalid(setting, format!("{size} is outside 1-512")));
            }
        }
        check_scheme("redis.url", &self.redis.url, &["redis", "rediss"])?;
        check_scheme("nats.url", &self.nats.url, &["nats", "tls"])?;
        if let Some(edge_url) = &self.nats.edge_url {
            check_scheme("nats.edge_url", edge_url, &["nats", "tls"])?;
        }
        if let Some(edge_url) = &self.provisioning.edge_url {
            check_scheme("provisioning.edge_url", edge_url, &["http", "https"])?;
        }
        if self.http.shutdown_grace_s > 300 {
            return Err(invalid(
                "http.shutdown_grace_s",
                "at most 300 seconds".into(),
            ));
        }
        if self.auth.session_secret.0.is_empty() {
            return Err(invalid(
                "auth.session_secret",
                "not set; set PATRONUS_SESSION_SECRET to base64 of 32 random bytes (scripts/setup generates one)".into(),
            ));
        }
        crate::auth::SessionKeys::from_base64(&self.auth.session_secret.0)
            .map_err(|e| invalid("auth.session_secret", e.to_string()))?;
        if !(60..=86_400).contains(&self.auth.session_ttl_s) {
            return Err(invalid(
                "auth.session_ttl_s",
                "must be 60-86400 seconds".into(),
            ));
        }
        if !(300..=90 * 86_400).contains(&self.auth.refresh_ttl_s) {
            return Err(invalid(
                "auth.refresh_ttl_s",
                "must be 300 s to 90 days".into(),
            ));
        }
        if self.auth.login_per_minute_per_source == 0 || self.auth.login_per_minute_per_account == 0
        {
            return Err(invalid(
                "auth.login_per_minute_*",
                "must be at least 1".into(),
            ));
        }
        let probe = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            self.intents.probe_secret.0.trim(),
        )
        .unwrap_or_default();
        if probe.len() < 32 {
            return Err(invalid(
                "intents.probe_secret",
                "not set or under 32 bytes; set PATRONUS_PROBE_SECRET to base64 of 32 random bytes (scripts/setup generates one)".into(),
            ));
        }
        if !(10..=10_000).contains(&self.intents.debounce_ms) {
            return Err(invalid("intents.debounce_ms", "must be 10-10000".into()));
        }
        if !(5..=3600).contains(&self.intents.reconcile_interval_s) {
            return Err(invalid(
                "intents.reconcile_interval_s",
                "must be 5-3600".into(),
            ));
        }
        if !(1..=3650).contains(&self.metrics.retention_days) {
            return Err(invalid("metrics.retention_days", "must be 1-3650".into()));
        }
        if !(1..=60).contains(&self.metrics.partitions_ahead_days) {
            return Err(invalid(
                "metrics.partitions_ahead_days",
                "must be 1-60".into(),
            ));
        }
        if !(1..=3650).contains(&self.metrics.rollup_retention_days) {
            return Err(invalid(
                "metrics.rollup_retention_days",
                "must be 1-3650".into(),
            ));
        }
        if !(1..=100_000).contains(&self.metrics.write_batch_samples) {
            return Err(invalid(
                "metrics.write_batch_samples",
                "must be 1-100000".into(),
            ));
        }
        if self.metrics.write_linger_ms > 5_000 {
            return Err(invalid(
                "metrics.write_linger_ms",
                "must be at most 5000".into(),
            ));
        }
        if !(1..=16).contains(&self.metrics.write_concurrency) {
            return Err(invalid("metrics.write_concurrency", "must be 1-16".into()));
        }
        if !(1..=1_000_000).contains(&self.metrics.max_ack_pending) {
            return Err(invalid(
                "metrics.max_ack_pending",
                "must be 1-1000000".into(),
            ));
        }
        if !(10..=600_000).contains(&self.metrics.retry_delay_ms) {
            return Err(invalid(
                "metrics.retry_delay_ms",
                "must be 10-600000".into(),
            ));
        }
        if !(10..=86_400).contains(&self.metrics.latest_state_ttl_s) {
            return Err(invalid(
                "metrics.latest_state_ttl_s",
                "must be 10-86400".into(),
            ));
        }
        if !(10..=3_600_000).contains(&self.metrics.event_interval_ms) {
            return Err(invalid(
                "metrics.event_interval_ms",
                "must be 10-3600000".into(),
            ));
        }
        if !(500..=60_000).contains(&self.intents.lease_ttl_ms) {
            return Err(invalid("intents.lease_ttl_ms", "must be 500-60000".into()));
        }
        if secret_bytes_32(&self.provisioning.token_signing_key).is_none() {
            return Err(invalid(
                "provisioning.token_signing_key",
                "not set or not base64 of 32 bytes; set PATRONUS_TOKEN_SIGNING_KEY (scripts/setup generates one)".into(),
            ));
        }
        if secret_bytes_32(&self.provisioning.master_key).is_none() {
            return Err(invalid(
                "provisioning.master_key",
                "not set or not base64 of 32 bytes; set PATRONUS_MASTER_KEY (scripts/setup generates one)".into(),
            ));
        }
        if !(60..=7 * 86_400).contains(&self.provisioning.token_ttl_s) {
            return Err(invalid(
                "provisioning.token_ttl_s",
                "must be 60 s to 7 days".into(),
            ));
        }
        if !(1..=825).contains(&self.provisioning.certificate_lifetime_days) {
            return Err(invalid(
                "provisioning.certificate_lifetime_days",
                "must be 1-825".into(),
            ));
        }
        if !(365..=36_500).contains(&self.provisioning.ca_lifetime_days)
            || self.provisioning.ca_lifetime_days <= self.provisioning.certificate_lifetime_days
        {
            return Err(invalid(
                "provisioning.ca_lifetime_days",
                "must be 365-36500 and longer than certificate_lifetime_days".into(),
            ));
        }
        if !(10..=30 * 86_400).contains(&self.provisioning.wireguard_commit_timeout_s) {
            return Err(invalid(
                "provisioning.wireguard_commit_timeout_s",
                "must be 10 s to 30 days".into(),
            ));
        }
        if self.provisioning.wireguard_rotation_min_interval_s > 30 * 86_400 {
            return Err(invalid(
                "provisioning.wireguard_rotation_min_interval_s",
                "at most 30 days".into(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter).map_err(|e| {
            invalid(
                "log.filter",
                format!("{:?} is not a tracing filter: {e}", self.log.filter),
            )
        })?;
        Ok(())
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.http.shutdown_grace_s)
    }
}

fn check_scheme(setting: &'static str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if schemes.contains(&s) => Ok(()),
        _ => Err(ConfigError::Invalid {
            setting,
            detail: format!("{} is not a {} URL", redact_url(url), schemes.join(" or ")),
        }),
    }
}

/// A URL with its password replaced, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparseable url>".into();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => format!("{scheme}://{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    const DB: (&str, &str) = (
        "PATRONUS_DATABASE_URL",
        "postgres://app:pw@127.0.0.1/patronus",
    );
    const SECRET: (&str, &str) = (
        "PATRONUS_SESSION_SECRET",
        "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
    );
    const PROBE: (&str, &str) = (
        "PATRONUS_PROBE_SECRET",
        "CAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAg=",
    );
    const TOKEN_KEY: (&str, &str) = (
        "PATRONUS_TOKEN_SIGNING_KEY",
        "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=",
    );
    const MASTER: (&str, &str) = (
        "PATRONUS_MASTER_KEY",
        "CgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgo=",
    );

    #[test]
    fn environment_overrides_defaults_and_flags_override_environment() {
        let overrides = Overrides {
            listen: Some("127.0.0.1:9999".parse().unwrap()),
            migrate_on_start: None,
        };
        let config = ControllerConfig::load_with_env(
            None,
            &overrides,
            &env(&[
                DB,
                SECRET,
                PROBE,
                TOKEN_KEY,
                MASTER,
                ("PATRONUS_HTTP_LISTEN", "127.0.0.1:7000"),
                ("PATRONUS_NATS_URL", "nats://127.0.0.1:4333"),
            ]),
        )
        .unwrap();
        assert_eq!(config.http.listen.port(), 9999);
        assert_eq!(config.nats.url, "nats://127.0.0.1:4333");
    }

    #[test]
    fn missing_database_url_says_where_to_get_it() {
        let err =
            ControllerConfig::load_with_env(None, &Overrides::default(), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("PATRONUS_DATABASE_URL"), "{err}");
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let err =
            ControllerConfig::from_toml("[http]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 1\n")
                .unwrap_err();
        assert!(err.contains("listen_typo"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            ("PATRONUS_REDIS_URL", "http://x", "redis.url"),
            ("PATRONUS_NATS_URL", "localhost:4222", "nats.url"),
            ("PATRONUS_LOG", "[[[", "log.filter"),
        ];
        for (name, value, setting) in cases {
            let err = ControllerConfig::load_with_env(
                None,
                &Overrides::default(),
                &env(&[DB, SECRET, PROBE, TOKEN_KEY, MASTER, (name, value)]),
            )
            .unwrap_err();
            assert!(err.to_string().contains(setting), "{err}");
        }
        let err = ControllerConfig::load_with_env(
            None,
            &Overrides::default(),
            &env(&[
                DB,
                SECRET,
                PROBE,
                TOKEN_KEY,
                MASTER,
                ("PATRONUS_HTTP_LISTEN", "nope"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("PATRONUS_HTTP_LISTEN"));
    }

    #[test]
    fn migrate_on_start_needs_the_owner_url() {
        let overrides = Overrides {
            listen: None,
            migrate_on_start: Some(true),
        };
        let err = ControllerConfig::load_with_env(
            None,
            &overrides,
            &env(&[DB, SECRET, PROBE, TOKEN_KEY, MASTER]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("owner_url"));
    }

    #[test]
    fn session_secret_is_required_strong_and_never_printed() {
        let err =
            ControllerConfig::load_with_env(None, &Overrides::default(), &env(&[DB])).unwrap_err();
        assert!(err.to_string().contains("PATRONUS_SESSION_SECRET"), "{err}");
        let weak = ControllerConfig::load_with_env(
            None,
            &Overrides::default(),
            &env(&[DB, ("PATRONUS_SESSION_SECRET", "c2hvcnQ=")]),
        )
        .unwrap_err();
        assert!(weak.to_string().contains("auth.session_secret"), "{weak}");
        let config = ControllerConfig::load_with_env(
            None,
            &Overrides::default(),
            &env(&[DB, SECRET, PROBE, TOKEN_KEY, MASTER]),
        )
        .unwrap();
        assert!(!format!("{config:?}").contains(SECRET.1));
    }

    #[test]
    fn provisioning_keys_are_required() {
        let err = ControllerConfig::load_with_env(
            None,
            &Overrides::default(),
            &env(&[DB, SECRET, PROBE, TOKEN_KEY]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("PATRONUS_MASTER_KEY"), "{err}");
        let err = ControllerConfig::load_with_env(
            None,
            &Overrides::default(),
            &env(&[
                DB,
                SECRET,
                PROBE,
                MASTER,
                ("PATRONUS_TOKEN_SIGNING_KEY", "c2hvcnQ="),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("token_signing_key"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:secret@127.0.0.1:5432/patronus"),
            "postgres://app:***@127.0.0.1:5432/patronus"
        );
        assert_eq!(
            redact_url("redis://:secret@127.0.0.1/0"),
            "redis://:***@127.0.0.1/0"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        let err =
            check_scheme("database.url", "mysql://root:hunter2@db/x", &["postgres"]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
