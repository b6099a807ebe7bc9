//! Three sites of a real lab enroll from inside their namespaces: `patronus-lab up` (root, network
//! namespaces) relays the controller and NATS over the management link, each site's router
//! runs `patronus-edge enroll` with a token, and each then reads, over NATS with its own
//! credentials, an intent that names the other site's WAN uplinks as its peer; then their
//! agents build the tunnels and a LAN host reaches the other site's LAN host through them, a
//! tunnel deleted by hand is repaired, and an agent restarted with NATS unreachable restores
//! the tunnels from its state directory.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::StreamExt;
use patronus_proto::policy::PathPreference;
use patronus_test_support::lab::{binary, enroll_site, in_ns, text, LabController};
use patronus_test_support::TestEnv;
use uuid::Uuid;

/// Keep the controller's revision sequence above a revision this test publishes by hand, so
/// the controller's next intent for the site (after the revocation below) is newer than it:
/// an agent ignores a revision equal to the one it applied and refuses a lower one.
async fn reserve_revision(owner_url: &str, revision: u64) -> anyhow::Result<()> {
    let mut owner = AsyncPgConnection::establish(owner_url).await?;
    owner
        .batch_execute(&format!(
            "SELECT setval('intent_revision_seq', \
             GREATEST({revision}, (SELECT last_value FROM intent_revision_seq)))"
        ))
        .await?;
    Ok(())
}

/// A routing policy for `protocol`/`dst_port` traffic of class `class`, active-backup.
fn routing_policy(
    n: u128,
    class: &str,
    protocol: u8,
    dst_port: u16,
    preference: PathPreference,
) -> patronus_proto::policy::RoutingPolicy {
    use patronus_proto::policy::{AppClass, LoadBalancing, MatchRules, PortRange, Protocol, Sla};
    patronus_proto::policy::RoutingPolicy {
        id: patronus_proto::PolicyId(Uuid::from_u128(n)),
        name: class.to_owned(),
        priority: 100,
        enabled: true,
        match_rules: MatchRules {
            protocol: Some(if protocol == 6 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            }),
            dst_ports: vec![PortRange::single(dst_port)],
            ..MatchRules::default()
        },
        app_class: AppClass::new(class),
        path_preference: preference,
        load_balancing: LoadBalancing::ActiveBackup,
        sla: Sla::default(),
        probe_interval_ms: None,
    }
}

/// Bytes site 1 sent into each of its tunnels while `iperf3 args` ran from its LAN host.
/// (`wg show all` lists every namespace's userspace tunnels: the UAPI socket directory is
/// shared, so only names with site 1's `prefix` count.)
fn tunnel_tx_during(
    prefix: &str,
    args: &[&str],
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let read = || -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let out = Command::new("ip")
            .args(["netns", "exec", "pl-s1", "wg", "show", "all", "transfer"])
            .output()?;
        ensure!(out.status.success(), "wg show: {}", text(&out));
        let mut sent = std::collections::BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(name), Some(tx)) = (
                f.first().filter(|n| n.starts_with(prefix)),
                f.get(3).and_then(|t| t.parse::<u64>().ok()),
            ) {
                *sent.entry((*name).to_owned()).or_default() += tx;
            }
        }
        Ok(sent)
    };
    let before = read()?;
    let out = Command::new("ip")
        .args(["netns", "exec", "pl-s1-lan", "iperf3"])
        .args(args)
        .output()?;
    ensure!(out.status.success(), "iperf3 {args:?}: {}", text(&out));
    let after = read()?;
    Ok(after
        .into_iter()
        .map(|(name, tx)| {
            let was = before.get(&name).copied().unwrap_or(0);
            (name, tx.saturating_sub(was))
        })
        .collect())
}

/// The next event an agent reports within 5 s, heartbeats aside.
async fn next_event(
    events: &mut async_nats::Subscriber,
) -> anyhow::Result<patronus_proto::events::SdwanEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let message = tokio::time::timeout_at(deadline, events.next())
            .await
            .context("no event from the agent")?
            .context("event subscription ended")?;
        let envelope: patronus_proto::events::EventEnvelope =
            patronus_proto::codec::decode(&message.payload)?;
        if !matches!(
            envelope.event,
            patronus_proto::events::SdwanEvent::Heartbeat { .. }
        ) {
            return Ok(envelope.event);
        }
    }
}

/// One ping from site 1's LAN host to another site's LAN host.
fn lan_ping(to: &str) -> anyhow::Result<bool> {
    Ok(Command::new("ip")
        .args([
            "netns",
            "exec",
            "pl-s1-lan",
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            to,
        ])
        .output()?
        .status
        .success())
}

#[tokio::test(flavor = "multi_thread")]
async fn lab_sites_enroll_through_the_management_link_and_learn_each_other() -> anyhow::Result<()> {
    patronus_test_support::lab::require_root()?;
    let lab = binary("patronus-lab")?;
    let edge = binary("patronus-edge")?;

    let env = TestEnv::load()?;
    let lab_controller = LabController::start(&env).await?;
    let tenant = lab_controller.tenant;
    // An API token of the tenant's admin, for the revocation below.
    let api_token = lab_controller.api_token().await?;
    let owner_url = lab_controller.database.owner_url.clone();
    let mut tokens = Vec::new();
    for n in 1..=3 {
        tokens.push(
            lab_controller
                .token(&format!("site{n}"), &format!("10.{n}.0.0/24"))
                .await?,
        );
    }
    let reader_config = lab_controller.config.clone();
    let controller_url_host = lab_controller.controller.url.clone();

    let out = Command::new(&lab)
        .args(["up", "--sites", "3", "--uplinks", "2"])
        .args(lab_controller.relay_args())
        .output()?;
    ensure!(out.status.success(), "{}", text(&out));
    let dir = std::env::temp_dir().join(format!("patronus-lab-enroll-{}", Uuid::new_v4().simple()));
    let result = async {
        let controller_url = lab_controller.url_in_lab();
        let mut enrolled_at = Instant::now();
        for (i, token) in tokens.iter().enumerate() {
            let n = i + 1;
            enrolled_at = Instant::now();
            enroll_site(
                &edge,
                &controller_url,
                token,
                u8::try_from(n)?,
                &dir.join(format!("site{n}")),
            )?;
        }
        // Site 1 learns site 2 (its uplinks as peer endpoints) over NATS through the relay.
        let state1 = dir.join("site1");
        let deadline = Instant::now() + Duration::from_secs(15);
        let learned = loop {
            let out = in_ns(
                "pl-s1",
                &edge,
                &[
                    "intent",
                    "--json",
                    "--state-dir",
                    state1.to_str().context("path")?,
                ],
            )?;
            if out.status.success() {
                let intent: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let text = intent["peers"].to_string();
                if ["198.18.2.1", "198.18.2.5", "198.18.3.1", "198.18.3.5"]
                    .iter()
                    .all(|a| text.contains(a))
                {
                    break enrolled_at.elapsed();
                }
            }
            ensure!(
                Instant::now() < deadline,
                "site1 never learned site2: {}",
                text(&out)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("last site's enroll → site1's intent lists every peer: {learned:?}");
        // What applying it means: a tunnel per (local uplink, remote uplink), all endpoints in
        // the lab's WAN.
        let out = in_ns(
            "pl-s1",
            &edge,
            &[
                "intent",
                "--plan",
                "--state-dir",
                state1.to_str().context("path")?,
            ],
        )?;
        let plan = text(&out);
        ensure!(out.status.success(), "{plan}");
        ensure!(plan.contains("4 tunnel interfaces"), "{plan}");
        ensure!(
            plan.contains("198.18.2.1") && plan.contains("198.18.2.5"),
            "{plan}"
        );
        ensure!(plan.matches("CreateInterface").count() == 4, "{plan}");
        // Every interface holds each of the two peers once.
        ensure!(plan.matches("SetPeer").count() == 8, "{plan}");

        // The agents build the tunnels: LAN host to LAN host across them.
        let mut agents = Vec::new();
        for n in 1..=3 {
            let log = std::fs::File::create(dir.join(format!("run{n}.log")))?;
            agents.push(
                Command::new("ip")
                    .args(["netns", "exec", &format!("pl-s{n}")])
                    .arg(&edge)
                    .args(["run", "--state-dir"])
                    .arg(dir.join(format!("site{n}")))
                    .stdout(std::process::Stdio::null())
                    .stderr(log)
                    .spawn()?,
            );
        }
        let started = Instant::now();
        let reached = loop {
            // The seed's test: site A's LAN host reaches site C's, and B's too.
            if lan_ping("10.3.0.10")? && lan_ping("10.2.0.10")? {
                break started.elapsed();
            }
            if started.elapsed() > Duration::from_secs(20) {
                let logs: Vec<String> = (1..=3)
                    .map(|n| {
                        std::fs::read_to_string(dir.join(format!("run{n}.log"))).unwrap_or_default()
                    })
                    .collect();
                for mut agent in agents {
                    let _ = agent.kill();
                }
                anyhow::bail!(
                    "LAN 1 never reached LAN 2 through the tunnels; agent logs: {logs:?}"
                );
            }
        };
        println!("agents started → first LAN-to-LAN ping answered: {reached:?}");

        // Each tunnel leaves by its own uplink: what site 2's WireGuard saw as the source of
        // every handshake is the remote uplink the tunnel is for (uplink r ends in .1 or .5).
        std::thread::sleep(Duration::from_millis(500));
        let out = Command::new("ip")
            .args(["netns", "exec", "pl-s2", "wg", "show", "all", "endpoints"])
            .output()?;
        let endpoints = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success() && !endpoints.is_empty(),
            "{}",
            text(&out)
        );
        for line in endpoints.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(name), Some(endpoint)) = (fields.first(), fields.get(2)) else {
                continue;
            };
            let remote_uplink = name.chars().last().context("interface name")?;
            let want = if remote_uplink == '0' { ".1:" } else { ".5:" };
            ensure!(
                endpoint.contains(want),
                "{name} talks to {endpoint}: {endpoints}"
            );
        }

        // A bad intent changes nothing and is reported; the same content again (a higher
        // revision) is applied with no change.
        let site1: patronus_proto::SiteId = serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(state1.join("identity.json"))?,
        )?["site_id"]
            .as_str()
            .context("site id")?
            .parse()?;
        let reader = patronus_controller::server::AppState::connect(&reader_config).await?;
        let link = reader.tenant_nats(tenant).await?;
        let key = patronus_proto::subjects::intent_key(tenant, site1);
        let mut events = link
            .client
            .subscribe(patronus_proto::subjects::events_subject(tenant, site1))
            .await?;
        link.intents.get(key.clone()).await?;
        // The heartbeat: every path (4 tunnels × 2 peers) handshook and is up. Heartbeats
        // come every 10 s; a path still degraded by the start-up's load at the first one has
        // until the second or third.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
        let mut last_seen = None;
        loop {
            let message = tokio::time::timeout_at(deadline, events.next())
                .await
                .with_context(|| {
                    format!(
                        "no heartbeat with every path up; the last (tunnels up, paths up, paths) was {last_seen:?}"
                    )
                })?
                .context("event subscription ended")?;
            let envelope: patronus_proto::events::EventEnvelope =
                patronus_proto::codec::decode(&message.payload)?;
            if let patronus_proto::events::SdwanEvent::Heartbeat {
                tunnels_up,
                paths_up,
                paths_total,
                applied_revision,
                ..
            } = envelope.event
            {
                ensure!(applied_revision > 0, "heartbeat before any intent");
                last_seen = Some((tunnels_up, paths_up, paths_total));
                if (tunnels_up, paths_up, paths_total) == (4, 8, 8) {
                    break;
                }
            }
        }
        link.intents
            .put(key.clone(), "{not an intent".into())
            .await?;
        let event = next_event(&mut events).await?;
        ensure!(
            matches!(
                event,
                patronus_proto::events::SdwanEvent::IntentRejected { .. }
            ),
            "{event:?}"
        );
        ensure!(lan_ping("10.3.0.10")?, "a bad intent broke the tunnels");
        let stored: patronus_proto::SiteIntent =
            patronus_proto::codec::decode(&std::fs::read(state1.join("intent.json"))?)?;
        let mut again = stored.clone();
        again.revision += 1;
        reserve_revision(&owner_url, again.revision).await?;
        link.intents
            .put(key.clone(), patronus_proto::codec::encode(&again).into())
            .await?;
        let event = next_event(&mut events).await?;
        ensure!(
            event
                == patronus_proto::events::SdwanEvent::IntentApplied {
                    revision: again.revision
                },
            "{event:?}"
        );
        let log = std::fs::read_to_string(dir.join("run1.log"))?;
        ensure!(
            log.contains(&format!(
                "applied intent revision {} (0 changes in",
                again.revision
            )),
            "the same content changed something: {log}"
        );

        // Application-aware steering by the eBPF data plane on site 1's LAN side: VoIP (UDP
        // 5060) over the lowest-latency path (fiber ↔ fiber), bulk (TCP 873) over the
        // lowest-cost one (the LTE uplink, made cheaper here), proven by WireGuard counters.
        let mut steered = again.clone();
        steered.revision += 1;
        reserve_revision(&owner_url, steered.revision).await?;
        steered.uplinks[0].cost_per_gb = 5.0;
        steered.uplinks[1].cost_per_gb = 0.0;
        steered.policies.routing = vec![
            routing_policy(1, "voip", 17, 5060, PathPreference::LowestLatency),
            routing_policy(2, "backup", 6, 873, PathPreference::LowestCost),
        ];
        link.intents
            .put(key.clone(), patronus_proto::codec::encode(&steered).into())
            .await?;
        let event = next_event(&mut events).await?;
        ensure!(
            event
                == patronus_proto::events::SdwanEvent::IntentApplied {
                    revision: steered.revision
                },
            "{event:?}"
        );
        // The data plane loads once applying has been quiet (≤ two reconcile periods).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(dir.join("run1.log"))?;
            if log.contains("dataplane: 2 policies in 2 classes") {
                ensure!(log.contains("dataplane: eBPF steering on lan0"), "{log}");
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the data plane never took the policies: {log}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for port in ["5060", "873"] {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    "pl-s2-lan",
                    "iperf3",
                    "-s",
                    "-D",
                    "-p",
                    port,
                ])
                .output()?;
            ensure!(out.status.success(), "iperf3 server: {}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(300));
        let prefix = format!("pw{}", &site1.0.simple().to_string()[..8]);
        let voip = tunnel_tx_during(
            &prefix,
            &[
                "-c",
                "10.2.0.10",
                "-p",
                "5060",
                "-u",
                "-b",
                "2M",
                "-l",
                "1000",
                "-t",
                "2",
            ],
        )?;
        let bulk = tunnel_tx_during(
            &prefix,
            &["-c", "10.2.0.10", "-p", "873", "-b", "4M", "-t", "2"],
        )?;
        println!("tunnel bytes sent during VoIP: {voip:?}; during bulk: {bulk:?}");
        let sum = |m: &std::collections::BTreeMap<String, u64>, local: char| -> u64 {
            m.iter()
                .filter(|(name, _)| name.chars().rev().nth(1) == Some(local))
                .map(|(_, b)| *b)
                .sum()
        };
        let voip_fiber = voip
            .iter()
            .find(|(n, _)| n.ends_with("-00"))
            .map_or(0, |(_, b)| *b);
        ensure!(
            voip_fiber > 400_000 && sum(&voip, '1') < voip_fiber / 4,
            "VoIP did not take fiber↔fiber: {voip:?}"
        );
        ensure!(
            sum(&bulk, '1') > 800_000 && sum(&bulk, '0') < sum(&bulk, '1') / 4,
            "bulk did not take the cheap uplink: {bulk:?}"
        );
        // The agent reports those flows from the data plane's table, with class and path.
        let mut flow_reports = link
            .client
            .subscribe(patronus_proto::subjects::flows_subject(tenant, site1))
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let report: patronus_proto::flows::FlowReport = loop {
            let Ok(message) = tokio::time::timeout_at(deadline, flow_reports.next()).await else {
                anyhow::bail!(
                    "no flow report within 15 s; agent log: {}",
                    std::fs::read_to_string(dir.join("run1.log"))?
                );
            };
            let message = message.context("flow subscription ended")?;
            let report: patronus_proto::flows::FlowReport =
                patronus_proto::codec::decode(&message.payload)?;
            if report.flows.iter().any(|f| f.key.dst_port == 873) {
                break report;
            }
        };
        ensure!(
            report.tenant == tenant && report.site == site1,
            "{report:?}"
        );
        let find = |protocol: u8, port: u16| {
            report
                .flows
                .iter()
                .find(|f| f.key.protocol == protocol && f.key.dst_port == port)
        };
        let voip_flow = find(17, 5060).context("no VoIP flow reported")?;
        let bulk_flow = find(6, 873).context("no bulk flow reported")?;
        ensure!(
            voip_flow.app_class.0 == "voip" && voip_flow.bytes_tx > 400_000,
            "{voip_flow:?}"
        );
        ensure!(bulk_flow.app_class.0 == "backup", "{bulk_flow:?}");
        let path_of = |id| steered.paths.iter().find(|p| Some(p.id) == id);
        ensure!(
            path_of(voip_flow.path).is_some_and(|p| (p.local_uplink, p.remote_uplink) == (0, 0)),
            "VoIP flow reported on {:?}",
            voip_flow.path
        );
        ensure!(
            path_of(bulk_flow.path).is_some_and(|p| p.local_uplink == 1),
            "bulk flow reported on {:?}",
            bulk_flow.path
        );
        // The controller stores the reports; the tenant's API lists them.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed: serde_json::Value = ureq::get(&format!(
                "{controller_url_host}/api/v1/flows?site={}&app_class=voip",
                site1.0
            ))
            .set("Authorization", &format!("Bearer {api_token}"))
            .call()
            .context("GET /api/v1/flows")?
            .into_json()?;
            let stored = listed["items"].as_array().is_some_and(|items| {
                items.iter().any(|f| {
                    f["dst_port"] == 5060 && f["bytes_tx"].as_i64().is_some_and(|b| b > 400_000)
                })
            });
            if stored {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the VoIP flow never reached /api/v1/flows: {listed}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        drop((events, link, reader));
        let out = in_ns(
            "pl-s1",
            &edge,
            &["status", "--state-dir", state1.to_str().context("path")?],
        )?;
        let status = text(&out);
        let checked = (|| -> anyhow::Result<()> {
            ensure!(status.contains("applied intent revision"), "{status}");
            // Every path (a peer on a tunnel) with its state, and the data plane in force.
            ensure!(
                status.matches("  path pw").count() == 8
                    && status.contains("→ site2")
                    && status.contains("up (handshake"),
                "{status}"
            );
            ensure!(
                status.contains("data plane: eBPF steering on lan0 (XDP"),
                "{status}"
            );
            let carried = status
                .lines()
                .filter(|l| l.contains("tunnel pw"))
                .any(|l| !l.contains("received 0 B"));
            ensure!(carried, "no tunnel carried traffic: {status}");
            let tunnels: Vec<String> = status
                .lines()
                .filter_map(|l| l.trim().strip_prefix("tunnel "))
                .filter_map(|l| l.split(':').next())
                .map(str::to_owned)
                .collect();
            ensure!(tunnels.len() == 4, "{status}");

            // Deleted by hand: the reconcile loop puts it back and traffic flows again.
            let victim = &tunnels[0];
            ensure!(Command::new("ip")
                .args(["-n", "pl-s1", "link", "del", victim])
                .status()?
                .success());
            let started = Instant::now();
            loop {
                let back = Command::new("ip")
                    .args(["-n", "pl-s1", "link", "show", victim])
                    .output()?
                    .status
                    .success();
                if back && lan_ping("10.3.0.10")? {
                    break;
                }
                ensure!(
                    started.elapsed() < Duration::from_secs(15),
                    "{victim} was not repaired"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            println!(
                "hand-deleted {victim} repaired and carrying traffic after {:?}",
                started.elapsed()
            );

            // The same for a route and a rule: site 3's LAN route in the main table (the
            // default path the ping takes) and one path's mark rule.
            let ip_out = |args: &[&str]| -> anyhow::Result<String> {
                let out = Command::new("ip").args(args).output()?;
                ensure!(out.status.success(), "ip {args:?} failed");
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            };
            let lan_route = ip_out(&["-n", "pl-s1", "route", "show", "10.3.0.0/24"])?;
            ensure!(lan_route.contains("dev pw"), "site 3's LAN route: {lan_route}");
            let rules: Vec<serde_json::Value> =
                serde_json::from_str(&ip_out(&["-n", "pl-s1", "-j", "rule", "show"])?)?;
            let rule = rules
                .iter()
                .find(|r| r["fwmark"].is_string() && r["table"].as_str() != Some("main"))
                .ok_or_else(|| anyhow::anyhow!("no mark rule in site 1: {rules:?}"))?;
            let (mark, table, priority) = (
                rule["fwmark"].as_str().unwrap_or_default().to_owned(),
                rule["table"].as_str().unwrap_or_default().to_owned(),
                rule["priority"].to_string(),
            );
            ip_out(&["-n", "pl-s1", "route", "del", "10.3.0.0/24"])?;
            ip_out(&[
                "-n", "pl-s1", "rule", "del", "fwmark", &mark, "lookup", &table, "priority",
                &priority,
            ])?;
            let started = Instant::now();
            loop {
                let route_back = ip_out(&["-n", "pl-s1", "route", "show", "10.3.0.0/24"])?
                    .contains("dev pw");
                let rule_back = ip_out(&["-n", "pl-s1", "rule", "show", "fwmark", &mark])?
                    .contains(&format!("lookup {table}"));
                if route_back && rule_back && lan_ping("10.3.0.10")? {
                    break;
                }
                ensure!(
                    started.elapsed() < Duration::from_secs(15),
                    "the deleted route (back: {route_back}) or rule fwmark {mark} (back: {rule_back}) was not repaired"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            println!(
                "hand-deleted LAN route and mark rule (fwmark {mark} table {table}) repaired after {:?}",
                started.elapsed()
            );

            // Revocation end to end: site 3 is revoked through the API; site 1's WireGuard no
            // longer has it as a peer and its LAN is unreachable.
            // `wg show all` lists every userspace interface on the host (their sockets share a
            // directory), so keep site 1's: `pw<first 8 hex of its id>-`.
            let site1_prefix = format!("pw{}-", &site1.0.simple().to_string()[..8]);
            let peers = || -> anyhow::Result<usize> {
                let out = Command::new("ip")
                    .args(["netns", "exec", "pl-s1", "wg", "show", "all", "peers"])
                    .output()?;
                Ok(String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with(&site1_prefix))
                    .count())
            };
            ensure!(
                peers()? == 8,
                "site 1 should have 2 peers on each of 4 tunnels"
            );
            let site3: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("site3").join("identity.json"))?)?;
            let site3 = site3["site_id"].as_str().context("site id")?.to_owned();
            let revoked_at = Instant::now();
            let response = ureq::post(&format!(
                "{}/api/v1/sites/{site3}/revoke",
                controller_url_host
            ))
            .set("Authorization", &format!("Bearer {api_token}"))
            .call();
            ensure!(response.is_ok(), "revoke: {response:?}");
            loop {
                if peers()? == 4 {
                    break;
                }
                ensure!(
                    revoked_at.elapsed() < Duration::from_secs(5),
                    "site 1 still has the revoked peer after 5 s; its agent log:\n{}",
                    std::fs::read_to_string(dir.join("run1.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let dropped = revoked_at.elapsed();
            ensure!(
                !lan_ping("10.3.0.10")?,
                "the revoked site's LAN is still reachable"
            );
            println!("revoked site3 → gone from site1's WireGuard after {dropped:?}");
            Ok(())
        })();
        // Restart without NATS: the agent restores its tunnels from its state directory.
        let restart = (|| -> anyhow::Result<()> {
            checked?;
            let mut first = agents.remove(0);
            let _ = first.kill();
            first.wait()?;
            let identity_file = state1.join("identity.json");
            let mut identity: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&identity_file)?)?;
            identity["nats_url"] = "nats://198.19.254.1:1".into();
            std::fs::write(&identity_file, serde_json::to_vec(&identity)?)?;
            let links = Command::new("ip")
                .args(["-n", "pl-s1", "-o", "link", "show"])
                .output()?;
            for name in String::from_utf8_lossy(&links.stdout)
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .filter(|n| n.starts_with("pw"))
            {
                Command::new("ip")
                    .args(["-n", "pl-s1", "link", "del", name])
                    .status()?;
            }
            ensure!(
                !lan_ping("10.2.0.10")?,
                "traffic flowed with site1's tunnels gone"
            );
            let log = std::fs::File::create(dir.join("run1-restart.log"))?;
            agents.insert(
                0,
                Command::new("ip")
                    .args(["netns", "exec", "pl-s1"])
                    .arg(&edge)
                    .args(["run", "--state-dir"])
                    .arg(&state1)
                    .stdout(std::process::Stdio::null())
                    .stderr(log)
                    .spawn()?,
            );
            let started = Instant::now();
            while !lan_ping("10.2.0.10")? {
                ensure!(
                    started.elapsed() < Duration::from_secs(15),
                    "the restarted agent did not restore the tunnels: {}",
                    std::fs::read_to_string(dir.join("run1-restart.log")).unwrap_or_default()
                );
            }
            println!(
                "agent restarted with NATS unreachable: traffic again after {:?}",
                started.elapsed()
            );
            Ok(())
        })();
        for mut agent in agents {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        restart?;
        let out = in_ns(
            "pl-s2",
            &edge,
            &[
                "status",
                "--remote",
                "--state-dir",
                dir.join("site2").to_str().context("path")?,
            ],
        )?;
        ensure!(
            out.status.success() && text(&out).contains("is active"),
            "{}",
            text(&out)
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        patronus_test_support::lab::print_agent_logs(&dir, 3);
    }
    let down = Command::new(&lab).arg("down").output()?;
    let _ = std::fs::remove_dir_all(&dir);
    let stopped = lab_controller.stop().await;
    result?;
    ensure!(down.status.success(), "{}", text(&down));
    stopped
}
