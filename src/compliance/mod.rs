//! The compliance evaluator: one verdict per HIPAA control, from what is
//! observed.
//!
//! ```text
//!   MCPServer, PHIStores ─┐
//!   rendered objects ─────┼─ evaluate() ─▶ Report { controls[10], compliant }
//!   Observations ─────────┘     (pure)
//!     └ offline (`check`): NetworkPolicies among the manifests; no pods, no collector
//!     └ in a cluster (operator): NetworkPolicies, Pods, collector health
//! ```
//!
//! A control passes only on evidence. What cannot be observed is `Unknown`
//! with a message saying what was not seen — never rounded up to `Pass`.
//! `Compliant` is True when every control passes, False when any fails,
//! Unknown otherwise.

mod audit;
mod data;
mod deidentification;
pub(crate) mod identity;
mod network;
pub mod pod_admission;
pub mod selectors;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::api::{ControlStatus, MCPServer, PHIStore, Verdict};
use crate::render::{OwnedObjects, RenderError, Settings};

/// The controls mcp-warden reports, in the order status lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Control {
    /// Only authorized software and people reach the server.
    AccessControl,
    /// Every caller is a distinct identity, down to the database.
    UniqueUserIdentification,
    /// Break-glass access.
    EmergencyAccess,
    /// Sessions and credentials end on their own.
    AutomaticLogoff,
    /// Every action is recorded, outside the audited pod.
    AuditControls,
    /// The trail cannot be altered unnoticed.
    Integrity,
    /// Callers prove who they are.
    Authentication,
    /// PHI in transit is protected.
    TransmissionSecurity,
    /// Access limited to what each purpose needs.
    MinimumNecessary,
    /// What crosses to the model is de-identified.
    Deidentification,
}

impl Control {
    /// All controls, in status order.
    pub const ALL: [Control; 10] = [
        Control::AccessControl,
        Control::UniqueUserIdentification,
        Control::EmergencyAccess,
        Control::AutomaticLogoff,
        Control::AuditControls,
        Control::Integrity,
        Control::Authentication,
        Control::TransmissionSecurity,
        Control::MinimumNecessary,
        Control::Deidentification,
    ];

    /// Stable id used in status and `check` output.
    pub fn id(self) -> &'static str {
        match self {
            Control::AccessControl => "access-control",
            Control::UniqueUserIdentification => "unique-user-identification",
            Control::EmergencyAccess => "emergency-access",
            Control::AutomaticLogoff => "automatic-logoff",
            Control::AuditControls => "audit-controls",
            Control::Integrity => "integrity",
            Control::Authentication => "authentication",
            Control::TransmissionSecurity => "transmission-security",
            Control::MinimumNecessary => "minimum-necessary",
            Control::Deidentification => "de-identification",
        }
    }

    /// The regulation the control answers.
    pub fn citation(self) -> &'static str {
        match self {
            Control::AccessControl => "45 CFR 164.312(a)(1)",
            Control::UniqueUserIdentification => "45 CFR 164.312(a)(2)(i)",
            Control::EmergencyAccess => "45 CFR 164.312(a)(2)(ii)",
            Control::AutomaticLogoff => "45 CFR 164.312(a)(2)(iii)",
            Control::AuditControls => "45 CFR 164.312(b)",
            Control::Integrity => "45 CFR 164.312(c)(1)",
            Control::Authentication => "45 CFR 164.312(d)",
            Control::TransmissionSecurity => "45 CFR 164.312(e)(1)",
            Control::MinimumNecessary => "45 CFR 164.502(b), 164.514(d)",
            Control::Deidentification => "45 CFR 164.514(a)-(b)",
        }
    }
}

/// Where the observations come from; it changes what "not observed" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Manifests given to `check`: no pods, no collector.
    Manifests,
    /// A live cluster, read by the operator.
    Cluster,
}

/// What the audit collector reports about this server's streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorView {
    /// Records arrived recently from every running pod.
    pub receiving: bool,
    /// Every stream's hash chain verified so far.
    pub chain_verified: bool,
    /// Integrity incidents not yet resolved.
    pub open_incidents: u32,
    /// What was observed, for the messages (e.g. "open streams from 2/2
    /// running pod(s); a record within the last 5 min").
    pub observed: String,
    /// Use made under break-glass grants, by grant name.
    pub emergency_use: BTreeMap<String, crate::audit::collector::store::GrantUse>,
    /// Tools whose listed inputSchema differs from their declared
    /// arguments, with how (from the sidecars' list outcomes).
    pub schema_drift: BTreeMap<String, Vec<String>>,
}

/// A break-glass grant of the server, as judged now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantView {
    /// The EmergencyAccess's name.
    pub name: String,
    /// Its beneficiary (an MCP subject).
    pub beneficiary: String,
    /// Its tools.
    pub tools: Vec<String>,
    /// Who approved (or reviewed) it.
    pub approver: Option<String>,
    /// Where it stands.
    pub judgement: crate::breakglass::Judgement,
}

/// What is observed of break-glass in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmergencyView {
    /// Whether the API server enforces the admission policy.
    pub admission: crate::breakglass::Admission,
    /// The server's grants.
    pub grants: Vec<GrantView>,
}

/// Facts about the world beyond the MCPServer. `None` means not observed.
#[derive(Debug, Clone)]
pub struct Observations {
    /// Where these come from.
    pub source: Source,
    /// NetworkPolicies in the server's namespace (the warden's own included
    /// or not; they are recognised by name).
    pub network_policies: Option<Vec<NetworkPolicy>>,
    /// The server's running pods.
    pub pods: Option<Vec<Pod>>,
    /// The audit collector's view of the server's streams.
    pub collector: Option<CollectorView>,
    /// Break-glass: the admission policy and the server's grants.
    pub emergency: Option<EmergencyView>,
    /// Whether the API server refuses this server's pods without their
    /// sidecar.
    pub pod_admission: Option<pod_admission::PodAdmissionView>,
}

impl Observations {
    /// What `check` can see: the NetworkPolicies among its manifests.
    pub fn from_manifests(network_policies: Vec<NetworkPolicy>) -> Self {
        Observations {
            source: Source::Manifests,
            network_policies: Some(network_policies),
            pods: None,
            collector: None,
            emergency: None,
            pod_admission: None,
        }
    }
}

/// Everything the evaluator looks at.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The server.
    pub server: &'a MCPServer,
    /// PHIStores of its namespace, by name.
    pub stores: &'a BTreeMap<String, PHIStore>,
    /// What the warden renders for it, or why it cannot.
    pub rendered: Result<&'a OwnedObjects, &'a RenderError>,
    /// The settings it was rendered with.
    pub settings: &'a Settings,
    /// Facts beyond the spec.
    pub observed: &'a Observations,
}

/// The verdicts for one MCPServer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// One entry per control, in [`Control::ALL`] order.
    pub controls: Vec<ControlStatus>,
    /// The roll-up: Pass (all pass), Fail (any fails), Unknown otherwise.
    pub compliant: Verdict,
}

/// Evaluates every control.
pub fn evaluate(input: &Input<'_>) -> Report {
    let controls: Vec<ControlStatus> = Control::ALL
        .iter()
        .map(|&control| {
            let assessment = match control {
                Control::AccessControl => network::access_control(input),
                Control::UniqueUserIdentification => identity::unique_user_identification(input),
                Control::EmergencyAccess => audit::emergency_access(input),
                Control::AutomaticLogoff => identity::automatic_logoff(input),
                Control::AuditControls => audit::audit_controls(input),
                Control::Integrity => audit::integrity(input),
                Control::Authentication => identity::authentication(input),
                Control::TransmissionSecurity => data::transmission_security(input),
                Control::MinimumNecessary => data::minimum_necessary(input),
                Control::Deidentification => deidentification::deidentification(input),
            };
            assessment.into_status(control)
        })
        .collect();
    let compliant = roll_up(controls.iter().map(|c| c.verdict));
    Report { controls, compliant }
}

/// Fail if any fails, Pass if all pass, Unknown otherwise (and for none).
pub fn roll_up(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
    let mut any = false;
    let mut unknown = false;
    for verdict in verdicts {
        any = true;
        match verdict {
            Verdict::Fail => return Verdict::Fail,
            Verdict::Unknown => unknown = true,
            Verdict::Pass => {}
        }
    }
    if unknown || !any { Verdict::Unknown } else { Verdict::Pass }
}

/// Evidence gathered for one control: what held, what did not, what could
/// not be seen.
#[derive(Debug, Default)]
pub(crate) struct Assessment {
    held: Vec<String>,
    failed: Vec<String>,
    unseen: Vec<String>,
}

impl Assessment {
    fn held(&mut self, note: impl Into<String>) {
        self.held.push(note.into());
    }
    fn failed(&mut self, note: impl Into<String>) {
        self.failed.push(note.into());
    }
    fn unseen(&mut self, note: impl Into<String>) {
        self.unseen.push(note.into());
    }

    /// Fail lists only what failed (what to fix); Unknown says what was not
    /// observed, then what held; Pass says what held.
    fn into_status(self, control: Control) -> ControlStatus {
        let (verdict, message) = if !self.failed.is_empty() {
            (Verdict::Fail, self.failed.join("; "))
        } else if !self.unseen.is_empty() {
            let mut parts = self.unseen;
            parts.extend(self.held);
            (Verdict::Unknown, parts.join("; "))
        } else {
            (Verdict::Pass, self.held.join("; "))
        };
        ControlStatus { id: control.id().into(), citation: control.citation().into(), verdict, message }
    }
}

#[cfg(test)]
mod tests;
