//! How long the portal takes to answer its heaviest pages for a tenant of 500 sites.
//!
//! Run: `cargo bench -p patronus-integration-tests --bench portal_render`
//! Seeds a throwaway database with one tenant of 500 sites (one hub, 499 edges, 2 uplinks
//! each, ~4,000 paths hub-and-spoke with mixed statuses), then requests each page in-process
//! (the controller's real app and handlers, real PostgreSQL and Redis; no HTTP socket) 200
//! times in a row after 20 warm-up requests, and prints one JSON object per page with the
//! time to the full response body (p50/p99/max, ms). Baseline in the same run: the API's
//! `GET /api/v1/sites?limit=500` (the same sites as JSON, no rendering). Goal (seed): the
//! overview under 200 ms.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::{test, web, App};
use anyhow::{ensure, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use patronus_controller::auth::{Role, SessionKeys};
use patronus_controller::server::{configure, AppState};
use patronus_proto::TenantId;
use patronus_test_support::{TestDatabase, TestEnv};
use uuid::Uuid;

const SITES: usize = 500;
const RUNS: usize = 200;
const WARMUP: usize = 20;

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    actix_web::rt::System::new().block_on(run())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let (msp, tenant) = (Uuid::new_v4(), Uuid::new_v4());
    eprintln!("portal_render: seeding {SITES} sites, their uplinks and hub-and-spoke paths");
    let sql = format!(
        "INSERT INTO msps (id, name) VALUES ('{msp}', 'bench');
         INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{tenant}', '{msp}', 'bench', 'bench');
         INSERT INTO sites (tenant_id, name, role, status, region, overlay_address, lan_prefixes, last_seen_at)
           SELECT '{tenant}', 'site' || i, CASE WHEN i = 0 THEN 'hub' ELSE 'edge' END, 'active', 'eu-west',
                  ('100.64.' || (i / 250) || '.' || (i % 250 + 1))::inet,
                  ARRAY[('10.' || (i / 250) || '.' || (i % 250) || '.0/24')::cidr], now()
           FROM generate_series(0, {last}) AS i;
         INSERT INTO endpoints (tenant_id, site_id, uplink_index, name, address, interface_type)
           SELECT '{tenant}', s.id, u, CASE u WHEN 0 THEN 'fiber' ELSE 'lte' END,
                  ('198.18.' || (n / 250) || '.' || (n % 250 + 1))::inet,
                  CASE u WHEN 0 THEN 'fiber' ELSE 'lte' END
           FROM (SELECT id, row_number() OVER () - 1 AS k FROM sites WHERE tenant_id = '{tenant}') AS s,
                generate_series(0, 1) AS u, LATERAL (SELECT s.k * 2 + u AS n) AS x;
         INSERT INTO paths (tenant_id, src_site_id, dst_site_id, src_endpoint_id, dst_endpoint_id, status, score)
           SELECT '{tenant}', a.site_id, b.site_id, a.id, b.id,
                  (ARRAY['up', 'up', 'up', 'degraded', 'down'])[1 + floor(random() * 5)::int],
                  floor(random() * 100)::int2
           FROM endpoints a JOIN endpoints b ON a.site_id <> b.site_id
           JOIN sites sa ON sa.id = a.site_id JOIN sites sb ON sb.id = b.site_id
           WHERE (sa.role = 'hub') <> (sb.role = 'hub');",
        last = SITES - 1
    );
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner.batch_execute(&sql).await.context("seeding")?;
    drop(owner);

    let config = env.controller_config(&database.app_url)?;
    let state = AppState::connect(&config).await?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = SessionKeys::new_claims(
        Uuid::new_v4(),
        msp,
        Some(TenantId(tenant)),
        Role::TenantAdmin,
        now,
        3600,
    );
    let token = state.session_keys.issue(&claims)?;
    let app = test::init_service(
        App::new()
            .wrap(actix_web::middleware::from_fn(
                patronus_controller::api::request_id,
            ))
            .app_data(web::Data::new(state.clone()))
            .configure(configure),
    )
    .await;
    // The hub's page lists every path from it (~2,000): the heaviest site page.
    let hub: Uuid = {
        let req = test::TestRequest::get()
            .uri("/api/v1/sites?limit=500")
            .insert_header(("Authorization", format!("Bearer {token}")))
            .to_request();
        let body: serde_json::Value = test::call_and_read_body_json(&app, req).await;
        body["items"]
            .as_array()
            .and_then(|sites| sites.iter().find(|s| s["name"] == "site0"))
            .and_then(|s| s["id"].as_str())
            .context("the hub site0 is not listed")?
            .parse()?
    };
    let pages = [
        (
            "api_sites_500_baseline",
            "/api/v1/sites?limit=500".to_owned(),
            true,
        ),
        ("portal_overview", format!("/portal/t/{tenant}/"), false),
        (
            "portal_topology",
            format!("/portal/t/{tenant}/topology"),
            false,
        ),
        (
            "portal_hub_site",
            format!("/portal/t/{tenant}/sites/{hub}"),
            false,
        ),
    ];
    for (name, uri, api) in pages {
        let mut times = Vec::with_capacity(RUNS);
        let mut bytes = 0;
        for i in 0..WARMUP + RUNS {
            let mut req = test::TestRequest::get().uri(&uri);
            req = if api {
                req.insert_header(("Authorization", format!("Bearer {token}")))
            } else {
                req.cookie(actix_web::cookie::Cookie::new(
                    "patronus_session",
                    token.clone(),
                ))
            };
            let started = Instant::now();
            let resp = test::call_service(&app, req.to_request()).await;
            let status = resp.status();
            let body = test::read_body(resp).await;
            let elapsed = started.elapsed().as_secs_f64() * 1e3;
            ensure!(status.is_success(), "{uri}: {status}");
            if i >= WARMUP {
                times.push(elapsed);
                bytes = body.len();
            }
        }
        times.sort_by(f64::total_cmp);
        let round = |v: f64| (v * 100.0).round() / 100.0;
        println!(
            "{}",
            serde_json::json!({
                "page": name,
                "sites": SITES,
                "requests": RUNS,
                "p50_ms": round(percentile(&times, 50.0)),
                "p99_ms": round(percentile(&times, 99.0)),
                "max_ms": round(percentile(&times, 100.0)),
                "body_bytes": bytes,
            })
        );
    }
    state.db.close();
    drop(state);
    database.drop_now().await
}
