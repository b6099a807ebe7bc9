//! The controller's NATS connections: one to its own `CONTROL` account, one to the system
//! account (to push account JWTs), and one per tenant account, opened on first use.
//!
//! A tenant's account is created the first time the controller needs it: its key derives from
//! the operator signing key ([`super::tenant_account_key`]), its JWT (limits, revoked site
//! users) is built from the database and pushed to the server's resolver, and the controller
//! connects with a user key it makes for itself and never writes anywhere.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use futures_util::StreamExt;
use nkeys::KeyPair;
use patronus_proto::{SiteId, TenantId};
use tokio::sync::{Mutex, OnceCell};

use super::bootstrap::{CONTROL_CREDS_FILE, OPERATOR_SIGNING_SEED_FILE, SYSTEM_CREDS_FILE};
use super::jwt::{self, AccountLimits, UserPermissions};
use crate::db::{self, schema::site_nats_users, DbPool, Scope};

/// Subject the resolver takes account JWT updates on.
const CLAIMS_UPDATE_SUBJECT: &str = "$SYS.REQ.CLAIMS.UPDATE";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("reading {path}: {detail}; run scripts/setup (or `patronus-controller nats init`)")]
    Credentials { path: String, detail: String },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("the NATS resolver refused the account JWT of tenant {tenant}: {detail}")]
    Resolver { tenant: TenantId, detail: String },
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
    #[error("database: {0}")]
    Db(#[from] db::DbError),
    #[error("intents bucket: {0}")]
    Bucket(String),
    #[error(transparent)]
    MetricsStream(#[from] crate::metrics_ingest::IngestError),
}

impl From<diesel::result::Error> for HubError {
    fn from(e: diesel::result::Error) -> Self {
        HubError::Db(db::DbError::Query(e))
    }
}

/// The controller's link into one tenant's account.
#[derive(Clone)]
pub struct TenantLink {
    pub client: async_nats::Client,
    pub intents: kv::Store,
}

pub struct NatsHub {
    url: String,
    control: async_nats::Client,
    system: async_nats::Client,
    operator_signing: Arc<KeyPair>,
    /// Raw seed of the operator signing key: tenant account keys derive from it.
    signing_seed: [u8; 32],
    tenants: Mutex<HashMap<TenantId, Arc<OnceCell<TenantLink>>>>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn read_secret_file(path: &Path) -> Result<String, HubError> {
    std::fs::read_to_string(path).map_err(|e| HubError::Credentials {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

async fn connect_with_creds(
    url: &str,
    creds_path: &Path,
    name: &str,
) -> Result<async_nats::Client, HubError> {
    let creds = read_secret_file(creds_path)?;
    async_nats::ConnectOptions::with_credentials(&creds)
        .map_err(|e| HubError::Credentials {
            path: creds_path.display().to_string(),
            detail: e.to_string(),
        })?
        .name(name)
        .retry_on_initial_connect()
        .connect(url)
        .await
        .map_err(|e| HubError::Nats(e.to_string()))
}

#[derive(Queryable)]
struct Revoked {
    public_key: String,
    revoked_at: chrono::DateTime<chrono::Utc>,
}

impl NatsHub {
    /// Connect the control and system links. Like every other client of the controller these
    /// keep retrying in the background, so a NATS outage at start does not stop the process.
    pub async fn connect(url: &str, credentials_dir: &Path) -> Result<Self, HubError> {
        let signing_path = credentials_dir.join(OPERATOR_SIGNING_SEED_FILE);
        let seed_text = read_secret_file(&signing_path)?;
        let not_a_seed = |e: nkeys::error::Error| HubError::Credentials {
            path: signing_path.display().to_string(),
            detail: format!("not an operator seed ({e})"),
        };
        let operator_signing = KeyPair::from_seed(seed_text.trim()).map_err(not_a_seed)?;
        let (_, signing_seed) = nkeys::decode_seed(seed_text.trim()).map_err(not_a_seed)?;
        let control = connect_with_creds(
            url,
            &credentials_dir.join(CONTROL_CREDS_FILE),
            "patronus-controller",
        )
        .await?;
        let system = connect_with_creds(
            url,
            &credentials_dir.join(SYSTEM_CREDS_FILE),
            "patronus-controller-system",
        )
        .await?;
        Ok(Self {
            url: url.to_owned(),
            control,
            system,
            operator_signing: Arc::new(operator_signing),
            signing_seed,
            tenants: Mutex::default(),
        })
    }

    /// The controller's own account: internal signals and the event fan-out.
    pub fn control(&self) -> &async_nats::Client {
        &self.control
    }

    /// The public key of a tenant's account.
    pub fn tenant_account(&self, tenant: TenantId) -> String {
        super::tenant_account_key(&self.signing_seed, tenant).public_key()
    }

    /// The link into a tenant's account, created (account pushed, connection opened, intents
    /// bucket opened, metrics stream ensured) on first use. Concurrent callers share one
    /// attempt; a failed attempt is retried by the next caller.
    pub async fn tenant(&self, pool: &DbPool, tenant: TenantId) -> Result<TenantLink, HubError> {
        let cell = self.tenants.lock().await.entry(tenant).or_default().clone();
        cell.get_or_try_init(|| self.open_tenant(pool, tenant))
            .await
            .cloned()
    }

    async fn open_tenant(&self, pool: &DbPool, tenant: TenantId) -> Result<TenantLink, HubError> {
        self.push_account(pool, tenant).await?;
        let client = self.connect_tenant(tenant).await?;
        let js = async_nats::jetstream::new(client.clone());
        let intents = crate::intents::publish::open_bucket(&js)
            .await
            .map_err(|e| HubError::Bucket(e.to_string()))?;
        crate::metrics_ingest::ensure_stream(&js, tenant).await?;
        tracing::info!(tenant = %tenant, account = %self.tenant_account(tenant), "tenant NATS account ready");
        Ok(TenantLink { client, intents })
    }

    /// Connect to a tenant's account as a controller user made for this connection.
    async fn connect_tenant(&self, tenant: TenantId) -> Result<async_nats::Client, HubError> {
        let account = super::tenant_account_key(&self.signing_seed, tenant);
        let user = Arc::new(KeyPair::new_user());
        let user_jwt = jwt::user(
            &account,
            &user.public_key(),
            "controller",
            &UserPermissions::default(),
            now_unix(),
            None,
        )?;
        async_nats::ConnectOptions::with_jwt(user_jwt, move |nonce| {
            let user = user.clone();
            async move { user.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .name("patronus-controller")
        .connect(self.url.as_str())
        .await
        .map_err(|e| HubError::Nats(format!("connecting to the account of tenant {tenant}: {e}")))
    }

    /// Build the tenant's account JWT from the database (limits, revoked site users) and push
    /// it to the resolver. Called on first use and after every revocation; the server closes
    /// revoked users' connections as soon as it has the new JWT.
    pub async fn push_account(&self, pool: &DbPool, tenant: TenantId) -> Result<(), HubError> {
        let mut conn = pool.get().await.map_err(db::DbError::from)?;
        let revoked: Vec<Revoked> = db::in_scope(&mut conn, Scope::Tenant(tenant), |conn| {
            Box::pin(async move {
                site_nats_users::table
                    .filter(site_nats_users::revoked_at.is_not_null())
                    .filter(site_nats_users::expires_at.gt(diesel::dsl::now))
                    .select((
                        site_nats_users::public_key,
                        site_nats_users::revoked_at.assume_not_null(),
                    ))
                    .load(conn)
                    .await
                    .map_err(db::DbError::from)
            })
        })
        .await?;
        drop(conn);
        let revocations: BTreeMap<String, i64> = revoked
            .into_iter()
            .map(|r| (r.public_key, r.revoked_at.timestamp()))
            .collect();
        self.push_account_jwt(tenant, &revocations).await
    }

    async fn push_account_jwt(
        &self,
        tenant: TenantId,
        revocations: &BTreeMap<String, i64>,
    ) -> Result<(), HubError> {
        let account = super::tenant_account_key(&self.signing_seed, tenant);
        let account_jwt = jwt::account(
            &self.operator_signing,
            &account.public_key(),
            &format!("tenant-{tenant}"),
            AccountLimits::TENANT,
            revocations,
            now_unix(),
        )?;
        let reply = self
            .system
            .request(CLAIMS_UPDATE_SUBJECT, account_jwt.into())
            .await
            .map_err(|e| HubError::Nats(format!("pushing the account of tenant {tenant}: {e}")))?;
        let answer: serde_json::Value =
            serde_json::from_slice(&reply.payload).map_err(|e| HubError::Resolver {
                tenant,
                detail: format!("unreadable answer: {e}"),
            })?;
        if let Some(error) = answer.get("error") {
            return Err(HubError::Resolver {
                tenant,
                detail: error.to_string(),
            });
        }
        tracing::debug!(tenant = %tenant, revoked = revocations.len(), "tenant account pushed");
        Ok(())
    }

    /// A NATS user JWT for one site: exactly [`patronus_proto::subjects::edge_permissions`],
    /// issued by the tenant's account, expiring at `expires_at` (unix seconds).
    pub fn site_user_jwt(
        &self,
        tenant: TenantId,
        site: SiteId,
        user_public_key: &str,
        expires_at: i64,
    ) -> Result<String, HubError> {
        let grant = patronus_proto::subjects::edge_permissions(tenant, site);
        let account = super::tenant_account_key(&self.signing_seed, tenant);
        Ok(jwt::user(
            &account,
            user_public_key,
            &format!("site-{site}"),
            &UserPermissions {
                publish: Some(grant.publish),
                subscribe: Some(grant.subscribe),
                allow_responses: true,
            },
            now_unix(),
            Some(expires_at),
        )?)
    }

    /// Forget a tenant's link (after its account changed in a way the connection must see, or
    /// when the tenant is deleted).
    pub async fn forget(&self, tenant: TenantId) {
        self.tenants.lock().await.remove(&tenant);
    }

    /// A deleted tenant: delete every stream of its account (intents, metrics), then push an
    /// account JWT that revokes every user issued so far, so no edge of it connects again.
    pub async fn purge_tenant(&self, tenant: TenantId) -> Result<(), HubError> {
        self.forget(tenant).await;
        // The account may never have been pushed to this server (a tenant that never used
        // NATS); make sure it exists so we can connect and clean up.
        self.push_account_jwt(tenant, &BTreeMap::new()).await?;
        let client = self.connect_tenant(tenant).await?;
        let js = async_nats::jetstream::new(client.clone());
        let mut names = js.stream_names();
        let mut streams = Vec::new();
        while let Some(name) = names.next().await {
            streams.push(name.map_err(|e| HubError::Nats(e.to_string()))?);
        }
        for name in streams {
            js.delete_stream(&name)
                .await
                .map_err(|e| HubError::Nats(format!("deleting stream {name}: {e}")))?;
        }
        drop(js);
        client.drain().await.ok();
        // Strictly after our own user's issue time, so it too is revoked.
        let revoke_all = BTreeMap::from([(jwt::REVOKE_ALL_USERS.to_owned(), now_unix() + 1)]);
        self.push_account_jwt(tenant, &revoke_all).await?;
        tracing::info!(tenant = %tenant, "tenant NATS account purged");
        Ok(())
    }
}
