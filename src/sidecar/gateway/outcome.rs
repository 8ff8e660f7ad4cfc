//! Step 9: the outcome record, when the answer is complete or cut off.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::Gateway;
use crate::audit::record::{Event, Kind, Outcome, OutcomeStatus, SchemaDrift};

/// The outcome record of a call. It is deferred: the answer does not wait
/// for it, and it is made durable with the next call's decision record (or
/// within the WAL's defer window), so a call costs one fsync, not two.
/// A `tools/list` answer's outcome carries its schema drift.
pub(super) async fn record_outcome(
    gw: &Gateway,
    correlation: &str,
    outcome: Outcome,
    started: Instant,
    schema_drift: Option<SchemaDrift>,
) {
    let mut event = outcome_event(correlation, outcome, started);
    event.schema_drift = schema_drift;
    gw.tag_outcome(&mut event);
    if let Err(e) = gw.wal.defer(event).await {
        tracing::error!(error = %e, "an outcome record could not be queued");
    }
}

pub(super) fn outcome_event(correlation: &str, outcome: Outcome, started: Instant) -> Event {
    Event {
        correlation: Some(correlation.to_string()),
        outcome: Some(outcome),
        duration_us: Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
        ..Event::new(Kind::Outcome)
    }
}

/// An SSE body relayed as it arrives, recording its outcome when it ends,
/// fails, or is dropped because the client went away. (Calls with database
/// access are never streamed: their answer waits for a durable outcome.)
pub(super) struct OutcomeStream {
    inner: futures::stream::BoxStream<'static, Result<Bytes, hyper::Error>>,
    pending: Option<(Arc<Gateway>, String, u16, Instant)>,
}

impl OutcomeStream {
    pub(super) fn new(
        inner: futures::stream::BoxStream<'static, Result<Bytes, hyper::Error>>,
        gw: Arc<Gateway>,
        correlation: String,
        http_status: u16,
        started: Instant,
    ) -> Self {
        OutcomeStream { inner, pending: Some((gw, correlation, http_status, started)) }
    }

    fn finish(&mut self, status: OutcomeStatus) {
        if let Some((gw, correlation, http_status, started)) = self.pending.take() {
            let outcome = Outcome { status, http_status: Some(http_status), rpc_error: None, rows: None };
            // A full queue is waited for off the response's path.
            let mut event = outcome_event(&correlation, outcome, started);
            gw.tag_outcome(&mut event);
            if let Err(event) = gw.wal.try_defer(event) {
                tokio::spawn(async move {
                    if let Err(e) = gw.wal.defer(*event).await {
                        tracing::error!(error = %e, "an outcome record could not be queued");
                    }
                });
            }
        }
    }
}

impl Stream for OutcomeStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(Some(Err(_))) => {
                self.finish(OutcomeStatus::Error);
                Poll::Ready(Some(Err(std::io::Error::other("the MCP server's stream failed"))))
            }
            Poll::Ready(None) => {
                self.finish(OutcomeStatus::Ok);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for OutcomeStream {
    fn drop(&mut self) {
        self.finish(OutcomeStatus::Cancelled);
    }
}
