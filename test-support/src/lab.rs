//! A controller for lab runs: a throwaway database with one tenant, the controller serving on
//! a free loopback port and handing out NATS at the lab's management address, and one-time
//! enrollment tokens for the tenant's sites. The lab tests and `patronus-lab bench` share it.

use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use patronus_proto::TenantId;

use crate::{RunningController, TestDatabase, TestEnv};

/// The host's address on the lab's management link (`patronus-lab plan`): sites reach the
/// controller and NATS there, through the relays `patronus-lab up --relay` runs.
pub const LAB_MGMT_HOST: &str = "198.19.254.1";

/// The agents a lab test started; killed however the test ends.
pub struct Agents(pub Vec<std::process::Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for agent in &mut self.0 {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

/// `patronus-lab impair --site S --uplink U <args>` with the `lab` binary.
pub fn impair(lab: &std::path::Path, site: u8, uplink: u8, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(lab)
        .args(["impair", "--site", &site.to_string()])
        .args(["--uplink", &uplink.to_string()])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "impair site {site} uplink {uplink} {args:?}: {}",
        text(&out)
    );
    Ok(())
}

/// Fail with what to do unless this process runs as root (network namespaces, BPF).
pub fn require_root() -> anyhow::Result<()> {
    let root = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    anyhow::ensure!(
        root,
        "this test creates network namespaces and must run as root (scripts/test does)"
    );
    Ok(())
}

/// The token of the one-line `patronus-edge enroll --controller <controller> --token <token>
/// ...` command the portal shows, after checking that the command names `controller`.
pub fn enroll_command_token(command: &str, controller: &str) -> anyhow::Result<String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    anyhow::ensure!(
        words.starts_with(&["patronus-edge", "enroll"]),
        "the enroll command is {command:?}"
    );
    let value_of = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .copied()
    };
    anyhow::ensure!(
        value_of("--controller") == Some(controller),
        "the command names the controller {:?}, not {controller}",
        value_of("--controller")
    );
    let token = value_of("--token").with_context(|| format!("no --token in {command:?}"))?;
    Ok(token.to_owned())
}

/// A workspace binary next to the running test's executable (`target/debug/deps/..`).
pub fn binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join(name))
        .context("target directory")?;
    anyhow::ensure!(
        path.exists(),
        "{} is not built; `cargo test --workspace` (scripts/test) builds it",
        path.display()
    );
    Ok(path)
}

/// A finished command's stdout and stderr, for messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run `program args` inside network namespace `ns`.
pub fn in_ns(
    ns: &str,
    program: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(program)
        .args(args)
        .output()
        .context("ip netns exec")
}

/// Enroll lab site `n` from inside its router namespace with `token`, naming the lab's two
/// uplinks (`wan0` fiber 198.18.n.1, `wan1` LTE 198.18.n.5), its state in `state`.
pub fn enroll_site(
    edge: &std::path::Path,
    controller_url: &str,
    token: &str,
    n: u8,
    state: &std::path::Path,
) -> anyhow::Result<()> {
    let out = in_ns(
        &format!("pl-s{n}"),
        edge,
        &[
            "enroll",
            "--controller",
            controller_url,
            "--token",
            token,
            "--state-dir",
            state.to_str().context("a state path that is not UTF-8")?,
            "--uplink",
            &format!("name=wan0,address=198.18.{n}.1,type=fiber,bandwidth=1000"),
            "--uplink",
            &format!("name=wan1,address=198.18.{n}.5,type=lte,bandwidth=50"),
        ],
    )?;
    anyhow::ensure!(out.status.success(), "site{n} enroll: {}", text(&out));
    Ok(())
}

/// Print the agents' logs (`run<n>.log` in `dir`, sites 1..=`sites`), for whoever reads a
/// failed lab test.
pub fn print_agent_logs(dir: &std::path::Path, sites: u8) {
    for n in 1..=sites {
        if let Ok(log) = std::fs::read_to_string(dir.join(format!("run{n}.log"))) {
            eprintln!("--- site{n} agent log ---\n{log}");
        }
    }
}

/// A running controller with one tenant, reachable from the lab.
pub struct LabController {
    pub database: TestDatabase,
    pub tenant: TenantId,
    pub controller: RunningController,
    pub http_port: u16,
    pub nats_port: u16,
    /// What the controller runs with (for a second `AppState` that reads NATS as it does).
    pub config: patronus_controller::config::ControllerConfig,
    keys: patronus_controller::enrollment::TokenKeys,
    pool: patronus_controller::db::DbPool,
}

fn port_of(url: &str) -> anyhow::Result<u16> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .with_context(|| format!("no port in {url}"))
}

impl LabController {
    /// Create the database and tenant and start serving.
    pub async fn start(env: &TestEnv) -> anyhow::Result<Self> {
        let database = TestDatabase::create(env).await?;
        patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
        let tenant = TenantId(uuid::Uuid::new_v4());
        let mut owner = AsyncPgConnection::establish(&database.owner_url).await?;
        owner
            .batch_execute(&format!(
                "INSERT INTO msps (id, name) VALUES ('{msp}', 'lab msp');
                 INSERT INTO tenants (id, msp_id, name, slug) VALUES ('{}', '{msp}', 'lab', 'lab');",
                tenant.0,
                msp = uuid::Uuid::new_v4()
            ))
            .await
            .context("creating the lab tenant")?;
        drop(owner);

        let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let nats_port = port_of(&env.nats_url)?;
        let mut config = env.controller_config(&database.app_url)?;
        config.http.listen = ([127, 0, 0, 1], http_port).into();
        config.nats.edge_url = Some(format!("nats://{LAB_MGMT_HOST}:{nats_port}"));
        // Operators sign in from 127.0.0.1, like every other test's on this host, and the
        // sign-in counters live in the shared Redis: not this controller's limits to test.
        config.auth.login_per_minute_per_source = 10_000;
        config.auth.login_per_minute_per_account = 1_000;
        let keys = patronus_controller::enrollment::TokenKeys::from_seed(
            &patronus_controller::config::secret_bytes_32(&config.provisioning.token_signing_key)
                .context("PATRONUS_TOKEN_SIGNING_KEY is not 32 bytes: run scripts/setup")?,
        );
        let pool = patronus_controller::db::pool(&database.app_url, 2)?;
        let controller = RunningController::start_on(config.clone())?;
        Ok(Self {
            config,
            database,
            tenant,
            controller,
            http_port,
            nats_port,
            keys,
            pool,
        })
    }

    /// A one-time enrollment token for `site` of the tenant, with its LAN prefix.
    pub async fn token(&self, site: &str, lan: &str) -> anyhow::Result<String> {
        let (token, _) = patronus_controller::api::enrollment::create_from_cli(
            &self.pool,
            &self.keys,
            self.tenant,
            site,
            vec![lan.parse().with_context(|| format!("LAN prefix {lan}"))?],
            chrono::Duration::minutes(10),
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating a token for {site}: {e}"))?;
        Ok(token)
    }

    /// An API token of the tenant's admin (`Authorization: Bearer <token>`), for tests that
    /// drive the REST API: enrollment tokens, sites, paths, revocation.
    pub async fn api_token(&self) -> anyhow::Result<String> {
        let (token, hash) = patronus_controller::auth::new_secret("pat_");
        let hash_hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let mut owner = AsyncPgConnection::establish(&self.database.owner_url).await?;
        owner
            .batch_execute(&format!(
                "INSERT INTO api_tokens (tenant_id, name, token_hash, role)
                 VALUES ('{}', 'lab', '\\x{hash_hex}'::bytea, 'tenant_admin')",
                self.tenant.0
            ))
            .await
            .context("creating the lab tenant's API token")?;
        Ok(token)
    }

    /// An operator of the tenant who signs in to the portal with `email` and `password`, with
    /// `role` (a tenant role: `TenantAdmin` or `TenantViewer`). The lab's MSP has no admin to
    /// create one through the API (`POST /operators` wants an admin signed in), so this writes
    /// the row as `api_token` does, with the controller's own password hashing.
    pub async fn operator(
        &self,
        email: &str,
        password: &str,
        role: patronus_controller::auth::Role,
    ) -> anyhow::Result<()> {
        use diesel::sql_types::{Text, Uuid as SqlUuid};
        use diesel_async::RunQueryDsl;
        anyhow::ensure!(
            role != patronus_controller::auth::Role::MspAdmin,
            "a lab operator belongs to the lab tenant: give it a tenant role"
        );
        let password = password.to_owned();
        let hash = tokio::task::spawn_blocking(move || {
            patronus_controller::auth::hash_password(&password)
        })
        .await?
        .context("hashing the operator's password")?;
        let mut owner = AsyncPgConnection::establish(&self.database.owner_url).await?;
        let inserted = diesel::sql_query(
            "INSERT INTO operators (msp_id, tenant_id, email, password_hash, role)
             SELECT msp_id, id, $2, $3, $4 FROM tenants WHERE id = $1",
        )
        .bind::<SqlUuid, _>(self.tenant.0)
        .bind::<Text, _>(email)
        .bind::<Text, _>(hash)
        .bind::<Text, _>(role.as_str())
        .execute(&mut owner)
        .await
        .with_context(|| format!("creating the lab tenant's operator {email}"))?;
        anyhow::ensure!(inserted == 1, "the lab tenant is gone: no operator created");
        Ok(())
    }

    /// Publish `intent` as its site's current intent, as the controller would (tests and
    /// benchmarks that need an intent the database does not produce, e.g. with policies).
    pub async fn put_intent(&self, intent: &patronus_proto::SiteIntent) -> anyhow::Result<()> {
        let state = patronus_controller::server::AppState::connect(&self.config).await?;
        let link = state.tenant_nats(self.tenant).await?;
        link.intents
            .put(
                patronus_proto::subjects::intent_key(self.tenant, intent.site),
                patronus_proto::codec::encode(intent).into(),
            )
            .await
            .context("putting the intent")?;
        Ok(())
    }

    /// The `--relay` arguments `patronus-lab up` needs to expose the controller and NATS.
    pub fn relay_args(&self) -> [String; 4] {
        [
            "--relay".into(),
            format!("{0}=127.0.0.1:{0}", self.http_port),
            "--relay".into(),
            format!("{0}=127.0.0.1:{0}", self.nats_port),
        ]
    }

    /// The controller's URL as the lab's sites see it.
    pub fn url_in_lab(&self) -> String {
        format!("http://{LAB_MGMT_HOST}:{}", self.http_port)
    }

    /// Stop serving, drop the database and the tenant's NATS account.
    pub async fn stop(self) -> anyhow::Result<()> {
        drop(self.pool);
        self.controller.stop().await;
        self.database.drop_now().await
    }
}
