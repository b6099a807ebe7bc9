//! The WebSocket event stream against real NATS: tenant filtering (including an event whose
//! body claims another tenant), filters by type, delivery across two replicas, and a slow
//! client being dropped without holding anything up.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpServer};
use anyhow::{bail, ensure, Context};
use futures_util::StreamExt;
use patronus_controller::auth::{Role, SessionKeys};
use patronus_controller::server::{configure, AppState};
use patronus_proto::events::{EventEnvelope, SdwanEvent, TopologyChange};
use patronus_proto::{codec, SiteId, TenantId, SCHEMA_VERSION};
use patronus_test_support::TestEnv;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

async fn replica(env: &TestEnv) -> anyhow::Result<(AppState, SocketAddr)> {
    let config = env.controller_config(&env.database_url)?;
    let state = AppState::connect(&config).await?;
    for _ in 0..50 {
        if state.nats.connection_state() == async_nats::connection::State::Connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let data = web::Data::new(state.clone());
    let server = HttpServer::new(move || App::new().app_data(data.clone()).configure(configure))
        .workers(1)
        .bind("127.0.0.1:0")?;
    let addr = server.addrs()[0];
    actix_web::rt::spawn(server.run());
    Ok((state, addr))
}

fn token(state: &AppState, tenant: Option<TenantId>, msp: Uuid) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let role = if tenant.is_some() {
        Role::TenantViewer
    } else {
        Role::MspAdmin
    };
    let claims = SessionKeys::new_claims(Uuid::new_v4(), msp, tenant, role, now, 300);
    state.session_keys.issue(&claims).unwrap()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, token: &str, query: &str) -> anyhow::Result<Socket> {
    let mut request = format!("ws://{addr}/ws/sdwan{query}").into_client_request()?;
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .context("websocket connect")?;
    Ok(socket)
}

async fn next_event(
    socket: &mut Socket,
    within: Duration,
) -> anyhow::Result<Option<EventEnvelope>> {
    match tokio::time::timeout(within, socket.next()).await {
        Err(_) => Ok(None),
        Ok(Some(Ok(Message::Text(text)))) => Ok(Some(codec::decode(text.as_bytes())?)),
        Ok(other) => bail!("unexpected frame: {other:?}"),
    }
}

fn edge_event(tenant: TenantId, site: SiteId, reason: &str) -> Vec<u8> {
    codec::encode(&EventEnvelope {
        schema_version: SCHEMA_VERSION,
        tenant,
        site: Some(site),
        at_unix_ms: 1,
        event: SdwanEvent::PathFailed {
            path: patronus_proto::PathId(Uuid::new_v4()),
            reason: reason.into(),
        },
    })
}

#[actix_web::test]
async fn clients_see_their_tenants_events_from_any_replica_and_nothing_else() -> anyhow::Result<()>
{
    let env = TestEnv::load()?;
    let (one, addr_one) = replica(&env).await?;
    let (two, addr_two) = replica(&env).await?;
    let msp = Uuid::new_v4();
    let (a, b) = (TenantId(Uuid::new_v4()), TenantId(Uuid::new_v4()));
    let site_a = SiteId(Uuid::new_v4());

    let mut client_a = connect(addr_two, &token(&two, Some(a), msp), "").await?;
    let mut client_b = connect(addr_one, &token(&one, Some(b), msp), "").await?;
    let mut client_a_failures =
        connect(addr_one, &token(&one, Some(a), msp), "?types=path_failed").await?;
    // Someone of tenant B asking for tenant A's stream gets 404.
    let refused = connect(
        addr_one,
        &token(&one, Some(b), msp),
        &format!("?tenant={a}"),
    )
    .await;
    ensure!(refused.is_err(), "tenant B opened tenant A's stream");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A controller event from replica one, an edge event, and a spoof claiming tenant B.
    one.emit(
        a,
        Some(site_a),
        SdwanEvent::TopologyChanged {
            change: TopologyChange::SiteAdded,
        },
    )
    .await;
    one.nats
        .publish(
            patronus_proto::subjects::events_subject(a, site_a),
            edge_event(a, site_a, "cut").into(),
        )
        .await?;
    one.nats
        .publish(
            patronus_proto::subjects::events_subject(a, site_a),
            edge_event(b, site_a, "spoof").into(),
        )
        .await?;
    two.emit(
        b,
        None,
        SdwanEvent::TopologyChanged {
            change: TopologyChange::Optimized,
        },
    )
    .await;
    one.nats.flush().await?;

    let mut seen_a = Vec::new();
    while let Some(event) = next_event(&mut client_a, Duration::from_millis(700)).await? {
        seen_a.push(event);
    }
    ensure!(seen_a.len() == 2, "tenant A saw {seen_a:?}");
    ensure!(seen_a.iter().all(|e| e.tenant == a));
    let mut seen_b = Vec::new();
    while let Some(event) = next_event(&mut client_b, Duration::from_millis(300)).await? {
        seen_b.push(event);
    }
    ensure!(
        seen_b.len() == 1 && seen_b[0].tenant == b,
        "tenant B saw {seen_b:?}"
    );
    let filtered = next_event(&mut client_a_failures, Duration::from_millis(300)).await?;
    ensure!(
        matches!(filtered.map(|e| e.event), Some(SdwanEvent::PathFailed { reason, .. }) if reason == "cut")
    );
    ensure!(
        next_event(&mut client_a_failures, Duration::from_millis(200))
            .await?
            .is_none()
    );
    Ok(())
}

#[actix_web::test]
async fn a_client_that_stops_reading_is_dropped_and_holds_nothing_up() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let (state, addr) = replica(&env).await?;
    let msp = Uuid::new_v4();
    let tenant = TenantId(Uuid::new_v4());
    let site = SiteId(Uuid::new_v4());
    let mut slow = connect(addr, &token(&state, Some(tenant), msp), "").await?;
    let mut healthy = connect(addr, &token(&state, Some(tenant), msp), "").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Far more than the socket buffers, the session channel and the client buffer hold.
    let reason = "x".repeat(900);
    let subject = patronus_proto::subjects::events_subject(tenant, site);
    let before = state.metrics.ws_slow_clients_dropped.get();
    let healthy_reader = tokio::spawn(async move {
        let mut count = 0usize;
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_secs(3), healthy.next()).await
        {
            count += 1;
        }
        count
    });
    for _ in 0..40_000 {
        state
            .nats
            .publish(subject.clone(), edge_event(tenant, site, &reason).into())
            .await?;
    }
    state.nats.flush().await?;
    let mut waited = Duration::ZERO;
    while state.metrics.ws_slow_clients_dropped.get() == before && waited < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    ensure!(
        state.metrics.ws_slow_clients_dropped.get() > before,
        "the slow client was never dropped"
    );
    // The slow client, reading at last, finds the stream ended with a close (after whatever
    // was already in flight).
    let mut closed = false;
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
        match frame {
            Ok(Message::Close(_)) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => {}
        }
    }
    ensure!(closed, "the slow client's stream did not end");
    let delivered = healthy_reader.await?;
    ensure!(
        delivered > 1000,
        "the healthy client got only {delivered} events"
    );
    Ok(())
}
