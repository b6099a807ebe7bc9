//! API throughput and latency under load from a second process on loopback.
//!
//! Run: `cargo bench -p patronus-integration-tests --bench api_load`
//! Starts the controller's HTTP app in this process (two workers, each with its own database
//! pool opened before the load, as `serve` does; a throwaway database with one tenant of 200
//! sites), then re-runs this binary as an open-loop load generator (requests fired on a fixed
//! schedule over keep-alive connections; latency counted from the scheduled time, so a stall
//! shows up instead of hiding). Each scenario runs 1 s at its rate first, reported apart
//! (`warmup_p99_ms`: the first query of each server connection), then 10 s measured:
//!   - `GET /healthz` at 1,000 requests/s: the baseline of harness, HTTP and scheduling;
//!   - `GET /api/v1/app-classes` at 1,000 requests/s: authentication (JWT and the Redis
//!     revocation check) without the database;
//!   - `GET /api/v1/sites?limit=50` at 1,000 requests/s for 10 s (goal: p99 under 10 ms);
//!   - `PUT /api/v1/policies/{id}` at 100 and at 1,000 requests/s for 10 s each, each load
//!     connection updating its own policy;
//!   - the same at 1,000 requests/s with every connection updating one policy (the row's
//!     lock queue).
//!
//! Prints one JSON object per scenario. `PATRONUS_BENCH_ONLY=get_sites,put_policy` runs just
//! those; `PATRONUS_BENCH_TRACE=FILE` writes each measured request's start and latency (to see
//! whether slow requests come together); `PATRONUS_BENCH_WORKERS=N` changes the worker count.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpServer};
use anyhow::{bail, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use patronus_controller::auth::{Role, SessionKeys};
use patronus_controller::server::{configure, AppState};
use patronus_proto::TenantId;
use patronus_test_support::{TestDatabase, TestEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

const CONNECTIONS: usize = 32;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return Ok(());
    }
    if let Some(pos) = args.iter().position(|a| a == "--load-generator") {
        return load_generator(&args[pos + 1..]);
    }
    actix_web::rt::System::new().block_on(server_side())
}

async fn server_side() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let (msp, tenant) = (Uuid::new_v4(), Uuid::new_v4());
    // One policy per load connection: operators edit different policies; updating one row
    // from every connection measures that row's lock queue instead (its own scenario below).
    let policies: Vec<Uuid> = (0..CONNECTIONS).map(|_| Uuid::new_v4()).collect();
    let mut sql = format!(
        "INSERT INTO msps (id, name) VALUES ('{msp}', 'bench');
         INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{tenant}', '{msp}', 'bench', 'bench');"
    );
    for (i, policy) in policies.iter().enumerate() {
        sql.push_str(&format!(
            "INSERT INTO policies (id, tenant_id, name, kind, priority, spec) VALUES ('{policy}', '{tenant}', 'voip{i}', 'routing', {}, '{{}}');",
            100 + i
        ));
    }
    let one_per_connection = policies
        .iter()
        .map(|p| format!("/api/v1/policies/{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let one_row = format!("/api/v1/policies/{}", policies[0]);
    for i in 0..200 {
        let site = Uuid::new_v4();
        sql.push_str(&format!(
            "INSERT INTO sites (id, tenant_id, name, region, overlay_address, lan_prefixes) VALUES
               ('{site}', '{tenant}', 'site{i}', 'eu-west', '100.64.0.{}', ARRAY['10.0.{i}.0/24']::cidr[]);
             INSERT INTO endpoints (tenant_id, site_id, uplink_index, name, address, interface_type) VALUES
               ('{tenant}', '{site}', 0, 'fiber', '198.18.0.{}', 'fiber');",
            i + 1,
            i + 1
        ));
    }
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner.batch_execute(&sql).await.context("seeding")?;
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
    // Two actix workers as in production; `PATRONUS_BENCH_WORKERS` to compare.
    let workers: usize = match std::env::var("PATRONUS_BENCH_WORKERS") {
        Ok(n) => n
            .parse()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .context("PATRONUS_BENCH_WORKERS must be 1-64")?,
        Err(_) => 2,
    };
    let shared = state.clone();
    let server = HttpServer::new(move || {
        // As `serve` does: each worker its own pool, its connections opened at once.
        let data = web::Data::new(shared.for_worker());
        App::new()
            .wrap(actix_web::middleware::from_fn(
                patronus_controller::api::request_id,
            ))
            .wrap(actix_web::middleware::from_fn(
                patronus_controller::metrics::record,
            ))
            .app_data(data.clone())
            .configure(configure)
    })
    .workers(workers)
    .bind("127.0.0.1:0")?;
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    // Load starts once the workers' connections are open, as they are a moment after a
    // controller starts.
    let warm_by = Instant::now() + Duration::from_secs(10);
    let open = loop {
        let workers_pools: Vec<_> = state
            .pools()
            .into_iter()
            .filter(|(name, _)| name.starts_with("worker-"))
            .map(|(_, pool)| pool.status())
            .collect();
        let open: usize = workers_pools.iter().map(|s| s.size).sum();
        if workers_pools.len() == workers && workers_pools.iter().all(|s| s.size == s.max_size)
            || Instant::now() > warm_by
        {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("warm-up: {workers} workers, {open} database connections open");

    let policy_body = serde_json::json!({
        "name": "voip{k}", "kind": "routing", "priority": 200,
        "spec": { "match": { "protocol": "udp", "dst_ports": [{ "start": 5060, "end": 5061 }] },
                  "app_class": "voip", "path_preference": { "kind": "lowest_latency" } }
    })
    .to_string();
    let scenarios = [
        // Baseline: the same harness against an endpoint with no database or Redis work.
        (
            "baseline_healthz",
            "GET",
            "/healthz".to_owned(),
            String::new(),
            1000u32,
        ),
        // Authentication (JWT + the Redis revocation check) and routing, no database.
        (
            "auth_only_app_classes",
            "GET",
            "/api/v1/app-classes".to_owned(),
            String::new(),
            1000u32,
        ),
        (
            "get_sites",
            "GET",
            "/api/v1/sites?limit=50".to_owned(),
            String::new(),
            1000u32,
        ),
        (
            "put_policy",
            "PUT",
            one_per_connection.clone(),
            policy_body.clone(),
            100u32,
        ),
        (
            "put_policy",
            "PUT",
            one_per_connection,
            policy_body.clone(),
            1000u32,
        ),
        // Every connection updating the same policy: each UPDATE waits for the row lock of
        // the transaction before it (PostgreSQL logs them at 150-200 ms under this load).
        ("put_policy_one_row", "PUT", one_row, policy_body, 1000u32),
    ];
    // `PATRONUS_BENCH_ONLY=get_sites,put_policy` runs just those scenarios (for iterating).
    let only: Option<Vec<String>> = std::env::var("PATRONUS_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    if let Some(unknown) = only
        .iter()
        .flatten()
        .find(|o| !scenarios.iter().any(|s| s.0 == o.as_str()))
    {
        let mut known: Vec<&str> = scenarios.iter().map(|s| s.0).collect();
        known.dedup();
        handle.stop(true).await;
        drop(owner);
        database.drop_now().await?;
        bail!(
            "PATRONUS_BENCH_ONLY names {unknown:?}, which is not a scenario; use some of: {}",
            known.join(",")
        );
    }
    let exe = std::env::current_exe()?;
    for (name, method, path, body, rate) in scenarios {
        if only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|o| o == name))
        {
            continue;
        }
        eprintln!("load: {name} at {rate}/s for 10 s from a second process");
        let output = tokio::task::spawn_blocking({
            let (exe, token) = (exe.clone(), token.clone());
            move || {
                Command::new(exe)
                    .args([
                        "--load-generator",
                        &addr.to_string(),
                        method,
                        &path,
                        &token,
                        &rate.to_string(),
                        "1",
                        "10",
                        &body,
                    ])
                    .output()
            }
        })
        .await??;
        if !output.status.success() {
            bail!(
                "load generator failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stats = String::from_utf8(output.stdout)?;
        println!(
            "{{\"scenario\": \"{name}\", {}",
            stats.trim().trim_start_matches('{')
        );
    }
    // The server's own view of the same requests (handler time, without the client's
    // queueing or the network), for telling where a tail comes from.
    for line in state.metrics.render(&state).lines() {
        if line.starts_with("patronus_http_request_duration_seconds_bucket")
            && (line.contains("/api/v1/sites") || line.contains("/api/v1/policies/{id}"))
        {
            eprintln!("server: {line}");
        }
    }
    handle.stop(true).await;
    drop(owner);
    state.db.close();
    drop(state);
    database.drop_now().await
}

/// Send one request on a keep-alive connection and read the whole response; returns status.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<u16> {
    stream.write_all(request).await?;
    buf.clear();
    let header_end = loop {
        let mut chunk = [0u8; 16384];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let mut chunk = [0u8; 16384];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

fn load_generator(args: &[String]) -> anyhow::Result<()> {
    let [addr, method, path, token, rate, warmup, seconds, body] = args else {
        bail!("usage: --load-generator ADDR METHOD PATH TOKEN RATE WARMUP_SECONDS SECONDS BODY");
    };
    let rate: u32 = rate.parse()?;
    let warmup: u64 = warmup.parse()?;
    let seconds: u64 = seconds.parse()?;
    // PATH may list several paths (comma-separated): connection k uses path k mod their
    // count, and `{k}` in BODY becomes that number (a policy's own name).
    let requests: Vec<Vec<u8>> = path
        .split(',')
        .enumerate()
        .map(|(k, path)| {
            let body = body.replace("{k}", &k.to_string());
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // The first WARMUP seconds run at the same rate but are reported apart: they are the
        // first query of each server connection (PostgreSQL fills a new backend's catalog
        // caches then: 10-30 ms per connection in the first 150 ms of a run).
        let total = rate as u64 * (warmup + seconds);
        let mut senders = Vec::new();
        let mut workers = Vec::new();
        for k in 0..CONNECTIONS {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(4096);
            senders.push(tx);
            let mut stream = TcpStream::connect(addr.as_str()).await?;
            stream.set_nodelay(true)?;
            let request = requests[k % requests.len()].clone();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = Vec::new();
                let mut buf = Vec::with_capacity(65536);
                while let Some(scheduled) = rx.recv().await {
                    match exchange(&mut stream, &request, &mut buf).await {
                        Ok(status) if (200..300).contains(&status) => {
                            latencies.push((scheduled, scheduled.elapsed()))
                        }
                        _ => errors.push(scheduled),
                    }
                }
                (latencies, errors)
            }));
        }
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        for i in 0..total {
            let at = started + interval.mul_f64(i as f64);
            tokio::time::sleep_until(at.into()).await;
            let _ = senders[(i as usize) % CONNECTIONS].send(at).await;
        }
        drop(senders);
        let mut latencies = Vec::new();
        let mut errors = Vec::new();
        for worker in workers {
            let (l, e) = worker.await?;
            latencies.extend(l);
            errors.extend(e);
        }
        let measured_from = started + Duration::from_secs(warmup);
        let (cold, latencies): (Vec<_>, Vec<_>) = latencies
            .into_iter()
            .partition(|(at, _)| *at < measured_from);
        let cold_p99_ms = {
            let mut cold: Vec<Duration> = cold.into_iter().map(|(_, l)| l).collect();
            cold.sort();
            cold.get(cold.len() * 99 / 100)
                .map(|d| (d.as_secs_f64() * 1e5).round() / 100.0)
        };
        let elapsed = measured_from.elapsed().as_secs_f64();
        let warmup_errors = errors.iter().filter(|at| **at < measured_from).count();
        let errors = errors.len() - warmup_errors;
        // `PATRONUS_BENCH_TRACE=FILE` writes every request's start (ms into the run) and
        // latency, for seeing whether slow requests come together (a stall) or alone.
        if let Ok(file) = std::env::var("PATRONUS_BENCH_TRACE") {
            let mut trace: Vec<_> = latencies.clone();
            trace.sort();
            // The first line: when the measured part started (Unix ms), to line the trace up
            // with other recordings.
            let started_unix_ms = (SystemTime::now() - measured_from.elapsed())
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let text: String = std::iter::once(format!("# {started_unix_ms}\n"))
                .chain(trace.iter().map(|(at, latency)| {
                    format!(
                        "{:.3} {:.3}\n",
                        (*at - measured_from).as_secs_f64() * 1e3,
                        latency.as_secs_f64() * 1e3
                    )
                }))
                .collect();
            std::fs::write(&file, text).with_context(|| format!("writing {file}"))?;
        }
        let mut latencies: Vec<Duration> = latencies.into_iter().map(|(_, l)| l).collect();
        latencies.sort();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(f64::NAN)
        };
        println!(
            "{}",
            serde_json::json!({
                "target_rate": rate,
                "achieved_rate": ((latencies.len() as f64 + errors as f64) / elapsed).round(),
                "requests": latencies.len(),
                "errors": errors,
                "p50_ms": (pct(0.50) * 100.0).round() / 100.0,
                "p99_ms": (pct(0.99) * 100.0).round() / 100.0,
                "max_ms": (pct(1.0) * 100.0).round() / 100.0,
                "warmup_s": warmup,
                "warmup_p99_ms": cold_p99_ms,
                "warmup_errors": warmup_errors,
            })
        );
        Ok(())
    })
}
