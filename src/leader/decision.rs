//! The leader-election decision, as a pure function of the Lease as last
//! read, what this candidate saw of it before, and its own monotonic clock.
//!
//! ```text
//!   no Lease                         ─▶ Create
//!   holder = me                      ─▶ Renew
//!   holder empty (released)          ─▶ TakeOver
//!   holder = other, unchanged for
//!     the lease duration on MY clock ─▶ TakeOver
//!   otherwise                        ─▶ Follow
//! ```
//!
//! "Unchanged" is judged by the Lease's resourceVersion as this candidate
//! saw it, timed with its own monotonic clock from the moment it first saw
//! that version: no two machines' wall clocks are ever compared (client-go
//! does the same).

use std::time::{Duration, Instant};

/// What a candidate reads of the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// `spec.holderIdentity`; None or empty when released.
    pub holder: Option<String>,
    /// `spec.leaseDurationSeconds` as the holder wrote it.
    pub duration: Option<Duration>,
    /// `metadata.resourceVersion`: changes with every renewal.
    pub version: String,
}

/// A version of the Lease and when this candidate first saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    version: String,
    since: Instant,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// It is released or expired: take it over.
    TakeOver,
    /// Someone else holds it: wait.
    Follow {
        /// The holder.
        holder: String,
        /// How long until it would expire unless renewed.
        expires_in: Duration,
    },
}

/// Decides, updating `seen` with the version observed now. `fallback` is the
/// lease duration used when the Lease does not state one.
pub fn decide(
    me: &str,
    lease: Option<&LeaseView>,
    seen: &mut Option<Seen>,
    now: Instant,
    fallback: Duration,
) -> Decision {
    let Some(lease) = lease else {
        *seen = None;
        return Decision::Create;
    };
    if seen.as_ref().is_none_or(|s| s.version != lease.version) {
        *seen = Some(Seen { version: lease.version.clone(), since: now });
    }
    let holder = lease.holder.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    if holder == me {
        return Decision::Renew;
    }
    let since = seen.as_ref().map_or(now, |s| s.since);
    let duration = lease.duration.unwrap_or(fallback);
    let unchanged_for = now.saturating_duration_since(since);
    if unchanged_for >= duration {
        Decision::TakeOver
    } else {
        Decision::Follow { holder: holder.to_string(), expires_in: duration - unchanged_for }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(10);

    fn lease(holder: Option<&str>, version: &str) -> LeaseView {
        LeaseView { holder: holder.map(str::to_string), duration: Some(D), version: version.into() }
    }

    #[test]
    fn absent_ours_and_released_leases() {
        let now = Instant::now();
        let mut seen = None;
        assert_eq!(decide("a", None, &mut seen, now, D), Decision::Create);
        assert_eq!(decide("a", Some(&lease(Some("a"), "1")), &mut seen, now, D), Decision::Renew);
        assert_eq!(decide("a", Some(&lease(None, "2")), &mut seen, now, D), Decision::TakeOver);
        assert_eq!(decide("a", Some(&lease(Some(""), "3")), &mut seen, now, D), Decision::TakeOver);
    }

    #[test]
    fn another_holder_expires_only_after_a_full_duration_unchanged_on_our_clock() {
        let t0 = Instant::now();
        let mut seen = None;
        let held = lease(Some("b"), "7");
        assert_eq!(decide("a", Some(&held), &mut seen, t0, D), Decision::Follow { holder: "b".into(), expires_in: D });
        let t9 = t0 + Duration::from_secs(9);
        assert!(matches!(decide("a", Some(&held), &mut seen, t9, D), Decision::Follow { .. }));
        // A renewal (new version) restarts the count.
        let renewed = lease(Some("b"), "8");
        assert!(matches!(decide("a", Some(&renewed), &mut seen, t9, D), Decision::Follow { .. }));
        let t18 = t0 + Duration::from_secs(18);
        assert!(matches!(decide("a", Some(&renewed), &mut seen, t18, D), Decision::Follow { .. }));
        let t19 = t0 + Duration::from_secs(19);
        assert_eq!(decide("a", Some(&renewed), &mut seen, t19, D), Decision::TakeOver);
    }

    #[test]
    fn the_duration_written_on_the_lease_wins_over_the_fallback() {
        let t0 = Instant::now();
        let mut seen = None;
        let short = LeaseView { holder: Some("b".into()), duration: Some(Duration::from_secs(2)), version: "1".into() };
        decide("a", Some(&short), &mut seen, t0, D);
        assert_eq!(decide("a", Some(&short), &mut seen, t0 + Duration::from_secs(2), D), Decision::TakeOver);
        let unstated = LeaseView { duration: None, ..short };
        let mut seen = None;
        decide("a", Some(&unstated), &mut seen, t0, D);
        assert!(matches!(
            decide("a", Some(&unstated), &mut seen, t0 + Duration::from_secs(2), D),
            Decision::Follow { .. }
        ));
    }
}
