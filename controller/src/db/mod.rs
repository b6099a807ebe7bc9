//! PostgreSQL access: the connection pool, tenant-scoped transactions and migrations.
//!
//! Every query the application makes runs inside [`in_scope`], which opens a transaction and
//! sets the row-level-security keys (`patronus.tenant_id`, `patronus.msp_id`) before the first
//! statement. The pool connects as the application role, which cannot bypass RLS, so a query
//! that forgets a `WHERE tenant_id = ...` still sees only its own tenant's rows.

pub mod migrations;
pub mod schema;

use std::future::Future;
use std::pin::Pin;

use diesel::sql_types::{Nullable, Text};
use diesel_async::pooled_connection::deadpool::{BuildError, Pool, PoolError};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use patronus_proto::TenantId;
use uuid::Uuid;

pub type DbPool = Pool<AsyncPgConnection>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot build the database pool: {0}")]
    Build(#[from] BuildError),
    #[error("no database connection available: {0}")]
    Pool(#[from] PoolError),
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] diesel::ConnectionError),
    #[error("migration failed: {0}")]
    Migration(String),
}

/// Build the pool (no connection is made until first use).
///
/// Connections are recycled the fast way: no test query on every checkout (it cost one round
/// trip per request); a connection that broke is marked so by diesel and dropped, and the
/// request that hit it gets an error.
pub fn pool(url: &str, size: usize) -> Result<DbPool, DbError> {
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
    Ok(Pool::builder(manager).max_size(size).build()?)
}

/// Whose rows a transaction may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One tenant's rows.
    Tenant(TenantId),
    /// An MSP's own rows (its tenants, MSP operators) and, when given, one of its tenants.
    Msp { msp: Uuid, tenant: Option<TenantId> },
}

impl Scope {
    fn settings(self) -> (Option<String>, Option<String>) {
        match self {
            Scope::Tenant(t) => (Some(t.to_string()), None),
            Scope::Msp { msp, tenant } => (tenant.map(|t| t.to_string()), Some(msp.to_string())),
        }
    }
}

/// Set the RLS keys for the rest of the current transaction.
pub async fn set_scope(
    conn: &mut AsyncPgConnection,
    scope: Scope,
) -> Result<(), diesel::result::Error> {
    let (tenant, msp) = scope.settings();
    diesel::sql_query(
        "SELECT set_config('patronus.tenant_id', coalesce($1, ''), true), \
                set_config('patronus.msp_id', coalesce($2, ''), true)",
    )
    .bind::<Nullable<Text>, _>(tenant)
    .bind::<Nullable<Text>, _>(msp)
    .execute(conn)
    .await
    .map(|_| ())
}

/// The future a unit of work inside [`in_scope`] returns.
pub type ScopedWork<'r, T> = Pin<Box<dyn Future<Output = T> + Send + 'r>>;

/// Run `work` in one transaction scoped to `scope`. The transaction commits if `work` returns
/// `Ok` and rolls back otherwise.
pub async fn in_scope<T, E, F>(conn: &mut AsyncPgConnection, scope: Scope, work: F) -> Result<T, E>
where
    T: Send,
    E: From<diesel::result::Error> + Send,
    F: for<'r> FnOnce(&'r mut AsyncPgConnection) -> ScopedWork<'r, Result<T, E>> + Send,
{
    conn.transaction::<T, E, _>(async move |conn| {
        set_scope(conn, scope).await?;
        work(conn).await
    })
    .await
}
