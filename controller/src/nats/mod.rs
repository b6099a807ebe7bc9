//! NATS in operator (decentralized JWT) mode: one account per tenant.
//!
//! - [`jwt`] builds and signs operator, account and user JWTs (pure).
//! - [`bootstrap`] is `patronus-controller nats init`: operator, system and control accounts.
//! - [`hub`] holds the controller's connections and pushes tenant accounts.
//!
//! Tenant account keys are not stored anywhere: each derives from the operator signing key
//! and the tenant id ([`tenant_account_key`]), so every replica computes the same account
//! without coordination, and holding the operator signing key is exactly what it takes to
//! administer every tenant (which is what the controller is for).

pub mod bootstrap;
pub mod hub;
pub mod jwt;

use hmac::{Hmac, Mac};
use nkeys::{KeyPair, KeyPairType};
use patronus_proto::TenantId;
use sha2::Sha256;

pub use hub::{HubError, NatsHub, TenantLink};

/// Domain separation for derived account keys; bump the version to re-key every tenant.
const ACCOUNT_KEY_LABEL: &[u8] = b"patronus nats tenant account v1";

/// The account key of a tenant: HMAC-SHA256(operator signing seed, label ‖ tenant id) as the
/// Ed25519 seed.
/// `operator_signing_seed` is the raw 32 bytes of the operator signing key's seed.
pub fn tenant_account_key(operator_signing_seed: &[u8; 32], tenant: TenantId) -> KeyPair {
    let mut mac = Hmac::<Sha256>::new_from_slice(operator_signing_seed)
        .expect("HMAC takes keys of any length");
    mac.update(ACCOUNT_KEY_LABEL);
    mac.update(tenant.0.as_bytes());
    let derived: [u8; 32] = mac.finalize().into_bytes().into();
    KeyPair::new_from_raw(KeyPairType::Account, derived).expect("32 bytes make an account key")
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn account_keys_are_stable_per_tenant_and_distinct_across_tenants() {
        let signing = [7u8; 32];
        let a = TenantId(Uuid::from_u128(1));
        let b = TenantId(Uuid::from_u128(2));
        assert_eq!(
            tenant_account_key(&signing, a).public_key(),
            tenant_account_key(&signing, a).public_key()
        );
        assert_ne!(
            tenant_account_key(&signing, a).public_key(),
            tenant_account_key(&signing, b).public_key()
        );
        assert!(tenant_account_key(&signing, a)
            .public_key()
            .starts_with('A'));
        let other_operator = [8u8; 32];
        assert_ne!(
            tenant_account_key(&signing, a).public_key(),
            tenant_account_key(&other_operator, a).public_key()
        );
    }
}
