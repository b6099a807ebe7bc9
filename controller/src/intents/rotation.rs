//! WireGuard key rotation as the database records it (the phases themselves are decided by
//! the pure [`super::compile::key_phase`]).
//!
//! 1. The edge makes its next key pair and sends the public key (`POST /edge/wireguard-key`,
//!    [`crate::api::edge`]): `sites.wg_next_public_key`.
//! 2. The publisher compiles the site in the announce phase (its peers list the next key
//!    beside the current one) and, once those intents are out, records the announcing
//!    revision ([`record_announced`]): the lowest of the peers' latest published revisions,
//!    every one of which carries the next key.
//! 3. Edges report what they applied ([`crate::edge_events`] → `site_intents.applied_revision`).
//!    When every peer is at or above the announcing revision (or the announcement is older than
//!    `provisioning.wireguard_commit_timeout_s`) the publisher compiles the commit phase, and
//!    once those intents are out records the next key as the site's key ([`record_committed`]).

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use patronus_proto::{SiteId, TenantId, WgPublicKey};
use uuid::Uuid;

use crate::api::context::{record_audit, AuditEntry};
use crate::db::schema::{sites, tenants};

/// Record that `site`'s next key went out to its peers in intents at or above `revision`.
/// Does nothing if the site's next key changed meanwhile or the announcement is recorded.
pub async fn record_announced(
    conn: &mut AsyncPgConnection,
    site: SiteId,
    next: WgPublicKey,
    revision: u64,
) -> Result<bool, diesel::result::Error> {
    let updated = diesel::update(
        sites::table
            .filter(sites::id.eq(site.0))
            .filter(sites::wg_next_public_key.eq(next.to_base64()))
            .filter(sites::wg_next_announce_revision.is_null()),
    )
    .set((
        sites::wg_next_announce_revision.eq(Some(i64::try_from(revision).unwrap_or(i64::MAX))),
        sites::wg_next_announced_at.eq(Some(Utc::now())),
    ))
    .execute(conn)
    .await?;
    Ok(updated > 0)
}

/// Record that `site`'s intents now name `next` as its key: it becomes the site's key and the
/// rotation ends, audited. Does nothing if the next key changed meanwhile (a re-enrollment).
pub async fn record_committed(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    site: SiteId,
    next: WgPublicKey,
) -> Result<bool, crate::api::error::ApiError> {
    let row: Option<(String, Option<String>)> = sites::table
        .filter(sites::id.eq(site.0))
        .filter(sites::wg_next_public_key.eq(next.to_base64()))
        .select((sites::name, sites::wg_public_key))
        .for_update()
        .first(conn)
        .await
        .optional()?;
    let Some((name, previous)) = row else {
        return Ok(false);
    };
    diesel::update(sites::table.find(site.0))
        .set((
            sites::wg_public_key.eq(Some(next.to_base64())),
            sites::wg_next_public_key.eq(None::<String>),
            sites::wg_next_submitted_at.eq(None::<chrono::DateTime<Utc>>),
            sites::wg_next_announce_revision.eq(None::<i64>),
            sites::wg_next_announced_at.eq(None::<chrono::DateTime<Utc>>),
            sites::wg_key_rotated_at.eq(Some(Utc::now())),
            sites::updated_at.eq(Utc::now()),
        ))
        .execute(conn)
        .await?;
    let msp: Uuid = tenants::table
        .find(tenant.0)
        .select(tenants::msp_id)
        .first(conn)
        .await?;
    record_audit(
        conn,
        AuditEntry {
            msp_id: msp,
            tenant_id: Some(tenant.0),
            actor_kind: "system",
            actor_id: Uuid::nil(),
            actor_label: "intent publisher (key rotation committed)".into(),
            action: "site.wireguard_key_rotated",
            target_kind: "site",
            target_id: site.0.to_string(),
            detail: serde_json::json!({
                "site": name,
                "previous_public_key": previous,
                "public_key": next.to_base64(),
            }),
            request_id: String::new(),
            source_ip: None,
        },
    )
    .await?;
    Ok(true)
}
