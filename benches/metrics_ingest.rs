//! Path-metric ingest throughput: samples written to PostgreSQL per second with the consumer
//! running (goal: 50,000 records/s).
//!
//! Run: `cargo bench -p patronus-integration-tests --bench metrics_ingest`
//! (options: `--sites N --paths-per-site N --samples-per-path N --seconds N --rate N`).
//!
//! A throwaway database with one tenant of 50 sites and 20 paths per site (1,000 paths); each
//! site publishes as its own NATS user, batches of one sample per path per second over 10 s
//! (200 samples, ~45 KB of JSON), as an edge reporting every 10 s would. Everything runs in
//! this process on the machine's two cores, shared with PostgreSQL and NATS. Scenarios:
//!
//! - `baseline_direct_write`: the controller's write (`metrics_ingest::write`, 10,000 samples
//!   per transaction, rollup trigger included) called directly with samples already in
//!   memory: the database's ceiling, without NATS, JSON or acknowledgements;
//! - `backlog_drain`: 1,000,000 samples published first (the stream holds them), then the
//!   consumer starts: time until the last is in PostgreSQL;
//! - `sustained`: publishers at `--rate` samples/s (default 50,000) for `--seconds` with the
//!   consumer running: the rate stored while publishing and the backlog left at the end.
//!
//! Prints one JSON object per scenario.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use patronus_controller::db::{self, Scope};
use patronus_controller::metrics_ingest::{self, Row};
use patronus_controller::server::AppState;
use patronus_proto::metrics::{PathMetrics, PathMetricsBatch, PathSample, PathStatus};
use patronus_proto::{codec, subjects, PathId, SiteId, TenantId, SCHEMA_VERSION};
use patronus_test_support::{TestDatabase, TestEnv};
use tokio::sync::watch;
use uuid::Uuid;

struct Options {
    sites: usize,
    paths_per_site: usize,
    samples_per_path: usize,
    backlog_samples: usize,
    seconds: u64,
    rate: u64,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        sites: 50,
        paths_per_site: 20,
        samples_per_path: 10,
        backlog_samples: 1_000_000,
        seconds: 20,
        rate: 50_000,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = || -> anyhow::Result<u64> {
            args.get(i + 1)
                .with_context(|| format!("{} needs a value", args[i]))?
                .parse()
                .with_context(|| format!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--sites" => o.sites = value()? as usize,
            "--paths-per-site" => o.paths_per_site = value()? as usize,
            "--samples-per-path" => o.samples_per_path = value()? as usize,
            "--backlog" => o.backlog_samples = value()? as usize,
            "--seconds" => o.seconds = value()?,
            "--rate" => o.rate = value()?,
            // cargo bench passes --bench; anything else is not ours.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    ensure!(
        o.paths_per_site < o.sites,
        "--paths-per-site must be below --sites"
    );
    Ok(o)
}

struct World {
    tenant: TenantId,
    sites: Vec<SiteId>,
    /// Paths starting at each site.
    paths: Vec<Vec<PathId>>,
}

async fn seed(database: &TestDatabase, o: &Options) -> anyhow::Result<World> {
    let (msp, tenant) = (Uuid::new_v4(), Uuid::new_v4());
    let sites: Vec<Uuid> = (0..o.sites).map(|_| Uuid::new_v4()).collect();
    let endpoints: Vec<Uuid> = (0..o.sites).map(|_| Uuid::new_v4()).collect();
    let mut sql = format!(
        "INSERT INTO msps (id, name) VALUES ('{msp}', 'bench');
         INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{tenant}', '{msp}', 'bench', 'bench');"
    );
    for (i, (site, endpoint)) in sites.iter().zip(&endpoints).enumerate() {
        sql.push_str(&format!(
            "INSERT INTO sites (id, tenant_id, name) VALUES ('{site}', '{tenant}', 'site{i}');
             INSERT INTO endpoints (id, tenant_id, site_id, uplink_index, name, address)
               VALUES ('{endpoint}', '{tenant}', '{site}', 0, 'wan0', '198.18.{}.{}');",
            i / 250,
            i % 250 + 1
        ));
    }
    let mut paths = vec![Vec::new(); o.sites];
    for (i, from) in paths.iter_mut().enumerate() {
        for k in 1..=o.paths_per_site {
            let j = (i + k) % o.sites;
            let path = Uuid::new_v4();
            sql.push_str(&format!(
                "INSERT INTO paths (id, tenant_id, src_site_id, dst_site_id, src_endpoint_id, dst_endpoint_id)
                   VALUES ('{path}', '{tenant}', '{}', '{}', '{}', '{}');",
                sites[i], sites[j], endpoints[i], endpoints[j]
            ));
            from.push(PathId(path));
        }
    }
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner.batch_execute(&sql).await.context("seeding")?;
    Ok(World {
        tenant: TenantId(tenant),
        sites: sites.into_iter().map(SiteId).collect(),
        paths,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sample(path: PathId, at_ms: u64, n: u64) -> PathSample {
    PathSample {
        path,
        status: PathStatus::Up,
        metrics: PathMetrics {
            latency_ms: 20.0 + (n % 7) as f64,
            jitter_ms: 1.0 + (n % 3) as f64 / 10.0,
            packet_loss_pct: (n % 5) as f64 / 10.0,
            bandwidth_mbps: Some(500.0),
            mtu: Some(1420),
            score: 90 + (n % 10) as u8,
            measured_at_unix_ms: at_ms,
        },
        probes_sent: 50,
        probes_lost: 0,
    }
}

/// Batch number `round` of site `s`: each of its paths measured once a second for
/// `samples_per_path` seconds starting at `base + round × samples_per_path` seconds.
fn batch(w: &World, o: &Options, s: usize, round: u64, base_ms: u64) -> PathMetricsBatch {
    let per = o.samples_per_path as u64;
    let mut samples = Vec::with_capacity(o.paths_per_site * o.samples_per_path);
    for path in &w.paths[s] {
        for k in 0..per {
            let second = round * per + k;
            samples.push(sample(*path, base_ms + second * 1000, second));
        }
    }
    PathMetricsBatch {
        schema_version: SCHEMA_VERSION,
        tenant: w.tenant,
        site: w.sites[s],
        seq: round,
        sent_at_unix_ms: now_ms(),
        samples,
    }
}

async fn connect_sites(
    env: &TestEnv,
    state: &AppState,
    w: &World,
) -> anyhow::Result<Vec<async_nats::Client>> {
    let mut clients = Vec::new();
    let expires = (SystemTime::now() + Duration::from_secs(3600))
        .duration_since(UNIX_EPOCH)?
        .as_secs() as i64;
    for site in &w.sites {
        let key = std::sync::Arc::new(nkeys::KeyPair::new_user());
        let jwt = state
            .nats_hub
            .site_user_jwt(w.tenant, *site, &key.public_key(), expires)?;
        let client = async_nats::ConnectOptions::with_jwt(jwt, move |nonce| {
            let key = key.clone();
            async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .custom_inbox_prefix(subjects::edge_inbox_prefix(*site))
        .connect(env.nats_url.as_str())
        .await
        .context("connecting as a site")?;
        clients.push(client);
    }
    Ok(clients)
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn stored_rows(state: &AppState, tenant: TenantId) -> anyhow::Result<i64> {
    let mut conn = state.db.get().await?;
    let row: Count = db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            diesel::sql_query("SELECT count(*) AS n FROM path_metrics WHERE tenant_id = $1")
                .bind::<SqlUuid, _>(tenant.0)
                .get_result::<Count>(conn)
                .await
        })
    })
    .await?;
    Ok(row.n)
}

/// (sum, count) of a histogram in the Prometheus text.
fn histogram(state: &AppState, name: &str) -> (f64, f64) {
    let text = state.metrics.render(state);
    let value = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

/// Mean between two readings of a histogram.
fn mean_between(before: (f64, f64), after: (f64, f64)) -> f64 {
    let count = after.1 - before.1;
    if count > 0.0 {
        (after.0 - before.0) / count
    } else {
        0.0
    }
}

async fn wait_stored(state: &AppState, want: u64, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while state.metrics.metric_samples_stored.get() < want {
        ensure!(
            Instant::now() < deadline,
            "only {} of {want} samples stored after {within:?}",
            state.metrics.metric_samples_stored.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let o = options()?;
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let result = scenarios(&env, &database, &o).await;
    let dropped = database.drop_now().await;
    result?;
    dropped
}

async fn scenarios(env: &TestEnv, database: &TestDatabase, o: &Options) -> anyhow::Result<()> {
    eprintln!(
        "seeding {} sites with {} paths each",
        o.sites, o.paths_per_site
    );
    let w = seed(database, o).await?;
    let config = env.controller_config(&database.app_url)?;
    let state = AppState::connect(&config).await?;
    state.tenant_nats(w.tenant).await?;
    let per_batch = (o.paths_per_site * o.samples_per_path) as u64;
    let hour_ms = 3_600_000;

    // Baseline: the write alone, samples already in memory.
    let baseline_samples = 200_000u64;
    let base = now_ms() - 5 * hour_ms;
    let mut rows = Vec::new();
    let mut round = 0;
    while (rows.len() as u64) < baseline_samples {
        for s in 0..o.sites {
            let b = batch(&w, o, s, round, base);
            let site = b.site;
            rows.extend(b.samples.into_iter().map(|sample| {
                Row {
                    site,
                    measured_at: chrono::DateTime::from_timestamp_millis(
                        sample.metrics.measured_at_unix_ms as i64,
                    )
                    .unwrap_or_default(),
                    sample,
                }
            }));
        }
        round += 1;
    }
    let mut conn = state.db.get().await?;
    let started = Instant::now();
    let mut written = 0;
    for chunk in rows.chunks(config.metrics.write_batch_samples) {
        let refs: Vec<&Row> = chunk.iter().collect();
        written += metrics_ingest::write(&mut conn, w.tenant, &refs)
            .await?
            .inserted;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(conn);
    ensure!(written == rows.len(), "wrote {written} of {}", rows.len());
    println!(
        "{{\"scenario\": \"baseline_direct_write\", \"samples\": {written}, \"seconds\": {elapsed:.3}, \"records_per_s\": {:.0}}}",
        written as f64 / elapsed
    );
    drop(rows);

    // Backlog: publish everything, then start the consumer.
    let clients = connect_sites(env, &state, &w).await?;
    let base = now_ms() - 4 * hour_ms;
    let rounds = (o.backlog_samples as u64).div_ceil(per_batch * o.sites as u64);
    eprintln!(
        "publishing {} batches of {per_batch} samples",
        rounds * o.sites as u64
    );
    let mut bytes = 0usize;
    for round in 0..rounds {
        for (s, client) in clients.iter().enumerate() {
            let payload = codec::encode(&batch(&w, o, s, round, base));
            bytes += payload.len();
            client
                .publish(
                    subjects::metrics_subject(w.tenant, w.sites[s]),
                    payload.into(),
                )
                .await?;
        }
        if round % 10 == 9 {
            for client in &clients {
                client.flush().await?;
            }
        }
    }
    for client in &clients {
        client.flush().await?;
    }
    let total = rounds * o.sites as u64 * per_batch;
    let before = stored_rows(&state, w.tenant).await? as u64;
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let ingest = tokio::spawn(metrics_ingest::run(state.clone(), stop_rx));
    wait_stored(&state, total, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let in_db = stored_rows(&state, w.tenant).await? as u64 - before;
    ensure!(in_db == total, "{in_db} rows in the database, {total} sent");
    let writes = histogram(&state, "patronus_metric_write_seconds");
    println!(
        "{{\"scenario\": \"backlog_drain\", \"samples\": {total}, \"batches\": {}, \"mean_batch_bytes\": {}, \"seconds\": {elapsed:.3}, \"records_per_s\": {:.0}, \"mean_write_ms\": {:.1}, \"writes\": {}}}",
        rounds * o.sites as u64,
        bytes / (rounds as usize * o.sites),
        total as f64 / elapsed,
        mean_between((0.0, 0.0), writes) * 1000.0,
        writes.1,
    );

    // Sustained: an open-loop publisher at `rate` samples/s with the consumer running.
    let base = now_ms() - 3 * hour_ms;
    let batches_per_s = (o.rate as f64 / per_batch as f64).max(1.0);
    let total_batches = (batches_per_s * o.seconds as f64) as u64;
    let already = state.metrics.metric_samples_stored.get();
    let lag_before = histogram(&state, "patronus_metric_ingest_lag_seconds");
    let writes_before = histogram(&state, "patronus_metric_write_seconds");
    let tick = Duration::from_millis(10);
    let per_tick = batches_per_s / 100.0;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut owed = 0.0f64;
    let mut stored_at_end_of_publishing = 0;
    while sent < total_batches {
        ticker.tick().await;
        owed += per_tick;
        while owed >= 1.0 && sent < total_batches {
            let s = (sent % o.sites as u64) as usize;
            let round = sent / o.sites as u64;
            let payload = codec::encode(&batch(&w, o, s, round, base));
            clients[s]
                .publish(
                    subjects::metrics_subject(w.tenant, w.sites[s]),
                    payload.into(),
                )
                .await?;
            sent += 1;
            owed -= 1.0;
        }
        if sent == total_batches {
            for client in &clients {
                client.flush().await?;
            }
            stored_at_end_of_publishing = state.metrics.metric_samples_stored.get() - already;
        }
    }
    let publishing = started.elapsed().as_secs_f64();
    let total = total_batches * per_batch;
    wait_stored(&state, already + total, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let lag = mean_between(
        lag_before,
        histogram(&state, "patronus_metric_ingest_lag_seconds"),
    );
    let write = mean_between(
        writes_before,
        histogram(&state, "patronus_metric_write_seconds"),
    );
    println!(
        "{{\"scenario\": \"sustained\", \"target_records_per_s\": {}, \"offered_records_per_s\": {:.0}, \"samples\": {total}, \"publishing_s\": {publishing:.3}, \"stored_while_publishing_per_s\": {:.0}, \"backlog_at_end\": {}, \"drained_after_s\": {:.3}, \"overall_records_per_s\": {:.0}, \"mean_lag_ms\": {:.1}, \"mean_write_ms\": {:.1}}}",
        o.rate,
        total as f64 / publishing,
        stored_at_end_of_publishing as f64 / publishing,
        total - stored_at_end_of_publishing,
        elapsed - publishing,
        total as f64 / elapsed,
        lag * 1000.0,
        write * 1000.0,
    );
    let _ = stop_tx.send(true);
    ingest.await?;
    for client in clients {
        client.drain().await.ok();
    }
    state.db.close();
    Ok(())
}
