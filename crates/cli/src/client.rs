//! The CLI's client commands are HTTP calls a user could make with curl: `deploy` PUTs a
//! manifest, `functions list` GETs the live state. One small HTTP/1 client, no TLS (the CLI
//! talks to a node it can reach directly; put TLS in front of the node for remote use).

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Where the server is and how to authenticate.
#[derive(clap::Args)]
pub struct Remote {
    /// The pixflow node's base URL.
    #[arg(long, env = "PIXFLOW_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API token (default: the admin token `pixflow serve` wrote into --data-dir).
    #[arg(long, env = "PIXFLOW_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data folder of a local `pixflow serve`, to read its admin token from.
    #[arg(long, env = "PIXFLOW_DATA_DIR", default_value = "pixflow-data")]
    pub data_dir: std::path::PathBuf,
}

impl Remote {
    fn token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| std::fs::read_to_string(self.data_dir.join("admin-token")).ok().map(|t| t.trim().to_owned()))
    }

    /// Sends one request; returns the status and the body.
    pub async fn call(&self, method: hyper::Method, path: &str, body: Vec<u8>) -> Result<(u16, serde_json::Value)> {
        let url = format!("{}{path}", self.server.trim_end_matches('/'));
        let mut req = hyper::Request::builder().method(method).uri(&url);
        if let Some(t) = self.token() {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req =
            req.body(Full::new(bytes::Bytes::from(body))).with_context(|| format!("building a request to {url}"))?;
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
        let resp = client.request(req).await.with_context(|| format!("calling {url} (is `pixflow serve` running?)"))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.context("reading the answer")?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }
}

/// The problem details of a failed call, as one line.
pub fn problem_line(status: u16, body: &serde_json::Value) -> String {
    let detail = body["detail"].as_str().unwrap_or_default();
    let code = body["code"].as_str().unwrap_or("error");
    let mut line = format!("{status} [{code}] {detail}");
    if let Some(errors) = body["errors"].as_array() {
        for e in errors {
            line.push_str(&format!(
                "\n  {}: {}",
                e["field"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            ));
        }
    }
    line
}
