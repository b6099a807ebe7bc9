//! The path-probe wire format: small binary UDP datagrams sent inside each path's tunnel.
//!
//! ```text
//! offset size  field
//!  0      2    magic "PR" (0x50 0x52)
//!  2      1    version (1)
//!  3      1    header_len: bytes of fixed header (56 in v1; a newer version may append fields,
//!              which a v1 reader skips)
//!  4      1    kind: 1 request, 2 reply
//!  5      1    flags: bit 0 HMAC present, bit 1 MTU probe (sent with DF); other bits ignored
//!  6      2    pad_len: padding bytes after the header (sizes MTU probes)
//!  8      4    path_tag: the sender's local id of the path, echoed in the reply
//! 12      8    sequence
//! 20      8    sent_ns: sender's clock when sent
//! 28      8    echo_sent_ns: in a reply, the request's sent_ns (0 in a request)
//! 36      4    reflector_hold_ns: in a reply, time between receiving the request and replying
//! 40     16    nonce: random per probe, for replay detection together with the sequence
//! 56      …    header extension of newer versions (header_len - 56 bytes)
//!  …   pad_len padding
//!  …     32    HMAC-SHA256 over every byte before it, when flag bit 0 is set
//! ```
//! All integers are big-endian. [`decode`] never panics and returns a [`ProbeError`] for any
//! malformed input; [`DecodedProbe::verify`] checks the HMAC in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::ProbeKey;

pub const MAGIC: [u8; 2] = *b"PR";
pub const VERSION: u8 = 1;
/// Fixed header length of version 1.
pub const V1_HEADER_LEN: usize = 56;
pub const MAC_LEN: usize = 32;
/// Largest probe accepted: a 9000-byte jumbo MTU probe plus headroom.
pub const MAX_PROBE_LEN: usize = 9216;

pub const FLAG_HMAC: u8 = 0b0000_0001;
pub const FLAG_MTU_PROBE: u8 = 0b0000_0010;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Request,
    Reply,
}

impl ProbeKind {
    fn to_byte(self) -> u8 {
        match self {
            ProbeKind::Request => 1,
            ProbeKind::Reply => 2,
        }
    }
}

/// A probe's fields (the padding is only its length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbePacket {
    pub kind: ProbeKind,
    pub mtu_probe: bool,
    pub path_tag: u32,
    pub sequence: u64,
    pub sent_ns: u64,
    pub echo_sent_ns: u64,
    pub reflector_hold_ns: u32,
    pub nonce: [u8; 16],
    pub pad_len: u16,
}

/// Why a datagram is not a usable probe. [`ProbeError::reason`] gives a stable counter label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("probe is {len} bytes, shorter than its {need}-byte header")]
    Truncated { len: usize, need: usize },
    #[error("probe is {len} bytes, over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("not a probe (bad magic)")]
    BadMagic,
    #[error("probe version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("probe header length {0} is below the version-1 minimum")]
    BadHeaderLength(u8),
    #[error("unknown probe kind {0}")]
    UnknownKind(u8),
    #[error("probe length {got} does not match its header ({expected})")]
    LengthMismatch { expected: usize, got: usize },
    #[error("probe would be over {max} bytes with {pad_len} bytes of padding")]
    PaddingTooLarge { pad_len: u16, max: usize },
    #[error("probe is not signed")]
    Unsigned,
    #[error("probe signature does not verify")]
    BadSignature,
}

impl ProbeError {
    pub fn reason(&self) -> &'static str {
        match self {
            ProbeError::Truncated { .. } => "truncated",
            ProbeError::TooLarge { .. } => "too_large",
            ProbeError::BadMagic => "bad_magic",
            ProbeError::UnsupportedVersion(_) => "unsupported_version",
            ProbeError::BadHeaderLength(_) => "bad_header_length",
            ProbeError::UnknownKind(_) => "unknown_kind",
            ProbeError::LengthMismatch { .. } => "length_mismatch",
            ProbeError::PaddingTooLarge { .. } => "padding_too_large",
            ProbeError::Unsigned => "unsigned",
            ProbeError::BadSignature => "bad_signature",
        }
    }
}

impl ProbePacket {
    /// Total encoded length of this probe.
    pub fn encoded_len(&self, signed: bool) -> usize {
        V1_HEADER_LEN + usize::from(self.pad_len) + if signed { MAC_LEN } else { 0 }
    }

    /// Encode into `out` (cleared first), signing with `key` when given.
    pub fn encode_into(&self, key: Option<&ProbeKey>, out: &mut Vec<u8>) -> Result<(), ProbeError> {
        let total = self.encoded_len(key.is_some());
        if total > MAX_PROBE_LEN {
            return Err(ProbeError::PaddingTooLarge {
                pad_len: self.pad_len,
                max: MAX_PROBE_LEN,
            });
        }
        out.clear();
        out.reserve(total);
        let mut flags = 0;
        if key.is_some() {
            flags |= FLAG_HMAC;
        }
        if self.mtu_probe {
            flags |= FLAG_MTU_PROBE;
        }
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(V1_HEADER_LEN as u8);
        out.push(self.kind.to_byte());
        out.push(flags);
        out.extend_from_slice(&self.pad_len.to_be_bytes());
        out.extend_from_slice(&self.path_tag.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.sent_ns.to_be_bytes());
        out.extend_from_slice(&self.echo_sent_ns.to_be_bytes());
        out.extend_from_slice(&self.reflector_hold_ns.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.resize(V1_HEADER_LEN + usize::from(self.pad_len), 0);
        if let Some(key) = key {
            let mac = compute_mac(key, out);
            out.extend_from_slice(&mac);
        }
        Ok(())
    }

    pub fn encode(&self, key: Option<&ProbeKey>) -> Result<Vec<u8>, ProbeError> {
        let mut out = Vec::new();
        self.encode_into(key, &mut out)?;
        Ok(out)
    }

    /// The reply a reflector sends to this request.
    pub fn reply(&self, reflector_sent_ns: u64, hold_ns: u32, nonce: [u8; 16]) -> ProbePacket {
        ProbePacket {
            kind: ProbeKind::Reply,
            mtu_probe: self.mtu_probe,
            path_tag: self.path_tag,
            sequence: self.sequence,
            sent_ns: reflector_sent_ns,
            echo_sent_ns: self.sent_ns,
            reflector_hold_ns: hold_ns,
            nonce,
            pad_len: 0,
        }
    }
}

fn compute_mac(key: &ProbeKey, signed: &[u8]) -> [u8; MAC_LEN] {
    // HMAC accepts keys of any length, so this cannot fail for a 32-byte key.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key.as_bytes())
        .expect("HMAC-SHA256 takes keys of any length");
    mac.update(signed);
    mac.finalize().into_bytes().into()
}

/// A decoded probe, still holding the bytes its signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedProbe<'a> {
    pub packet: ProbePacket,
    /// The version the sender wrote (may be newer than ours).
    pub version: u8,
    signed: &'a [u8],
    mac: Option<&'a [u8]>,
}

impl DecodedProbe<'_> {
    pub fn is_signed(&self) -> bool {
        self.mac.is_some()
    }

    /// Check the HMAC with the key of the site pair. Unsigned probes are refused.
    pub fn verify(&self, key: &ProbeKey) -> Result<(), ProbeError> {
        let mac = self.mac.ok_or(ProbeError::Unsigned)?;
        let mut check = <HmacSha256 as Mac>::new_from_slice(key.as_bytes())
            .expect("HMAC-SHA256 takes keys of any length");
        check.update(self.signed);
        check
            .verify_slice(mac)
            .map_err(|_| ProbeError::BadSignature)
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(word)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(word)
}

/// Decode a datagram. Never panics: every index below is guarded by the length checks above it.
pub fn decode(bytes: &[u8]) -> Result<DecodedProbe<'_>, ProbeError> {
    if bytes.len() > MAX_PROBE_LEN {
        return Err(ProbeError::TooLarge {
            len: bytes.len(),
            max: MAX_PROBE_LEN,
        });
    }
    if bytes.len() < 4 {
        return Err(ProbeError::Truncated {
            len: bytes.len(),
            need: V1_HEADER_LEN,
        });
    }
    if bytes[0..2] != MAGIC {
        return Err(ProbeError::BadMagic);
    }
    let version = bytes[2];
    if version == 0 {
        return Err(ProbeError::UnsupportedVersion(version));
    }
    let header_len = usize::from(bytes[3]);
    if header_len < V1_HEADER_LEN {
        return Err(ProbeError::BadHeaderLength(bytes[3]));
    }
    if bytes.len() < header_len {
        return Err(ProbeError::Truncated {
            len: bytes.len(),
            need: header_len,
        });
    }
    let kind = match bytes[4] {
        1 => ProbeKind::Request,
        2 => ProbeKind::Reply,
        other => return Err(ProbeError::UnknownKind(other)),
    };
    let flags = bytes[5];
    let pad_len = be_u16(bytes, 6);
    let mac_len = if flags & FLAG_HMAC != 0 { MAC_LEN } else { 0 };
    let expected = header_len + usize::from(pad_len) + mac_len;
    if bytes.len() != expected {
        return Err(ProbeError::LengthMismatch {
            expected,
            got: bytes.len(),
        });
    }
    let mut nonce = [0; 16];
    nonce.copy_from_slice(&bytes[40..56]);
    let packet = ProbePacket {
        kind,
        mtu_probe: flags & FLAG_MTU_PROBE != 0,
        path_tag: be_u32(bytes, 8),
        sequence: be_u64(bytes, 12),
        sent_ns: be_u64(bytes, 20),
        echo_sent_ns: be_u64(bytes, 28),
        reflector_hold_ns: be_u32(bytes, 36),
        nonce,
        pad_len,
    };
    let signed_len = bytes.len() - mac_len;
    Ok(DecodedProbe {
        packet,
        version,
        signed: &bytes[..signed_len],
        mac: (mac_len > 0).then(|| &bytes[signed_len..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProbePacket {
        ProbePacket {
            kind: ProbeKind::Request,
            mtu_probe: false,
            path_tag: 7,
            sequence: 42,
            sent_ns: 1_000_000,
            echo_sent_ns: 0,
            reflector_hold_ns: 0,
            nonce: [9; 16],
            pad_len: 0,
        }
    }

    #[test]
    fn header_layout_is_stable() {
        let bytes = sample().encode(None).unwrap();
        assert_eq!(bytes.len(), V1_HEADER_LEN);
        assert_eq!(&bytes[0..6], &[b'P', b'R', 1, 56, 1, 0]);
        assert_eq!(&bytes[8..12], &7u32.to_be_bytes());
        assert_eq!(&bytes[12..20], &42u64.to_be_bytes());
    }

    #[test]
    fn signed_probe_verifies_only_with_its_key() {
        let key = ProbeKey([1; 32]);
        let bytes = sample().encode(Some(&key)).unwrap();
        let decoded = decode(&bytes).unwrap();
        assert!(decoded.verify(&key).is_ok());
        assert_eq!(
            decoded.verify(&ProbeKey([2; 32])),
            Err(ProbeError::BadSignature)
        );
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let key = ProbeKey([1; 32]);
        let mut bytes = sample().encode(Some(&key)).unwrap();
        bytes[15] ^= 1; // sequence
        assert_eq!(
            decode(&bytes).unwrap().verify(&key),
            Err(ProbeError::BadSignature)
        );
    }

    #[test]
    fn unsigned_probe_is_refused_by_verify() {
        let bytes = sample().encode(None).unwrap();
        assert_eq!(
            decode(&bytes).unwrap().verify(&ProbeKey([1; 32])),
            Err(ProbeError::Unsigned)
        );
    }

    #[test]
    fn newer_version_with_longer_header_is_read() {
        let mut bytes = sample().encode(None).unwrap();
        bytes[2] = 2; // version 2
        bytes[3] = 60; // four more header bytes
        bytes.extend_from_slice(&[0xEE; 4]);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.version, 2);
        assert_eq!(decoded.packet, sample());
    }

    #[test]
    fn oversized_padding_is_refused_on_encode() {
        let probe = ProbePacket {
            pad_len: u16::MAX,
            ..sample()
        };
        assert!(matches!(
            probe.encode(None),
            Err(ProbeError::PaddingTooLarge { .. })
        ));
    }

    #[test]
    fn mtu_probe_padding_is_counted() {
        let probe = ProbePacket {
            pad_len: 1400,
            mtu_probe: true,
            ..sample()
        };
        let key = ProbeKey([3; 32]);
        let bytes = probe.encode(Some(&key)).unwrap();
        assert_eq!(bytes.len(), 56 + 1400 + 32);
        let decoded = decode(&bytes).unwrap();
        assert!(decoded.packet.mtu_probe);
        assert!(decoded.verify(&key).is_ok());
    }

    #[test]
    fn bad_inputs_give_typed_errors() {
        assert!(matches!(decode(&[]), Err(ProbeError::Truncated { .. })));
        assert_eq!(decode(b"XXXXXXXX"), Err(ProbeError::BadMagic));
        let mut bytes = sample().encode(None).unwrap();
        bytes[4] = 9;
        assert_eq!(decode(&bytes), Err(ProbeError::UnknownKind(9)));
        let mut bytes = sample().encode(None).unwrap();
        bytes[3] = 10;
        assert_eq!(decode(&bytes), Err(ProbeError::BadHeaderLength(10)));
        let mut bytes = sample().encode(None).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode(&bytes),
            Err(ProbeError::LengthMismatch { .. })
        ));
        assert!(matches!(
            decode(&vec![0; MAX_PROBE_LEN + 1]),
            Err(ProbeError::TooLarge { .. })
        ));
    }
}
