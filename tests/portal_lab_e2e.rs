//! The operator portal against a real lab, in headless Chromium: the real controller
//! (`LabController`), `patronus-lab up` with two sites of two uplinks each, and real agents.
//!
//! One test (the lab's namespaces are one shared resource), in steps:
//! 1. an operator of the lab's tenant signs in through the form;
//! 2. creates a routing policy through the policy form; the policies page lists it and
//!    `GET /api/v1/policies` returns it;
//! 3. with site 1 enrolled and running, keeps the overview open (no reload) while, in a
//!    second window, the onboarding form makes a token for a new site; lab site 2 enrolls
//!    with it and starts its agent; the overview shows the new site, active, by itself;
//! 4. with every path up, keeps site 1's page and the events page open while site 1's
//!    uplink 0 is cut: site 1's page shows a path of uplink 0 down, the events page a
//!    `failover_triggered` event of a path through that uplink, neither
//!    reloaded; the uplink is restored;
//! 5. the path page of the failed path draws its charts.
//!
//! Screenshots (`lab-*.png`, and `failed-portal-lab.png` of the page a failure ended on) go
//! to `patronus_test_support::browser::screenshot_dir()`.
//!
//! Run as root, under the lab lock: `flock /run/patronus-lab.lock cargo test --test
//! portal_lab_e2e`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use patronus_test_support::browser::fantoccini::wd::WindowHandle;
use patronus_test_support::browser::Browser;
use patronus_test_support::http::call;
use patronus_test_support::lab::{
    binary, enroll_site, impair, print_agent_logs, text, Agents, LabController,
};
use patronus_test_support::TestEnv;
use serde_json::Value;
use uuid::Uuid;

/// The operator's password.
const PASSWORD: &str = "a long enough password";
/// How long a page may take to show what a step waits for, when nothing slow is behind it.
const WAIT: Duration = Duration::from_secs(15);
/// Site 1's name (its token comes from `LabController::token`).
const SITE1: &str = "lab-hq";
/// The site the onboarding form creates, enrolled as lab site 2.
const SITE2: &str = "portal-branch";
/// The policy the form creates.
const POLICY: &str = "portal-voip";
/// A property set on a page's `window`: still there means the page was never reloaded or
/// left.
const MARKER: &str = "__patronusPortalLab";

/// What the steps share.
struct Run<'a> {
    b: &'a Browser,
    lab: PathBuf,
    edge: PathBuf,
    dir: PathBuf,
    /// The controller as the browser and the test reach it (`http://127.0.0.1:<port>`).
    url: String,
    /// The controller as the lab's sites reach it.
    lab_url: String,
    tenant: Uuid,
    api_token: String,
    email: String,
}

impl Run<'_> {
    /// `http://127.0.0.1:<port>/portal/t/<tenant>/<rest>`
    fn page(&self, rest: &str) -> String {
        format!("{}/portal/t/{}/{rest}", self.url, self.tenant)
    }

    /// `GET /api/v1/<rest>` with the tenant admin's API token; the body, when 200.
    fn api_get(&self, rest: &str) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1/{rest}", self.url);
        let (status, body) = call("GET", &url, Some(&self.api_token), None);
        ensure!(status == 200, "GET {url}: {status}: {body}");
        Ok(body)
    }

    /// Enroll lab site `n` with `token` (its two uplinks, as the other lab tests do).
    fn enroll(&self, n: u8, token: &str) -> anyhow::Result<()> {
        enroll_site(
            &self.edge,
            &self.lab_url,
            token,
            n,
            &self.dir.join(format!("site{n}")),
        )
    }

    /// Start site `n`'s agent, its log in `run<n>.log`.
    fn start_agent(&self, n: u8, agents: &mut Agents) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("run{n}.log")))?;
        agents.0.push(
            Command::new("ip")
                .args(["netns", "exec", &format!("pl-s{n}")])
                .arg(&self.edge)
                .args(["run", "--state-dir"])
                .arg(self.dir.join(format!("site{n}")))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting site{n}'s agent"))?,
        );
        Ok(())
    }

    /// Open a new browser window and make it the current one.
    async fn new_window(&self) -> anyhow::Result<WindowHandle> {
        let window = self
            .b
            .client()
            .new_window(false)
            .await
            .context("opening a browser window")?
            .handle;
        self.switch_to(&window).await?;
        Ok(window)
    }

    async fn switch_to(&self, window: &WindowHandle) -> anyhow::Result<()> {
        self.b
            .client()
            .switch_to_window(window.clone())
            .await
            .context("switching browser windows")
    }

    /// Open a live page, wait for its WebSocket and mark its `window`.
    async fn open_live(&self, rest: &str, ready: &str) -> anyhow::Result<()> {
        let url = self.page(rest);
        self.b.goto(&url).await?;
        self.b.wait_for(ready, WAIT).await?;
        self.b
            .wait_for("body[data-live=\"1\"][data-live-connected=\"1\"]", WAIT)
            .await
            .with_context(|| format!("{url}'s live WebSocket never opened"))?;
        self.b
            .client()
            .execute(&format!("window.{MARKER} = true;"), vec![])
            .await
            .context("marking the page")?;
        Ok(())
    }

    /// Whether the current page is still the one [`Run::open_live`] marked (never reloaded or
    /// left), its WebSocket open and its live part re-rendered at least once.
    async fn check_not_reloaded(&self, what: &str) -> anyhow::Result<()> {
        let state = self
            .b
            .client()
            .execute(
                &format!(
                    "return [window.{MARKER} === true, document.body.dataset.liveConnected || '', \
                     document.body.dataset.liveUpdated || ''];"
                ),
                vec![],
            )
            .await
            .context("reading the page's state")?;
        ensure!(
            state[0] == true,
            "{what} was reloaded or left (its window lost the marker): {state}"
        );
        ensure!(
            state[1] == "1",
            "{what}'s live WebSocket is not open: {state}"
        );
        ensure!(
            state[2].as_str().is_some_and(|s| !s.is_empty()),
            "{what}'s live part was never re-rendered, so what it shows came with the page: \
             {state}"
        );
        Ok(())
    }

    async fn screenshot(&self, name: &str) -> anyhow::Result<()> {
        let path = self.b.screenshot(name).await?;
        println!("screenshot: {}", path.display());
        Ok(())
    }

    // ---- 1 ------------------------------------------------------------------------------

    async fn sign_in(&self) -> anyhow::Result<()> {
        self.b
            .sign_in(&self.url, &self.email, PASSWORD, WAIT)
            .await?;
        let landed = self.b.current_url().await?;
        ensure!(
            landed == self.page(""),
            "the lab tenant's operator landed on {landed}, not its tenant's overview {}",
            self.page("")
        );
        Ok(())
    }

    // ---- 2 ------------------------------------------------------------------------------

    async fn create_policy(&self) -> anyhow::Result<()> {
        let b = self.b;
        b.goto(&self.page("policies")).await?;
        b.wait_for("table#policies", WAIT).await?;
        b.click("a[href$=\"/policies/new\"]").await?;
        b.wait_for("form#policy-form", WAIT).await?;
        b.fill("name", POLICY).await?;
        b.fill("priority", "200").await?;
        b.fill("app_class", "voip").await?;
        for (select, value) in [
            ("protocol", "udp"),
            ("path_preference", "lowest_latency"),
            ("load_balancing", "active_backup"),
        ] {
            b.expect(&format!("form#policy-form select[name={select}]"))
                .await?
                .select_by_value(value)
                .await
                .with_context(|| format!("choosing {value} in {select}"))?;
        }
        b.fill("dst_ports", "5060").await?;
        b.fill("max_latency_ms", "150").await?;
        ensure!(
            b.find("form#policy-form input[name=enabled]:checked")
                .await?
                .is_some(),
            "a new policy's form is not enabled by default"
        );
        b.click("form#policy-form button[type=submit]").await?;
        b.wait_for("table#policies tr[data-policy-id]", WAIT)
            .await
            .context("saving the policy form")?;
        ensure!(
            b.current_url().await? == self.page("policies"),
            "saving the policy form did not land on the policies page"
        );
        let rows = snapshot(b, "table#policies tr[data-policy-id]").await?;
        let row = rows
            .iter()
            .find(|r| {
                r.cell("policy-name")
                    .is_some_and(|(_, name)| name == POLICY)
            })
            .with_context(|| format!("the policies page does not list {POLICY}: {rows:?}"))?;
        let id = row.data["policyId"]
            .as_str()
            .context("the policy's row has no id")?
            .to_owned();
        let text_of = |class: &str| row.cell(class).map_or("", |(_, t)| t.as_str());
        ensure!(
            text_of("policy-enabled") == "yes",
            "{POLICY} is listed as not enabled: {row:?}"
        );
        let summary = text_of("policy-summary");
        for want in [
            "voip",
            "udp",
            "5060",
            "lowest latency",
            "active backup",
            "150",
        ] {
            ensure!(
                summary.contains(want),
                "{POLICY}'s summary lacks {want:?}: {summary:?}"
            );
        }
        self.screenshot("lab-policies").await?;

        let policies = self.api_get("policies")?;
        let api = policies["items"]
            .as_array()
            .and_then(|items| items.iter().find(|p| p["id"] == id.as_str()))
            .with_context(|| format!("GET /api/v1/policies lacks {POLICY} ({id}): {policies}"))?;
        ensure!(
            api["name"] == POLICY
                && api["kind"] == "routing"
                && api["priority"] == 200
                && api["enabled"] == true,
            "the API returns {POLICY} as {api}"
        );
        let spec = &api["spec"];
        ensure!(
            spec["app_class"] == "voip"
                && spec["match"]["protocol"] == "udp"
                && spec["match"]["dst_ports"]
                    == serde_json::json!([{ "start": 5060, "end": 5060 }])
                && spec["path_preference"]["kind"] == "lowest_latency"
                && spec["load_balancing"] == "active_backup"
                && spec["sla"]["max_latency_ms"] == 150.0,
            "the API returns {POLICY}'s spec as {spec}, not what the form said"
        );
        println!("policy {POLICY} ({id}) created through the form: {spec}");
        Ok(())
    }

    // ---- 3 ------------------------------------------------------------------------------

    /// Create site 2's token on the onboarding page (in the current window); the token from
    /// the command it shows.
    async fn onboarding_token(&self) -> anyhow::Result<String> {
        let b = self.b;
        b.goto(&self.page("onboarding")).await?;
        b.wait_for("form#token-form", WAIT).await?;
        b.fill("site_name", SITE2).await?;
        b.fill("lan_prefixes", "10.2.0.0/24").await?;
        b.fill("expires_in_hours", "1").await?;
        b.click("form#token-form button[type=submit]").await?;
        let command = b
            .wait_for("pre#enroll-command", WAIT)
            .await
            .context("submitting the token form")?
            .text()
            .await?;
        self.screenshot("lab-onboarding").await?;
        // The controller as the browser reached it; the lab's site reaches it at the
        // management address instead (the relay), so only that word changes below.
        patronus_test_support::lab::enroll_command_token(&command, &self.url)
    }

    async fn onboard_site2(&self, agents: &mut Agents) -> anyhow::Result<Uuid> {
        let b = self.b;
        let overview = b.client().window().await?;
        self.open_live("", "table#sites").await?;
        let names: Vec<String> = snapshot(b, "table#sites tr[data-site-id]")
            .await?
            .iter()
            .filter_map(|row| row.cell("site-name").map(|(_, name)| name.clone()))
            .collect();
        ensure!(
            names == [SITE1],
            "before onboarding the overview lists {names:?}, not site 1 alone"
        );

        // The onboarding form in a window of its own: the overview stays as it is.
        self.new_window().await?;
        let token = self.onboarding_token().await?;
        b.client().close_window().await?;
        self.switch_to(&overview).await?;

        let enrolled_at = Instant::now();
        self.enroll(2, &token)?;
        let site2 = site_id(&self.dir.join("site2"))?;
        self.start_agent(2, agents)?;

        // The new site's row, active, on the page opened before the token existed.
        let deadline = Instant::now() + WAIT;
        loop {
            let rows = snapshot(b, "table#sites tr[data-site-id]").await?;
            let row = rows
                .iter()
                .find(|r| r.data["siteId"] == site2.to_string().as_str());
            if let Some(row) = row {
                let name = row.cell("site-name").map(|(_, t)| t.as_str());
                ensure!(name == Some(SITE2), "site 2's row is named {name:?}");
                if row.cell("state-active").is_some() {
                    break;
                }
            }
            if Instant::now() > deadline {
                let rows: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
                bail!(
                    "the open overview never showed {SITE2} ({site2}) active within {WAIT:?} of \
                     its enrollment: {rows:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "enrolled {SITE2} → its row, active, on the open overview after {:?}",
            enrolled_at.elapsed()
        );
        self.check_not_reloaded("the overview").await?;
        // Site 1's agent has been reporting since before the page opened: it was seen.
        let rows = snapshot(b, "table#sites tr[data-site-id]").await?;
        let seen = rows
            .iter()
            .find(|r| r.cell("site-name").is_some_and(|(_, name)| name == SITE1))
            .and_then(|r| r.cell("last-seen"))
            .map(|(_, text)| text.clone());
        ensure!(
            seen.as_deref().is_some_and(|t| t.ends_with("ago")),
            "site 1's last-seen cell says {seen:?}, not a recent time"
        );
        self.screenshot("lab-overview-live-site").await?;
        Ok(site2)
    }

    // ---- 4 ------------------------------------------------------------------------------

    /// Wait until the API shows site 1's 4 paths up.
    async fn wait_paths_up(&self, site1: Uuid) -> anyhow::Result<Vec<Value>> {
        let started = Instant::now();
        let limit = Duration::from_secs(60);
        loop {
            let body = self.api_get(&format!("paths?site={site1}"))?;
            let paths: Vec<Value> = body["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p["src_site_id"] == site1.to_string().as_str())
                .collect();
            if paths.len() == 4 && paths.iter().all(|p| p["status"] == "up") {
                println!("site 1's 4 paths up after {:?}", started.elapsed());
                return Ok(paths);
            }
            ensure!(
                started.elapsed() < limit,
                "site 1's paths were not all up within {limit:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Cut site 1's uplink 0 with its page and the events page open; both show it live.
    /// Returns a path of uplink 0 the site page shows down.
    async fn cut_uplink(&self, site1: Uuid) -> anyhow::Result<Uuid> {
        let b = self.b;
        let paths = self.wait_paths_up(site1).await?;
        // Every path through site 1's uplink 0, either way (site 2 reports its own).
        let all = self.api_get("paths")?;
        let through_cut: Vec<String> = all["items"]
            .as_array()
            .context("path list")?
            .iter()
            .filter(|p| {
                (p["src_site_id"] == site1.to_string().as_str() && p["src_uplink"] == 0)
                    || (p["dst_site_id"] == site1.to_string().as_str() && p["dst_uplink"] == 0)
            })
            .filter_map(|p| p["id"].as_str())
            .map(|id| id.replace('-', "")[..8].to_owned())
            .collect();
        ensure!(
            through_cut.len() == 4,
            "4 paths should go through site 1's uplink 0: {all}"
        );
        let uplink0: Vec<String> = paths
            .iter()
            .filter(|p| p["src_uplink"] == 0)
            .filter_map(|p| p["id"].as_str().map(str::to_owned))
            .collect();

        let site_page = b.client().window().await?;
        self.open_live(&format!("sites/{site1}"), "table#paths")
            .await?;
        let rows = snapshot(b, "table#paths tr[data-path-id]").await?;
        ensure!(rows.len() == 4, "site 1's page lists {} paths", rows.len());
        let events_page = self.new_window().await?;
        self.open_live("events", "ul#events").await?;
        let failure_events = "ul#events li.event-failover_triggered";
        let before = snapshot(b, failure_events).await?.len();

        // A failover is the data plane moving a class off a path: wait until site 1's data
        // plane is attached and holds the portal's policy (the agent attaches it once applying
        // has been quiet for 2 s).
        let log_path = self.dir.join("run1.log");
        let attached = Instant::now();
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.lines().any(|l| {
                l.starts_with("dataplane: ")
                    && l.contains(" policies in ")
                    && !l.starts_with("dataplane: 0 policies")
            }) {
                break;
            }
            ensure!(
                attached.elapsed() < Duration::from_secs(60),
                "site 1's data plane never took the portal's policy within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let cut_at = Instant::now();
        impair(&self.lab, 1, 0, &["--cut"])?;

        self.switch_to(&site_page).await?;
        let limit = Duration::from_secs(40);
        let down = loop {
            let rows = snapshot(b, "table#paths tr[data-path-id]").await?;
            let down = rows.iter().find(|r| {
                r.data["pathId"]
                    .as_str()
                    .is_some_and(|id| uplink0.iter().any(|u| u == id))
                    && r.cell("path-status").is_some_and(|(class, text)| {
                        class.split_whitespace().any(|c| c == "status-down") && text == "down"
                    })
            });
            if let Some(row) = down {
                break row.data["pathId"].as_str().unwrap_or_default().to_owned();
            }
            if cut_at.elapsed() > limit {
                let rows: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
                bail!(
                    "site 1's open page showed no path of uplink 0 down within {limit:?} of the \
                     cut; paths: {rows:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!(
            "cut site 1's uplink 0 → path {down} down on its open page after {:?}",
            cut_at.elapsed()
        );
        self.check_not_reloaded("site 1's page").await?;
        self.screenshot("lab-site-path-down").await?;

        self.switch_to(&events_page).await?;
        let line = loop {
            let lines = snapshot(b, failure_events).await?;
            if lines.len() > before {
                if let Some(hit) = lines.iter().find(|l| {
                    through_cut
                        .iter()
                        .any(|short| l.text.contains(short.as_str()))
                }) {
                    break hit.text.clone();
                }
            }
            if cut_at.elapsed() > limit {
                let lines: Vec<String> = snapshot(b, "ul#events li")
                    .await?
                    .into_iter()
                    .map(|l| format!("{}: {}", l.class, l.text))
                    .collect();
                bail!(
                    "the open events page showed no failover_triggered event of a path through \
                     the cut uplink ({through_cut:?}) within {limit:?}: {lines:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!(
            "… and {line:?} on the open events page after {:?}",
            cut_at.elapsed()
        );
        self.check_not_reloaded("the events page").await?;
        self.screenshot("lab-events-failover").await?;
        b.client().close_window().await?;
        self.switch_to(&site_page).await?;

        impair(&self.lab, 1, 0, &["--restore"])?;
        Ok(down.parse()?)
    }

    // ---- 5 ------------------------------------------------------------------------------

    /// The path page draws its four charts from the samples the edges reported: over the
    /// default hour (one-minute buckets: one point, for a path this young) and over the last
    /// 15 minutes (5 s buckets: a line; the page is not live, so it is reloaded until the
    /// next batches are in).
    async fn path_page(&self, path: Uuid) -> anyhow::Result<()> {
        let b = self.b;
        let hour = self.page(&format!("paths/{path}"));
        let points = chart_points(b, &hour).await?;
        ensure!(
            points.iter().all(|(_, n)| *n >= 1),
            "{hour}: a chart without its samples (points per chart, -1: missing): {points:?}"
        );
        let recent = self.page(&format!("paths/{path}?range=15m"));
        let started = Instant::now();
        let limit = Duration::from_secs(25);
        loop {
            let points = chart_points(b, &recent).await?;
            if points.iter().all(|(_, n)| *n >= 3) {
                println!("{recent}: points per chart {points:?}");
                break;
            }
            ensure!(
                started.elapsed() < limit,
                "{recent}: fewer than 3 points on a chart after {limit:?} (points per chart, -1: \
                 missing): {points:?}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        self.screenshot("lab-path-charts").await?;
        Ok(())
    }
}

/// Open a path page; the number of points each of its four charts draws (-1: no such chart).
async fn chart_points(b: &Browser, url: &str) -> anyhow::Result<Vec<(String, i64)>> {
    b.goto(url).await?;
    b.wait_for("#path-status", WAIT).await?;
    let points = b
        .client()
        .execute(
            "return ['chart-latency', 'chart-jitter', 'chart-loss', 'chart-score'].map((id) => {
               const chart = document.querySelector('div.charts svg#' + id);
               if (!chart) return [id, -1];
               const line = chart.querySelector('polyline.series');
               return [id, line ? line.getAttribute('points').trim().split(/\\s+/).length : 0];
             });",
            vec![],
        )
        .await
        .with_context(|| format!("reading the charts of {url}"))?;
    Ok(serde_json::from_value(points)?)
}

fn site_id(state: &Path) -> anyhow::Result<Uuid> {
    let identity: Value = serde_json::from_slice(&std::fs::read(state.join("identity.json"))?)?;
    Ok(identity["site_id"]
        .as_str()
        .context("no site id in identity.json")?
        .parse()?)
}

/// An element of a live page as read in one go.
#[derive(Debug)]
struct Snap {
    /// Its `data-*` attributes.
    data: Value,
    class: String,
    text: String,
    /// `(class, text)` of each of its `td`s.
    cells: Vec<(String, String)>,
}

impl Snap {
    fn cell(&self, class: &str) -> Option<&(String, String)> {
        self.cells
            .iter()
            .find(|(c, _)| c.split_whitespace().any(|c| c == class))
    }
}

/// Every element matching `css`, read by one script: on a live page `#live` is re-rendered
/// whenever an event arrives, which makes element handles from an earlier command stale.
async fn snapshot(b: &Browser, css: &str) -> anyhow::Result<Vec<Snap>> {
    let read = b
        .client()
        .execute(
            "return Array.from(document.querySelectorAll(arguments[0])).map((e) => ({
               data: Object.assign({}, e.dataset),
               class: e.className,
               text: e.innerText.trim(),
               cells: Array.from(e.querySelectorAll('td'))
                 .map((c) => [c.className, c.innerText.trim()]),
             }));",
            vec![Value::from(css)],
        )
        .await
        .with_context(|| format!("reading {css}"))?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    Ok(read
        .as_array()
        .with_context(|| format!("reading {css}: {read}"))?
        .iter()
        .map(|e| Snap {
            data: e["data"].clone(),
            class: text(&e["class"]),
            text: text(&e["text"]),
            cells: e["cells"]
                .as_array()
                .map(|cells| cells.iter().map(|c| (text(&c[0]), text(&c[1]))).collect())
                .unwrap_or_default(),
        })
        .collect())
}

async fn steps(run: &Run<'_>, site1_token: &str, agents: &mut Agents) -> anyhow::Result<()> {
    run.sign_in().await?;
    run.create_policy().await?;
    // Site 1 first, so the new site has a peer and paths.
    run.enroll(1, site1_token)?;
    run.start_agent(1, agents)?;
    let site1 = site_id(&run.dir.join("site1"))?;
    run.onboard_site2(agents).await?;
    let down = run.cut_uplink(site1).await?;
    run.path_page(down).await
}

#[tokio::test(flavor = "multi_thread")]
async fn portal_shows_a_lab_site_joining_and_an_uplink_failing_live() -> anyhow::Result<()> {
    patronus_test_support::lab::require_root()?;
    let started = Instant::now();
    let lab = binary("patronus-lab")?;
    let edge = binary("patronus-edge")?;
    // The browser first: without Chromium the test fails at once, saying to run setup.
    let browser = Browser::start().await?;

    let env = TestEnv::load()?;
    let lab_controller = LabController::start(&env).await?;
    let tag = Uuid::new_v4().simple().to_string();
    let email = format!("ops-{}@lab.example", &tag[..8]);
    let prepared = async {
        lab_controller
            .operator(
                &email,
                PASSWORD,
                patronus_controller::auth::Role::TenantAdmin,
            )
            .await?;
        let api_token = lab_controller.api_token().await?;
        let site1_token = lab_controller.token(SITE1, "10.1.0.0/24").await?;
        anyhow::Ok((api_token, site1_token))
    }
    .await;
    let (api_token, site1_token) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            let _ = browser.close().await;
            lab_controller.stop().await?;
            return Err(e);
        }
    };
    let out = Command::new(&lab)
        .args(["up", "--sites", "2", "--uplinks", "2"])
        .args(lab_controller.relay_args())
        .output()?;
    let dir = std::env::temp_dir().join(format!("patronus-portal-lab-{}", &tag[..12]));
    let mut agents = Agents(Vec::new());
    let result = if out.status.success() {
        std::fs::create_dir_all(&dir)?;
        let run = Run {
            b: &browser,
            lab: lab.clone(),
            edge,
            dir: dir.clone(),
            url: lab_controller.controller.url.clone(),
            lab_url: lab_controller.url_in_lab(),
            tenant: lab_controller.tenant.0,
            api_token,
            email,
        };
        steps(&run, &site1_token, &mut agents).await
    } else {
        Err(anyhow::anyhow!("lab up: {}", text(&out)))
    };
    if result.is_err() {
        match browser.screenshot("failed-portal-lab").await {
            Ok(path) => eprintln!("the page at failure: {}", path.display()),
            Err(e) => eprintln!("no screenshot of the failure: {e:#}"),
        }
    }
    drop(agents);
    let closed = browser.close().await;
    let down = Command::new(&lab).arg("down").output()?;
    let stopped = lab_controller.stop().await;
    if result.is_err() {
        print_agent_logs(&dir, 2);
    }
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    ensure!(down.status.success(), "lab down: {}", text(&down));
    closed?;
    stopped?;
    println!("portal_lab_e2e ran in {:?}", started.elapsed());
    Ok(())
}
