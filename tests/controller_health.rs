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
