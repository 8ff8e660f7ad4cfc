//! Minimum necessary inside a call: a tool's declared arguments and its
//! argument rules, checked by the sidecar after authorization and before
//! anything is forwarded (`authz::decide`, so every transport generation
//! and every batch element passes here).
//!
//! ```text
//!   arguments (JSON object) ─ declared? type? bounds? ─ rules (CEL over args, caller, now) ─ Ok / Refusal
//! ```
//!
//! Semantics: a JSON number without a fractional part is a CEL `int`
//! (`50.0` is 50), any other a `double`, and the two compare with each
//! other (`args.limit <= 50`). A rule reading an argument the call did not
//! give fails with an evaluation error — the call is refused — unless the
//! rule guards it with `has(args.x)`. A rule must evaluate to `true`;
//! `false`, another type or an error refuses (fail closed). Refusals name
//! the declared argument or the rule's message, never a value, and never a
//! name the caller made up.
//!
//! The interpreter has no cost limit, so rules are bounded statically: at
//! most 512 characters (CRD), no comprehension macros (`all`, `exists`,
//! `exists_one`, `map`, `filter`), only the variables `args`, `caller` and
//! `now`; arguments deeper than [`MAX_DEPTH`] are refused before any rule
//! runs.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, RwLock};

use cel::common::ast::operators::INDEX;
use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};

use cel::objects::{Key, Map, Value as CelValue};
use cel::{Context, ExecutionError, Program};
use serde_json::Value;

use super::Caller;
use crate::api::{ArgumentRule, ArgumentSpec, ArgumentType};

/// One declared argument, as the sidecar checks it (the API's type).
pub type CompiledArgument = ArgumentSpec;

/// Deepest nesting of a call's arguments.
pub const MAX_DEPTH: usize = 16;

/// Longest rule, in bytes (the CRD's bound, held here for policy files).
pub const MAX_RULE_BYTES: usize = 512;
/// Deepest nesting of brackets in a rule.
pub const MAX_NESTING: usize = 8;
/// Most operator characters (`+-*/%!<>=&|?:.,`) in a rule: the syntax
/// tree's depth follows from it, and the interpreter recurses over it on
/// the runtime's 2 MiB worker stacks. (Split a long predicate into several
/// rules: each has its own budget.)
pub const MAX_OPERATORS: usize = 32;
/// Stack of the thread that parses rules: the parser recurses deeply per
/// nesting level (a debug build overflowed 2 MiB at 16 parentheses).
const PARSER_STACK: usize = 64 << 20;

/// The rule's shape, bounded before any parser sees it: a rule is a short
/// predicate, and its syntax tree's depth (what the parser and the
/// interpreter recurse over) follows from its nesting and operator count.
fn bounded(rule: &str) -> Result<(), String> {
    if rule.len() > MAX_RULE_BYTES {
        return Err(format!("is longer than {MAX_RULE_BYTES} bytes"));
    }
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in rule.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '(' | '[' | '{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                '+' | '-' | '*' | '/' | '%' | '!' | '<' | '>' | '=' | '&' | '|' | '?' | ':' | '.' | ',' => {
                    operators += 1
                }
                _ => {}
            },
        }
    }
    if deepest > MAX_NESTING {
        return Err(format!("nests brackets {deepest} deep; at most {MAX_NESTING}"));
    }
    if operators > MAX_OPERATORS {
        return Err(format!("has {operators} operator characters; at most {MAX_OPERATORS}"));
    }
    Ok(())
}

/// Parses a bounded rule on a thread with a stack the parser cannot exhaust.
fn parse(rule: &str) -> Result<Program, String> {
    bounded(rule)?;
    let source = rule.to_string();
    std::thread::Builder::new()
        .name("cel-parse".into())
        .stack_size(PARSER_STACK)
        .spawn(move || Program::compile(&source).map_err(|e| format!("does not parse: {e}")))
        .map_err(|e| format!("cannot be parsed now: {e}"))?
        .join()
        .map_err(|_| "crashed the parser".to_string())?
}

/// Why a rule is not accepted (at `check`, the operator and the sidecar),
/// given the claims the server takes from tokens for rules.
pub fn validate_rule(rule: &str, claims: &BTreeSet<String>) -> Result<(), String> {
    let program = compile(rule)?;
    visit(program.expression(), &mut |expr| caller_reference(expr, claims))
}

/// Parses and checks a rule: its shape bounded, no comprehension, only the
/// names rules may use.
fn compile(rule: &str) -> Result<Program, String> {
    let program = parse(rule)?;
    // The parser expands the comprehension macros into Comprehension
    // expressions; their cost grows with the input, which nothing bounds.
    visit(program.expression(), &mut |expr| match expr.expr {
        Expr::Comprehension(_) => Err("uses a comprehension (all, exists, exists_one, map, filter); \
                                       the sidecar runs no loops over a call's arguments"
            .into()),
        // cel 0.13 parses `Name{…}` but its interpreter panics on it ("not
        // yet implemented: Support structs!"), as on an unspecified node:
        // found by the fuzzer.
        Expr::Struct(_) => {
            Err("constructs a message (`Name{…}`); rules compare values and have no message types".into())
        }
        Expr::Unspecified => Err("holds an expression the interpreter cannot evaluate".into()),
        _ => Ok(()),
    })?;
    // A probe run finds names the rule uses that do not exist; a missing
    // key of `args` is what a real call may supply, so it is no error here.
    let probe = Caller::new("", [""; 0]);
    let no_args = CelValue::Map(Map { map: Arc::new(HashMap::new()) });
    let probed = super::contained::contained(|| with_context(&no_args, &probe, |ctx| program.execute(ctx)))
        .map_err(|super::contained::Panicked| "crashes the rule interpreter".to_string())?;
    match probed {
        Err(ExecutionError::UndeclaredReference(name)) => {
            Err(format!("uses {name:?}: only args, caller (subject, groups, claims) and now are defined"))
        }
        Err(ExecutionError::FunctionError { function, .. }) if function.is_empty() => {
            Err("calls an unknown function".into())
        }
        _ => Ok(program),
    }
}

/// Visits every node of a syntax tree, stopping at the first error (its
/// depth is bounded by [`bounded`], so the recursion is too).
fn visit(expr: &IdedExpr, check: &mut dyn FnMut(&IdedExpr) -> Result<(), String>) -> Result<(), String> {
    check(expr)?;
    match &expr.expr {
        Expr::Call(call) => {
            call.target.as_deref().map_or(Ok(()), |t| visit(t, check))?;
            call.args.iter().try_for_each(|a| visit(a, check))
        }
        Expr::List(list) => list.elements.iter().try_for_each(|e| visit(e, check)),
        Expr::Map(map) => map.entries.iter().try_for_each(|e| visit_entry(e, check)),
        Expr::Struct(object) => object.entries.iter().try_for_each(|e| visit_entry(e, check)),
        Expr::Select(select) => visit(&select.operand, check),
        // A comprehension's parts are not visited: compiling refuses it.
        Expr::Comprehension(_) | Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => Ok(()),
    }
}

fn visit_entry(
    entry: &cel::common::ast::IdedEntryExpr,
    check: &mut dyn FnMut(&IdedExpr) -> Result<(), String>,
) -> Result<(), String> {
    match &entry.expr {
        EntryExpr::StructField(f) => visit(&f.value, check),
        EntryExpr::MapEntry(m) => visit(&m.key, check).and_then(|()| visit(&m.value, check)),
    }
}

/// What a rule may read of the caller: `subject`, `groups`, and the claims
/// the server names (`caller.claims.department`, `caller.claims['x']`).
/// A name outside these would only ever refuse calls; it is refused here.
fn caller_reference(expr: &IdedExpr, claims: &BTreeSet<String>) -> Result<(), String> {
    let is_ident = |e: &IdedExpr, name: &str| matches!(&e.expr, Expr::Ident(i) if i == name);
    let is_claims =
        |e: &IdedExpr| matches!(&e.expr, Expr::Select(s) if s.field == "claims" && is_ident(&s.operand, "caller"));
    let named = |claim: &str| {
        if claims.contains(claim) {
            Ok(())
        } else {
            Err(format!(
                "reads caller.claims.{claim}, a claim authentication.oidc.ruleClaims does not name (it names: {})",
                if claims.is_empty() {
                    "none".to_string()
                } else {
                    claims.iter().cloned().collect::<Vec<_>>().join(", ")
                }
            ))
        }
    };
    let literal = |e: &IdedExpr| match &e.expr {
        Expr::Literal(LiteralValue::String(text)) => Some(text.inner().to_string()),
        _ => None,
    };
    match &expr.expr {
        Expr::Select(s) if is_ident(&s.operand, "caller") => match s.field.as_str() {
            "subject" | "groups" | "claims" => Ok(()),
            other => Err(format!("reads caller.{other}: a caller has subject, groups and claims")),
        },
        Expr::Select(s) if is_claims(&s.operand) => named(&s.field),
        Expr::Call(call) if call.func_name == INDEX && call.args.len() == 2 => {
            match (&call.args[0], literal(&call.args[1])) {
                (target, Some(claim)) if is_claims(target) => named(&claim),
                (target, Some(field)) if is_ident(target, "caller") => match field.as_str() {
                    "subject" | "groups" | "claims" => Ok(()),
                    other => Err(format!("reads caller[{other:?}]: a caller has subject, groups and claims")),
                },
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Every argument rule of `server` that is not accepted: `(field path,
/// why)`, e.g. `("spec.tools[0].argumentRules[1].rule", "uses a comprehension …")`.
pub fn invalid_rules(server: &crate::api::MCPServer) -> Vec<(String, String)> {
    let mut invalid = Vec::new();
    let claims: BTreeSet<String> = server.spec.authentication.oidc.rule_claims.iter().cloned().collect();
    for (t, tool) in server.spec.tools.iter().enumerate() {
        for (r, rule) in tool.argument_rules.iter().enumerate() {
            if let Err(why) = validate_rule(&rule.rule, &claims) {
                invalid.push((format!("spec.tools[{t}].argumentRules[{r}].rule"), why));
            }
        }
    }
    invalid
}

/// Why a call's arguments are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// For the decision record: a class and the rule or argument concerned.
    pub reason: String,
    /// For the caller: what is wrong, never a value.
    pub message: String,
}

fn refusal(reason: impl Into<String>, message: impl Into<String>) -> Refusal {
    Refusal { reason: reason.into(), message: message.into() }
}

/// Checks a call's `arguments` against the declaration and the rules.
pub fn check(
    declared: Option<&[CompiledArgument]>,
    rules: &[ArgumentRule],
    caller: &Caller,
    arguments: Option<&Value>,
) -> Result<(), Refusal> {
    if declared.is_none() && rules.is_empty() {
        return Ok(());
    }
    let empty = serde_json::Map::new();
    let given = match arguments {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(_) => return Err(refusal("arguments: not an object", "arguments must be an object")),
    };
    if depth(arguments.unwrap_or(&Value::Null)) > MAX_DEPTH {
        return Err(refusal("arguments: too deep", format!("arguments nested deeper than {MAX_DEPTH} levels")));
    }
    if let Some(declared) = declared {
        if given.keys().any(|k| !declared.iter().any(|d| d.name == *k)) {
            return Err(refusal("arguments: not declared", "an argument that is not declared"));
        }
        for arg in declared {
            match given.get(&arg.name) {
                None if arg.required => {
                    return Err(refusal(
                        format!("argument {}: missing", arg.name),
                        format!("argument {} is required", arg.name),
                    ));
                }
                None => {}
                Some(value) => check_one(arg, value)?,
            }
        }
    }
    if rules.is_empty() {
        return Ok(());
    }
    let args = object_to_cel(given);
    with_context(&args, caller, |ctx| judge(rules, ctx))
}

/// Runs each rule in `ctx`; the first that is not true refuses.
fn judge(rules: &[ArgumentRule], ctx: &Context<'_>) -> Result<(), Refusal> {
    for (index, rule) in rules.iter().enumerate() {
        let program = program(&rule.rule).map_err(|why| {
            refusal(
                format!("argument rule {index}: invalid ({why})"),
                format!("argument rule failed: {}", rule.message),
            )
        })?;
        // Compiling refuses what is known to panic the interpreter; should
        // anything else, the call is refused, not the sidecar crashed.
        let run = super::contained::contained(|| program.execute(ctx));
        let Ok(result) = run else {
            return Err(refusal(
                format!("argument rule {index}: the interpreter failed"),
                format!("argument rule failed: {}", rule.message),
            ));
        };
        match result {
            Ok(CelValue::Bool(true)) => {}
            Ok(CelValue::Bool(false)) => {
                return Err(refusal(
                    format!("argument rule {index} false: {}", rule.message),
                    format!("argument rule failed: {}", rule.message),
                ));
            }
            Ok(_) => {
                return Err(refusal(
                    format!("argument rule {index}: not a boolean"),
                    format!("argument rule failed: {}", rule.message),
                ));
            }
            Err(e) => {
                return Err(refusal(
                    format!("argument rule {index}: evaluation error ({})", error_class(&e)),
                    format!("argument rule failed: {}", rule.message),
                ));
            }
        }
    }
    Ok(())
}

/// An evaluation error's class, without the values it may carry.
fn error_class(e: &ExecutionError) -> &'static str {
    match e {
        ExecutionError::NoSuchKey(_) => "an argument it reads is missing",
        ExecutionError::UndeclaredReference(_) => "an undeclared name",
        ExecutionError::UnsupportedBinaryOperator(..) => "operands of different types",
        _ => "other",
    }
}

fn check_one(arg: &CompiledArgument, value: &Value) -> Result<(), Refusal> {
    let wrong = || {
        refusal(
            format!("argument {}: not {}", arg.name, type_name(arg.kind)),
            format!("argument {} must be {}", arg.name, type_name(arg.kind)),
        )
    };
    match arg.kind {
        ArgumentType::String => {
            let text = value.as_str().ok_or_else(wrong)?;
            if let Some(max) = arg.max_length
                && text.chars().count() > max as usize
            {
                return Err(refusal(
                    format!("argument {}: too long", arg.name),
                    format!("argument {} is longer than {max} characters", arg.name),
                ));
            }
        }
        ArgumentType::Boolean => {
            value.as_bool().ok_or_else(wrong)?;
        }
        ArgumentType::Integer | ArgumentType::Number => {
            let number = value.as_f64().ok_or_else(wrong)?;
            if arg.kind == ArgumentType::Integer && number.fract() != 0.0 {
                return Err(wrong());
            }
            let below = arg.minimum.is_some_and(|m| number < m.0);
            let above = arg.maximum.is_some_and(|m| number > m.0);
            if below || above {
                return Err(refusal(
                    format!("argument {}: out of bounds", arg.name),
                    format!("argument {} is out of its bounds", arg.name),
                ));
            }
        }
    }
    Ok(())
}

fn type_name(kind: ArgumentType) -> &'static str {
    match kind {
        ArgumentType::String => "a string",
        ArgumentType::Integer => "an integer",
        ArgumentType::Number => "a number",
        ArgumentType::Boolean => "a boolean",
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// JSON as CEL: integral numbers are ints (`50.0` too), others doubles.
fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => CelValue::Int(i),
            None => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.0e15 { CelValue::Int(f as i64) } else { CelValue::Float(f) }
            }
        },
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => object_to_cel(map),
    }
}

fn object_to_cel(map: &serde_json::Map<String, Value>) -> CelValue {
    let entries: HashMap<Key, CelValue> =
        map.iter().map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v))).collect();
    CelValue::Map(Map { map: Arc::new(entries) })
}

thread_local! {
    /// CEL's standard functions, registered once per thread:
    /// `Context::default()` registers ~40 of them into a map, which per
    /// call cost more than the rules themselves.
    static FUNCTIONS: Context<'static> = Context::default();
}

/// Runs `f` in a scope holding `args`, `caller` and `now` over the
/// standard functions.
fn with_context<R>(args: &CelValue, caller: &Caller, f: impl FnOnce(&Context<'_>) -> R) -> R {
    FUNCTIONS.with(|functions| {
        let mut ctx = functions.new_inner_scope();
        add_variables(&mut ctx, args, caller);
        f(&ctx)
    })
}

fn add_variables(ctx: &mut Context<'_>, args: &CelValue, caller: &Caller) {
    ctx.add_variable_from_value("args", args.clone());
    let groups: Vec<CelValue> = caller.groups.iter().map(|g| CelValue::String(Arc::new(g.clone()))).collect();
    let claims: HashMap<Key, CelValue> =
        caller.claims.iter().map(|(name, value)| (Key::String(Arc::new(name.clone())), to_cel(value))).collect();
    let caller = HashMap::from([
        (Key::String(Arc::new("subject".into())), CelValue::String(Arc::new(caller.subject.clone()))),
        (Key::String(Arc::new("groups".into())), CelValue::List(Arc::new(groups))),
        (Key::String(Arc::new("claims".into())), CelValue::Map(Map { map: Arc::new(claims) })),
    ]);
    ctx.add_variable_from_value("caller", CelValue::Map(Map { map: Arc::new(caller) }));
    ctx.add_variable_from_value("now", CelValue::Timestamp(chrono::Utc::now().fixed_offset()));
}

/// Most findings listed for one tool's schema (the rest are counted).
const MAX_DRIFT_FINDINGS: usize = 8;

/// How the `inputSchema` a server lists for a tool differs from the tool's
/// declared arguments; empty when they agree. The declaration is what was
/// reviewed, and the gateway enforces it either way; a difference means the
/// server changed under the review (a server that grew a `sql` argument).
///
/// Compared: the argument names (both ways), each declared argument's JSON
/// type, and arguments the server requires that the declaration leaves
/// optional. Bounds may be tighter in the declaration: that is its point.
/// Names the server made up appear only if they are plain identifiers.
pub fn schema_drift(declared: &[CompiledArgument], input_schema: Option<&Value>) -> Vec<String> {
    let Some(schema) = input_schema.and_then(Value::as_object) else {
        return vec!["lists no inputSchema object".into()];
    };
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return vec!["lists an inputSchema whose type is not object".into()];
    }
    let empty = serde_json::Map::new();
    let properties = schema.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let required: Vec<&str> =
        schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let mut findings = Vec::new();
    let undeclared: Vec<&String> = properties.keys().filter(|k| !declared.iter().any(|d| d.name == **k)).collect();
    if !undeclared.is_empty() {
        let mut names: Vec<String> =
            undeclared.iter().take(MAX_DRIFT_FINDINGS).map(|name| printable_name(name)).collect();
        if undeclared.len() > MAX_DRIFT_FINDINGS {
            names.push(format!("and {} more", undeclared.len() - MAX_DRIFT_FINDINGS));
        }
        findings.push(format!("takes undeclared argument(s) {}", names.join(", ")));
    }
    for arg in declared {
        let Some(property) = properties.get(&arg.name) else {
            findings.push(format!("does not list declared argument {:?}", arg.name));
            continue;
        };
        let expected = schema_type(arg.kind);
        let types: Vec<&str> = match property.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect(),
            _ => Vec::new(),
        };
        if types != [expected] {
            let listed = if types.is_empty() { "no single type".to_string() } else { types.join("|") };
            findings.push(format!("types argument {:?} as {listed}, declared {expected}", arg.name));
        }
        if !arg.required && required.contains(&arg.name.as_str()) {
            findings.push(format!("requires argument {:?}, declared optional", arg.name));
        }
    }
    if findings.len() > MAX_DRIFT_FINDINGS {
        let more = findings.len() - MAX_DRIFT_FINDINGS;
        findings.truncate(MAX_DRIFT_FINDINGS);
        findings.push(format!("and {more} more"));
    }
    findings
}

/// A name a server chose, shown only if it is a short plain identifier.
fn printable_name(name: &str) -> String {
    let plain =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain { format!("{name:?}") } else { "(a name that is not a plain identifier)".into() }
}

fn schema_type(kind: ArgumentType) -> &'static str {
    match kind {
        ArgumentType::String => "string",
        ArgumentType::Integer => "integer",
        ArgumentType::Number => "number",
        ArgumentType::Boolean => "boolean",
    }
}

/// Compiled rules, by source (a policy holds a few; the cache is bounded by
/// what the policies in force declare).
/// Calls only read it (concurrently); a miss compiles outside the lock.
static PROGRAMS: LazyLock<RwLock<HashMap<String, Arc<Program>>>> = LazyLock::new(Default::default);

fn program(rule: &str) -> Result<Arc<Program>, String> {
    if let Some(p) = PROGRAMS.read().unwrap_or_else(|p| p.into_inner()).get(rule) {
        return Ok(Arc::clone(p));
    }
    let compiled = Arc::new(compile(rule)?);
    let mut cache = PROGRAMS.write().unwrap_or_else(|p| p.into_inner());
    if cache.len() < 4096 {
        cache.insert(rule.to_string(), Arc::clone(&compiled));
    }
    Ok(compiled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caller(subject: &str, groups: &[&str]) -> Caller {
        Caller::new(subject, groups.iter().copied())
    }

    fn rule(rule: &str, message: &str) -> ArgumentRule {
        ArgumentRule { rule: rule.into(), message: message.into() }
    }

    use crate::api::Bound;

    fn arg(name: &str, kind: ArgumentType) -> CompiledArgument {
        CompiledArgument { name: name.into(), kind, required: false, max_length: None, minimum: None, maximum: None }
    }

    fn declared() -> Vec<CompiledArgument> {
        vec![
            CompiledArgument { required: true, max_length: Some(24), ..arg("patient", ArgumentType::String) },
            CompiledArgument {
                minimum: Some(Bound(1.0)),
                maximum: Some(Bound(50.0)),
                ..arg("limit", ArgumentType::Integer)
            },
            arg("department", ArgumentType::String),
            arg("verbose", ArgumentType::Boolean),
        ]
    }

    fn run(rules: &[ArgumentRule], args: Value) -> Result<(), Refusal> {
        check(Some(&declared()), rules, &caller("dana", &["front-desk"]), Some(&args))
    }

    #[test]
    fn rules_true_false_and_erroring_with_json_numbers_as_cel_numbers() {
        let limit = [rule("args.limit <= 50", "at most 50 rows")];
        assert_eq!(run(&limit, json!({"patient": "pt_1", "limit": 50})), Ok(()));
        assert_eq!(run(&limit, json!({"patient": "pt_1", "limit": 50.0})), Ok(()), "50.0 is the integer 50");
        // Missing argument: the rule reads it, so the call is refused…
        let refused = run(&limit, json!({"patient": "pt_1"})).unwrap_err();
        assert!(refused.reason.contains("evaluation error (an argument it reads is missing)"), "{refused:?}");
        assert_eq!(refused.message, "argument rule failed: at most 50 rows");
        // …unless the rule says what an absent argument means.
        let guarded = [rule("!has(args.limit) || args.limit <= 50", "at most 50 rows")];
        assert_eq!(run(&guarded, json!({"patient": "pt_1"})), Ok(()));
        let prefix = [rule("args.patient.startsWith('pt_')", "patients are named by pseudonym")];
        let refused = run(&prefix, json!({"patient": "MRN-004711"})).unwrap_err();
        assert_eq!(refused.message, "argument rule failed: patients are named by pseudonym");
        assert!(!refused.reason.contains("MRN") && !refused.message.contains("MRN"), "never a value");
        assert!(refused.reason.starts_with("argument rule 0 false"));
        // A rule that is not a boolean refuses.
        let number = [rule("args.limit + 1", "x")];
        assert!(run(&number, json!({"patient": "p", "limit": 3})).unwrap_err().reason.contains("not a boolean"));
        // Int and double compare; a double limit within bounds passes the rule too.
        assert_eq!(run(&[rule("args.limit < 10.5", "x")], json!({"patient": "p", "limit": 10})), Ok(()));
    }

    #[test]
    fn rules_see_the_caller_and_the_clock() {
        let own = [rule("caller.subject == 'dana' && 'front-desk' in caller.groups", "front desk only")];
        assert_eq!(run(&own, json!({"patient": "p"})), Ok(()));
        let other = check(Some(&declared()), &own, &caller("bob", &["billing"]), Some(&json!({"patient": "p"})));
        assert!(other.is_err());
        let dept = [rule("caller.groups.exists(g, g == args.department)", "own department")];
        assert!(validate_rule(&dept[0].rule, &BTreeSet::new()).unwrap_err().contains("comprehension"));
        let clock = [rule("now > timestamp('2020-01-01T00:00:00Z')", "x")];
        assert_eq!(run(&clock, json!({"patient": "p"})), Ok(()));
    }

    #[test]
    fn rules_read_the_claims_the_server_names_and_no_others() {
        let named: BTreeSet<String> = ["department".to_string(), "wards".to_string()].into();
        let own = [rule("caller.claims.department == args.department", "own department only")];
        let wards = [rule("has(args.ward) && args.ward in caller.claims['wards']", "own wards only")];
        for r in own.iter().chain(&wards) {
            assert_eq!(validate_rule(&r.rule, &named), Ok(()), "{}", r.rule);
            assert!(validate_rule(&r.rule, &BTreeSet::new()).unwrap_err().contains("names: none"), "{}", r.rule);
        }
        let mut cardiology = caller("dana", &["front-desk"]);
        cardiology.claims.insert("department".into(), json!("cardiology"));
        cardiology.claims.insert("wards".into(), json!(["3a", "3b"]));
        let call = |caller: &Caller, rules: &[ArgumentRule], args: Value| check(None, rules, caller, Some(&args));
        assert_eq!(call(&cardiology, &own, json!({"department": "cardiology"})), Ok(()));
        let other = call(&cardiology, &own, json!({"department": "oncology"})).unwrap_err();
        assert_eq!(other.message, "argument rule failed: own department only");
        assert_eq!(call(&cardiology, &wards, json!({"ward": "3b"})), Ok(()));
        assert!(call(&cardiology, &wards, json!({"ward": "4"})).is_err());
        // A token without the claim (or with a value the verifier left
        // out) refuses: the rule reads what is absent.
        let unclaimed = caller("dana", &["front-desk"]);
        let refused = call(&unclaimed, &own, json!({"department": "cardiology"})).unwrap_err();
        assert!(refused.reason.contains("evaluation error"), "{refused:?}");
        // Names outside the caller's shape or the named claims are refused
        // when compiled, whichever way they are written.
        for (bad, why) in [
            ("caller.claims.email == 'x'", "caller.claims.email"),
            ("has(caller.claims.email)", "caller.claims.email"),
            ("caller.claims['email'] == 'x'", "caller.claims.email"),
            ("caller.sub == 'dana'", "caller.sub"),
            ("caller['token'] == 'x'", "caller[\"token\"]"),
        ] {
            let refused = validate_rule(bad, &named).unwrap_err();
            assert!(refused.contains(why), "{bad}: {refused}");
        }
        // An index the rule computes reads only what the server named.
        assert_eq!(validate_rule("caller.claims[args.k] == 'x'", &named), Ok(()));
    }

    #[test]
    fn a_listed_schema_that_differs_from_the_declaration_is_drift() {
        let declared = declared();
        let agreeing = json!({"type": "object", "required": ["patient"], "properties": {
            "patient": {"type": "string", "maxLength": 200},
            "limit": {"type": "integer"},
            "department": {"type": ["string", "null"]},
            "verbose": {"type": "boolean"}}});
        assert_eq!(schema_drift(&declared, Some(&agreeing)), Vec::<String>::new());
        let mut grew = agreeing.clone();
        grew["properties"]["sql"] = json!({"type": "string"});
        grew["properties"]["x\u{202e}'; DROP"] = json!({"type": "string"});
        assert_eq!(
            schema_drift(&declared, Some(&grew)),
            ["takes undeclared argument(s) \"sql\", (a name that is not a plain identifier)"]
        );
        let mut changed = agreeing.clone();
        changed["properties"]["limit"] = json!({"type": "number"});
        changed["properties"]["verbose"] = json!({});
        changed["properties"].as_object_mut().unwrap().remove("department");
        changed["required"] = json!(["patient", "limit"]);
        assert_eq!(
            schema_drift(&declared, Some(&changed)),
            [
                "types argument \"limit\" as number, declared integer",
                "requires argument \"limit\", declared optional",
                "does not list declared argument \"department\"",
                "types argument \"verbose\" as no single type, declared boolean",
            ]
        );
        assert_eq!(schema_drift(&declared, None), ["lists no inputSchema object"]);
        assert_eq!(
            schema_drift(&declared, Some(&json!({"type": "array"}))),
            ["lists an inputSchema whose type is not object"]
        );
        // A hostile schema with thousands of properties yields a bounded finding list.
        let many: serde_json::Map<String, Value> =
            (0..5000).map(|i| (format!("p{i}"), json!({"type": "string"}))).collect();
        let wide = json!({"type": "object", "properties": many});
        let findings = schema_drift(&[arg("a", ArgumentType::String)], Some(&wide));
        assert!(findings.len() <= MAX_DRIFT_FINDINGS + 1, "{}", findings.len());
        assert!(findings.iter().map(String::len).sum::<usize>() < 400, "{findings:?}");
        assert!(findings[0].ends_with("and 4992 more"), "{findings:?}");
    }

    #[test]
    fn declarations_refuse_undeclared_wrong_typed_out_of_bound_and_missing_arguments() {
        let ok = json!({"patient": "pt_1", "limit": 10, "department": "cardiology", "verbose": true});
        assert_eq!(run(&[], ok), Ok(()));
        for (args, reason) in [
            (json!({"patient": "pt_1", "sql": "SELECT ssn FROM patients"}), "arguments: not declared"),
            (json!({"limit": 10}), "argument patient: missing"),
            (json!({"patient": 12}), "argument patient: not a string"),
            (json!({"patient": "p", "limit": "10"}), "argument limit: not an integer"),
            (json!({"patient": "p", "limit": 10.5}), "argument limit: not an integer"),
            (json!({"patient": "p", "limit": 1000000}), "argument limit: out of bounds"),
            (json!({"patient": "p", "limit": 0}), "argument limit: out of bounds"),
            (json!({"patient": "p", "verbose": "yes"}), "argument verbose: not a boolean"),
            (json!({"patient": "x".repeat(25)}), "argument patient: too long"),
            (json!(["patient"]), "arguments: not an object"),
        ] {
            let refused = run(&[], args.clone()).unwrap_err();
            assert_eq!(refused.reason, reason, "{args}");
            assert!(!refused.message.contains("SELECT") && !refused.message.contains("sql"), "{refused:?}");
        }
        // Characters, not bytes: 24 multi-byte characters fit.
        assert_eq!(run(&[], json!({"patient": "ü".repeat(24)})), Ok(()));
        // Huge and deep input is refused before any rule runs.
        let mut deep = json!("leaf");
        for _ in 0..(MAX_DEPTH + 2) {
            deep = json!({"x": deep});
        }
        let free = check(None, &[rule("true", "x")], &caller("d", &[]), Some(&json!({"department": deep})));
        assert_eq!(free.unwrap_err().reason, "arguments: too deep");
        let huge = json!({"patient": "p".repeat(4 * 1024 * 1024)});
        assert_eq!(run(&[], huge).unwrap_err().reason, "argument patient: too long");
    }

    #[test]
    fn a_tool_without_declarations_or_rules_takes_anything() {
        assert_eq!(check(None, &[], &caller("d", &[]), Some(&json!({"anything": [1, {"x": null}]}))), Ok(()));
        // Rules without declarations still apply.
        let rules = [rule("size(args) == 0", "no arguments")];
        assert!(check(None, &rules, &caller("d", &[]), Some(&json!({"a": 1}))).is_err());
        assert_eq!(check(None, &rules, &caller("d", &[]), None), Ok(()));
    }

    #[test]
    fn rules_are_bounded_when_compiled() {
        assert_eq!(validate_rule("args.limit <= 50", &BTreeSet::new()), Ok(()));
        assert!(validate_rule("args.limit <=", &BTreeSet::new()).unwrap_err().contains("does not parse"));
        for looped in
            ["args.items.all(i, i > 0)", "args.items.map(i, i * 2).size() > 0", "args.items.filter(i, true) == []"]
        {
            assert!(validate_rule(looped, &BTreeSet::new()).unwrap_err().contains("comprehension"), "{looped}");
        }
        assert!(
            validate_rule("request.user == 'x'", &BTreeSet::new()).unwrap_err().contains("only args, caller"),
            "undeclared name"
        );
    }
}

#[cfg(test)]
mod hostile_rules {
    use super::*;
    use serde_json::json;

    #[test]
    fn nesting_and_length_are_bounded_before_the_parser_sees_a_rule() {
        // Each of these overflowed a 2 MiB stack in the parser (debug build).
        for (rule, why) in [
            (format!("{}true{}", "(".repeat(16), ")".repeat(16)), "nests brackets 16 deep"),
            (format!("{}1{}", "[".repeat(12), "]".repeat(12)), "nests brackets 12 deep"),
            (vec!["1"; 60].join(" + "), "operator characters"),
            (format!("args{}", ".a".repeat(60)), "operator characters"),
            ("x".repeat(600), "longer than 512 bytes"),
        ] {
            let refused = validate_rule(&rule, &BTreeSet::new()).unwrap_err();
            assert!(refused.contains(why), "{refused}");
        }
        // Brackets inside string literals are text; so is a word.
        assert_eq!(validate_rule("args.q == '((((((((((((((((((('", &BTreeSet::new()), Ok(()));
        assert_eq!(validate_rule("args.q == 'Comprehension'", &BTreeSet::new()), Ok(()));
        assert!(
            validate_rule("[1].exists(x, x == 1) || true", &BTreeSet::new()).unwrap_err().contains("comprehension")
        );
        assert!(
            validate_rule("{'a': [1].all(x, x > 0)}['a']", &BTreeSet::new()).unwrap_err().contains("comprehension")
        );
        for odd in ["", " ", "\u{0}", "'unterminated", "args[", "1 +", "🙂 == 🙂", "args.x ? 1 : ", "b'\\xff' == b''"]
        {
            let _ = validate_rule(odd, &BTreeSet::new());
        }
    }

    #[test]
    fn a_message_construction_is_refused_before_it_can_panic_the_interpreter() {
        // Found by the argument_rules fuzzer: cel 0.13 parses `Name{}` and
        // its interpreter panics on it ("not yet implemented: Support structs!").
        for rule in ["si{}['a'] == args.a", "Msg{f: 1}.f == 1", "[x{}] == []"] {
            let why = validate_rule(rule, &BTreeSet::new()).unwrap_err();
            assert!(why.contains("constructs a message"), "{rule}: {why}");
        }
        // A policy that skipped validation still never runs it: the call is refused.
        let refused = check(
            None,
            &[ArgumentRule { rule: "Msg{}.f == 1".into(), message: "no messages".into() }],
            &Caller::new("d", [""; 0]),
            Some(&json!({})),
        )
        .unwrap_err();
        assert!(refused.reason.starts_with("argument rule 0: invalid"), "{}", refused.reason);
    }

    #[test]
    fn a_rule_at_the_limits_parses_and_evaluates_on_an_ordinary_thread() {
        let nested = format!("{}args.n{} == 1", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        // The deepest left-leaning chain allowed: additions up to the budget.
        let chained = format!("args.n{} > 0", " + 1".repeat(MAX_OPERATORS - 2));
        let caller = super::super::Caller::new("s", [""; 0]);
        // Both at once: lists nested to the limit around the longest chain.
        let lists = MAX_NESTING - 1;
        let both =
            format!("size({}args.n{}{}) == 1", "[".repeat(lists), " + 1".repeat(MAX_OPERATORS - 3), "]".repeat(lists));
        for rule in [nested, chained, both] {
            assert_eq!(validate_rule(&rule, &BTreeSet::new()), Ok(()), "{rule}");
            let rules = [ArgumentRule { rule: rule.clone(), message: "m".into() }];
            // Test threads have 2 MiB of stack, like the runtime's workers.
            assert_eq!(check(None, &rules, &caller, Some(&json!({"n": 1}))), Ok(()), "{rule}");
        }
    }
}
