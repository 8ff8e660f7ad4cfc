//! Deny by default: a de-identified tool reads only classified columns, and
//! only through its scope's views. Pure functions shared by `check`, the
//! operator (policy compilation), the broker and the compliance report.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{ColumnClass, ColumnClassification, Deidentification, TableClassification, TableGrant};
use crate::policy::CompiledTableGrant;

use super::view_schema;

/// Why a de-identified tool's grants cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeidError {
    /// The store classifies nothing.
    #[error(
        "PHIStore {store:?} has no deidentification classification: classify the columns the tool needs, or declare the tool output: Identified with a reason"
    )]
    NoClassification {
        /// The store.
        store: String,
    },
    /// The store's classification contradicts itself.
    #[error("PHIStore {store:?} deidentification is invalid: {}", problems.join("; "))]
    InvalidClassification {
        /// The store.
        store: String,
        /// Every problem.
        problems: Vec<String>,
    },
    /// Granted columns nobody classified.
    #[error("columns not classified in PHIStore {store:?}: {} (deny by default: classify each, or declare the tool output: Identified with a reason)", columns.join(", "))]
    Unclassified {
        /// The store.
        store: String,
        /// `schema.table.column` each.
        columns: Vec<String>,
    },
}

/// What a de-identified tool's declared grants become on one store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolView {
    /// Column grants on the scope's views.
    pub grants: Vec<CompiledTableGrant>,
    /// Granted columns classified `FreeText`: never served (the
    /// de-identification control fails while a tool asks for one).
    pub free_text: Vec<String>,
}

/// The classification of `schema.table`, if any.
pub fn table<'a>(deid: &'a Deidentification, name: &str) -> Option<&'a TableClassification> {
    deid.tables.iter().find(|t| t.name == name)
}

/// The unqualified table name: the view's name in its scope's schema.
pub fn relname(qualified: &str) -> &str {
    qualified.split_once('.').map_or(qualified, |(_, table)| table)
}

/// Everything inconsistent in a store's classification (empty: usable).
pub fn validate(deid: &Deidentification) -> Vec<String> {
    let mut problems = Vec::new();
    let mut prefixes = BTreeSet::new();
    for entity in &deid.entities {
        if !prefixes.insert(entity.prefix.as_str()) {
            problems.push(format!("pseudonym prefix {:?} is used by two entities", entity.prefix));
        }
    }
    let mut relnames: BTreeMap<&str, &str> = BTreeMap::new();
    for t in &deid.tables {
        if relname(&t.name) == super::views::ALIASES {
            problems.push(format!(
                "table {}: the name {} is reserved for the alias view",
                t.name,
                super::views::ALIASES
            ));
        }
        if let Some(other) = relnames.insert(relname(&t.name), &t.name) {
            problems.push(format!("tables {other} and {} share a name: their views would share one schema", t.name));
        }
        let mut names = BTreeSet::new();
        for column in &t.columns {
            if !names.insert(column.name.as_str()) {
                problems.push(format!("{}.{} is classified twice", t.name, column.name));
            }
        }
        for column in &t.columns {
            problems.extend(identifier_problems(deid, t, column));
        }
    }
    for entity in &deid.entities {
        let key = &entity.key;
        let classified = table(deid, &key.table).and_then(|t| t.columns.iter().find(|c| c.name == key.column));
        if let Some(c) = classified
            && !(c.class == ColumnClass::Identifier
                && c.entity.as_deref() == Some(entity.name.as_str())
                && c.key_column.is_none())
        {
            problems.push(format!(
                "{}.{} is entity {:?}'s key: classify it as an Identifier of {:?} without keyColumn",
                key.table, key.column, entity.name, entity.name
            ));
        }
    }
    problems
}

fn identifier_problems(deid: &Deidentification, t: &TableClassification, column: &ColumnClassification) -> Vec<String> {
    let mut problems = Vec::new();
    if column.class != ColumnClass::Identifier {
        return problems;
    }
    let Some(entity) = column.entity.as_deref() else {
        problems.push(format!("{}.{} is an Identifier without an entity", t.name, column.name));
        return problems;
    };
    if !deid.entities.iter().any(|e| e.name == entity) {
        problems.push(format!("{}.{} identifies entity {entity:?}, which is not declared", t.name, column.name));
    }
    if let Some(key) = &column.key_column {
        let holds_key = t.columns.iter().any(|c| {
            c.name == *key
                && c.class == ColumnClass::Identifier
                && c.entity.as_deref() == Some(entity)
                && c.key_column.is_none()
        });
        if !holds_key {
            problems.push(format!(
                "{}.{}'s keyColumn {key:?} must be classified in the same table as an Identifier of {entity:?} without keyColumn",
                t.name, column.name
            ));
        }
    }
    problems
}

/// The grants a de-identified tool holds on `store`: its declared columns
/// on the views of `scope`, free-text columns left out. Refused when the
/// store classifies nothing, contradicts itself, or leaves a granted column
/// unclassified.
pub fn tool_view_grants(
    scope: &str,
    store: &str,
    deid: Option<&Deidentification>,
    tables: &[TableGrant],
) -> Result<ToolView, DeidError> {
    let Some(deid) = deid else { return Err(DeidError::NoClassification { store: store.into() }) };
    let problems = validate(deid);
    if !problems.is_empty() {
        return Err(DeidError::InvalidClassification { store: store.into(), problems });
    }
    let mut view = ToolView::default();
    let mut unclassified = Vec::new();
    for grant in tables {
        let classified = table(deid, &grant.name);
        let mut columns = BTreeSet::new();
        for column in &grant.columns {
            match classified.and_then(|t| t.columns.iter().find(|c| c.name == *column)) {
                None => unclassified.push(format!("{}.{column}", grant.name)),
                Some(c) if c.class == ColumnClass::FreeText => view.free_text.push(format!("{}.{column}", grant.name)),
                Some(_) => {
                    columns.insert(column.clone());
                }
            }
        }
        if !columns.is_empty() {
            view.grants.push(CompiledTableGrant {
                table: format!("{}.{}", view_schema(scope), relname(&grant.name)),
                columns,
                privileges: grant.privileges.iter().copied().collect(),
            });
        }
    }
    if !unclassified.is_empty() {
        return Err(DeidError::Unclassified { store: store.into(), columns: unclassified });
    }
    // Previous pseudonyms resolve through the scope's alias view.
    if !view.grants.is_empty() {
        view.grants.push(CompiledTableGrant {
            table: format!("{}.{}", view_schema(scope), super::views::ALIASES),
            columns: ["entity", "previous", "current"].map(String::from).into(),
            privileges: [crate::api::Privilege::Select].into(),
        });
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ColumnRef, Entity, Privilege};
    use crate::deid::fixtures::{clinic, column, identifier};

    fn grant(table: &str, columns: &[&str]) -> TableGrant {
        TableGrant {
            name: table.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            privileges: vec![Privilege::Select],
        }
    }

    #[test]
    fn the_clinic_classification_is_consistent() {
        assert_eq!(validate(&clinic()), Vec::<String>::new());
    }

    #[test]
    fn granted_columns_move_to_the_scope_views() {
        let view = tool_view_grants(
            "lookup",
            "ehr",
            Some(&clinic()),
            &[grant("clinical.patients", &["mrn", "dob", "history"]), grant("clinical.visits", &["reason"])],
        )
        .unwrap();
        assert_eq!(
            view.grants.iter().map(|g| (g.table.as_str(), g.columns.iter().cloned().collect())).collect::<Vec<_>>(),
            vec![
                ("deid_lookup.patients", vec!["dob".to_string(), "mrn".to_string()]),
                ("deid_lookup.visits", vec!["reason".to_string()]),
                (
                    "deid_lookup.pseudonym_aliases",
                    vec!["current".to_string(), "entity".to_string(), "previous".to_string()]
                ),
            ]
        );
        assert_eq!(view.free_text, vec!["clinical.patients.history"]);
    }

    #[test]
    fn a_table_of_free_text_only_gets_no_grant() {
        let view = tool_view_grants("s", "ehr", Some(&clinic()), &[grant("clinical.patients", &["history"])]).unwrap();
        assert!(view.grants.is_empty());
        assert_eq!(view.free_text.len(), 1);
    }

    #[test]
    fn unclassified_columns_and_stores_are_refused() {
        let err = tool_view_grants(
            "s",
            "ehr",
            Some(&clinic()),
            &[grant("clinical.patients", &["ssn", "mrn"]), grant("clinical.billing", &["amount"])],
        )
        .unwrap_err();
        assert_eq!(
            err,
            DeidError::Unclassified {
                store: "ehr".into(),
                columns: vec!["clinical.patients.ssn".into(), "clinical.billing.amount".into()]
            }
        );
        assert!(err.to_string().contains("clinical.patients.ssn"), "{err}");
        let err = tool_view_grants("s", "ehr", None, &[grant("clinical.patients", &["mrn"])]).unwrap_err();
        assert!(matches!(err, DeidError::NoClassification { .. }));
    }

    #[test]
    fn contradictions_are_named() {
        let mut deid = clinic();
        deid.tables[0].columns.push(identifier("ssn", "member", None));
        deid.tables[0].columns.push(identifier("phone", "patient", Some("diagnosis")));
        deid.tables[1].columns.push(column("reason", ColumnClass::FreeText));
        deid.tables.push(TableClassification { name: "billing.visits".into(), columns: vec![] });
        deid.entities.push(Entity {
            name: "member".into(),
            prefix: "pt".into(),
            key: ColumnRef { table: "clinical.patients".into(), column: "mrn".into() },
            linkage: None,
        });
        let problems = validate(&deid);
        let expect = [
            "prefix \"pt\" is used by two entities",
            "share a name",
            "clinical.visits.reason is classified twice",
            "phone's keyColumn \"diagnosis\"",
            "clinical.patients.mrn is entity \"member\"'s key",
        ];
        for needle in expect {
            assert!(problems.iter().any(|p| p.contains(needle)), "{needle} not in {problems:#?}");
        }
        assert!(matches!(
            tool_view_grants("s", "ehr", Some(&deid), &[grant("clinical.patients", &["mrn"])]),
            Err(DeidError::InvalidClassification { .. })
        ));
    }
}
