//! Signed edge requests: how an enrolled edge proves, on every control-plane call (status,
//! certificate renewal), that it holds its site certificate's private key.
//!
//! The edge sends its certificate and a signature, made with the certificate's key, over a
//! canonical string of the request: method, path, a timestamp, a random nonce and the body's
//! SHA-256. The controller checks the certificate against the tenant CA and its revocation
//! state, the signature against the certificate's key, the timestamp against its clock and the
//! nonce against the ones it has seen. This gives what mutual TLS would (possession of a valid,
//! unrevoked site key) and also works through TLS-terminating proxies.

use sha2::{Digest, Sha256};

/// Base64 (standard) DER of the site certificate.
pub const CERTIFICATE_HEADER: &str = "x-patronus-certificate";
/// Unix seconds when the request was signed.
pub const TIMESTAMP_HEADER: &str = "x-patronus-timestamp";
/// 32 hex characters, new for every request.
pub const NONCE_HEADER: &str = "x-patronus-nonce";
/// Base64 (standard) of the signature: ECDSA (ASN.1 DER) for EC keys, raw for Ed25519.
pub const SIGNATURE_HEADER: &str = "x-patronus-signature";
/// How far the signer's clock may be from the controller's.
pub const MAX_CLOCK_SKEW_S: i64 = 300;

/// The bytes that are signed.
pub fn canonical_request(
    method: &str,
    path: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> Vec<u8> {
    let body_hash: String = Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "PATRONUS-EDGE-V1\n{}\n{path}\n{timestamp}\n{nonce}\n{body_hash}",
        method.to_ascii_uppercase()
    )
    .into_bytes()
}

/// A nonce is exactly 32 lowercase hex characters.
pub fn valid_nonce(nonce: &str) -> bool {
    nonce.len() == 32
        && nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_of_the_request_changes_the_canonical_bytes() {
        let base = canonical_request("post", "/api/v1/edge/renew", 10, "ab", b"{}");
        assert!(base.starts_with(b"PATRONUS-EDGE-V1\nPOST\n"));
        for other in [
            canonical_request("GET", "/api/v1/edge/renew", 10, "ab", b"{}"),
            canonical_request("POST", "/api/v1/edge/status", 10, "ab", b"{}"),
            canonical_request("POST", "/api/v1/edge/renew", 11, "ab", b"{}"),
            canonical_request("POST", "/api/v1/edge/renew", 10, "ac", b"{}"),
            canonical_request("POST", "/api/v1/edge/renew", 10, "ab", b"{ }"),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn nonces_are_32_lowercase_hex() {
        assert!(valid_nonce(&"a1".repeat(16)));
        assert!(!valid_nonce(&"A1".repeat(16)));
        assert!(!valid_nonce("a1"));
        assert!(!valid_nonce(&"g1".repeat(16)));
    }
}
