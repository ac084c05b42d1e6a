//! Completion callbacks of asynchronous invocations (OpenFaaS's `X-Callback-Url`). When an
//! invocation finishes (succeeded or dead-lettered), its status document is POSTed to the URL
//! the caller gave. A callback is a request this node makes on a caller's behalf, so only
//! `http://` URLs whose `host:port` the operator allowed (`--callback-allow`) are accepted;
//! everything else is refused when the invocation is submitted.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::App;
use crate::problem::Problem;

const MAX_URL: usize = 2048;
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Checks a callback URL against the allow-list.
pub(crate) fn check(url: &str, allowed: &[String]) -> Result<(), Problem> {
    let refuse = |why: String| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "callback_not_allowed", why);
    if url.len() > MAX_URL {
        return Err(refuse(format!("the callback URL is longer than {MAX_URL} characters")));
    }
    let uri: Uri = url.parse().map_err(|_| refuse(format!("`{url}` is not a URL")))?;
    if uri.scheme_str() != Some("http") {
        return Err(refuse("callbacks are sent over http:// only".into()));
    }
    let authority = uri.authority().map(|a| a.as_str().to_ascii_lowercase()).unwrap_or_default();
    if authority.contains('@') {
        return Err(refuse("callback URLs carry no credentials".into()));
    }
    let with_port = if uri.port().is_some() { authority.clone() } else { format!("{authority}:80") };
    if !allowed.iter().any(|a| a.eq_ignore_ascii_case(&with_port)) {
        return Err(refuse(format!(
            "`{with_port}` is not an allowed callback destination (the operator allows them with --callback-allow)"
        )));
    }
    Ok(())
}

/// POSTs `status` to `url`, retrying twice; failures are logged and counted, never retried
/// beyond that (the status stays readable at `/v1/invocations/{id}`).
pub(crate) fn send(app: &Arc<App>, id: String, url: String, status: serde_json::Value) {
    let app = app.clone();
    tokio::spawn(async move {
        let body = bytes::Bytes::from(status.to_string());
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
        for attempt in 1..=ATTEMPTS {
            // Re-checked: the allow-list may have changed since the invocation was accepted.
            if check(&url, &app.config.callback_allow).is_err() {
                break;
            }
            let req = hyper::Request::post(&url)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header("x-pixflow-invocation-id", &id)
                .body(Full::new(body.clone()));
            let Ok(req) = req else { break };
            match tokio::time::timeout(TIMEOUT, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    metrics::counter!("pixflow_callbacks_total", "outcome" => "ok").increment(1);
                    return;
                }
                Ok(Ok(resp)) => tracing::warn!(%id, status = %resp.status(), attempt, "callback refused"),
                Ok(Err(e)) => tracing::warn!(%id, error = %e, attempt, "callback failed"),
                Err(_) => tracing::warn!(%id, attempt, "callback timed out"),
            }
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        }
        metrics::counter!("pixflow_callbacks_total", "outcome" => "failed").increment(1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_http_destinations() {
        let allowed = vec!["hooks.internal:8080".to_owned(), "cms:80".to_owned()];
        assert!(check("http://hooks.internal:8080/done?x=1", &allowed).is_ok());
        assert!(check("http://CMS/cb", &allowed).is_ok());
        for bad in [
            "https://hooks.internal:8080/",
            "http://hooks.internal:8081/",
            "http://169.254.169.254/latest/meta-data",
            "http://user:pw@cms/cb",
            "not a url",
            "file:///etc/passwd",
        ] {
            assert_eq!(check(bad, &allowed).unwrap_err().code, "callback_not_allowed", "{bad}");
        }
        assert!(check(&format!("http://cms/{}", "a".repeat(3000)), &allowed).is_err());
    }
}
