//! de-identification (45 CFR 164.514(b)): what crosses MCP to a model is
//! de-identified, enforced by the database (pseudonymized views), with
//! every granted column classified under a named method.

use std::collections::BTreeSet;

use super::{Assessment, Input};
use crate::api::{ColumnClass, Method, Output, ToolPolicy};
use crate::deid::classification::{self, tool_view_grants};
use crate::deid::{default_scope, view_schema};

pub(super) fn deidentification(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    let spec = &input.server.spec;
    let scope =
        spec.pseudonym_scope.clone().unwrap_or_else(|| default_scope(&kube::ResourceExt::name_any(input.server)));
    let mut deidentified = Vec::new();
    let mut break_glass_only = 0;
    let mut methods = BTreeSet::new();
    for (i, tool) in spec.tools.iter().enumerate().filter(|(_, t)| t.phi && !t.data_access.is_empty()) {
        let at = format!("tools[{i}] {}", tool.name);
        match tool.output {
            Output::Identified if spec.emergency_access.as_ref().is_some_and(|p| p.tools.contains(&tool.name)) => {
                break_glass_only += 1;
                a.held(format!(
                    "{at} returns identified PHI ({}) only under break-glass: an approved EmergencyAccess allowing \
                     identified output, for its beneficiary, until its end",
                    tool.identified_reason.as_deref().unwrap_or("no reason given")
                ));
            }
            Output::Identified => a.failed(format!(
                "{at} returns identified PHI ({}) outside emergency access: list it in emergencyAccess.tools to \
                 serve it only under break-glass, or classify its columns and make it Deidentified",
                tool.identified_reason.as_deref().unwrap_or("no reason given")
            )),
            Output::Deidentified => {
                if let Some(evidence) = judge_deidentified(input, tool, &scope, &at, &mut a, &mut methods) {
                    deidentified.push(evidence);
                }
            }
        }
    }
    if deidentified.is_empty() && break_glass_only == 0 {
        a.held("no tool reads a PHIStore");
    } else if !deidentified.is_empty() {
        a.held(format!(
            "{} de-identified PHI tool(s) read only the views of schema {} (pseudonyms from a random mapping only the \
             broker reads; no grant on any table): {}",
            deidentified.len(),
            view_schema(&scope),
            deidentified.join("; ")
        ));
        a.held(format!("methods: {}", methods.into_iter().collect::<Vec<_>>().join(", ")));
    }
    a
}

/// The evidence for one de-identified tool, or `None` with its failures
/// recorded.
fn judge_deidentified(
    input: &Input<'_>,
    tool: &ToolPolicy,
    scope: &str,
    at: &str,
    a: &mut Assessment,
    methods: &mut BTreeSet<String>,
) -> Option<String> {
    let mut served = Vec::new();
    let mut ok = true;
    for access in &tool.data_access {
        let Some(store) = input.stores.get(&access.store) else {
            // minimum-necessary names the missing store.
            a.unseen(format!("{at}: PHIStore {} not found, its classification is not known", access.store));
            ok = false;
            continue;
        };
        let deid = store.spec.deidentification.as_ref();
        if let Err(e) = crate::policy::add_scan_rules(&mut Default::default(), &access.store, deid) {
            a.failed(format!("{at}: {e}"));
            ok = false;
        }
        match tool_view_grants(scope, &access.store, deid, &access.tables) {
            Err(e) => {
                a.failed(format!("{at}: {e}"));
                ok = false;
            }
            Ok(view) => {
                if !view.free_text.is_empty() {
                    a.failed(format!(
                        "{at} asks for free-text column(s) {}, which never cross to a de-identified tool",
                        view.free_text.join(", ")
                    ));
                    ok = false;
                }
                let Some(deid) = deid else { continue };
                for grant in &access.tables {
                    let Some(table) = classification::table(deid, &grant.name) else { continue };
                    for column in table.columns.iter().filter(|c| grant.columns.contains(&c.name)) {
                        let how = match column.class {
                            ColumnClass::Identifier => "pseudonym".to_string(),
                            ColumnClass::Quasi => {
                                column.generalize.map_or_else(|| "generalized".to_string(), |g| format!("{g:?}"))
                            }
                            ColumnClass::Clear => "clear".to_string(),
                            ColumnClass::FreeText => continue,
                        };
                        served.push(format!("{}.{} {how}", grant.name, column.name));
                        methods.insert(match column.method() {
                            Method::SafeHarbor => "Safe Harbor 164.514(b)(2)".to_string(),
                            Method::ExpertDetermination => format!(
                                "Expert Determination 164.514(b)(1) ({})",
                                column.reference.as_deref().unwrap_or("no reference")
                            ),
                        });
                    }
                }
            }
        }
    }
    ok.then(|| format!("{} ({})", tool.name, served.join(", ")))
}
