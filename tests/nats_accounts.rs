//! NATS operator mode against the real nats-server that `scripts/setup` runs: a tenant's
//! account is pushed and usable by the controller, a site's user may do exactly what
//! `edge_permissions` grants and nothing else, and revoking the user closes its connection.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use async_nats::{Event, ServerError};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::StreamExt;
use patronus_controller::server::AppState;
use patronus_proto::subjects;
use patronus_proto::{SiteId, TenantId};
use patronus_test_support::{TestDatabase, TestEnv};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Two tenants with one (not yet enrolled) site each, written as the owner.
async fn seed(database: &TestDatabase) -> anyhow::Result<[(TenantId, SiteId); 2]> {
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    let msp = Uuid::new_v4();
    let mut sql = format!("INSERT INTO msps (id, name) VALUES ('{msp}', 'msp');");
    let mut out = Vec::new();
    for i in 0..2 {
        let (tenant, site) = (Uuid::new_v4(), Uuid::new_v4());
        sql.push_str(&format!(
            "INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{tenant}', '{msp}', 't{i}', 't{i}');
             INSERT INTO sites (id, tenant_id, name) VALUES ('{site}', '{tenant}', 'site{i}');"
        ));
        out.push((TenantId(tenant), SiteId(site)));
    }
    owner.batch_execute(&sql).await.context("seeding")?;
    Ok([out[0], out[1]])
}

/// A client connected as a site's NATS user; server errors (permission violations) and
/// connection events arrive on the returned channel.
async fn connect_as_site(
    env: &TestEnv,
    jwt: String,
    key: nkeys::KeyPair,
    site: SiteId,
) -> anyhow::Result<(async_nats::Client, mpsc::UnboundedReceiver<Event>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let key = std::sync::Arc::new(key);
    let client = async_nats::ConnectOptions::with_jwt(jwt, move |nonce| {
        let key = key.clone();
        async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
    })
    .custom_inbox_prefix(subjects::edge_inbox_prefix(site))
    .request_timeout(Some(Duration::from_secs(2)))
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event);
        }
    })
    .connect(env.nats_url.as_str())
    .await
    .context("connecting as the site")?;
    Ok((client, rx))
}

/// Wait for a permission violation naming `subject`.
async fn expect_violation(
    events: &mut mpsc::UnboundedReceiver<Event>,
    subject: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::ServerError(ServerError::Other(text))))
                if text.to_lowercase().contains("permissions violation")
                    && text.contains(subject) =>
            {
                return Ok(())
            }
            Ok(Some(_)) => continue,
            Ok(None) => bail!("event channel closed"),
            Err(_) => bail!("no permission violation for {subject}"),
        }
    }
}

async fn record_user(
    database: &TestDatabase,
    tenant: TenantId,
    site: SiteId,
    public_key: &str,
) -> anyhow::Result<()> {
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner
        .batch_execute(&format!(
            "INSERT INTO site_nats_users (public_key, tenant_id, site_id, issued_at, expires_at)
             VALUES ('{public_key}', '{}', '{}', now() - interval '1 minute', now() + interval '1 day')",
            tenant.0, site.0
        ))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_user_gets_exactly_its_grant_and_loses_it_on_revocation() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let [(tenant, site), (other_tenant, other_site)] = seed(&database).await?;
    let state = AppState::connect(&env.controller_config(&database.app_url)?).await?;

    // The controller's link into the tenant's account: the intents bucket works.
    let link = state.tenant_nats(tenant).await?;
    let other_link = state.tenant_nats(other_tenant).await?;
    link.intents
        .put(subjects::intent_key(tenant, site), "mine".into())
        .await?;
    // A second site of the same tenant, whose key this site must not read.
    let sibling = SiteId(Uuid::new_v4());
    link.intents
        .put(subjects::intent_key(tenant, sibling), "sibling".into())
        .await?;

    let key = nkeys::KeyPair::new_user();
    record_user(&database, tenant, site, &key.public_key()).await?;
    let expires = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let jwt = state
        .nats_hub
        .site_user_jwt(tenant, site, &key.public_key(), expires)?;
    let (edge, mut events) = connect_as_site(&env, jwt, key, site).await?;

    // Allowed: its own intent by direct get, its own command subject, its metrics.
    let reply = edge
        .request(subjects::intent_direct_get_subject(tenant, site), "".into())
        .await
        .context("direct get of its own intent")?;
    ensure!(&reply.payload[..] == b"mine", "got {:?}", reply.payload);
    let mut commands = edge.subscribe(subjects::cmd_subject(tenant, site)).await?;
    let mut updates = edge
        .subscribe(subjects::intent_kv_subject(tenant, site))
        .await?;
    // `flush` only empties the socket buffer; a request on the same connection is answered
    // only after the server processed the subscriptions before it.
    edge.request(subjects::intent_direct_get_subject(tenant, site), "".into())
        .await?;
    link.client
        .publish(subjects::cmd_subject(tenant, site), "ping".into())
        .await?;
    let command = tokio::time::timeout(Duration::from_secs(5), commands.next())
        .await
        .context("command not delivered")?;
    ensure!(command.is_some());
    link.intents
        .put(subjects::intent_key(tenant, site), "mine v2".into())
        .await?;
    let update = tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .context("intent update not delivered")?
        .context("subscription ended")?;
    ensure!(&update.payload[..] == b"mine v2");
    let mut metrics_tap = link
        .client
        .subscribe(subjects::metrics_subject(tenant, site))
        .await?;
    link.intents.get(subjects::intent_key(tenant, site)).await?;
    edge.publish(subjects::metrics_subject(tenant, site), "m".into())
        .await?;
    edge.flush().await?;
    ensure!(
        tokio::time::timeout(Duration::from_secs(5), metrics_tap.next())
            .await
            .is_ok(),
        "the site's metrics did not reach the controller"
    );

    // Refused by the server: everything else.
    let sibling_get = subjects::intent_direct_get_subject(tenant, sibling);
    ensure!(
        edge.request(sibling_get.clone(), "".into()).await.is_err(),
        "read a sibling's intent"
    );
    expect_violation(&mut events, &sibling_get).await?;
    for subject in [
        subjects::metrics_subject(tenant, sibling),
        subjects::events_subject(other_tenant, other_site),
        subjects::cmd_subject(tenant, site),
        format!("$JS.API.STREAM.INFO.KV_{}", subjects::INTENTS_BUCKET),
    ] {
        edge.publish(subject.clone(), "x".into()).await?;
        edge.flush().await?;
        expect_violation(&mut events, &subject).await?;
    }
    for subject in [
        ">".to_string(),
        subjects::cmd_subject(tenant, sibling),
        subjects::intent_kv_subject(tenant, sibling),
        "$KV.intents.>".to_string(),
    ] {
        let _sub = edge.subscribe(subject.clone()).await?;
        edge.flush().await?;
        expect_violation(&mut events, &subject).await?;
    }
    // And tenants are separate accounts: the other tenant's link never sees this site.
    let mut elsewhere = other_link.client.subscribe(">").await?;
    other_link
        .intents
        .get(subjects::intent_key(other_tenant, other_site))
        .await?;
    edge.publish(subjects::metrics_subject(tenant, site), "m".into())
        .await?;
    edge.flush().await?;
    // A message of its own, so the watch is known to work.
    let own = subjects::metrics_subject(other_tenant, other_site);
    other_link.client.publish(own.clone(), "own".into()).await?;
    // The other account sees its own traffic (JetStream replies, advisories), never ours.
    let window = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut saw_own = false;
    while let Ok(Some(message)) = tokio::time::timeout_at(window, elsewhere.next()).await {
        ensure!(
            !message.subject.contains(&tenant.to_string()),
            "another tenant's account saw {}",
            message.subject
        );
        saw_own |= message.subject.as_str() == own;
    }
    ensure!(saw_own, "the other account's watch saw nothing at all");

    // Revocation: mark the user revoked and push the account; the server drops the connection.
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    let revoked_at = Instant::now();
    owner
        .batch_execute("UPDATE site_nats_users SET revoked_at = now()")
        .await?;
    state.nats_hub.push_account(&state.db, tenant).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Disconnected)) => break,
            Ok(Some(_)) => continue,
            Ok(None) => bail!("event channel closed"),
            Err(_) => bail!("the revoked site stayed connected for 5 s"),
        }
    }
    let elapsed = revoked_at.elapsed();
    ensure!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    // It cannot come back: the reconnect is refused, so its request fails.
    ensure!(
        edge.request(subjects::intent_direct_get_subject(tenant, site), "".into())
            .await
            .is_err(),
        "the revoked site still reads its intent"
    );
    println!("revocation closed the site's NATS connection in {elapsed:?}");
    drop((state, owner));
    database.drop_now().await
}
