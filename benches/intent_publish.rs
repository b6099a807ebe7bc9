//! Compile and publish intents for 1,000 sites after one policy change, against the real
//! PostgreSQL and NATS JetStream (goal: all published within 1 s).
//!
//! Run: `cargo bench -p patronus-integration-tests --bench intent_publish`
//! Seeds a throwaway database with one tenant of 1,000 enrolled sites (two uplinks each,
//! hierarchical topology with 10 hubs), publishes once, then adds a tenant-wide policy and
//! times the publish that follows, five times. Prints one JSON line.

use std::time::Instant;

use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use patronus_controller::intents::publish::publish_tenant;
use patronus_controller::server::AppState;
use patronus_proto::TenantId;
use patronus_test_support::{TestDatabase, TestEnv};
use uuid::Uuid;

const SITES: usize = 1000;
const HUBS: usize = 10;
const ROUNDS: usize = 5;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let msp = Uuid::new_v4();
    let tenant = Uuid::new_v4();
    eprintln!("seeding {SITES} sites");
    let mut sql = format!(
        "INSERT INTO msps (id, name) VALUES ('{msp}', 'bench');
         INSERT INTO tenants (id, msp_id, name, slug, overlay_network, topology) VALUES
           ('{tenant}', '{msp}', 'bench', 'bench', '100.64.0.0/16',
            '{{\"mode\": \"hierarchical\", \"max_peers\": 20}}');"
    );
    for i in 0..SITES {
        let site = Uuid::new_v4();
        let mut raw = [0u8; 32];
        raw[..16].copy_from_slice(site.as_bytes());
        let key = patronus_proto::WgPublicKey(raw).to_base64();
        let (hi, lo) = (i / 250, i % 250 + 1);
        let role = if i < HUBS { "hub" } else { "edge" };
        let region = ["us-east", "us-west", "eu-west", "eu-central", "ap-south"][i % 5];
        sql.push_str(&format!(
            "INSERT INTO sites (id, tenant_id, name, region, role, overlay_address, lan_prefixes, wg_public_key, status)
               VALUES ('{site}', '{tenant}', 'site{i}', '{region}', '{role}', '100.64.{hi}.{lo}',
                       ARRAY['10.{hi}.{lo}.0/24']::cidr[], '{key}', 'active');
             INSERT INTO endpoints (tenant_id, site_id, uplink_index, name, address, interface_type) VALUES
               ('{tenant}', '{site}', 0, 'fiber', '198.18.{hi}.{lo}', 'fiber'),
               ('{tenant}', '{site}', 1, 'lte', '198.19.{hi}.{lo}', 'lte');"
        ));
    }
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner.batch_execute(&sql).await.context("seeding")?;
    let state = AppState::connect(&env.controller_config(&database.app_url)?).await?;
    let tenant_id = TenantId(tenant);
    let bucket = state.tenant_nats(tenant_id).await?.intents;

    let started = Instant::now();
    let first = publish_tenant(&state.db, &bucket, tenant_id, &state.probe_secret).await?;
    let initial_ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "initial publish: {} intents in {initial_ms:.0} ms (paths created on the way)",
        first.published.len()
    );

    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        owner
            .batch_execute(&format!(
                "INSERT INTO policies (tenant_id, name, kind, priority, spec) VALUES ('{tenant}', 'p{round}', 'routing', {}, \
                 '{{\"match\": {{\"protocol\": \"udp\", \"dst_ports\": [{{\"start\": 5060, \"end\": 5061}}]}}, \
                   \"app_class\": \"voip\", \"path_preference\": {{\"kind\": \"lowest_latency\"}}}}')",
                100 + round
            ))
            .await?;
        let started = Instant::now();
        let outcome = publish_tenant(&state.db, &bucket, tenant_id, &state.probe_secret).await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(
            outcome.published.len() == SITES,
            "round {round} published {}",
            outcome.published.len()
        );
        eprintln!("round {round}: {SITES} intents compiled and published in {ms:.0} ms");
        rounds.push(ms);
    }
    rounds.sort_by(f64::total_cmp);
    // Where the time goes: load, compile, encode.
    {
        use patronus_controller::db::{self, Scope};
        let mut conn = state.db.get().await?;
        let t = Instant::now();
        let snapshot = db::in_scope(&mut conn, Scope::Tenant(tenant_id), move |conn| {
            Box::pin(async move {
                patronus_controller::intents::store::load_snapshot(conn, tenant_id).await
            })
        })
        .await?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let compiled =
            patronus_controller::intents::compile::compile(&snapshot, &state.probe_secret, 0)?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let bytes: usize = compiled
            .intents
            .iter()
            .map(|i| patronus_proto::codec::encode(i).len())
            .sum();
        let encode_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        for i in &compiled.intents {
            let _ = i.content_digest();
        }
        let digest_ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!("breakdown: load {load_ms:.0} ms, compile {compile_ms:.0} ms, encode {encode_ms:.0} ms ({} KB), digest {digest_ms:.0} ms", bytes / 1024);
    }
    let unchanged_start = Instant::now();
    let idle = publish_tenant(&state.db, &bucket, tenant_id, &state.probe_secret).await?;
    let unchanged_ms = unchanged_start.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(idle.published.is_empty());
    println!(
        "{}",
        serde_json::json!({
            "sites": SITES,
            "initial_publish_ms": initial_ms.round(),
            "policy_change_publish_ms_median": rounds[ROUNDS / 2].round(),
            "policy_change_publish_ms_max": rounds[ROUNDS - 1].round(),
            "unchanged_recompile_ms": unchanged_ms.round(),
        })
    );
    drop(owner);
    state.db.close();
    drop(state);
    database.drop_now().await
}
