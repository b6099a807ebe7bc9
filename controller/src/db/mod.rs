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

use diesel::connection::TransactionDepthChange;
use diesel_async::pooled_connection::deadpool::{BuildError, Pool, PoolError};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, TransactionManager};
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

/// The tables most requests read or write, whose catalog entries [`prime`] loads.
const PRIMED_TABLES: &str = "sites, endpoints, paths, policies, audit_log, site_intents";

/// Load a new connection's catalog caches for the tables requests use most (definitions,
/// indexes, row-level-security policies). A PostgreSQL backend fills them on its first query
/// of each table, 10-30 ms that would otherwise fall on the first requests after a start.
/// Reads nothing (`LIMIT 0`, no tenant in scope).
pub async fn prime(conn: &mut AsyncPgConnection) -> Result<(), DbError> {
    use diesel_async::SimpleAsyncConnection;
    conn.batch_execute(&format!("SELECT 1 FROM {PRIMED_TABLES} LIMIT 0"))
        .await?;
    Ok(())
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
    /// The RLS keys as `(tenant, msp)` UUID texts (empty where not given).
    fn settings(self) -> (String, String) {
        let text = |id: Option<Uuid>| id.map(|id| id.hyphenated().to_string()).unwrap_or_default();
        match self {
            Scope::Tenant(t) => (text(Some(t.0)), String::new()),
            Scope::Msp { msp, tenant } => (text(tenant.map(|t| t.0)), text(Some(msp))),
        }
    }

    /// `BEGIN` and the RLS keys for the transaction, as one simple-query batch (sent ahead of
    /// the transaction's first statement by [`in_scope`]). The values are formatted UUIDs
    /// (hex digits and hyphens) or empty, so nothing from outside is interpolated.
    fn begin_sql(self, access: Access) -> String {
        let (tenant, msp) = self.settings();
        let begin = match access {
            Access::ReadWrite => "BEGIN",
            Access::ReadOnly => "BEGIN READ ONLY",
        };
        format!(
            "{begin}; SELECT set_config('patronus.tenant_id', '{tenant}', true), \
             set_config('patronus.msp_id', '{msp}', true)"
        )
    }
}

/// What a scoped transaction may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    ReadWrite,
    /// PostgreSQL refuses any write (`BEGIN READ ONLY`).
    ReadOnly,
}

/// The future a unit of work inside [`in_scope`] returns.
pub type ScopedWork<'r, T> = Pin<Box<dyn Future<Output = T> + Send + 'r>>;

/// Run `work` in one transaction scoped to `scope`. The transaction commits if `work` returns
/// `Ok` and rolls back otherwise.
///
/// The `BEGIN` (with the scope) is sent without waiting for its answer, so it travels with
/// the work's first statement: one round trip less on every scoped transaction. Its answer is
/// not read; if it failed, the transaction is aborted and the work's first statement fails
/// ("current transaction is aborted"), so nothing ever runs unscoped. The connection counts as
/// inside a transaction from then on: if this future is dropped before the end (a request
/// cancelled), the pool sees the open transaction and discards the connection.
pub async fn in_scope<T, E, F>(conn: &mut AsyncPgConnection, scope: Scope, work: F) -> Result<T, E>
where
    T: Send,
    E: From<diesel::result::Error> + Send,
    F: for<'r> FnOnce(&'r mut AsyncPgConnection) -> ScopedWork<'r, Result<T, E>> + Send,
{
    send_begin(conn, scope, Access::ReadWrite)?;
    match work(conn).await {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(conn).await?;
            Ok(value)
        }
        Err(error) => Err(rolled_back(conn, error).await),
    }
}

/// Run read-only `work` in one transaction scoped to `scope`, as [`in_scope`] does, except
/// that PostgreSQL refuses any write in it (`BEGIN READ ONLY`) and, when `work` succeeds, the
/// `COMMIT` is sent without waiting for its answer: a read-only transaction has nothing to
/// make durable, and the connection's next statements queue behind it, so the caller answers
/// a round trip sooner. On an error the transaction is rolled back as usual.
pub async fn read_in_scope<T, E, F>(
    conn: &mut AsyncPgConnection,
    scope: Scope,
    work: F,
) -> Result<T, E>
where
    T: Send,
    E: From<diesel::result::Error> + Send,
    F: for<'r> FnOnce(&'r mut AsyncPgConnection) -> ScopedWork<'r, Result<T, E>> + Send,
{
    send_begin(conn, scope, Access::ReadOnly)?;
    match work(conn).await {
        Ok(value) => {
            send_without_waiting(conn, "COMMIT")?;
            record_depth(conn, TransactionDepthChange::DecreaseDepth)?;
            Ok(value)
        }
        Err(error) => Err(rolled_back(conn, error).await),
    }
}

/// Roll the transaction back after `work` failed with `error`; the error to report (the
/// rollback's own, if that failed otherwise than on an already broken connection).
async fn rolled_back<E: From<diesel::result::Error>>(conn: &mut AsyncPgConnection, error: E) -> E {
    match AnsiTransactionManager::rollback_transaction(conn).await {
        Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => error,
        Err(rollback) => rollback.into(),
    }
}

/// Put a simple-query batch on the wire without waiting for its answer, which is dropped
/// unread (tokio-postgres sends a request when its future is first polled and keeps reading
/// the answers of requests nobody waits for).
fn send_without_waiting(conn: &AsyncPgConnection, sql: &str) -> diesel::QueryResult<()> {
    use diesel_async::SimpleAsyncConnection;
    use futures_util::FutureExt;
    let mut shared: &AsyncPgConnection = conn;
    match SimpleAsyncConnection::batch_execute(&mut shared, sql).now_or_never() {
        Some(Err(e)) => Err(e),
        Some(Ok(())) | None => Ok(()),
    }
}

/// Send `BEGIN` and the scope's RLS keys (one simple-query batch) and record the transaction
/// as open, without waiting for the server.
fn send_begin(
    conn: &mut AsyncPgConnection,
    scope: Scope,
    access: Access,
) -> diesel::QueryResult<()> {
    let status = AnsiTransactionManager::transaction_manager_status_mut(conn);
    if status.transaction_depth()?.is_some() {
        return Err(diesel::result::Error::AlreadyInTransaction);
    }
    // Pipelined ahead of whatever comes next on the connection.
    send_without_waiting(conn, &scope.begin_sql(access))?;
    record_depth(conn, TransactionDepthChange::IncreaseDepth)
}

/// Tell diesel-async's transaction manager about a BEGIN or COMMIT sent without it, so it
/// knows whether the connection is inside a transaction (the pool discards one that is).
fn record_depth(
    conn: &mut AsyncPgConnection,
    change: TransactionDepthChange,
) -> diesel::QueryResult<()> {
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_state()?
        .change_transaction_depth(change)
}
