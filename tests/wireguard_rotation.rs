//! Scheduled WireGuard key rotation, end to end against a real controller (HTTP on loopback),
//! PostgreSQL, Redis and NATS in operator mode, without the lab: sites enroll with real tokens,
//! one sends its next public key with a signed call, and its peers' `IntentApplied` events and
//! heartbeats are published with the peers' own NATS credentials, as their agents would. The
//! published intents are read back step by step:
//!
//! 1. announce: the peers list the next key beside the current one; the rotating site's own
//!    intent does not change;
//! 2. a peer that applied is not enough: the commit waits for every peer;
//! 3. commit: once the last peer reports, the site's intent names the next key and its peers
//!    list only that key; the database has it as the site's key, audited;
//! 4. the endpoint's refusals: unsigned, malformed, all-zero, a key in use in the tenant, a
//!    second rotation while one is pending, a new one right after a commit (429);
//! 5. a peer that never reports holds the commit only until the commit timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use patronus_controller::db::{self, schema, Scope};
use patronus_proto::enroll::{EnrollRequest, EnrollResponse, UplinkSpec};
use patronus_proto::events::{DataplaneMode, EventEnvelope, SdwanEvent};
use patronus_proto::{codec, SiteId, SiteIntent, TenantId, WgPublicKey, SCHEMA_VERSION};
use patronus_test_support::http::call;
use patronus_test_support::{RunningController, TestEnv};
use serde_json::{json, Value};
use uuid::Uuid;

/// The commit timeout of this test's controller (a peer that never reports).
const COMMIT_TIMEOUT_S: u64 = 20;

fn random_key() -> WgPublicKey {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    WgPublicKey(key)
}

/// One enrolled site: what the controller answered and the keys the edge kept.
struct Site {
    name: &'static str,
    enrolled: EnrollResponse,
    key: WgPublicKey,
    cert: rcgen::KeyPair,
    nats: async_nats::Client,
}

impl Site {
    fn id(&self) -> SiteId {
        self.enrolled.site_id
    }

    /// `method path` with `body`, signed with the site certificate as the agent signs.
    fn signed(&self, url: &str, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        use base64::Engine;
        use patronus_proto::edge_auth::*;
        use rcgen::SigningKey;
        let b64 = base64::engine::general_purpose::STANDARD;
        let der = pem::parse(&self.enrolled.certificate_pem)
            .expect("certificate pem")
            .into_contents();
        let timestamp = chrono::Utc::now().timestamp();
        let nonce = Uuid::new_v4().simple().to_string();
        let signature = self
            .cert
            .sign(&canonical_request(method, path, timestamp, &nonce, body))
            .expect("signs");
        let request = ureq::request(method, &format!("{url}{path}"))
            .set(CERTIFICATE_HEADER, &b64.encode(der))
            .set(TIMESTAMP_HEADER, &timestamp.to_string())
            .set(NONCE_HEADER, &nonce)
            .set(SIGNATURE_HEADER, &b64.encode(signature))
            .set("Content-Type", "application/json");
        let response = match request.send_bytes(body) {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let status = response.status();
        (status, response.into_json().unwrap_or(Value::Null))
    }

    fn send_key(&self, url: &str, key: &str) -> (u16, Value) {
        let body = serde_json::to_vec(&json!({ "public_key": key })).expect("encodes");
        self.signed(url, "POST", "/api/v1/edge/wireguard-key", &body)
    }

    /// The site's current intent, read as its agent reads it (direct get, own credentials).
    async fn intent(&self) -> anyhow::Result<Option<SiteIntent>> {
        let answer = self
            .nats
            .request(self.enrolled.intent.direct_get_subject.clone(), "".into())
            .await?;
        if answer.payload.is_empty() {
            return Ok(None);
        }
        Ok(codec::decode(&answer.payload).ok())
    }

    /// Report an event as the agent does, on the site's own subject.
    async fn report(&self, event: SdwanEvent) -> anyhow::Result<()> {
        let envelope = EventEnvelope {
            schema_version: SCHEMA_VERSION,
            tenant: self.enrolled.tenant_id,
            site: Some(self.id()),
            at_unix_ms: 1,
            event,
        };
        self.nats
            .publish(
                patronus_proto::subjects::events_subject(self.enrolled.tenant_id, self.id()),
                codec::encode(&envelope).into(),
            )
            .await?;
        self.nats.flush().await?;
        Ok(())
    }

    /// Apply (pretend to) the current intent: report `IntentApplied` with its revision.
    async fn applies(&self) -> anyhow::Result<u64> {
        let revision = self.intent().await?.context("no intent")?.revision;
        self.report(SdwanEvent::IntentApplied { revision }).await?;
        Ok(revision)
    }
}

/// An MSP, a tenant and its admin's session.
async fn tenant_admin(url: &str, app_url: &str) -> anyhow::Result<(String, TenantId)> {
    let pool = db::pool(app_url, 1)?;
    let tag = Uuid::new_v4().simple().to_string();
    let email = format!("root-{tag}@msp.example");
    let password = "a long enough password";
    patronus_controller::admin::create_msp(&pool, "Rotating MSP", &email, password).await?;
    drop(pool);
    let login = |email: &str| {
        call(
            "POST",
            &format!("{url}/api/v1/auth/login"),
            None,
            Some(json!({ "email": email, "password": password })),
        )
    };
    let (status, body) = login(&email);
    ensure!(status == 200, "{body}");
    let msp_admin = body["session_token"]
        .as_str()
        .context("session")?
        .to_owned();
    let (status, body) = call(
        "POST",
        &format!("{url}/api/v1/tenants"),
        Some(&msp_admin),
        Some(json!({ "name": "rotating", "slug": format!("rot-{}", &tag[..6]) })),
    );
    ensure!(status == 201, "{body}");
    let tenant: Uuid = body["id"].as_str().context("tenant id")?.parse()?;
    let admin_email = format!("admin-{tag}@tenant.example");
    let (status, body) = call(
        "POST",
        &format!("{url}/api/v1/tenants/{tenant}/operators"),
        Some(&msp_admin),
        Some(json!({ "email": admin_email, "password": password, "role": "tenant_admin" })),
    );
    ensure!(status == 201, "{body}");
    let (status, body) = login(&admin_email);
    ensure!(status == 200, "{body}");
    Ok((
        body["session_token"]
            .as_str()
            .context("session")?
            .to_owned(),
        TenantId(tenant),
    ))
}

/// Enroll `name` with a fresh token, as `patronus-edge enroll` does, and connect to NATS.
async fn enroll(
    env: &TestEnv,
    url: &str,
    admin: &str,
    tenant: TenantId,
    name: &'static str,
    n: u8,
) -> anyhow::Result<Site> {
    let (status, body) = call(
        "POST",
        &format!("{url}/api/v1/enrollment-tokens"),
        Some(admin),
        Some(json!({ "site": name, "ttl_s": 600 })),
    );
    ensure!(status == 201, "{body}");
    let token = body["secret"].as_str().context("secret")?.to_owned();
    let site = SiteId(body["site_id"].as_str().context("site_id")?.parse()?);
    let cert = rcgen::KeyPair::generate()?;
    let nats_key = nkeys::KeyPair::new_user();
    let key = random_key();
    let request = EnrollRequest {
        token,
        csr_pem: patronus_controller::pki::site_csr_pem(&cert, tenant, site)?,
        wg_public_key: key,
        nats_public_key: nats_key.public_key(),
        uplinks: vec![UplinkSpec {
            name: "fiber".into(),
            address: format!("198.18.{n}.1").parse()?,
            interface_type: patronus_proto::policy::LinkKind::Fiber,
            bandwidth_mbps: Some(1000),
            cost_per_gb: 0.0,
            metered: false,
        }],
    };
    let (status, body) = call(
        "POST",
        &format!("{url}/api/v1/enroll"),
        None,
        Some(serde_json::to_value(&request)?),
    );
    ensure!(status == 200, "{body}");
    let enrolled: EnrollResponse = serde_json::from_value(body)?;
    let nats_key = Arc::new(nats_key);
    let nats = async_nats::ConnectOptions::with_jwt(enrolled.nats.user_jwt.clone(), move |nonce| {
        let key = nats_key.clone();
        async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
    })
    .custom_inbox_prefix(enrolled.nats.inbox_prefix.clone())
    .request_timeout(Some(Duration::from_secs(2)))
    .connect(env.nats_url.as_str())
    .await?;
    Ok(Site {
        name,
        enrolled,
        key,
        cert,
        nats,
    })
}

/// Poll `check` every 50 ms until it gives `Some`, for at most `within`.
async fn until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check().await? {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How `viewer`'s intent lists `peer`: (public key, next key), once it lists it.
async fn seen_as(
    viewer: &Site,
    peer: &Site,
) -> anyhow::Result<Option<(WgPublicKey, Option<WgPublicKey>)>> {
    Ok(viewer
        .intent()
        .await?
        .and_then(|i| i.peer(peer.id()).map(|p| (p.public_key, p.next_public_key))))
}

/// The site's WireGuard columns: (key, next key, announcing revision, rotated at set).
type KeyRow = (Option<String>, Option<String>, Option<i64>, bool);

async fn key_row(pool: &db::DbPool, tenant: TenantId, site: SiteId) -> anyhow::Result<KeyRow> {
    let mut conn = pool.get().await?;
    let row: (
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            use schema::sites as s;
            s::table
                .find(site.0)
                .select((
                    s::wg_public_key,
                    s::wg_next_public_key,
                    s::wg_next_announce_revision,
                    s::wg_key_rotated_at,
                ))
                .first(conn)
                .await
        })
    })
    .await?;
    Ok((row.0, row.1, row.2, row.3.is_some()))
}

async fn applied_revision(
    pool: &db::DbPool,
    tenant: TenantId,
    site: SiteId,
) -> anyhow::Result<Option<i64>> {
    let mut conn = pool.get().await?;
    Ok(db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            use schema::site_intents as i;
            i::table
                .find(site.0)
                .select(i::applied_revision)
                .first::<Option<i64>>(conn)
                .await
                .optional()
        })
    })
    .await?
    .flatten())
}

async fn audit_actions(pool: &db::DbPool, tenant: TenantId) -> anyhow::Result<Vec<String>> {
    let mut conn = pool.get().await?;
    Ok(db::in_scope(&mut conn, Scope::Tenant(tenant), move |conn| {
        Box::pin(async move {
            use schema::audit_log as a;
            a::table
                .filter(a::tenant_id.eq(tenant.0))
                .order(a::id)
                .select(a::action)
                .load::<String>(conn)
                .await
        })
    })
    .await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_is_announced_to_every_peer_and_committed_once_they_all_applied_it(
) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let env = TestEnv::load()?;
    let database = patronus_test_support::TestDatabase::create(&env).await?;
    db::migrations::run_pending(&database.owner_url).await?;
    let mut config = env.controller_config(&database.app_url)?;
    config.provisioning.wireguard_commit_timeout_s = COMMIT_TIMEOUT_S;
    config.validate()?;
    let controller = RunningController::start(config)?;
    let url = controller.url.clone();
    let pool = db::pool(&database.app_url, 2)?;
    let (admin, tenant) = tenant_admin(&url, &database.app_url).await?;
    let a = enroll(&env, &url, &admin, tenant, "rotating", 1).await?;
    let b = enroll(&env, &url, &admin, tenant, "peer-b", 2).await?;
    let c = enroll(&env, &url, &admin, tenant, "peer-c", 3).await?;
    // Full mesh: everyone lists everyone with its enrolled key, nobody with a next key.
    for (viewer, peer) in [(&a, &b), (&a, &c), (&b, &a), (&b, &c), (&c, &a), (&c, &b)] {
        let seen = until(Duration::from_secs(10), "the first intents", || {
            seen_as(viewer, peer)
        })
        .await?;
        ensure!(
            seen == (peer.key, None),
            "{} sees {}: {seen:?}",
            viewer.name,
            peer.name
        );
    }
    let a_before = a.intent().await?.context("a's intent")?;
    ensure!(a_before.wireguard.public_key == a.key);
    // The controller records what edges report applying (heartbeats every 10 s repeat it;
    // here every 500 ms until it is there).
    let c_first = c.intent().await?.context("c's intent")?.revision;
    let mut last_beat = Instant::now() - Duration::from_secs(1);
    until(
        Duration::from_secs(40),
        "the first applied revision",
        || {
            let beat = last_beat.elapsed() >= Duration::from_millis(500);
            if beat {
                last_beat = Instant::now();
            }
            let c = &c;
            let pool = &pool;
            async move {
                if beat {
                    c.report(SdwanEvent::IntentApplied { revision: c_first })
                        .await?;
                }
                Ok(
                    (applied_revision(pool, tenant, c.id()).await? == Some(c_first as i64))
                        .then_some(()),
                )
            }
        },
    )
    .await?;

    // Refusals that change nothing.
    let (status, body) = call(
        "POST",
        &format!("{url}/api/v1/edge/wireguard-key"),
        None,
        Some(json!({ "public_key": random_key() })),
    );
    ensure!(
        status == 401 && body["error"] == "unsigned_request",
        "{status} {body}"
    );
    for (bad, code) in [
        (json!({ "public_key": "AAAA" }), "invalid_body"),
        (
            json!({ "public_key": random_key(), "extra": 1 }),
            "invalid_body",
        ),
        (json!({ "key": random_key() }), "invalid_body"),
    ] {
        let body = serde_json::to_vec(&bad)?;
        let (status, answer) = a.signed(&url, "POST", "/api/v1/edge/wireguard-key", &body);
        ensure!(
            status == 400 && answer["error"] == code,
            "{bad}: {status} {answer}"
        );
    }
    let (status, body) = a.send_key(&url, &WgPublicKey([0; 32]).to_base64());
    ensure!(
        status == 422 && body["error"] == "invalid_key",
        "{status} {body}"
    );
    // Another site's current key.
    let (status, body) = a.send_key(&url, &b.key.to_base64());
    ensure!(
        status == 409 && body["error"] == "wireguard_key_in_use",
        "{status} {body}"
    );
    // Its own current key: nothing to rotate, and nothing happens.
    let (status, body) = a.send_key(&url, &a.key.to_base64());
    ensure!(
        status == 200 && body["state"] == "current",
        "{status} {body}"
    );
    ensure!(key_row(&pool, tenant, a.id()).await?.1.is_none());

    // 1. The edge sends its next key: recorded, audited, announced to both peers.
    let next = random_key();
    let sent_at = Instant::now();
    let (status, body) = a.send_key(&url, &next.to_base64());
    ensure!(
        status == 200 && body["state"] == "pending" && body["public_key"] == next.to_base64(),
        "{status} {body}"
    );
    // Sent again (an answer lost on the way): the same answer, nothing new.
    let (status, body) = a.send_key(&url, &next.to_base64());
    ensure!(
        status == 200 && body["state"] == "pending",
        "{status} {body}"
    );
    // One pending rotation per site.
    let (status, body) = a.send_key(&url, &random_key().to_base64());
    ensure!(
        status == 409 && body["error"] == "rotation_pending",
        "{status} {body}"
    );
    // The pending key is taken for the whole tenant.
    let (status, body) = c.send_key(&url, &next.to_base64());
    ensure!(
        status == 409 && body["error"] == "wireguard_key_in_use",
        "{status} {body}"
    );
    for peer in [&b, &c] {
        until(Duration::from_secs(5), "the announcement", || async {
            Ok((seen_as(peer, &a).await? == Some((a.key, Some(next)))).then_some(()))
        })
        .await?;
        // The other peer is not rotating.
        let other = if peer.id() == b.id() { &c } else { &b };
        ensure!(seen_as(peer, other).await? == Some((other.key, None)));
    }
    let announced_after = sent_at.elapsed();
    let announce_revision = until(
        Duration::from_secs(5),
        "the announcing revision",
        || async { Ok(key_row(&pool, tenant, a.id()).await?.2) },
    )
    .await?;
    let (current, pending, _, rotated) = key_row(&pool, tenant, a.id()).await?;
    ensure!(current == Some(a.key.to_base64()) && pending == Some(next.to_base64()) && !rotated);
    // The rotating site's own intent did not change at all.
    ensure!(
        a.intent().await?.context("a's intent")?.revision == a_before.revision,
        "the rotating site's intent was republished while announcing"
    );
    let b_revision = b.intent().await?.context("b")?.revision;
    let c_revision = c.intent().await?.context("c")?.revision;
    ensure!(
        announce_revision as u64 == b_revision.min(c_revision),
        "announcing revision {announce_revision}, peers at {b_revision} and {c_revision}"
    );

    // 2. Peer B applies it; C has not: still announcing.
    b.applies().await?;
    until(Duration::from_secs(5), "b's applied revision", || async {
        Ok(
            (applied_revision(&pool, tenant, b.id()).await? == Some(b_revision as i64))
                .then_some(()),
        )
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        a.intent().await?.context("a")?.wireguard.public_key == a.key,
        "committed before every peer applied"
    );
    ensure!(seen_as(&b, &a).await? == Some((a.key, Some(next))));

    // 3. C reports it in a heartbeat (as after a lost IntentApplied): the commit follows.
    let reported = Instant::now();
    c.report(SdwanEvent::Heartbeat {
        applied_revision: c_revision,
        uptime_s: 60,
        tunnels_up: 2,
        paths_up: 2,
        paths_total: 2,
        dataplane: DataplaneMode::RoutesOnly,
    })
    .await?;
    let committed = until(Duration::from_secs(5), "the commit", || async {
        Ok(a.intent().await?.filter(|i| i.wireguard.public_key == next))
    })
    .await?;
    let commit_took = reported.elapsed();
    ensure!(committed.revision > a_before.revision);
    for peer in [&b, &c] {
        until(Duration::from_secs(5), "the peers' commit", || async {
            Ok((seen_as(peer, &a).await? == Some((next, None))).then_some(()))
        })
        .await?;
    }
    ensure!(
        sent_at.elapsed() < Duration::from_secs(COMMIT_TIMEOUT_S - 5),
        "the commit came from the timeout, not the reports"
    );
    let (current, pending, announced, rotated) =
        until(Duration::from_secs(5), "the recorded commit", || async {
            let row = key_row(&pool, tenant, a.id()).await?;
            Ok(row.1.is_none().then_some(row))
        })
        .await?;
    ensure!(
        current == Some(next.to_base64()) && pending.is_none() && announced.is_none() && rotated
    );
    let actions = audit_actions(&pool, tenant).await?;
    ensure!(
        actions.iter().any(|a| a == "site.wireguard_key_submitted")
            && actions.iter().any(|a| a == "site.wireguard_key_rotated"),
        "{actions:?}"
    );
    // The operators' view shows the key and when it was rotated.
    let (_, site_view) = call(
        "GET",
        &format!("{url}/api/v1/sites/{}", a.id().0),
        Some(&admin),
        None,
    );
    ensure!(
        site_view["wg_public_key"] == next.to_base64()
            && site_view["wg_next_public_key"].is_null()
            && site_view["wg_key_rotated_at"].is_string(),
        "{site_view}"
    );
    // Settled: nothing is republished after the commit.
    let mut settled = Vec::new();
    for site in [&a, &b, &c] {
        settled.push(site.intent().await?.context("intent")?.revision);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (site, revision) in [&a, &b, &c].iter().zip(&settled) {
        ensure!(
            site.intent().await?.context("intent")?.revision == *revision,
            "{} was republished after the commit",
            site.name
        );
    }

    // 4. After the commit: the same key again is "current"; a new one is too soon.
    let (status, body) = a.send_key(&url, &next.to_base64());
    ensure!(
        status == 200 && body["state"] == "current",
        "{status} {body}"
    );
    let (status, body) = a.send_key(&url, &random_key().to_base64());
    ensure!(
        status == 429 && body["error"] == "rotation_too_soon",
        "{status} {body}"
    );
    // The old key is free for nobody: it is gone from every intent.
    for viewer in [&b, &c] {
        let intent = viewer.intent().await?.context("intent")?;
        ensure!(intent
            .peers
            .iter()
            .all(|p| p.public_key != a.key && p.next_public_key != Some(a.key)));
    }
    println!(
        "rotation: announced {announced_after:?} after the key was sent; committed {commit_took:?} after the last peer reported"
    );

    // 5. B rotates; A applies, C never reports: the commit waits for the timeout, then comes.
    let b_next = random_key();
    let (status, body) = b.send_key(&url, &b_next.to_base64());
    ensure!(status == 200, "{status} {body}");
    until(Duration::from_secs(5), "b's announcement", || async {
        Ok((seen_as(&c, &b).await? == Some((b.key, Some(b_next)))
            && seen_as(&a, &b).await? == Some((b.key, Some(b_next))))
        .then_some(()))
    })
    .await?;
    let announced_at = Instant::now();
    a.applies().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(b.intent().await?.context("b")?.wireguard.public_key == b.key);
    until(
        Duration::from_secs(COMMIT_TIMEOUT_S + 10),
        "the commit by timeout",
        || async {
            Ok(b.intent()
                .await?
                .filter(|i| i.wireguard.public_key == b_next)
                .map(|_| ()))
        },
    )
    .await?;
    let waited = announced_at.elapsed();
    ensure!(
        waited >= Duration::from_secs(COMMIT_TIMEOUT_S - 3),
        "committed after {waited:?}, before the timeout"
    );
    // The silent peer gets the committed key when it reads its intent.
    ensure!(seen_as(&c, &b).await? == Some((b_next, None)));
    println!("rotation with a silent peer: committed {waited:?} after the announcement");

    drop((a, b, c));
    drop(pool);
    controller.stop().await;
    database.drop_now().await
}
