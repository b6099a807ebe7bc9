//! A headless Chromium for end-to-end tests of the portal, driven over WebDriver.
//!
//! [`Browser::start`] runs `chromedriver` on a free loopback port (in its own process group, so
//! the Chromium it launches goes with it when the [`Browser`] is closed or dropped) and opens a
//! session with headless Chromium. The helpers wrap what the tests do most: navigate, fill a
//! form field, click, wait for an element, read its text, save a screenshot. Anything else is
//! one call away through [`Browser::client`].
//!
//! Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`), installed by
//! `scripts/setup`; where they are missing, [`Browser::start`] fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fantoccini::{Client, ClientBuilder};

/// The WebDriver client crate, and what tests use of it most, so they need no dependency of
/// their own.
pub use fantoccini;
pub use fantoccini::elements::Element;
pub use fantoccini::Locator;

/// The Chromium arguments of every session: headless, no sandbox (the tests run as root), a
/// fixed window size so screenshots are comparable.
pub const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--window-size=1400,1000",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// How long [`Browser::start`] waits for chromedriver to listen and for the session.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The interval of [`Browser::wait_for`]'s polling.
const POLL: Duration = Duration::from_millis(100);

const SETUP_HINT: &str =
    "run scripts/setup (as root): it installs Debian's chromium and chromium-driver";

/// A program by `env` override, else the first of `names` found on `PATH`.
fn find_program(env: &str, names: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        anyhow::ensure!(
            path.is_file(),
            "{env}={} does not name a file; unset it or {SETUP_HINT}",
            path.display()
        );
        return Ok(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "{} is not installed (looked on PATH; {env} overrides): {SETUP_HINT}",
        names.join(" / ")
    )
}

/// Where screenshots go: `$CARGO_TARGET_DIR/portal-screenshots`, else in the target directory
/// the running test binary was built in, else `target/portal-screenshots`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            if let Some(tagged) = exe
                .ancestors()
                .skip(1)
                .find(|dir| dir.join("CACHEDIR.TAG").is_file())
            {
                return Some(tagged.to_path_buf());
            }
            // <target>/<profile>/deps/<test binary>, or <target>/<profile>/<binary>
            let mut dir = exe.parent()?;
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir = dir.parent()?;
            }
            Some(dir.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("portal-screenshots")
}

/// `name` made safe as a file name.
fn file_stem(name: &str) -> String {
    let stem: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.is_empty() {
        "screenshot".into()
    } else {
        stem
    }
}

/// A running chromedriver, killed with its process group (and so the browsers it started) on
/// drop. It and Chromium keep their temporary files (profile, singleton socket, the log) in a
/// directory of their own, removed on drop too.
struct Driver {
    child: Child,
    port: u16,
    tmp: PathBuf,
    log: PathBuf,
}

impl Driver {
    fn start(program: &Path) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // Short: Chromium puts a Unix socket two levels below it (paths of at most 107 bytes).
        let tmp = std::env::temp_dir().join(format!(
            "patronus-cr-{port}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let log = tmp.join("chromedriver.log");
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            // Loopback only (the default), said explicitly.
            .arg("--allowed-ips=127.0.0.1")
            .arg(format!("--log-path={}", log.display()))
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e).with_context(|| format!("starting {}", program.display()));
            }
        };
        Ok(Self {
            child,
            port,
            tmp,
            log,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Wait until it accepts connections; fails early when it exits.
    async fn ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "chromedriver exited ({status}) before listening on port {}; its log: {}",
                    self.port,
                    self.log_tail()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "chromedriver did not listen on port {} within {START_TIMEOUT:?}; its log: {}",
                    self.port,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The process group is chromedriver's own pid (process_group(0)); Chromium and its
        // helpers inherit it.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Chromium's processes may take a moment to go after SIGKILL; retry briefly.
        for _ in 0..20 {
            match std::fs::remove_dir_all(&self.tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => break,
            }
        }
    }
}

/// A headless Chromium session.
pub struct Browser {
    client: Client,
    // Declared after the client: dropped last.
    _driver: Driver,
}

impl Browser {
    /// Start chromedriver and open a session with headless Chromium.
    pub async fn start() -> anyhow::Result<Self> {
        let chromedriver = find_program("PATRONUS_CHROMEDRIVER", &["chromedriver"])?;
        let chromium = find_program(
            "PATRONUS_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        )?;
        let deadline = Instant::now() + START_TIMEOUT;
        // The free port is found by binding and releasing it; retry if another process takes
        // it in between.
        let mut attempt = 0;
        let driver = loop {
            attempt += 1;
            let mut driver = Driver::start(&chromedriver)?;
            match driver.ready(deadline).await {
                Ok(()) => break driver,
                Err(e) if attempt < 3 && Instant::now() < deadline => {
                    eprintln!("chromedriver did not start, retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        };

        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": CHROMIUM_ARGS,
            }),
        );
        // Leave dialogs open so a test can see them (the default dismisses them on the next
        // command).
        capabilities.insert("unhandledPromptBehavior".into(), "ignore".into());
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&driver.url()),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no WebDriver session within {START_TIMEOUT:?}; chromedriver log: {}",
                driver.log_tail()
            )
        })?
        .map_err(|e| {
            anyhow::anyhow!(
                "opening a headless Chromium session ({}): {e}; chromedriver log: {}",
                chromium.display(),
                driver.log_tail()
            )
        })?;
        Ok(Self {
            client,
            _driver: driver,
        })
    }

    /// The WebDriver client, for anything the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// End the session (Chromium quits) and stop chromedriver.
    pub async fn close(self) -> anyhow::Result<()> {
        let Self { client, _driver } = self;
        let closed = client.close().await;
        drop(_driver);
        closed.context("closing the WebDriver session")
    }

    /// Navigate to `url` and wait for the page to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("navigating to {url}"))
    }

    /// The address of the current page.
    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self.client.current_url().await?.to_string())
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> anyhow::Result<Option<Element>> {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => Ok(Some(element)),
            Err(e) if e.is_no_such_element() => Ok(None),
            Err(e) => Err(self.explain(e).await).with_context(|| format!("finding {css}")),
        }
    }

    /// A failed command's error; when a dialog blocks the page (the session leaves dialogs
    /// open), say so and what it says.
    async fn explain(&self, e: fantoccini::error::CmdError) -> anyhow::Error {
        if e.is_unexpected_alert_open() {
            if let Ok(Some(text)) = self.open_dialog().await {
                return anyhow::anyhow!("a JavaScript dialog is open on the page: {text:?}");
            }
        }
        e.into()
    }

    /// Every element matching `css` (none is not an error).
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        match self.client.find_all(Locator::Css(css)).await {
            Ok(elements) => Ok(elements),
            Err(e) => Err(self.explain(e).await).with_context(|| format!("finding {css}")),
        }
    }

    /// The first element matching `css`, or an error naming the page it is missing from.
    pub async fn expect(&self, css: &str) -> anyhow::Result<Element> {
        match self.find(css).await? {
            Some(element) => Ok(element),
            None => bail!("no element {css} on {}", self.describe_page().await),
        }
    }

    /// Poll until an element matches `css`, for at most `timeout`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> anyhow::Result<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(element) = self.find(css).await? {
                return Ok(element);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no element {css} within {timeout:?} on {}",
                    self.describe_page().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sign in to the portal at `base_url` (`http://127.0.0.1:<port>`) through its form and
    /// wait, at most `timeout`, for the page it lands on (signed in: the sign-out form).
    pub async fn sign_in(
        &self,
        base_url: &str,
        email: &str,
        password: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.goto(&format!("{base_url}/portal/login")).await?;
        self.wait_for("form#login", timeout).await?;
        self.fill("email", email).await?;
        self.fill("password", password).await?;
        self.click("form#login button[type=submit]").await?;
        self.wait_for("form#logout", timeout)
            .await
            .with_context(|| format!("signing in as {email}"))?;
        Ok(())
    }

    /// Type `value` into the form field named `name` (clearing it first).
    pub async fn fill(&self, name: &str, value: &str) -> anyhow::Result<()> {
        let field = self.expect(&format!("[name=\"{name}\"]")).await?;
        field
            .clear()
            .await
            .with_context(|| format!("clearing field {name}"))?;
        field
            .send_keys(value)
            .await
            .with_context(|| format!("typing into field {name}"))
    }

    /// Click the first element matching `css`.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.expect(css)
            .await?
            .click()
            .await
            .with_context(|| format!("clicking {css}"))
    }

    /// The visible text of the first element matching `css`.
    pub async fn text_of(&self, css: &str) -> anyhow::Result<String> {
        self.expect(css)
            .await?
            .text()
            .await
            .with_context(|| format!("reading the text of {css}"))
    }

    /// The value of attribute `attr` of the first element matching `css`.
    pub async fn attr_of(&self, css: &str, attr: &str) -> anyhow::Result<Option<String>> {
        self.expect(css)
            .await?
            .attr(attr)
            .await
            .with_context(|| format!("reading attribute {attr} of {css}"))
    }

    /// The text of the open JavaScript dialog (`alert`, `confirm`, `prompt`), if one is open.
    pub async fn open_dialog(&self) -> anyhow::Result<Option<String>> {
        match self.client.get_alert_text().await {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.is_no_such_alert() => Ok(None),
            Err(e) => Err(e).context("asking for an open dialog"),
        }
    }

    /// The current page's HTML.
    pub async fn source(&self) -> anyhow::Result<String> {
        Ok(self.client.source().await?)
    }

    /// Save a PNG of the window as `<screenshot_dir>/<name>.png` (a test artifact); returns
    /// its path.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let png = self
            .client
            .screenshot()
            .await
            .context("taking a screenshot")?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.png", file_stem(name)));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The URL and the start of the body's text, for failure messages.
    async fn describe_page(&self) -> String {
        let url = self
            .client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_else(|e| format!("<url unknown: {e}>"));
        let body = match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(e) => format!("<no body: {e}>"),
        };
        let body: String = body.chars().take(600).collect();
        format!("{url} (page text: {body:?})")
    }
}
