//! The de-identification objects inside one store, brought in line over
//! the admin connection before group roles are (their grants name the
//! views). Decisions and SQL text come from [`crate::deid`]; this file reads
//! the catalog and runs them, in one transaction per pass.
//!
//! ```text
//!   wanted views (scope → tables) ─┐
//!   catalog: owned views, types,   ├─▶ mapping DDL (once) · scopes · entity map + trigger (when missing
//!   triggers, fingerprints ────────┘     or changed) · backfill · per table: its pseudonymized copy (built
//!                                        when missing, changed, stale or rotated) and the view over it ·
//!                                        stale views and copies dropped
//! ```
//!
//! A table gets a copy when it has a primary key and the admin role may
//! create triggers on it; otherwise its view joins the mapping (correct,
//! slower on lists), and the pass says so.
//!
//! Nothing is rewritten when it is current: a steady pass reads the catalog
//! and changes nothing (no lock on the application's tables).

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};
use tokio_postgres::{Client, GenericClient};

use super::sql::{TableName, ident, literal};
use super::store::StoreError;
use crate::api::{ColumnClass, Deidentification};
use crate::deid::classification;
use crate::deid::mapping::{self, EntityMap};
use crate::deid::shadow::{self, OWNED_SHADOWS_SQL, SHADOW_COMMENT_PREFIX, SHADOW_CURRENT_SQL, TABLE_INDEXES_SQL};
use crate::deid::views::{self, COLUMN_TYPES_SQL, ColumnType, OWNED_VIEWS_SQL, VIEW_COMMENT_PREFIX};
use crate::deid::{MAP_SCHEMA, view_schema};

/// The views a store must serve: scope → classified tables (`schema.table`).
pub type WantedViews = BTreeMap<String, BTreeSet<String>>;

/// What one pass changed (for logs and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeidPass {
    /// Views created or re-created (`schema.name`).
    pub views_written: Vec<String>,
    /// Stale views dropped.
    pub views_dropped: Vec<String>,
    /// Entities whose mapping table or trigger was (re)created.
    pub entities_written: Vec<String>,
    /// Entities whose mapping gained rows from the backfill.
    pub backfilled: Vec<String>,
    /// Scopes that started a new epoch (rotation).
    pub rotated: Vec<String>,
    /// Pseudonymized copies built or rebuilt (`scope/schema.table`).
    pub shadows_built: Vec<String>,
    /// Copies dropped (no longer wanted).
    pub shadows_dropped: Vec<String>,
    /// Views written that join the mapping instead of reading a copy, and
    /// why (`scope/schema.table: reason`).
    pub joined: Vec<String>,
}

/// Brings the store's mapping, triggers and views in line with `wanted`.
/// `backfill` asks for the mapping of every existing key (a broker's first
/// pass over a store); new scopes and new entities are backfilled anyway.
pub async fn ensure(
    client: &mut Client,
    deid: Option<&Deidentification>,
    wanted: &WantedViews,
    backfill: bool,
) -> Result<DeidPass, StoreError> {
    let mut pass = DeidPass::default();
    let mut kept = BTreeSet::new();
    let existing = owned_views(client).await?;
    let shadows = owned_shadows(client).await?;
    if wanted.is_empty() && existing.is_empty() && shadows.is_empty() {
        return Ok(pass);
    }
    let tx = client.transaction().await?;
    if !wanted.is_empty() {
        let deid = deid.ok_or_else(|| {
            StoreError::Deidentification("de-identified tools use this store, but it classifies no column".into())
        })?;
        let mut fill = backfill;
        if !base_exists(&tx).await? {
            tx.batch_execute(&mapping::base_ddl().join(";\n")).await?;
        }
        for scope in wanted.keys() {
            fill |= tx.execute(&mapping::register_scope_sql(), &[scope]).await? > 0;
        }
        if let Some(rotation) = &deid.rotation {
            let seconds = |text: &str, what: &str| {
                crate::policy::parse_go_duration(text)
                    .map(|d| d.as_secs_f64())
                    .map_err(|e| StoreError::Deidentification(format!("rotation.{what} {text:?}: {e}")))
            };
            let (every, grace) = (seconds(&rotation.every, "every")?, seconds(&rotation.grace, "grace")?);
            for scope in wanted.keys() {
                if tx.query_opt(&mapping::rotate_sql(), &[scope, &grace, &every]).await?.is_some() {
                    pass.rotated.push(scope.clone());
                    fill = true;
                }
            }
        }
        for entity in entities_used(deid, wanted) {
            let map = entity_map(&tx, deid, &entity).await?;
            let ddl = mapping::entity_ddl(&map).map_err(StoreError::Deidentification)?;
            let fingerprint = fingerprint(&ddl.join(";\n"));
            let mut entity_fill = fill;
            if !entity_current(&tx, &map, &fingerprint).await? {
                tx.batch_execute(&ddl.join(";\n")).await?;
                tx.batch_execute(&format!(
                    "COMMENT ON FUNCTION {}.{}() IS {}",
                    ident(MAP_SCHEMA),
                    ident(&format!("tokens_{entity}")),
                    literal(&fingerprint)
                ))
                .await?;
                pass.entities_written.push(entity.clone());
                entity_fill = true;
            }
            if entity_fill && tx.execute(&mapping::backfill_sql(&map), &[]).await? > 0 {
                pass.backfilled.push(map.entity.clone());
            }
        }
        let epochs: BTreeMap<String, i32> = tx
            .query(&format!("SELECT scope, epoch FROM {}", mapping::qualified("scopes")), &[])
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (scope, tables) in wanted {
            let epoch = *epochs
                .get(scope)
                .ok_or_else(|| StoreError::Deidentification(format!("scope {scope} is not registered")))?;
            write_views(&tx, deid, (scope, epoch), tables, &existing, &mut kept, &mut pass).await?;
            let scope_tables = WantedViews::from([(scope.clone(), tables.clone())]);
            let aliases = views::alias_view(scope, &entities_used(deid, &scope_tables).into_iter().collect::<Vec<_>>());
            write_view(&tx, &aliases, &existing, false, &mut pass).await?;
        }
    }
    let keep: BTreeSet<(String, String)> = wanted
        .iter()
        .flat_map(|(scope, tables)| {
            let aliases = (view_schema(scope), views::ALIASES.to_string());
            tables.iter().map(|t| (view_schema(scope), classification::relname(t).to_string())).chain([aliases])
        })
        .collect();
    for ((schema, name), comment) in &existing {
        if comment.starts_with(VIEW_COMMENT_PREFIX) && !keep.contains(&(schema.clone(), name.clone())) {
            tx.batch_execute(&format!("DROP VIEW IF EXISTS {}.{}", ident(schema), ident(name))).await?;
            pass.views_dropped.push(format!("{schema}.{name}"));
        }
    }
    // Copies of tables no longer wanted, or now served by a join (the
    // admin lost TRIGGER, the primary key went): their triggers go too.
    for (name, comment) in &shadows {
        if comment.starts_with(SHADOW_COMMENT_PREFIX) && !kept.contains(name) {
            tx.batch_execute(&shadow::drop_sql(name).join(";\n")).await?;
            pass.shadows_dropped.push(name.clone());
        }
    }
    tx.commit().await?;
    // Fresh statistics and visibility, or the planner takes a filled
    // mapping for a few rows and scans it for every view, and each lookup
    // visits the heap instead of the index alone (the key's index carries
    // the token). VACUUM cannot run in the transaction.
    for entity in &pass.backfilled {
        client.batch_execute(&format!("VACUUM (ANALYZE) {}", mapping::map_table(entity))).await?;
    }
    Ok(pass)
}

async fn write_views(
    tx: &tokio_postgres::Transaction<'_>,
    deid: &Deidentification,
    (scope, epoch): (&str, i32),
    tables: &BTreeSet<String>,
    existing: &BTreeMap<(String, String), String>,
    kept: &mut BTreeSet<String>,
    pass: &mut DeidPass,
) -> Result<(), StoreError> {
    for name in tables {
        let table = classification::table(deid, name)
            .ok_or_else(|| StoreError::Deidentification(format!("table {name} is not classified")))?;
        let types = column_types(tx, name).await?;
        let plan = views::plan(deid, table, &types).map_err(StoreError::Deidentification)?;
        match copy_of(tx, scope, epoch, deid, &plan, &types).await? {
            Ok(copy) => {
                let built = !shadow_current(tx, &copy).await?;
                if built {
                    // Dropping the previous copy dropped its view too.
                    tx.batch_execute(&copy.build.join(";\n")).await?;
                    tx.batch_execute(&format!("COMMENT ON TABLE {} IS {}", copy.quoted(), literal(&copy.comment())))
                        .await?;
                    pass.shadows_built.push(format!("{scope}/{name}"));
                }
                write_view(tx, &copy.view, existing, built, pass).await?;
                kept.insert(copy.name);
            }
            Err(why) => {
                let view = views::view(scope, epoch, deid, table, &types).map_err(StoreError::Deidentification)?;
                if write_view(tx, &view, existing, false, pass).await? {
                    tracing::warn!(scope, table = %name, reason = %why, "de-identified view joins the mapping (no copy): lists are slower");
                    pass.joined.push(format!("{scope}/{name}: {why}"));
                }
            }
        }
    }
    Ok(())
}

/// The table's pseudonymized copy, or why it has none: no primary key, or
/// no TRIGGER privilege for the admin role (or a name a trigger body
/// cannot hold).
async fn copy_of(
    tx: &impl GenericClient,
    scope: &str,
    epoch: i32,
    deid: &Deidentification,
    plan: &views::TablePlan,
    types: &BTreeMap<String, ColumnType>,
) -> Result<Result<shadow::Shadow, String>, StoreError> {
    let table = plan.source.quoted();
    let may_trigger: bool = tx
        .query_one("SELECT coalesce(has_table_privilege(to_regclass($1), 'TRIGGER'), false)", &[&table])
        .await?
        .get(0);
    if !may_trigger {
        return Ok(Err("the admin role holds no TRIGGER privilege on the table".into()));
    }
    let mut primary_key = Vec::new();
    let mut indexes = Vec::new();
    for row in tx.query(TABLE_INDEXES_SQL, &[&table]).await? {
        let columns: Vec<String> = row.get(0);
        if row.get::<_, bool>(1) {
            primary_key = columns;
        } else {
            indexes.push(columns);
        }
    }
    indexes.sort();
    Ok(shadow::shadow(scope, epoch, deid, plan, types, &primary_key, &indexes))
}

async fn shadow_current(tx: &impl GenericClient, copy: &shadow::Shadow) -> Result<bool, StoreError> {
    let maps = copy.maps.len() as i32;
    let row = tx
        .query_one(SHADOW_CURRENT_SQL, &[&copy.name, &copy.comment(), &copy.trigger, &maps, &copy.truncate_trigger])
        .await?;
    Ok(row.get(0))
}

/// The broker's copies: name → comment.
async fn owned_shadows(client: &Client) -> Result<BTreeMap<String, String>, StoreError> {
    Ok(client.query(OWNED_SHADOWS_SQL, &[]).await?.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Creates or re-creates one view unless its fingerprint is current (and
/// `force` is not set: its copy was rebuilt, dropping it); whether it did.
async fn write_view(
    tx: &tokio_postgres::Transaction<'_>,
    view: &views::View,
    existing: &BTreeMap<(String, String), String>,
    force: bool,
    pass: &mut DeidPass,
) -> Result<bool, StoreError> {
    if !force && existing.get(&(view.schema.clone(), view.name.clone())) == Some(&view.comment()) {
        return Ok(false);
    }
    let schema = ident(&view.schema);
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
         DROP VIEW IF EXISTS {quoted};
         {create};
         COMMENT ON VIEW {quoted} IS {comment}",
        quoted = view.quoted(),
        create = view.create,
        comment = literal(&view.comment()),
    ))
    .await?;
    pass.views_written.push(format!("{}.{}", view.schema, view.name));
    Ok(true)
}

/// The broker's views: (schema, name) → comment.
async fn owned_views(client: &Client) -> Result<BTreeMap<(String, String), String>, StoreError> {
    Ok(client.query(OWNED_VIEWS_SQL, &[]).await?.into_iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
}

async fn base_exists(tx: &impl GenericClient) -> Result<bool, StoreError> {
    let row = tx
        .query_one(
            "SELECT to_regclass('mcpw_deid.scopes') IS NOT NULL AND to_regprocedure('mcpw_deid.new_token(text)') IS NOT NULL
                    AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('mcpw_deid.scopes')
                                AND attname = 'previous_until' AND NOT attisdropped)
                    AND to_regclass('mcpw_deid.shadow_stale') IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Entities named by identifier columns of the wanted tables.
pub fn entities_used(deid: &Deidentification, wanted: &WantedViews) -> BTreeSet<String> {
    wanted
        .values()
        .flatten()
        .filter_map(|t| classification::table(deid, t))
        .flat_map(|t| t.columns.iter())
        .filter(|c| c.class == ColumnClass::Identifier)
        .filter_map(|c| c.entity.clone())
        .collect()
}

async fn entity_map(tx: &impl GenericClient, deid: &Deidentification, name: &str) -> Result<EntityMap, StoreError> {
    let entity = deid
        .entities
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| StoreError::Deidentification(format!("entity {name:?} is not declared")))?;
    let key_table = TableName::parse(&entity.key.table)
        .ok_or_else(|| StoreError::Deidentification(format!("{} is not schema-qualified", entity.key.table)))?;
    let types = column_types(tx, &entity.key.table).await?;
    let key_type = types
        .get(&entity.key.column)
        .ok_or_else(|| {
            StoreError::Deidentification(format!(
                "entity {name:?}'s key {}.{} does not exist",
                entity.key.table, entity.key.column
            ))
        })?
        .name
        .clone();
    let existing: Option<String> = tx.query_opt(mapping::MAP_KEY_TYPE_SQL, &[&name]).await?.map(|r| r.get(0));
    if let Some(existing) = existing
        && existing != key_type
    {
        return Err(StoreError::Deidentification(format!(
            "entity {name:?}'s key is now {key_type}, but its pseudonyms map {existing} keys: \
             rotate the entity's mapping before changing the key's type"
        )));
    }
    Ok(EntityMap {
        entity: name.to_string(),
        prefix: entity.prefix.clone(),
        key_table,
        key_column: entity.key.column.clone(),
        key_type,
    })
}

/// Whether the entity's mapping table, trigger function (by fingerprint)
/// and trigger on its key table all exist.
async fn entity_current(tx: &impl GenericClient, map: &EntityMap, fingerprint: &str) -> Result<bool, StoreError> {
    let row = tx
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL,
                    coalesce(obj_description(to_regprocedure($2), 'pg_proc'), '') = $3,
                    EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = $4 AND tgrelid = to_regclass($5) AND tgenabled <> 'D')",
            &[
                &mapping::map_table(&map.entity),
                &format!("{}.{}()", ident(MAP_SCHEMA), ident(&format!("tokens_{}", map.entity))),
                &fingerprint,
                &mapping::trigger_name(&map.entity),
                &map.key_table.quoted(),
            ],
        )
        .await?;
    Ok(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2))
}

async fn column_types(tx: &impl GenericClient, table: &str) -> Result<BTreeMap<String, ColumnType>, StoreError> {
    let name = TableName::parse(table)
        .ok_or_else(|| StoreError::Deidentification(format!("{table} is not schema-qualified")))?;
    let rows = tx.query(COLUMN_TYPES_SQL, &[&name.schema, &name.table]).await?;
    if rows.is_empty() {
        return Err(StoreError::Deidentification(format!("table {table} does not exist")));
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let category: String = r.get(2);
            (r.get(0), ColumnType { name: r.get(1), category: category.chars().next().unwrap_or('X') })
        })
        .collect())
}

fn fingerprint(text: &str) -> String {
    format!("mcp-warden {}", hex::encode(&Sha256::digest(text.as_bytes())[..8]))
}
