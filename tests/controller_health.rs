//! The controller's health endpoints against the real PostgreSQL, Redis and NATS.

use std::time::Duration;

use actix_web::{test, web, App};
use patronus_controller::config::ControllerConfig;
use patronus_controller::server::{configure, AppState};
use patronus_test_support::TestEnv;

fn config(env: &TestEnv) -> ControllerConfig {
    env.controller_config(&env.database_url)
        .expect("test config is valid")
}

async fn wait_for_nats(state: &AppState) {
    for _ in 0..50 {
        if state.nats.connection_state() == async_nats::connection::State::Connected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn ready_when_postgres_redis_and_nats_answer() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let state = AppState::connect(&config(&env)).await?;
    wait_for_nats(&state).await;
    let app = test::init_service(
        App::new()
            .app_data(web::Data::new(state))
            .configure(configure),
    )
    .await;

    let health =
        test::call_service(&app, test::TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(health.status(), 200);

    let ready =
        test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    let status = ready.status();
    let body: serde_json::Value = test::read_body_json(ready).await;
    assert_eq!(status, 200, "{body}");
    for service in ["postgres", "redis", "nats"] {
        assert_eq!(body[service]["ok"], true, "{service}: {body}");
    }
    Ok(())
}

#[actix_web::test]
async fn not_ready_names_the_service_that_is_down() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let mut config = config(&env);
    // Nothing listens on port 1 of loopback.
    config.redis.url = "redis://127.0.0.1:1/0".into();
    let state = AppState::connect(&config).await?;
    wait_for_nats(&state).await;
    let app = test::init_service(
        App::new()
            .app_data(web::Data::new(state))
            .configure(configure),
    )
    .await;

    let ready =
        test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = test::read_body_json(ready).await;
    assert_eq!(body["error"], "not_ready");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("redis"),
        "{body}"
    );
    assert_eq!(body["redis"]["ok"], false);
    assert_eq!(body["postgres"]["ok"], true, "{body}");
    // No credentials in what the endpoint returns.
    assert!(!body.to_string().contains(&password_of(&env.database_url)));
    Ok(())
}

fn password_of(url: &str) -> String {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password.to_owned())
        .unwrap_or_else(|| "no-password-in-url".into())
}

/// A served controller opens (and primes) each HTTP worker's database connections at start,
/// before any request, and `/metrics` shows every pool by name.
#[actix_web::test]
async fn each_worker_opens_its_database_connections_at_start() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = patronus_test_support::TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let mut config = env.controller_config(&database.app_url)?;
    config.database.worker_pool_size = 3;
    let controller = patronus_test_support::RunningController::start(config)?;
    let url = format!("{}/metrics", controller.url);
    let open_in_workers = |text: &str| -> Vec<u64> {
        text.lines()
            .filter(|l| {
                l.starts_with("patronus_db_pool_connections{pool=\"worker-")
                    && l.contains("state=\"open\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    };
    let mut text = String::new();
    for _ in 0..100 {
        text = tokio::task::spawn_blocking({
            let url = url.clone();
            move || {
                ureq::get(&url)
                    .call()?
                    .into_string()
                    .map_err(anyhow::Error::from)
            }
        })
        .await??;
        let open = open_in_workers(&text);
        if !open.is_empty() && open.iter().all(|n| *n == 3) {
            assert!(
                text.contains("patronus_db_pool_connections{pool=\"shared\",state=\"max\"} 16"),
                "{text}"
            );
            controller.stop().await;
            return database.drop_now().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controller.stop().await;
    database.drop_now().await?;
    anyhow::bail!("the workers' pools did not open 3 connections each within 10 s:\n{text}")
}
