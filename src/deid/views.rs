//! A scope's view of one classified table: identifiers as their entity's
//! token, quasi-identifiers generalized, clear columns as they are, free
//! text and unclassified columns absent.
//!
//! Every expression is total — it cannot fail on a malformed row, because a
//! failing cast echoes the value in its error message — and calls only
//! built-in functions every role may call: a view's user must be allowed to
//! call the functions it uses, so a keyed function here would be an oracle.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::api::{ColumnClass, Deidentification, Generalization, TableClassification};
use crate::broker::sql::{TableName, ident, literal};

use super::classification::relname;
use super::mapping::map_table;
use super::view_schema;

/// Three-digit ZIP areas of 20,000 people or fewer (HHS guidance on Safe
/// Harbor, 2000 Census): served as `000`.
pub const RESTRICTED_ZIP3: [&str; 17] = [
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878", "879", "884", "890",
    "893",
];

/// Comment marking a view the broker owns, followed by its fingerprint.
pub const VIEW_COMMENT_PREFIX: &str = "mcp-warden de-identified view ";

/// A column's type, as the catalog reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    /// `format_type(atttypid, atttypmod)`.
    pub name: String,
    /// `pg_type.typcategory` (`D` date/time, `S` string, `N` numeric, …).
    pub category: char,
}

/// One view to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Its schema (`deid_<scope>`).
    pub schema: String,
    /// Its name (the table's).
    pub name: String,
    /// `CREATE VIEW …`.
    pub create: String,
    /// Short hash of `create`, kept in the view's comment: a view whose
    /// comment carries it is current.
    pub fingerprint: String,
}

impl View {
    /// `"schema"."name"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }

    /// The comment the view carries once created.
    pub fn comment(&self) -> String {
        format!("{VIEW_COMMENT_PREFIX}{}", self.fingerprint)
    }
}

/// One output column of a table's de-identified form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The token of join `n` (an index into [`TablePlan::joins`]).
    Token(usize),
    /// The column as it is (`Clear`).
    Column(String),
    /// The column generalized (`Quasi`), with its type.
    Generalized(String, Generalization, ColumnType),
}

/// What a table's de-identified form reads and serves, decided once and
/// rendered either as a view joining the mapping ([`view`]) or over the
/// table's pseudonymized copy ([`super::shadow`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePlan {
    /// The classified table.
    pub source: TableName,
    /// (served name, what it serves), in classification order.
    pub outputs: Vec<(String, Output)>,
    /// (entity, key column) of each identifier join, in first-use order;
    /// identifiers of one entity through one key share a join.
    pub joins: Vec<(String, String)>,
}

impl TablePlan {
    /// The view's select list: tokens from `token(n)`, other columns read
    /// as `<alias>."col"`.
    pub fn select_list(&self, alias: &str, token: impl Fn(usize) -> String) -> String {
        self.outputs
            .iter()
            .map(|(name, output)| {
                let expression = match output {
                    Output::Token(n) => token(*n),
                    Output::Column(column) => format!("{alias}.{}", ident(column)),
                    Output::Generalized(column, how, kind) => {
                        // Checked when the plan was made.
                        generalize(*how, &format!("{alias}.{}", ident(column)), kind).unwrap_or_else(|_| "NULL".into())
                    }
                };
                format!("{expression} AS {}", ident(name))
            })
            .collect::<Vec<_>>()
            .join(",\n       ")
    }

    /// Base columns the form reads (served clear and quasi columns, join
    /// keys), each once.
    pub fn columns_read(&self) -> BTreeSet<&str> {
        self.outputs
            .iter()
            .filter_map(|(_, output)| match output {
                Output::Column(c) | Output::Generalized(c, _, _) => Some(c.as_str()),
                Output::Token(_) => None,
            })
            .chain(self.joins.iter().map(|(_, key)| key.as_str()))
            .collect()
    }
}

/// Decides what `table`'s de-identified form serves. `types` holds the
/// table's column types; an error names a classified column that is
/// missing or whose type the generalization cannot serve, or an entity
/// not declared.
pub fn plan(
    deid: &Deidentification,
    table: &TableClassification,
    types: &BTreeMap<String, ColumnType>,
) -> Result<TablePlan, String> {
    let source =
        TableName::parse(&table.name).ok_or_else(|| format!("table {:?} is not schema-qualified", table.name))?;
    let declared: BTreeSet<&str> = deid.entities.iter().map(|e| e.name.as_str()).collect();
    let mut outputs = Vec::new();
    let mut joins: Vec<(String, String)> = Vec::new();
    for column in &table.columns {
        let Some(kind) = types.get(&column.name) else {
            return Err(format!("column {}.{} does not exist", table.name, column.name));
        };
        let output = match column.class {
            ColumnClass::FreeText => continue,
            ColumnClass::Clear => Output::Column(column.name.clone()),
            ColumnClass::Identifier => {
                let entity =
                    column.entity.clone().ok_or_else(|| format!("{}.{} names no entity", table.name, column.name))?;
                if !declared.contains(entity.as_str()) {
                    return Err(format!("entity {entity:?} is not declared"));
                }
                let key = column.key_column.clone().unwrap_or_else(|| column.name.clone());
                if !types.contains_key(&key) {
                    return Err(format!("column {}.{key} does not exist", table.name));
                }
                let join = (entity, key);
                let n = joins.iter().position(|j| *j == join).unwrap_or_else(|| {
                    joins.push(join);
                    joins.len() - 1
                });
                Output::Token(n)
            }
            ColumnClass::Quasi => {
                let how = column
                    .generalize
                    .ok_or_else(|| format!("{}.{} names no generalization", table.name, column.name))?;
                generalize(how, "x", kind)
                    .map_err(|why| format!("{}.{} ({}): {why}", table.name, column.name, kind.name))?;
                Output::Generalized(column.name.clone(), how, kind.clone())
            }
        };
        outputs.push((column.name.clone(), output));
    }
    if outputs.is_empty() {
        return Err(format!("table {} has no column a de-identified tool may read", table.name));
    }
    Ok(TablePlan { source, outputs, joins })
}

/// `CREATE VIEW` of a scope's view of `table` selecting `select` from
/// `from`, with its fingerprint.
pub fn create_view(scope: &str, table: &str, select: &str, from: &str) -> View {
    let schema = view_schema(scope);
    let name = relname(table).to_string();
    let create = format!(
        "CREATE VIEW {}.{} WITH (security_barrier = true) AS\nSELECT {select}\n  FROM {from}",
        ident(&schema),
        ident(&name)
    );
    let fingerprint = hex::encode(&Sha256::digest(create.as_bytes())[..8]);
    View { schema, name, create, fingerprint }
}

/// The view of `table` in `scope` at the scope's current `epoch`, joining
/// the mapping (an epoch constant, so each identifier join is an index
/// lookup on the mapping's key; rotation re-creates the views). Used where
/// the table has no pseudonymized copy ([`super::shadow`]).
pub fn view(
    scope: &str,
    epoch: i32,
    deid: &Deidentification,
    table: &TableClassification,
    types: &BTreeMap<String, ColumnType>,
) -> Result<View, String> {
    let plan = plan(deid, table, types)?;
    let mut from = format!("{} b", plan.source.quoted());
    for (n, (entity, key)) in plan.joins.iter().enumerate() {
        let alias = format!("k{}", n + 1);
        from.push_str(&format!(
            "\n LEFT JOIN {map} {alias} ON {alias}.scope = {scope} AND {alias}.epoch = {epoch} AND {alias}.key = b.{key}",
            map = map_table(entity),
            scope = literal(scope),
            key = ident(key),
        ));
    }
    let select = plan.select_list("b", |n| format!("k{}.token", n + 1));
    Ok(create_view(scope, &table.name, &select, &from))
}

/// Name of each scope's alias view: previous pseudonyms → current ones,
/// while the previous epoch is in its grace period.
pub const ALIASES: &str = "pseudonym_aliases";

/// `deid_<scope>.pseudonym_aliases (entity, previous, current)`: for each
/// entity, the previous epoch's token of a key beside the current one,
/// while the grace period lasts; empty otherwise. Exposes no real value.
pub fn alias_view(scope: &str, entities: &[String]) -> View {
    let scopes = super::mapping::qualified("scopes");
    let parts: Vec<String> = entities
        .iter()
        .map(|entity| {
            let map = map_table(entity);
            format!(
                "SELECT {entity_literal}::text AS entity, o.token AS previous, c.token AS current
  FROM {scopes} s
  JOIN {map} o ON o.scope = s.scope AND o.epoch = s.previous_epoch
  JOIN {map} c ON c.scope = s.scope AND c.epoch = s.epoch AND c.key = o.key
 WHERE s.scope = {scope_literal} AND s.previous_until > now()",
                entity_literal = literal(entity),
                scope_literal = literal(scope),
            )
        })
        .collect();
    let body = if parts.is_empty() {
        "SELECT NULL::text AS entity, NULL::text AS previous, NULL::text AS current WHERE false".to_string()
    } else {
        parts.join("\nUNION ALL\n")
    };
    let schema = view_schema(scope);
    let create = format!("CREATE VIEW {}.{} WITH (security_barrier = true) AS\n{body}", ident(&schema), ident(ALIASES));
    let fingerprint = hex::encode(&Sha256::digest(create.as_bytes())[..8]);
    View { schema, name: ALIASES.to_string(), create, fingerprint }
}

/// The expression generalizing `base` (a column of type `kind`).
fn generalize(generalization: Generalization, base: &str, kind: &ColumnType) -> Result<String, String> {
    // date_part (double precision) rather than extract (numeric, slower
    // since PostgreSQL 14); a year always fits an integer.
    let year = || match kind.category {
        'D' => Ok(format!("CASE WHEN isfinite({base}) THEN date_part('year', {base})::integer END")),
        'S' => Ok(format!("CASE WHEN {base} ~ '^[0-9]{{4}}-' THEN substr({base}, 1, 4)::integer END")),
        _ => Err("a year is taken from a date, a timestamp or ISO-8601 text".to_string()),
    };
    Ok(match generalization {
        Generalization::Year => year()?,
        Generalization::BirthYear => {
            let y = year()?;
            // Anyone born in or before the year 90 years ago may be 90 or
            // older: year removed (at most a year too cautious).
            format!("CASE WHEN ({y}) <= date_part('year', now())::integer - 90 THEN '90+' ELSE ({y})::text END")
        }
        Generalization::Zip3 => {
            if kind.category != 'S' {
                return Err("ZIP codes are generalized from text (a number loses leading zeros)".into());
            }
            let restricted = RESTRICTED_ZIP3.iter().map(|z| literal(z)).collect::<Vec<_>>().join(", ");
            format!(
                "CASE WHEN {base} ~ '^[0-9]{{3}}' THEN \
                 CASE WHEN substr({base}, 1, 3) IN ({restricted}) THEN '000' ELSE substr({base}, 1, 3) END END"
            )
        }
        Generalization::Age => {
            if kind.category != 'N' {
                return Err("an age is generalized from a number".into());
            }
            format!("CASE WHEN {base} IS NULL THEN NULL WHEN {base} >= 90 THEN '90+' ELSE {base}::text END")
        }
    })
}

/// Reads a table's column types (bind `$1` = schema, `$2` = table).
pub const COLUMN_TYPES_SQL: &str = "
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typcategory::text
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_type t ON t.oid = a.atttypid
 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped";

/// Lists the broker's views in every scope schema: schema, name, comment.
pub const OWNED_VIEWS_SQL: &str = "
SELECT n.nspname::text, c.relname::text, coalesce(obj_description(c.oid, 'pg_class'), '')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'v' AND n.nspname LIKE 'deid\\_%' AND pg_get_userbyid(c.relowner) = current_user";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deid::fixtures::clinic_types;

    fn deid() -> Deidentification {
        crate::deid::fixtures::clinic()
    }

    #[test]
    fn identifiers_of_one_entity_share_one_join_and_free_text_is_absent() {
        let d = deid();
        let v = view("lookup", 1, &d, &d.tables[0], &clinic_types()).unwrap();
        assert_eq!((v.schema.as_str(), v.name.as_str()), ("deid_lookup", "patients"));
        assert!(v.create.starts_with("CREATE VIEW \"deid_lookup\".\"patients\" WITH (security_barrier = true)"));
        assert!(v.create.contains("k1.token AS \"id\""), "{}", v.create);
        assert!(v.create.contains("k1.token AS \"mrn\""), "{}", v.create);
        assert_eq!(v.create.matches("LEFT JOIN").count(), 1, "{}", v.create);
        assert!(v.create.contains("k1.key = b.\"id\""));
        assert!(v.create.contains("b.\"diagnosis\" AS \"diagnosis\""));
        assert!(!v.create.contains("history") && !v.create.contains("ssn"));
        // The real columns appear only inside generalizations and joins.
        assert!(!v.create.contains("b.\"mrn\""));
        assert_eq!(v.comment(), format!("{VIEW_COMMENT_PREFIX}{}", v.fingerprint));
    }

    #[test]
    fn views_differ_per_scope_and_epoch() {
        let d = deid();
        let a = view("a", 1, &d, &d.tables[0], &clinic_types()).unwrap();
        let b = view("b", 1, &d, &d.tables[0], &clinic_types()).unwrap();
        let rotated = view("a", 2, &d, &d.tables[0], &clinic_types()).unwrap();
        assert_ne!(a.fingerprint, rotated.fingerprint, "a rotation re-creates the views");
        assert!(rotated.create.contains("k1.epoch = 2"));
        assert_ne!(a.fingerprint, b.fingerprint);
        assert!(b.create.contains("scope = 'b'"));
    }

    #[test]
    fn aliases_join_the_previous_and_current_epoch_while_in_grace() {
        let v = alias_view("lookup", &["patient".to_string()]);
        assert_eq!((v.schema.as_str(), v.name.as_str()), ("deid_lookup", ALIASES));
        assert!(v.create.contains("o.epoch = s.previous_epoch") && v.create.contains("c.epoch = s.epoch"));
        assert!(v.create.contains("s.previous_until > now()"));
        assert!(!v.create.contains("key AS"), "no real key is exposed");
        let none = alias_view("lookup", &[]);
        assert!(none.create.contains("WHERE false"));
    }

    #[test]
    fn generalizations_are_total_and_typed() {
        let date = ColumnType { name: "date".into(), category: 'D' };
        let text = ColumnType { name: "text".into(), category: 'S' };
        let int = ColumnType { name: "integer".into(), category: 'N' };
        assert!(generalize(Generalization::Year, "b.x", &date).unwrap().contains("isfinite(b.x)"));
        assert!(generalize(Generalization::Year, "b.x", &text).unwrap().contains("~ '^[0-9]{4}-'"));
        assert!(generalize(Generalization::BirthYear, "b.x", &date).unwrap().contains("'90+'"));
        let zip = generalize(Generalization::Zip3, "b.x", &text).unwrap();
        assert!(zip.contains("'036'") && zip.contains("'000'") && zip.contains("~ '^[0-9]{3}'"), "{zip}");
        assert!(generalize(Generalization::Zip3, "b.x", &int).is_err());
        assert!(generalize(Generalization::Age, "b.x", &int).unwrap().contains(">= 90"));
        assert!(generalize(Generalization::Age, "b.x", &text).is_err());
        assert!(generalize(Generalization::Year, "b.x", &int).is_err());
    }

    #[test]
    fn a_missing_column_or_an_unservable_type_is_named() {
        let d = deid();
        let mut t = clinic_types();
        t.remove("dob");
        assert!(view("s", 1, &d, &d.tables[0], &t).unwrap_err().contains("clinical.patients.dob does not exist"));
        let mut t = clinic_types();
        t.insert("zip".into(), ColumnType { name: "integer".into(), category: 'N' });
        assert!(view("s", 1, &d, &d.tables[0], &t).unwrap_err().contains("clinical.patients.zip (integer)"));
    }
}
