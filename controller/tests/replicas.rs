//! Two real `patronus-controller serve` processes on different ports, against the same
//! PostgreSQL, Redis and NATS: they serve the same API (a session from one works on the
//! other, a change made through one is seen through the other), exactly one holds the intent
//! publisher lease, and when that process is killed (SIGKILL, no goodbye) the other takes the
//! lease over within seconds and publishes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use patronus_test_support::{TestDatabase, TestEnv};
use serde_json::{json, Value};

/// A controller process, killed when dropped.
struct Replica {
    child: Child,
    port: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start(
    env: &TestEnv,
    database: &TestDatabase,
    config: &std::path::Path,
) -> anyhow::Result<Replica> {
    let port = free_port()?;
    let child = Command::new(env!("CARGO_BIN_EXE_patronus-controller"))
        .args(["--config", config.to_str().context("config path")?])
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("PATRONUS_DATABASE_URL", &database.app_url)
        .env("PATRONUS_REDIS_URL", &env.redis_url)
        .env("PATRONUS_NATS_URL", &env.nats_url)
        .env("PATRONUS_SESSION_SECRET", &env.session_secret)
        .env("PATRONUS_PROBE_SECRET", &env.probe_secret)
        .env("PATRONUS_NATS_CREDENTIALS_DIR", &env.nats_credentials_dir)
        .env("PATRONUS_TOKEN_SIGNING_KEY", &env.token_signing_key)
        .env("PATRONUS_MASTER_KEY", &env.master_key)
        .env("PATRONUS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting patronus-controller")?;
    Ok(Replica { child, port })
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check() {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn is_leader(port: u16) -> bool {
    http(port, "GET", "/metrics", None, None)
        .map(|(_, body)| {
            body.lines()
                .any(|l| l == "patronus_intent_publisher_leader 1")
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_serve_one_api_and_the_survivor_takes_over_publishing() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let pool = patronus_controller::db::pool(&database.app_url, 2)?;
    let email = format!("root-{}@example.com", uuid::Uuid::new_v4().simple());
    let password = "replicas share everything";
    patronus_controller::admin::create_msp(&pool, "Replica MSP", &email, password).await?;
    drop(pool);

    let dir = std::env::temp_dir().join(format!(
        "patronus-replicas-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        "[intents]\nlease_ttl_ms = 1000\ndebounce_ms = 50\n",
    )?;
    let mut replicas = vec![
        Some(start(&env, &database, &config)?),
        Some(start(&env, &database, &config)?),
    ];
    let ports: Vec<u16> = replicas.iter().flatten().map(|r| r.port).collect();
    for port in &ports {
        wait_until("a replica to be ready", Duration::from_secs(20), || {
            http(*port, "GET", "/readyz", None, None).is_ok_and(|(s, _)| s == 200)
        })?;
    }

    // A session from replica 0 works on replica 1; a tenant made on 0 is listed by 1.
    let (status, login) = http(
        ports[0],
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&json!({ "email": email, "password": password })),
    )?;
    ensure!(status == 200, "login: {status} {login}");
    let token = json_of(&login)["session_token"]
        .as_str()
        .context("token")?
        .to_owned();
    let (status, created) = http(
        ports[0],
        "POST",
        "/api/v1/tenants",
        Some(&token),
        Some(&json!({ "name": "Shared", "slug": "shared" })),
    )?;
    ensure!(status == 201, "{created}");
    let tenant = json_of(&created)["id"]
        .as_str()
        .context("tenant id")?
        .to_owned();
    let (status, listed) = http(ports[1], "GET", "/api/v1/tenants", Some(&token), None)?;
    ensure!(
        status == 200 && listed.contains(&tenant),
        "replica 1 does not see replica 0's tenant: {listed}"
    );

    // Exactly one leader.
    wait_until("a publisher leader", Duration::from_secs(5), || {
        ports.iter().filter(|p| is_leader(**p)).count() == 1
    })?;
    let leader = ports.iter().position(|p| is_leader(*p)).context("leader")?;
    let survivor = 1 - leader;

    // An enrolled site (keys as enrollment sets them), so there is an intent to publish.
    let (status, site) = http(
        ports[survivor],
        "POST",
        &format!("/api/v1/tenants/{tenant}/sites"),
        Some(&token),
        Some(&json!({
            "name": "hq", "lan_prefixes": ["10.1.0.0/24"],
            "uplinks": [{ "name": "fiber", "address": "198.18.1.1", "interface_type": "fiber" }]
        })),
    )?;
    ensure!(status == 201, "{site}");
    let site_id = json_of(&site)["id"].as_str().context("site id")?.to_owned();
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    let key = patronus_proto::WgPublicKey([9; 32]).to_base64();
    owner
        .batch_execute(&format!(
            "UPDATE sites SET wg_public_key = '{key}', status = 'active' WHERE id = '{site_id}'"
        ))
        .await?;

    // Kill the leader without letting it release the lease.
    let killed_at = Instant::now();
    replicas[leader].take();
    let takeover = wait_until(
        "the survivor to take the lease",
        Duration::from_secs(10),
        || is_leader(ports[survivor]),
    )?;
    ensure!(
        takeover < Duration::from_secs(5),
        "takeover took {takeover:?}"
    );

    // The survivor publishes the site's intent after a change made through it.
    let (status, _) = http(
        ports[survivor],
        "PATCH",
        &format!("/api/v1/tenants/{tenant}/sites/{site_id}"),
        Some(&token),
        Some(&json!({ "region": "eu-west" })),
    )?;
    ensure!(status == 200);
    // Read it the way the controller does: through the tenant's NATS account.
    let reader =
        patronus_controller::server::AppState::connect(&env.controller_config(&database.app_url)?)
            .await?;
    let kv = reader
        .tenant_nats(patronus_proto::TenantId(tenant.parse()?))
        .await?
        .intents;
    let intent_key = format!("{tenant}.{site_id}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let intent = loop {
        if let Some(bytes) = kv.get(&intent_key).await? {
            break patronus_proto::codec::decode::<patronus_proto::SiteIntent>(&bytes)?;
        }
        ensure!(
            Instant::now() < deadline,
            "the survivor never published the intent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(intent.site_name == "hq");
    println!(
        "leader killed; survivor took over the lease after {} ms and published within {} ms of the kill",
        takeover.as_millis(),
        killed_at.elapsed().as_millis()
    );

    drop(replicas);
    drop((owner, kv, reader));
    let _ = std::fs::remove_dir_all(&dir);
    database.drop_now().await
}
