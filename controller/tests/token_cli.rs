//! `patronus-controller token create` against a real database: the token is printed alone on
//! standard output (for scripts), the edge command on standard error, the site is created
//! pending with its LAN prefix, and bad flags get one clear line and change nothing.

use std::process::{Command, Output};

use anyhow::{ensure, Context};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use patronus_test_support::{TestDatabase, TestEnv};
use uuid::Uuid;

fn token_create(env: &TestEnv, database: &TestDatabase, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_patronus-controller"))
        .args(["token", "create"])
        .args(args)
        .env("PATRONUS_DATABASE_URL", &database.app_url)
        .env("PATRONUS_REDIS_URL", &env.redis_url)
        .env("PATRONUS_NATS_URL", &env.nats_url)
        .env("PATRONUS_SESSION_SECRET", &env.session_secret)
        .env("PATRONUS_PROBE_SECRET", &env.probe_secret)
        .env("PATRONUS_NATS_CREDENTIALS_DIR", &env.nats_credentials_dir)
        .env("PATRONUS_TOKEN_SIGNING_KEY", &env.token_signing_key)
        .env("PATRONUS_MASTER_KEY", &env.master_key)
        .output()
        .context("running patronus-controller")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[derive(QueryableByName)]
struct SiteRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    lan: String,
}

async fn token_count(owner: &mut AsyncPgConnection) -> anyhow::Result<String> {
    Ok(
        diesel::sql_query("SELECT count(*)::text AS status, '' AS lan FROM enrollment_tokens")
            .get_result::<SiteRow>(owner)
            .await?
            .status,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn token_create_prints_a_usable_token_and_refuses_bad_flags() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let tenant = Uuid::new_v4();
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner
        .batch_execute(&format!(
            "INSERT INTO msps (id, name) VALUES ('{msp}', 'cli msp');
             INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{tenant}', '{msp}', 'cli', 'cli');",
            msp = Uuid::new_v4()
        ))
        .await?;

    let tenant_arg = tenant.to_string();
    let out = token_create(
        &env,
        &database,
        &[
            "--tenant",
            &tenant_arg,
            "--site",
            "branch-7",
            "--ttl",
            "30m",
            "--lan",
            "10.7.0.0/24",
        ],
    )?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8(out.stdout.clone())?.trim().to_owned();
    let claims = patronus_proto::enroll::peek_claims(&token).context("stdout is a token")?;
    ensure!(claims.tenant == tenant && claims.site_name == "branch-7");
    ensure!(
        (claims.exp - claims.iat - 1800).abs() <= 1,
        "ttl: {claims:?}"
    );
    ensure!(
        stderr(&out).contains("patronus-edge enroll --controller"),
        "{}",
        stderr(&out)
    );
    let site: SiteRow = diesel::sql_query(
        "SELECT status, array_to_string(lan_prefixes, ',') AS lan FROM sites WHERE name = 'branch-7'",
    )
    .get_result(&mut owner)
    .await?;
    ensure!(
        site.status == "pending" && site.lan == "10.7.0.0/24",
        "{} {}",
        site.status,
        site.lan
    );

    let before = token_count(&mut owner).await?;
    for (args, says) in [
        (
            vec!["--tenant", &tenant_arg, "--site", "x", "--ttl", "forever"],
            "--ttl",
        ),
        (
            vec!["--tenant", &tenant_arg, "--site", "x", "--ttl", "9d"],
            "7 days",
        ),
        (vec!["--tenant", "not-a-uuid", "--site", "x"], "--tenant"),
        (
            vec!["--tenant", &Uuid::new_v4().to_string(), "--site", "x"],
            "tenant",
        ),
        (
            vec![
                "--tenant",
                &tenant_arg,
                "--site",
                "x",
                "--lan",
                "10.0.0.0/33",
            ],
            "--lan",
        ),
    ] {
        let out = token_create(&env, &database, &args)?;
        ensure!(!out.status.success(), "{args:?} succeeded");
        ensure!(out.stdout.is_empty(), "{args:?} printed a token");
        ensure!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    ensure!(
        token_count(&mut owner).await? == before,
        "a refused call created a token"
    );
    drop(owner);
    database.drop_now().await
}
