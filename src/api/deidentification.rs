//! How a PHIStore's columns may cross to an MCP server: each column a
//! de-identified tool is granted is classified, and the broker serves those
//! tools views in which identifiers are pseudonyms and quasi-identifiers are
//! generalized (45 CFR 164.514(b), Safe Harbor or Expert Determination).
//!
//! ```text
//!   PHIStore.spec.deidentification
//!     entities[]  patient → key public.patients.id, pseudonyms "pt_…"
//!     tables[]    public.patients: id Identifier(patient), birth_date Quasi(BirthYear), notes FreeText, …
//!   MCPServer.spec.tools[].output        Deidentified (default) | Identified (+ identifiedReason)
//!   MCPServer.spec.pseudonymScope        whose pseudonyms agree (default: the server)
//! ```
//!
//! Deny by default: a de-identified tool granted a column that is not
//! classified is refused (see [`crate::deid`]).

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Classification of a store's columns for de-identified tools.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deidentification {
    /// The entities whose identifiers become pseudonyms (e.g. `patient`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub entities: Vec<Entity>,
    /// Every table a de-identified tool may read, with every column it may
    /// be granted classified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub tables: Vec<TableClassification>,
    /// Shapes of this store's identifiers (e.g. its MRN format) that the
    /// sidecar looks for in de-identified tools' answers, besides the Safe
    /// Harbor patterns it always applies (`ssn`, `phone`, `email`,
    /// `fullDate`, `usDate`). A hit withholds the answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub identifier_patterns: Vec<IdentifierPattern>,
    /// Answer fields where a pattern misfires (e.g. a `fullDate` in a
    /// report's `generatedAt`): the pattern is not applied to those fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["pattern".into()]))]
    pub scan_allow: Vec<ScanAllow>,
    /// Pseudonym rotation: every scope on this store gets new pseudonyms
    /// (a new epoch) this often; the previous ones keep resolving through
    /// `deid_<scope>.pseudonym_aliases` for the grace period. Unset: no
    /// rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
}

/// When pseudonyms change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.grace) <= duration(self.every)").message("grace must not exceed every").field_path(".grace"))]
pub struct Rotation {
    /// How long a scope's pseudonyms live (Go duration, 1h to 8760h).
    #[schemars(length(min = 2, max = 16), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1h') && duration(self) <= duration('8760h')").message("every must be between 1h and 8760h"))]
    pub every: String,
    /// How long the previous pseudonyms still resolve (Go duration, at most
    /// `every`; `0s` for none).
    #[schemars(length(min = 2, max = 16), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    pub grace: String,
}

/// One identifier shape, as a regular expression (Rust `regex` syntax:
/// linear time, no look-around or back-references).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentifierPattern {
    /// Its name, shown in records (`mrn`).
    #[schemars(length(min = 1, max = 31), regex(pattern = r"^[a-z][A-Za-z0-9]{0,30}$"))]
    pub name: String,
    /// The expression, e.g. `MRN-[0-9]{4,}`.
    #[schemars(length(min = 1, max = 256))]
    pub regex: String,
}

/// Fields exempt from one pattern.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScanAllow {
    /// A pattern's name (built-in or declared).
    #[schemars(length(min = 1, max = 31), regex(pattern = r"^[a-z][A-Za-z0-9]{0,30}$"))]
    pub pattern: String,
    /// JSON object keys whose string values the pattern skips.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub fields: Vec<String>,
}

/// Something identifiers identify: a patient, a member, a device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Entity {
    /// Entity name, referenced by identifier columns.
    #[schemars(length(min = 1, max = 31), regex(pattern = r"^[a-z][a-z0-9_]{0,30}$"))]
    pub name: String,
    /// Readable prefix of its pseudonyms: `pt` gives `pt_7f3a9c…`.
    #[schemars(length(min = 1, max = 8), regex(pattern = r"^[a-z]{1,8}$"))]
    pub prefix: String,
    /// The column holding the entity's real key (its surrogate id or an
    /// enterprise patient index): one pseudonym per distinct value.
    pub key: ColumnRef,
    /// A linkage id shared across systems (e.g. `empi`, an enterprise
    /// patient index): entities of stores in the same namespace with the
    /// same linkage, seen by the same pseudonym scope, get the same
    /// pseudonym for the same key value. Only for keys that *are* that
    /// shared id; matching different local ids stays out of band.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 31), regex(pattern = r"^[a-z][a-z0-9_]{0,30}$"))]
    pub linkage: Option<String>,
}

/// A column of a schema-qualified table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ColumnRef {
    /// `schema.table`.
    #[schemars(
        length(min = 3, max = 127),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$")
    )]
    pub table: String,
    /// Column name.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]*$"))]
    pub column: String,
}

/// The classified columns of one table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableClassification {
    /// `schema.table`.
    #[schemars(
        length(min = 3, max = 127),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$")
    )]
    pub name: String,
    /// Its columns. A column absent here is never served to a
    /// de-identified tool.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub columns: Vec<ColumnClassification>,
}

/// How one column crosses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.class != 'Identifier' || has(self.entity)").message("an Identifier column names the entity it identifies").field_path(".entity"),
    validation = Rule::new("self.class == 'Identifier' || (!has(self.entity) && !has(self.keyColumn))").message("entity and keyColumn are only for Identifier columns"),
    validation = Rule::new("self.class != 'Quasi' || has(self.generalize)").message("a Quasi column names its generalization").field_path(".generalize"),
    validation = Rule::new("self.class == 'Quasi' || !has(self.generalize)").message("generalize is only for Quasi columns").field_path(".generalize"),
    validation = Rule::new("!has(self.method) || self.method != 'ExpertDetermination' || has(self.reference)").message("Expert Determination names the determination document in reference").field_path(".reference"),
)]
pub struct ColumnClassification {
    /// Column name.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]*$"))]
    pub name: String,
    /// Its class.
    pub class: ColumnClass,
    /// For `Identifier`: the entity it identifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 31), regex(pattern = r"^[a-z][a-z0-9_]{0,30}$"))]
    pub entity: Option<String>,
    /// For `Identifier`: the column of this table holding the entity's key
    /// (e.g. `id` for `mrn`). Unset: this column holds the key itself
    /// (`appointments.patient_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]*$"))]
    pub key_column: Option<String>,
    /// For `Quasi`: how it is generalized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generalize: Option<Generalization>,
    /// The de-identification method this rule follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// For `ExpertDetermination`: the determination's document reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub reference: Option<String>,
}

impl ColumnClassification {
    /// The method, Safe Harbor unless stated.
    pub fn method(&self) -> Method {
        self.method.unwrap_or_default()
    }
}

/// What a column is, for de-identification.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum ColumnClass {
    /// Names an individual (MRN, SSN, name, phone, email, record id):
    /// served as the entity's pseudonym.
    Identifier,
    /// Identifying in combination (dates, ZIP codes, ages): served
    /// generalized.
    Quasi,
    /// Narrative that may hold anything: never served to a de-identified
    /// tool.
    FreeText,
    /// Not identifying (a diagnosis code, a clinician's name): served as is.
    Clear,
}

/// How a quasi-identifier is generalized (Safe Harbor, 164.514(b)(2)(i)).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum Generalization {
    /// A date or timestamp becomes its year (an integer).
    Year,
    /// A birth date becomes its year as text, or `90+` for anyone who may
    /// be 90 or older (year and age removed).
    BirthYear,
    /// A ZIP code becomes its first three digits, or `000` for the
    /// three-digit areas of 20,000 people or fewer.
    Zip3,
    /// An age in years stays, as text, up to 89; `90+` above.
    Age,
}

/// The method behind a classification.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Method {
    /// 164.514(b)(2): the listed identifiers removed or generalized.
    #[default]
    SafeHarbor,
    /// 164.514(b)(1): an expert's documented determination.
    ExpertDetermination,
}

/// What a PHI tool's answers may hold.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, JsonSchema)]
pub enum Output {
    /// Pseudonyms and generalized values only, served by the database.
    #[default]
    Deidentified,
    /// Real values; needs `identifiedReason`, and is meant for emergency
    /// access only.
    Identified,
}
