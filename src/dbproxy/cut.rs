//! What ends a relayed connection from outside it: the end of the call it
//! was opened for and the expiry of the caller's credential. Both must cut
//! the connection wherever the relay is waiting — also in the middle of a
//! write to an MCP server that stopped reading, or to a store that stopped
//! reading because nobody reads its answers.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::Sleep;

/// Longest the proxy waits to say goodbye (a notice, a shutdown) once a
/// connection is over: a peer that stopped reading does not keep it.
pub const FAREWELL_WAIT: Duration = Duration::from_secs(1);

/// Why a connection was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The call this connection was opened for has ended.
    CallEnded,
    /// The caller's credential has expired.
    CredentialExpired,
}

/// The two signals of one connection.
pub struct Cut {
    ended: watch::Receiver<bool>,
    expiry: Pin<Box<Sleep>>,
}

impl Cut {
    /// `ended` turns true (or its sender goes) when the call ends;
    /// `expires` is the credential's end.
    pub fn new(ended: watch::Receiver<bool>, expires: Instant) -> Self {
        Cut { ended, expiry: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(expires))) }
    }

    /// Waits until the connection must be cut.
    pub async fn wait(&mut self) -> Cause {
        tokio::select! {
            biased;
            // A closed sender means the call's grant is gone: ended too.
            _ = self.ended.wait_for(|ended| *ended) => Cause::CallEnded,
            _ = &mut self.expiry => Cause::CredentialExpired,
        }
    }

    /// Runs `io` unless the connection is cut while it waits (then `io` is
    /// dropped where it waits). `io` is polled first: a write that goes
    /// through at once (the usual case) costs no look at the signals.
    pub async fn unless<T>(&mut self, io: impl Future<Output = T>) -> Result<T, Cause> {
        tokio::select! {
            biased;
            out = io => Ok(out),
            cause = self.wait() => Err(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_that_never_finishes_is_cut_when_the_call_ends() {
        let (tx, rx) = watch::channel(false);
        let mut cut = Cut::new(rx, Instant::now() + Duration::from_secs(3600));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(true);
        });
        assert_eq!(cut.unless(std::future::pending::<()>()).await, Err(Cause::CallEnded));
    }

    #[tokio::test]
    async fn a_dropped_call_counts_as_ended() {
        let (tx, rx) = watch::channel(false);
        drop(tx);
        let mut cut = Cut::new(rx, Instant::now() + Duration::from_secs(3600));
        assert_eq!(cut.wait().await, Cause::CallEnded);
    }

    #[tokio::test]
    async fn the_credentials_expiry_cuts_and_keeps_cutting() {
        let (_tx, rx) = watch::channel(false);
        let mut cut = Cut::new(rx, Instant::now() + Duration::from_millis(20));
        assert_eq!(cut.unless(std::future::pending::<()>()).await, Err(Cause::CredentialExpired));
        // Asked again after it fired, it still says so at once.
        assert_eq!(cut.wait().await, Cause::CredentialExpired);
    }

    #[tokio::test]
    async fn io_that_finishes_first_is_not_cut() {
        let (_tx, rx) = watch::channel(false);
        let mut cut = Cut::new(rx, Instant::now() + Duration::from_secs(3600));
        assert_eq!(cut.unless(async { 7 }).await, Ok(7));
    }
}
