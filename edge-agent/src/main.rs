//! `patronus-edge`: the edge agent of a Patronus site.
//!
//! The agent's job (enroll, watch the site's intent, apply it by diffing desired against actual
//! state, probe paths, fail over locally, report) lands issue by issue. What it does today:
//!
//! - `check-intent FILE`: decode and validate a `SiteIntent` exactly as the agent will before
//!   applying one (schema version, size limit, references, ranges), and optionally check that
//!   this site may accept it (tenant, site, rising revision). Operators use it to inspect an
//!   intent taken from the `intents` KV bucket; scripts use its exit status.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use patronus_proto::codec::MAX_MESSAGE_BYTES;
use patronus_proto::{codec, SiteId, SiteIntent, TenantId};

#[derive(Parser)]
#[command(name = "patronus-edge", version, about = "Patronus SD-WAN edge agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode and validate an intent file (`-` for standard input).
    CheckIntent {
        file: PathBuf,
        /// Also require the intent to be for this tenant.
        #[arg(long)]
        tenant: Option<TenantId>,
        /// Also require the intent to be for this site.
        #[arg(long, requires = "tenant")]
        site: Option<SiteId>,
        /// Also require the revision to be above this applied one.
        #[arg(long, requires = "site")]
        applied_revision: Option<u64>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn read_bounded(file: &PathBuf) -> anyhow::Result<Vec<u8>> {
    let limit = (MAX_MESSAGE_BYTES + 1) as u64;
    let mut bytes = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_end(&mut bytes)?;
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("cannot open {}", file.display()))?
            .take(limit)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", file.display()))?;
    }
    Ok(bytes)
}

fn check_intent(
    file: &PathBuf,
    tenant: Option<TenantId>,
    site: Option<SiteId>,
    applied_revision: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let bytes = read_bounded(file)?;
    let intent: SiteIntent = codec::decode(&bytes)?;
    if let (Some(tenant), Some(site)) = (tenant, site) {
        intent.check_acceptable(tenant, site, applied_revision)?;
    }
    let digest: String = intent
        .content_digest()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let summary = serde_json::json!({
        "valid": true,
        "tenant": intent.tenant,
        "site": intent.site,
        "site_name": intent.site_name,
        "revision": intent.revision,
        "schema_version": intent.schema_version,
        "uplinks": intent.uplinks.len(),
        "peers": intent.peers.len(),
        "paths": intent.paths.len(),
        "routing_policies": intent.policies.routing.len(),
        "content_digest": digest,
    });
    if json {
        println!("{summary}");
    } else {
        println!(
            "intent OK: site {} ({}) revision {}: {} uplinks, {} peers, {} paths, {} routing policies; digest {}",
            intent.site_name,
            intent.site,
            intent.revision,
            intent.uplinks.len(),
            intent.peers.len(),
            intent.paths.len(),
            intent.policies.routing.len(),
            &digest[..16]
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::CheckIntent {
            file,
            tenant,
            site,
            applied_revision,
            json,
        } => check_intent(file, *tenant, *site, *applied_revision, *json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patronus-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}
