//! NATS decentralized-auth JWTs (operator, account, user), built and signed here, no I/O.
//!
//! The format is nats-io/jwt v2: `base64url(header).base64url(claims).base64url(signature)`,
//! header `{"typ":"JWT","alg":"ed25519-nkey"}`, signed with the issuer's nkey. The server
//! checks the chain operator → account → user; `jti` is the base32 SHA-512/256 of the claims,
//! as the reference library computes it.

use std::collections::BTreeMap;

use base64::Engine;
use nkeys::KeyPair;
use serde::Serialize;
use sha2::{Digest, Sha512_256};

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("signing with nkey: {0}")]
    Sign(String),
    #[error("encoding claims: {0}")]
    Encode(#[from] serde_json::Error),
}

#[derive(Serialize)]
struct Claims<'a, N: Serialize> {
    jti: String,
    iat: i64,
    iss: String,
    name: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    nats: N,
}

/// Sign `nats` claims about `subject` (a public nkey) with `issuer`.
fn sign<N: Serialize>(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    issued_at: i64,
    expires_at: Option<i64>,
    nats: N,
) -> Result<String, JwtError> {
    let mut claims = Claims {
        jti: String::new(),
        iat: issued_at,
        iss: issuer.public_key(),
        name,
        sub: subject,
        exp: expires_at,
        nats,
    };
    let unidentified = serde_json::to_vec(&claims)?;
    claims.jti = data_encoding::BASE32_NOPAD.encode(&Sha512_256::digest(&unidentified));
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!(
        "{}.{}",
        b64.encode(HEADER),
        b64.encode(serde_json::to_vec(&claims)?)
    );
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!("{signing_input}.{}", b64.encode(signature)))
}

#[derive(Serialize)]
struct OperatorNats<'a> {
    signing_keys: Vec<String>,
    system_account: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

/// The self-signed operator JWT; `signing_key` signs accounts from then on, so the operator's
/// identity key can stay offline.
pub fn operator(
    operator: &KeyPair,
    signing_key: &str,
    system_account: &str,
    name: &str,
    issued_at: i64,
) -> Result<String, JwtError> {
    sign(
        operator,
        &operator.public_key(),
        name,
        issued_at,
        None,
        OperatorNats {
            signing_keys: vec![signing_key.to_owned()],
            system_account,
            kind: "operator",
            version: 2,
        },
    )
}

/// Resource limits of an account. `-1` means unlimited; JetStream is enabled by non-zero
/// storage limits.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct AccountLimits {
    pub subs: i64,
    pub data: i64,
    pub payload: i64,
    pub imports: i64,
    pub exports: i64,
    pub wildcards: bool,
    pub conn: i64,
    pub leaf: i64,
    pub mem_storage: i64,
    pub disk_storage: i64,
    pub streams: i64,
    pub consumer: i64,
}

impl AccountLimits {
    /// No limits and no JetStream (the system account).
    pub const SYSTEM: AccountLimits = AccountLimits {
        subs: -1,
        data: -1,
        payload: -1,
        imports: -1,
        exports: -1,
        wildcards: true,
        conn: -1,
        leaf: -1,
        mem_storage: 0,
        disk_storage: 0,
        streams: 0,
        consumer: 0,
    };

    /// A tenant (or the controller's own) account: JetStream on, without a reservation.
    /// nats-server reserves an account's (and a stream's `max_bytes`) storage out of the
    /// server's totals, so byte limits would cap how many tenants one server can hold; the
    /// streams the controller creates are bounded by message count and size instead.
    pub const TENANT: AccountLimits = AccountLimits {
        mem_storage: -1,
        disk_storage: -1,
        streams: -1,
        consumer: -1,
        ..AccountLimits::SYSTEM
    };
}

#[derive(Serialize)]
struct AccountNats<'a> {
    limits: AccountLimits,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    revocations: &'a BTreeMap<String, i64>,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

/// Revocation key meaning every user of the account.
pub const REVOKE_ALL_USERS: &str = "*";

/// An account JWT signed by the operator's signing key. `revocations` maps user public keys
/// (or [`REVOKE_ALL_USERS`]) to a time: user JWTs of that key issued at or before it are
/// refused, and their live connections closed, as soon as the server has the new account JWT.
pub fn account(
    operator_signing_key: &KeyPair,
    account_key: &str,
    name: &str,
    limits: AccountLimits,
    revocations: &BTreeMap<String, i64>,
    issued_at: i64,
) -> Result<String, JwtError> {
    sign(
        operator_signing_key,
        account_key,
        name,
        issued_at,
        None,
        AccountNats {
            limits,
            revocations,
            kind: "account",
            version: 2,
        },
    )
}

/// Subjects a user may publish and subscribe to. `None` leaves that direction unrestricted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserPermissions {
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
    /// May answer requests sent to it (one reply each), e.g. commands.
    pub allow_responses: bool,
}

#[derive(Serialize)]
struct Allow<'a> {
    allow: &'a [String],
}

#[derive(Serialize)]
struct Responses {
    max: i64,
    /// Nanoseconds the reply permission lasts.
    ttl: i64,
}

#[derive(Serialize)]
struct UserNats<'a> {
    #[serde(rename = "pub", skip_serializing_if = "Option::is_none")]
    publish: Option<Allow<'a>>,
    #[serde(rename = "sub", skip_serializing_if = "Option::is_none")]
    subscribe: Option<Allow<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resp: Option<Responses>,
    subs: i64,
    data: i64,
    payload: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

pub use patronus_proto::enroll::creds_file;

/// A user JWT issued by an account's key.
pub fn user(
    account_key: &KeyPair,
    user_key: &str,
    name: &str,
    permissions: &UserPermissions,
    issued_at: i64,
    expires_at: Option<i64>,
) -> Result<String, JwtError> {
    sign(
        account_key,
        user_key,
        name,
        issued_at,
        expires_at,
        UserNats {
            publish: permissions.publish.as_deref().map(|allow| Allow { allow }),
            subscribe: permissions
                .subscribe
                .as_deref()
                .map(|allow| Allow { allow }),
            resp: permissions.allow_responses.then_some(Responses {
                max: 1,
                ttl: 5_000_000_000,
            }),
            subs: -1,
            data: -1,
            payload: -1,
            kind: "user",
            version: 2,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(jwt: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>, String) {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        (
            serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap(),
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap(),
            b64.decode(parts[2]).unwrap(),
            format!("{}.{}", parts[0], parts[1]),
        )
    }

    #[test]
    fn user_jwt_is_signed_by_the_account_and_carries_exact_permissions() {
        let account = KeyPair::new_account();
        let user_key = KeyPair::new_user();
        let permissions = UserPermissions {
            publish: Some(vec!["sdwan.t.s.metrics".into()]),
            subscribe: Some(vec!["sdwan.t.s.cmd".into()]),
            allow_responses: true,
        };
        let jwt = user(
            &account,
            &user_key.public_key(),
            "site",
            &permissions,
            1000,
            Some(2000),
        )
        .unwrap();
        let (header, claims, signature, signed) = decode(&jwt);
        assert_eq!(header["alg"], "ed25519-nkey");
        account.verify(signed.as_bytes(), &signature).unwrap();
        assert_eq!(claims["iss"], account.public_key());
        assert_eq!(claims["sub"], user_key.public_key());
        assert_eq!(claims["exp"], 2000);
        assert_eq!(claims["nats"]["type"], "user");
        assert_eq!(
            claims["nats"]["pub"]["allow"],
            serde_json::json!(["sdwan.t.s.metrics"])
        );
        assert_eq!(
            claims["nats"]["sub"]["allow"],
            serde_json::json!(["sdwan.t.s.cmd"])
        );
        assert_eq!(claims["nats"]["resp"]["max"], 1);
        assert_eq!(claims["jti"].as_str().unwrap().len(), 52);
    }

    #[test]
    fn a_tampered_claim_no_longer_verifies() {
        let account = KeyPair::new_account();
        let jwt = user(
            &account,
            &KeyPair::new_user().public_key(),
            "u",
            &UserPermissions::default(),
            1,
            None,
        )
        .unwrap();
        let (_, mut claims, signature, _) = decode(&jwt);
        claims["nats"]["pub"] = serde_json::json!({"allow": [">"]});
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged = format!(
            "{}.{}",
            b64.encode(HEADER),
            b64.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert!(account.verify(forged.as_bytes(), &signature).is_err());
    }

    #[test]
    fn account_jwt_lists_revocations_and_enables_jetstream() {
        let signing = KeyPair::new_operator();
        let account_key = KeyPair::new_account().public_key();
        let revoked = BTreeMap::from([("UABC".to_string(), 42)]);
        let jwt = account(
            &signing,
            &account_key,
            "tenant",
            AccountLimits::TENANT,
            &revoked,
            7,
        )
        .unwrap();
        let (_, claims, signature, signed) = decode(&jwt);
        signing.verify(signed.as_bytes(), &signature).unwrap();
        assert_eq!(claims["sub"], account_key);
        assert_eq!(claims["nats"]["revocations"]["UABC"], 42);
        assert_eq!(claims["nats"]["limits"]["disk_storage"], -1);
        let none = account(
            &signing,
            &account_key,
            "t",
            AccountLimits::SYSTEM,
            &BTreeMap::new(),
            7,
        )
        .unwrap();
        assert!(decode(&none).1["nats"].get("revocations").is_none());
    }
}
