//! Zero-touch enrollment against a real controller (HTTP on loopback), PostgreSQL, Redis and
//! NATS in operator mode: tokens work once and only for their site, bad tokens and bad CSRs
//! change nothing, twenty concurrent redemptions give one success, the credentials returned
//! work on the NATS server, revocation of a token holds, and no secret reaches the logs.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{ensure, Context};
use futures_util::StreamExt;
use patronus_controller::enrollment::TokenKeys;
use patronus_proto::enroll::{EnrollRequest, EnrollResponse, UplinkSpec};
use patronus_proto::{SiteId, TenantId, WgPublicKey};
use patronus_test_support::http::call;
use patronus_test_support::{RunningController, TestDatabase, TestEnv};
use serde_json::{json, Value};
use uuid::Uuid;

/// Every log line of this test binary, to grep for secrets.
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buffer
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = self.0.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct World {
    url: String,
    admin_a: String,
    tenant_a: TenantId,
    admin_b: String,
}

async fn world(url: &str, database: &TestDatabase) -> anyhow::Result<World> {
    let pool = patronus_controller::db::pool(&database.app_url, 1)?;
    let tag = Uuid::new_v4().simple().to_string();
    let email = format!("root-{tag}@msp.example");
    let password = "a long enough password";
    patronus_controller::admin::create_msp(&pool, "Enrolling MSP", &email, password).await?;
    drop(pool);
    let (status, body) = call(
        "POST",
        &format!("{url}/api/v1/auth/login"),
        None,
        Some(json!({ "email": email, "password": password })),
    );
    ensure!(status == 200, "{body}");
    let msp_admin = body["session_token"]
        .as_str()
        .context("session")?
        .to_owned();
    let mut tenants = Vec::new();
    let mut admins = Vec::new();
    for slug in ["alpha", "bravo"] {
        let (status, body) = call(
            "POST",
            &format!("{url}/api/v1/tenants"),
            Some(&msp_admin),
            Some(json!({ "name": slug, "slug": format!("{slug}-{}", &tag[..6]) })),
        );
        ensure!(status == 201, "{body}");
        let tenant: Uuid = body["id"].as_str().context("tenant id")?.parse()?;
        let admin_email = format!("{slug}-{tag}@tenant.example");
        let (status, body) = call(
            "POST",
            &format!("{url}/api/v1/tenants/{tenant}/operators"),
            Some(&msp_admin),
            Some(json!({ "email": admin_email, "password": password, "role": "tenant_admin" })),
        );
        ensure!(status == 201, "{body}");
        let (_, body) = call(
            "POST",
            &format!("{url}/api/v1/auth/login"),
            None,
            Some(json!({ "email": admin_email, "password": password })),
        );
        admins.push(
            body["session_token"]
                .as_str()
                .context("session")?
                .to_owned(),
        );
        tenants.push(TenantId(tenant));
    }
    Ok(World {
        url: url.to_owned(),
        admin_a: admins[0].clone(),
        admin_b: admins[1].clone(),
        tenant_a: tenants[0],
    })
}

/// A token for `site` of the admin's tenant: (secret, token id, site id).
fn new_token(w: &World, admin: &str, site: &str) -> anyhow::Result<(String, Uuid, SiteId)> {
    let (status, body) = call(
        "POST",
        &format!("{}/api/v1/enrollment-tokens", w.url),
        Some(admin),
        Some(json!({ "site": site, "ttl_s": 600 })),
    );
    ensure!(status == 201, "{body}");
    ensure!(body["command"]
        .as_str()
        .is_some_and(|c| c.starts_with("patronus-edge enroll --controller http://")));
    Ok((
        body["secret"].as_str().context("secret")?.to_owned(),
        body["id"].as_str().context("id")?.parse()?,
        SiteId(body["site_id"].as_str().context("site_id")?.parse()?),
    ))
}

/// What an edge generates: keys it keeps, and the request it sends.
struct EdgeKeys {
    nats: nkeys::KeyPair,
    cert: rcgen::KeyPair,
    request: EnrollRequest,
}

fn edge_request(token: &str, tenant: TenantId, site: SiteId) -> anyhow::Result<EdgeKeys> {
    let cert_key = rcgen::KeyPair::generate()?;
    let nats = nkeys::KeyPair::new_user();
    let mut wg = [0u8; 32];
    wg[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    wg[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    Ok(EdgeKeys {
        request: EnrollRequest {
            token: token.to_owned(),
            csr_pem: patronus_controller::pki::site_csr_pem(&cert_key, tenant, site)?,
            wg_public_key: WgPublicKey(wg),
            nats_public_key: nats.public_key(),
            uplinks: vec![
                UplinkSpec {
                    name: "fiber".into(),
                    address: "198.18.7.1".parse()?,
                    interface_type: patronus_proto::policy::LinkKind::Fiber,
                    bandwidth_mbps: Some(1000),
                    cost_per_gb: 0.0,
                    metered: false,
                },
                UplinkSpec {
                    name: "lte".into(),
                    address: "198.19.7.1".parse()?,
                    interface_type: patronus_proto::policy::LinkKind::Lte,
                    bandwidth_mbps: Some(50),
                    cost_per_gb: 2.5,
                    metered: true,
                },
            ],
        },
        nats,
        cert: cert_key,
    })
}

fn enroll(w: &World, request: &EnrollRequest) -> (u16, Value) {
    call(
        "POST",
        &format!("{}/api/v1/enroll", w.url),
        None,
        Some(serde_json::to_value(request).expect("request encodes")),
    )
}

fn site_of(w: &World, admin: &str, site: SiteId) -> Value {
    call(
        "GET",
        &format!("{}/api/v1/sites/{}", w.url, site.0),
        Some(admin),
        None,
    )
    .1
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_tokens_work_once_for_their_site_and_nothing_else_changes() -> anyhow::Result<()>
{
    let logs = captured_logs();
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let config = env.controller_config(&database.app_url)?;
    let keys = TokenKeys::from_seed(
        &patronus_controller::config::secret_bytes_32(&config.provisioning.token_signing_key)
            .context("token key")?,
    );
    let controller = RunningController::start(config)?;
    let w = world(&controller.url, &database).await?;
    let mut secrets: Vec<String> = Vec::new();

    // A token for a new site: the site appears pending, with no key.
    let (token, token_id, site) = new_token(&w, &w.admin_a, "branch-1")?;
    secrets.push(token.clone());
    let pending = site_of(&w, &w.admin_a, site);
    ensure!(pending["status"] == "pending", "{pending}");
    ensure!(pending["wg_public_key"].is_null());

    // Bad CSRs are refused before the token is touched.
    let edge = edge_request(&token, w.tenant_a, site)?;
    let mut wrong_subject = edge_request(&token, w.tenant_a, SiteId(Uuid::new_v4()))?.request;
    wrong_subject.token = token.clone();
    let (status, body) = enroll(&w, &wrong_subject);
    ensure!(
        status == 422 && body["error"] == "wrong_subject",
        "{status} {body}"
    );
    let mut tampered = edge.request.clone();
    let mut der = pem::parse(&tampered.csr_pem)?.into_contents();
    let last = der.len() - 1;
    der[last] ^= 1;
    tampered.csr_pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let (status, body) = enroll(&w, &tampered);
    ensure!(
        status == 422 && body["error"] == "invalid_csr",
        "{status} {body}"
    );
    let rsa = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            "/dev/null",
        ])
        .args(["-subj", &format!("/CN={}/O={}", site.0, w.tenant_a.0)])
        .output()
        .context("openssl (installed by scripts/setup)")?;
    ensure!(rsa.status.success(), "openssl failed");
    let mut weak = edge.request.clone();
    weak.csr_pem = String::from_utf8(rsa.stdout)?;
    let (status, body) = enroll(&w, &weak);
    ensure!(
        status == 422 && body["error"] == "weak_key",
        "{status} {body}"
    );

    // Garbage, a changed claim, a foreign signature and an expired token: 401, nothing burnt.
    let claims = patronus_controller::enrollment::token::peek_claims(&token).context("claims")?;
    let now = chrono::Utc::now();
    let other_key = TokenKeys::from_seed(&[42u8; 32]);
    let forged = other_key
        .mint(
            claims.tenant,
            claims.sub,
            "branch-1",
            claims.jti,
            now,
            now + chrono::Duration::minutes(5),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let expired = keys
        .mint(
            claims.tenant,
            claims.sub,
            "branch-1",
            claims.jti,
            now - chrono::Duration::hours(2),
            now - chrono::Duration::hours(1),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let parts: Vec<&str> = token.split('.').collect();
    let mut changed = claims.clone();
    changed.site_name = "elsewhere".into();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let changed_claim = format!(
        "{}.{}.{}",
        parts[0],
        base64::Engine::encode(&b64, serde_json::to_vec(&changed)?),
        parts[2]
    );
    for bad in [
        "",
        "not-a-token",
        forged.as_str(),
        expired.as_str(),
        changed_claim.as_str(),
    ] {
        let mut request = edge.request.clone();
        request.token = bad.to_owned();
        let (status, body) = enroll(&w, &request);
        ensure!(
            status == 401 && body["error"] == "invalid_token",
            "{bad:.20}: {status} {body}"
        );
        ensure!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let (status, body) = call(
        "POST",
        &format!("{}/api/v1/enroll", w.url),
        None,
        Some(json!({ "token": token, "unexpected": true })),
    );
    ensure!((400..500).contains(&status), "{status} {body}");
    ensure!(site_of(&w, &w.admin_a, site)["status"] == "pending");

    // Tenant A's token with tenant B's site: the signature is ours (a leaked signing key or a
    // bug), the claims disagree with the database, and nothing happens.
    let (token_b, _, site_b) = new_token(&w, &w.admin_b, "branch-b")?;
    secrets.push(token_b.clone());
    let cross = keys
        .mint(
            w.tenant_a.0,
            site_b.0,
            "branch-b",
            claims.jti,
            now,
            now + chrono::Duration::minutes(5),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cross_request = edge_request(&cross, w.tenant_a, site_b)?.request;
    let (status, body) = enroll(&w, &cross_request);
    ensure!(status == 401, "{status} {body}");
    ensure!(site_of(&w, &w.admin_b, site_b)["status"] == "pending");

    // The real redemption.
    let (status, body) = enroll(&w, &edge.request);
    ensure!(status == 200, "{status} {body}");
    let enrolled: EnrollResponse = serde_json::from_value(body)?;
    ensure!(enrolled.site_id == site && enrolled.tenant_id == w.tenant_a);
    ensure!(enrolled.certificate_pem.contains("BEGIN CERTIFICATE"));
    ensure!(enrolled.ca_certificate_pem.contains("BEGIN CERTIFICATE"));
    secrets.push(enrolled.nats.user_jwt.clone());
    let active = site_of(&w, &w.admin_a, site);
    ensure!(active["status"] == "active", "{active}");
    ensure!(active["wg_public_key"] == edge.request.wg_public_key.to_base64());
    ensure!(
        active["uplinks"].as_array().map(Vec::len) == Some(2),
        "{active}"
    );

    // Used once: the second use is refused, and the token list says so without the secret.
    let (status, body) = enroll(&w, &edge.request);
    ensure!(status == 409, "{status} {body}");
    let (_, listed) = call(
        "GET",
        &format!("{}/api/v1/enrollment-tokens", w.url),
        Some(&w.admin_a),
        None,
    );
    let entry = listed["items"]
        .as_array()
        .and_then(|items| items.iter().find(|t| t["id"] == token_id.to_string()))
        .context("token listed")?;
    ensure!(entry["state"] == "redeemed", "{entry}");
    ensure!(
        !listed.to_string().contains(&token),
        "a listed token shows its secret"
    );

    // The credentials work on the NATS server: read the intent the publisher wrote.
    let nats_key = Arc::new(edge.nats);
    let signer = nats_key.clone();
    let client =
        async_nats::ConnectOptions::with_jwt(enrolled.nats.user_jwt.clone(), move |nonce| {
            let signer = signer.clone();
            async move { signer.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .custom_inbox_prefix(enrolled.nats.inbox_prefix.clone())
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(env.nats_url.as_str())
        .await
        .context("the site's NATS credentials")?;
    let mut updates = client.subscribe(enrolled.intent.kv_subject.clone()).await?;
    client.flush().await?;
    let intent_bytes = match client
        .request(enrolled.intent.direct_get_subject.clone(), "".into())
        .await
    {
        Ok(message) if !message.payload.is_empty() => message.payload,
        _ => {
            tokio::time::timeout(Duration::from_secs(10), updates.next())
                .await
                .context("no intent published for the enrolled site")?
                .context("subscription closed")?
                .payload
        }
    };
    let intent: patronus_proto::SiteIntent = patronus_proto::codec::decode(&intent_bytes)?;
    ensure!(intent.site == site, "intent for {:?}", intent.site);
    drop(client);

    // Twenty concurrent redemptions of one token: exactly one success.
    let (token2, _, site2) = new_token(&w, &w.admin_a, "branch-2")?;
    secrets.push(token2.clone());
    let mut handles = Vec::new();
    for _ in 0..20 {
        let request = edge_request(&token2, w.tenant_a, site2)?.request;
        let url = w.url.clone();
        handles.push(std::thread::spawn(move || {
            call(
                "POST",
                &format!("{url}/api/v1/enroll"),
                None,
                Some(serde_json::to_value(&request).expect("encodes")),
            )
        }));
    }
    let statuses: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().map(|(s, _)| s).unwrap_or(0))
        .collect();
    ensure!(
        statuses.iter().filter(|s| **s == 200).count() == 1
            && statuses.iter().filter(|s| **s == 409).count() == 19,
        "{statuses:?}"
    );

    // A revoked token cannot be used.
    let (token3, token3_id, site3) = new_token(&w, &w.admin_a, "branch-3")?;
    secrets.push(token3.clone());
    let (status, _) = call(
        "DELETE",
        &format!("{}/api/v1/enrollment-tokens/{token3_id}", w.url),
        Some(&w.admin_a),
        None,
    );
    ensure!(status == 204);
    let (status, body) = enroll(&w, &edge_request(&token3, w.tenant_a, site3)?.request);
    ensure!(
        status == 401
            && body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("revoked")),
        "{body}"
    );
    // Tenant B cannot see or revoke tenant A's tokens.
    let (status, _) = call(
        "DELETE",
        &format!("{}/api/v1/enrollment-tokens/{token3_id}", w.url),
        Some(&w.admin_b),
        None,
    );
    ensure!(status == 404);

    controller.stop().await;
    // Nothing secret in the logs: tokens, the user JWT, any private key or nkey seed.
    let text = String::from_utf8(logs.lock().map(|l| l.clone()).unwrap_or_default())?;
    ensure!(text.contains("site enrolled"), "logs were not captured");
    for secret in &secrets {
        ensure!(
            !text.contains(secret.as_str()),
            "a token or JWT appears in the logs"
        );
    }
    ensure!(
        !text.contains("PRIVATE KEY"),
        "a private key appears in the logs"
    );
    ensure!(
        !text.contains(&nats_key.seed()?),
        "an nkey seed appears in the logs"
    );
    database.drop_now().await
}

/// Connect with a site's enrolled credentials; connection events arrive on the channel.
async fn connect_site(
    env: &TestEnv,
    enrolled: &EnrollResponse,
    key: nkeys::KeyPair,
) -> anyhow::Result<(
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let key = Arc::new(key);
    let client =
        async_nats::ConnectOptions::with_jwt(enrolled.nats.user_jwt.clone(), move |nonce| {
            let key = key.clone();
            async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .custom_inbox_prefix(enrolled.nats.inbox_prefix.clone())
        .request_timeout(Some(Duration::from_secs(2)))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        })
        .connect(env.nats_url.as_str())
        .await?;
    Ok((client, rx))
}

/// The peers in a site's published intent (empty when none is published).
async fn published_peers(client: &async_nats::Client, enrolled: &EnrollResponse) -> Vec<SiteId> {
    match client
        .request(enrolled.intent.direct_get_subject.clone(), "".into())
        .await
    {
        Ok(m) if !m.payload.is_empty() => {
            patronus_proto::codec::decode::<patronus_proto::SiteIntent>(&m.payload)
                .map(|i| i.peers.iter().map(|p| p.site).collect())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_site_is_cut_off_from_nats_and_dropped_by_its_peers_within_5_s(
) -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let controller = RunningController::start(env.controller_config(&database.app_url)?)?;
    let w = world(&controller.url, &database).await?;

    let mut sites = Vec::new();
    for name in ["doomed", "survivor"] {
        let (token, _, site) = new_token(&w, &w.admin_a, name)?;
        let edge = edge_request(&token, w.tenant_a, site)?;
        let (status, body) = enroll(&w, &edge.request);
        ensure!(status == 200, "{body}");
        let enrolled: EnrollResponse = serde_json::from_value(body)?;
        sites.push((enrolled, edge.nats));
    }
    let (survivor, survivor_key) = sites.pop().context("survivor")?;
    let (doomed, doomed_key) = sites.pop().context("doomed")?;
    let (doomed_client, mut doomed_events) = connect_site(&env, &doomed, doomed_key).await?;
    let (survivor_client, mut survivor_events) =
        connect_site(&env, &survivor, survivor_key).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !published_peers(&survivor_client, &survivor)
        .await
        .contains(&doomed.site_id)
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "the survivor never got the doomed peer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let revoked_at = std::time::Instant::now();
    let (status, body) = call(
        "POST",
        &format!("{}/api/v1/sites/{}/revoke", w.url, doomed.site_id.0),
        Some(&w.admin_a),
        None,
    );
    ensure!(
        status == 200 && body["status"] == "revoked",
        "{status} {body}"
    );
    // The NATS server drops the revoked edge, and it cannot come back.
    let disconnected = loop {
        match tokio::time::timeout(Duration::from_secs(5), doomed_events.recv()).await {
            Ok(Some(async_nats::Event::Disconnected)) => break revoked_at.elapsed(),
            Ok(Some(_)) => continue,
            _ => anyhow::bail!("the revoked site stayed connected for 5 s"),
        }
    };
    // Its peer's next intent no longer lists it.
    while published_peers(&survivor_client, &survivor)
        .await
        .contains(&doomed.site_id)
    {
        ensure!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "the peer still lists the revoked site after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dropped = revoked_at.elapsed();
    // The survivor itself stayed connected through its account's update.
    while let Ok(event) = survivor_events.try_recv() {
        ensure!(
            !matches!(event, async_nats::Event::Disconnected),
            "the revocation disconnected another site"
        );
    }
    println!(
        "revocation: NATS connection closed after {disconnected:?}; peer intent without it after {dropped:?}"
    );
    ensure!(disconnected < Duration::from_secs(5) && dropped < Duration::from_secs(5));
    ensure!(
        doomed_client
            .request(doomed.intent.direct_get_subject.clone(), "".into())
            .await
            .is_err(),
        "the revoked site still reads its intent"
    );

    // Its certificate is on the tenant's revocation list, signed by the tenant CA.
    let (status, crl) = call(
        "GET",
        &format!("{}/api/v1/pki/crl", w.url),
        Some(&w.admin_a),
        None,
    );
    ensure!(status == 200, "{crl}");
    let doomed_serial = {
        let der = pem::parse(&doomed.certificate_pem)?.into_contents();
        let (_, cert) = x509_parser::parse_x509_certificate(&der)?;
        cert.raw_serial_as_string().replace(':', "")
    };
    ensure!(
        crl["revoked"]
            .as_array()
            .is_some_and(|r| r.iter().any(|e| e["serial"] == doomed_serial.as_str())),
        "{crl}"
    );
    ensure!(crl["crl_pem"]
        .as_str()
        .is_some_and(|p| p.contains("BEGIN X509 CRL")));
    let (_, crl_b) = call(
        "GET",
        &format!("{}/api/v1/pki/crl", w.url),
        Some(&w.admin_b),
        None,
    );
    ensure!(
        crl_b["revoked"].as_array().is_some_and(Vec::is_empty),
        "tenant B sees A's revocations"
    );

    // The revoked site cannot be given a new token, and revoking again is harmless.
    let (status, _) = call(
        "POST",
        &format!("{}/api/v1/enrollment-tokens", w.url),
        Some(&w.admin_a),
        Some(json!({ "site": "doomed" })),
    );
    ensure!(status == 409, "{status}");
    let (status, _) = call(
        "POST",
        &format!("{}/api/v1/sites/{}/revoke", w.url, doomed.site_id.0),
        Some(&w.admin_a),
        None,
    );
    ensure!(status == 200);
    // Tenant B cannot revoke tenant A's site.
    let (status, _) = call(
        "POST",
        &format!("{}/api/v1/sites/{}/revoke", w.url, survivor.site_id.0),
        Some(&w.admin_b),
        None,
    );
    ensure!(status == 404, "{status}");

    drop((doomed_client, survivor_client));
    controller.stop().await;
    database.drop_now().await
}

/// A request signed as an edge: certificate (PEM), key, and the parts that are signed.
struct Signed<'a> {
    certificate_pem: &'a str,
    key: &'a rcgen::KeyPair,
    timestamp: i64,
    nonce: String,
}

impl Signed<'_> {
    fn send(
        &self,
        url: &str,
        method: &str,
        path: &str,
        signed_body: &[u8],
        sent_body: &[u8],
    ) -> (u16, Value) {
        use patronus_proto::edge_auth::*;
        use rcgen::SigningKey;
        let b64 = base64::engine::general_purpose::STANDARD;
        let der = pem::parse(self.certificate_pem)
            .expect("certificate pem")
            .into_contents();
        let signature = self
            .key
            .sign(&canonical_request(
                method,
                path,
                self.timestamp,
                &self.nonce,
                signed_body,
            ))
            .expect("signs");
        let request = ureq::request(method, &format!("{url}{path}"))
            .set(CERTIFICATE_HEADER, &base64::Engine::encode(&b64, der))
            .set(TIMESTAMP_HEADER, &self.timestamp.to_string())
            .set(NONCE_HEADER, &self.nonce)
            .set(SIGNATURE_HEADER, &base64::Engine::encode(&b64, signature));
        let response = if sent_body.is_empty() {
            request.call()
        } else {
            request
                .set("Content-Type", "application/json")
                .send_bytes(sent_body)
        };
        let response = match response {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let status = response.status();
        (status, response.into_json().unwrap_or(Value::Null))
    }
}

fn nonce() -> String {
    Uuid::new_v4().simple().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn edge_calls_need_a_fresh_signature_by_a_valid_unrevoked_site_certificate(
) -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let controller = RunningController::start(env.controller_config(&database.app_url)?)?;
    let w = world(&controller.url, &database).await?;
    let mut enrolled = Vec::new();
    for (admin, tenant, name) in [
        (&w.admin_a, w.tenant_a, "signer"),
        (&w.admin_b, TenantId(Uuid::nil()), "other"),
    ] {
        let (token, _, site) = new_token(&w, admin, name)?;
        let tenant = if tenant.0.is_nil() {
            TenantId(
                patronus_controller::enrollment::token::peek_claims(&token)
                    .context("claims")?
                    .tenant,
            )
        } else {
            tenant
        };
        let edge = edge_request(&token, tenant, site)?;
        let (status, body) = enroll(&w, &edge.request);
        ensure!(status == 200, "{body}");
        let answer: EnrollResponse = serde_json::from_value(body)?;
        enrolled.push((answer, edge.cert));
    }
    let (other, other_key) = enrolled.pop().context("other")?;
    let (mine, my_key) = enrolled.pop().context("mine")?;
    let now = chrono::Utc::now().timestamp();
    let good = Signed {
        certificate_pem: &mine.certificate_pem,
        key: &my_key,
        timestamp: now,
        nonce: nonce(),
    };

    // Signed properly: status answers about this site.
    let (status, body) = good.send(&w.url, "GET", "/api/v1/edge/status", b"", b"");
    ensure!(
        status == 200 && body["site_id"] == mine.site_id.0.to_string(),
        "{status} {body}"
    );
    ensure!(body["status"] == "active");
    // The same nonce again is a replay.
    let (status, body) = good.send(&w.url, "GET", "/api/v1/edge/status", b"", b"");
    ensure!(
        status == 401 && body["error"] == "replayed_request",
        "{status} {body}"
    );
    // Unsigned.
    let (status, body) = call("GET", &format!("{}/api/v1/edge/status", w.url), None, None);
    ensure!(
        status == 401 && body["error"] == "unsigned_request",
        "{status} {body}"
    );
    // Signed ten minutes ago.
    let stale = Signed {
        timestamp: now - 600,
        nonce: nonce(),
        ..good
    };
    let (status, body) = stale.send(&w.url, "GET", "/api/v1/edge/status", b"", b"");
    ensure!(
        status == 401 && body["error"] == "stale_request",
        "{status} {body}"
    );
    // A body other than the one signed.
    let renew_body = serde_json::to_vec(&json!({ "csr_pem": "x", "nats_public_key": "y" }))?;
    let tampered = Signed {
        nonce: nonce(),
        ..stale
    };
    let tampered = Signed {
        timestamp: now,
        ..tampered
    };
    let (status, body) = tampered.send(
        &w.url,
        "POST",
        "/api/v1/edge/renew",
        &renew_body,
        b"{\"csr_pem\":\"z\"}",
    );
    ensure!(
        status == 401 && body["error"] == "invalid_signature",
        "{status} {body}"
    );
    // Someone else's certificate with my key, and my certificate with someone else's key.
    let swapped = Signed {
        certificate_pem: &other.certificate_pem,
        key: &my_key,
        timestamp: now,
        nonce: nonce(),
    };
    let (status, body) = swapped.send(&w.url, "GET", "/api/v1/edge/status", b"", b"");
    ensure!(
        status == 401 && body["error"] == "invalid_signature",
        "{status} {body}"
    );
    let wrong_key = Signed {
        certificate_pem: &mine.certificate_pem,
        key: &other_key,
        timestamp: now,
        nonce: nonce(),
    };
    let (status, body) = wrong_key.send(&w.url, "GET", "/api/v1/edge/status", b"", b"");
    ensure!(
        status == 401 && body["error"] == "invalid_signature",
        "{status} {body}"
    );
    // A certificate from a CA that is not the tenant's (self-made, same subject).
    let mut forged_params = rcgen::CertificateParams::default();
    forged_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, mine.site_id.0.to_string());
    forged_params.distinguished_name.push(
        rcgen::DnType::OrganizationName,
        mine.tenant_id.0.to_string(),
    );
    let forged_cert = forged_params.self_signed(&my_key)?;
    let forged = Signed {
        certificate_pem: &forged_cert.pem(),
        key: &my_key,
        timestamp: now,
        nonce: nonce(),
    };
    let (status, body) = forged.send(&w.url, "GET", "/api/v1/edge/status", b"", b"");
    ensure!(status == 401, "{status} {body}");

    // Renewal with a signed body: a new certificate for a new key.
    let new_key = rcgen::KeyPair::generate()?;
    let renew = serde_json::to_vec(&json!({
        "csr_pem": patronus_controller::pki::site_csr_pem(&new_key, mine.tenant_id, mine.site_id)?,
        "nats_public_key": nkeys::KeyPair::new_user().public_key(),
    }))?;
    let signer = Signed {
        certificate_pem: &mine.certificate_pem,
        key: &my_key,
        timestamp: now,
        nonce: nonce(),
    };
    let (status, body) = signer.send(&w.url, "POST", "/api/v1/edge/renew", &renew, &renew);
    ensure!(status == 200, "{status} {body}");
    let renewed = body["certificate_pem"]
        .as_str()
        .context("certificate")?
        .to_owned();
    // A CSR for another site is refused even when signed correctly.
    let bad_renew = serde_json::to_vec(&json!({
        "csr_pem": patronus_controller::pki::site_csr_pem(&new_key, mine.tenant_id, other.site_id)?,
        "nats_public_key": nkeys::KeyPair::new_user().public_key(),
    }))?;
    let signer = Signed {
        nonce: nonce(),
        ..signer
    };
    let (status, body) = signer.send(&w.url, "POST", "/api/v1/edge/renew", &bad_renew, &bad_renew);
    ensure!(
        status == 422 && body["error"] == "wrong_subject",
        "{status} {body}"
    );

    // After revocation neither the old nor the renewed certificate is accepted.
    let (status, _) = call(
        "POST",
        &format!("{}/api/v1/sites/{}/revoke", w.url, mine.site_id.0),
        Some(&w.admin_a),
        None,
    );
    ensure!(status == 200);
    for (pem_text, key) in [
        (mine.certificate_pem.as_str(), &my_key),
        (renewed.as_str(), &new_key),
    ] {
        let after = Signed {
            certificate_pem: pem_text,
            key,
            timestamp: now,
            nonce: nonce(),
        };
        let (status, body) = after.send(&w.url, "GET", "/api/v1/edge/status", b"", b"");
        ensure!(
            status == 401 && body["error"] == "certificate_revoked",
            "{status} {body}"
        );
    }
    controller.stop().await;
    database.drop_now().await
}
