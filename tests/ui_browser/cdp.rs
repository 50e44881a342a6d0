//! A small Chrome DevTools Protocol driver for the UI tests: starts headless Chromium with an
//! empty profile, opens one page target, and sends it commands (navigate, evaluate, screenshot)
//! over its WebSocket. Chromium is the real browser a user would open; nothing is simulated.

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium and one of its pages.
pub struct Browser {
    child: Child,
    socket: Socket,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// The Chromium binary: $CHROMIUM, else `chromium` or `chromium-browser` on the PATH. Missing,
/// the test fails and says how to install it (a UI test that skips would prove nothing).
fn chromium_binary() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if found {
            return name.to_string();
        }
    }
    panic!(
        "the web UI tests drive a real headless Chromium, and none was found: install it \
         (Debian: apt-get install chromium; .ci/run does) or point CHROMIUM at the binary"
    );
}

impl Browser {
    /// Starts Chromium (as the issue says: headless, no sandbox, no GPU, no background
    /// networking, no first-run, an empty profile) and attaches to its first page.
    pub async fn start() -> Result<Browser> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(chromium_binary())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--window-size=1400,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting chromium")?;
        // It says where its DevTools endpoint is on stderr.
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(rest) = line.split("DevTools listening on ").nth(1) {
                        let _ = tx.send(rest.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let browser_ws =
            tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
                .await?
                .map_err(|_| anyhow!("chromium did not print its DevTools address within 30 s"))?;
        let port = browser_ws
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .and_then(|host| host.rsplit(':').next())
            .ok_or_else(|| anyhow!("no port in {browser_ws}"))?
            .to_string();
        let page_ws = page_target(&port).await?;
        let (socket, _) = tokio_tungstenite::connect_async(page_ws.as_str())
            .await
            .context("connecting to the page's DevTools socket")?;
        let mut browser = Browser {
            child,
            socket,
            next_id: 0,
            _profile: profile,
        };
        browser.call("Page.enable", json!({})).await?;
        browser.call("Runtime.enable", json!({})).await?;
        Ok(browser)
    }

    /// Sends a command and waits for its answer (events in between are passed over).
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::Text(message.into())).await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .map_err(|_| anyhow!("{method}: no answer within 30 s"))?
                .ok_or_else(|| anyhow!("the DevTools socket closed"))??;
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method} failed: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Opens `url` and waits until its document has loaded.
    pub async fn open(&mut self, url: &str) -> Result<()> {
        self.call("Page.navigate", json!({"url": url})).await?;
        for _ in 0..200 {
            if self.eval("document.readyState").await? == json!("complete") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{url} did not finish loading within 10 s")
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` until it is truthy, as a person waits for a page to show
    /// something; fails with what the page last showed.
    pub async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        limit: Duration,
    ) -> Result<Value> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let v = self.eval(expression).await?;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return Ok(v);
            }
            if std::time::Instant::now() > deadline {
                let shown = self
                    .eval("document.getElementById('content').innerText")
                    .await?;
                bail!("the page never showed {what} within {limit:?}; it shows:\n{shown}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the page as it is now.
    pub async fn screenshot(&mut self, path: &std::path::Path) -> Result<()> {
        use base64::Engine as _;
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await?;
        let data = r["data"]
            .as_str()
            .ok_or_else(|| anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The WebSocket address of Chromium's first page target, from its `/json/list`.
async fn page_target(port: &str) -> Result<String> {
    for _ in 0..100 {
        let mut stream = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await?;
        stream
            .write_all(
                format!("GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes(),
            )
            .await?;
        // Chromium keeps the connection open: read until the body its Content-Length names.
        let mut reply = Vec::new();
        let mut chunk = [0u8; 8192];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let reply = loop {
            let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                .await
                .map_err(|_| anyhow!("chromium's /json/list did not answer within 10 s"))??;
            reply.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&reply).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(usize::MAX);
                if body.len() >= length || n == 0 {
                    break text;
                }
            } else if n == 0 {
                break text;
            }
        };
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
        if let Ok(Value::Array(targets)) = serde_json::from_str::<Value>(body) {
            if let Some(ws) = targets
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                return Ok(ws.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("chromium listed no page target")
}
