//! A small W3C WebDriver client for the page's tests: chromedriver on a free local port,
//! headless Chromium, and the dozen commands the tests use, over plain HTTP (ureq).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The key W3C WebDriver gives an element reference under.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium and its driver, from the environment (`CHROMIUM`, `CHROMEDRIVER`) or Debian's
/// packages `chromium` and `chromium-driver`.
pub fn browser() -> Option<(PathBuf, PathBuf)> {
    let pick = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let chromium = pick("CHROMIUM", "/usr/bin/chromium");
    let driver = pick("CHROMEDRIVER", "/usr/bin/chromedriver");
    (chromium.is_file() && driver.is_file()).then_some((chromium, driver))
}

/// A chromedriver process with one headless Chromium session; both end when dropped.
pub struct Browser {
    driver: Child,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
    agent: ureq::Agent,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.agent.delete(&self.session).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What a WebDriver command failed with.
#[derive(Debug)]
pub struct WdError(pub String);

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type WdResult<T> = Result<T, WdError>;

impl Browser {
    /// Start chromedriver on a free port and open a headless Chromium of `width` x `height`
    /// that saves downloads into `downloads`.
    pub fn start(
        chromium: &Path,
        driver: &Path,
        width: u32,
        height: u32,
        downloads: &Path,
    ) -> WdResult<Browser> {
        let mut child = Command::new(driver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| WdError(format!("starting {}: {e}", driver.display())))?;
        let out = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(out).lines();
        let port = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(p) = l.split("on port ").nth(1) {
                        let p = p.trim().trim_end_matches('.');
                        if let Ok(p) = p.parse::<u16>() {
                            if p != 0 {
                                break p;
                            }
                        }
                    }
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(WdError("chromedriver ended before listening".into()));
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build();
        let base = format!("http://127.0.0.1:{port}");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--lang=en-US",
                    format!("--window-size={width},{height}"),
                ],
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                },
            },
        }}});
        let mut b = Browser {
            driver: child,
            session: String::new(),
            agent,
        };
        // chromedriver may take a moment to answer after printing its port.
        let t = Instant::now();
        let v = loop {
            match call(&b.agent, "POST", &format!("{base}/session"), Some(&caps)) {
                Ok(v) => break v,
                Err(e) if t.elapsed() > Duration::from_secs(30) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let id = v["sessionId"]
            .as_str()
            .ok_or_else(|| WdError(format!("no session id in {v}")))?;
        b.session = format!("{base}/session/{id}");
        Ok(b)
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> WdResult<Value> {
        call(
            &self.agent,
            method,
            &format!("{}{path}", self.session),
            body,
        )
    }

    pub fn goto(&self, url: &str) -> WdResult<()> {
        self.cmd("POST", "/url", Some(&json!({ "url": url })))
            .map(|_| ())
    }

    /// The first element matching a CSS selector.
    pub fn find(&self, css: &str) -> WdResult<String> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        elem(&v).ok_or_else(|| WdError(format!("no element id for {css}: {v}")))
    }

    /// Every element matching a CSS selector.
    pub fn find_all(&self, css: &str) -> WdResult<Vec<String>> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        Ok(v.as_array()
            .map(|a| a.iter().filter_map(elem).collect())
            .unwrap_or_default())
    }

    pub fn click(&self, el: &str) -> WdResult<()> {
        self.cmd("POST", &format!("/element/{el}/click"), Some(&json!({})))
            .map(|_| ())
    }

    /// Type `text` into an element (WebDriver's key codes: "\u{E007}" is Enter).
    pub fn send_keys(&self, el: &str, text: &str) -> WdResult<()> {
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(&json!({ "text": text })),
        )
        .map(|_| ())
    }

    pub fn clear(&self, el: &str) -> WdResult<()> {
        self.cmd("POST", &format!("/element/{el}/clear"), Some(&json!({})))
            .map(|_| ())
    }

    pub fn displayed(&self, el: &str) -> WdResult<bool> {
        let v = self.cmd("GET", &format!("/element/{el}/displayed"), None)?;
        Ok(v.as_bool().unwrap_or(false))
    }

    /// Run `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub fn exec(&self, script: &str, args: &[Value]) -> WdResult<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// Move the pointer over the middle of an element (scrolled into view first).
    pub fn hover(&self, el: &str) -> WdResult<()> {
        let origin = json!({ ELEMENT: el });
        self.exec(
            "arguments[0].scrollIntoView({block: 'center'});",
            std::slice::from_ref(&origin),
        )?;
        self.cmd(
            "POST",
            "/actions",
            Some(&json!({ "actions": [{
                "type": "pointer", "id": "mouse", "parameters": { "pointerType": "mouse" },
                "actions": [{ "type": "pointerMove", "duration": 0, "origin": origin, "x": 0, "y": 0 }],
            }]})),
        )
        .map(|_| ())
    }

    /// Press keys on whatever has the focus.
    pub fn keys(&self, keys: &[&str]) -> WdResult<()> {
        let mut actions = Vec::new();
        for k in keys {
            actions.push(json!({ "type": "keyDown", "value": k }));
            actions.push(json!({ "type": "keyUp", "value": k }));
        }
        self.cmd(
            "POST",
            "/actions",
            Some(&json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] })),
        )
        .map(|_| ())
    }

    pub fn set_window(&self, width: u32, height: u32) -> WdResult<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(&json!({ "width": width, "height": height })),
        )
        .map(|_| ())
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> WdResult<Vec<u8>> {
        let v = self.cmd("GET", "/screenshot", None)?;
        let b64 = v
            .as_str()
            .ok_or_else(|| WdError("no screenshot data".into()))?;
        base64(b64).ok_or_else(|| WdError("the screenshot is not base64".into()))
    }

    /// Poll `script` (a function body) until it returns something other than null, false or
    /// an empty string; that value. Fails after `timeout`, with what the page showed.
    pub fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> WdResult<Value> {
        let t = Instant::now();
        loop {
            let v = self.exec(script, &[])?;
            let truthy = !matches!(&v, Value::Null | Value::Bool(false))
                && v.as_str().is_none_or(|s| !s.is_empty());
            if truthy {
                return Ok(v);
            }
            if t.elapsed() > timeout {
                let page = self
                    .exec("return document.body.innerText", &[])
                    .unwrap_or_default();
                return Err(WdError(format!(
                    "waited {:.0} s for {what}; the page shows:\n{}",
                    timeout.as_secs_f64(),
                    page.as_str().unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn elem(v: &Value) -> Option<String> {
    v.get(ELEMENT).and_then(Value::as_str).map(str::to_owned)
}

/// One WebDriver command: its `value`, or the error WebDriver reported.
fn call(agent: &ureq::Agent, method: &str, url: &str, body: Option<&Value>) -> WdResult<Value> {
    let req = agent.request(method, url);
    let res = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    let text = match res {
        Ok(r) => r.into_string(),
        Err(ureq::Error::Status(code, r)) => {
            let t = r.into_string().unwrap_or_default();
            return Err(WdError(format!("{method} {url}: {code}: {t}")));
        }
        Err(e) => return Err(WdError(format!("{method} {url}: {e}"))),
    }
    .map_err(|e| WdError(format!("{method} {url}: reading: {e}")))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| WdError(format!("{method} {url}: {e}")))?;
    Ok(v.get("value").cloned().unwrap_or(Value::Null))
}

/// Standard base64 (with padding) to bytes.
fn base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for chunk in s.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = if i >= chunk.len() - pad { 0 } else { val(c)? };
            n |= v << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad.min(2)]);
    }
    Some(out)
}

#[test]
fn base64_decodes() {
    assert_eq!(base64("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(base64("aGk=").unwrap(), b"hi");
    assert_eq!(base64("YWJj").unwrap(), b"abc");
    assert!(base64("a$==").is_none());
}
