//! JSON encoding of every message, with the schema-version rule and a size limit.
//!
//! [`decode`] checks, in order: the size limit, that the bytes are JSON with a
//! `schema_version` of our major version, that they parse into the message type (unknown
//! fields are ignored), and finally the message's own [`Message::validate`]. Each step has its
//! own [`DecodeError`] variant so a receiver can count drops by reason.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest message either side accepts. Matches the NATS server's `max_payload`.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// The schema version this build speaks.
pub const SCHEMA_VERSION: SchemaVersion = SchemaVersion { major: 1, minor: 0 };

/// `major.minor`: a new minor only adds optional fields or enum variants; anything else is a
/// new major, which older peers refuse rather than misread.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SchemaVersion {
    pub major: u16,
    pub minor: u16,
}

impl Default for SchemaVersion {
    fn default() -> Self {
        SCHEMA_VERSION
    }
}

impl SchemaVersion {
    /// Whether a message written at `self` can be read by this build.
    pub fn is_readable(self) -> bool {
        self.major == SCHEMA_VERSION.major
    }
}

impl fmt::Display for SchemaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl fmt::Debug for SchemaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaVersion({self})")
    }
}

impl FromStr for SchemaVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (major, minor) = s
            .split_once('.')
            .ok_or_else(|| format!("schema version {s:?} is not MAJOR.MINOR"))?;
        let parse = |part: &str| {
            part.parse::<u16>()
                .map_err(|_| format!("schema version {s:?} is not MAJOR.MINOR"))
        };
        Ok(Self {
            major: parse(major)?,
            minor: parse(minor)?,
        })
    }
}

impl Serialize for SchemaVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SchemaVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A semantic problem in a message that parsed: the message says something impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    /// Where in the message, e.g. `paths[2].local_uplink`.
    pub field: String,
    pub problem: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Why bytes did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{kind} message is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} message is not valid JSON: {detail}")]
    Syntax { kind: &'static str, detail: String },
    #[error("{kind} message has no schema_version")]
    MissingSchemaVersion { kind: &'static str },
    #[error("{kind} message has schema version {got}; this build reads {supported_major}.x")]
    UnsupportedSchema {
        kind: &'static str,
        got: SchemaVersion,
        supported_major: u16,
    },
    #[error("{kind} message does not match its schema: {detail}")]
    Shape { kind: &'static str, detail: String },
    #[error("{kind} message is invalid: {source}")]
    Invalid {
        kind: &'static str,
        #[source]
        source: ValidationError,
    },
}

impl DecodeError {
    /// A short stable label, for drop counters (`reason` label of a metric).
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Syntax { .. } => "syntax",
            DecodeError::MissingSchemaVersion { .. } => "missing_schema_version",
            DecodeError::UnsupportedSchema { .. } => "unsupported_schema",
            DecodeError::Shape { .. } => "shape",
            DecodeError::Invalid { .. } => "invalid",
        }
    }
}

/// A top-level message: one that travels on its own on a subject or KV key.
pub trait Message: Serialize + DeserializeOwned {
    /// Name used in errors and logs.
    const KIND: &'static str;

    /// Semantic checks beyond the schema (references resolve, ranges hold).
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

#[derive(Deserialize)]
struct VersionOnly {
    schema_version: Option<SchemaVersion>,
}

/// Encode a message as JSON. Messages are plain data, so this cannot fail for our types.
pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    // Our message types hold only strings, numbers, sequences and string-keyed maps, which
    // serde_json always serializes.
    serde_json::to_vec(message).expect("protocol messages always serialize to JSON")
}

/// Decode and validate a message. Never panics, whatever the bytes.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, DecodeError> {
    let kind = M::KIND;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge {
            kind,
            len: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let version: VersionOnly = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            DecodeError::Syntax {
                kind,
                detail: e.to_string(),
            }
        } else {
            DecodeError::Shape {
                kind,
                detail: e.to_string(),
            }
        }
    })?;
    let got = version
        .schema_version
        .ok_or(DecodeError::MissingSchemaVersion { kind })?;
    if !got.is_readable() {
        return Err(DecodeError::UnsupportedSchema {
            kind,
            got,
            supported_major: SCHEMA_VERSION.major,
        });
    }
    let message: M = serde_json::from_slice(bytes).map_err(|e| DecodeError::Shape {
        kind,
        detail: e.to_string(),
    })?;
    message
        .validate()
        .map_err(|source| DecodeError::Invalid { kind, source })?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_text_form() {
        assert_eq!("1.7".parse::<SchemaVersion>().unwrap().minor, 7);
        assert!("1".parse::<SchemaVersion>().is_err());
        assert!("a.b".parse::<SchemaVersion>().is_err());
        assert!("1.99999".parse::<SchemaVersion>().is_err());
        assert_eq!(SCHEMA_VERSION.to_string(), "1.0");
    }
}
