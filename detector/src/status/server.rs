//! The `--http` server: `/metrics` (Prometheus), `/api/alarms`, `/api/hosts?top=N`,
//! `/api/history` (JSON) and `/`, one self-contained page that shows them live. It runs
//! on the agent's main runtime and only reads the [`Status`] snapshot.

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
/// CAP_NET_BIND_SERVICE).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/metrics", get(metrics))
        .route("/api/alarms", get(alarms))
        .route("/api/hosts", get(hosts))
        .route("/api/history", get(history))
        .with_state(status)
}

/// Serves until the runtime ends; an error is logged.
pub fn spawn(listener: tokio::net::TcpListener, status: Arc<Status>) {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(status)).await {
            log::warn!("the --http server stopped: {e}");
        }
    });
}

async fn metrics(State(s): State<Arc<Status>>) -> impl IntoResponse {
    let body = s.read(super::metrics::encode);
    (
        [(header::CONTENT_TYPE, super::metrics::content_type())],
        body,
    )
}

async fn alarms(State(s): State<Arc<Status>>) -> impl IntoResponse {
    Json(s.read(|st| st.alarms_json()))
}

#[derive(Deserialize)]
struct HostsQuery {
    top: Option<usize>,
}

async fn hosts(State(s): State<Arc<Status>>, Query(q): Query<HostsQuery>) -> impl IntoResponse {
    let top = q.top.unwrap_or(10).min(TOP_HOSTS);
    Json(s.read(|st| st.hosts_json(top)))
}

async fn history(State(s): State<Arc<Status>>) -> impl IntoResponse {
    Json(s.read(|st| st.history_json()))
}
