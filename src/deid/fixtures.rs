//! Test fixtures: a clinic's classification (patients and visits).

use std::collections::BTreeMap;

use crate::api::{
    ColumnClass, ColumnClassification, ColumnRef, Deidentification, Entity, Generalization, TableClassification,
};
use crate::deid::views::ColumnType;

/// Column types from (name, SQL type, category) triples.
fn types(pairs: &[(&str, &str, char)]) -> BTreeMap<String, ColumnType> {
    pairs.iter().map(|(n, t, c)| (n.to_string(), ColumnType { name: t.to_string(), category: *c })).collect()
}

/// The types of `clinical.patients`' columns in [`clinic`] (and `ssn`).
pub fn clinic_types() -> BTreeMap<String, ColumnType> {
    types(&[
        ("id", "integer", 'N'),
        ("mrn", "text", 'S'),
        ("dob", "date", 'D'),
        ("zip", "text", 'S'),
        ("diagnosis", "text", 'S'),
        ("history", "text", 'S'),
        ("ssn", "text", 'S'),
    ])
}

/// A column of `class` with nothing else said.
pub fn column(name: &str, class: ColumnClass) -> ColumnClassification {
    ColumnClassification {
        name: name.into(),
        class,
        entity: None,
        key_column: None,
        generalize: None,
        method: None,
        reference: None,
    }
}

/// An identifier of `entity`, holding its key or (with `key`) naming the
/// column that does.
pub fn identifier(name: &str, entity: &str, key: Option<&str>) -> ColumnClassification {
    ColumnClassification {
        entity: Some(entity.into()),
        key_column: key.map(Into::into),
        ..column(name, ColumnClass::Identifier)
    }
}

/// A quasi-identifier generalized by `how`.
pub fn quasi(name: &str, how: Generalization) -> ColumnClassification {
    ColumnClassification { generalize: Some(how), ..column(name, ColumnClass::Quasi) }
}

/// `clinical.patients` (id, mrn, dob, zip, diagnosis, history) and
/// `clinical.visits` (patient_id, reason), one entity `patient`.
pub fn clinic() -> Deidentification {
    Deidentification {
        entities: vec![Entity {
            name: "patient".into(),
            prefix: "pt".into(),
            key: ColumnRef { table: "clinical.patients".into(), column: "id".into() },
            linkage: None,
        }],
        tables: vec![
            TableClassification {
                name: "clinical.patients".into(),
                columns: vec![
                    identifier("id", "patient", None),
                    identifier("mrn", "patient", Some("id")),
                    quasi("dob", Generalization::BirthYear),
                    quasi("zip", Generalization::Zip3),
                    column("diagnosis", ColumnClass::Clear),
                    column("history", ColumnClass::FreeText),
                ],
            },
            TableClassification {
                name: "clinical.visits".into(),
                columns: vec![identifier("patient_id", "patient", None), column("reason", ColumnClass::Clear)],
            },
        ],
        ..Deidentification::default()
    }
}
