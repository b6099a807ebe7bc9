//! Calls to the controller as this site: every request signed with the site certificate's key
//! ([`patronus_proto::edge_auth`]), and `renew`, which replaces the certificate and NATS
//! credentials with ones for keys made here and now; and the WireGuard key rotation's
//! schedule ([`rotation_step`]) and announcement ([`announce_wireguard_key`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use patronus_proto::edge_auth::{
    canonical_request, CERTIFICATE_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use patronus_proto::enroll::{
    creds_file, EdgeStatus, RenewRequest, RenewResponse, WireguardKeyRequest, WireguardKeyResponse,
};
use patronus_proto::WgPublicKey;
use rand::RngCore;
use rcgen::SigningKey;

use crate::state::{self, Identity, StateDir};

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The base64 DER inside a PEM certificate.
fn certificate_der_b64(pem: &str) -> anyhow::Result<String> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(&body)
        .context("site.crt is not a PEM certificate")?;
    Ok(body)
}

/// The controller answered with an error (`{"error", "detail"}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub code: String,
    pub detail: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the controller refused ({} {}): {}",
            self.status, self.code, self.detail
        )
    }
}

impl std::error::Error for Refused {}

/// Send `method path` with `body`, signed; returns the JSON answer or the controller's error
/// (a [`Refused`] when it answered one).
fn signed_call<T: serde::de::DeserializeOwned>(
    state: &StateDir,
    identity: &Identity,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<T> {
    let key = rcgen::KeyPair::from_pem(&state.read(state::SITE_KEY_FILE)?)
        .context("site.key is damaged; enroll again")?;
    let certificate = certificate_der_b64(&state.read(state::SITE_CERT_FILE)?)?;
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs() as i64;
    let mut nonce_bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut nonce_bytes);
    let nonce: String = nonce_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let signature = key
        .sign(&canonical_request(method, path, timestamp, &nonce, body))
        .context("signing the request")?;
    let url = format!("{}{path}", identity.controller_url);
    let request = ureq::request(method, &url)
        .timeout(CALL_TIMEOUT)
        .set(CERTIFICATE_HEADER, &certificate)
        .set(TIMESTAMP_HEADER, &timestamp.to_string())
        .set(NONCE_HEADER, &nonce)
        .set(
            SIGNATURE_HEADER,
            &base64::engine::general_purpose::STANDARD.encode(signature),
        );
    let response = if body.is_empty() {
        request.call()
    } else {
        request
            .set("Content-Type", "application/json")
            .send_bytes(body)
    };
    match response {
        Ok(r) => r
            .into_json()
            .context("the controller's answer does not decode"),
        Err(ureq::Error::Status(code, r)) => {
            let body: serde_json::Value = r.into_json().unwrap_or_default();
            Err(Refused {
                status: code,
                code: body["error"].as_str().unwrap_or("error").to_owned(),
                detail: body["detail"].as_str().unwrap_or("no detail").to_owned(),
            }
            .into())
        }
        Err(e) => bail!(
            "cannot reach the controller at {}: {e}",
            identity.controller_url
        ),
    }
}

/// What the controller knows of this site.
pub fn remote_status(state: &StateDir, identity: &Identity) -> anyhow::Result<EdgeStatus> {
    signed_call(state, identity, "GET", "/api/v1/edge/status", b"")
}

/// New certificate key and NATS nkey, a new certificate and NATS user for them, swapped in
/// as one set. The old ones stay valid until they expire.
/// Whether the credentials issued at `issued` and expiring at `expires` (Unix seconds) are
/// due for renewal at `now`: past two thirds of their lifetime, as with ACME clients, so a
/// failing controller leaves a third of the lifetime for retries.
pub fn renewal_due(now: i64, issued: i64, expires: i64) -> bool {
    let lifetime = expires.saturating_sub(issued).max(0);
    now >= issued.saturating_add(lifetime / 3 * 2)
}

pub fn renew(state: &StateDir) -> anyhow::Result<Identity> {
    let mut identity = state.identity()?;
    eprintln!("renew: generating a new certificate key and NATS key");
    let cert_key = rcgen::KeyPair::generate().context("generating the certificate key")?;
    let nats_key = nkeys::KeyPair::new_user();
    let request = RenewRequest {
        csr_pem: crate::enroll::site_csr(&cert_key, identity.tenant_id, identity.site_id)?,
        nats_public_key: nats_key.public_key(),
    };
    eprintln!(
        "renew: asking {} (signed with the current certificate)",
        identity.controller_url
    );
    let answer: RenewResponse = signed_call(
        state,
        &identity,
        "POST",
        "/api/v1/edge/renew",
        &serde_json::to_vec(&request)?,
    )?;
    let seed = nats_key
        .seed()
        .map_err(|e| anyhow::anyhow!("NATS seed: {e}"))?;
    identity.expires_at = answer.expires_at;
    identity.renewed_at = Some(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    );
    identity.nats_url = answer.nats.url.clone();
    identity.inbox_prefix = answer.nats.inbox_prefix.clone();
    let identity_json = serde_json::to_string_pretty(&identity)?;
    let creds = creds_file(&answer.nats.user_jwt, &seed);
    let key_pem = cert_key.serialize_pem();
    state.replace_all(&[
        (state::SITE_KEY_FILE, key_pem.as_bytes()),
        (state::SITE_CERT_FILE, answer.certificate_pem.as_bytes()),
        (state::CA_CERT_FILE, answer.ca_certificate_pem.as_bytes()),
        (state::NATS_CREDS_FILE, creds.as_bytes()),
        (state::IDENTITY_FILE, identity_json.as_bytes()),
    ])?;
    eprintln!(
        "renew: site {} has a new certificate and NATS credentials, valid until unix {}",
        identity.site_name, identity.expires_at
    );
    Ok(identity)
}

/// Send the public key of this site's next WireGuard key (signed). The private key stays
/// here; the controller rotates the key in through the intents.
pub fn announce_wireguard_key(
    state: &StateDir,
    identity: &Identity,
    public_key: WgPublicKey,
) -> anyhow::Result<WireguardKeyResponse> {
    signed_call(
        state,
        identity,
        "POST",
        "/api/v1/edge/wireguard-key",
        &serde_json::to_vec(&WireguardKeyRequest { public_key })?,
    )
}

/// While the controller has a next key but has not committed it, the agent sends it again
/// this often (a controller restored from a backup would otherwise never finish the rotation).
pub const REANNOUNCE_AFTER_S: i64 = 3600;

/// What the WireGuard key rotation should do at the minute's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    /// Nothing: not due, or waiting for the controller to commit the next key.
    Wait,
    /// Make the next key pair (then announce it).
    MakeKey,
    /// Send the next key's public key (again).
    Announce,
}

/// The rotation's next step at `now` (Unix seconds), for a current key made at
/// `key_made_at`, rotated every `rotate_after_s` (`None`: never), with a next key or not and,
/// if the controller accepted it, when. A rotation already under way is finished even if
/// rotation was turned off meanwhile (the controller may be announcing it to peers).
pub fn rotation_step(
    now: i64,
    key_made_at: i64,
    rotate_after_s: Option<i64>,
    has_next: bool,
    next_accepted_at: Option<i64>,
) -> RotationStep {
    if has_next {
        return match next_accepted_at {
            None => RotationStep::Announce,
            Some(at) if now >= at.saturating_add(REANNOUNCE_AFTER_S) => RotationStep::Announce,
            Some(_) => RotationStep::Wait,
        };
    }
    match rotate_after_s {
        Some(after) if now >= key_made_at.saturating_add(after.max(0)) => RotationStep::MakeKey,
        _ => RotationStep::Wait,
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::{rotation_step, RotationStep, REANNOUNCE_AFTER_S};

    const DAY: i64 = 86_400;

    #[test]
    fn a_key_is_made_once_it_is_as_old_as_the_schedule_says() {
        let made = 1_000;
        let every = Some(30 * DAY);
        assert_eq!(
            rotation_step(made, made, every, false, None),
            RotationStep::Wait
        );
        assert_eq!(
            rotation_step(made + 30 * DAY - 1, made, every, false, None),
            RotationStep::Wait
        );
        assert_eq!(
            rotation_step(made + 30 * DAY, made, every, false, None),
            RotationStep::MakeKey
        );
        // Never, however old.
        assert_eq!(
            rotation_step(made + 3_650 * DAY, made, None, false, None),
            RotationStep::Wait
        );
        // A clock behind the key's birth waits.
        assert_eq!(
            rotation_step(made - 5, made, Some(0), false, None),
            RotationStep::Wait
        );
    }

    #[test]
    fn a_next_key_is_announced_until_accepted_and_again_hourly_until_committed() {
        let made = 1_000;
        let now = made + 40 * DAY;
        assert_eq!(
            rotation_step(now, made, Some(30 * DAY), true, None),
            RotationStep::Announce
        );
        assert_eq!(
            rotation_step(now, made, Some(30 * DAY), true, Some(now - 60)),
            RotationStep::Wait
        );
        assert_eq!(
            rotation_step(
                now,
                made,
                Some(30 * DAY),
                true,
                Some(now - REANNOUNCE_AFTER_S)
            ),
            RotationStep::Announce
        );
        // Turning rotation off does not strand a rotation under way.
        assert_eq!(
            rotation_step(now, made, None, true, None),
            RotationStep::Announce
        );
    }
}

#[cfg(test)]
mod renewal_tests {
    use super::renewal_due;

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_lifetime() {
        let (issued, expires) = (1_000, 1_000 + 90 * 86_400);
        assert!(!renewal_due(issued, issued, expires));
        assert!(!renewal_due(issued + 60 * 86_400 - 1, issued, expires));
        assert!(renewal_due(issued + 60 * 86_400, issued, expires));
        assert!(renewal_due(expires + 1, issued, expires));
        // Nonsense (expiry before issue) renews at once rather than never.
        assert!(renewal_due(issued, issued, issued - 5));
    }
}
