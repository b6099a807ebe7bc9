//! The path-metrics pipeline against the real services: a site's NATS user publishes
//! `PathMetricsBatch`es on its metrics subject (a core publish; the tenant's `METRICS` stream
//! captures it), the controller's shared durable consumer stores them in `path_metrics` (and the
//! rollups), moves the paths' status, keeps the latest state in Redis, forwards
//! `path_metrics` events, and drops and counts what is malformed or foreign without stalling.
//! Two replicas share one consumer.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::dev::ServiceResponse;
use actix_web::{test, web, App};
use anyhow::{ensure, Context};
use diesel::sql_types::{BigInt, Nullable, SmallInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures_util::StreamExt;
use patronus_controller::auth::{Role, SessionKeys};
use patronus_controller::db::{self, Scope};
use patronus_controller::metrics_ingest;
use patronus_controller::server::{configure, AppState};
use patronus_proto::events::{EventEnvelope, SdwanEvent};
use patronus_proto::metrics::{PathMetrics, PathMetricsBatch, PathSample, PathStatus};
use patronus_proto::{codec, subjects, PathId, SiteId, TenantId, SCHEMA_VERSION};
use patronus_test_support::{TestDatabase, TestEnv};
use serde_json::Value;
use tokio::sync::watch;
use uuid::Uuid;

/// Ids of the seeded world: tenant T with sites A and B and a path each way; tenant U with one
/// path of its own.
struct World {
    msp: Uuid,
    tenant: TenantId,
    other_tenant: TenantId,
    site_a: SiteId,
    site_b: SiteId,
    /// A → B: site A measures it.
    a_to_b: PathId,
    /// B → A: site B's path, which site A must not report.
    b_to_a: PathId,
    /// Tenant U's path.
    foreign_path: PathId,
}

async fn seed(database: &TestDatabase) -> anyhow::Result<World> {
    let msp = Uuid::new_v4();
    let (t, u) = (Uuid::new_v4(), Uuid::new_v4());
    let (a, b, c, d) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let (ea, eb, ec, ed) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let (ab, ba, cd) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let sql = format!(
        "INSERT INTO msps (id, name) VALUES ('{msp}', 'metrics msp');
         INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{t}', '{msp}', 't', 't'), ('{u}', '{msp}', 'u', 'u');
         INSERT INTO sites (id, tenant_id, name) VALUES ('{a}', '{t}', 'a'), ('{b}', '{t}', 'b'), ('{c}', '{u}', 'c'), ('{d}', '{u}', 'd');
         INSERT INTO endpoints (id, tenant_id, site_id, uplink_index, name, address) VALUES
            ('{ea}', '{t}', '{a}', 0, 'wan0', '198.18.0.1'), ('{eb}', '{t}', '{b}', 0, 'wan0', '198.18.0.2'),
            ('{ec}', '{u}', '{c}', 0, 'wan0', '198.18.1.1'), ('{ed}', '{u}', '{d}', 0, 'wan0', '198.18.1.2');
         INSERT INTO paths (id, tenant_id, src_site_id, dst_site_id, src_endpoint_id, dst_endpoint_id) VALUES
            ('{ab}', '{t}', '{a}', '{b}', '{ea}', '{eb}'), ('{ba}', '{t}', '{b}', '{a}', '{eb}', '{ea}'),
            ('{cd}', '{u}', '{c}', '{d}', '{ec}', '{ed}');"
    );
    // As the owner, which row-level security does not filter.
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner.batch_execute(&sql).await.context("seeding")?;
    Ok(World {
        msp,
        tenant: TenantId(t),
        other_tenant: TenantId(u),
        site_a: SiteId(a),
        site_b: SiteId(b),
        a_to_b: PathId(ab),
        b_to_a: PathId(ba),
        foreign_path: PathId(cd),
    })
}

/// Connect as a site's NATS user (what `patronus-edge` holds after enrolling).
async fn connect_as_site(
    env: &TestEnv,
    state: &AppState,
    tenant: TenantId,
    site: SiteId,
) -> anyhow::Result<async_nats::Client> {
    let key = std::sync::Arc::new(nkeys::KeyPair::new_user());
    let expires = (SystemTime::now() + Duration::from_secs(3600))
        .duration_since(UNIX_EPOCH)?
        .as_secs() as i64;
    let jwt = state
        .nats_hub
        .site_user_jwt(tenant, site, &key.public_key(), expires)?;
    async_nats::ConnectOptions::with_jwt(jwt, move |nonce| {
        let key = key.clone();
        async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
    })
    .custom_inbox_prefix(subjects::edge_inbox_prefix(site))
    .connect(env.nats_url.as_str())
    .await
    .context("connecting as the site")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sample(path: PathId, at_ms: u64, score: u8, status: PathStatus) -> PathSample {
    PathSample {
        path,
        status,
        metrics: PathMetrics {
            latency_ms: 10.0 + f64::from(score) / 10.0,
            jitter_ms: 0.5,
            packet_loss_pct: 0.0,
            bandwidth_mbps: Some(250.0),
            mtu: Some(1420),
            score,
            measured_at_unix_ms: at_ms,
        },
        probes_sent: 20,
        probes_lost: 0,
    }
}

fn batch(tenant: TenantId, site: SiteId, seq: u64, samples: Vec<PathSample>) -> PathMetricsBatch {
    PathMetricsBatch {
        schema_version: SCHEMA_VERSION,
        tenant,
        site,
        seq,
        sent_at_unix_ms: now_ms(),
        samples,
    }
}

async fn publish(
    edge: &async_nats::Client,
    tenant: TenantId,
    site: SiteId,
    payload: Vec<u8>,
) -> anyhow::Result<()> {
    edge.publish(subjects::metrics_subject(tenant, site), payload.into())
        .await?;
    edge.flush().await?;
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Rows of `path` in `table` (`path_metrics`), or the samples its rollup rows hold.
async fn count(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    sql: &'static str,
    path: PathId,
) -> anyhow::Result<i64> {
    let row: Count = db::in_scope(conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            diesel::sql_query(sql)
                .bind::<SqlUuid, _>(path.0)
                .get_result::<Count>(conn)
                .await
        })
    })
    .await?;
    Ok(row.n)
}

const RAW_ROWS: &str = "SELECT count(*) AS n FROM path_metrics WHERE path_id = $1";
const ROLLUP_SAMPLES: &str =
    "SELECT coalesce(sum(samples), 0)::bigint AS n FROM path_metrics_1m WHERE path_id = $1";

async fn wait_for_rows(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    path: PathId,
    want: i64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = count(conn, tenant, RAW_ROWS, path).await?;
        if n == want {
            return Ok(());
        }
        ensure!(n < want, "path {path} has {n} rows, more than {want}");
        ensure!(
            Instant::now() < deadline,
            "path {path} has {n} rows, not {want}, after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[derive(diesel::QueryableByName, Debug)]
struct PathRow {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Nullable<SmallInt>)]
    score: Option<i16>,
    #[diesel(sql_type = Nullable<BigInt>)]
    metrics_at_ms: Option<i64>,
}

async fn path_row(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    path: PathId,
) -> anyhow::Result<PathRow> {
    Ok(db::in_scope(conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            diesel::sql_query(
                "SELECT status, score, (extract(epoch FROM metrics_at) * 1000)::bigint AS metrics_at_ms
                 FROM paths WHERE id = $1",
            )
            .bind::<SqlUuid, _>(path.0)
            .get_result::<PathRow>(conn)
            .await
        })
    })
    .await?)
}

async fn get_json(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = ServiceResponse,
        Error = actix_web::Error,
    >,
    token: &str,
    uri: &str,
) -> anyhow::Result<Value> {
    let request = test::TestRequest::get()
        .uri(uri)
        .peer_addr("127.0.0.1:40000".parse()?)
        .insert_header(("Authorization", format!("Bearer {token}")))
        .to_request();
    let response = test::call_service(app, request).await;
    let status = response.status();
    let body = test::read_body(response).await;
    ensure!(
        status.is_success(),
        "GET {uri}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}

#[actix_web::test]
async fn a_sites_batches_are_stored_once_and_bad_ones_are_counted_without_stalling(
) -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let result = async {
        let w = seed(&database).await?;
        let mut config = env.controller_config(&database.app_url)?;
        // Every sample of a path becomes an event here, so the test can wait for the newest.
        config.metrics.event_interval_ms = 10;
        let state = AppState::connect(&config).await?;
        state.tenant_nats(w.tenant).await?;
        let mut events = state
            .nats
            .subscribe(patronus_controller::events::controller_subject(w.tenant))
            .await?;
        let edge = connect_as_site(&env, &state, w.tenant, w.site_a).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let ingest = tokio::spawn(metrics_ingest::run(state.clone(), stop_rx));
        let mut conn = AsyncPgConnection::establish(&database.owner_url).await?;
        let m = &state.metrics;

        // A good batch: three samples of A → B (the newest is degraded), one of B's own path and
        // one of another tenant's path (both dropped as unknown to site A, the rest stored).
        let t0 = now_ms() - 5_000;
        let first = batch(
            w.tenant,
            w.site_a,
            1,
            vec![
                sample(w.a_to_b, t0, 95, PathStatus::Up),
                sample(w.a_to_b, t0 + 2_000, 40, PathStatus::Degraded),
                sample(w.a_to_b, t0 + 1_000, 90, PathStatus::Up),
                sample(w.b_to_a, t0, 80, PathStatus::Up),
                sample(w.foreign_path, t0, 70, PathStatus::Up),
            ],
        );
        publish(&edge, w.tenant, w.site_a, codec::encode(&first)).await?;
        wait_for_rows(&mut conn, w.tenant, w.a_to_b, 3).await?;
        ensure!(count(&mut conn, w.tenant, RAW_ROWS, w.b_to_a).await? == 0);
        wait_until("the first batch's counters", || {
            m.metric_batches_stored.get() == 1
        })
        .await?;
        ensure!(m.metric_samples_stored.get() == 3);
        ensure!(m.metric_samples_dropped.get("unknown_path") == 2);
        // The rollup holds the same samples.
        ensure!(count(&mut conn, w.tenant, ROLLUP_SAMPLES, w.a_to_b).await? == 3);

        // The path's current state follows its newest sample, not the last one in the batch.
        let row = path_row(&mut conn, w.tenant, w.a_to_b).await?;
        ensure!(
            row.status == "degraded" && row.score == Some(40),
            "paths row: {row:?}"
        );
        ensure!(row.metrics_at_ms == Some((t0 + 2_000) as i64), "{row:?}");

        // Redis holds the newest sample.
        let latest = metrics_ingest::latest_states(&state, w.tenant, &[w.a_to_b.0]).await?;
        let newest = latest
            .get(&w.a_to_b.0)
            .context("no latest state in Redis")?;
        ensure!(
            newest.score == 40
                && newest.status == "degraded"
                && newest.site_id == w.site_a.0
                && newest.measured_at_unix_ms == t0 + 2_000,
            "{newest:?}"
        );

        // One event for the path, carrying the newest sample, from site A.
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .context("no path_metrics event")?
            .context("event subscription ended")?;
        let envelope: EventEnvelope = codec::decode(&event.payload)?;
        ensure!(envelope.site == Some(w.site_a), "{envelope:?}");
        match envelope.event {
            SdwanEvent::PathMetrics { path, metrics } => {
                ensure!(path == w.a_to_b && metrics.score == 40, "{metrics:?}")
            }
            other => anyhow::bail!("unexpected event {other:?}"),
        }
        ensure!(m.metric_events_emitted.get() == 1);

        // Bad batches: not JSON, another tenant, another site, too many samples. Then a good one,
        // which must still land.
        publish(&edge, w.tenant, w.site_a, b"{not json".to_vec()).await?;
        let foreign = batch(
            w.other_tenant,
            w.site_a,
            2,
            vec![sample(w.a_to_b, t0 + 3_000, 1, PathStatus::Down)],
        );
        publish(&edge, w.tenant, w.site_a, codec::encode(&foreign)).await?;
        let other_site = batch(
            w.tenant,
            w.site_b,
            3,
            vec![sample(w.a_to_b, t0 + 3_000, 1, PathStatus::Down)],
        );
        publish(&edge, w.tenant, w.site_a, codec::encode(&other_site)).await?;
        let huge = batch(
            w.tenant,
            w.site_a,
            4,
            (0..=patronus_proto::metrics::MAX_SAMPLES_PER_BATCH as u64)
                .map(|i| sample(w.a_to_b, t0 - 10_000 - i, 50, PathStatus::Up))
                .collect(),
        );
        publish(&edge, w.tenant, w.site_a, codec::encode(&huge)).await?;
        let second = batch(
            w.tenant,
            w.site_a,
            5,
            vec![
                sample(w.a_to_b, t0 + 3_000, 99, PathStatus::Up),
                sample(w.a_to_b, t0 + 4_000, 98, PathStatus::Up),
            ],
        );
        publish(&edge, w.tenant, w.site_a, codec::encode(&second)).await?;
        wait_for_rows(&mut conn, w.tenant, w.a_to_b, 5).await?;
        wait_until("the bad batches' counters", || {
            m.metric_batches_dropped.total() == 4
        })
        .await?;
        for reason in ["syntax", "wrong_tenant", "wrong_site", "too_many_samples"] {
            ensure!(
                m.metric_batches_dropped.get(reason) == 1,
                "{reason}: {}",
                m.metric_batches_dropped.get(reason)
            );
        }
        let row = path_row(&mut conn, w.tenant, w.a_to_b).await?;
        ensure!(row.status == "up" && row.score == Some(98), "{row:?}");

        // The first batch again (an edge resending, or a redelivery after a lost ack): nothing
        // new in the table or the rollup, counted as duplicates.
        publish(&edge, w.tenant, w.site_a, codec::encode(&first)).await?;
        wait_until("the resent batch", || m.metric_batches_stored.get() == 3).await?;
        ensure!(count(&mut conn, w.tenant, RAW_ROWS, w.a_to_b).await? == 5);
        ensure!(count(&mut conn, w.tenant, ROLLUP_SAMPLES, w.a_to_b).await? == 5);
        ensure!(m.metric_samples_duplicate.get() == 3);
        ensure!(m.metric_samples_stored.get() == 5);
        // An older sample arriving late does not move the path back.
        let row = path_row(&mut conn, w.tenant, w.a_to_b).await?;
        ensure!(row.score == Some(98), "{row:?}");

        // The API: the path with its latest state, and the history from the rollup.
        let data = web::Data::new(state.clone());
        let app = test::init_service(App::new().app_data(data).configure(configure)).await;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = SessionKeys::new_claims(
            Uuid::new_v4(),
            w.msp,
            Some(w.tenant),
            Role::TenantViewer,
            now,
            300,
        );
        let token = state.session_keys.issue(&claims)?;
        let path = get_json(&app, &token, &format!("/api/v1/paths/{}", w.a_to_b)).await?;
        ensure!(
            path["latest"]["score"] == 98 && path["latest"]["status"] == "up",
            "{path}"
        );
        let list = get_json(&app, &token, &format!("/api/v1/paths?site={}", w.site_a)).await?;
        let items = list["items"].as_array().context("items")?;
        ensure!(
            items
                .iter()
                .any(|p| p["id"] == w.a_to_b.0.to_string() && p["latest"]["score"] == 98),
            "{list}"
        );
        ensure!(
            items
                .iter()
                .any(|p| p["id"] == w.b_to_a.0.to_string() && p["latest"].is_null()),
            "{list}"
        );
        let from = (t0 / 1000 / 60 * 60 - 120) as i64;
        let from = chrono::DateTime::from_timestamp(from, 0).context("from")?;
        let history = get_json(
            &app,
            &token,
            &format!(
                "/api/v1/paths/{}/metrics?step=60&from={}",
                w.a_to_b,
                from.format("%Y-%m-%dT%H:%M:%SZ")
            ),
        )
        .await?;
        let points = history["points"].as_array().context("points")?;
        let samples: i64 = points.iter().filter_map(|p| p["samples"].as_i64()).sum();
        ensure!(samples == 5, "{history}");
        ensure!(
            points
                .iter()
                .all(|p| p["bandwidth_mbps"] == 250.0 && p["mtu"] == 1420),
            "{history}"
        );

        // Everything is visible in /metrics.
        let text = state.metrics.render(&state);
        for line in [
            "patronus_metric_samples_stored_total 5",
            "patronus_metric_batches_dropped_total{reason=\"syntax\"} 1",
            "patronus_metric_samples_dropped_total{reason=\"unknown_path\"} 4",
            "patronus_metric_samples_duplicate_total 3",
        ] {
            ensure!(text.contains(line), "/metrics lacks {line}:\n{text}");
        }
        ensure!(text.contains("patronus_metric_write_seconds_count"));
        ensure!(text.contains("patronus_metric_ingest_lag_seconds_count"));

        let _ = stop_tx.send(true);
        tokio::time::timeout(Duration::from_secs(10), ingest)
            .await
            .context("the ingest did not stop")??;
        anyhow::Ok(())
    }
    .await;
    let dropped = database.drop_now().await;
    result?;
    dropped
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_one_consumer_and_store_every_batch_once() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let result = async {
        let w = seed(&database).await?;
        let mut config = env.controller_config(&database.app_url)?;
        // Small writes, so that both replicas are busy while the batches arrive.
        config.metrics.write_batch_samples = 10;
        config.metrics.write_linger_ms = 0;
        let one = AppState::connect(&config).await?;
        let two = AppState::connect(&config).await?;
        one.tenant_nats(w.tenant).await?;
        let edge = connect_as_site(&env, &one, w.tenant, w.site_a).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let ingest_one = tokio::spawn(metrics_ingest::run(one.clone(), stop_rx.clone()));
        let ingest_two = tokio::spawn(metrics_ingest::run(two.clone(), stop_rx));

        const BATCHES: u64 = 300;
        const SAMPLES: u64 = 5;
        let t0 = now_ms() - 60_000;
        for seq in 0..BATCHES {
            let samples = (0..SAMPLES)
                .map(|i| sample(w.a_to_b, t0 + seq * SAMPLES + i, 90, PathStatus::Up))
                .collect();
            let payload = codec::encode(&batch(w.tenant, w.site_a, seq, samples));
            edge.publish(
                subjects::metrics_subject(w.tenant, w.site_a),
                payload.into(),
            )
            .await?;
            if seq % 10 == 9 {
                edge.flush().await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        edge.flush().await?;
        let mut conn = AsyncPgConnection::establish(&database.owner_url).await?;
        wait_for_rows(&mut conn, w.tenant, w.a_to_b, (BATCHES * SAMPLES) as i64).await?;
        let stored = |s: &AppState| s.metrics.metric_batches_stored.get();
        wait_until("every batch to be counted", || {
            stored(&one) + stored(&two) == BATCHES
        })
        .await?;
        ensure!(
            stored(&one) > 0 && stored(&two) > 0,
            "one replica did all the work: {} and {}",
            stored(&one),
            stored(&two)
        );
        let samples =
            one.metrics.metric_samples_stored.get() + two.metrics.metric_samples_stored.get();
        ensure!(samples == BATCHES * SAMPLES, "{samples} samples stored");
        ensure!(
            one.metrics.metric_samples_duplicate.get() + two.metrics.metric_samples_duplicate.get()
                == 0
        );
        ensure!(
            count(&mut conn, w.tenant, ROLLUP_SAMPLES, w.a_to_b).await?
                == (BATCHES * SAMPLES) as i64
        );
        eprintln!(
            "replica one stored {} batches, replica two {}",
            stored(&one),
            stored(&two)
        );
        let _ = stop_tx.send(true);
        ingest_one.await?;
        ingest_two.await?;
        anyhow::Ok(())
    }
    .await;
    let dropped = database.drop_now().await;
    result?;
    dropped
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_whose_write_fails_is_handed_back_and_stored_once_the_database_recovers(
) -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let result = async {
        let w = seed(&database).await?;
        let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
        // The application role loses its right to insert: every write fails, not because of
        // what the batch holds.
        owner
            .batch_execute("REVOKE INSERT ON path_metrics FROM patronus_app")
            .await?;
        let mut config = env.controller_config(&database.app_url)?;
        config.metrics.retry_delay_ms = 200;
        let state = AppState::connect(&config).await?;
        state.tenant_nats(w.tenant).await?;
        let edge = connect_as_site(&env, &state, w.tenant, w.site_a).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let ingest = tokio::spawn(metrics_ingest::run(state.clone(), stop_rx));
        let t0 = now_ms() - 2_000;
        let samples = vec![
            sample(w.a_to_b, t0, 90, PathStatus::Up),
            sample(w.a_to_b, t0 + 1_000, 91, PathStatus::Up),
        ];
        publish(
            &edge,
            w.tenant,
            w.site_a,
            codec::encode(&batch(w.tenant, w.site_a, 1, samples)),
        )
        .await?;
        let m = &state.metrics;
        wait_until("two failed attempts", || {
            m.metric_batches_retried.get() >= 2
        })
        .await?;
        ensure!(m.metric_batches_stored.get() == 0);
        ensure!(
            m.metric_batches_dropped.total() == 0,
            "the batch was dropped"
        );
        ensure!(count(&mut owner, w.tenant, RAW_ROWS, w.a_to_b).await? == 0);

        owner
            .batch_execute("GRANT INSERT ON path_metrics TO patronus_app")
            .await?;
        wait_for_rows(&mut owner, w.tenant, w.a_to_b, 2).await?;
        wait_until("the batch to be counted", || {
            m.metric_batches_stored.get() == 1
        })
        .await?;
        ensure!(m.metric_samples_stored.get() == 2);
        ensure!(m.metric_batches_dropped.total() == 0);

        let _ = stop_tx.send(true);
        ingest.await?;
        anyhow::Ok(())
    }
    .await;
    let dropped = database.drop_now().await;
    result?;
    dropped
}
