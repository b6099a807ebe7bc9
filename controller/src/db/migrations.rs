//! The schema migrations in `migrations/`, embedded in the binary.
//!
//! They run as the owner role (the application role cannot create or alter tables) through
//! diesel's migration harness over an async connection. The harness blocks a runtime thread
//! while it works, so call these from a multi-threaded tokio runtime.

use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::DbError;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

async fn harness(owner_url: &str) -> Result<AsyncMigrationHarness<AsyncPgConnection>, DbError> {
    let conn = AsyncPgConnection::establish(owner_url).await?;
    Ok(AsyncMigrationHarness::new(conn))
}

/// Apply every pending migration; returns the versions applied.
pub async fn run_pending(owner_url: &str) -> Result<Vec<String>, DbError> {
    let mut harness = harness(owner_url).await?;
    let applied = harness
        .run_pending_migrations(MIGRATIONS)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(applied.iter().map(ToString::to_string).collect())
}

/// Revert every applied migration, newest first; returns the versions reverted.
pub async fn revert_all(owner_url: &str) -> Result<Vec<String>, DbError> {
    let mut harness = harness(owner_url).await?;
    let reverted = harness
        .revert_all_migrations(MIGRATIONS)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(reverted.iter().map(ToString::to_string).collect())
}

/// Migrations not yet applied.
pub async fn pending(owner_url: &str) -> Result<Vec<String>, DbError> {
    let mut harness = harness(owner_url).await?;
    let pending = harness
        .pending_migrations(MIGRATIONS)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(pending.iter().map(|m| m.name().to_string()).collect())
}
