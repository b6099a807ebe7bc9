//! `patronus-controller nats init`: create the operator, the system account and the
//! controller's own account, and write what nats-server and the controller need.
//!
//! Files in the credentials directory (all `0600` but `auth.conf`):
//! - `operator.nk`: the operator's identity seed. Only needed to re-sign the operator JWT;
//!   an operator can move it offline.
//! - `operator-signing.nk`: the operator signing key the controller signs tenant accounts with
//!   (and derives their keys from, see [`super::keys`]).
//! - `system.creds`: a system-account user; the controller pushes account JWTs with it.
//! - `control.creds`: the controller's user in the `CONTROL` account (internal signals, the
//!   event fan-out between replicas).
//! - `auth.conf`: included by nats.conf: operator JWT, system account, the full resolver and
//!   the two preloaded accounts.
//!
//! Idempotent: existing seeds are kept, so running it again changes nothing that edges or the
//! controller already hold.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use nkeys::{KeyPair, KeyPairType};

use super::jwt::{self, AccountLimits, UserPermissions};

pub const OPERATOR_SEED_FILE: &str = "operator.nk";
pub const OPERATOR_SIGNING_SEED_FILE: &str = "operator-signing.nk";
pub const SYSTEM_CREDS_FILE: &str = "system.creds";
pub const CONTROL_CREDS_FILE: &str = "control.creds";
pub const AUTH_CONF_FILE: &str = "auth.conf";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not hold a valid {expected} seed")]
    BadSeed {
        path: PathBuf,
        expected: &'static str,
    },
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
}

/// What `init` did, for the one-line report.
#[derive(Debug, PartialEq, Eq)]
pub struct InitReport {
    pub created_keys: bool,
    pub operator: String,
    pub system_account: String,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError + '_ {
    move |source| BootstrapError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Write `contents` to `path` atomically (temp file, fsync, rename) with the given mode.
pub fn write_private(path: &Path, contents: &[u8], mode: u32) -> Result<(), BootstrapError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(contents).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Load the seed in `path`, or create one of `kind` there.
fn load_or_create(
    path: &Path,
    kind: KeyPairType,
    expected: &'static str,
) -> Result<(KeyPair, bool), BootstrapError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = KeyPair::from_seed(text.trim()).map_err(|_| BootstrapError::BadSeed {
                path: path.to_owned(),
                expected,
            })?;
            if key.key_pair_type() != kind {
                return Err(BootstrapError::BadSeed {
                    path: path.to_owned(),
                    expected,
                });
            }
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::new(kind);
            let seed = key.seed().map_err(|_| BootstrapError::BadSeed {
                path: path.to_owned(),
                expected,
            })?;
            write_private(path, format!("{seed}\n").as_bytes(), 0o600)?;
            Ok((key, true))
        }
        Err(source) => Err(BootstrapError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Create (or complete) the credentials directory `dir`, with `accounts_dir` as the full
/// resolver's store.
pub fn init(dir: &Path, accounts_dir: &Path, now: i64) -> Result<InitReport, BootstrapError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    std::fs::create_dir_all(accounts_dir).map_err(io_error(accounts_dir))?;
    let (operator, new_operator) = load_or_create(
        &dir.join(OPERATOR_SEED_FILE),
        KeyPairType::Operator,
        "operator",
    )?;
    let (signing, new_signing) = load_or_create(
        &dir.join(OPERATOR_SIGNING_SEED_FILE),
        KeyPairType::Operator,
        "operator signing",
    )?;
    let (system, new_system) = load_or_create(
        &dir.join("system-account.nk"),
        KeyPairType::Account,
        "account",
    )?;
    let (control, new_control) = load_or_create(
        &dir.join("control-account.nk"),
        KeyPairType::Account,
        "account",
    )?;

    let operator_jwt = jwt::operator(
        &operator,
        &signing.public_key(),
        &system.public_key(),
        "patronus",
        now,
    )?;
    let no_revocations = BTreeMap::new();
    let system_jwt = jwt::account(
        &signing,
        &system.public_key(),
        "SYS",
        AccountLimits::SYSTEM,
        &no_revocations,
        now,
    )?;
    let control_jwt = jwt::account(
        &signing,
        &control.public_key(),
        "CONTROL",
        AccountLimits::TENANT,
        &no_revocations,
        now,
    )?;
    write_user_creds(
        &dir.join(SYSTEM_CREDS_FILE),
        &system,
        "controller-system",
        now,
    )?;
    write_user_creds(&dir.join(CONTROL_CREDS_FILE), &control, "controller", now)?;

    let conf = format!(
        "# Generated by `patronus-controller nats init`; do not edit.\n\
         operator: {operator_jwt}\n\
         system_account: {system}\n\
         resolver: {{\n  type: full\n  dir: \"{accounts}\"\n  allow_delete: true\n  interval: \"2m\"\n}}\n\
         resolver_preload: {{\n  {system}: {system_jwt}\n  {control}: {control_jwt}\n}}\n",
        system = system.public_key(),
        control = control.public_key(),
        accounts = accounts_dir.display(),
    );
    let created_keys = new_operator || new_signing || new_system || new_control;
    // Rewritten only when a key is new, so a second run leaves nats.conf's include unchanged
    // (setup restarts the server when its configuration changes).
    let auth_conf = dir.join(AUTH_CONF_FILE);
    if created_keys || !auth_conf.exists() {
        write_private(&auth_conf, conf.as_bytes(), 0o600)?;
    }
    Ok(InitReport {
        created_keys,
        operator: operator.public_key(),
        system_account: system.public_key(),
    })
}

/// A user of `account` with no restrictions, as a creds file. The user key is new each time
/// (old creds stay valid: nothing revokes them).
fn write_user_creds(
    path: &Path,
    account: &KeyPair,
    name: &str,
    now: i64,
) -> Result<(), BootstrapError> {
    if path.exists() {
        return Ok(());
    }
    let user = KeyPair::new_user();
    let jwt = jwt::user(
        account,
        &user.public_key(),
        name,
        &UserPermissions::default(),
        now,
        None,
    )?;
    let seed = user.seed().map_err(|_| BootstrapError::BadSeed {
        path: path.to_owned(),
        expected: "user",
    })?;
    write_private(path, jwt::creds_file(&jwt, &seed).as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_is_idempotent_and_private() {
        let dir = std::env::temp_dir().join(format!("patronus-nats-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = init(&dir, &dir.join("accounts"), 100).unwrap();
        assert!(first.created_keys);
        let creds = std::fs::read_to_string(dir.join(CONTROL_CREDS_FILE)).unwrap();
        let conf_before = std::fs::read_to_string(dir.join(AUTH_CONF_FILE)).unwrap();
        let second = init(&dir, &dir.join("accounts"), 200).unwrap();
        assert!(!second.created_keys);
        assert_eq!(first.operator, second.operator);
        assert_eq!(
            creds,
            std::fs::read_to_string(dir.join(CONTROL_CREDS_FILE)).unwrap()
        );
        for file in [
            OPERATOR_SEED_FILE,
            OPERATOR_SIGNING_SEED_FILE,
            SYSTEM_CREDS_FILE,
            CONTROL_CREDS_FILE,
        ] {
            let mode = std::fs::metadata(dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let conf = std::fs::read_to_string(dir.join(AUTH_CONF_FILE)).unwrap();
        assert_eq!(
            conf, conf_before,
            "a second run must not change the server config"
        );
        assert!(conf.contains(&format!("system_account: {}", first.system_account)));
        assert!(conf.contains("type: full"));
        std::fs::write(dir.join(OPERATOR_SIGNING_SEED_FILE), "garbage").unwrap();
        assert!(matches!(
            init(&dir, &dir.join("accounts"), 300),
            Err(BootstrapError::BadSeed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
