//! Intent compilation and publishing against the real PostgreSQL, Redis and NATS JetStream:
//! revisions, idempotency, per-site scoping of policy changes, tenant separation, withdrawal,
//! debouncing, and a second replica taking over the publisher lease when the first dies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use patronus_controller::api::policies::PolicyKind;
use patronus_controller::db::{self, schema, Scope};
use patronus_controller::intents::publish::publish_tenant;
use patronus_controller::server::AppState;
use patronus_proto::{codec, SiteId, SiteIntent, TenantId};
use patronus_test_support::{TestDatabase, TestEnv};
use uuid::Uuid;

struct Tenant {
    id: TenantId,
    sites: Vec<SiteId>,
}

/// An MSP with one tenant of `n` enrolled sites (two uplinks each), written as the owner.
async fn seed_tenant(database: &TestDatabase, n: u8, third_octet: u8) -> anyhow::Result<Tenant> {
    let msp = Uuid::new_v4();
    let tenant = Uuid::new_v4();
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    let mut sql = format!(
        "INSERT INTO msps (id, name) VALUES ('{msp}', 'msp {msp}');
         INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{tenant}', '{msp}', 't', 't{third_octet}');"
    );
    let mut sites = Vec::new();
    for i in 1..=n {
        let site = Uuid::new_v4();
        // A distinct WireGuard public key per site.
        let mut raw = [0u8; 32];
        raw[..16].copy_from_slice(site.as_bytes());
        raw[16..].copy_from_slice(Uuid::new_v4().as_bytes());
        let key = patronus_proto::WgPublicKey(raw).to_base64();
        sql.push_str(&format!(
            "INSERT INTO sites (id, tenant_id, name, region, overlay_address, lan_prefixes, wg_public_key, status)
                 VALUES ('{site}', '{tenant}', 'site{i}', 'eu-west', '100.64.0.{i}', ARRAY['10.{third_octet}.{i}.0/24']::cidr[], '{key}', 'active');
             INSERT INTO endpoints (tenant_id, site_id, uplink_index, name, address, interface_type)
                 VALUES ('{tenant}', '{site}', 0, 'fiber', '198.18.{third_octet}.{i}', 'fiber'),
                        ('{tenant}', '{site}', 1, 'lte', '198.19.{third_octet}.{i}', 'lte');"
        ));
        sites.push(SiteId(site));
    }
    owner
        .batch_execute(&sql)
        .await
        .context("seeding a tenant")?;
    Ok(Tenant {
        id: TenantId(tenant),
        sites,
    })
}

async fn state(
    env: &TestEnv,
    database: &TestDatabase,
    lease_ttl_ms: u64,
) -> anyhow::Result<AppState> {
    let mut config = env.controller_config(&database.app_url)?;
    config.intents.lease_ttl_ms = lease_ttl_ms;
    config.intents.debounce_ms = 100;
    config.validate()?;
    Ok(AppState::connect(&config).await?)
}

async fn read_intents(
    state: &AppState,
    tenant: &Tenant,
) -> anyhow::Result<BTreeMap<SiteId, SiteIntent>> {
    let bucket = state.tenant_nats(tenant.id).await?.intents;
    let mut out = BTreeMap::new();
    for site in &tenant.sites {
        let key = patronus_proto::subjects::intent_key(tenant.id, *site);
        if let Some(bytes) = bucket.get(&key).await? {
            out.insert(*site, codec::decode::<SiteIntent>(&bytes)?);
        }
    }
    Ok(out)
}

async fn add_policy(
    state: &AppState,
    tenant: TenantId,
    site_ids: Option<Vec<SiteId>>,
) -> anyhow::Result<()> {
    let spec = serde_json::json!({
        "match": { "protocol": "udp", "dst_ports": [{ "start": 5060, "end": 5061 }] },
        "app_class": "voip",
        "path_preference": { "kind": "lowest_latency" }
    });
    let id = Uuid::new_v4();
    patronus_controller::api::policies::compile(id, "voip", PolicyKind::Routing, 200, true, &spec)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut conn = state.db.get().await?;
    let ids: Option<Vec<Uuid>> = site_ids.map(|s| s.into_iter().map(|s| s.0).collect());
    db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            use diesel::prelude::*;
            use diesel_async::RunQueryDsl;
            use schema::policies as p;
            diesel::insert_into(p::table)
                .values((
                    p::id.eq(id),
                    p::tenant_id.eq(tenant.0),
                    p::name.eq(format!("voip-{id}")),
                    p::kind.eq("routing"),
                    p::priority.eq(200),
                    p::spec.eq(spec),
                    p::site_ids.eq(ids),
                ))
                .execute(conn)
                .await
                .map(|_| ())
        })
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn revisions_rise_only_for_the_sites_a_change_affects() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let a = seed_tenant(&database, 3, 1).await?;
    let b = seed_tenant(&database, 2, 2).await?;
    let state = state(&env, &database, 5000).await?;
    let bucket = state.tenant_nats(a.id).await?.intents;
    let b_bucket = state.tenant_nats(b.id).await?.intents;

    // First publish: every site, each with the other two as peers and 2×2 paths per peer.
    let first = publish_tenant(&state.db, &bucket, a.id, &state.probe_secret).await?;
    ensure!(first.published.len() == 3, "first publish: {first:?}");
    let intents = read_intents(&state, &a).await?;
    ensure!(intents.len() == 3);
    for intent in intents.values() {
        ensure!(intent.tenant == a.id);
        ensure!(
            intent.peers.len() == 2 && intent.paths.len() == 8,
            "peers {} paths {}",
            intent.peers.len(),
            intent.paths.len()
        );
        ensure!(
            intent.peers.iter().all(|p| a.sites.contains(&p.site)),
            "a peer from outside the tenant"
        );
    }

    // Nothing changed: nothing is republished.
    let again = publish_tenant(&state.db, &bucket, a.id, &state.probe_secret).await?;
    ensure!(
        again.published.is_empty() && again.unchanged == 3,
        "idempotent publish: {again:?}"
    );

    // A policy for site 1 only: exactly one new revision, for site 1.
    add_policy(&state, a.id, Some(vec![a.sites[0]])).await?;
    let scoped = publish_tenant(&state.db, &bucket, a.id, &state.probe_secret).await?;
    ensure!(
        scoped.published.len() == 1 && scoped.published[0].0 == a.sites[0],
        "scoped policy: {scoped:?}"
    );
    let after = read_intents(&state, &a).await?;
    ensure!(after[&a.sites[0]].revision > intents[&a.sites[0]].revision);
    ensure!(after[&a.sites[0]].policies.routing.len() == 1);
    ensure!(after[&a.sites[1]].revision == intents[&a.sites[1]].revision);
    ensure!(after[&a.sites[2]].revision == intents[&a.sites[2]].revision);

    // A tenant-wide policy: every site of A, none of B.
    let b_first = publish_tenant(&state.db, &b_bucket, b.id, &state.probe_secret).await?;
    ensure!(b_first.published.len() == 2);
    let b_before = read_intents(&state, &b).await?;
    add_policy(&state, a.id, None).await?;
    let wide = publish_tenant(&state.db, &bucket, a.id, &state.probe_secret).await?;
    ensure!(wide.published.len() == 3, "{wide:?}");
    let b_again = publish_tenant(&state.db, &b_bucket, b.id, &state.probe_secret).await?;
    ensure!(
        b_again.published.is_empty(),
        "tenant B changed with A's policy: {b_again:?}"
    );
    ensure!(read_intents(&state, &b).await? == b_before);
    let revisions: Vec<u64> = read_intents(&state, &a)
        .await?
        .values()
        .map(|i| i.revision)
        .collect();
    ensure!(
        revisions
            .iter()
            .all(|r| *r > b_before.values().map(|i| i.revision).max().unwrap_or(0)),
        "revisions rise across tenants"
    );

    // Revoking a site withdraws its intent and drops it from its peers.
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner
        .batch_execute(&format!(
            "UPDATE sites SET status = 'revoked' WHERE id = '{}'",
            a.sites[2]
        ))
        .await?;
    let revoked = publish_tenant(&state.db, &bucket, a.id, &state.probe_secret).await?;
    ensure!(
        revoked.withdrawn == 1 && revoked.published.len() == 2,
        "{revoked:?}"
    );
    let left = read_intents(&state, &a).await?;
    ensure!(
        !left.contains_key(&a.sites[2]),
        "the revoked site's intent is still readable"
    );
    ensure!(left
        .values()
        .all(|i| i.peers.len() == 1 && i.peers[0].site != a.sites[2]));

    drop(owner);
    state.db.close();
    drop(state);
    database.drop_now().await
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check().await? {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_replica_takes_over_publishing_when_the_first_dies() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let tenant = seed_tenant(&database, 2, 3).await?;
    let first = state(&env, &database, 1000).await?;
    let second = state(&env, &database, 1000).await?;

    let (stop_first, rx_first) = tokio::sync::watch::channel(false);
    let (stop_second, rx_second) = tokio::sync::watch::channel(false);
    let task_first = tokio::spawn(patronus_controller::intents::service::run(
        first.clone(),
        rx_first,
    ));
    // Let the first win the lease, then start the second.
    wait_for("the first replica to lead", Duration::from_secs(5), || {
        let s = first.clone();
        async move { Ok(s.metrics.intent_publisher_leader.get() == 1) }
    })
    .await?;
    let task_second = tokio::spawn(patronus_controller::intents::service::run(
        second.clone(),
        rx_second,
    ));
    // The initial reconcile publishes both sites (counted once publish_tenant returns).
    wait_for("the initial reconcile", Duration::from_secs(5), || {
        let s = first.clone();
        async move { Ok(s.metrics.intents_published.get() >= 2) }
    })
    .await?;
    ensure!(read_intents(&first, &tenant).await?.len() == 2);
    ensure!(
        second.metrics.intent_publisher_leader.get() == 0,
        "two leaders"
    );

    // A burst of signals for one change gives one publish per site.
    let published_before = first.metrics.intents_published.get();
    add_policy(&first, tenant.id, None).await?;
    for _ in 0..10 {
        second.intents_changed(tenant.id).await;
    }
    wait_for("the debounced publish", Duration::from_secs(5), || {
        let s = first.clone();
        async move { Ok(s.metrics.intents_published.get() >= published_before + 2) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        first.metrics.intents_published.get() == published_before + 2,
        "a burst gave {} publishes for 2 sites",
        first.metrics.intents_published.get() - published_before
    );

    // The leader dies without releasing its lease; the second takes over within the TTL.
    task_first.abort();
    let _ = task_first.await;
    drop(stop_first);
    let died = Instant::now();
    wait_for("the second replica to lead", Duration::from_secs(5), || {
        let s = second.clone();
        async move { Ok(s.metrics.intent_publisher_leader.get() == 1) }
    })
    .await?;
    let takeover = died.elapsed();
    let revision_before = read_intents(&second, &tenant)
        .await?
        .values()
        .map(|i| i.revision)
        .max()
        .unwrap_or(0);
    add_policy(&second, tenant.id, Some(vec![tenant.sites[0]])).await?;
    second.intents_changed(tenant.id).await;
    wait_for(
        "a publish by the new leader",
        Duration::from_secs(5),
        || {
            let (s, t) = (second.clone(), &tenant);
            async move {
                Ok(read_intents(&s, t)
                    .await?
                    .values()
                    .any(|i| i.revision > revision_before))
            }
        },
    )
    .await?;
    println!(
        "publisher takeover after the leader died: {} ms",
        takeover.as_millis()
    );
    ensure!(
        takeover < Duration::from_secs(3),
        "takeover took {takeover:?}"
    );

    let _ = stop_second.send(true);
    let _ = task_second.await;
    ensure!(
        second.metrics.intent_publisher_leader.get() == 0,
        "the lease was not released on shutdown"
    );
    for s in [first, second] {
        s.db.close();
    }
    database.drop_now().await
}

/// A site that enrolls while a publish round is between reading the tenant and reading it
/// again (after creating the paths the first read asked for) is published with every path to
/// its peers, not as a peer without paths. The enrollment is made deterministic by a trigger
/// on `paths` that gives the late site its WireGuard key inside the round's first path sync,
/// which is exactly what a concurrent enrollment committing at that moment looks like to the
/// round's second read.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_enrolling_during_a_publish_round_gets_all_its_paths() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let mut tenant = seed_tenant(&database, 3, 7).await?;
    let late = Uuid::new_v4();
    let mut raw = [0u8; 32];
    raw[..16].copy_from_slice(late.as_bytes());
    raw[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    let key = patronus_proto::WgPublicKey(raw).to_base64();
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner
        .batch_execute(&format!(
            "INSERT INTO sites (id, tenant_id, name, region, overlay_address, lan_prefixes, status)
                 VALUES ('{late}', '{t}', 'late', 'eu-west', '100.64.0.9', ARRAY['10.7.9.0/24']::cidr[], 'active');
             INSERT INTO endpoints (tenant_id, site_id, uplink_index, name, address, interface_type)
                 VALUES ('{t}', '{late}', 0, 'fiber', '198.18.7.9', 'fiber'),
                        ('{t}', '{late}', 1, 'lte', '198.19.7.9', 'lte');
             CREATE FUNCTION test_enroll_late() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
                 UPDATE sites SET wg_public_key = '{key}' WHERE id = '{late}' AND wg_public_key IS NULL;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER test_enroll_late AFTER INSERT ON paths
                 FOR EACH STATEMENT EXECUTE FUNCTION test_enroll_late();",
            t = tenant.id.0
        ))
        .await
        .context("adding the late site and its trigger")?;
    tenant.sites.push(SiteId(late));
    let state = state(&env, &database, 5000).await?;
    let bucket = state.tenant_nats(tenant.id).await?.intents;

    let round = publish_tenant(&state.db, &bucket, tenant.id, &state.probe_secret).await?;
    ensure!(
        round.published.len() == 4,
        "one round publishes all four: {round:?}"
    );
    let intents = read_intents(&state, &tenant).await?;
    ensure!(intents.len() == 4, "intents for {} sites", intents.len());
    for (site, intent) in &intents {
        for peer in &intent.peers {
            let paths = intent
                .paths
                .iter()
                .filter(|p| p.remote_site == peer.site)
                .count();
            ensure!(
                paths == 4,
                "site {site}'s intent lists peer {} with {paths} paths (2 uplinks each side: 4)",
                peer.site
            );
        }
        ensure!(
            intent.peers.len() == 3,
            "site {site}: {} peers",
            intent.peers.len()
        );
    }
    drop(owner);
    state.db.close();
    drop(state);
    database.drop_now().await
}
