//! `patronus-controller`: command-line entry point.
//!
//! - `serve`: run the HTTP API (and, with `--migrate`, apply pending migrations first).
//! - `migrate up|down-all|status`: manage the schema as the owner role.
//! - `admin create`: the first MSP and its admin.
//! - `nats init`: the NATS operator, system and control accounts (scripts/setup runs it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use patronus_controller::config::{redact_url, ControllerConfig, LogFormat, Overrides};
use patronus_controller::db::migrations;
use patronus_controller::server::{self, AppState};

#[derive(Parser)]
#[command(
    name = "patronus-controller",
    version,
    about = "Patronus SD-WAN controller"
)]
struct Cli {
    /// TOML configuration file (settings also come from PATRONUS_* environment variables).
    #[arg(long, global = true, env = "PATRONUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API until SIGINT/SIGTERM.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Apply pending migrations before serving (needs PATRONUS_DATABASE_OWNER_URL).
        #[arg(long)]
        migrate: bool,
    },
    /// Manage the database schema (runs as the owner role).
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// First-run administration.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// NATS operator-mode setup.
    Nats {
        #[command(subcommand)]
        action: NatsAction,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a single-use enrollment token for a site (created pending if it does not
    /// exist). Prints the token on standard output and the edge command on standard error.
    Create {
        /// Tenant id.
        #[arg(long)]
        tenant: uuid::Uuid,
        /// Site name.
        #[arg(long)]
        site: String,
        /// Lifetime: 90s, 15m, 1h, 2d (default: provisioning.token_ttl_s).
        #[arg(long)]
        ttl: Option<String>,
        /// A LAN prefix behind the site (when the site is created); repeat for more.
        #[arg(long = "lan")]
        lan_prefixes: Vec<ipnet::IpNet>,
        /// The controller URL the edge should use, for the printed command.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        controller_url: String,
    },
}

#[derive(Subcommand)]
enum NatsAction {
    /// Create the operator, system and control accounts (idempotent) and write the server's
    /// auth include and the controller's credentials into DIR.
    Init {
        /// Credentials directory (the controller's nats.credentials_dir).
        #[arg(long)]
        dir: PathBuf,
        /// Where nats-server's full account resolver keeps account JWTs.
        #[arg(long)]
        accounts_dir: PathBuf,
    },
    /// Delete a (deleted) tenant's streams and revoke every user of its account. The API's
    /// tenant delete does this; run it by hand if that step failed.
    PurgeTenant {
        #[arg(long)]
        tenant: uuid::Uuid,
    },
}

#[derive(Subcommand)]
enum AdminAction {
    /// Create an MSP and its first admin; reads the password from standard input.
    Create {
        /// Name of the new MSP.
        #[arg(long)]
        msp: String,
        /// E-mail address (login) of its first admin.
        #[arg(long)]
        email: String,
    },
}

#[derive(Subcommand, Clone, Copy)]
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert every migration (destroys all data).
    DownAll,
    /// List pending migrations.
    Status,
}

fn init_tracing(config: &ControllerConfig) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn owner_url(config: &ControllerConfig) -> anyhow::Result<&str> {
    config
        .database
        .owner_url
        .as_deref()
        .context("migrations need the owner role: set PATRONUS_DATABASE_OWNER_URL (scripts/setup writes it to /var/lib/patronus/patronus.env)")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let overrides = match &cli.command {
        Command::Serve { listen, migrate } => Overrides {
            listen: *listen,
            migrate_on_start: migrate.then_some(true),
        },
        Command::Migrate { .. }
        | Command::Admin { .. }
        | Command::Token { .. }
        | Command::Nats {
            action: NatsAction::PurgeTenant { .. },
        } => Overrides::default(),
        Command::Nats {
            action: NatsAction::Init { dir, accounts_dir },
        } => {
            // Needs no configuration: it runs before the services the configuration names.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("system clock before 1970")?
                .as_secs() as i64;
            let report = patronus_controller::nats::bootstrap::init(dir, accounts_dir, now)
                .context("initialising NATS operator mode")?;
            println!(
                "nats init: operator {} system account {} ({})",
                report.operator,
                report.system_account,
                if report.created_keys {
                    "created"
                } else {
                    "already present"
                }
            );
            return Ok(());
        }
    };
    let config = ControllerConfig::load(cli.config.as_deref(), &overrides)?;
    init_tracing(&config);

    match cli.command {
        Command::Serve { .. } => {
            if config.database.migrate_on_start {
                let applied = migrations::run_pending(owner_url(&config)?)
                    .await
                    .context("applying migrations")?;
                tracing::info!(count = applied.len(), "migrations applied");
            }
            tracing::info!(
                database = %redact_url(&config.database.url),
                redis = %redact_url(&config.redis.url),
                nats = %redact_url(&config.nats.url),
                "starting controller"
            );
            let state = AppState::connect(&config).await?;
            server::serve(config, state).await?;
            tracing::info!("controller stopped");
        }
        Command::Admin {
            action: AdminAction::Create { msp, email },
        } => {
            let password = read_password()?;
            let pool = patronus_controller::db::pool(&config.database.url, 1)?;
            let created =
                patronus_controller::admin::create_msp(&pool, &msp, &email, &password).await?;
            println!(
                "created MSP {msp:?} ({}) with admin {email} ({})",
                created.msp_id, created.operator_id
            );
        }
        Command::Token {
            action:
                TokenAction::Create {
                    tenant,
                    site,
                    ttl,
                    controller_url,
                    lan_prefixes,
                },
        } => {
            let ttl_s = match ttl {
                Some(text) => {
                    patronus_controller::enrollment::parse_ttl(&text).with_context(|| {
                        format!("--ttl {text:?}: use a number with s, m, h or d, like 1h")
                    })?
                }
                None => config.provisioning.token_ttl_s,
            };
            if !(60..=7 * 86_400).contains(&ttl_s) {
                anyhow::bail!("--ttl must be 60 s to 7 days");
            }
            let seed = patronus_controller::config::secret_bytes_32(
                &config.provisioning.token_signing_key,
            )
            .context("provisioning.token_signing_key")?;
            let keys = patronus_controller::enrollment::TokenKeys::from_seed(&seed);
            let pool = patronus_controller::db::pool(&config.database.url, 1)?;
            let (token, row) = patronus_controller::api::enrollment::create_from_cli(
                &pool,
                &keys,
                patronus_proto::TenantId(tenant),
                &site,
                lan_prefixes,
                chrono::Duration::seconds(ttl_s as i64),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            eprintln!(
                "enrollment token {} for site {site:?} ({}), valid until {}; on the edge run:\n  {}",
                row.id,
                row.site_id,
                row.expires_at.to_rfc3339(),
                patronus_controller::api::enrollment::enroll_command(&controller_url, &token)
            );
            println!("{token}");
        }
        Command::Nats {
            action: NatsAction::PurgeTenant { tenant },
        } => {
            let hub = patronus_controller::nats::NatsHub::connect(
                &config.nats.url,
                &config.nats.credentials_dir,
            )
            .await?;
            hub.purge_tenant(patronus_proto::TenantId(tenant))
                .await
                .context("purging the tenant's NATS account")?;
            println!("purged the NATS account of tenant {tenant}");
        }
        // Ran before the configuration was loaded.
        Command::Nats {
            action: NatsAction::Init { .. },
        } => {}
        Command::Migrate { action } => {
            let url = owner_url(&config)?;
            match action {
                MigrateAction::Up => {
                    let applied = migrations::run_pending(url).await?;
                    println!(
                        "applied {} migration(s): {}",
                        applied.len(),
                        applied.join(", ")
                    );
                }
                MigrateAction::DownAll => {
                    let reverted = migrations::revert_all(url).await?;
                    println!(
                        "reverted {} migration(s): {}",
                        reverted.len(),
                        reverted.join(", ")
                    );
                }
                MigrateAction::Status => {
                    let pending = migrations::pending(url).await?;
                    if pending.is_empty() {
                        println!("schema is up to date");
                    } else {
                        println!("{} pending: {}", pending.len(), pending.join(", "));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The password, from standard input (one line). Never echoed back or logged.
fn read_password() -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal};
    if std::io::stdin().is_terminal() {
        eprint!("password for the new admin (input is visible; pipe it in to avoid that): ");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    patronus_controller::auth::check_password_policy(&password)?;
    Ok(password)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("patronus-controller: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patronus-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}
