//! Leader election on a `coordination.k8s.io/v1` Lease, so the operator can
//! run as several replicas with one writing at a time.
//!
//! ```text
//!   every retry period:  GET Lease ─ decide ─┬─ Create / Renew / TakeOver ─ PUT with resourceVersion (compare-and-set)
//!                                            │        success ─▶ lead until (request sent + renew deadline)
//!                                            └─ Follow ─▶ standby (caches warm, reconciles do nothing)
//!   SIGTERM (leading):   stop reconciling ─▶ PUT holder "" ─▶ a standby takes over at its next poll
//! ```
//!
//! Fencing: leadership is a deadline on this process's monotonic clock,
//! `renew deadline` after the moment the last successful renewal was *sent*.
//! A standby takes over only after seeing the Lease unchanged for the whole
//! lease duration on its own clock, which starts after that renewal reached
//! the server. With renew deadline < lease duration, the old leader's
//! writes stop (see `fence`) at least `lease duration − renew deadline`
//! before anyone else may start.
//!
//! Own implementation rather than a crate: `kube-leader-election` pulls
//! kube 4, and what is needed here — a compare-and-set on the Lease, a
//! fencing deadline and a release — is small enough to own and test.

pub mod decision;
pub mod fence;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use decision::{Decision, LeaseView, Seen, decide};

/// Timing of the election.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate's identity (unique per process).
    pub identity: String,
    /// How long a standby waits on an unchanged Lease before taking it.
    pub lease_duration: Duration,
    /// How long after its last successful renewal a leader stops writing.
    pub renew_deadline: Duration,
    /// How often the Lease is renewed or polled.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Checks the timing: renew deadline below the lease duration, retry
    /// period below the renew deadline.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err("the renew deadline must be shorter than the lease duration".into());
        }
        if self.retry_period >= self.renew_deadline {
            return Err("the retry period must be shorter than the renew deadline".into());
        }
        if self.lease_duration.as_secs() < 1 {
            return Err("the lease duration must be at least 1s".into());
        }
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    always: bool,
    until: Mutex<Option<Instant>>,
    changes: tokio::sync::watch::Sender<bool>,
}

/// Whether this process may write now; shared by the elector, the fence
/// and the reconciler.
#[derive(Debug, Clone)]
pub struct Leadership(Arc<State>);

impl Leadership {
    /// A process that always leads (one replica, no election).
    pub fn standalone() -> Self {
        let (changes, _) = tokio::sync::watch::channel(true);
        Leadership(Arc::new(State { always: true, until: Mutex::new(None), changes }))
    }

    /// A candidate that leads only while the elector says so.
    pub fn elected() -> Self {
        let (changes, _) = tokio::sync::watch::channel(false);
        Leadership(Arc::new(State { always: false, until: Mutex::new(None), changes }))
    }

    fn until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.0.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this process leads now.
    pub fn is_leader(&self) -> bool {
        self.0.always || self.until().is_some_and(|until| Instant::now() < until)
    }

    /// Leads until `deadline` (a renewal); announces a new term.
    pub fn lead_until(&self, deadline: Instant) {
        let was = self.is_leader();
        *self.until() = Some(deadline);
        if !was && self.is_leader() {
            self.0.changes.send_replace(true);
        }
    }

    /// Stops leading now.
    pub fn resign(&self) {
        *self.until() = None;
        self.0.changes.send_replace(false);
    }

    /// Yields once each time this process starts leading.
    pub fn terms(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.0.changes.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                rx.changed().await.ok()?;
                if *rx.borrow_and_update() {
                    return Some(((), rx));
                }
            }
        })
    }
}

/// What one round with the Lease ended in.
#[derive(Debug)]
enum Round {
    /// We hold it; the renewal was sent at this instant.
    Leading(Instant),
    /// Someone else holds it.
    Following(String),
}

/// Runs the election until `stop` resolves; then, if leading, releases the
/// Lease. The caller stops its own writes before `stop` resolves.
pub async fn run(
    client: kube::Client,
    config: LeaseConfig,
    leadership: Leadership,
    stop: impl std::future::Future<Output = ()>,
    gauge: prometheus_client::metrics::gauge::Gauge,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut elector = Elector { api, config, seen: None, last: None };
    tokio::pin!(stop);
    let round_limit = elector.config.renew_deadline / 2;
    // Whether this process led at the end of the previous round: a term can
    // also end silently, by its deadline passing.
    let mut leading = false;
    loop {
        let outcome = tokio::time::timeout(round_limit, elector.round()).await;
        let was_leading = leading;
        match outcome {
            Ok(Ok(Round::Leading(sent))) => {
                leadership.lead_until(sent + elector.config.renew_deadline);
                if !was_leading {
                    info!(identity = %elector.config.identity, lease = %elector.config.name, "became the leader");
                }
            }
            Ok(Ok(Round::Following(holder))) => {
                if was_leading {
                    warn!(holder = %holder, "lost the lease to another replica; writes stop");
                    leadership.resign();
                } else {
                    tracing::debug!(holder = %holder, "standby");
                }
            }
            Ok(Err(e)) => warn!(error = %e, "leader election: the Lease could not be read or written"),
            Err(_) => warn!("leader election: the API server did not answer in time"),
        }
        if was_leading && !leadership.is_leader() {
            warn!("the lease was not renewed in time; writes stopped");
            leadership.resign();
        }
        leading = leadership.is_leader();
        gauge.set(i64::from(leading));
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(elector.config.retry_period) => {}
        }
    }
    if leadership.is_leader() {
        leadership.resign();
        gauge.set(0);
        match tokio::time::timeout(round_limit, elector.release()).await {
            Ok(Ok(())) => info!("released the lease"),
            Ok(Err(e)) => warn!(error = %e, "the lease could not be released; a standby takes over when it expires"),
            Err(_) => warn!("releasing the lease timed out; a standby takes over when it expires"),
        }
    }
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    seen: Option<Seen>,
    /// The Lease as last written by us.
    last: Option<Lease>,
}

fn view(lease: &Lease) -> LeaseView {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseView {
        holder: spec.holder_identity,
        duration: spec.lease_duration_seconds.and_then(|s| u64::try_from(s).ok()).map(Duration::from_secs),
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    async fn round(&mut self) -> Result<Round, kube::Error> {
        let sent = Instant::now();
        let current = self.api.get_opt(&self.config.name).await?;
        let decision = decide(
            &self.config.identity,
            current.as_ref().map(view).as_ref(),
            &mut self.seen,
            Instant::now(),
            self.config.lease_duration,
        );
        let me = self.config.identity.clone();
        let written = match (decision, current) {
            (Decision::Follow { holder, .. }, _) => return Ok(Round::Following(holder)),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.clone()),
                        lease_duration_seconds: Some(self.duration_seconds()),
                        acquire_time: Some(now_micro()),
                        renew_time: Some(now_micro()),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Decision::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(now_micro());
                spec.lease_duration_seconds = Some(self.duration_seconds());
                self.api.replace(&self.config.name, &PostParams::default(), &lease).await
            }
            (Decision::TakeOver, Some(mut lease)) => {
                let duration = self.duration_seconds();
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.holder_identity = Some(me.clone());
                spec.lease_duration_seconds = Some(duration);
                spec.acquire_time = Some(now_micro());
                spec.renew_time = Some(now_micro());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                self.api.replace(&self.config.name, &PostParams::default(), &lease).await
            }
            (Decision::Renew | Decision::TakeOver, None) => return Ok(Round::Following(String::new())),
        };
        match written {
            Ok(lease) => {
                self.seen = None;
                self.last = Some(lease);
                Ok(Round::Leading(sent))
            }
            // Someone else wrote first (resourceVersion moved, or created it).
            Err(e) if is_conflict(&e) => Ok(Round::Following("another candidate".into())),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up so a standby need not wait for it to expire.
    async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else { return Ok(()) };
        if view(&lease).holder.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn timing_must_fence_before_a_standby_may_take_over() {
        let config = LeaseConfig {
            namespace: "n".into(),
            name: "l".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(7),
            retry_period: Duration::from_secs(2),
        };
        assert!(config.validate().is_ok());
        let equal = LeaseConfig { renew_deadline: Duration::from_secs(10), ..config.clone() };
        assert!(equal.validate().is_err());
        let slow_retry = LeaseConfig { retry_period: Duration::from_secs(7), ..config };
        assert!(slow_retry.validate().is_err());
    }

    #[tokio::test]
    async fn a_term_is_announced_when_leading_starts_not_when_renewed() {
        let leadership = Leadership::elected();
        let mut terms = Box::pin(leadership.terms());
        assert!(!leadership.is_leader());
        leadership.lead_until(Instant::now() + Duration::from_secs(5));
        leadership.lead_until(Instant::now() + Duration::from_secs(6));
        tokio::time::timeout(Duration::from_secs(1), terms.next()).await.expect("a term").expect("open");
        assert!(tokio::time::timeout(Duration::from_millis(50), terms.next()).await.is_err(), "renewal is no new term");
        leadership.resign();
        assert!(!leadership.is_leader());
        leadership.lead_until(Instant::now() + Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(1), terms.next()).await.expect("a second term").expect("open");
        assert!(Leadership::standalone().is_leader());
    }
}
