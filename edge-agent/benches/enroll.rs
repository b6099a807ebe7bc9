//! Enrollment benchmarks against a real controller on loopback (PostgreSQL, Redis, NATS in
//! operator mode), built in release by `cargo bench -p patronus-edge --bench enroll`:
//!
//! 1. Enrollments per second the controller sustains: tokens made beforehand, edge keys and
//!    CSRs made beforehand (that work is the edges'), then `CONCURRENCY` clients redeem them.
//!    Baseline in the same run: `GET /healthz` with the same clients.
//! 2. `patronus-edge enroll` end to end: process start to credentials on disk, per run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use patronus_proto::enroll::{EnrollRequest, UplinkSpec};
use patronus_proto::{SiteId, TenantId, WgPublicKey};
use patronus_test_support::{RunningController, TestDatabase, TestEnv};
use uuid::Uuid;

const ENROLLMENTS: usize = 400;
const CONCURRENCY: usize = 8;
const CLI_RUNS: usize = 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut latencies: Vec<Duration>, wall: Duration) {
    latencies.sort();
    println!(
        "{what}: {} in {:.2} s = {:.0}/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        wall.as_secs_f64(),
        latencies.len() as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

/// Run `jobs` on `CONCURRENCY` threads; each job returns whether it succeeded.
fn hammer<J: Fn() -> bool + Send + Sync + 'static>(
    jobs: Vec<J>,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let jobs = Arc::new(std::sync::Mutex::new(jobs));
    let started = Instant::now();
    let threads: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let jobs = jobs.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                loop {
                    let Some(job) = jobs.lock().ok().and_then(|mut j| j.pop()) else {
                        break;
                    };
                    let t = Instant::now();
                    if !job() {
                        return Err(anyhow::anyhow!("a request failed"));
                    }
                    latencies.push(t.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    Ok((all, started.elapsed()))
}

fn request(token: String, tenant: TenantId, site: SiteId) -> anyhow::Result<EnrollRequest> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, site.to_string());
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, tenant.to_string());
    let mut wg = [0u8; 32];
    wg[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    wg[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    Ok(EnrollRequest {
        token,
        csr_pem: params.serialize_request(&key)?.pem()?,
        wg_public_key: WgPublicKey(wg),
        nats_public_key: nkeys::KeyPair::new_user().public_key(),
        uplinks: vec![UplinkSpec {
            name: "fiber".into(),
            address: "198.18.0.1".parse()?,
            interface_type: patronus_proto::policy::LinkKind::Fiber,
            bandwidth_mbps: Some(1000),
            cost_per_gb: 0.0,
            metered: false,
        }],
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("enroll: bench");
        return Ok(());
    }
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let tenant = TenantId(Uuid::new_v4());
    let msp = Uuid::new_v4();
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner
        .batch_execute(&format!(
            "INSERT INTO msps (id, name) VALUES ('{msp}', 'bench');
             INSERT INTO tenants (id, msp_id, name, slug, overlay_network)
                 VALUES ('{}', '{msp}', 'bench', 'bench', '100.64.0.0/16');",
            tenant.0
        ))
        .await?;
    drop(owner);
    let mut config = env.controller_config(&database.app_url)?;
    config.log.filter = "warn".into();
    // A long debounce keeps intent publishing (not measured here) out of the way.
    config.intents.debounce_ms = 10_000;
    let keys = patronus_controller::enrollment::TokenKeys::from_seed(
        &patronus_controller::config::secret_bytes_32(&config.provisioning.token_signing_key)
            .context("token key")?,
    );
    let controller = RunningController::start(config)?;

    eprintln!("preparing {ENROLLMENTS} tokens and edge requests");
    let pool = patronus_controller::db::pool(&database.app_url, 4)?;
    let mut bodies = Vec::new();
    for i in 0..ENROLLMENTS + CLI_RUNS {
        let (token, row) = patronus_controller::api::enrollment::create_from_cli(
            &pool,
            &keys,
            tenant,
            &format!("site-{i}"),
            Vec::new(),
            chrono::Duration::hours(1),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        bodies.push((token, SiteId(row.site_id)));
    }
    drop(pool);
    let cli_tokens: Vec<(String, SiteId)> = bodies.split_off(ENROLLMENTS);
    let requests: Vec<String> = bodies
        .into_iter()
        .map(|(token, site)| {
            request(token, tenant, site).and_then(|r| Ok(serde_json::to_string(&r)?))
        })
        .collect::<anyhow::Result<_>>()?;

    // Baseline: the cheapest endpoint, same clients and concurrency.
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let url = controller.url.clone();
    let health_jobs: Vec<_> = (0..ENROLLMENTS * 4)
        .map(|_| {
            let (agent, url) = (agent.clone(), url.clone());
            move || agent.get(&format!("{url}/healthz")).call().is_ok()
        })
        .collect();
    let (latencies, wall) = hammer(health_jobs)?;
    report("baseline GET /healthz", latencies, wall);

    let enroll_jobs: Vec<_> = requests
        .into_iter()
        .map(|body| {
            let (agent, url) = (agent.clone(), url.clone());
            move || {
                agent
                    .post(&format!("{url}/api/v1/enroll"))
                    .set("Content-Type", "application/json")
                    .send_string(&body)
                    .is_ok()
            }
        })
        .collect();
    let (latencies, wall) = hammer(enroll_jobs)?;
    report(
        &format!("POST /api/v1/enroll ({CONCURRENCY} clients)"),
        latencies,
        wall,
    );

    // The edge command end to end.
    let dir =
        std::env::temp_dir().join(format!("patronus-enroll-bench-{}", Uuid::new_v4().simple()));
    let mut runs = Vec::new();
    for (i, (token, _)) in cli_tokens.iter().enumerate() {
        let state = dir.join(format!("edge-{i}"));
        let started = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_patronus-edge"))
            .args(["enroll", "--controller", &url, "--token", token])
            .args(["--state-dir", state.to_str().context("path")?])
            .args(["--uplink", "name=fiber,address=198.18.0.2"])
            .output()?;
        runs.push(started.elapsed());
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wall: Duration = runs.iter().sum();
    report(
        "patronus-edge enroll, start to credentials on disk",
        runs,
        wall,
    );
    let _ = std::fs::remove_dir_all(&dir);

    controller.stop().await;
    database.drop_now().await
}
