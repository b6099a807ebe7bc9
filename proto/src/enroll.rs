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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_defaults_fill_in() {
        let uplink: UplinkSpec =
            serde_json::from_str(r#"{"name":"wan0","address":"198.18.1.1"}"#).unwrap();
        assert_eq!(uplink.interface_type, LinkKind::Other);
        assert_eq!(uplink.cost_per_gb, 0.0);
        assert!(!uplink.metered);
    }
}
