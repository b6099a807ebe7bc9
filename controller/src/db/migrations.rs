//! The schema migrations in `migrations/`, embedded in the binary.
//!
//! They run as the owner role (the application role cannot create or alter tables) through
//! diesel's migration harness over an async connection. The harness blocks while it works, so
//! each call runs on a thread of its own with its own small runtime: callable from any async
//! context (the controller's multi-threaded runtime, actix's single-threaded test runtime).

use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::DbError;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

type Harness = AsyncMigrationHarness<AsyncPgConnection>;

/// Run `work` with a migration harness on a dedicated thread and runtime.
async fn with_harness<T, F>(owner_url: &str, work: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce(&mut Harness) -> Result<T, DbError> + Send + 'static,
{
    let url = owner_url.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("patronus-migrate".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| DbError::Migration(format!("cannot start a runtime: {e}")))
                .and_then(|rt| {
                    rt.block_on(async move {
                        let conn = AsyncPgConnection::establish(&url).await?;
                        let mut harness = AsyncMigrationHarness::new(conn);
                        tokio::task::block_in_place(|| work(&mut harness))
                    })
                });
            let _ = tx.send(result);
        })
        .map_err(|e| DbError::Migration(format!("cannot start the migration thread: {e}")))?;
    rx.await
        .map_err(|_| DbError::Migration("the migration thread died".into()))?
}

/// Apply every pending migration; returns the versions applied.
pub async fn run_pending(owner_url: &str) -> Result<Vec<String>, DbError> {
    with_harness(owner_url, |harness| {
        harness
            .run_pending_migrations(MIGRATIONS)
            .map(|applied| applied.iter().map(ToString::to_string).collect())
            .map_err(|e| DbError::Migration(e.to_string()))
    })
    .await
}

/// Revert every applied migration, newest first; returns the versions reverted.
pub async fn revert_all(owner_url: &str) -> Result<Vec<String>, DbError> {
    with_harness(owner_url, |harness| {
        harness
            .revert_all_migrations(MIGRATIONS)
            .map(|reverted| reverted.iter().map(ToString::to_string).collect())
            .map_err(|e| DbError::Migration(e.to_string()))
    })
    .await
}

/// Migrations not yet applied.
pub async fn pending(owner_url: &str) -> Result<Vec<String>, DbError> {
    with_harness(owner_url, |harness| {
        harness
            .pending_migrations(MIGRATIONS)
            .map(|pending| pending.iter().map(|m| m.name().to_string()).collect())
            .map_err(|e| DbError::Migration(e.to_string()))
    })
    .await
}
