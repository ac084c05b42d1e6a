//! The node's HTTP/1 connections, shared by the API, CDN and S3 listeners: hyper with a
//! header-read deadline, request bodies that must keep arriving (an idle deadline and a
//! minimum rate), and refused requests whose unread body is drained for a bounded time so the
//! client reads the answer instead of a reset connection.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Request, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a client may take, and how much of a refused body is read before closing.
#[derive(Debug, Clone, Copy)]
pub struct ClientDeadlines {
    /// The whole request head (line and headers) must arrive within this; also the longest an
    /// idle kept-alive connection stays open.
    pub header_read: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_idle: Duration,
    /// Bytes per second a body must average once it has been arriving for `body_idle`.
    pub body_min_rate: u64,
    /// Of a body the handler did not read (a refusal before reading), at most this many
    /// bytes are read and dropped before the connection closes…
    pub linger_bytes: u64,
    /// …within this time.
    pub linger: Duration,
}

impl Default for ClientDeadlines {
    fn default() -> Self {
        ClientDeadlines {
            header_read: Duration::from_secs(10),
            body_idle: Duration::from_secs(30),
            body_min_rate: 1024,
            linger_bytes: 16 << 20,
            linger: Duration::from_secs(5),
        }
    }
}

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("no request body bytes arrived for {0:?}")]
    Idle(Duration),
    #[error("the request body arrived slower than {0} bytes per second")]
    TooSlow(u64),
    #[error(transparent)]
    Client(#[from] hyper::Error),
}

/// Whether an error (or one of its sources) is a slow client cut off by the deadlines.
pub(crate) fn is_slow_body(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(b) = e.downcast_ref::<BodyError>() {
            return matches!(b, BodyError::Idle(_) | BodyError::TooSlow(_));
        }
        cur = e.source();
    }
    false
}

/// A request body under the deadlines; a body dropped unread is drained in the background.
pub struct GuardedBody {
    inner: Option<Incoming>,
    deadlines: ClientDeadlines,
    idle: Pin<Box<Sleep>>,
    started: Instant,
    received: u64,
    /// The body ended, failed or was cut off: nothing to drain.
    done: bool,
}

impl GuardedBody {
    pub fn new(inner: Incoming, deadlines: ClientDeadlines) -> GuardedBody {
        let now = Instant::now();
        GuardedBody {
            inner: Some(inner),
            deadlines,
            idle: Box::pin(tokio::time::sleep_until(now + deadlines.body_idle)),
            started: now,
            received: 0,
            done: false,
        }
    }

    fn cut(&mut self, why: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let phase = if matches!(why, BodyError::Idle(_)) { "body_idle" } else { "body_rate" };
        metrics::counter!("pixflow_http_slow_clients_total", "phase" => phase).increment(1);
        self.done = true;
        self.inner = None;
        Poll::Ready(Some(Err(why)))
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                let now = Instant::now();
                let elapsed = now.duration_since(this.started);
                let d = this.deadlines;
                if elapsed > d.body_idle && (this.received as f64) < d.body_min_rate as f64 * elapsed.as_secs_f64() {
                    return this.cut(BodyError::TooSlow(d.body_min_rate));
                }
                this.idle.as_mut().reset(now + d.body_idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => this.cut(BodyError::Idle(this.deadlines.body_idle)),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else { return };
        if self.done || body.is_end_stream() {
            return;
        }
        // The handler answered without reading the whole body (a 413, 429 or 503 before
        // reading): read a bounded amount so the client, still sending, gets to read the answer.
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let d = self.deadlines;
        rt.spawn(async move {
            metrics::counter!("pixflow_http_lingering_total").increment(1);
            let mut left = d.linger_bytes;
            let _ = tokio::time::timeout(d.linger, async {
                while left > 0 {
                    match body.frame().await {
                        Some(Ok(frame)) => left = left.saturating_sub(frame.data_ref().map_or(0, |b| b.len() as u64)),
                        _ => break,
                    }
                }
            })
            .await;
        });
    }
}

/// Serves `handle` on `listener` until `stop` is cancelled: each connection gets the header
/// deadline and its requests guarded bodies; at the stop, connections finish the request in
/// progress and close. Tracked by `tracker`, so a shutdown can wait for them.
pub(crate) async fn serve<H, Fut, RB, E>(
    listener: tokio::net::TcpListener,
    handle: H,
    deadlines: ClientDeadlines,
    tracker: TaskTracker,
    stop: CancellationToken,
) where
    H: Fn(Request<GuardedBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<RB>, E>> + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (handle, stop) = (handle.clone(), stop.clone());
        tracker.spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                handle(req.map(|b| GuardedBody::new(b, deadlines)))
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(deadlines.header_read);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                if e.is_timeout() {
                    metrics::counter!("pixflow_http_slow_clients_total", "phase" => "header").increment(1);
                }
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

/// An axum router as a connection handler.
pub(crate) fn router_handler(
    router: axum::Router,
) -> impl Fn(Request<GuardedBody>) -> RouteFuture + Clone + Send + Sync + 'static {
    move |req| tower::ServiceExt::oneshot(router.clone(), req.map(axum::body::Body::new))
}

type RouteFuture = tower::util::Oneshot<axum::Router, Request<axum::body::Body>>;
