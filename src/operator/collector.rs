//! What the audit collector says about each server, turned into the
//! evidence of the audit-controls and integrity controls.
//!
//! ```text
//!   GET <collector>/v1/health (the operator's token, audience mcp-warden-collector; cached 10 s)
//!     ─▶ per server: streams, open streams by pod (last seq, last record time), incidents
//!     ─▶ collector_view(server's health, running pods, now) ─▶ CollectorView (pure)
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use crate::audit::collector::store::ServerHealth;
use crate::bearer::ClientCredential;
use crate::compliance::CollectorView;

/// How long one health answer serves every reconcile.
const CACHE: Duration = Duration::from_secs(10);

/// Health per MCPServer (`namespace/name`).
pub type Health = BTreeMap<String, ServerHealth>;

/// Where the operator learns the collector's view.
pub trait CollectorHealthSource: Send + Sync {
    /// Per-server health, or why it could not be read.
    fn health(&self) -> BoxFuture<'_, Result<Health, String>>;

    /// Tells the collector which pods of `server` still exist, so streams
    /// of pods gone without their stream-end become incidents there.
    /// Returns the streams it declared abandoned.
    fn report_pods<'a>(
        &'a self,
        _server: &'a str,
        _present: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The collector's `/v1/health` over HTTPS, with the operator's projected
/// token (re-read each time: the kubelet rotates it).
pub struct HttpsCollectorHealth {
    client: reqwest::Client,
    base: String,
    token: ClientCredential,
    cached: Mutex<Option<(Instant, Health)>>,
}

/// How long one call to the collector may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpsCollectorHealth {
    /// A source for the collector at `base`, trusting `ca_file` (PEM) in
    /// addition to the system roots.
    pub fn new(base: &str, token_file: PathBuf, ca_file: Option<&std::path::Path>) -> Result<Self, String> {
        Ok(HttpsCollectorHealth {
            client: crate::bearer::api_client(ca_file)?,
            base: base.trim_end_matches('/').to_string(),
            token: ClientCredential::File(token_file),
            cached: Mutex::new(None),
        })
    }

    async fn fetch(&self) -> Result<Health, String> {
        #[derive(serde::Deserialize)]
        struct Answer {
            servers: Health,
        }
        let answer: Answer = self.call(self.client.get(format!("{}/v1/health", self.base))).await?;
        Ok(answer.servers)
    }

    /// Sends `request` with the operator's current token; the JSON answer.
    async fn call<T: serde::de::DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, String> {
        let token = self.token.current()?;
        let response =
            request.bearer_auth(token).timeout(CALL_TIMEOUT).send().await.map_err(|e| e.without_url().to_string())?;
        if !response.status().is_success() {
            return Err(format!("the collector answered HTTP {}", response.status().as_u16()));
        }
        response.json().await.map_err(|e| e.without_url().to_string())
    }
}

impl CollectorHealthSource for HttpsCollectorHealth {
    fn report_pods<'a>(&'a self, server: &'a str, present: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            #[derive(serde::Deserialize)]
            struct Answer {
                abandoned: Vec<String>,
            }
            let body = serde_json::json!({"server": server, "present": present});
            let answer: Answer = self.call(self.client.post(format!("{}/v1/pods", self.base)).json(&body)).await?;
            Ok(answer.abandoned)
        })
    }

    fn health(&self) -> BoxFuture<'_, Result<Health, String>> {
        Box::pin(async move {
            if let Some((at, health)) = self.cached.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
                && at.elapsed() < CACHE
            {
                return Ok(health.clone());
            }
            let health = self.fetch().await?;
            *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), health.clone()));
            Ok(health)
        })
    }
}

/// The evidence for one server: receiving when every running pod has an
/// open stream at the collector; verified when it holds streams and no
/// incident. `None` (Unknown) when there is nothing to judge.
pub fn collector_view(
    health: Option<&ServerHealth>,
    running_pods: &[String],
    now: DateTime<Utc>,
) -> Option<CollectorView> {
    let Some(health) = health else {
        if running_pods.is_empty() {
            return None;
        }
        return Some(CollectorView {
            receiving: false,
            chain_verified: false,
            open_incidents: 0,
            observed: format!(
                "no stream from this server's {} running pod(s) has reached the collector",
                running_pods.len()
            ),
            emergency_use: Default::default(),
            schema_drift: Default::default(),
        });
    };
    let reporting = running_pods.iter().filter(|p| health.open_streams.contains_key(*p)).count();
    let newest = health
        .open_streams
        .values()
        .filter_map(|s| DateTime::parse_from_rfc3339(s.last_record_time.as_deref()?).ok())
        .max();
    let mut observed = format!("open streams from {reporting}/{} running pod(s)", running_pods.len());
    if let Some(at) = newest {
        // In coarse steps, not seconds or sequence numbers: status is written
        // only when it changes, and a counter would change it on every pass.
        let ago = (now - at.with_timezone(&Utc)).num_seconds().max(0);
        observed.push_str(match ago {
            0..=300 => "; a record within the last 5 min",
            301..=3600 => "; the newest record is 5 to 60 min old",
            _ => "; no record for over an hour",
        });
    }
    observed.push_str(&format!("; {} stream(s) held, {} incident(s)", health.streams, health.open_incidents));
    Some(CollectorView {
        receiving: reporting == running_pods.len(),
        chain_verified: health.streams > 0 && health.open_incidents == 0,
        open_incidents: health.open_incidents,
        observed,
        emergency_use: health.emergency_use.clone(),
        schema_drift: health.schema_drift.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::collector::store::StreamHealth;

    fn health(pods: &[(&str, u64, &str)], incidents: u32) -> ServerHealth {
        ServerHealth {
            streams: pods.len() as u32 + 1,
            open_streams: pods
                .iter()
                .map(|(p, seq, t)| {
                    (p.to_string(), StreamHealth { last_seq: *seq, last_record_time: Some(t.to_string()) })
                })
                .collect(),
            open_incidents: incidents,
            emergency_use: Default::default(),
            schema_drift: Default::default(),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-21T12:00:14Z").unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_running_pod_reporting_and_no_incident() {
        let h = health(&[("pod-a", 10, "2026-11-21T12:00:00Z"), ("pod-b", 42, "2026-11-21T11:59:00Z")], 0);
        let view = collector_view(Some(&h), &["pod-a".into(), "pod-b".into()], now()).unwrap();
        assert!(view.receiving && view.chain_verified);
        assert_eq!(
            view.observed,
            "open streams from 2/2 running pod(s); a record within the last 5 min; 3 stream(s) held, 0 incident(s)"
        );
    }

    #[test]
    fn a_pod_without_a_stream_is_not_received_and_incidents_fail_integrity() {
        let h = health(&[("pod-a", 10, "2026-11-21T12:00:00Z")], 2);
        let view = collector_view(Some(&h), &["pod-a".into(), "pod-b".into()], now()).unwrap();
        assert!(!view.receiving && !view.chain_verified);
        assert_eq!(view.open_incidents, 2);
        assert!(view.observed.starts_with("open streams from 1/2 running pod(s)"), "{}", view.observed);
    }

    #[test]
    fn nothing_at_the_collector() {
        assert_eq!(collector_view(None, &[], now()), None);
        let view = collector_view(None, &["pod-a".into()], now()).unwrap();
        assert!(!view.receiving);
        assert!(view.observed.contains("no stream"), "{}", view.observed);
    }
}
