//! Wake-ups: LISTEN on the outbox's channel, so a commit reaches the relay in milliseconds.
//!
//! Notifications are hints, never the source of truth: one lost while the listening
//! connection was down only delays work until the poll interval, and after every (re)connect
//! the relay is woken once to catch up.

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::retry::Backoff;

/// Waits before listening again: 0.2 s after a session that worked, doubling with each failure
/// in a row, at most 5 s.
const LISTEN_RETRY: Backoff = Backoff {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(5),
};

pub async fn listen(pool: PgPool, channel: String, wake: Arc<Notify>, stop: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            r = connected => r,
            _ = stop.cancelled() => return,
        };
        match &mut listener {
            Ok(l) => {
                if failures > 0 {
                    tracing::info!(%channel, "listening for notifications again");
                }
                failures = 0;
                wake.notify_one();
                loop {
                    tokio::select! {
                        n = l.recv() => match n {
                            Ok(_) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "notification listener lost; polling meanwhile");
                                break;
                            }
                        },
                        _ = stop.cancelled() => return,
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %e, failures, "cannot listen for notifications; polling meanwhile");
                }
            }
        }
        let wait = LISTEN_RETRY.step(failures);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}
