//! The `--http` server: `/metrics` (Prometheus), `/api/alarms`, `/api/hosts?top=N`,
//! `/api/hosts/{ip}` (a host's drill-down), `/api/history` (JSON) and `/` (also as
//! `/host/{ip}`), one self-contained page that shows them live. In `run` it has a
//! thread and a runtime of its own ([`HttpThread`]), so that nothing the agent's loop
//! does (a long pass of the meter's drain) delays an answer; it only reads the
//! [`Status`] snapshot.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use serde::Deserialize;

use super::{Status, TOP_HOSTS};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot listen on {addr} for --http: {source} (is another process using the port, or is the address not on this host?)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The page, with its script and style inline (no external assets).
const PAGE: &str = include_str!("page.html");

/// Binds `addr` (before the agent drops its capabilities: a port below 1024 needs
/// CAP_NET_BIND_SERVICE). Connections wait in the listen queue until [`HttpThread`]
/// serves them.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, HttpError> {
    let bound = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| HttpError::Bind { addr, source })?;
    Ok(bound)
}

/// The server on a thread of its own, with a current-thread runtime of its own: the
/// agent's loop (the meter's drain, the ring buffer, signals) may block its runtime for
/// a while without delaying an answer. The thread gives up every capability as it
/// starts (the socket is bound already). Dropping it stops the server and joins the
/// thread.
pub struct HttpThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpThread {
    pub fn start(
        listener: std::net::TcpListener,
        status: Arc<Status>,
        web: super::access::WebConfig,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                crate::privileges::drop_thread_capabilities();
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => serve(l, status, &web),
                        Err(e) => log::warn!("the --http server did not start: {e}"),
                    }
                    // Until the agent stops (or drops the sender).
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for HttpThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/metrics", get(metrics))
        .route("/api/alarms", get(alarms))
        .route("/api/hosts", get(hosts))
        // The host drill-down: its JSON, and the page opened on the host's view.
        .route("/api/hosts/{ip}", get(super::detail::host))
        .route("/host/{ip}", get(|| async { Html(PAGE) }))
        .route("/api/history", get(history))
        // Operators' decisions: acknowledge an alarm, suppress a host or network.
        .merge(super::decisions::routes())
        .with_state(status)
}

/// Serves until the runtime ends, without TLS nor authentication (but with the
/// cross-site checks of [`super::access`]); an error is logged.
pub fn spawn(listener: tokio::net::TcpListener, status: Arc<Status>) {
    serve(listener, status, &super::access::WebConfig::default());
}

/// Serves until the runtime ends, as the `--http-config` file says (TLS,
/// authentication); an error is logged. Every request passes [`super::access::guard`]
/// first, before routing: whatever [`router`] holds, and a path it does not.
pub fn serve(
    listener: tokio::net::TcpListener,
    status: Arc<Status>,
    web: &super::access::WebConfig,
) {
    use super::access::{Guard, Refusals, guard};
    use axum::serve::ListenerExt;
    let refusals = Arc::new(Refusals::new(status.clone()));
    let layer =
        axum::middleware::from_fn_with_state(Arc::new(Guard::new(web, refusals.clone())), guard);
    let app = router(status)
        .layer(layer)
        .into_make_service_with_connect_info::<SocketAddr>();
    match &web.tls {
        Some(tls) => match super::tls::TlsListener::new(listener, tls.clone(), refusals) {
            Ok(l) => {
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(l.tap_io(|_| ()), app).await {
                        log::warn!("the --http server stopped: {e}");
                    }
                });
            }
            Err(e) => log::warn!("the --http server did not start: {e}"),
        },
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    log::warn!("the --http server stopped: {e}");
                }
            });
        }
    }
}

async fn metrics(State(s): State<Arc<Status>>) -> impl IntoResponse {
    let mut body = s.read(super::metrics::encode);
    body.push_str(&s.decisions.metrics(std::time::SystemTime::now()));
    (
        [(header::CONTENT_TYPE, super::metrics::content_type())],
        body,
    )
}

async fn alarms(State(s): State<Arc<Status>>) -> impl IntoResponse {
    let mut v = s.read(|st| st.alarms_json());
    s.decisions
        .decorate_alarms(&mut v, std::time::SystemTime::now());
    Json(v)
}

#[derive(Deserialize)]
struct HostsQuery {
    top: Option<usize>,
}

async fn hosts(State(s): State<Arc<Status>>, Query(q): Query<HostsQuery>) -> impl IntoResponse {
    let top = q.top.unwrap_or(10).min(TOP_HOSTS);
    let mut v = s.read(|st| st.hosts_json(top));
    s.decisions
        .decorate_hosts(&mut v, std::time::SystemTime::now());
    Json(v)
}

async fn history(State(s): State<Arc<Status>>) -> impl IntoResponse {
    Json(s.read(|st| st.history_json()))
}
