//! Path monitoring and local failover in a real lab: two sites with two uplinks enroll with
//! real tokens and run their agents; with probes every 20 ms (asked for by the VoIP policy)
//! the agents measure every path
//! inside its tunnel (delay and loss the WAN emulator adds show up as such), move a VoIP flow
//! off a cut uplink within a probe timeout or so while a bulk flow on the other uplink stays
//! where it is, and drop probes that are badly signed, unsigned or replayed (sent by
//! `patronus-edge probe`, the operator's ping over a path), counting each by reason; and find
//! an MTU lowered on one uplink (both ends: one from its device, the other from the
//! internet's "fragmentation needed" answers to its full-size probes); and measure a path's
//! bandwidth on demand through `POST /api/v1/paths/{id}/test`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use futures_util::StreamExt;
use patronus_proto::events::{EventEnvelope, SdwanEvent};
use patronus_proto::flows::FlowReport;
use patronus_proto::intent::PathSpec;
use patronus_proto::metrics::PathMetricsBatch;
use patronus_proto::policy::{LoadBalancing, PathPreference};
use patronus_proto::{PathId, SiteId, SiteIntent};
use patronus_test_support::lab::{
    binary, enroll_site, impair, in_ns, print_agent_logs, text, Agents, LabController,
};
use patronus_test_support::TestEnv;
use uuid::Uuid;

/// One ping from site 1's LAN host to site 2's.
fn lan_ping() -> anyhow::Result<bool> {
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
            "10.2.0.10",
        ])
        .output()?
        .status
        .success())
}

/// A routing policy of class `class` for `protocol` traffic to (or, for replies, from) `port`.
fn policy(
    n: u128,
    class: &str,
    protocol: u8,
    dst_port: Option<u16>,
    src_port: Option<u16>,
    preference: PathPreference,
    load_balancing: LoadBalancing,
) -> patronus_proto::policy::RoutingPolicy {
    use patronus_proto::policy::{AppClass, MatchRules, PortRange, Protocol, Sla};
    patronus_proto::policy::RoutingPolicy {
        id: patronus_proto::PolicyId(Uuid::from_u128(n)),
        name: format!("{class}-{n}"),
        priority: 100,
        enabled: true,
        match_rules: MatchRules {
            protocol: Some(if protocol == 6 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            }),
            dst_ports: dst_port.map(PortRange::single).into_iter().collect(),
            src_ports: src_port.map(PortRange::single).into_iter().collect(),
            ..MatchRules::default()
        },
        app_class: AppClass::new(class),
        path_preference: preference,
        load_balancing,
        sla: Sla::default(),
        // The site probes every second (the default); the VoIP policy asks for 20 ms probes
        // on the paths its traffic can take (all of them: no destination prefixes).
        probe_interval_ms: (class == "voip").then_some(20),
    }
}

/// A site's `monitor.json` (what `patronus-edge status` shows of its paths), if written.
fn monitor(state: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(state.join("monitor.json")).ok()?).ok()
}

/// Whether a monitor report lists `paths` paths, all up, past their hold-down, measured.
fn all_up(report: &serde_json::Value, paths: usize) -> bool {
    report["paths"].as_array().is_some_and(|p| {
        p.len() == paths
            && p.iter().all(|p| {
                p["status"] == "up"
                    && p["preferred"] == true
                    && p["latency_ms"].as_f64().is_some_and(|l| l > 0.0)
                    && p["jitter_ms"].is_number()
                    && p["loss_pct"].is_number()
            })
    })
}

/// Wait until `state`'s monitor shows its 4 paths up, usable and measured.
async fn wait_all_up(state: &Path, site: &str, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let report = monitor(state);
        if report.as_ref().is_some_and(|r| all_up(r, 4)) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < limit,
            "{site}'s monitor.json did not show 4 paths up, usable and measured within \
             {limit:?}: {}",
            report.map_or_else(|| "not written".to_owned(), |r| r.to_string())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A probe drop counter of a monitor report (0 when absent).
fn drops(report: &Option<serde_json::Value>, reason: &str) -> u64 {
    report
        .as_ref()
        .and_then(|r| r["drops"][reason].as_u64())
        .unwrap_or(0)
}

/// Bytes site 1 has sent into each of its tunnels (`wg show all` lists every namespace's
/// userspace tunnels, so only names with site 1's `prefix` count).
fn tunnel_tx(prefix: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let out = Command::new("ip")
        .args(["netns", "exec", "pl-s1", "wg", "show", "all", "transfer"])
        .output()?;
    ensure!(out.status.success(), "wg show: {}", text(&out));
    let mut sent = BTreeMap::new();
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
}

/// Growth per local uplink between two [`tunnel_tx`] readings (`pw<8 hex>-<l><r>`).
fn growth_by_uplink(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<u8, u64> {
    let mut by = BTreeMap::new();
    for (name, tx) in after {
        let local = name
            .chars()
            .rev()
            .nth(1)
            .and_then(|c| c.to_digit(10))
            .and_then(|d| u8::try_from(d).ok());
        if let Some(local) = local {
            *by.entry(local).or_default() +=
                tx.saturating_sub(before.get(name).copied().unwrap_or(0));
        }
    }
    by
}

/// The next message on `sub` within `limit`, decoded.
async fn next_message<T: patronus_proto::codec::Message>(
    sub: &mut async_nats::Subscriber,
    deadline: tokio::time::Instant,
    what: &str,
) -> anyhow::Result<T> {
    let message = tokio::time::timeout_at(deadline, sub.next())
        .await
        .with_context(|| format!("no {what} in time"))?
        .with_context(|| format!("the {what} subscription ended"))?;
    patronus_proto::codec::decode(&message.payload).with_context(|| format!("a bad {what}"))
}

fn local_uplink_of(paths: &[PathSpec], id: PathId) -> Option<u8> {
    paths.iter().find(|p| p.id == id).map(|p| p.local_uplink)
}

/// What the steps share.
struct Lab {
    lab: PathBuf,
    edge: PathBuf,
    dir: PathBuf,
    tenant: patronus_proto::TenantId,
    link: patronus_controller::nats::TenantLink,
    site1: SiteId,
    /// Each site's current intent, as last put.
    intents: BTreeMap<u8, SiteIntent>,
    /// The controller's API (loopback) and an API token of the tenant's admin.
    api_url: String,
    api_token: String,
}

impl Lab {
    fn state(&self, n: u8) -> PathBuf {
        self.dir.join(format!("site{n}"))
    }

    fn log(&self, n: u8) -> String {
        std::fs::read_to_string(self.dir.join(format!("run{n}.log"))).unwrap_or_default()
    }

    /// The paths of site 1.
    fn paths1(&self) -> &[PathSpec] {
        self.intents.get(&1).map_or(&[], |i| i.paths.as_slice())
    }

    fn on_uplink(&self, id: PathId, uplink: u8) -> bool {
        local_uplink_of(self.paths1(), id) == Some(uplink)
    }

    /// Change site `n`'s intent with `edit`, put it as the next revision and wait until the
    /// agent applied it.
    async fn put(&mut self, n: u8, edit: impl FnOnce(&mut SiteIntent)) -> anyhow::Result<()> {
        let intent = self.intents.get_mut(&n).context("no intent for the site")?;
        edit(intent);
        intent.revision += 1;
        let key = patronus_proto::subjects::intent_key(self.tenant, intent.site);
        let revision = intent.revision;
        let bytes = patronus_proto::codec::encode(&*intent);
        self.link
            .intents
            .put(key, bytes.into())
            .await
            .with_context(|| format!("putting site{n}'s intent"))?;
        self.wait_log(
            n,
            &format!("applied intent revision {revision} ("),
            Duration::from_secs(10),
        )
        .await
    }

    async fn wait_log(&self, n: u8, what: &str, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let log = self.log(n);
            if log.contains(what) {
                return Ok(());
            }
            ensure!(
                started.elapsed() < limit,
                "site{n}'s log never said {what:?} within {limit:?}: {log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn subscribe(&self, subject: String) -> anyhow::Result<async_nats::Subscriber> {
        Ok(self.link.client.subscribe(subject).await?)
    }

    /// Step 2: delay on site 1's uplink 0 shows as RTT on the paths leaving by it, and only
    /// there.
    async fn delay(&mut self, metrics: &mut async_nats::Subscriber) -> anyhow::Result<()> {
        // A probe answered after its timeout counts as lost (BFD-like), so with the 60 ms
        // timeout a 60 ms delay would read as a dead path, not as 60 ms: for this step both
        // sites time probes out after 200 ms instead.
        for n in 1..=2 {
            self.put(n, |i| i.probe.timeout_ms = 200).await?;
        }
        impair(&self.lab, 1, 0, &["--delay", "60"])?;
        let impaired_at = now_unix_ms();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
        let batch = loop {
            let batch: PathMetricsBatch =
                next_message(metrics, deadline, "metrics batch with the delay measured").await?;
            ensure!(
                batch.tenant == self.tenant && batch.site == self.site1,
                "a batch of another site on site1's subject: {batch:?}"
            );
            // The RTT is the mean of the last 20 probes (400 ms): skip batches from before.
            if batch.sent_at_unix_ms >= impaired_at + 600 && batch.samples.len() == 4 {
                break batch;
            }
        };
        let latency: Vec<(u8, f64)> = batch
            .samples
            .iter()
            .filter_map(|s| {
                Some((
                    local_uplink_of(self.paths1(), s.path)?,
                    s.metrics.latency_ms,
                ))
            })
            .collect();
        // The lab's own RTT (userspace WireGuard on a busy host: 1-3 ms) is what the paths of
        // the undelayed uplink measure in the same batch.
        let undelayed: Vec<f64> = latency
            .iter()
            .filter(|(u, _)| *u == 1)
            .map(|(_, ms)| *ms)
            .collect();
        let base = undelayed.iter().sum::<f64>() / undelayed.len().max(1) as f64;
        println!(
            "RTT per path with 60 ms added on site1's uplink 0, as (local uplink, ms): \
             {latency:?}; the lab's own RTT {base:.2} ms"
        );
        ensure!(
            undelayed.len() == 2 && base < 15.0,
            "the paths of the undelayed uplink 1: {latency:?}"
        );
        for (uplink, ms) in &latency {
            ensure!(
                *uplink != 0 || (57.0..=63.0).contains(&(ms - base)),
                "a path of the delayed uplink reports {ms:.2} ms, not 60±3 ms over the lab's \
                 {base:.2} ms: {latency:?}"
            );
        }
        impair(&self.lab, 1, 0, &["--restore"])?;
        for n in 1..=2 {
            self.put(n, |i| i.probe.timeout_ms = 60).await?;
        }
        Ok(())
    }

    /// Step 6: an MTU lowered on site 2's uplink 0 (both ends of its link: 1300 bytes) is
    /// found by both sites: site 1 learns it from the internet's "fragmentation needed"
    /// answers to its full-size probes, site 2 from its own device; each reports 1300 less
    /// WireGuard's 60 bytes on the paths through that uplink and the tunnel's 1420 elsewhere.
    async fn mtu(&self, metrics: &mut async_nats::Subscriber) -> anyhow::Result<()> {
        let before: PathMetricsBatch = next_message(
            metrics,
            tokio::time::Instant::now() + Duration::from_secs(12),
            "metrics batch before the MTU change",
        )
        .await?;
        let by_remote = |batch: &PathMetricsBatch| -> Vec<(u8, u8, Option<u16>)> {
            batch
                .samples
                .iter()
                .filter_map(|s| {
                    let spec = self.paths1().iter().find(|p| p.id == s.path)?;
                    Some((spec.local_uplink, spec.remote_uplink, s.metrics.mtu))
                })
                .collect()
        };
        let unimpaired = by_remote(&before);
        ensure!(
            unimpaired.len() == 4 && unimpaired.iter().all(|(_, _, m)| *m == Some(1420)),
            "before the change every path should report the tunnel's 1420: {unimpaired:?}"
        );
        impair(&self.lab, 2, 0, &["--mtu", "1300"])?;
        let impaired_at = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
        let found = loop {
            let batch: PathMetricsBatch =
                next_message(metrics, deadline, "metrics batch with the lower MTU").await?;
            let mtus = by_remote(&batch);
            if mtus.len() == 4
                && mtus
                    .iter()
                    .all(|(_, remote, m)| *m == Some(if *remote == 0 { 1240 } else { 1420 }))
            {
                break mtus;
            }
        };
        println!(
            "site1 found the 1300-byte MTU on site2's uplink 0 {:?} after it was lowered, as              (local uplink, remote uplink, MTU): {found:?}",
            impaired_at.elapsed()
        );
        self.wait_log(2, "MTU 1240 (was 1420", Duration::from_secs(15))
            .await
            .context("site 2 should find its own uplink's lower MTU")?;
        impair(&self.lab, 2, 0, &["--restore"])?;
        Ok(())
    }

    /// `POST /api/v1/paths/{id}/test` for `path` (`seconds` of active test): the bandwidth
    /// the edge measured, in Mbit/s.
    async fn api_path_test(&self, path: PathId, seconds: u32) -> anyhow::Result<f64> {
        let url = format!("{}/api/v1/paths/{}/test", self.api_url, path.0);
        let token = self.api_token.clone();
        let body: serde_json::Value = tokio::task::spawn_blocking(move || {
            match ureq::post(&url)
                .set("Authorization", &format!("Bearer {token}"))
                .send_json(serde_json::json!({ "duration_s": seconds }))
            {
                Ok(response) => response
                    .into_json::<serde_json::Value>()
                    .context("the path test's answer"),
                Err(ureq::Error::Status(code, response)) => Err(anyhow::anyhow!(
                    "POST {url}: {code} {}",
                    response.into_string().unwrap_or_default()
                )),
                Err(e) => Err(anyhow::anyhow!("POST {url}: {e}")),
            }
        })
        .await??;
        body["metrics"]["bandwidth_mbps"]
            .as_f64()
            .with_context(|| format!("no bandwidth in the path test's answer: {body}"))
    }

    /// Step 7: the operator's on-demand test through the API, end to end (controller → NATS
    /// → site 1's agent → a TCP stream through the path's tunnel into site 2's sink): a path
    /// of uplink 1 limited to 20 Mbit/s measures about that, a path of the unlimited uplink 0
    /// measures far more.
    async fn path_test(&self) -> anyhow::Result<()> {
        let on = |uplink: u8| {
            self.paths1()
                .iter()
                .find(|p| p.local_uplink == uplink)
                .map(|p| p.id)
                .with_context(|| format!("site 1 has no path on uplink {uplink}"))
        };
        impair(&self.lab, 1, 1, &["--rate", "20"])?;
        let limited = self.api_path_test(on(1)?, 3).await;
        impair(&self.lab, 1, 1, &["--restore"])?;
        let limited = limited?;
        let open = self.api_path_test(on(0)?, 3).await?;
        println!(
            "path test through the API: uplink 1 limited to 20 Mbit/s → {limited:.1} Mbit/s; \
             unlimited uplink 0 → {open:.1} Mbit/s"
        );
        ensure!(
            (12.0..=21.0).contains(&limited),
            "a path limited to 20 Mbit/s measured {limited:.1} Mbit/s"
        );
        ensure!(
            open > 2.0 * limited,
            "the unlimited path measured {open:.1} Mbit/s, not clearly above the limited \
             {limited:.1}"
        );
        Ok(())
    }

    /// Step 3: loss on site 1's uplink 0, counted over at least 1,500 probes.
    async fn loss(&self, metrics: &mut async_nats::Subscriber) -> anyhow::Result<()> {
        // The emulator loses `--loss` percent of the packets crossing an uplink, independently
        // in each direction (lab/src/wan.rs). A probe crosses site 1's uplink 0 twice (request
        // out, reply back) and is lost if either crossing drops it: 5 % configured is
        // 1 − 0.95² = 9.75 % of the probes. Counted from the metrics batches' raw probe counts
        // (the 100-probe window is too noisy: its standard error at 9.75 % is 3 points), over
        // batches whose whole 5 s window ran under the loss.
        impair(&self.lab, 1, 0, &["--loss", "5"])?;
        let impaired_at = now_unix_ms();
        let (mut sent, mut lost, mut sent_other, mut lost_other) = (0u64, 0u64, 0u64, 0u64);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while sent < 1500 {
            let batch: PathMetricsBatch =
                next_message(metrics, deadline, "metrics batch under loss").await?;
            if batch.sent_at_unix_ms < impaired_at + 5_200 {
                continue;
            }
            for sample in &batch.samples {
                if self.on_uplink(sample.path, 0) {
                    // 5 s of 20 ms probes: about 250 per path and batch.
                    ensure!(
                        (200..=300).contains(&sample.probes_sent),
                        "{} probes in a 5 s batch at 20 ms probes: {sample:?}",
                        sample.probes_sent
                    );
                    sent += u64::from(sample.probes_sent);
                    lost += u64::from(sample.probes_lost);
                } else {
                    sent_other += u64::from(sample.probes_sent);
                    lost_other += u64::from(sample.probes_lost);
                }
            }
        }
        impair(&self.lab, 1, 0, &["--restore"])?;
        let loss_pct = lost as f64 * 100.0 / sent as f64;
        let other_pct = lost_other as f64 * 100.0 / sent_other.max(1) as f64;
        println!(
            "5 % loss each way on site1's uplink 0: {lost} of {sent} probes lost ({loss_pct:.2} %, \
             expected 9.75 % round trip); uplink 1: {lost_other} of {sent_other} ({other_pct:.2} %)"
        );
        ensure!(
            (7.25..=12.25).contains(&loss_pct),
            "round-trip probe loss {loss_pct:.2} % over {sent} probes is not 9.75 ± 2.5 %"
        );
        ensure!(
            other_pct < 1.0,
            "the unimpaired uplink lost {other_pct:.2} % of its probes"
        );
        Ok(())
    }

    /// Wait until site 1's monitor was rewritten after `since` (views are re-sent, and paths
    /// re-ranked by their latency, on every state change and at least every 10 s) with its
    /// uplink-1 paths at least 5 ms slower than its uplink-0 paths.
    async fn wait_ranked_after(&self, since: u64) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let report = monitor(&self.state(1));
            let ranked = report.as_ref().is_some_and(|r| {
                let latency = |uplink: u64| -> Vec<f64> {
                    r["paths"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| p["local_uplink"] == uplink)
                        .filter_map(|p| p["latency_ms"].as_f64())
                        .collect()
                };
                let (fast, slow) = (latency(0), latency(1));
                r["updated_at_unix_ms"].as_u64().is_some_and(|t| t >= since)
                    && fast.len() == 2
                    && slow.len() == 2
                    && fast.iter().all(|f| slow.iter().all(|s| s - f >= 5.0))
            });
            if ranked {
                return Ok(());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(15),
                "site1's monitor does not rank uplink 0 clearly faster than the delayed \
                 uplink 1: {}",
                report.map_or_else(|| "not written".to_owned(), |r| r.to_string())
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Step 4: failover of a VoIP flow off a cut uplink while a bulk flow stays on the other.
    async fn failover(&self, slow_uplink_since: u64) -> anyhow::Result<()> {
        for n in 1..=2 {
            wait_all_up(&self.state(n), &format!("site{n}"), Duration::from_secs(15)).await?;
        }
        self.wait_ranked_after(slow_uplink_since).await?;
        self.wait_log(
            1,
            "dataplane: 2 policies in 2 classes",
            Duration::from_secs(20),
        )
        .await?;
        self.wait_log(
            2,
            "dataplane: 4 policies in 2 classes",
            Duration::from_secs(20),
        )
        .await?;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                "pl-s2-lan",
                "iperf3",
                "-s",
                "-D",
                "-p",
                "873",
            ])
            .output()?;
        ensure!(out.status.success(), "iperf3 server: {}", text(&out));
        // The VoIP receiver prints its loss as JSON when the one test it serves ends.
        let voip_server = Command::new("ip")
            .args(["netns", "exec", "pl-s2-lan"])
            .args(["iperf3", "-s", "-1", "-J", "-p", "5060"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut events = self
            .subscribe(patronus_proto::subjects::events_subject(
                self.tenant,
                self.site1,
            ))
            .await?;
        let mut flows = self
            .subscribe(patronus_proto::subjects::flows_subject(
                self.tenant,
                self.site1,
            ))
            .await?;
        let prefix = format!("pw{}", &self.site1.0.simple().to_string()[..8]);
        // 625 packets/s of 200 bytes: each lost packet is 1.6 ms of blackout.
        let voip = Command::new("ip")
            .args(["netns", "exec", "pl-s1-lan"])
            .args(["iperf3", "-c", "10.2.0.10", "-p", "5060", "-J"])
            .args(["-u", "-b", "1M", "-l", "200", "-t", "6"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a = tunnel_tx(&prefix)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = tunnel_tx(&prefix)?;
        let voip_alone = growth_by_uplink(&a, &b);
        let (&voip_uplink, &voip_bytes) = voip_alone
            .iter()
            .max_by_key(|(_, g)| **g)
            .context("site1 has no tunnels")?;
        // ~90 kB in 0.5 s with WireGuard's overhead; probes alone send ~8 kB per uplink.
        ensure!(
            voip_bytes > 50_000,
            "the VoIP stream is not in site1's tunnels: {voip_alone:?}"
        );
        ensure!(
            voip_uplink == 0,
            "VoIP should take the lowest-latency uplink 0: {voip_alone:?}"
        );
        let other = 1 - voip_uplink;
        let bulk = Command::new("ip")
            .args(["netns", "exec", "pl-s1-lan"])
            .args(["iperf3", "-c", "10.2.0.10", "-p", "873", "-J"])
            .args(["-b", "4M", "-t", "5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c = tunnel_tx(&prefix)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let d = tunnel_tx(&prefix)?;
        let both = growth_by_uplink(&c, &d);
        println!(
            "site1's tunnel bytes per uplink over 0.5 s: VoIP alone {voip_alone:?}; \
             VoIP and bulk {both:?}"
        );
        ensure!(
            both.get(&other).is_some_and(|g| *g > 120_000),
            "bulk (4 Mbit/s) is not on the cheap uplink {other}: {both:?}"
        );
        ensure!(
            both.get(&voip_uplink).is_some_and(|g| *g < 200_000),
            "bulk shares uplink {voip_uplink} with VoIP: {both:?}"
        );
        // Where the flow reports put both flows before the cut.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let (voip_path, bulk_path) = loop {
            let report: FlowReport =
                next_message(&mut flows, deadline, "flow report with both flows").await?;
            if let (Some(v), Some(b)) = flow_paths(&report) {
                break (v, b);
            }
        };
        ensure!(
            self.on_uplink(voip_path, voip_uplink),
            "the flow report puts VoIP on {voip_path:?}, not on uplink {voip_uplink}"
        );
        ensure!(
            self.on_uplink(bulk_path, other),
            "the flow report puts bulk on {bulk_path:?}, not on uplink {other}"
        );

        // Cut VoIP's uplink while both flows run.
        let cut_at = Instant::now();
        impair(&self.lab, 1, voip_uplink, &["--cut"])?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let (from, to, reason) = loop {
            let envelope: EventEnvelope =
                next_message(&mut events, deadline, "FailoverTriggered event").await?;
            if let SdwanEvent::FailoverTriggered {
                from_path,
                to_path,
                reason,
            } = envelope.event
            {
                // The cut uplink's paths are found down one by one: the first found down
                // makes its siblings suspect, so the class moves to the other uplink at once
                // (reason "uplink suspect" when the VoIP path is the sibling, "path down"
                // when it is the one found first).
                if self.on_uplink(from_path, voip_uplink) && self.on_uplink(to_path, other) {
                    break (from_path, to_path, reason);
                }
            }
        };
        let event_after = cut_at.elapsed();
        ensure!(
            self.on_uplink(to, other)
                && (reason == "path down" || reason.starts_with("uplink suspect")),
            "failover {from} -> {to} ({reason}) does not go to uplink {other} for a down path \
             or its suspect sibling"
        );
        let e = tunnel_tx(&prefix)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let f = tunnel_tx(&prefix)?;
        let after_cut = growth_by_uplink(&e, &f);
        println!("after the cut, site1's tunnel bytes per uplink over 0.5 s: {after_cut:?}");
        ensure!(
            after_cut.get(&voip_uplink).is_some_and(|g| *g < 40_000),
            "traffic still goes into the cut uplink's tunnels: {after_cut:?}"
        );
        // VoIP alone is ~85 kB per 0.5 s in the tunnels; bulk adds more unless it stalls.
        ensure!(
            after_cut.get(&other).is_some_and(|g| *g > 60_000),
            "the VoIP traffic did not continue on uplink {other}'s tunnels: {after_cut:?}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let report: FlowReport =
                next_message(&mut flows, deadline, "flow report with VoIP moved").await?;
            let (Some(v), Some(b)) = flow_paths(&report) else {
                continue;
            };
            if self.on_uplink(v, other) {
                ensure!(
                    b == bulk_path,
                    "the bulk flow moved from {bulk_path} to {b}"
                );
                break;
            }
        }
        impair(&self.lab, 1, voip_uplink, &["--restore"])?;

        let voip_out = tokio::task::spawn_blocking(move || voip.wait_with_output()).await??;
        ensure!(
            voip_out.status.success(),
            "VoIP client: {}",
            text(&voip_out)
        );
        let bulk_out = tokio::task::spawn_blocking(move || bulk.wait_with_output()).await??;
        ensure!(
            bulk_out.status.success(),
            "bulk client: {}",
            text(&bulk_out)
        );
        // Flow hash keeps the bulk flow on one path for its whole life: every flow report
        // sent while it ran (cut, failover, restore, failback hold-down) has it on the same
        // path.
        let mut reports = 0;
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(200), flows.next()).await
        {
            let report: FlowReport = patronus_proto::codec::decode(&message.payload)?;
            if let (_, Some(b)) = flow_paths(&report) {
                reports += 1;
                ensure!(
                    b == bulk_path,
                    "the flow-hashed bulk flow moved from {bulk_path} to {b} during its life"
                );
            }
        }
        ensure!(
            reports >= 2,
            "only {reports} flow reports after the failover had the bulk flow"
        );
        let server_out =
            tokio::task::spawn_blocking(move || voip_server.wait_with_output()).await??;
        let server: serde_json::Value = serde_json::from_slice(&server_out.stdout)
            .with_context(|| format!("the VoIP server printed no JSON: {}", text(&server_out)))?;
        let sum = &server["end"]["sum"];
        let (Some(lost_packets), Some(packets)) =
            (sum["lost_packets"].as_u64(), sum["packets"].as_u64())
        else {
            anyhow::bail!("no packet counts in the VoIP server's report: {sum}");
        };
        let blackout_ms = lost_packets as f64 * 1.6;
        println!(
            "failover: FailoverTriggered {event_after:?} after the cut; the VoIP receiver lost \
             {lost_packets} of {packets} packets ({} %) = {blackout_ms:.0} ms of blackout at \
             625 packets/s",
            sum["lost_percent"]
        );
        ensure!(packets > 2_000, "the VoIP stream barely ran: {sum}");
        ensure!(
            lost_packets > 0,
            "the cut never touched the VoIP stream: {sum}"
        );
        ensure!(
            blackout_ms < 1000.0,
            "VoIP lost {lost_packets} packets ({blackout_ms:.0} ms) to the cut; 20 ms probes \
             should fail over in ~100-150 ms"
        );
        Ok(())
    }

    /// `patronus-edge probe ... --json` from site 1's router to site 2.
    fn probe(&self, extra: &[&str]) -> anyhow::Result<(Output, serde_json::Value)> {
        let state = self.state(1);
        let mut args = vec!["probe", "--state-dir", state.to_str().context("path")?];
        args.extend([
            "--peer",
            "site2",
            "--count",
            "5",
            "--interval-ms",
            "20",
            "--json",
        ]);
        args.extend_from_slice(extra);
        let out = in_ns("pl-s1", &self.edge, &args)?;
        let summary = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("probe {extra:?} printed no JSON: {}", text(&out)))?;
        Ok((out, summary))
    }

    /// Step 5: an operator's probes from site 1's router: good ones are answered; the peer
    /// drops and counts badly signed, unsigned and replayed ones.
    async fn probe_security(&self) -> anyhow::Result<()> {
        wait_all_up(&self.state(1), "site1", Duration::from_secs(15)).await?;
        let before = monitor(&self.state(2));
        let log_before = self.log(1).len();
        let (out, good) = self.probe(&[])?;
        ensure!(out.status.success(), "probe: {}", text(&out));
        println!("patronus-edge probe site1 → site2: {good}");
        let rtts: Vec<f64> = good["results"]
            .as_array()
            .context("no results")?
            .iter()
            .filter_map(|r| r["rtt_ms"].as_f64())
            .collect();
        ensure!(
            good["sent"] == 5
                && good["received"] == 5
                && rtts.len() == 5
                && rtts.iter().all(|r| *r > 0.0 && *r < 50.0),
            "good probes were not all answered with an RTT: {good}"
        );
        ensure!(
            good["interface"]
                .as_str()
                .is_some_and(|i| i.ends_with("-00")),
            "the default path is not (0, 0): {good}"
        );
        // What an operator reads without --json: ping-like lines and a summary.
        let state = self.state(1);
        let out = in_ns(
            "pl-s1",
            &self.edge,
            &[
                "probe",
                "--state-dir",
                state.to_str().context("path")?,
                "--peer",
                "site2",
                "--count",
                "2",
                "--interval-ms",
                "100",
            ],
        )?;
        let lines = text(&out);
        ensure!(
            out.status.success()
                && lines.matches("reply from site2 (").count() == 2
                && lines.contains("2 sent, 2 answered, 0.0 % lost; rtt min/avg/max = "),
            "probe's text output: {lines}"
        );
        let (_, bad) = self.probe(&["--bad-key"])?;
        ensure!(
            bad["sent"] == 5 && bad["received"] == 0,
            "probes signed with a wrong key were answered: {bad}"
        );
        let (_, unsigned) = self.probe(&["--unsigned"])?;
        ensure!(
            unsigned["sent"] == 5 && unsigned["received"] == 0,
            "unsigned probes were answered: {unsigned}"
        );
        let (out, replay) = self.probe(&["--replay", "--uplink", "1", "--remote-uplink", "1"])?;
        ensure!(
            out.status.success()
                && replay["received"] == 5
                && replay["interface"]
                    .as_str()
                    .is_some_and(|i| i.ends_with("-11")),
            "the first copy of each replayed probe was not answered on (1, 1): {replay}"
        );
        // monitor.json is rewritten when a view changes and at least every 10 s.
        let started = Instant::now();
        loop {
            let after = monitor(&self.state(2));
            let rose: Vec<(&str, u64, u64)> = ["bad_signature", "unsigned", "replayed"]
                .iter()
                .map(|r| (*r, drops(&before, r), drops(&after, r)))
                .collect();
            if rose.iter().all(|(_, was, now)| *now >= was + 5) {
                println!(
                    "site2's probe drop counters (reason, before, after): {rose:?}, seen \
                     after {:?}",
                    started.elapsed()
                );
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(15),
                "site2's drop counters did not rise by 5 each: {rose:?}; {}",
                after.map_or_else(String::new, |a| a["drops"].to_string())
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The operator's probes (their own sequences, from another clock) did not disturb the
        // peer's replay windows for the agent's probes: no path of site 1 went down since.
        let since = self.log(1).get(log_before..).unwrap_or_default().to_owned();
        ensure!(
            !since.contains("-> Down"),
            "a path went down while the operator probed: {since}"
        );
        Ok(())
    }
}

/// The paths of the VoIP data flow (UDP to 5060) and of the bulk data flow (the busiest TCP
/// flow to 873; iperf3's control connection is another) in a flow report.
fn flow_paths(report: &FlowReport) -> (Option<PathId>, Option<PathId>) {
    let find = |protocol: u8, port: u16| {
        report
            .flows
            .iter()
            .filter(|f| f.key.protocol == protocol && f.key.dst_port == port)
            .max_by_key(|f| f.bytes_tx)
            .and_then(|f| f.path)
    };
    (find(17, 5060), find(6, 873))
}

/// Enroll both sites, start their agents (heartbeats every second, so flow reports follow a
/// failover closely) and wait for LAN-to-LAN traffic.
async fn bring_up(
    dir: &Path,
    edge: &Path,
    controller_url: &str,
    tokens: &[String],
    agents: &mut Agents,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (n, token) in (1u8..).zip(tokens) {
        enroll_site(
            edge,
            controller_url,
            token,
            n,
            &dir.join(format!("site{n}")),
        )?;
    }
    let config = dir.join("edge.toml");
    std::fs::write(&config, "[agent]\nheartbeat_interval_s = 1\n")?;
    for n in 1..=2u8 {
        let log = std::fs::File::create(dir.join(format!("run{n}.log")))?;
        agents.0.push(
            Command::new("ip")
                .args(["netns", "exec", &format!("pl-s{n}")])
                .arg(edge)
                .arg("--config")
                .arg(&config)
                .args(["run", "--state-dir"])
                .arg(dir.join(format!("site{n}")))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        );
    }
    let started = Instant::now();
    while !lan_ping()? {
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "LAN 1 never reached LAN 2 through the tunnels"
        );
    }
    Ok(())
}

/// Both sites' intents as the controller published them, with 20 ms probes on every path
/// asked for by the VoIP policy (the site's own interval stays 1 s; timeout 60 ms, down after
/// 3 lost), a 2 s failback hold-down (the default 10 s would make the test long),
/// uplink 1 cheaper than uplink 0, VoIP (UDP 5060) on the lowest-latency path, active-backup,
/// and bulk (TCP 873) on the cheapest uplink, hashed over its paths.
/// Site 2 gets the same classes for the replies (matched on source ports): traffic no policy
/// matches takes the main table's default path, the lowest (l, r), which no failover rewrites,
/// so without them the bulk flow's ACKs would die with site 1's uplink 0.
async fn monitored_intents(
    link: &patronus_controller::nats::TenantLink,
    tenant: patronus_proto::TenantId,
    sites: [SiteId; 2],
) -> anyhow::Result<BTreeMap<u8, SiteIntent>> {
    let mut intents = BTreeMap::new();
    for (n, site) in (1u8..).zip(sites) {
        let key = patronus_proto::subjects::intent_key(tenant, site);
        let entry = link
            .intents
            .get(key)
            .await?
            .with_context(|| format!("no intent published for site{n}"))?;
        let mut intent: SiteIntent = patronus_proto::codec::decode(&entry)?;
        ensure!(
            intent.peers.len() == 1 && intent.paths.len() == 4,
            "site{n}'s intent should have 1 peer and 4 paths, not {} and {}",
            intent.peers.len(),
            intent.paths.len()
        );
        ensure!(
            intent.probe.interval_ms == 1000,
            "the site's own probe interval should be the default 1 s"
        );
        intent.probe.timeout_ms = 60;
        intent.probe.down_after_losses = 3;
        intent.failover.failback_hold_down_ms = 2000;
        intent.uplinks[0].cost_per_gb = 5.0;
        intent.uplinks[1].cost_per_gb = 0.0;
        use LoadBalancing::{ActiveBackup, FlowHash};
        use PathPreference::{LowestCost, LowestLatency};
        intent.policies.routing = vec![
            policy(1, "voip", 17, Some(5060), None, LowestLatency, ActiveBackup),
            policy(2, "bulk", 6, Some(873), None, LowestCost, FlowHash),
        ];
        if n == 2 {
            intent.policies.routing.extend([
                policy(3, "voip", 17, None, Some(5060), LowestLatency, ActiveBackup),
                policy(4, "bulk", 6, None, Some(873), LowestCost, FlowHash),
            ]);
        }
        intents.insert(n, intent);
    }
    Ok(intents)
}

fn site_id(state: &Path) -> anyhow::Result<SiteId> {
    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("identity.json"))?)?;
    Ok(identity["site_id"]
        .as_str()
        .context("no site id in identity.json")?
        .parse()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_probe_their_paths_fail_over_a_cut_uplink_and_drop_forged_probes(
) -> anyhow::Result<()> {
    patronus_test_support::lab::require_root()?;
    let test_started = Instant::now();
    let lab = binary("patronus-lab")?;
    let edge = binary("patronus-edge")?;

    let env = TestEnv::load()?;
    let lab_controller = LabController::start(&env).await?;
    let tenant = lab_controller.tenant;
    let mut tokens = Vec::new();
    for n in 1..=2 {
        tokens.push(
            lab_controller
                .token(&format!("site{n}"), &format!("10.{n}.0.0/24"))
                .await?,
        );
    }
    let out = Command::new(&lab)
        .args(["up", "--sites", "2", "--uplinks", "2"])
        .args(lab_controller.relay_args())
        .output()?;
    ensure!(out.status.success(), "lab up: {}", text(&out));
    let dir =
        std::env::temp_dir().join(format!("patronus-lab-monitor-{}", Uuid::new_v4().simple()));
    let mut agents = Agents(Vec::new());
    let result = async {
        let url = lab_controller.url_in_lab();
        bring_up(&dir, &edge, &url, &tokens, &mut agents).await?;
        let sites = [site_id(&dir.join("site1"))?, site_id(&dir.join("site2"))?];
        let reader = patronus_controller::server::AppState::connect(&lab_controller.config).await?;
        let link = reader.tenant_nats(tenant).await?;
        let intents = monitored_intents(&link, tenant, sites).await?;
        let mut lab = Lab {
            lab: lab.clone(),
            edge: edge.clone(),
            dir: dir.clone(),
            tenant,
            link,
            site1: sites[0],
            intents,
            api_url: lab_controller.controller.url.clone(),
            api_token: lab_controller.api_token().await?,
        };
        let put_at = Instant::now();
        for n in 1..=2 {
            lab.put(n, |_| {}).await?;
        }

        // 1. Every path of site 1 is up and measured.
        wait_all_up(&lab.state(1), "site1", Duration::from_secs(5)).await?;
        println!(
            "site1's monitor shows 4 paths up and measured {:?} after the 20 ms probe intent \
             was put",
            put_at.elapsed()
        );
        let mut metrics = lab
            .subscribe(patronus_proto::subjects::metrics_subject(tenant, sites[0]))
            .await?;
        lab.delay(&mut metrics).await?;
        // For step 4: uplink 1 gets 10 ms more RTT (an LTE-like link), so the VoIP class
        // ranks uplink 0's paths first by a clear margin and the cut below hits the VoIP
        // flow's uplink. Set now, so the views sent during step 3 carry it.
        impair(&lab.lab, 1, 1, &["--delay", "10"])?;
        let slow_since = now_unix_ms() + 500;
        lab.loss(&mut metrics).await?;
        drop(metrics);
        lab.failover(slow_since).await?;
        impair(&lab.lab, 1, 1, &["--restore"])?;
        lab.probe_security().await?;
        // Last: site 1's kernel keeps a learnt path MTU for 10 minutes, past the restore.
        let mut metrics = lab
            .subscribe(patronus_proto::subjects::metrics_subject(tenant, sites[0]))
            .await?;
        lab.mtu(&mut metrics).await?;
        lab.path_test().await?;
        println!("lab_monitor ran in {:?}", test_started.elapsed());
        drop(lab);
        drop(reader);
        anyhow::Ok(())
    }
    .await;
    drop(agents);
    let down = Command::new(&lab).arg("down").output()?;
    let stopped = lab_controller.stop().await;
    if result.is_err() {
        print_agent_logs(&dir, 2);
    }
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    ensure!(down.status.success(), "lab down: {}", text(&down));
    stopped
}

/// Wall-clock milliseconds (what the agents stamp their batches and reports with).
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
