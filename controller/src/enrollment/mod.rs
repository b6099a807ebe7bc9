//! Zero-touch provisioning: enrollment tokens and their redemption.
//!
//! - [`token`]: mint and verify the EdDSA-signed token (pure).
//! - The HTTP side (`/enrollment-tokens`, `/enroll`) is [`crate::api::enrollment`]; the CLI's
//!   `token create` shares its transaction code.

pub mod token;

pub use token::{EnrollmentClaims, TokenError, TokenKeys};

/// Parse a lifetime like `90s`, `15m`, `1h` or `2d` into seconds.
pub fn parse_ttl(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let value: u64 = digits.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    value.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttls_parse() {
        assert_eq!(super::parse_ttl("1h"), Some(3600));
        assert_eq!(super::parse_ttl("90s"), Some(90));
        assert_eq!(super::parse_ttl("2d"), Some(172_800));
        for bad in ["", "h", "10", "1w", "-1h", "1.5h"] {
            assert_eq!(super::parse_ttl(bad), None, "{bad}");
        }
    }
}
