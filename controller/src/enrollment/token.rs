//! Enrollment tokens: EdDSA-signed JWTs bound to one tenant and one site, short-lived and
//! single-use (the database burns the `jti` on redemption). Pure: keys in, strings out.

use chrono::{DateTime, Utc};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use uuid::Uuid;

pub const ISSUER: &str = "patronus-controller";
pub const AUDIENCE: &str = "patronus-enroll";
/// Longest token accepted as input (a real one is about 400 bytes).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// PKCS#8 v1 DER prefix of an Ed25519 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

pub use patronus_proto::enroll::{peek_claims, EnrollmentClaims};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token has expired; ask for a new one")]
    Expired,
    #[error("the token is not a valid enrollment token ({0})")]
    Invalid(String),
}

/// The signing key pair, from the 32-byte seed in the configuration.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl TokenKeys {
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let der = [ED25519_PKCS8_PREFIX.as_slice(), seed.as_slice()].concat();
        let public = ed25519_dalek::SigningKey::from_bytes(seed)
            .verifying_key()
            .to_bytes();
        Self {
            encoding: EncodingKey::from_ed_der(&der),
            decoding: DecodingKey::from_ed_der(&public),
        }
    }

    /// Sign a token for `site` of `tenant`, valid from `now` until `expires_at`.
    pub fn mint(
        &self,
        tenant: Uuid,
        site: Uuid,
        site_name: &str,
        jti: Uuid,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<String, TokenError> {
        let claims = EnrollmentClaims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: site,
            tenant,
            site_name: site_name.to_owned(),
            jti,
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
        };
        encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// Check signature, algorithm, issuer, audience and expiry (no leeway: the lifetime is
    /// already short). Whether it was used is the database's question.
    pub fn verify(&self, token: &str) -> Result<EnrollmentClaims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid("too long".into()));
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        validation.leeway = 0;
        decode::<EnrollmentClaims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                kind => TokenError::Invalid(format!("{kind:?}")),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn keys() -> TokenKeys {
        TokenKeys::from_seed(&[5u8; 32])
    }

    fn mint_at(keys: &TokenKeys, exp_in: i64) -> (String, EnrollmentClaims) {
        let now = Utc::now();
        let (tenant, site, jti) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let token = keys
            .mint(
                tenant,
                site,
                "branch-1",
                jti,
                now,
                now + chrono::Duration::seconds(exp_in),
            )
            .unwrap();
        (token.clone(), peek_claims(&token).unwrap())
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let keys = keys();
        let (token, claims) = mint_at(&keys, 3600);
        assert_eq!(keys.verify(&token).unwrap(), claims);
        assert_eq!(claims.site_name, "branch-1");
    }

    #[test]
    fn expired_forged_and_garbage_tokens_are_refused() {
        let keys = keys();
        let (expired, _) = mint_at(&keys, -10);
        assert_eq!(keys.verify(&expired).unwrap_err(), TokenError::Expired);

        let (token, mut claims) = mint_at(&keys, 3600);
        // A changed claim with the original signature.
        claims.tenant = Uuid::new_v4();
        let parts: Vec<&str> = token.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(serde_json::to_vec(&claims).unwrap()),
            parts[2]
        );
        assert!(matches!(keys.verify(&forged), Err(TokenError::Invalid(_))));
        // Signed by another key.
        let (other, _) = mint_at(&TokenKeys::from_seed(&[6u8; 32]), 3600);
        assert!(matches!(keys.verify(&other), Err(TokenError::Invalid(_))));
        // Not a JWT, or an unsigned one.
        for garbage in ["", "abc", "a.b.c", &"x".repeat(10_000)] {
            assert!(matches!(keys.verify(garbage), Err(TokenError::Invalid(_))));
        }
        let none_alg = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(matches!(
            keys.verify(&none_alg),
            Err(TokenError::Invalid(_))
        ));
    }
}
