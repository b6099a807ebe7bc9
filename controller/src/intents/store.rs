//! Reading a tenant's snapshot from PostgreSQL, and keeping its `paths` rows in step with the
//! topology. Every query runs in a transaction scoped to the tenant (row-level security).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ipnet::IpNet;
use patronus_proto::intent::{FailoverSettings, ProbeSettings};
use patronus_proto::policy::LinkKind;
use patronus_proto::{PathId, SiteId, TenantId, WgPublicKey};
use uuid::Uuid;

use super::compile::{PolicySnapshot, SiteSnapshot, TenantSnapshot, UplinkSnapshot};
use crate::api::policies::{compile as compile_policy, PolicyKind};
use crate::db::schema::{endpoints, paths, policies, site_intents, sites, tenants};
use crate::topology::TopologySettings;

/// Key of a path: (src site, src uplink, dst site, dst uplink).
pub type PathKey = (SiteId, u8, SiteId, u8);

/// The snapshot's key-rotation commit timeout unless the publisher is told otherwise
/// (`provisioning.wireguard_commit_timeout_s`, default a day).
pub const DEFAULT_ROTATION_COMMIT_TIMEOUT_MS: u64 = 86_400_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("tenant {0} not found")]
    NoTenant(TenantId),
    #[error("tenant {tenant} has an unreadable topology setting: {detail}")]
    BadTopology { tenant: TenantId, detail: String },
}

fn link_kind(text: &str) -> LinkKind {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).unwrap_or(LinkKind::Other)
}

/// Load everything that decides the tenant's intents. Call inside a tenant-scoped transaction.
pub async fn load_snapshot(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
) -> Result<TenantSnapshot, StoreError> {
    let (overlay_network, topology_json): (IpNet, serde_json::Value) = tenants::table
        .find(tenant.0)
        .select((tenants::overlay_network, tenants::topology))
        .first(conn)
        .await
        .optional()?
        .ok_or(StoreError::NoTenant(tenant))?;
    let topology: TopologySettings =
        serde_json::from_value(topology_json).map_err(|e| StoreError::BadTopology {
            tenant,
            detail: e.to_string(),
        })?;

    type SiteTuple = (
        Uuid,
        String,
        Option<String>,
        String,
        String,
        Option<String>,
        Option<IpNet>,
        Vec<IpNet>,
        i32,
        (
            Option<String>,
            Option<i64>,
            Option<chrono::DateTime<chrono::Utc>>,
        ),
    );
    let site_rows: Vec<SiteTuple> = sites::table
        .select((
            sites::id,
            sites::name,
            sites::region,
            sites::role,
            sites::status,
            sites::wg_public_key,
            sites::overlay_address,
            sites::lan_prefixes,
            sites::listen_port_base,
            (
                sites::wg_next_public_key,
                sites::wg_next_announce_revision,
                sites::wg_next_announced_at,
            ),
        ))
        .order(sites::id)
        .load(conn)
        .await?;
    // What each site's edge reported applied (for key rotations).
    let applied: HashMap<Uuid, u64> = site_intents::table
        .filter(site_intents::applied_revision.is_not_null())
        .select((site_intents::site_id, site_intents::applied_revision))
        .load::<(Uuid, Option<i64>)>(conn)
        .await?
        .into_iter()
        .filter_map(|(site, applied)| Some((site, u64::try_from(applied?).ok()?)))
        .collect();
    type UplinkTuple = (
        Uuid,
        Uuid,
        i16,
        String,
        IpNet,
        String,
        Option<i32>,
        f64,
        bool,
    );
    let uplink_rows: Vec<UplinkTuple> = endpoints::table
        .select((
            endpoints::id,
            endpoints::site_id,
            endpoints::uplink_index,
            endpoints::name,
            endpoints::address,
            endpoints::interface_type,
            endpoints::bandwidth_mbps,
            endpoints::cost_per_gb,
            endpoints::metered,
        ))
        .order((endpoints::site_id, endpoints::uplink_index))
        .load(conn)
        .await?;
    let mut uplinks: HashMap<Uuid, Vec<UplinkSnapshot>> = HashMap::new();
    let mut endpoint_index: HashMap<Uuid, (SiteId, u8)> = HashMap::new();
    for (id, site, index, name, address, kind, bandwidth, cost, metered) in uplink_rows {
        let Ok(index) = u8::try_from(index) else {
            continue;
        };
        endpoint_index.insert(id, (SiteId(site), index));
        uplinks.entry(site).or_default().push(UplinkSnapshot {
            index,
            name,
            address: address.addr(),
            kind: link_kind(&kind),
            bandwidth_mbps: bandwidth.and_then(|b| u32::try_from(b).ok()),
            cost_per_gb: cost,
            metered,
        });
    }
    let sites = site_rows
        .into_iter()
        .map(
            |(id, name, region, role, status, key, overlay, lans, port, next)| SiteSnapshot {
                id: SiteId(id),
                name,
                region,
                hub: role == "hub",
                revoked: status == "revoked",
                public_key: key.and_then(|k| k.parse::<WgPublicKey>().ok()),
                overlay_address: overlay.map(|o| o.addr()),
                lan_prefixes: lans,
                listen_port_base: u16::try_from(port).unwrap_or(51820),
                uplinks: uplinks.remove(&id).unwrap_or_default(),
                next_public_key: next.0.and_then(|k| k.parse::<WgPublicKey>().ok()),
                next_announce_revision: next.1.and_then(|r| u64::try_from(r).ok()),
                next_announced_at_unix_ms: next
                    .2
                    .and_then(|at| u64::try_from(at.timestamp_millis()).ok()),
                applied_revision: applied.get(&id).copied(),
            },
        )
        .collect();

    type PolicyTuple = (
        Uuid,
        String,
        String,
        i32,
        serde_json::Value,
        Option<Vec<Uuid>>,
    );
    let policy_rows: Vec<PolicyTuple> = policies::table
        .filter(policies::enabled.eq(true))
        .select((
            policies::id,
            policies::name,
            policies::kind,
            policies::priority,
            policies::spec,
            policies::site_ids,
        ))
        .order(policies::id)
        .load(conn)
        .await?;
    let mut compiled_policies = Vec::new();
    for (id, name, kind, priority, spec, site_ids) in policy_rows {
        let Some(kind) = PolicyKind::parse(&kind) else {
            continue;
        };
        let priority = u16::try_from(priority).unwrap_or(u16::MAX);
        match compile_policy(id, &name, kind, priority, true, &spec) {
            Ok(policy) => compiled_policies.push(PolicySnapshot {
                policy,
                site_ids: site_ids.map(|ids| ids.into_iter().map(SiteId).collect()),
            }),
            // Validated when written; a policy that no longer compiles (a newer rule, say) is
            // left out of intents rather than blocking every site.
            Err(e) => {
                tracing::warn!(tenant = %tenant, policy = %id, error = %e.detail, "policy skipped")
            }
        }
    }

    let path_rows: Vec<(Uuid, Uuid, Uuid)> = paths::table
        .select((paths::id, paths::src_endpoint_id, paths::dst_endpoint_id))
        .load(conn)
        .await?;
    let mut path_ids = BTreeMap::new();
    for (id, src, dst) in path_rows {
        if let (Some((s, si)), Some((d, di))) = (endpoint_index.get(&src), endpoint_index.get(&dst))
        {
            path_ids.insert((*s, *si, *d, *di), PathId(id));
        }
    }

    Ok(TenantSnapshot {
        tenant,
        overlay_network,
        topology,
        sites,
        policies: compiled_policies,
        path_ids,
        probe: ProbeSettings::default(),
        failover: FailoverSettings::default(),
        wireguard_mtu: 1420,
        persistent_keepalive_s: 25,
        rotation_commit_timeout_ms: DEFAULT_ROTATION_COMMIT_TIMEOUT_MS,
    })
}

/// Create the path rows the topology needs and delete the ones it no longer uses (with their
/// metrics history). Returns (created, deleted).
pub async fn sync_paths(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    wanted: &BTreeSet<PathKey>,
) -> Result<(usize, usize), StoreError> {
    let endpoint_rows: Vec<(Uuid, Uuid, i16)> = endpoints::table
        .select((endpoints::id, endpoints::site_id, endpoints::uplink_index))
        .load(conn)
        .await?;
    let by_key: HashMap<(Uuid, i16), Uuid> = endpoint_rows
        .iter()
        .map(|(id, site, index)| ((*site, *index), *id))
        .collect();
    let by_id: HashMap<Uuid, (Uuid, i16)> = endpoint_rows
        .iter()
        .map(|(id, site, index)| (*id, (*site, *index)))
        .collect();
    let existing: Vec<(Uuid, Uuid, Uuid)> = paths::table
        .select((paths::id, paths::src_endpoint_id, paths::dst_endpoint_id))
        .load(conn)
        .await?;
    let mut have = BTreeSet::new();
    let mut stale = Vec::new();
    for (id, src, dst) in existing {
        let key = by_id
            .get(&src)
            .zip(by_id.get(&dst))
            .map(|((s, si), (d, di))| (SiteId(*s), *si as u8, SiteId(*d), *di as u8));
        match key {
            Some(key) if wanted.contains(&key) => {
                have.insert(key);
            }
            _ => stale.push(id),
        }
    }
    let rows: Vec<_> = wanted
        .difference(&have)
        .filter_map(|(src_site, src_index, dst_site, dst_index)| {
            let src = by_key.get(&(src_site.0, i16::from(*src_index)))?;
            let dst = by_key.get(&(dst_site.0, i16::from(*dst_index)))?;
            Some((
                paths::tenant_id.eq(tenant.0),
                paths::src_site_id.eq(src_site.0),
                paths::dst_site_id.eq(dst_site.0),
                paths::src_endpoint_id.eq(*src),
                paths::dst_endpoint_id.eq(*dst),
            ))
        })
        .collect();
    let mut created = 0;
    for chunk in rows.chunks(1000) {
        created += diesel::insert_into(paths::table)
            .values(chunk.to_vec())
            .on_conflict_do_nothing()
            .execute(conn)
            .await?;
    }
    let deleted = if stale.is_empty() {
        0
    } else {
        diesel::delete(paths::table.filter(paths::id.eq_any(&stale)))
            .execute(conn)
            .await?
    };
    Ok((created, deleted))
}
