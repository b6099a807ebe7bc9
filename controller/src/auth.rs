//! Identity primitives: roles, password hashing, API-token secrets and session tokens.
//!
//! - Passwords are hashed with Argon2id (PHC string with its own salt and parameters).
//! - API tokens and refresh tokens are random 256-bit secrets shown once; only their SHA-256 is
//!   stored, so a database or Redis dump gives nothing to log in with.
//! - Session tokens are short-lived JWTs (HS256) signed with a secret every controller replica
//!   shares, so any replica can verify them without a lookup.

use std::fmt;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use patronus_proto::TenantId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest password accepted (Argon2 cost is linear in it; refuse absurd inputs).
pub const MAX_PASSWORD_LEN: usize = 1024;
pub const API_TOKEN_PREFIX: &str = "pat_";
pub const REFRESH_TOKEN_PREFIX: &str = "prt_";

/// What an operator or token may do.
#[derive(utoipa::ToSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything in every tenant of its MSP, and the MSP itself.
    MspAdmin,
    /// Everything in one tenant.
    TenantAdmin,
    /// Read-only in one tenant.
    TenantViewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::MspAdmin => "msp_admin",
            Role::TenantAdmin => "tenant_admin",
            Role::TenantViewer => "tenant_viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "msp_admin" => Some(Role::MspAdmin),
            "tenant_admin" => Some(Role::TenantAdmin),
            "tenant_viewer" => Some(Role::TenantViewer),
            _ => None,
        }
    }

    pub fn can_write(self) -> bool {
        !matches!(self, Role::TenantViewer)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password must be {MIN_PASSWORD_LEN}-{MAX_PASSWORD_LEN} characters")]
    PasswordLength,
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("session secret must decode from base64 to at least 32 bytes")]
    WeakSecret,
    #[error("invalid session token: {0}")]
    InvalidSession(String),
}

/// Check a new password's length (in characters).
pub fn check_password_policy(password: &str) -> Result<(), AuthError> {
    let len = password.chars().count();
    if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&len) {
        return Err(AuthError::PasswordLength);
    }
    Ok(())
}

/// Argon2id PHC string for a password. CPU-heavy: call from a blocking task.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    check_password_policy(password)?;
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Whether `password` matches the stored hash. A malformed stored hash never matches.
/// CPU-heavy: call from a blocking task.
pub fn verify_password(password: &str, stored: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN * 4 {
        return false;
    }
    PasswordHash::new(stored)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the account does not exist, so a login for an unknown
/// e-mail costs the same as one with a wrong password (no user enumeration by timing).
pub fn dummy_password_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password("not-a-real-password-only-for-timing")
            .unwrap_or_else(|_| String::from("$argon2id$invalid"))
    })
}

/// SHA-256 of a secret, as stored.
pub fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A new random secret with a recognisable prefix, and its hash.
pub fn new_secret(prefix: &str) -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = secret_hash(&secret);
    (secret, hash)
}

/// Claims of a session token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    /// Operator id.
    pub sub: Uuid,
    pub msp: Uuid,
    /// The operator's tenant; none for an MSP admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    pub role: Role,
    /// Who, for logs and the audit trail (the operator's e-mail).
    #[serde(default)]
    pub label: String,
    /// Token id, for logout (deny-listed until it expires).
    pub jti: Uuid,
    pub iat: u64,
    pub exp: u64,
    /// Always "session": a token of another kind signed with the same key is refused.
    pub typ: String,
}

const SESSION_TYP: &str = "session";
const ISSUER: &str = "patronus-controller";

/// Signs and verifies session tokens.
#[derive(Clone)]
pub struct SessionKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

#[derive(Serialize, Deserialize)]
struct WireClaims {
    #[serde(flatten)]
    claims: SessionClaims,
    iss: String,
}

impl SessionKeys {
    /// From the configured base64 secret (at least 32 bytes once decoded).
    pub fn from_base64(secret: &str) -> Result<Self, AuthError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(secret.trim())
            .map_err(|_| AuthError::WeakSecret)?;
        if bytes.len() < 32 {
            return Err(AuthError::WeakSecret);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 5;
        Ok(Self {
            encoding: EncodingKey::from_secret(&bytes),
            decoding: DecodingKey::from_secret(&bytes),
            validation,
        })
    }

    pub fn issue(&self, claims: &SessionClaims) -> Result<String, AuthError> {
        let wire = WireClaims {
            claims: claims.clone(),
            iss: ISSUER.into(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &wire, &self.encoding)
            .map_err(|e| AuthError::InvalidSession(e.to_string()))
    }

    /// Verify signature, issuer, expiry and kind.
    pub fn verify(&self, token: &str) -> Result<SessionClaims, AuthError> {
        let data = jsonwebtoken::decode::<WireClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::InvalidSession(e.to_string()))?;
        let claims = data.claims.claims;
        if claims.typ != SESSION_TYP {
            return Err(AuthError::InvalidSession("not a session token".into()));
        }
        if claims.role == Role::MspAdmin && claims.tenant.is_some()
            || claims.role != Role::MspAdmin && claims.tenant.is_none()
        {
            return Err(AuthError::InvalidSession("role and tenant disagree".into()));
        }
        Ok(claims)
    }

    pub fn new_claims(
        operator: Uuid,
        msp: Uuid,
        tenant: Option<TenantId>,
        role: Role,
        now_unix: u64,
        ttl_s: u64,
    ) -> SessionClaims {
        SessionClaims {
            sub: operator,
            msp,
            tenant,
            role,
            label: String::new(),
            jti: Uuid::new_v4(),
            iat: now_unix,
            exp: now_unix + ttl_s,
            typ: SESSION_TYP.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SessionKeys {
        SessionKeys::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
            .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("anything", "not a phc string"));
        assert!(matches!(
            hash_password("short"),
            Err(AuthError::PasswordLength)
        ));
    }

    #[test]
    fn secrets_are_prefixed_random_and_hashed() {
        let (a, hash_a) = new_secret(API_TOKEN_PREFIX);
        let (b, _) = new_secret(API_TOKEN_PREFIX);
        assert!(a.starts_with("pat_") && a.len() > 40);
        assert_ne!(a, b);
        assert_eq!(secret_hash(&a), hash_a);
    }

    #[test]
    fn session_tokens_round_trip_and_reject_tampering() {
        let keys = keys();
        let claims = SessionKeys::new_claims(
            Uuid::new_v4(),
            Uuid::new_v4(),
            None,
            Role::MspAdmin,
            now(),
            60,
        );
        let token = keys.issue(&claims).unwrap();
        assert_eq!(keys.verify(&token).unwrap(), claims);

        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(keys.verify(&tampered).is_err());

        let other =
            SessionKeys::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .unwrap();
        assert!(other.verify(&token).is_err());
    }

    #[test]
    fn expired_sessions_and_inconsistent_roles_are_refused() {
        let keys = keys();
        let old = SessionKeys::new_claims(
            Uuid::new_v4(),
            Uuid::new_v4(),
            None,
            Role::MspAdmin,
            now() - 3600,
            60,
        );
        assert!(keys.verify(&keys.issue(&old).unwrap()).is_err());
        let odd = SessionKeys::new_claims(
            Uuid::new_v4(),
            Uuid::new_v4(),
            None,
            Role::TenantAdmin,
            now(),
            60,
        );
        assert!(keys.verify(&keys.issue(&odd).unwrap()).is_err());
    }

    #[test]
    fn weak_secrets_are_refused() {
        assert!(SessionKeys::from_base64("c2hvcnQ=").is_err());
        assert!(SessionKeys::from_base64("not base64 at all!").is_err());
    }
}
