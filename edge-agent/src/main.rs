//! `patronus-edge`: the edge agent of a Patronus site.
//!
//! The agent's job (enroll, watch the site's intent, apply it by diffing desired against actual
//! state, probe paths, fail over locally, report) lands issue by issue. What it does today:
//!
//! - `enroll --controller URL --token T [--uplink ...]`: make this site's keys, enroll with the
//!   token, keep the answer in the state directory ([`enroll`], [`state`]).
//! - `status [--remote]`: who this site is, from the state directory alone (or, signed with the
//!   site certificate, what the controller knows of it: [`control`]).
//! - `renew`: new certificate and NATS credentials for new keys, swapped in as one set.
//! - `run`: apply the intent and keep the namespace equal to it ([`run`], [`desired`] pure,
//!   [`tunnels`] the I/O: wireguard-go + wireguard-control + route netlink, [`netlink`]).
//! - `intent`: fetch the site's current intent over NATS with its own credentials ([`nats`]).
//! - `check-intent FILE`: decode and validate a `SiteIntent` exactly as the agent will before
//!   applying one (schema version, size limit, references, ranges), and optionally check that
//!   this site may accept it (tenant, site, rising revision). Operators use it to inspect an
//!   intent taken from the `intents` KV bucket; scripts use its exit status.
//! - `probe --peer NAME [--uplink L --remote-uplink R]`: probe one path like ping, the way the
//!   agent does (inside the tunnel, signed with the site pair's key) ([`probing::probe_peer`]).

mod classifier;
mod commands;
mod config;
mod control;
mod dataplane;
mod desired;
mod enroll;
mod flow_report;
mod handshake;
mod monitor;
mod nats;
mod netlink;
mod probing;
mod run;
mod state;
mod steerer;
mod steering;
mod tunnels;

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
    /// TOML configuration (settings also come from PATRONUS_EDGE_* variables).
    #[arg(long, global = true, env = "PATRONUS_EDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this host as a site with a single-use token.
    Enroll {
        /// The controller's URL, e.g. https://controller.example.
        #[arg(long)]
        controller: String,
        /// The enrollment token (or set PATRONUS_ENROLL_TOKEN, or use --token-file, so it
        /// does not show in the process list).
        #[arg(long, env = "PATRONUS_ENROLL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Read the token from this file (`-`: from standard input).
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// A WAN uplink: name=wan0,address=<public IP>[,type=fiber][,bandwidth=<Mbit/s>][,cost=<per GB>][,metered=true].
        /// None: every interface with a default route (any table) and its global address.
        #[arg(long = "uplink", value_parser = enroll::parse_uplink)]
        uplinks: Vec<patronus_proto::enroll::UplinkSpec>,
        /// The state directory (default: the configuration's `state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Enroll again even though the state directory holds a site.
        #[arg(long)]
        force: bool,
    },
    /// Show this site's identity from the state directory.
    Status {
        /// The state directory (default: the configuration's `state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Also ask the controller (a request signed with the site certificate).
        #[arg(long)]
        remote: bool,
    },
    /// Run the agent: apply the site's intent and keep the namespace equal to it.
    Run {
        /// The state directory (default: the configuration's `state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Replace the site certificate and NATS credentials with new ones for new keys.
    Renew {
        /// The state directory (default: the configuration's `state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Fetch this site's current intent over NATS and summarise it (`--json` prints it whole).
    Intent {
        /// The state directory (default: the configuration's `state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Print the tunnel changes a first apply of this intent makes (interfaces, peers,
        /// routes, rules), without making them.
        #[arg(long, conflicts_with = "json")]
        plan: bool,
    },
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
    /// Probe one path to a peer like ping: signed probes inside the tunnel, answered by the
    /// peer's agent (run it in the site's namespace, as root, while the agent runs).
    Probe {
        /// The state directory (default: the configuration's `state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The peer site's name (or id).
        #[arg(long)]
        peer: String,
        /// This site's uplink (default: the lowest with a path to the peer).
        #[arg(long)]
        uplink: Option<u8>,
        /// The peer's uplink (default: the lowest with a path from --uplink).
        #[arg(long)]
        remote_uplink: Option<u8>,
        /// Probes to send.
        #[arg(
            long,
            default_value_t = 5,
            value_parser = clap::value_parser!(u32).range(1..=100_000)
        )]
        count: u32,
        /// Time between probes, in ms.
        #[arg(
            long,
            default_value_t = 1000,
            value_parser = clap::value_parser!(u64).range(1..=60_000)
        )]
        interval_ms: u64,
        /// Print one JSON object (every result and the summary) instead of lines.
        #[arg(long)]
        json: bool,
        /// Test: sign with a wrong key (the peer counts bad_signature).
        #[arg(long, hide = true, conflicts_with_all = ["unsigned", "replay"])]
        bad_key: bool,
        /// Test: send unsigned probes (the peer counts unsigned).
        #[arg(long, hide = true, conflicts_with = "replay")]
        unsigned: bool,
        /// Test: send every request twice (the peer answers once and counts replayed).
        #[arg(long, hide = true)]
        replay: bool,
    },
    /// Benchmarks (figures on stdout, progress on stderr).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Per-packet cost of the XDP program (BPF_PROG_TEST_RUN; needs root), beside an empty
    /// XDP program in the same run.
    Dataplane {
        /// One JSON object: {empty_ns, flow_hit_ns, miss_1000_policies_ns, hit_1m_flows_ns, ...}.
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

/// The enrollment token from `--token`, or from `--token-file` (`-`: standard input, which
/// keeps it out of the process list and the environment, as the ansible role passes it).
fn read_token(
    token: &Option<String>,
    token_file: &Option<PathBuf>,
    stdin: impl Read,
) -> anyhow::Result<String> {
    let text = match (token, token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(file)) if file.as_os_str() == "-" => {
            let mut text = String::new();
            // A token is a few hundred bytes; a bound keeps a wrong pipe from filling memory.
            stdin
                .take(64 * 1024)
                .read_to_string(&mut text)
                .context("cannot read the token from standard input")?;
            text
        }
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the token file {}", file.display()))?,
        (None, None) => anyhow::bail!(
            "no token: pass --token, --token-file or PATRONUS_ENROLL_TOKEN (create one in the portal or with `patronus-controller token create`)"
        ),
    };
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("the enrollment token is empty");
    }
    Ok(token.to_owned())
}

fn status(state: &state::StateDir, json: bool, remote: bool) -> anyhow::Result<()> {
    let identity = state.identity()?;
    if remote {
        let known = control::remote_status(state, &identity)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&known)?);
        } else {
            println!(
                "controller: site {} is {}; published intent revision {}; certificate {} valid until {}",
                known.site_name,
                known.status,
                known
                    .published_revision
                    .map_or_else(|| "none".to_owned(), |r| r.to_string()),
                known.certificate_serial,
                chrono_like(known.certificate_expires_at)
            );
        }
        return Ok(());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&identity)?);
    } else {
        let expires = chrono_like(identity.expires_at);
        println!(
            "site {} ({}) of tenant {}\n  overlay {}  controller {}  nats {}\n  uplinks: {}\n  credentials expire {}",
            identity.site_name,
            identity.site_id,
            identity.tenant_id,
            identity.overlay_address,
            identity.controller_url,
            identity.nats_url,
            identity
                .uplinks
                .iter()
                .map(|u| format!("{} {}", u.name, u.address))
                .collect::<Vec<_>>()
                .join(", "),
            expires
        );
        let keys = state
            .read(state::WIREGUARD_META_FILE)
            .ok()
            .and_then(|t| serde_json::from_str::<state::WireguardMeta>(&t).ok())
            .unwrap_or_default();
        println!(
            "  WireGuard key made {}{}",
            chrono_like(keys.created_at.unwrap_or(identity.enrolled_at)),
            match (keys.next_created_at, keys.next_accepted_at) {
                (Some(made), Some(_)) => format!(
                    "; next key made {}, accepted by the controller, waiting for the peers",
                    chrono_like(made)
                ),
                (Some(made), None) => format!(
                    "; next key made {}, not yet accepted by the controller (retried every minute)",
                    chrono_like(made)
                ),
                _ => String::new(),
            }
        );
        let applied = state
            .read(run::INTENT_FILE)
            .ok()
            .and_then(|t| codec::decode::<SiteIntent>(t.as_bytes()).ok());
        match &applied {
            Some(intent) => println!(
                "  applied intent revision {}: {} peers, {} paths",
                intent.revision,
                intent.peers.len(),
                intent.paths.len()
            ),
            None => println!("  no intent applied yet (patronus-edge run applies it)"),
        }
        let netlink = netlink::Netlink::open().context("opening route netlink")?;
        for (name, (rx, tx)) in tunnels::transfer(&netlink, identity.site_id) {
            println!("  tunnel {name}: received {rx} B, sent {tx} B");
        }
        let peer_name = |key: &[u8; 32]| {
            applied
                .iter()
                .flat_map(|i| &i.peers)
                .find(|p| p.public_key.0 == *key)
                .map_or_else(|| "unknown peer".to_owned(), |p| p.name.clone())
        };
        for path in tunnels::path_stats(&netlink, identity.site_id) {
            println!(
                "  path {} → {} ({}): {}, received {} B, sent {} B",
                path.interface,
                peer_name(&path.peer_key),
                path.endpoint
                    .map_or_else(|| "no endpoint".to_owned(), |e| e.to_string()),
                match (path.is_up(), path.handshake_age) {
                    (true, Some(age)) => format!("up (handshake {} s ago)", age.as_secs()),
                    (false, Some(age)) => format!("down (last handshake {} s ago)", age.as_secs()),
                    (_, None) => "down (no handshake yet)".to_owned(),
                },
                path.rx_bytes,
                path.tx_bytes
            );
        }
        let monitor = state
            .read(probing::MONITOR_FILE)
            .ok()
            .and_then(|t| serde_json::from_str::<probing::MonitorReport>(&t).ok());
        if let Some(monitor) = monitor {
            let fmt = |v: Option<f64>, unit: &str| {
                v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}{unit}"))
            };
            for p in &monitor.paths {
                println!(
                    "  probe {} uplink {} → {} uplink {}: {:?}{}, rtt {}, jitter {}, loss {}{}",
                    p.path,
                    p.local_uplink,
                    p.peer,
                    p.remote_uplink,
                    p.status,
                    if p.preferred { "" } else { " (hold-down)" },
                    fmt(p.latency_ms, " ms"),
                    fmt(p.jitter_ms, " ms"),
                    fmt(p.loss_pct, " %"),
                    if p.sla_blocked.is_empty() {
                        String::new()
                    } else {
                        format!(", outside the SLA of classes {:?}", p.sla_blocked)
                    }
                );
            }
            if !monitor.drops.is_empty() {
                println!("  probes dropped: {:?}", monitor.drops);
            }
        }
        if let Some(intent) = &applied {
            let lans = tunnels::interfaces_with_address_in(&netlink, &intent.overlay.lan_prefixes)
                .unwrap_or_default();
            let attached: Vec<String> = tunnels::xdp_attached(&netlink, &lans)
                .into_iter()
                .filter_map(|(name, mode)| mode.map(|m| format!("{name} (XDP {m})")))
                .collect();
            if attached.is_empty() {
                println!("  data plane: routes-only (default path per destination)");
            } else {
                println!("  data plane: eBPF steering on {}", attached.join(", "));
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn probe(
    state: &state::StateDir,
    peer: &str,
    uplink: Option<u8>,
    remote_uplink: Option<u8>,
    count: u32,
    interval_ms: u64,
    json: bool,
    mode: probing::ProbeMode,
) -> anyhow::Result<()> {
    let request = probing::ProbeRequest {
        peer: peer.to_owned(),
        uplink,
        remote_uplink,
        count,
        interval: std::time::Duration::from_millis(interval_ms),
        mode,
    };
    let mut announced = false;
    let summary = probing::probe_peer(state, &request, |s, result| {
        if json {
            return;
        }
        if !announced {
            announced = true;
            println!(
                "PROBE {} ({}) via {} (uplink {} -> its uplink {}), {} requests",
                s.peer, s.peer_overlay, s.interface, s.local_uplink, s.remote_uplink, s.mode
            );
        }
        match result.rtt_ms {
            Some(rtt) => println!(
                "reply from {} ({}): seq={} rtt={rtt:.3} ms",
                s.peer, s.peer_overlay, result.seq
            ),
            None => println!("no reply to seq={}", result.seq),
        }
    })?;
    let lost = summary.sent.saturating_sub(summary.received);
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        println!(
            "--- {} probe statistics via {} ---\n{} sent, {} answered, {:.1} % lost; \
             rtt min/avg/max = {}/{}/{} ms",
            summary.peer,
            summary.interface,
            summary.sent,
            summary.received,
            f64::from(lost) * 100.0 / f64::from(summary.sent.max(1)),
            fmt(summary.rtt_min_ms),
            fmt(summary.rtt_avg_ms),
            fmt(summary.rtt_max_ms)
        );
    }
    match mode {
        // Like ping: failure when the path answered nothing.
        probing::ProbeMode::Signed | probing::ProbeMode::Replay if summary.received == 0 => {
            anyhow::bail!(
                "no reply from {} through {} to {} probes",
                summary.peer,
                summary.interface,
                summary.sent
            )
        }
        _ => Ok(()),
    }
}

/// Unix seconds as `YYYY-MM-DD` (days since the epoch, civil calendar).
fn chrono_like(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn intent(state: &state::StateDir, json: bool, plan: bool) -> anyhow::Result<()> {
    let identity = state.identity()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let intent = runtime.block_on(async {
        let client = nats::connect(state, &identity).await?;
        nats::fetch_intent(&client, &identity).await
    })?;
    match intent {
        None => anyhow::bail!(
            "no intent is published for site {} yet; the controller publishes one once the site has peers or policies",
            identity.site_name
        ),
        Some(intent) if json => println!("{}", serde_json::to_string_pretty(&intent)?),
        Some(intent) if plan => {
            intent.check_acceptable(identity.tenant_id, identity.site_id, None)?;
            let netlink = netlink::Netlink::open().context("opening route netlink")?;
            let uplinks = tunnels::uplink_routes(&netlink, &identity)?;
            let want = desired::desired(&intent, &uplinks);
            let actions = desired::diff(&want, &desired::NetState::default());
            println!(
                "revision {}: {} tunnel interfaces, {} routes, {} rules, endpoints {:?}",
                intent.revision,
                want.interfaces.len(),
                want.routes.len(),
                want.rules.len(),
                desired::endpoints(&want)
            );
            for action in actions {
                println!("  {action:?}");
            }
        }
        Some(intent) => {
            intent.check_acceptable(identity.tenant_id, identity.site_id, None)?;
            println!(
                "intent for site {} revision {}: {} uplinks, {} peers, {} paths",
                intent.site_name,
                intent.revision,
                intent.uplinks.len(),
                intent.peers.len(),
                intent.paths.len()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match &cli.command {
        // Works on a file alone; needs no configuration.
        Command::CheckIntent { .. } | Command::Bench { .. } => config::EdgeConfig::default(),
        _ => {
            match config::EdgeConfig::load(cli.config.as_deref(), &|name| std::env::var(name).ok())
            {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("patronus-edge: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let dir = |flag: &Option<PathBuf>| {
        state::StateDir::new(flag.clone().unwrap_or_else(|| config.state_dir.clone()))
    };
    let result = match &cli.command {
        Command::Enroll {
            controller,
            token,
            token_file,
            uplinks,
            state_dir,
            force,
        } => read_token(token, token_file, std::io::stdin().lock()).and_then(|token| {
            enroll::enroll(controller, &token, uplinks.clone(), &dir(state_dir), *force).map(|_| ())
        }),
        Command::Status {
            state_dir,
            json,
            remote,
        } => status(&dir(state_dir), *json, *remote),
        Command::Run { state_dir } => run::run(dir(state_dir), &config),
        Command::Renew { state_dir } => control::renew(&dir(state_dir)).map(|_| ()),
        Command::Intent {
            state_dir,
            json,
            plan,
        } => intent(&dir(state_dir), *json, *plan),
        Command::CheckIntent {
            file,
            tenant,
            site,
            applied_revision,
            json,
        } => check_intent(file, *tenant, *site, *applied_revision, *json),
        Command::Probe {
            state_dir,
            peer,
            uplink,
            remote_uplink,
            count,
            interval_ms,
            json,
            bad_key,
            unsigned,
            replay,
        } => probe(
            &dir(state_dir),
            peer,
            *uplink,
            *remote_uplink,
            *count,
            *interval_ms,
            *json,
            match (bad_key, unsigned, replay) {
                (true, _, _) => probing::ProbeMode::BadKey,
                (_, true, _) => probing::ProbeMode::Unsigned,
                (_, _, true) => probing::ProbeMode::Replay,
                _ => probing::ProbeMode::Signed,
            },
        ),
        Command::Bench {
            which: BenchCommand::Dataplane { json },
        } => dataplane::bench::run(*json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patronus-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_flag_a_file_or_standard_input() {
        let none = std::io::empty();
        assert_eq!(
            read_token(&Some(" flag.token \n".into()), &None, none).unwrap(),
            "flag.token"
        );
        let stdin = "  piped.token\n".as_bytes();
        assert_eq!(
            read_token(&None, &Some(PathBuf::from("-")), stdin).unwrap(),
            "piped.token"
        );
        let file = std::env::temp_dir().join(format!("patronus-edge-token-{}", std::process::id()));
        std::fs::write(&file, "file.token\n").unwrap();
        assert_eq!(
            read_token(&None, &Some(file.clone()), std::io::empty()).unwrap(),
            "file.token"
        );
        std::fs::remove_file(&file).unwrap();
        for (token, file, says) in [
            (None, Some(PathBuf::from("-")), "empty"),
            (Some("  ".to_owned()), None, "empty"),
            (None, None, "no token"),
            (None, Some(file), "cannot read the token file"),
        ] {
            let err = format!(
                "{:#}",
                read_token(&token, &file, std::io::empty()).unwrap_err()
            );
            assert!(err.contains(says), "{token:?} {file:?}: {err}");
        }
    }
}
