//! The deferred records waiting for the writer: a queue beside the command
//! channel, so that deferring a record does not wake the writer's thread.
//!
//! ```text
//!   defer(event) ── permit (room) ──▶ push ──▶ first in an empty queue of a parked writer,
//!                                              or max_batch reached?
//!                                                 └─ yes: one Wake on the command channel
//!   writer: after a commit it is armed: waits for a command, or one window, then takes the queue
//!           (a record deferred meanwhile waits less than the window, and wakes nobody);
//!           an armed writer that finds the queue empty parks: waits for a command alone
//!           commit = take (≤ max_batch, oldest first, permits given back) ++ the appends
//! ```
//!
//! A record deferred before an append was sent (in the order of the caller's
//! own actions, e.g. the proxy's statement records before the gateway's
//! outcome record of the same call) is in the queue when the writer takes
//! that append, and is written before it: the guarantee the channel alone
//! gave. Waking the writer once per window instead of once per record saved
//! ≈20 µs of CPU per statement at the database proxy (two cores, pgbench),
//! mostly context switches. Arming the writer after each commit saves the
//! one wake-up left per call at one request at a time: the outcome record,
//! first in the queue the decision's commit emptied, no longer wakes the
//! writer only for it to set its window.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::super::record::Event;

/// What the queue holds, under its lock.
#[derive(Default)]
struct Held {
    events: Vec<Event>,
    /// When the oldest event still held was deferred.
    since: Option<Instant>,
    /// The writer has stopped: nothing more is taken.
    closed: bool,
    /// The writer waits with a deadline of its own (it committed within the
    /// window): a first record needs no wake-up to be taken in time.
    armed: bool,
}

/// The deferred records, oldest first, bounded by `room`.
pub(super) struct DeferQueue {
    held: Mutex<Held>,
    /// One permit per record that may still be queued.
    room: Semaphore,
    max_batch: usize,
}

/// Why a record was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The queue is full.
    Full,
    /// The writer has stopped.
    Closed,
}

/// A record that was not queued, handed back with why.
pub(super) type Bounced = (Refused, Box<Event>);

/// What a push asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pushed {
    /// Nothing: the writer already knows when to take the queue.
    Quiet,
    /// Wake the writer: the queue was empty and the writer parked (it must
    /// arm its window) or the queue holds a whole batch.
    Wake,
}

impl DeferQueue {
    pub(super) fn new(capacity: usize, max_batch: usize) -> Self {
        DeferQueue { held: Mutex::new(Held::default()), room: Semaphore::new(capacity.max(1)), max_batch }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` for room, then queues `event`.
    pub(super) async fn push(&self, event: Event, timeout: Duration) -> Result<Pushed, Bounced> {
        match tokio::time::timeout(timeout, self.room.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            Ok(Err(_closed)) => return Err((Refused::Closed, Box::new(event))),
            Err(_elapsed) => return Err((Refused::Full, Box::new(event))),
        }
        self.queue(event)
    }

    /// Queues `event` if there is room now.
    pub(super) fn try_push(&self, event: Event) -> Result<Pushed, Bounced> {
        match self.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::Closed) => return Err((Refused::Closed, Box::new(event))),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err((Refused::Full, Box::new(event))),
        }
        self.queue(event)
    }

    fn queue(&self, event: Event) -> Result<Pushed, Bounced> {
        let mut held = self.held();
        if held.closed {
            return Err((Refused::Closed, Box::new(event)));
        }
        let was_empty = held.events.is_empty();
        if was_empty {
            held.since = Some(Instant::now());
        }
        held.events.push(event);
        let wake = (was_empty && !held.armed) || held.events.len() >= self.max_batch;
        Ok(if wake { Pushed::Wake } else { Pushed::Quiet })
    }

    /// The writer will take the queue within a window without being woken.
    pub(super) fn arm(&self) {
        self.held().armed = true;
    }

    /// The writer's window ran out: it parks if nothing is held (the next
    /// first record wakes it) and says so; if a record came, it must take it.
    pub(super) fn park(&self) -> bool {
        let mut held = self.held();
        let empty = held.events.is_empty();
        if empty {
            held.armed = false;
        }
        empty
    }

    /// When the oldest record held was deferred, if any.
    pub(super) fn since(&self) -> Option<Instant> {
        self.held().since
    }

    /// How many records are held.
    pub(super) fn len(&self) -> usize {
        self.held().events.len()
    }

    /// Takes the oldest records, at most `max_batch`, and gives their room
    /// back. What stays keeps its age, so it is taken at the next turn.
    pub(super) fn take(&self) -> Vec<Event> {
        let taken: Vec<Event> = {
            let mut held = self.held();
            let n = held.events.len().min(self.max_batch);
            let taken: Vec<Event> = held.events.drain(..n).collect();
            if held.events.is_empty() {
                held.since = None;
            }
            taken
        };
        self.room.add_permits(taken.len());
        taken
    }

    /// Refuses every later push and wakes those waiting for room.
    pub(super) fn close(&self) {
        self.held().closed = true;
        self.room.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Kind;

    fn event(n: u64) -> Event {
        Event { duration_us: Some(n), ..Event::new(Kind::Outcome) }
    }

    fn numbers(events: &[Event]) -> Vec<u64> {
        events.iter().filter_map(|e| e.duration_us).collect()
    }

    #[test]
    fn the_writer_is_woken_for_the_first_record_and_for_a_whole_batch_only() {
        let queue = DeferQueue::new(10, 3);
        assert_eq!(queue.try_push(event(1)).unwrap(), Pushed::Wake, "the first arms the window");
        let since = queue.since().expect("the oldest's time");
        assert_eq!(queue.try_push(event(2)).unwrap(), Pushed::Quiet);
        assert_eq!(queue.try_push(event(3)).unwrap(), Pushed::Wake, "a whole batch");
        assert_eq!(queue.try_push(event(4)).unwrap(), Pushed::Wake);
        assert_eq!(queue.since(), Some(since), "the window runs from the oldest");
        assert_eq!(numbers(&queue.take()), vec![1, 2, 3], "oldest first, one batch");
        assert_eq!(queue.since(), Some(since), "what stays is overdue with the rest");
        assert_eq!(numbers(&queue.take()), vec![4]);
        assert_eq!((queue.since(), queue.len()), (None, 0));
        assert_eq!(queue.try_push(event(5)).unwrap(), Pushed::Wake, "empty again: a new window");
    }

    #[test]
    fn an_armed_writer_is_not_woken_for_a_first_record_and_parks_only_when_empty() {
        let queue = DeferQueue::new(10, 3);
        queue.arm();
        assert_eq!(queue.try_push(event(1)).unwrap(), Pushed::Quiet, "the writer's own deadline takes it");
        assert!(!queue.park(), "a record is held: the writer must take it, not park");
        assert_eq!(queue.try_push(event(2)).unwrap(), Pushed::Quiet, "still armed");
        assert_eq!(queue.try_push(event(3)).unwrap(), Pushed::Wake, "a whole batch wakes it all the same");
        assert_eq!(numbers(&queue.take()), vec![1, 2, 3]);
        assert!(queue.park(), "empty: parked");
        assert_eq!(queue.try_push(event(4)).unwrap(), Pushed::Wake, "a parked writer is woken for the first");
        assert!(!queue.park(), "a parked writer with a record held takes it");
    }

    #[test]
    fn a_full_queue_refuses_until_the_writer_takes_and_a_closed_one_always() {
        let queue = DeferQueue::new(2, 10);
        queue.try_push(event(1)).unwrap();
        queue.try_push(event(2)).unwrap();
        let (why, back) = queue.try_push(event(3)).unwrap_err();
        assert_eq!((why, back.duration_us), (Refused::Full, Some(3)), "the event is handed back");
        assert_eq!(numbers(&queue.take()), vec![1, 2]);
        queue.try_push(event(3)).unwrap();
        queue.close();
        assert_eq!(queue.try_push(event(4)).unwrap_err().0, Refused::Closed);
    }

    #[tokio::test]
    async fn a_push_waits_for_room_within_its_timeout() {
        let queue = std::sync::Arc::new(DeferQueue::new(1, 10));
        queue.try_push(event(1)).unwrap();
        let refused = queue.push(event(2), Duration::from_millis(20)).await.unwrap_err();
        assert_eq!(refused.0, Refused::Full);
        let taker = std::sync::Arc::clone(&queue);
        let take = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            taker.take()
        });
        queue.push(event(2), Duration::from_secs(5)).await.unwrap();
        assert_eq!(numbers(&take.await.unwrap()), vec![1]);
        assert_eq!(numbers(&queue.take()), vec![2]);
        let closer = std::sync::Arc::clone(&queue);
        queue.try_push(event(3)).unwrap();
        let waiting = tokio::spawn(async move { closer.push(event(4), Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        queue.close();
        assert_eq!(waiting.await.unwrap().unwrap_err().0, Refused::Closed, "a closed queue wakes its waiters");
    }
}
