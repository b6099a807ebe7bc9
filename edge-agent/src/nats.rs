//! The edge's NATS link: its own credentials from the state directory, its own inbox prefix
//! (its permissions allow no other), and the reads its grant allows.

use std::time::Duration;

use anyhow::Context;
use patronus_proto::{codec, SiteIntent};

use crate::state::{Identity, StateDir, NATS_CREDS_FILE};

/// Connect as this site.
pub async fn connect(state: &StateDir, identity: &Identity) -> anyhow::Result<async_nats::Client> {
    let creds = state.read(NATS_CREDS_FILE)?;
    async_nats::ConnectOptions::with_credentials(&creds)
        .context("nats.creds is damaged; enroll again with a new token")?
        .custom_inbox_prefix(identity.inbox_prefix.clone())
        .name(format!("patronus-edge {}", identity.site_name))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(identity.nats_url.as_str())
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {} as site {}; check the network, or whether the site was revoked",
                identity.nats_url, identity.site_name
            )
        })
}

/// The raw current value of the site's intent key (`None` when nothing is published).
pub async fn fetch_intent_bytes(
    client: &async_nats::Client,
    identity: &Identity,
) -> anyhow::Result<Option<Vec<u8>>> {
    let reply = client
        .request(identity.intent.direct_get_subject.clone(), "".into())
        .await
        .context("reading the intent from NATS")?;
    if reply.status == Some(async_nats::StatusCode::NOT_FOUND) || reply.payload.is_empty() {
        return Ok(None);
    }
    Ok(Some(reply.payload.to_vec()))
}

/// The site's current intent, if one is published (a direct get of its one key).
pub async fn fetch_intent(
    client: &async_nats::Client,
    identity: &Identity,
) -> anyhow::Result<Option<SiteIntent>> {
    match fetch_intent_bytes(client, identity).await? {
        None => Ok(None),
        Some(bytes) => Ok(Some(
            codec::decode(&bytes).context("the published intent does not decode")?,
        )),
    }
}
