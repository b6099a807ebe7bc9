//! `patronus-lab`: many Patronus sites on one machine, each in network namespaces behind an
//! emulated WAN, for the demo, the netns tests and the benchmarks.
//!
//! Modules: [`plan`] is the pure address and naming plan every other part derives from.
//! Bringing the namespaces up and down, the WAN emulator and the benchmarks build on it in
//! the edge-agent-and-lab issue. Today the binary prints the plan (`patronus-lab plan`).

mod plan;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "patronus-lab",
    version,
    about = "Patronus lab of sites in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the namespaces, interfaces and addresses a lab of this size uses.
    Plan {
        #[arg(long, default_value_t = 4)]
        sites: u16,
        #[arg(long, default_value_t = 2)]
        uplinks: u8,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan {
            sites,
            uplinks,
            json,
        } => match plan::plan(sites, uplinks) {
            Ok(lab) if json => match serde_json::to_string_pretty(&lab) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("patronus-lab: cannot print the plan: {e}");
                    ExitCode::FAILURE
                }
            },
            Ok(lab) => {
                println!(
                    "WAN {} in namespace {}, management host {}",
                    lab.wan_space, lab.internet_ns, lab.mgmt_host_addr
                );
                for site in &lab.sites {
                    let wans: Vec<String> = site
                        .uplinks
                        .iter()
                        .map(|u| format!("{}={}", u.router_if, u.router_addr))
                        .collect();
                    println!(
                        "{:<8} ns {:<8} lan {} (host {}) mgmt {} {}",
                        site.name,
                        site.router_ns,
                        site.lan_prefix,
                        site.lan_host_addr.addr(),
                        site.mgmt_addr.addr(),
                        wans.join(" ")
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("patronus-lab: {e}");
                ExitCode::from(2)
            }
        },
    }
}
