//! End-to-end tests of the operator portal (`/portal`) in headless Chromium, against a real
//! controller on a loopback port with PostgreSQL, Redis and NATS (issue 9).
//!
//! Every test runs through [`e2e`]: its own throwaway database and controller, seeded through
//! the controller's own API ([`Portal::start`]: an MSP with tenants A and B, an admin and a
//! viewer in A, an admin in B, two sites in A and one in B), and its own browser. [`e2e`]
//! saves a screenshot of the page a failing test ended on (`failed-<name>.png`) and cleans up
//! either way. To add a test: write `async fn <name>_steps(p: &Portal, b: &Browser)` and a
//! `#[tokio::test]` that calls `e2e("<name>", |p, b| Box::pin(<name>_steps(p, b)))`; seed
//! more with [`Portal::create_site`] or [`api`]. Tests that need live sites (the lab) start a
//! `LabController` and a [`Browser`] themselves and sign in an operator of the lab's tenant.
//!
//! The page structure the tests rely on (ids, `data-*` attributes) is the portal's DOM
//! contract: see the templates in `templates/`.
//!
//! Screenshots go to `$CARGO_TARGET_DIR/portal-screenshots/` (artifacts; see
//! `patronus_test_support::browser::screenshot_dir`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use patronus_test_support::browser::{Browser, Locator};
use patronus_test_support::http::call;
use patronus_test_support::{RunningController, TestDatabase, TestEnv};
use serde_json::{json, Value};
use uuid::Uuid;

/// Every operator's password.
const PASSWORD: &str = "a long enough password";
/// How long a page may take to show what a test waits for.
const WAIT: Duration = Duration::from_secs(15);
/// The session cookie's name (the DOM contract).
const SESSION_COOKIE: &str = "patronus_session";

/// A site as seeded.
#[derive(Clone, Debug)]
struct Site {
    id: Uuid,
    name: String,
}

/// A running controller with a seeded MSP.
struct Portal {
    /// `http://127.0.0.1:<port>`
    url: String,
    database: TestDatabase,
    controller: RunningController,
    /// The MSP admin's API session token.
    msp_token: String,
    msp_admin: String,
    tenant_a: Uuid,
    tenant_b: Uuid,
    /// E-mail addresses of the tenants' operators.
    admin_a: String,
    viewer_a: String,
    admin_b: String,
    sites_a: Vec<Site>,
    sites_b: Vec<Site>,
}

/// A test's steps, given the portal and a fresh browser.
type Steps =
    for<'a> fn(&'a Portal, &'a Browser) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// Run `steps` against a freshly seeded portal in a fresh browser; screenshot the last page as
/// `failed-<name>` when they fail; clean up either way.
async fn e2e(name: &str, steps: Steps) -> anyhow::Result<()> {
    // The browser first: without Chromium the test fails at once, saying to run setup.
    let browser = Browser::start().await?;
    let portal = Portal::start().await?;
    let outcome = steps(&portal, &browser).await;
    if outcome.is_err() {
        match browser.screenshot(&format!("failed-{name}")).await {
            Ok(path) => eprintln!("{name}: the page at failure: {}", path.display()),
            Err(e) => eprintln!("{name}: no screenshot of the failure: {e:#}"),
        }
    }
    let closed = browser.close().await;
    portal.stop().await?;
    outcome?;
    closed
}

/// `(status, json body)` of one REST call; the body is shown when the status is not `want`.
fn api(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
    want: u16,
) -> anyhow::Result<Value> {
    let (status, body) = call(method, url, token, body);
    ensure!(
        status == want,
        "{method} {url}: {status} (wanted {want}): {body}"
    );
    Ok(body)
}

fn site_body(name: &str, lan: &str) -> Value {
    json!({
        "name": name,
        "region": "eu-west",
        "lan_prefixes": [lan],
        "uplinks": [
            { "name": "fiber", "address": "198.18.1.1", "interface_type": "fiber", "bandwidth_mbps": 1000, "cost_per_gb": 0.01 },
            { "name": "lte", "address": "198.18.2.1", "interface_type": "lte", "cost_per_gb": 0.1, "metered": true }
        ]
    })
}

impl Portal {
    /// A database, a controller on a free loopback port, and the seed data.
    async fn start() -> anyhow::Result<Self> {
        let env = TestEnv::load()?;
        let database = TestDatabase::create(&env).await?;
        patronus_controller::db::migrations::run_pending(&database.owner_url).await?;
        let mut config = env.controller_config(&database.app_url)?;
        // Every test signs in from 127.0.0.1, and the counter is shared with other test
        // binaries on this host's Redis.
        config.auth.login_per_minute_per_source = 10_000;
        config.auth.login_per_minute_per_account = 1_000;
        let controller = RunningController::start(config)?;
        let url = controller.url.clone();

        let tag = Uuid::new_v4().simple().to_string();
        let msp_admin = format!("root-{tag}@msp.example");
        let pool = patronus_controller::db::pool(&database.app_url, 1)?;
        patronus_controller::admin::create_msp(&pool, "Portal MSP", &msp_admin, PASSWORD).await?;
        drop(pool);
        let msp_token = session_token(&url, &msp_admin)?;

        let mut tenants = Vec::new();
        for (name, slug) in [("Tenant Alpha", "alpha"), ("Tenant Bravo", "bravo")] {
            let body = api(
                "POST",
                &format!("{url}/api/v1/tenants"),
                Some(&msp_token),
                Some(json!({ "name": name, "slug": format!("{slug}-{}", &tag[..6]) })),
                201,
            )?;
            tenants.push(body["id"].as_str().context("tenant id")?.parse::<Uuid>()?);
        }
        let (tenant_a, tenant_b) = (tenants[0], tenants[1]);
        let mut emails = Vec::new();
        for (tenant, who, role) in [
            (tenant_a, "admin-a", "tenant_admin"),
            (tenant_a, "viewer-a", "tenant_viewer"),
            (tenant_b, "admin-b", "tenant_admin"),
        ] {
            let email = format!("{who}-{tag}@tenant.example");
            api(
                "POST",
                &format!("{url}/api/v1/tenants/{tenant}/operators"),
                Some(&msp_token),
                Some(json!({ "email": email, "password": PASSWORD, "role": role })),
                201,
            )?;
            emails.push(email);
        }
        let mut portal = Self {
            url,
            database,
            controller,
            msp_token,
            msp_admin,
            tenant_a,
            tenant_b,
            admin_a: emails[0].clone(),
            viewer_a: emails[1].clone(),
            admin_b: emails[2].clone(),
            sites_a: Vec::new(),
            sites_b: Vec::new(),
        };
        portal.sites_a = vec![
            portal.create_site(tenant_a, "alpha-hq", "10.1.1.0/24")?,
            portal.create_site(tenant_a, "alpha-branch", "10.1.2.0/24")?,
        ];
        portal.sites_b = vec![portal.create_site(tenant_b, "bravo-hq", "10.2.1.0/24")?];
        Ok(portal)
    }

    /// Create a site in `tenant` through the API, as the MSP admin.
    fn create_site(&self, tenant: Uuid, name: &str, lan: &str) -> anyhow::Result<Site> {
        let body = api(
            "POST",
            &format!("{}/api/v1/tenants/{tenant}/sites", self.url),
            Some(&self.msp_token),
            Some(site_body(name, lan)),
            201,
        )?;
        Ok(Site {
            id: body["id"].as_str().context("site id")?.parse()?,
            name: name.to_owned(),
        })
    }

    /// `http://127.0.0.1:<port>/portal/t/<tenant>/<rest>`
    fn tenant_url(&self, tenant: Uuid, rest: &str) -> String {
        format!("{}/portal/t/{tenant}/{rest}", self.url)
    }

    /// Sign in through the login form and wait for the page it lands on.
    async fn sign_in(&self, b: &Browser, email: &str) -> anyhow::Result<()> {
        b.sign_in(&self.url, email, PASSWORD, WAIT).await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.controller.stop().await;
        self.database.drop_now().await
    }
}

/// An API session token for `email`.
fn session_token(url: &str, email: &str) -> anyhow::Result<String> {
    let body = api(
        "POST",
        &format!("{url}/api/v1/auth/login"),
        None,
        Some(json!({ "email": email, "password": PASSWORD })),
        200,
    )?;
    Ok(body["session_token"]
        .as_str()
        .context("session_token")?
        .to_owned())
}

/// The `(site id, name text)` of every row of the overview's sites table.
async fn site_rows(b: &Browser) -> anyhow::Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    for row in b.find_all("table#sites tr[data-site-id]").await? {
        let id = row.attr("data-site-id").await?.unwrap_or_default();
        let name = row
            .find(Locator::Css("td.site-name"))
            .await
            .with_context(|| format!("the name cell of site {id}"))?
            .text()
            .await?;
        rows.push((id, name));
    }
    Ok(rows)
}

// ------------------------------------------------------------------------------------------
// a. sign-in lands on the tenant's overview with its sites

#[tokio::test(flavor = "multi_thread")]
async fn operator_signs_in_to_the_tenant_overview() -> anyhow::Result<()> {
    e2e("overview", |p, b| Box::pin(overview_steps(p, b))).await
}

async fn overview_steps(p: &Portal, b: &Browser) -> anyhow::Result<()> {
    // Bad credentials first: the form again, with an error, and no session.
    b.goto(&format!("{}/portal/login", p.url)).await?;
    b.wait_for("form#login", WAIT).await?;
    b.fill("email", &p.admin_a).await?;
    b.fill("password", "not the password").await?;
    b.click("form#login button[type=submit]").await?;
    b.wait_for("form#login .form-error", WAIT).await?;
    ensure!(
        b.find("form#logout").await?.is_none(),
        "signed in with a wrong password"
    );

    p.sign_in(b, &p.admin_a).await?;
    let landed = b.current_url().await?;
    ensure!(
        landed == p.tenant_url(p.tenant_a, ""),
        "a tenant operator lands on {landed}, not its tenant's overview"
    );
    b.wait_for("table#sites", WAIT).await?;
    let mut rows = site_rows(b).await?;
    rows.sort();
    let mut want: Vec<(String, String)> = p
        .sites_a
        .iter()
        .map(|s| (s.id.to_string(), s.name.clone()))
        .collect();
    want.sort();
    ensure!(
        rows == want,
        "the sites table lists {rows:?}, not the tenant's sites {want:?}"
    );
    for css in ["#paths-up", "#paths-degraded", "#paths-down"] {
        let count = b.text_of(css).await?;
        ensure!(
            count.trim() == "0",
            "{css} is {count:?} for sites that never reported"
        );
    }
    for nav in ["overview", "topology", "policies", "onboarding", "events"] {
        let href = b.attr_of(&format!("nav a[data-nav={nav}]"), "href").await?;
        ensure!(
            href.as_deref()
                .is_some_and(|h| h.contains(&p.tenant_a.to_string())),
            "nav link {nav} points at {href:?}, not into the tenant"
        );
    }
    // Every form carries its CSRF token.
    for form in b.find_all("form").await? {
        let id = form.attr("id").await?.unwrap_or_default();
        ensure!(
            form.find(Locator::Css("input[type=hidden][name=csrf]"))
                .await
                .is_ok(),
            "form {id:?} has no csrf field"
        );
    }
    // A site's row links to its page.
    let site = &p.sites_a[0];
    b.click(&format!("tr[data-site-id=\"{}\"] td.site-name a", site.id))
        .await?;
    let heading = b.wait_for("h1.site-name", WAIT).await?.text().await?;
    ensure!(heading == site.name, "the site page is headed {heading:?}");
    b.goto(&p.tenant_url(p.tenant_a, "")).await?;
    b.wait_for("table#sites", WAIT).await?;
    b.screenshot("overview").await?;

    // An MSP admin lands on a tenant and can pick the other one.
    b.click("form#logout button[type=submit]").await?;
    b.wait_for("form#login", WAIT).await?;
    p.sign_in(b, &p.msp_admin).await?;
    let picker = b.wait_for("select#tenant-picker", WAIT).await?;
    let mut values = Vec::new();
    for option in picker.find_all(Locator::Css("option")).await? {
        values.push(option.attr("value").await?.unwrap_or_default());
    }
    values.sort();
    let mut want = vec![p.tenant_a.to_string(), p.tenant_b.to_string()];
    want.sort();
    ensure!(
        values == want,
        "the tenant picker offers {values:?}, not {want:?}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// b. tenant isolation

#[tokio::test(flavor = "multi_thread")]
async fn tenant_operators_never_see_another_tenants_sites() -> anyhow::Result<()> {
    e2e("isolation", |p, b| Box::pin(isolation_steps(p, b))).await
}

async fn isolation_steps(p: &Portal, b: &Browser) -> anyhow::Result<()> {
    p.sign_in(b, &p.admin_b).await?;
    let landed = b.current_url().await?;
    ensure!(
        landed == p.tenant_url(p.tenant_b, ""),
        "B's operator lands on {landed}"
    );
    b.wait_for("table#sites", WAIT).await?;
    let rows = site_rows(b).await?;
    let want: Vec<(String, String)> = p
        .sites_b
        .iter()
        .map(|s| (s.id.to_string(), s.name.clone()))
        .collect();
    ensure!(
        rows == want,
        "B's overview lists {rows:?}, not B's sites {want:?}"
    );
    ensure!(
        b.find("select#tenant-picker").await?.is_none(),
        "a tenant operator has a tenant picker"
    );
    let page = b.source().await?;
    for site in &p.sites_a {
        ensure!(
            !page.contains(&site.name),
            "B's overview mentions A's site {}",
            site.name
        );
        ensure!(
            !page.contains(&site.id.to_string()),
            "B's overview mentions A's site id {}",
            site.id
        );
    }

    // A's URLs, typed by hand: the not-found page, nothing of A.
    let a_site = &p.sites_a[0];
    for rest in [
        String::new(),
        format!("sites/{}", a_site.id),
        "onboarding".into(),
        "events".into(),
        "topology".into(),
        "policies".into(),
    ] {
        let url = p.tenant_url(p.tenant_a, &rest);
        b.goto(&url).await?;
        b.wait_for("#not-found", WAIT)
            .await
            .with_context(|| format!("B's operator opening {url}"))?;
        let page = b.source().await?;
        for site in &p.sites_a {
            ensure!(
                !page.contains(&site.name),
                "{url} shows A's site {} to B",
                site.name
            );
        }
        ensure!(
            !page.contains("Tenant Alpha"),
            "{url} shows A's tenant name to B"
        );
    }
    b.screenshot("isolation-not-found").await?;
    // A's site under B's own tenant prefix is just as unknown.
    let url = p.tenant_url(p.tenant_b, &format!("sites/{}", a_site.id));
    b.goto(&url).await?;
    b.wait_for("#not-found", WAIT)
        .await
        .with_context(|| format!("B's operator opening {url}"))?;
    // So is an id that exists nowhere.
    b.goto(&p.tenant_url(p.tenant_b, &format!("sites/{}", Uuid::new_v4())))
        .await?;
    b.wait_for("#not-found", WAIT).await?;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// c. viewers: no edit controls, forged writes refused

#[tokio::test(flavor = "multi_thread")]
async fn viewers_see_no_edit_controls_and_cannot_post() -> anyhow::Result<()> {
    e2e("viewer", |p, b| Box::pin(viewer_steps(p, b))).await
}

async fn viewer_steps(p: &Portal, b: &Browser) -> anyhow::Result<()> {
    p.sign_in(b, &p.viewer_a).await?;
    b.wait_for("table#sites", WAIT).await?;
    let site = &p.sites_a[0];
    for rest in [
        String::new(),
        format!("sites/{}", site.id),
        "onboarding".into(),
        "events".into(),
    ] {
        let url = p.tenant_url(p.tenant_a, &rest);
        b.goto(&url).await?;
        b.wait_for("form#logout", WAIT)
            .await
            .with_context(|| format!("the viewer opening {url}"))?;
        let edits = b.find_all("[data-edit]").await?;
        ensure!(
            edits.is_empty(),
            "{url} shows the viewer {} edit control(s)",
            edits.len()
        );
    }
    ensure!(
        b.find("form#token-form").await?.is_none(),
        "the viewer gets the token form"
    );
    b.screenshot("viewer-onboarding").await?;

    // The viewer forges the token form with its own session's valid CSRF token.
    let csrf = b
        .attr_of("form#logout input[name=csrf]", "value")
        .await?
        .context("the logout form's csrf value")?;
    ensure!(!csrf.is_empty(), "empty csrf token");
    let action = format!("/portal/t/{}/onboarding", p.tenant_a);
    forge_post(
        b,
        &action,
        &[
            ("csrf", &csrf),
            ("site_name", "forged-site"),
            ("expires_in_hours", "24"),
        ],
    )
    .await?;
    b.wait_for("#forbidden", WAIT)
        .await
        .context("the viewer's forged token form")?;
    ensure!(
        b.find("#enroll-command").await?.is_none(),
        "a viewer got an enroll command"
    );
    b.screenshot("viewer-forbidden").await?;

    // Nothing was created: the tenant has no token and no site named so.
    let token = session_token(&p.url, &p.admin_a)?;
    let tokens = api(
        "GET",
        &format!("{}/api/v1/enrollment-tokens", p.url),
        Some(&token),
        None,
        200,
    )?;
    ensure!(
        tokens["items"]
            .as_array()
            .is_some_and(|items| items.is_empty()),
        "the forged POST created a token: {tokens}"
    );
    let sites = api(
        "GET",
        &format!("{}/api/v1/sites", p.url),
        Some(&token),
        None,
        200,
    )?;
    ensure!(
        !sites.to_string().contains("forged-site"),
        "the forged POST created a site: {sites}"
    );
    Ok(())
}

/// Submit a form the page never had: `fields` POSTed to `action`, as a script in the page
/// (WebDriver's scripts are not subject to the page's CSP) would.
async fn forge_post(b: &Browser, action: &str, fields: &[(&str, &str)]) -> anyhow::Result<()> {
    let fields: serde_json::Map<String, Value> = fields
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    b.client()
        .execute(
            "const [action, fields] = arguments;
             const form = document.createElement('form');
             form.method = 'post';
             form.action = action;
             for (const [name, value] of Object.entries(fields)) {
               const input = document.createElement('input');
               input.type = 'hidden';
               input.name = name;
               input.value = value;
               form.appendChild(input);
             }
             document.body.appendChild(form);
             form.submit();",
            vec![Value::from(action), Value::Object(fields)],
        )
        .await
        .context("submitting a forged form")?;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// d. escaping

#[tokio::test(flavor = "multi_thread")]
async fn markup_in_names_shows_as_text() -> anyhow::Result<()> {
    e2e("escaping", |p, b| Box::pin(escaping_steps(p, b))).await
}

async fn escaping_steps(p: &Portal, b: &Browser) -> anyhow::Result<()> {
    const NAME: &str = "<script>alert(1)</script>";
    const IMG: &str = "<img src=x onerror=alert(2)>";
    let script = p.create_site(p.tenant_a, NAME, "10.1.9.0/24")?;
    let img = p.create_site(p.tenant_a, IMG, "10.1.10.0/24")?;
    p.sign_in(b, &p.admin_a).await?;
    b.wait_for("table#sites", WAIT).await?;
    for site in [&script, &img] {
        let css = format!("tr[data-site-id=\"{}\"] td.site-name", site.id);
        let shown = b.wait_for(&css, WAIT).await?.text().await?;
        ensure!(
            shown == site.name,
            "the name cell shows {shown:?}, not the raw name {:?}",
            site.name
        );
    }
    ensure!(
        b.find("table#sites script").await?.is_none(),
        "a script element inside the sites table"
    );
    ensure!(
        b.find("table#sites img").await?.is_none(),
        "an img element inside the sites table"
    );
    if let Some(text) = b.open_dialog().await? {
        bail!("a dialog is open on the overview: {text:?}");
    }
    b.screenshot("escaping-overview").await?;

    b.goto(&p.tenant_url(p.tenant_a, &format!("sites/{}", script.id)))
        .await?;
    let heading = b.wait_for("h1.site-name", WAIT).await?.text().await?;
    ensure!(heading == NAME, "the site page is headed {heading:?}");
    if let Some(text) = b.open_dialog().await? {
        bail!("a dialog is open on the site page: {text:?}");
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// e. security headers and the session cookie (plain HTTP, no browser)

#[tokio::test(flavor = "multi_thread")]
async fn pages_carry_a_strict_csp_and_the_session_cookie_is_locked_down() -> anyhow::Result<()> {
    let portal = Portal::start().await?;
    let (url, email, tenant) = (portal.url.clone(), portal.admin_a.clone(), portal.tenant_a);
    let checked =
        tokio::task::spawn_blocking(move || headers_over_http(&url, &email, tenant)).await;
    portal.stop().await?;
    checked?
}

/// The value of `name=value` among a response's `Set-Cookie` headers, with its attributes.
fn set_cookie<'r>(response: &'r ureq::Response, name: &str) -> Option<&'r str> {
    response
        .all("set-cookie")
        .into_iter()
        .find(|c| c.split('=').next().map(str::trim) == Some(name))
}

/// Cookie `name=value` pairs (without attributes) of a response, for a `Cookie` header.
fn cookie_pairs(response: &ureq::Response) -> Vec<String> {
    response
        .all("set-cookie")
        .into_iter()
        .filter_map(|c| c.split(';').next())
        .map(|pair| pair.trim().to_owned())
        .collect()
}

fn csrf_in(html: &str) -> anyhow::Result<String> {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).context("no csrf field in the page")? + marker.len();
    let end = html[start..].find('"').context("unterminated csrf value")?;
    Ok(html[start..start + end].to_owned())
}

fn check_csp(what: &str, response: &ureq::Response) -> anyhow::Result<()> {
    let csp = response
        .header("content-security-policy")
        .with_context(|| format!("{what} has no Content-Security-Policy"))?;
    let directive = |name: &str| {
        csp.split(';')
            .map(str::trim)
            .find(|d| d.split_whitespace().next() == Some(name))
            .map(str::to_owned)
    };
    let scripts = directive("script-src")
        .or_else(|| directive("default-src"))
        .with_context(|| format!("{what}: the CSP {csp:?} does not restrict scripts"))?;
    for loose in [
        "'unsafe-inline'",
        "'unsafe-eval'",
        "*",
        "data:",
        "http:",
        "https:",
    ] {
        ensure!(
            !scripts.split_whitespace().any(|s| s == loose),
            "{what}: script sources {scripts:?} allow {loose}"
        );
    }
    let frames = directive("frame-ancestors");
    ensure!(
        frames.as_deref() == Some("frame-ancestors 'none'")
            || response
                .header("x-frame-options")
                .is_some_and(|v| v.eq_ignore_ascii_case("deny")),
        "{what} may be framed: CSP {csp:?}"
    );
    Ok(())
}

fn headers_over_http(url: &str, email: &str, tenant: Uuid) -> anyhow::Result<()> {
    // No redirects followed: the sign-in answer's own cookies and location are what we check.
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(30))
        .build();
    let fetch = |request: ureq::Request| match request.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => Ok(r),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    };

    let form = fetch(agent.get(&format!("{url}/portal/login")))?;
    ensure!(form.status() == 200, "GET /portal/login: {}", form.status());
    check_csp("the sign-in page", &form)?;
    let cookies = cookie_pairs(&form).join("; ");
    let html = form.into_string()?;
    let csrf = csrf_in(&html)?;

    let mut post = agent.post(&format!("{url}/portal/login"));
    if !cookies.is_empty() {
        post = post.set("Cookie", &cookies);
    }
    let signed_in =
        match post.send_form(&[("csrf", &csrf), ("email", email), ("password", PASSWORD)]) {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => bail!("POST /portal/login: {e}"),
        };
    ensure!(
        (300..400).contains(&signed_in.status()),
        "signing in answered {} (wanted a redirect)",
        signed_in.status()
    );
    let cookie = set_cookie(&signed_in, SESSION_COOKIE)
        .with_context(|| format!("signing in set no {SESSION_COOKIE} cookie"))?
        .to_owned();
    let attributes: Vec<String> = cookie
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    for want in ["httponly", "samesite=strict", "secure"] {
        ensure!(
            attributes.iter().any(|a| a == want),
            "the session cookie lacks {want}: {cookie}"
        );
    }
    let session = cookie
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();

    let overview = fetch(
        agent
            .get(&format!("{url}/portal/t/{tenant}/"))
            .set("Cookie", &session),
    )?;
    ensure!(
        overview.status() == 200,
        "the overview with the session cookie: {}",
        overview.status()
    );
    check_csp("the overview", &overview)?;
    ensure!(
        overview
            .header("x-content-type-options")
            .is_some_and(|v| v.eq_ignore_ascii_case("nosniff")),
        "the overview lacks X-Content-Type-Options: nosniff"
    );
    let body = overview.into_string()?;
    ensure!(
        body.contains("table id=\"sites\"") || body.contains("id=\"sites\""),
        "the overview has no sites table"
    );
    ensure!(
        !body.contains("<script>") && !body.contains(" onclick=") && !body.contains(" onload="),
        "the overview has inline script, which its CSP would block"
    );
    // Without the cookie: back to sign-in.
    let anonymous = fetch(agent.get(&format!("{url}/portal/t/{tenant}/")))?;
    ensure!(
        (300..400).contains(&anonymous.status())
            && anonymous
                .header("location")
                .is_some_and(|l| l.ends_with("/portal/login")),
        "the overview without a session answered {} to {:?}",
        anonymous.status(),
        anonymous.header("location")
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// f. onboarding: an enrollment token through the portal form

#[tokio::test(flavor = "multi_thread")]
async fn onboarding_form_creates_a_token_and_shows_the_enroll_command() -> anyhow::Result<()> {
    e2e("onboarding", |p, b| Box::pin(onboarding_steps(p, b))).await
}

async fn onboarding_steps(p: &Portal, b: &Browser) -> anyhow::Result<()> {
    p.sign_in(b, &p.admin_a).await?;
    b.click("nav a[data-nav=onboarding]").await?;
    b.wait_for("form#token-form", WAIT).await?;
    let default_hours = b
        .attr_of("form#token-form input[name=expires_in_hours]", "value")
        .await?;
    ensure!(
        default_hours.as_deref() == Some("24"),
        "the default lifetime is {default_hours:?} h"
    );
    ensure!(
        b.find("form#token-form [data-edit]").await?.is_some(),
        "the token form's submit button is not marked data-edit"
    );
    b.fill("site_name", "gamma-store").await?;
    if b.find("form#token-form input[name=lan_prefixes]")
        .await?
        .is_some()
    {
        b.fill("lan_prefixes", "10.1.30.0/24").await?;
    }
    let before = chrono::Utc::now();
    b.click("form#token-form button[type=submit]").await?;
    let command = b.wait_for("pre#enroll-command", WAIT).await?.text().await?;
    let after = chrono::Utc::now();
    b.screenshot("onboarding-token").await?;

    // One line: `patronus-edge enroll --controller <this controller> --token <token> ...`.
    ensure!(
        !command.trim().contains('\n'),
        "the enroll command is not one line: {command:?}"
    );
    let token = patronus_test_support::lab::enroll_command_token(&command, &p.url)?;
    let token = token.as_str();
    ensure!(
        token.len() > 20,
        "the token {token:?} is too short to be one"
    );
    // Exactly the line the API gives for a token (`POST /api/v1/enrollment-tokens`).
    let expected = patronus_controller::api::enrollment::enroll_command(&p.url, token);
    ensure!(
        command.trim() == expected,
        "the page shows {command:?}, not the API's command {expected:?}"
    );
    let ansible = b.text_of("pre#ansible-snippet").await?;
    ensure!(
        ansible.contains(token),
        "the ansible snippet lacks the token: {ansible:?}"
    );

    // The expiry: 24 hours from now, as shown.
    let expiry = b.text_of("#token-expiry").await?;
    let expected = [
        before + chrono::Duration::hours(24),
        after + chrono::Duration::hours(24),
    ];
    ensure!(
        expected
            .iter()
            .any(|at| expiry.contains(&at.format("%Y-%m-%d").to_string())
                && expiry.contains(&at.format("%H:%M").to_string())),
        "the expiry {expiry:?} is not 24 h from now ({})",
        expected[0].format("%Y-%m-%d %H:%M")
    );

    // The token is real: the API lists it, pending, for the new site, with that expiry.
    let admin = session_token(&p.url, &p.admin_a)?;
    let tokens = api(
        "GET",
        &format!("{}/api/v1/enrollment-tokens", p.url),
        Some(&admin),
        None,
        200,
    )?;
    let items = tokens["items"].as_array().context("token list")?;
    ensure!(
        items.len() == 1,
        "the API lists {} tokens: {tokens}",
        items.len()
    );
    let listed = &items[0];
    ensure!(
        listed["site_name"] == "gamma-store",
        "the token is for {}",
        listed["site_name"]
    );
    ensure!(
        listed["state"] == "pending",
        "the token is {}",
        listed["state"]
    );
    let expires_at: chrono::DateTime<chrono::Utc> = listed["expires_at"]
        .as_str()
        .context("expires_at")?
        .parse()?;
    ensure!(
        expires_at >= before + chrono::Duration::hours(24) - chrono::Duration::seconds(1)
            && expires_at <= after + chrono::Duration::hours(24) + chrono::Duration::seconds(1),
        "the token expires at {expires_at}"
    );
    // The secret is shown once: the onboarding page reloaded does not show it again.
    b.goto(&p.tenant_url(p.tenant_a, "onboarding")).await?;
    b.wait_for("form#token-form", WAIT).await?;
    ensure!(
        !b.source().await?.contains(token),
        "the token is shown again on reload"
    );
    Ok(())
}
