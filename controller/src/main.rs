//! `patronus-controller`: command-line entry point.
//!
//! - `serve`: run the HTTP API (and, with `--migrate`, apply pending migrations first).
//! - `migrate up|down-all|status`: manage the schema as the owner role.

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
        Command::Migrate { .. } | Command::Admin { .. } => Overrides::default(),
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
