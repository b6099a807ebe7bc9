//! Enrollment: what `patronus-edge enroll` sends the controller and what it gets back.
//!
//! The edge makes every key itself and sends only public parts: a CSR for its certificate
//! key, its WireGuard public key and its NATS user public key. The answer carries everything
//! the edge needs to run without the token: its certificate and CA, its NATS credentials (the
//! user JWT; the seed never left the edge) and where its intent lives.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{SiteId, TenantId, WgPublicKey};
use crate::policy::LinkKind;

/// `POST /api/v1/enroll`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollRequest {
    /// The enrollment token (single use).
    pub token: String,
    /// PKCS#10 request, PEM, subject exactly `CN=<site id>, O=<tenant id>`.
    pub csr_pem: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub wg_public_key: WgPublicKey,
    /// The NATS user public nkey (`U...`).
    pub nats_public_key: String,
    /// The site's WAN uplinks, in uplink-index order (1 to 8).
    pub uplinks: Vec<UplinkSpec>,
}

/// One WAN uplink as the edge reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UplinkSpec {
    pub name: String,
    /// The uplink's public (WAN) address, where peers reach it.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub address: IpAddr,
    #[serde(default = "other_link")]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub interface_type: LinkKind,
    #[serde(default)]
    pub bandwidth_mbps: Option<u32>,
    #[serde(default)]
    pub cost_per_gb: f64,
    #[serde(default)]
    pub metered: bool,
}

fn other_link() -> LinkKind {
    LinkKind::Other
}

/// The controller's answer to a successful enrollment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    #[cfg_attr(feature = "openapi", schema(value_type = uuid::Uuid))]
    pub tenant_id: TenantId,
    #[cfg_attr(feature = "openapi", schema(value_type = uuid::Uuid))]
    pub site_id: SiteId,
    pub site_name: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub overlay_address: IpAddr,
    pub listen_port_base: u16,
    /// The site certificate, PEM.
    pub certificate_pem: String,
    /// The tenant CA that signed it, PEM (the whole chain: tenant CAs are roots).
    pub ca_certificate_pem: String,
    /// Unix seconds when the certificate (and the NATS credentials) expire.
    pub expires_at: i64,
    pub nats: NatsGrant,
    pub intent: IntentLocation,
}

/// How the edge reaches NATS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NatsGrant {
    pub url: String,
    /// User JWT issued by the tenant's account; pair it with the edge's own seed.
    pub user_jwt: String,
    /// Inbox prefix the connection must use (its permissions name it).
    pub inbox_prefix: String,
}

/// `POST /api/v1/edge/renew` (signed): a new certificate and NATS user for new keys the edge
/// made. The old certificate and credentials stay valid until they expire, so an answer lost
/// on the way does not lock the edge out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewRequest {
    pub csr_pem: String,
    pub nats_public_key: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewResponse {
    pub certificate_pem: String,
    pub ca_certificate_pem: String,
    pub expires_at: i64,
    pub nats: NatsGrant,
}

/// `POST /api/v1/edge/wireguard-key` (signed): the public half of the WireGuard key the edge
/// made for its next rotation (the private half never leaves the edge). The controller keeps
/// it as the site's next key, announces it to the site's peers, and commits it (names it in
/// the site's intent) once they all applied that announcement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WireguardKeyRequest {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub public_key: WgPublicKey,
}

/// Where the controller stands with the key of a [`WireguardKeyRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum WireguardKeyState {
    /// Recorded as the site's next key; the rotation is under way.
    Pending,
    /// Already the site's current key: the rotation is done (a repeated call after it).
    Current,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WireguardKeyResponse {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub public_key: WgPublicKey,
    pub state: WireguardKeyState,
}

/// `GET /api/v1/edge/status` (signed): what the controller knows of this site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EdgeStatus {
    #[cfg_attr(feature = "openapi", schema(value_type = uuid::Uuid))]
    pub site_id: SiteId,
    pub site_name: String,
    pub status: String,
    /// The last intent revision published for the site, if any.
    pub published_revision: Option<u64>,
    pub certificate_serial: String,
    pub certificate_expires_at: i64,
}

/// Where the site's intent is published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IntentLocation {
    pub bucket: String,
    pub key: String,
    /// Subscribe here for updates.
    pub kv_subject: String,
    /// Request here (empty body) for the current value.
    pub direct_get_subject: String,
}

/// The claims of an enrollment token (an EdDSA JWT the controller signs). `sub` is the site.
/// The edge reads them, unverified, only to learn which site and tenant to name in its CSR;
/// the controller verifies the signature and burns `jti`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollmentClaims {
    pub iss: String,
    pub aud: String,
    pub sub: uuid::Uuid,
    pub tenant: uuid::Uuid,
    pub site_name: String,
    pub jti: uuid::Uuid,
    pub iat: i64,
    pub exp: i64,
}

/// A `.creds` file, the format NATS clients read: the user JWT and the user's seed.
pub fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

/// Read a token's claims without checking anything. Never base a decision on the result.
pub fn peek_claims(token: &str) -> Option<EnrollmentClaims> {
    let payload = token.trim().split('.').nth(1)?;
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creds_file_has_both_blocks() {
        let text = creds_file("JWT", "SUSEED");
        assert!(text.contains("-----BEGIN NATS USER JWT-----\nJWT\n"));
        assert!(text.contains("-----BEGIN USER NKEY SEED-----\nSUSEED\n"));
    }

    #[test]
    fn garbage_tokens_have_no_claims() {
        for garbage in ["", "a", "a.b.c", "a.e30.c", "x.!!!.y"] {
            assert_eq!(peek_claims(garbage), None, "{garbage}");
        }
    }

    #[test]
    fn uplink_defaults_fill_in() {
        let uplink: UplinkSpec =
            serde_json::from_str(r#"{"name":"wan0","address":"198.18.1.1"}"#).unwrap();
        assert_eq!(uplink.interface_type, LinkKind::Other);
        assert_eq!(uplink.cost_per_gb, 0.0);
        assert!(!uplink.metered);
    }
}
