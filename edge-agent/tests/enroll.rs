//! `patronus-edge enroll` against a real controller (HTTP on loopback, PostgreSQL, NATS in
//! operator mode): the state directory it writes is private and complete, the edge then reads
//! its intent with nothing but that directory, and refusals leave the directory unchanged.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use patronus_proto::TenantId;
use patronus_test_support::{RunningController, TestDatabase, TestEnv};
use uuid::Uuid;

fn edge(args: &[&str]) -> anyhow::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_patronus-edge"))
        .args(args)
        .output()
        .context("running patronus-edge")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edge_enrolls_with_a_token_and_runs_from_its_state_alone() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let database = TestDatabase::create(&env).await?;
    patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
    let tenant = TenantId(Uuid::new_v4());
    let msp = Uuid::new_v4();
    let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
    owner
        .batch_execute(&format!(
            "INSERT INTO msps (id, name) VALUES ('{msp}', 'edge msp');
             INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{}', '{msp}', 'edge', 'edge');",
            tenant.0
        ))
        .await?;
    drop(owner);
    let config = env.controller_config(&database.app_url)?;
    let keys = patronus_controller::enrollment::TokenKeys::from_seed(
        &patronus_controller::config::secret_bytes_32(&config.provisioning.token_signing_key)
            .context("token key")?,
    );
    let pool = patronus_controller::db::pool(&database.app_url, 1)?;
    let mut tokens = Vec::new();
    for site in ["hq", "branch"] {
        let (token, _) = patronus_controller::api::enrollment::create_from_cli(
            &pool,
            &keys,
            tenant,
            site,
            Vec::new(),
            chrono::Duration::minutes(10),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        tokens.push(token);
    }
    drop(pool);
    let controller = RunningController::start(config)?;
    let dir =
        std::env::temp_dir().join(format!("patronus-edge-enroll-{}", Uuid::new_v4().simple()));
    let state_dir = dir.join("hq");
    let state = state_dir.to_str().context("path")?;

    // Bad flags: one clear line, nothing written.
    let out = edge(&[
        "enroll",
        "--controller",
        &controller.url,
        "--token",
        &tokens[0],
        "--state-dir",
        state,
        "--uplink",
        "name=wan0",
    ])?;
    ensure!(
        !out.status.success() && text(&out).contains("address= is missing"),
        "{}",
        text(&out)
    );
    let out = edge(&[
        "enroll",
        "--controller",
        &controller.url,
        "--token",
        "garbage",
        "--state-dir",
        state,
        "--uplink",
        "name=wan0,address=198.18.1.1",
    ])?;
    ensure!(
        !out.status.success() && text(&out).contains("not an enrollment token"),
        "{}",
        text(&out)
    );
    ensure!(!state_dir.exists(), "a refused enrollment wrote state");

    // The real enrollment, timed end to end (process start to credentials on disk).
    let started = Instant::now();
    let out = edge(&[
        "enroll",
        "--controller",
        &controller.url,
        "--token",
        &tokens[0],
        "--state-dir",
        state,
        "--uplink",
        "name=fiber,address=198.18.1.1,type=fiber,bandwidth=1000",
        "--uplink",
        "name=lte,address=198.19.1.1,type=lte,bandwidth=50,cost=2.5,metered=true",
    ])?;
    let took = started.elapsed();
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(text(&out).contains("enrolled in"), "{}", text(&out));
    println!("enroll to credentials on disk: {took:?}");
    let mode = std::fs::metadata(&state_dir)?.permissions().mode() & 0o777;
    ensure!(mode == 0o700, "state dir mode {mode:o}");
    for file in [
        "identity.json",
        "wireguard.key",
        "site.key",
        "site.crt",
        "ca.crt",
        "nats.creds",
    ] {
        let meta = std::fs::metadata(state_dir.join(file)).with_context(|| file.to_owned())?;
        ensure!(
            meta.permissions().mode() & 0o777 == 0o600,
            "{file} is not 0600"
        );
    }
    let creds = std::fs::read_to_string(state_dir.join("nats.creds"))?;
    ensure!(creds.contains("BEGIN NATS USER JWT") && creds.contains("BEGIN USER NKEY SEED"));
    // Nothing secret went to the terminal.
    ensure!(!text(&out).contains(&tokens[0]) && !text(&out).contains("PRIVATE KEY"));

    // A second site, so the first has a peer and an intent.
    let branch_dir = dir.join("branch");
    let out = edge(&[
        "enroll",
        "--controller",
        &controller.url,
        "--token",
        &tokens[1],
        "--state-dir",
        branch_dir.to_str().context("path")?,
        "--uplink",
        "name=fiber,address=198.18.2.1,type=fiber",
    ])?;
    ensure!(out.status.success(), "{}", text(&out));

    // From the state directory alone (no token): status, then the intent over NATS.
    let out = edge(&["status", "--state-dir", state])?;
    ensure!(
        out.status.success()
            && text(&out).contains("site hq")
            && text(&out).contains("WireGuard key made"),
        "{}",
        text(&out)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = edge(&["intent", "--state-dir", state])?;
        if out.status.success() && text(&out).contains("1 peers") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no intent with the peer: {}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Signed with the site certificate: the controller's view, then a renewal.
    let out = edge(&["status", "--remote", "--state-dir", state])?;
    ensure!(
        out.status.success() && text(&out).contains("site hq is active"),
        "{}",
        text(&out)
    );
    let old_cert = std::fs::read(state_dir.join("site.crt"))?;
    let old_key = std::fs::read(state_dir.join("site.key"))?;
    let out = edge(&["renew", "--state-dir", state])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        std::fs::read(state_dir.join("site.crt"))? != old_cert,
        "the certificate was not replaced"
    );
    ensure!(
        std::fs::read(state_dir.join("site.key"))? != old_key,
        "the key was not replaced"
    );
    ensure!(!state_dir.join("staged").exists());
    for file in ["site.key", "site.crt", "nats.creds", "identity.json"] {
        let meta = std::fs::metadata(state_dir.join(file))?;
        ensure!(
            meta.permissions().mode() & 0o777 == 0o600,
            "{file} is not 0600 after renew"
        );
    }
    // The renewed credentials work for both channels.
    let out = edge(&["status", "--remote", "--state-dir", state])?;
    ensure!(out.status.success(), "{}", text(&out));
    let out = edge(&["intent", "--state-dir", state])?;
    ensure!(
        out.status.success() && text(&out).contains("1 peers"),
        "{}",
        text(&out)
    );

    // Refusals leave the directory as it was.
    let before = snapshot(&state_dir);
    let out = edge(&[
        "enroll",
        "--controller",
        &controller.url,
        "--token",
        &tokens[0],
        "--state-dir",
        state,
        "--uplink",
        "name=wan0,address=198.18.1.1",
    ])?;
    ensure!(
        !out.status.success() && text(&out).contains("already holds site hq"),
        "{}",
        text(&out)
    );
    let out = edge(&[
        "enroll",
        "--controller",
        &controller.url,
        "--token",
        &tokens[0],
        "--state-dir",
        state,
        "--uplink",
        "name=wan0,address=198.18.1.1",
        "--force",
    ])?;
    ensure!(
        !out.status.success() && text(&out).contains("already used"),
        "{}",
        text(&out)
    );
    let out = edge(&[
        "enroll",
        "--controller",
        "http://127.0.0.1:1",
        "--token",
        &tokens[1],
        "--state-dir",
        state,
        "--uplink",
        "name=wan0,address=198.18.1.1",
        "--force",
    ])?;
    ensure!(
        !out.status.success() && text(&out).contains("cannot reach the controller"),
        "{}",
        text(&out)
    );
    ensure!(
        snapshot(&state_dir) == before,
        "a refused enrollment changed the state directory"
    );

    // wireguard.backend = kernel where the kernel has no WireGuard: a clear refusal, in a
    // namespace of its own so nothing touches the host's links.
    let ns = format!("pe-wg-{}", std::process::id());
    ensure!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()?
        .success());
    let kernel_has_wireguard = Command::new("ip")
        .args(["-n", &ns, "link", "add", "probe0", "type", "wireguard"])
        .output()?
        .status
        .success();
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(env!("CARGO_BIN_EXE_patronus-edge"))
        .args(["run", "--state-dir", state])
        .env("PATRONUS_EDGE_WG_BACKEND", "kernel")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let exited = agent.try_wait()?.is_some();
    if !exited {
        agent.kill()?;
    }
    let out = agent.wait_with_output()?;
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if kernel_has_wireguard {
        ensure!(text(&out).contains("backend Kernel"), "{}", text(&out));
    } else {
        ensure!(
            exited && !out.status.success(),
            "the kernel backend was accepted without a module"
        );
        ensure!(text(&out).contains("no module"), "{}", text(&out));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_patronus-edge"))
        .args(["status", "--state-dir", state])
        .env("PATRONUS_EDGE_WG_BACKEND", "warp")
        .output()?;
    ensure!(
        !out.status.success() && text(&out).contains("PATRONUS_EDGE_WG_BACKEND"),
        "{}",
        text(&out)
    );

    controller.stop().await;
    std::fs::remove_dir_all(&dir)?;
    database.drop_now().await
}
