//! The hub's web dashboard in a real browser: headless Chromium driven
//! through chromedriver's WebDriver HTTP API, against a real mesh (a hub,
//! a relay, two nodes) on 127.0.0.1.
//!
//! Needs `chromium` and `chromedriver` on `PATH` (Debian: `apt-get install
//! chromium chromium-driver`). Without them the test fails when `CI` is
//! set and otherwise says why and skips.
//!
//! The screenshot of the site page with its dead node is written to
//! `<target dir>/test-output/dashboard.png`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_tests::{Mesh, eventually, fleet_site, get_json, serial};

const REGION: &str = "eu";
const SITE: &str = "par";

/// How long the page may take to show what the API already says: two
/// polls of the dashboard plus a slow, shared machine.
const PAGE_LIMIT: Duration = Duration::from_secs(30);

/// The first executable named one of `names` on `PATH`.
fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// A minimal blocking HTTP/1.1 request with a JSON body and answer, enough
/// for WebDriver on loopback.
fn http_json(method: &str, url: &str, body: Option<&Value>) -> Result<Value, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url} is not http://"))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = TcpStream::connect(host).map_err(|e| format!("connect {host}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    )
    .map_err(|e| format!("write to {host}: {e}"))?;
    let (head, body) = read_answer(&mut s).map_err(|e| format!("read from {host}: {e}"))?;
    let value: Value = serde_json::from_str(&body)
        .map_err(|e| format!("{method} {url}: not JSON ({e}): {body}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        return Err(format!("{method} {url}: HTTP {status}: {value}"));
    }
    Ok(value)
}

/// Reads one HTTP answer: its head, and its body by `content-length`
/// (chromedriver keeps the connection open after answering), or chunked,
/// or up to the end of the stream.
fn read_answer(s: &mut TcpStream) -> std::io::Result<(String, String)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "connection closed before the head ended",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let mut body = raw[head_end + 4..].to_vec();
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    match length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&buf[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let body = if head.contains("transfer-encoding: chunked") {
        trellis_tests::dechunk(&body)
    } else {
        body
    };
    Ok((head, body))
}

/// chromedriver, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(chromedriver: &Path, log: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(log).expect("chromedriver log file");
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let ready = eventually(Duration::from_secs(20), || {
            http_json("GET", &format!("{}/status", driver.url), None)
                .is_ok_and(|v| v["value"]["ready"] == true)
        });
        assert!(ready, "chromedriver on port {port} never became ready");
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser session, closed when dropped (before its driver is).
struct Browser<'a> {
    driver: &'a Driver,
    id: String,
}

impl<'a> Browser<'a> {
    fn open(driver: &'a Driver, chromium: &Path) -> Browser<'a> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = http_json("POST", &format!("{}/session", driver.url), Some(&caps))
            .unwrap_or_else(|e| panic!("chromedriver would not start Chromium: {e}"));
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {v}"))
            .to_owned();
        Browser { driver, id }
    }

    fn call(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}/{what}", self.driver.url, self.id);
        http_json(method, &url, body.as_ref())
            .unwrap_or_else(|e| panic!("WebDriver {what}: {e}"))["value"]
            .take()
    }

    fn go(&self, url: &str) {
        self.call("POST", "url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns its value.
    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// The text of the element with `data-testid`, or null.
    fn text(&self, testid: &str) -> Value {
        self.js(&format!(
            "const e = document.querySelector('[data-testid=\"{testid}\"]'); return e ? e.textContent : null;"
        ))
    }

    /// Waits until `script` returns true; panics with `what` and the page's
    /// text otherwise.
    fn wait_for(&self, what: &str, script: &str) {
        self.wait_for_longer(what, script, PAGE_LIMIT);
    }

    /// [`Browser::wait_for`] with its own limit.
    fn wait_for_longer(&self, what: &str, script: &str, limit: Duration) {
        let ok = eventually(limit, || self.js(script) == Value::Bool(true));
        if !ok {
            panic!(
                "the page never showed {what} within {limit:?}; it shows:\n{}\nscript errors: {}",
                self.js("return document.body.innerText;"),
                self.js("return window.__trellisErrors;")
            );
        }
    }

    fn screenshot(&self, to: &Path) {
        use base64::decode;
        let b64 = self.call("GET", "screenshot", None);
        let png = decode(b64.as_str().expect("a base64 string")).expect("base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::create_dir_all(to.parent().expect("a directory")).expect("output directory");
        std::fs::write(to, png).expect("write the screenshot");
    }

    /// The browser's console entries so far (each read once).
    fn log(&self) -> Vec<Value> {
        match self.call("POST", "se/log", Some(json!({"type": "browser"}))) {
            Value::Array(entries) => entries,
            other => panic!("browser log: {other}"),
        }
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.driver.url, self.id);
        let _ = http_json("DELETE", &url, None);
    }
}

/// Standard base64 (what WebDriver returns), without a dependency.
mod base64 {
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in s.bytes() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' | b'\n' | b'\r' => continue,
                _ => return None,
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Some(out)
    }
}

/// `<target dir>/test-output`, from this test executable's place in
/// `<target dir>/<profile>/deps/`.
fn output_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .expect("target/<profile>/deps/<test>")
        .join("test-output")
}

#[test]
fn the_dashboard_shows_the_fleet_and_a_killed_node_as_dead() {
    let chromium = find_on_path(&["chromium", "chromium-browser", "google-chrome"]);
    let chromedriver = find_on_path(&["chromedriver"]);
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        let why = "chromium and chromedriver must be on PATH for the dashboard's browser test \
                   (Debian: apt-get install chromium chromium-driver)";
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("skipped: {why}");
        return;
    };

    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", REGION, "", "hub-1");
    mesh.issue("relay", REGION, SITE, "par-relay");
    mesh.issue("node", REGION, SITE, "par-n0");
    mesh.issue("node", REGION, SITE, "par-n1");
    let (_hub, uplink, api) = mesh.start_hub("hub-1", "");
    let (_relay, gossip) = mesh.start_relay("par-relay", &uplink, "");
    let (_n0, _) = mesh.start_node("par-n0", &gossip, "");
    let (mut n1, _) = mesh.start_node("par-n1", &gossip, "");
    let up = eventually(Duration::from_secs(30), || {
        fleet_site(&api, SITE).is_some_and(|(_, r)| r["nodes_alive"] == 2)
    });
    assert!(
        up,
        "the hub never saw 2 nodes alive: {:?}",
        get_json(&format!("{api}/api/v1/fleet"))
    );

    let driver = Driver::start(&chromedriver, &mesh.path().join("chromedriver.log"));
    let browser = Browser::open(&driver, &chromium);

    // The overview: one site, two nodes alive, its tile linking to it.
    browser.go(&format!("{api}/"));
    browser.wait_for(
        "1 site and 2 nodes alive",
        "const t = s => (document.querySelector(`[data-testid=\"${s}\"]`) || {}).textContent; \
         return t('total-sites') === '1' && t('nodes-alive') === '2' && t('nodes-dead') === '0';",
    );
    assert_eq!(
        browser.js("return document.querySelector('#heatmap a.t').getAttribute('href');"),
        json!(format!("#/site/{REGION}/{SITE}"))
    );
    assert_eq!(
        browser.js("return document.querySelector('#heatmap a.t').className;"),
        json!("t s-healthy")
    );

    // The site page: both nodes alive (the relay is listed too: it is a
    // member of its site).
    browser.js("document.querySelector('#heatmap a.t').click(); return null;");
    browser.wait_for(
        "both nodes alive on the site page",
        "const alive = n => !!document.querySelector(`[data-testid=\"node-row\"][data-node=\"${n}\"][data-alive=\"true\"]`); \
         return alive('par-n0') && alive('par-n1');",
    );
    assert_eq!(
        browser.text("site-title"),
        json!(format!("{REGION} / {SITE}"))
    );

    // The fault: par-n1 is killed, and the page (left open) shows it dead.
    let status = n1.kill9();
    assert!(!status.success(), "par-n1 was killed: {status:?}");
    assert!(!n1.is_running(), "par-n1 is gone");
    let killed = Instant::now();
    browser.wait_for_longer(
        "par-n1 dead on the site page",
        "const r = document.querySelector('[data-testid=\"node-row\"][data-node=\"par-n1\"]'); \
         const o = document.querySelector('[data-testid=\"node-row\"][data-node=\"par-n0\"]'); \
         return !!r && r.dataset.alive === 'false' && !!o && o.dataset.alive === 'true';",
        Duration::from_secs(60),
    );
    eprintln!(
        "the page showed par-n1 dead {:?} after the kill",
        killed.elapsed()
    );
    let shot = output_dir().join("dashboard.png");
    browser.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());

    // The overview counts it too.
    browser.js("location.hash = '#/'; return null;");
    browser.wait_for(
        "1 node dead on the overview",
        "const t = s => (document.querySelector(`[data-testid=\"${s}\"]`) || {}).textContent; \
         return t('nodes-dead') === '1' && t('nodes-alive') === '1';",
    );

    // The other views load without an error, rollouts with none started.
    browser.js("location.hash = '#/rollouts'; return null;");
    browser.wait_for(
        "no rollout yet",
        "const e = document.querySelector('[data-testid=\"rollout-list\"]'); \
         return !!e && e.textContent.includes('No rollout has been started');",
    );
    browser.js("location.hash = '#/audit'; return null;");
    browser.wait_for(
        "the audit trail",
        "const e = document.querySelector('[data-testid=\"audit\"]'); \
         return !!e && (!!e.querySelector('table') || e.textContent.includes('The log is empty'));",
    );
    browser.js("location.hash = '#/incidents'; return null;");
    browser.wait_for(
        "the incidents: the node killed above is one",
        "const e = document.querySelector('[data-testid=\"incidents\"]'); \
         return !!e && !!e.querySelector('[data-testid=\"incident\"]') \
           && e.textContent.includes('par-n1');",
    );
    assert_eq!(
        browser.js("return document.querySelector('[data-testid=\"api-error\"]').hidden;"),
        json!(true),
        "the API error banner is shown: {}",
        browser.text("api-error")
    );

    let errors = browser.js("return window.__trellisErrors;");
    assert_eq!(errors, json!([]), "the page recorded script errors");
    let severe: Vec<Value> = browser
        .log()
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(severe.is_empty(), "severe browser log entries: {severe:#?}");
}
