//! The controller stores edges' flow reports and drops, logs and counts the bad ones: a
//! payload that does not decode, and a report naming another tenant than the account and
//! subject it came on. Real PostgreSQL, NATS (operator mode) and the controller over HTTP.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use patronus_proto::flows::FlowReport;
use patronus_proto::{SiteId, TenantId, SCHEMA_VERSION};
use patronus_test_support::lab::LabController;
use patronus_test_support::TestEnv;
use uuid::Uuid;

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn metrics(url: &str) -> anyhow::Result<String> {
    Ok(ureq::get(&format!("{url}/metrics")).call()?.into_string()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_flow_reports_are_dropped_and_counted() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let lab = LabController::start(&env).await?;
    let url = lab.controller.url.clone();
    let result = async {
        let reader = patronus_controller::server::AppState::connect(&lab.config).await?;
        let link = reader.tenant_nats(lab.tenant).await?;
        let site = SiteId(Uuid::new_v4());
        let subject = patronus_proto::subjects::flows_subject(lab.tenant, site);
        // Garbage until the controller's subscription is there and counts it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let dropped = loop {
            link.client
                .publish(subject.clone(), "{not json".into())
                .await?;
            link.client.flush().await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let dropped = counter(&metrics(&url)?, "patronus_flow_reports_dropped_total");
            if dropped > 0 {
                break dropped;
            }
            ensure!(
                Instant::now() < deadline,
                "the controller never took flow reports"
            );
        };
        // A well-formed report that names another tenant.
        let foreign = FlowReport {
            schema_version: SCHEMA_VERSION,
            tenant: TenantId(Uuid::new_v4()),
            site,
            sent_at_unix_ms: 0,
            flows: Vec::new(),
        };
        link.client
            .publish(
                subject.clone(),
                patronus_proto::codec::encode(&foreign).into(),
            )
            .await?;
        link.client.flush().await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = metrics(&url)?;
            if counter(&text, "patronus_flow_reports_dropped_total") > dropped {
                ensure!(counter(&text, "patronus_flows_stored_total") == 0, "{text}");
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "a report naming another tenant was not dropped"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    }
    .await;
    let stopped = lab.stop().await.context("stopping the controller");
    result?;
    stopped
}
