//! The live feed: every window an applied batch changed, pushed to Server-Sent Events
//! subscribers (`GET /api/v1/analytics/stream`). Slow subscribers skip ahead rather than
//! hold the consumer back.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::engine::WindowReport;

#[derive(Debug, Clone)]
pub struct Feed {
    updates: broadcast::Sender<WindowReport>,
    /// Ends every open stream, so subscribers do not hold a graceful shutdown open.
    shutdown: CancellationToken,
}

impl Feed {
    pub fn new(shutdown: CancellationToken) -> Feed {
        Feed {
            updates: broadcast::channel(1024).0,
            shutdown,
        }
    }

    pub fn publish(&self, window: WindowReport) {
        // No subscribers is not an error.
        let _ = self.updates.send(window);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WindowReport> {
        self.updates.subscribe()
    }
}

/// One `window` event per updated window, as JSON; a comment every 15 s keeps proxies open.
pub async fn stream(
    State(feed): State<Feed>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let shutdown = feed.shutdown.clone();
    let updates = stream::unfold(feed.subscribe(), move |mut receiver| {
        let shutdown = shutdown.clone();
        async move {
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return None,
                    next = receiver.recv() => next,
                };
                match next {
                    Ok(window) => {
                        let event = Event::default()
                            .event("window")
                            .json_data(&window)
                            .unwrap_or_default();
                        return Some((Ok(event), receiver));
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, "a slow feed subscriber skipped updates");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Sse::new(updates).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
