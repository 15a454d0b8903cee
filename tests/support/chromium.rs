//! A real headless Chromium (Debian's `chromium`) driven over the DevTools protocol: the
//! browser is started with `--remote-debugging-port=0`, the test reads the port it chose
//! from its stderr, and talks to its one page over a WebSocket, as Puppeteer does. Used by
//! the status page's test to load the page, type in its search box as a person would, read
//! the DOM, list every network request, and take a screenshot.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const MISSING: &str = "chromium not found: install it with `apt-get install chromium` \
                       (tests/run.sh does)";

/// A running headless Chromium with its own profile directory.
pub struct Chromium {
    child: Child,
    port: u16,
    profile: std::path::PathBuf,
}

impl Chromium {
    pub fn start() -> Chromium {
        let profile = std::env::temp_dir().join(format!(
            "seg-chromium-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&profile).expect("profile dir");
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                // Root in a container has no user namespace for Chromium's sandbox.
                "--no-sandbox",
                "--disable-gpu",
                // A container's /dev/shm is often 64 MiB: keep shared memory in /tmp.
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1400,1000",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{MISSING} ({e})"));
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
        let stderr = child.stderr.take().expect("stderr");
        let (found, port) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                        let port: u16 = rest.split('/').next().unwrap().parse().unwrap();
                        let _ = found.send(port);
                        sent = true;
                    }
                }
            }
        });
        let port = port
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium did not say where DevTools listens within 30 s");
        Chromium {
            child,
            port,
            profile,
        }
    }

    /// The browser's one page (about:blank at start).
    pub async fn page(&self) -> Page {
        let list: Vec<Value> = serde_json::from_str(&http_get(self.port, "/json/list").await)
            .expect("the DevTools target list");
        let url = list
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the page's DevTools socket");
        let mut page = Page {
            socket,
            next_id: 0,
            events: Vec::new(),
        };
        page.call("Page.enable", json!({})).await;
        page.call("Network.enable", json!({})).await;
        page
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One page of the browser, over its DevTools socket.
pub struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    /// Every event seen so far, in order.
    pub events: Vec<Value>,
}

impl Page {
    /// Calls a DevTools method and returns its result (events that come first are kept).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .expect("send to chromium");
        loop {
            let message = self.next_message().await;
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("{method}: {error}");
                }
                return message["result"].clone();
            }
            self.events.push(message);
        }
    }

    async fn next_message(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("chromium answered within 30 s")
                .expect("the DevTools socket is open")
                .expect("a DevTools frame");
            if let Message::Text(text) = frame {
                return serde_json::from_str(&text).expect("DevTools JSON");
            }
        }
    }

    /// Waits for the event `method` not yet seen (after `since` events).
    pub async fn wait_for(&mut self, method: &str, since: usize) -> Value {
        loop {
            if let Some(event) = self.events[since.min(self.events.len())..]
                .iter()
                .find(|e| e["method"] == method)
            {
                return event.clone();
            }
            let message = self.next_message().await;
            self.events.push(message);
        }
    }

    /// Loads `url` and waits for its load event.
    pub async fn navigate(&mut self, url: &str) {
        let since = self.events.len();
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for("Page.loadEventFired", since).await;
    }

    /// The value of a JavaScript expression evaluated in the page (the test's, not the
    /// page's: the page itself has none).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Types `text` into the focused element, key by key as a keyboard would, then presses
    /// Enter and waits for the page it loads.
    pub async fn type_and_enter(&mut self, text: &str) {
        for c in text.chars() {
            let key = c.to_string();
            self.call(
                "Input.dispatchKeyEvent",
                json!({ "type": "keyDown", "key": key, "text": key }),
            )
            .await;
            self.call(
                "Input.dispatchKeyEvent",
                json!({ "type": "keyUp", "key": key }),
            )
            .await;
        }
        let since = self.events.len();
        let enter = json!({ "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13 });
        let mut down = enter.clone();
        down["type"] = "keyDown".into();
        down["text"] = "\r".into();
        self.call("Input.dispatchKeyEvent", down).await;
        let mut up = enter;
        up["type"] = "keyUp".into();
        self.call("Input.dispatchKeyEvent", up).await;
        self.wait_for("Page.loadEventFired", since).await;
    }

    /// Every URL the page requested so far.
    pub fn requested(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_string))
            .collect()
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("PNG data"))
            .expect("base64 PNG")
    }
}

/// A GET to the DevTools HTTP endpoint; the body.
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("DevTools HTTP");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    // Chromium keeps the connection open whatever the request says: read the head, then
    // Content-Length bytes.
    let mut answer = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("DevTools HTTP answered within 10 s")
            .expect("read");
        answer.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("a Content-Length");
            if body.len() >= length || n == 0 {
                return body.to_string();
            }
        }
        assert!(n > 0, "DevTools HTTP closed early");
    }
}
