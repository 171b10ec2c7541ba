//! The HTTP endpoints, on `http.address`:
//!
//! * `GET /metrics`: Prometheus (OpenMetrics text) exposition of [`crate::metrics`].
//! * `GET /livez`: 200 while the process runs.
//! * `GET /readyz`: 200 when Postgres and every backend answered their last probe, 503 with the
//!   reasons otherwise (before the first probe, too).
//! * `GET /health`: JSON: each component's state, the last successful publish, the backlog
//!   figures and threshold states, this relay's counters. 200 when ready, 503 otherwise.
//!
//! Handlers read what the relay's housekeeping last saw ([`Observed`]); a request never touches the database
//! or a broker, so a scrape storm cannot load either.

use crate::metrics::Metrics;
use crate::snapshot::{Observed, Stats};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub observed: Arc<Observed>,
    pub stats: Arc<Stats>,
    pub instance: String,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .with_state(state)
}

/// Binds `address` now (so a taken port stops start-up, naming the key) and serves until
/// `stop`.
pub async fn serve(
    address: &str,
    state: AppState,
    stop: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), std::io::Error> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    let app = router(state);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the HTTP server stopped");
        }
    });
    Ok((local, task))
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.observed.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn health(State(s): State<AppState>) -> Response {
    let snap = s.observed.snapshot();
    let ready = snap.ready();
    let code = if ready.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let st = &s.stats;
    let body = serde_json::json!({
        "status": if ready.is_ok() { "ready" } else { "not_ready" },
        "reason": ready.err(),
        "instance": s.instance,
        "database": snap.database,
        "backends": snap.backends,
        "backlog": snap.backlog,
        "last_publish_at": s.observed.last_publish(),
        "relay": {
            "published": st.published.load(Ordering::Relaxed),
            "failed": st.failed.load(Ordering::Relaxed),
            "retried": st.retried.load(Ordering::Relaxed),
            "in_flight": st.in_flight.load(Ordering::Relaxed),
            "lost_claims": st.lost_claims.load(Ordering::Relaxed),
        },
        "partitions": {
            "owned": st.owned_partitions.load(Ordering::Relaxed),
            "of": crate::store::PARTITIONS,
            "relays": st.members.load(Ordering::Relaxed),
            "rebalances": st.rebalances.load(Ordering::Relaxed),
        },
    });
    (code, Json(body)).into_response()
}
