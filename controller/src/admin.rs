//! First-run administration: create an MSP and its first admin (`patronus-controller admin
//! create`). Goes through the `patronus_bootstrap_msp` database function, the only way to create
//! an MSP without already being one of its admins.

use diesel::sql_types::{Text, Uuid as SqlUuid};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::auth::{self, AuthError};
use crate::db::{DbError, DbPool};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Password(#[from] AuthError),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("an MSP with that name or an operator with that e-mail already exists")]
    Exists,
    #[error("{0}")]
    Invalid(String),
}

#[derive(QueryableByName, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrapped {
    #[diesel(sql_type = SqlUuid)]
    pub msp_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub operator_id: Uuid,
}

/// Create an MSP and its first `msp_admin`.
pub async fn create_msp(
    pool: &DbPool,
    msp_name: &str,
    email: &str,
    password: &str,
) -> Result<Bootstrapped, AdminError> {
    if msp_name.trim().is_empty() || msp_name.len() > 128 {
        return Err(AdminError::Invalid("--msp must be 1-128 characters".into()));
    }
    if !email.contains('@') || email.len() > 254 || email.chars().any(char::is_whitespace) {
        return Err(AdminError::Invalid(
            "--email is not an e-mail address".into(),
        ));
    }
    let password = password.to_owned();
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| AdminError::Invalid(format!("hashing failed: {e}")))??;
    let mut conn = pool.get().await.map_err(DbError::from)?;
    diesel::sql_query("SELECT msp_id, operator_id FROM patronus_bootstrap_msp($1, $2, $3)")
        .bind::<Text, _>(msp_name)
        .bind::<Text, _>(email)
        .bind::<Text, _>(hash)
        .get_result(&mut conn)
        .await
        .map_err(|e| match e {
            diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            ) => AdminError::Exists,
            other => AdminError::Db(DbError::Query(other)),
        })
}
