//! The PHIStore status the broker reports (pure): whether it reached the
//! store as admin, what the admin role lacks, what PUBLIC gives away.
//!
//! ```text
//!   Ready             True: connected as admin, every group role in line
//!   AdminPrivileges   False: status.adminMissing says what to grant
//!   PublicPrivileges  False: status.publicPrivileges lists them (revokePublicPrivileges revokes)
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::checks::AdminReport;
use crate::api::{FindingSeverity, PHIStoreStatus, PublicPrivilege};

/// What one sync saw of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreObservation {
    /// Connected as admin, or why not.
    pub reach: Result<(), String>,
    /// The admin check, when it ran.
    pub admin: Option<AdminReport>,
    /// What PUBLIC holds (after revoking, when asked), when read.
    pub public: Option<Vec<PublicPrivilege>>,
    /// Whether the PHIStore asks for PUBLIC's privileges to be revoked.
    pub hardening_requested: bool,
    /// Failures of individual steps (group roles, revocations).
    pub errors: Vec<String>,
}

impl Default for StoreObservation {
    fn default() -> Self {
        StoreObservation { reach: Ok(()), admin: None, public: None, hardening_requested: false, errors: Vec::new() }
    }
}

impl StoreObservation {
    /// A store the broker cannot use at all.
    pub fn unusable(reason: String) -> Self {
        StoreObservation { reach: Err(reason), ..StoreObservation::default() }
    }

    /// Everything wrong, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = &self.reach {
            out.push(e.clone());
        }
        if let Some(admin) = &self.admin {
            out.extend(admin.missing.iter().map(|m| format!("admin role lacks {m}")));
        }
        out.extend(self.errors.iter().cloned());
        out
    }
}

/// The status for an observation; unchanged conditions keep their
/// transition time.
pub fn store_status(
    observation: &StoreObservation,
    previous: Option<&PHIStoreStatus>,
    generation: Option<i64>,
    now: Time,
) -> PHIStoreStatus {
    let mut conditions = Vec::new();
    let ready = match &observation.reach {
        Err(reason) => ("False", "Unreachable", reason.clone()),
        Ok(()) if !observation.errors.is_empty() => ("False", "NotInLine", observation.errors.join("; ")),
        Ok(()) => ("True", "Connected", "the broker is connected as admin and every group role is in line".into()),
    };
    conditions.push(ready);
    conditions.push(match (&observation.reach, &observation.admin) {
        (Ok(()), Some(admin)) if admin.missing.is_empty() => {
            let mut message = "the admin role has every privilege the broker needs".to_string();
            for excess in &admin.excess {
                message.push_str(&format!("; more than needed: {excess}"));
            }
            ("True", "Sufficient", message)
        }
        (Ok(()), Some(admin)) => ("False", "Missing", format!("the admin role lacks: {}", admin.missing.join("; "))),
        _ => ("Unknown", "NotChecked", "the broker could not check the admin role".into()),
    });
    conditions.push(match &observation.public {
        None => ("Unknown", "NotChecked", "the broker could not read PUBLIC's privileges".into()),
        Some(found) if found.is_empty() => (
            "True",
            if observation.hardening_requested { "Revoked" } else { "None" },
            "PUBLIC holds no privilege that widens a caller's reach".into(),
        ),
        Some(found) => {
            let high = found.iter().filter(|f| f.severity == FindingSeverity::High).count();
            let hint = if observation.hardening_requested {
                "revokePublicPrivileges is set but the admin role could not revoke them (it must own the objects)"
            } else {
                "set spec.postgres.revokePublicPrivileges to revoke them"
            };
            (
                "False",
                "Found",
                format!("PUBLIC holds {} privilege(s) every issued role inherits ({high} high); {hint}", found.len()),
            )
        }
    });
    let types = ["Ready", "AdminPrivileges", "PublicPrivileges"];
    let conditions = types
        .iter()
        .zip(conditions)
        .map(|(type_, (status, reason, message))| {
            let kept = previous
                .and_then(|p| p.conditions.iter().find(|c| c.type_ == *type_))
                .filter(|c| c.status == status)
                .map(|c| c.last_transition_time.clone());
            Condition {
                type_: type_.to_string(),
                status: status.into(),
                reason: reason.into(),
                message,
                last_transition_time: kept.unwrap_or_else(|| now.clone()),
                observed_generation: generation,
            }
        })
        .collect();
    PHIStoreStatus {
        observed_generation: generation,
        conditions,
        admin_missing: observation.admin.as_ref().map(|a| a.missing.clone()).unwrap_or_default(),
        public_privileges: observation.public.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
    }

    fn condition<'a>(status: &'a PHIStoreStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn healthy_store_is_ready_and_sufficient() {
        let observation = StoreObservation {
            admin: Some(AdminReport::default()),
            public: Some(Vec::new()),
            ..StoreObservation::default()
        };
        let status = store_status(&observation, None, Some(3), at(1));
        assert_eq!(condition(&status, "Ready").status, "True");
        assert_eq!(condition(&status, "AdminPrivileges").status, "True");
        assert_eq!(condition(&status, "PublicPrivileges").reason, "None");
        assert_eq!(status.observed_generation, Some(3));
    }

    #[test]
    fn missing_admin_privileges_and_public_findings_are_named() {
        let observation = StoreObservation {
            admin: Some(AdminReport { missing: vec!["CREATEROLE".into()], excess: vec![] }),
            public: Some(vec![PublicPrivilege {
                kind: "security definer function".into(),
                object: "clinical.dump()".into(),
                privilege: "EXECUTE".into(),
                severity: FindingSeverity::High,
            }]),
            ..StoreObservation::default()
        };
        let status = store_status(&observation, None, None, at(1));
        assert_eq!(condition(&status, "AdminPrivileges").status, "False");
        assert!(condition(&status, "AdminPrivileges").message.contains("CREATEROLE"));
        assert_eq!(status.admin_missing, vec!["CREATEROLE".to_string()]);
        assert_eq!(condition(&status, "PublicPrivileges").status, "False");
        assert!(condition(&status, "PublicPrivileges").message.contains("1 high"));
        assert_eq!(status.public_privileges.len(), 1);
    }

    #[test]
    fn unreachable_store_leaves_the_checks_unknown() {
        let status = store_status(&StoreObservation::unusable("connection refused".into()), None, None, at(1));
        assert_eq!(condition(&status, "Ready").status, "False");
        assert_eq!(condition(&status, "Ready").reason, "Unreachable");
        assert_eq!(condition(&status, "AdminPrivileges").status, "Unknown");
        assert_eq!(condition(&status, "PublicPrivileges").status, "Unknown");
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let observation =
            StoreObservation { admin: Some(AdminReport::default()), public: Some(vec![]), ..Default::default() };
        let first = store_status(&observation, None, None, at(1));
        let second = store_status(&observation, Some(&first), None, at(99));
        assert_eq!(first, second);
        let broken = store_status(&StoreObservation::unusable("down".into()), Some(&first), None, at(100));
        assert_eq!(condition(&broken, "Ready").last_transition_time, at(100));
    }
}
