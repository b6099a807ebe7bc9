//! Typed identifiers and key material.
//!
//! Ids are UUIDs on the wire (hyphenated, lower case), which also makes them safe NATS subject
//! tokens: no `.`, `*`, `>` or whitespace can appear in them.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.as_hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.as_hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

uuid_id!(
    /// A tenant: one customer of an MSP. Every tenant-owned row and message carries it.
    TenantId
);
uuid_id!(
    /// A site: one edge location running `patronus-edge`.
    SiteId
);
uuid_id!(
    /// A path: (local uplink, remote site, remote uplink), as stored by the controller.
    PathId
);
uuid_id!(
    /// A policy (routing, QoS, security or cost).
    PolicyId
);
uuid_id!(
    /// A flow record as stored by the controller.
    FlowId
);

/// Error for 32-byte keys given in base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64: {0}")]
    Base64(String),
    #[error("key must be 32 bytes, got {0}")]
    Length(usize),
}

fn key_from_base64(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = BASE64
        .decode(s.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    bytes
        .try_into()
        .map_err(|v: Vec<u8>| KeyError::Length(v.len()))
}

/// A WireGuard (Curve25519) public key, base64 on the wire as `wg` prints it.
/// Private keys never appear in this crate: they are generated on the edge and never leave it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgPublicKey(pub [u8; 32]);

impl WgPublicKey {
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }
}

impl FromStr for WgPublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        key_from_base64(s).map(Self)
    }
}

impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({})", self.to_base64())
    }
}

impl Serialize for WgPublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for WgPublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The HMAC-SHA256 key that signs path probes between one pair of sites. It is a secret: the
/// controller puts it only into the intents of the two sites of the pair, and its `Debug` is
/// redacted so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeKey(pub [u8; 32]);

impl ProbeKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProbeKey(<redacted>)")
    }
}

impl Serialize for ProbeKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for ProbeKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        key_from_base64(&s)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wg_key_round_trips_through_base64() {
        let key = WgPublicKey([7; 32]);
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<WgPublicKey>().unwrap(), key);
    }

    #[test]
    fn wg_key_rejects_wrong_length_and_garbage() {
        assert_eq!(
            "AAAA".parse::<WgPublicKey>().unwrap_err(),
            KeyError::Length(3)
        );
        assert!(matches!(
            "not base64!".parse::<WgPublicKey>(),
            Err(KeyError::Base64(_))
        ));
    }

    #[test]
    fn probe_key_debug_is_redacted() {
        let key = ProbeKey([0xAB; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("ab") && !shown.contains("AB") && shown.contains("redacted"));
    }

    #[test]
    fn ids_display_as_hyphenated_uuid() {
        let id = SiteId(Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef));
        assert_eq!(id.to_string(), "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(id.to_string().parse::<SiteId>().unwrap(), id);
    }
}
