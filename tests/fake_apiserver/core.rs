//! The fake's storage and verbs: objects with resourceVersions, server-side
//! apply with managed fields, updates moving field ownership, finalizers
//! and deletion, the watch event log, and label selectors. Every behaviour
//! here is one the recordings show (see their README's "facts").

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::{Map, Value, json};

use super::fields::{self, FieldSet};
use super::kinds::{self, Kind};

/// `(plural, namespace, name)`.
pub type Key = (String, String, String);

/// Events kept for watches to resume from.
const LOG_LIMIT: usize = 50_000;

/// An API error, as a Status body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// The Status object.
    pub body: Value,
}

fn status_error(code: u16, reason: &str, message: String, details: Value) -> ApiError {
    let mut body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": message, "reason": reason, "code": code});
    if !details.is_null() {
        body["details"] = details;
    }
    ApiError { code, body }
}

fn details(kind: &Kind, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind.plural});
    if !kind.group.is_empty() {
        d["group"] = json!(kind.group);
    }
    d
}

/// 404 NotFound in the real server's shape.
pub fn not_found(kind: &Kind, name: &str) -> ApiError {
    let what = if kind.group.is_empty() { kind.plural.to_string() } else { format!("{}.{}", kind.plural, kind.group) };
    status_error(404, "NotFound", format!("{what} \"{name}\" not found"), details(kind, name))
}

/// One entry of the watch event log.
#[derive(Debug, Clone)]
pub struct Event {
    /// resourceVersion of the change.
    pub rv: u64,
    /// Plural of the object's kind.
    pub plural: String,
    /// Its namespace.
    pub namespace: String,
    /// ADDED, MODIFIED or DELETED.
    pub type_: &'static str,
    /// The object after (for DELETED: as it was, with the new RV).
    pub object: Value,
    /// The object before, for selector transitions.
    pub old: Option<Value>,
}

/// The stored world.
#[derive(Default)]
pub struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// The event log, oldest first; events before `oldest_rv` are gone.
    pub events: VecDeque<Event>,
    oldest_rv: u64,
    uid_seq: u64,
    ip_seq: u32,
    /// Objects really removed, for the garbage collector.
    pub removed_uids: Vec<(String, String)>,
}

/// The storage, behind a lock, and a signal of new events.
pub struct Core {
    /// The state.
    pub state: Mutex<State>,
    /// Latest resourceVersion: watches wake on its change.
    pub latest: tokio::sync::watch::Sender<u64>,
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn key(kind: &Kind, namespace: &str, name: &str) -> Key {
    (kind.plural.to_string(), namespace.to_string(), name.to_string())
}

fn entries(object: &Value) -> Vec<Value> {
    object.pointer("/metadata/managedFields").and_then(Value::as_array).cloned().unwrap_or_default()
}

fn entry_is(e: &Value, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
    e["manager"] == manager
        && e["operation"] == operation
        && e.get("subresource").and_then(Value::as_str) == subresource
}

fn set_of_entry(e: &Value) -> FieldSet {
    e.get("fieldsV1").and_then(Value::as_object).cloned().unwrap_or_default()
}

/// The object without what changes on every write (resourceVersion,
/// managed-field times): two objects equal under this are a no-op.
fn comparable(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if let Some(mf) = meta.get_mut("managedFields").and_then(Value::as_array_mut) {
            for e in mf {
                e.as_object_mut().map(|e| e.remove("time"));
            }
        }
    }
    o
}

fn spec_part(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    o
}

/// What a write may change: the main resource (status kept as it was where
/// status is a subresource) or the status alone.
fn view(kind: &Kind, subresource: Option<&str>, object: &Value) -> Value {
    match subresource {
        Some("status") => json!({"status": object.get("status").cloned().unwrap_or(Value::Null)}),
        _ if kind.status_subresource => {
            let mut o = object.clone();
            o.as_object_mut().map(|m| m.remove("status"));
            o
        }
        _ => object.clone(),
    }
}

impl Core {
    /// An empty world.
    pub fn new() -> Self {
        let (latest, _) = tokio::sync::watch::channel(0);
        Core { state: Mutex::new(State { rv: 1000, oldest_rv: 1000, ..State::default() }), latest }
    }

    /// The lock.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.lock().rv
    }

    /// GET.
    pub fn get(&self, kind: &Kind, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.lock().objects.get(&key(kind, namespace, name)).cloned().ok_or_else(|| not_found(kind, name))
    }

    /// Every object of `kind` (in `namespace`, or all) matching `selector`,
    /// sorted by namespace and name, and the list's resourceVersion.
    pub fn list(&self, kind: &Kind, namespace: Option<&str>, selector: &Selector) -> (Vec<Value>, u64) {
        let state = self.lock();
        let items = state
            .objects
            .iter()
            .filter(|((plural, ns, _), object)| {
                plural == kind.plural && namespace.is_none_or(|n| n == ns) && selector.matches(object)
            })
            .map(|(_, o)| o.clone())
            .collect();
        (items, state.rv)
    }

    /// Applies `f` to every object of `kind` in `namespace` matching
    /// `selector`, without copying them (for the fake's own controllers).
    pub fn scan<T>(
        &self,
        kind: &Kind,
        namespace: &str,
        selector: &Selector,
        mut f: impl FnMut(&Value) -> Option<T>,
    ) -> Vec<T> {
        let state = self.lock();
        let from = (kind.plural.to_string(), namespace.to_string(), String::new());
        state
            .objects
            .range(from..)
            .take_while(|((plural, ns, _), _)| plural == kind.plural && ns == namespace)
            .filter(|(_, o)| selector.matches(o))
            .filter_map(|(_, o)| f(o))
            .collect()
    }

    /// Drops the event log before `keep` most recent events: watches from
    /// older versions get 410 Expired.
    pub fn compact(&self, keep: usize) {
        let mut state = self.lock();
        while state.events.len() > keep {
            if let Some(e) = state.events.pop_front() {
                state.oldest_rv = e.rv;
            }
        }
    }

    /// The oldest resourceVersion a watch may start from.
    pub fn oldest_rv(&self) -> u64 {
        self.lock().oldest_rv
    }

    fn commit(&self, state: &mut State, kind: &Kind, k: Key, old: Option<Value>, new: Option<Value>) -> Option<Value> {
        state.rv += 1;
        let rv = state.rv;
        let (type_, object) = match (&old, new) {
            (None, Some(mut n)) => {
                n["metadata"]["resourceVersion"] = json!(rv.to_string());
                state.objects.insert(k.clone(), n.clone());
                ("ADDED", n)
            }
            (Some(_), Some(mut n)) => {
                n["metadata"]["resourceVersion"] = json!(rv.to_string());
                state.objects.insert(k.clone(), n.clone());
                ("MODIFIED", n)
            }
            (Some(o), None) => {
                state.objects.remove(&k);
                let mut gone = o.clone();
                gone["metadata"]["resourceVersion"] = json!(rv.to_string());
                if let Some(uid) = o.pointer("/metadata/uid").and_then(Value::as_str) {
                    state.removed_uids.push((k.1.clone(), uid.to_string()));
                }
                ("DELETED", gone)
            }
            (None, None) => return None,
        };
        state.events.push_back(Event {
            rv,
            plural: kind.plural.to_string(),
            namespace: k.1.clone(),
            type_,
            object: object.clone(),
            old,
        });
        // Like etcd's compaction: old history goes; a watch from before it
        // gets 410 Expired and lists again.
        while state.events.len() > LOG_LIMIT {
            if let Some(e) = state.events.pop_front() {
                state.oldest_rv = e.rv;
            }
        }
        self.latest.send_replace(rv);
        Some(object)
    }

    fn new_uid(state: &mut State) -> String {
        state.uid_seq += 1;
        format!("00000000-0000-4000-8000-{:012x}", state.uid_seq)
    }

    fn fill_new(state: &mut State, kind: &Kind, namespace: &str, object: &mut Value) {
        let meta = object["metadata"].as_object_mut().map(std::mem::take).unwrap_or_default();
        let mut meta: Map<String, Value> = meta;
        if !namespace.is_empty() {
            meta.insert("namespace".into(), json!(namespace));
        }
        meta.insert("uid".into(), json!(Self::new_uid(state)));
        meta.insert("creationTimestamp".into(), json!(now()));
        if kind.generation {
            meta.insert("generation".into(), json!(1));
        }
        object["metadata"] = Value::Object(meta);
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind);
        let ip = &mut state.ip_seq;
        kinds::apply_defaults(kind, object, || {
            *ip += 1;
            format!("10.0.{}.{}", *ip / 250, *ip % 250 + 1)
        });
    }

    /// POST.
    pub fn create(&self, kind: &Kind, namespace: &str, mut body: Value, manager: &str) -> Result<Value, ApiError> {
        let name = body.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
        if kind.kind == "Event" && body.get("eventTime").is_none_or(Value::is_null) {
            return Err(status_error(
                422,
                "Invalid",
                format!("Event.events.k8s.io \"{name}\" is invalid: eventTime: Required value"),
                json!({"name": name, "group": "events.k8s.io", "kind": "Event"}),
            ));
        }
        let mut state = self.lock();
        let k = key(kind, namespace, &name);
        if state.objects.contains_key(&k) {
            let what =
                if kind.group.is_empty() { kind.plural.to_string() } else { format!("{}.{}", kind.plural, kind.group) };
            return Err(status_error(
                409,
                "AlreadyExists",
                format!("{what} \"{name}\" already exists"),
                details(kind, &name),
            ));
        }
        let set = fields::set_of_object(&view(kind, None, &body));
        if kind.status_subresource && kind.kind != "Pod" {
            body.as_object_mut().map(|m| m.remove("status"));
        }
        Self::fill_new(&mut state, kind, namespace, &mut body);
        body["metadata"]["managedFields"] = json!([{
            "manager": manager, "operation": "Update", "apiVersion": kind.api_version(), "time": now(),
            "fieldsType": "FieldsV1", "fieldsV1": set
        }]);
        Ok(self.commit(&mut state, kind, k, None, Some(body)).unwrap_or(Value::Null))
    }

    /// Server-side apply (PATCH application/apply-patch+yaml).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        config: Value,
        manager: &str,
        force: bool,
        subresource: Option<&str>,
    ) -> Result<(u16, Value), ApiError> {
        if config.get("kind").is_none_or(Value::is_null) {
            return Err(status_error(400, "BadRequest", "invalid object type: /, Kind=".into(), Value::Null));
        }
        let mut state = self.lock();
        let k = key(kind, namespace, name);
        let live = state.objects.get(&k).cloned();
        let applied = view(kind, subresource, &config);
        let new_set = fields::set_of_object(&applied);
        let Some(live) = live else {
            if subresource.is_some() {
                return Err(not_found(kind, name));
            }
            let mut object = applied.clone();
            Self::fill_new(&mut state, kind, namespace, &mut object);
            object["metadata"]["name"] = json!(name);
            object["metadata"]["managedFields"] = json!([entry(kind, manager, "Apply", None, &new_set)]);
            let created = self.commit(&mut state, kind, k, None, Some(object)).unwrap_or(Value::Null);
            return Ok((201, created));
        };
        let mut managed = entries(&live);
        let mine = |e: &Value| entry_is(e, manager, "Apply", subresource);
        // Conflicts: fields another manager owns, with a different value.
        let mut conflicts = Vec::new();
        for path in fields::leaves(&new_set) {
            for e in managed.iter().filter(|e| !mine(e)) {
                if fields::contains(&set_of_entry(e), &path)
                    && fields::get(&live, &path) != fields::get(&applied, &path)
                {
                    conflicts.push((
                        path.clone(),
                        e["manager"].as_str().unwrap_or("").to_string(),
                        e["operation"] == "Update",
                    ));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let causes: Vec<Value> = conflicts
                .iter()
                .map(|(path, who, update)| {
                    let message = if *update {
                        format!("conflict with \"{who}\" using {}", kind.version)
                    } else {
                        format!("conflict with \"{who}\"")
                    };
                    json!({"reason": "FieldManagerConflict", "message": message, "field": render_path(path)})
                })
                .collect();
            return Err(status_error(
                409,
                "Conflict",
                format!("Apply failed with {} conflict(s)", causes.len()),
                json!({"causes": causes}),
            ));
        }
        for (path, who, _) in &conflicts {
            for e in managed.iter_mut().filter(|e| e["manager"] == who.as_str()) {
                let mut set = set_of_entry(e);
                fields::remove(&mut set, path);
                e["fieldsV1"] = Value::Object(set);
            }
        }
        let previous = managed.iter().find(|e| mine(e)).map(set_of_entry).unwrap_or_default();
        let others: Vec<FieldSet> = managed.iter().filter(|e| !mine(e)).map(set_of_entry).collect();
        let mut object = live.clone();
        for path in fields::leaves(&previous) {
            if !fields::contains(&new_set, &path) && !others.iter().any(|o| fields::contains(o, &path)) {
                fields::remove_value(&mut object, &path);
            }
        }
        fields::merge(&mut object, &applied, "");
        managed.retain(|e| !mine(e) && !set_of_entry(e).is_empty());
        let previous_entry = entries(&live).into_iter().find(|e| mine(e));
        let time = match &previous_entry {
            Some(e) if set_of_entry(e) == new_set => e["time"].clone(),
            _ => json!(now()),
        };
        let mut own = entry(kind, manager, "Apply", subresource, &new_set);
        own["time"] = time;
        managed.push(own);
        object["metadata"]["managedFields"] = json!(managed);
        self.finish_write(&mut state, kind, k, live, object).map(|o| (200, o))
    }

    /// An update (PUT, merge patch, JSON patch) by `manager`: the fields it
    /// changes become its own and leave every other manager.
    pub fn update(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        manager: &str,
        subresource: Option<&str>,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let k = key(kind, namespace, name);
        let live = state.objects.get(&k).cloned().ok_or_else(|| not_found(kind, name))?;
        let proposed = change(&live)?;
        if let Some(expected) = proposed.pointer("/metadata/resourceVersion").and_then(Value::as_str)
            && Some(expected) != live.pointer("/metadata/resourceVersion").and_then(Value::as_str)
        {
            let what =
                if kind.group.is_empty() { kind.plural.to_string() } else { format!("{}.{}", kind.plural, kind.group) };
            return Err(status_error(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {what} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                ),
                details(kind, name),
            ));
        }
        // What this write may change; the rest stays as it was.
        let mut object = live.clone();
        match subresource {
            Some("status") => object["status"] = proposed.get("status").cloned().unwrap_or(Value::Null),
            _ => {
                let keep_status = live.get("status").cloned();
                object = proposed.clone();
                for field in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "managedFields",
                    "deletionTimestamp",
                    "namespace",
                    "name",
                ] {
                    match live["metadata"].get(field) {
                        Some(v) => object["metadata"][field] = v.clone(),
                        None => {
                            object["metadata"].as_object_mut().map(|m| m.remove(field));
                        }
                    }
                }
                if kind.status_subresource {
                    match keep_status {
                        Some(s) => object["status"] = s,
                        None => {
                            object.as_object_mut().map(|m| m.remove("status"));
                        }
                    }
                }
                object["apiVersion"] = json!(kind.api_version());
                object["kind"] = json!(kind.kind);
            }
        }
        let changed = fields::changed(&view(kind, subresource, &live), &view(kind, subresource, &object));
        let mut managed = entries(&live);
        for e in managed.iter_mut() {
            let mut set = set_of_entry(e);
            for path in &changed {
                fields::remove(&mut set, path);
            }
            e["fieldsV1"] = Value::Object(set);
        }
        let mut own =
            managed.iter().find(|e| entry_is(e, manager, "Update", subresource)).map(set_of_entry).unwrap_or_default();
        for path in &changed {
            if fields::get(&object, path).is_some() {
                fields::insert(&mut own, path);
            }
        }
        managed.retain(|e| !entry_is(e, manager, "Update", subresource) && !set_of_entry(e).is_empty());
        if !own.is_empty() {
            managed.push(entry(kind, manager, "Update", subresource, &own));
        }
        object["metadata"]["managedFields"] = json!(managed);
        self.finish_write(&mut state, kind, k, live, object)
    }

    /// Stores a written object: defaults, generation, a no-op left alone,
    /// and an object whose last finalizer went while deleting removed.
    fn finish_write(
        &self,
        state: &mut State,
        kind: &Kind,
        k: Key,
        live: Value,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let ip = &mut state.ip_seq;
        kinds::apply_defaults(kind, &mut object, || {
            *ip += 1;
            format!("10.0.{}.{}", *ip / 250, *ip % 250 + 1)
        });
        if kind.generation && spec_part(&object) != spec_part(&live) {
            let generation = live.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
            object["metadata"]["generation"] = json!(generation + 1);
        }
        if comparable(&object) == comparable(&live) {
            // A no-op: nothing stored, no event, the same resourceVersion.
            return Ok(live);
        }
        let deleting = object.pointer("/metadata/deletionTimestamp").is_some();
        let finalizers_left =
            object.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if deleting && !finalizers_left {
            // The last finalizer went: the object is deleted. The answer
            // shows it without finalizers at its old version; the DELETED
            // event carries it as it was, at a new version.
            self.commit(state, kind, k, Some(live.clone()), None);
            let mut answer = object;
            answer["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"].clone();
            return Ok(answer);
        }
        Ok(self.commit(state, kind, k, Some(live), Some(object)).unwrap_or(Value::Null))
    }

    /// DELETE: held by finalizers, the object gets its deletionTimestamp;
    /// otherwise it goes.
    pub fn delete(&self, kind: &Kind, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let k = key(kind, namespace, name);
        let live = state.objects.get(&k).cloned().ok_or_else(|| not_found(kind, name))?;
        let held = live.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if held {
            if live.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(live);
            }
            let mut marked = live.clone();
            marked["metadata"]["deletionTimestamp"] = json!(now());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            if kind.generation {
                let generation = live.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
                marked["metadata"]["generation"] = json!(generation + 1);
            }
            return Ok(self.commit(&mut state, kind, k, Some(live), Some(marked)).unwrap_or(Value::Null));
        }
        let uid = live.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
        self.commit(&mut state, kind, k, Some(live.clone()), None);
        if kind.kind == "Pod" {
            return Ok(live);
        }
        let mut d = details(kind, name);
        d["uid"] = uid;
        Ok(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d}))
    }

    /// Events after `from` for `plural`, in `namespace` (or all).
    pub fn events_after(&self, from: u64, plural: &str, namespace: Option<&str>) -> Result<(Vec<Event>, u64), u64> {
        let state = self.lock();
        if from < state.oldest_rv {
            return Err(state.rv);
        }
        // The log is ordered by resourceVersion: start after `from`.
        let start = state.events.partition_point(|e| e.rv <= from);
        let events = state
            .events
            .range(start..)
            .filter(|e| e.plural == plural && namespace.is_none_or(|n| n == e.namespace))
            .cloned()
            .collect();
        Ok((events, state.rv))
    }

    /// Takes the uids of objects removed since the last call.
    pub fn take_removed(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.lock().removed_uids)
    }

    /// Every stored object whose owner references name `uid`.
    pub fn dependents(&self, namespace: &str, uid: &str) -> Vec<(Kind, String)> {
        let state = self.lock();
        state
            .objects
            .iter()
            .filter(|((_, ns, _), o)| {
                ns == namespace
                    && o.pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .filter_map(|((plural, _, name), o)| {
                let group = o["apiVersion"].as_str().and_then(|a| a.split_once('/')).map_or("", |(g, _)| g);
                Some((kinds::by_plural(group, plural)?, name.clone()))
            })
            .collect()
    }
}

fn entry(kind: &Kind, manager: &str, operation: &str, subresource: Option<&str>, set: &FieldSet) -> Value {
    let mut e = json!({"manager": manager, "operation": operation, "apiVersion": kind.api_version(), "time": now(),
                       "fieldsType": "FieldsV1", "fieldsV1": set});
    if let Some(s) = subresource {
        e["subresource"] = json!(s);
    }
    e
}

fn render_path(path: &[fields::Seg]) -> String {
    path.iter()
        .map(|seg| match seg {
            fields::Seg::F(f) => format!(".{f}"),
            fields::Seg::K(k) => format!("[{}]", Value::Object(k.clone())),
            fields::Seg::V(v) => format!("[={v}]"),
        })
        .collect()
}

/// A label selector (`a=b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`).
#[derive(Debug, Clone, Default)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    /// Parses a `labelSelector` query value.
    pub fn parse(text: &str) -> Self {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.trim().is_empty() {
            // Split at the next comma outside parentheses.
            let mut depth = 0;
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let part = rest[..end].trim();
            rest = if end < rest.len() { &rest[end + 1..] } else { "" };
            let set = |s: &str| {
                s.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect()
            };
            out.push(if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), set(v))
            } else if let Some((k, v)) = part.split_once(" in ") {
                Requirement::In(k.trim().into(), set(v))
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            });
        }
        Selector(out)
    }

    /// Whether `object`'s labels match.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v),
            Requirement::NotEq(k, v) => label(k) != Some(v),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
        })
    }
}
