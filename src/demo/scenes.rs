//! The scenes: what the product does, shown on the running stack, each
//! with the evidence it produced and the assertions that must hold.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

use super::clinic;
use super::server::ATTACKS;
use super::show::Show;
use super::stack::Stack;
use crate::audit::record::{Decision, Kind, OutcomeStatus, Record};

/// The demo's callers: subject and groups.
pub const CALLERS: [(&str, &[&str]); 2] = [("dana", &["front-desk"]), ("bob", &["billing"])];
/// How long evidence may take to reach the collector.
const SHIPPING_TIMEOUT: Duration = Duration::from_secs(30);

type Client = RunningService<RoleClient, ()>;

/// The state the scenes share.
pub struct Demo<'a> {
    stack: &'a mut Stack,
    show: Show,
    /// A pseudonym dana was given (scene 2), for the next scenes.
    pseudonym: Option<String>,
}

fn text_of(result: &CallToolResult) -> String {
    result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n")
}

fn args(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

impl<'a> Demo<'a> {
    /// The demo over a started stack.
    pub fn new(stack: &'a mut Stack, show: Show) -> Demo<'a> {
        Demo { stack, show, pseudonym: None }
    }

    /// The printer, with its tally.
    pub fn into_show(self) -> Show {
        self.show
    }

    /// Plays every scene; with `finish`, ends the shift (stops the sidecar
    /// and the broker) and checks the sealed trail.
    pub async fn play(&mut self, finish: bool) {
        macro_rules! scene {
            ($title:expr, $body:expr) => {{
                self.show.scene($title);
                if let Err(e) = $body.await {
                    self.show.broken(&e);
                }
            }};
        }
        scene!("The front desk sees exactly its tools", self.front_desk_list());
        scene!("A PHI call is answered, with pseudonyms", self.phi_call());
        scene!("Another caller is refused, and the tool is absent from their list", self.other_caller());
        scene!("During a call, the database sees a role issued for that caller and tool", self.role_in_database());
        scene!("A compromised server's escapes are refused by the database and on the record", self.escapes());
        scene!("The trail outside the pod verifies under the collector's checkpoint key", self.verify());
        scene!("The auditor's four questions, answered from the collector's storage", self.questions());
        self.show.not_yet(
            "Break-glass: an approved emergency grant opens a tool for one caller, for a bounded time",
            "A grant is honoured only while the chart's admission policy is in force on an API server \
             (docs/breakglass.md); this demo has none, so it shows no grant rather than a fake one. \
             The e2e suite plays it on a cluster.",
        );
        if finish {
            scene!("The shift ends: the sidecar and the broker seal their streams at the collector", self.seal());
        }
        scene!("The auditor's report: one page from the collector's storage", self.report());
    }

    async fn report(&mut self) -> anyhow::Result<()> {
        let store = self.stack.storage().display().to_string();
        let manifest = self.stack.server_manifest().display().to_string();
        let file = self.stack.report_file().display().to_string();
        let key = self.stack.checkpoint_key.clone();
        self.show
            .command(&format!("mcp-warden report {store} --manifests {manifest} --checkpoint-key {key} -o {file}"));
        let (code, said) =
            self.stack.run_cli(&["report", &store, "--manifests", &manifest, "--checkpoint-key", &key, "-o", &file])?;
        self.show.evidence(&said);
        self.show.check(code == 0, "written, and the trail it reports on verified");
        let (_, json) = self.stack.run_cli(&[
            "report",
            &store,
            "--manifests",
            &manifest,
            "--checkpoint-key",
            &key,
            "-o",
            "json",
        ])?;
        let report: Value = serde_json::from_str(&json).context("report -o json")?;
        let allowed_for = |sub: &str| -> u64 {
            report["phi_access"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["caller"] == sub)
                .map(|a| a["allowed"].as_u64().unwrap_or(0))
                .sum()
        };
        self.show.evidence(&format!(
            "PHI calls allowed: dana {}, bob {}; refusals by class: {}",
            allowed_for("dana"),
            allowed_for("bob"),
            report["refusals"].as_array().map(|r| r.len()).unwrap_or(0)
        ));
        let (_, lines) = self.stack.run_cli(&[
            "audit",
            "query",
            &store,
            "--caller",
            "dana",
            "--phi",
            "--decision",
            "allow",
            "-o",
            "json",
        ])?;
        let queried = lines
            .lines()
            .filter_map(|l| serde_json::from_str::<Record>(l).ok())
            .filter(|r| r.event.kind == Kind::Decision)
            .count() as u64;
        self.show.check(
            allowed_for("dana") == queried && queried > 0 && allowed_for("bob") == 0,
            "it counts what `audit query` answers: dana's PHI calls, none of bob's",
        );
        Ok(())
    }

    async fn connect(&self, sub: &str) -> anyhow::Result<Client> {
        let groups = CALLERS.iter().find(|(s, _)| *s == sub).map(|(_, g)| *g).unwrap_or(&[]);
        let token = self.stack.issuer.token(sub, groups)?;
        let config = StreamableHttpClientTransportConfig::with_uri(self.stack.at.mcp.clone()).auth_header(token);
        ().serve(StreamableHttpClientTransport::from_config(config))
            .await
            .with_context(|| format!("{sub} cannot initialize through the sidecar"))
    }

    async fn tool_names(client: &Client) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> =
            client.list_all_tools().await.context("tools/list")?.into_iter().map(|t| t.name.to_string()).collect();
        names.sort();
        Ok(names)
    }

    async fn call(client: &Client, tool: &str, arguments: Value) -> anyhow::Result<String> {
        let request = CallToolRequestParams::new(tool.to_string()).with_arguments(args(arguments));
        let result = client.call_tool(request).await.with_context(|| format!("tools/call {tool}"))?;
        if result.is_error == Some(true) {
            bail!("{tool} answered an error: {}", text_of(&result));
        }
        Ok(text_of(&result))
    }

    async fn front_desk_list(&mut self) -> anyhow::Result<()> {
        let dana = self.connect("dana").await?;
        self.show.say("dana (group front-desk) connects with her OIDC token and lists the tools:");
        let names = Self::tool_names(&dana).await?;
        self.show.evidence(&names.join(", "));
        self.show.check(
            names == ["clinic_hours", "clinician_patients", "lookup_patient"],
            "her list is exactly the tools her group may call",
        );
        dana.cancel().await.ok();
        Ok(())
    }

    async fn phi_call(&mut self) -> anyhow::Result<()> {
        let dana = self.connect("dana").await?;
        self.show.say("dana asks for dr-okafor's patients (a de-identified PHI tool):");
        let text = Self::call(&dana, "clinician_patients", json!({"clinician": "dr-okafor"})).await?;
        self.show.evidence(&text);
        let rows: Vec<Value> = serde_json::from_str(&text).context("the answer is not a JSON list")?;
        let patients: Vec<&str> = rows.iter().filter_map(|r| r["patient"].as_str()).collect();
        self.show.check(
            !patients.is_empty() && patients.len() == rows.len() && patients.iter().all(|p| p.starts_with("pt_")),
            "every patient in the answer is a pseudonym (pt_…), from the database's de-identified views",
        );
        let leaked: Vec<&str> = clinic::identifiers().into_iter().filter(|v| text.contains(v)).collect();
        self.show.check(leaked.is_empty(), "no name, MRN, SSN or birth date of the clinic is in the answer");
        self.pseudonym = patients.first().map(|p| p.to_string());
        dana.cancel().await.ok();
        Ok(())
    }

    async fn other_caller(&mut self) -> anyhow::Result<()> {
        let bob = self.connect("bob").await?;
        self.show.say("bob (group billing) lists the tools and tries lookup_patient:");
        let names = Self::tool_names(&bob).await?;
        self.show.evidence(&format!("tools/list: {}", names.join(", ")));
        self.show.check(names == ["clinic_hours"], "lookup_patient is absent from his list");
        let request = CallToolRequestParams::new("lookup_patient")
            .with_arguments(args(json!({"patient": self.pseudonym.clone().unwrap_or_default()})));
        let refused = bob.call_tool(request).await;
        let message = match &refused {
            Ok(result) => format!("answered: {}", text_of(result)),
            Err(e) => format!("{e}"),
        };
        self.show.evidence(&format!("tools/call lookup_patient: {message}"));
        self.show.check(
            refused.is_err() && message.contains("Unknown tool"),
            "his call is refused exactly as a tool that does not exist (nothing to discover)",
        );
        let hours = Self::call(&bob, "clinic_hours", json!({})).await?;
        self.show.check(hours.contains("08:00"), "the tool his group may use still works");
        bob.cancel().await.ok();
        let decision = self
            .record("bob's decision record", |r| {
                r.event.kind == Kind::Decision
                    && r.event.caller.as_ref().is_some_and(|c| c.sub == "bob")
                    && r.event.tool.as_deref() == Some("lookup_patient")
            })
            .await?;
        self.show.evidence(&format!("record: {}", one_line(&decision)));
        self.show.check(
            decision.event.decision == Some(Decision::Deny) && decision.event.reason.is_some(),
            "the refusal is recorded, with who, which tool and why",
        );
        Ok(())
    }

    async fn role_in_database(&mut self) -> anyhow::Result<()> {
        let patient = self.pseudonym.clone().ok_or_else(|| anyhow!("no pseudonym from scene 2"))?;
        let dana = self.connect("dana").await?;
        let held = self.stack.controls.hold_next_call();
        let peer = dana.peer().clone();
        let request =
            CallToolRequestParams::new("lookup_patient").with_arguments(args(json!({"patient": patient.clone()})));
        self.show.say(&format!("dana looks up {patient}; while the call holds its connection, the DBA looks:"));
        let call = tokio::spawn(async move { peer.call_tool(request).await });
        let connected = tokio::time::timeout(Duration::from_secs(20), held.connected);
        self.show.waiting("the call to reach the database", connected).await.context("the call never connected")??;
        let root = self.stack.pg.superuser(clinic::DATABASE).await?;
        let sql = "SELECT a.usename::text, r.rolvaliduntil::text, s.ssl FROM pg_stat_activity a \
                   JOIN pg_roles r ON r.rolname = a.usename JOIN pg_stat_ssl s ON s.pid = a.pid \
                   WHERE a.datname = 'ehr' AND a.usename LIKE 'mcpw\\_u\\_%'";
        self.show.command(
            "psql ehr -c \"SELECT usename, rolvaliduntil, ssl FROM pg_stat_activity JOIN pg_roles … JOIN pg_stat_ssl … LIKE 'mcpw_u_%'\"",
        );
        let rows = root.query(sql, &[]).await?;
        let sessions: Vec<(String, String, bool)> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1).unwrap_or_default(), r.get::<_, bool>(2)))
            .collect();
        for (role, until, ssl) in &sessions {
            self.show.evidence(&format!("{role}  valid until {until}  ssl={ssl}"));
        }
        let _ = held.release.send(());
        let answer = call.await.map_err(|e| anyhow!("the call's task: {e}"))?.context("lookup_patient")?;
        self.show.evidence(&format!("answer: {}", text_of(&answer)));
        self.show.check(sessions.len() == 1, "exactly one session of an issued login role is open: the call's");
        self.show.check(sessions.iter().all(|s| s.2), "it reached the database over TLS (the proxy verified it)");
        let Some((role, ..)) = sessions.first() else { return Ok(()) };
        let lease = self
            .record("the broker's lease record", |r| {
                r.event.kind == Kind::Lease
                    && r.event.lease.as_ref().and_then(|l| l.role.as_deref()) == Some(role.as_str())
            })
            .await?;
        self.show.evidence(&format!("record: {}", one_line(&lease)));
        self.show.check(
            lease.event.caller.as_ref().is_some_and(|c| c.sub == "dana")
                && lease.event.tool.as_deref() == Some("lookup_patient"),
            "the broker issued that role to dana for lookup_patient only, expiring (VALID UNTIL)",
        );
        dana.cancel().await.ok();
        Ok(())
    }

    async fn escapes(&mut self) -> anyhow::Result<()> {
        let dana = self.connect("dana").await?;
        self.stack.controls.compromise(true);
        self.show.say("The MCP server is compromised: on dana's next call it sends SQL of its own choosing:");
        let answer = Self::call(&dana, "clinician_patients", json!({"clinician": "dr-okafor"})).await;
        self.stack.controls.compromise(false);
        let answer = answer?;
        let tried: Vec<Value> = serde_json::from_str(&answer).context("the server's report")?;
        for attempt in &tried {
            self.show.evidence(&format!("{}  →  {}", attempt["sql"].as_str().unwrap_or(""), attempt["result"]));
        }
        self.show.check(
            tried.len() == ATTACKS.len() && tried.iter().all(|t| t["result"] == "SQLSTATE 42501"),
            "the database refuses every one (42501: the call's role holds only its tool's grants)",
        );
        let mut refused = Vec::new();
        for attack in ATTACKS {
            let head: String = attack.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
            let record = self
                .record("the statement records", |r| {
                    r.event.kind == Kind::Statement
                        && r.event.statement.as_deref().is_some_and(|s| s.contains(head.as_str()))
                        && r.event.outcome.as_ref().is_some_and(|o| o.status == OutcomeStatus::Refused)
                })
                .await?;
            self.show.evidence(&format!("record: {}", one_line(&record)));
            refused.push(record);
        }
        self.show.check(
            refused.iter().all(|r| r.event.caller.as_ref().is_some_and(|c| c.sub == "dana")),
            "each attempt is on the record at the proxy: the caller, the statement without its values, refused",
        );
        let trail = all_text(&self.stack.storage());
        self.show.check(!trail.contains("exfiltrated"), "the values the server sent are not in the trail");
        dana.cancel().await.ok();
        Ok(())
    }

    async fn verify(&mut self) -> anyhow::Result<()> {
        let storage = self.stack.storage();
        let key = self.stack.checkpoint_key.clone();
        let checkpointed = async || {
            let deadline = Instant::now() + SHIPPING_TIMEOUT;
            while Instant::now() < deadline {
                if checkpoints_cover_heads(&storage) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        };
        let covered = self.show.waiting("the collector's next signed checkpoint", checkpointed()).await;
        let store = storage.display().to_string();
        self.show.command(&format!("mcp-warden audit verify {store} --checkpoint-key {key}"));
        let (code, out) = self.stack.run_cli(&["audit", "verify", &store, "--checkpoint-key", &key])?;
        self.show.evidence(&out);
        self.show.check(code == 0, "PASS: every stream's hash chain is whole");
        self.show.check(covered, "every stream's last record is under a checkpoint signed by the collector's key");
        let streams_dir = shipped(&storage).display().to_string();
        let (_, json) =
            self.stack.run_cli(&["audit", "verify", &streams_dir, "--checkpoint-key", &key, "-o", "json"])?;
        let report: Value = serde_json::from_str(&json).context("audit verify -o json")?;
        let streams = report["streams"].as_array().cloned().unwrap_or_default();
        self.show.check(
            streams.len() >= 2 && streams.iter().all(|s| s["checkpoints"].as_u64().unwrap_or(0) > 0),
            "the sidecar's and the broker's shipped streams are there, each with verified checkpoints",
        );
        Ok(())
    }

    async fn questions(&mut self) -> anyhow::Result<()> {
        let store = self.stack.storage().display().to_string();
        let query = |extra: &[&str]| -> anyhow::Result<(i32, String)> {
            let mut argv = vec!["audit", "query", store.as_str()];
            argv.extend_from_slice(extra);
            self.stack.run_cli(&argv)
        };
        self.show.say("Who reached PHI, through which tool, and was it allowed?");
        self.show.command(&format!("mcp-warden audit query {store} --phi"));
        let (code, table) = query(&["--phi"])?;
        self.show.evidence(&table);
        let (_, lines) = query(&["--phi", "-o", "json"])?;
        let records: Vec<Record> = lines.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let allowed = |sub: &str| {
            records.iter().any(|r| {
                r.event.decision == Some(Decision::Allow) && r.event.caller.as_ref().is_some_and(|c| c.sub == sub)
            })
        };
        self.show.check(
            code == 0 && allowed("dana") && !allowed("bob"),
            "dana reached PHI (each call with its lease); bob never did",
        );

        self.show.say("What could each caller reach? The declared minimum, checked offline:");
        let manifest = self.stack.server_manifest().display().to_string();
        self.show.command(&format!("mcp-warden check {manifest}"));
        let (code, check) = self.stack.run_cli(&["check", &manifest])?;
        let shown = ["CONTROL", "minimum-necessary", "de-identification", "transmission-security"];
        let rows: String = check.lines().filter(|l| shown.iter().any(|c| l.contains(c))).collect::<Vec<_>>().join("\n");
        self.show.evidence(&rows);
        let passes = |control: &str| check.lines().any(|l| l.contains(control) && l.contains("Pass"));
        self.show.check(
            passes("minimum-necessary") && passes("de-identification") && passes("transmission-security"),
            "minimum-necessary, de-identification and transmission security (verify-full TLS to the store) pass",
        );
        self.show.check(code == 0, "no control fails offline (those only a cluster can show are Unknown)");

        self.show.say("Where is the trail, and could the audited pod distort it?");
        let streams: Vec<String> = std::fs::read_dir(self.stack.storage())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        self.show.evidence(&format!("{store}: {}", streams.join(", ")));
        self.show.check(
            streams.iter().any(|s| s != "incidents"),
            "outside the pod, in the collector's storage, chained and signed (scene 6)",
        );

        self.show.say("Was emergency access used?");
        self.show.command(&format!("mcp-warden audit query {store} --emergency"));
        let (code, emergency) = query(&["--emergency", "-o", "json"])?;
        let uses = emergency.lines().filter(|l| !l.trim().is_empty()).count();
        self.show.evidence(&format!("{uses} records made under an emergency grant"));
        self.show.check(code == 0 && uses == 0, "no access under a grant in this period (none was approved)");
        Ok(())
    }

    async fn seal(&mut self) -> anyhow::Result<()> {
        // Stopped here, in order; dropping the stack later finds them stopped.
        self.show.command("kill -TERM <sidecar> <broker>");
        let sidecar = self.stack.sidecar.stop();
        let broker = self.stack.broker.stop();
        let stack: &Stack = self.stack;
        self.show.check(
            sidecar.is_some_and(|s| s.success()) && broker.is_some_and(|s| s.success()),
            "both drained, sealed their streams and shipped them",
        );
        let store = shipped(&stack.storage()).display().to_string();
        let key = stack.checkpoint_key.clone();
        // Shipping and the next checkpoint take a moment: the last answer
        // before the deadline is the one judged.
        let sealed = async || {
            let deadline = Instant::now() + SHIPPING_TIMEOUT;
            loop {
                let (code, text) = stack.run_cli(&["audit", "verify", &store, "--sealed", "--checkpoint-key", &key])?;
                let covered = checkpoints_cover_heads(&stack.storage());
                if (code == 0 && covered) || Instant::now() > deadline {
                    return anyhow::Ok((code, text, covered));
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        };
        let (code, text, covered) = self.show.waiting("the sealed streams at the collector", sealed()).await?;
        self.show.command(&format!("mcp-warden audit verify {store} --sealed --checkpoint-key {key}"));
        self.show.evidence(&text);
        self.show.check(
            code == 0 && covered,
            "every shipped stream ends with its stream-end record, under a signed checkpoint",
        );
        Ok(())
    }

    /// Waits until a record matching `matches` is in the collector's
    /// storage (shipped from the sidecar or the broker).
    async fn record(&self, what: &str, matches: impl Fn(&Record) -> bool) -> anyhow::Result<Record> {
        let storage = self.stack.storage();
        let find = async || {
            let deadline = Instant::now() + SHIPPING_TIMEOUT;
            loop {
                let loaded = crate::audit::query::read_records(&storage);
                if let Some(found) = loaded.records.into_iter().find(|r| matches(r)) {
                    return Some(found);
                }
                if Instant::now() > deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        self.show
            .waiting(&format!("{what} at the collector"), find())
            .await
            .ok_or_else(|| anyhow!("{what} did not reach the collector in {SHIPPING_TIMEOUT:?}"))
    }
}

/// A record in one line, as an auditor would read it.
fn one_line(record: &Record) -> String {
    let e = &record.event;
    let mut parts = vec![e.kind.as_str().to_string()];
    if let Some(c) = &e.caller {
        parts.push(format!("caller={}", c.sub));
    }
    if let Some(tool) = &e.tool {
        parts.push(format!("tool={tool}"));
    }
    if let Some(d) = e.decision {
        parts.push(format!(
            "decision={}",
            serde_json::to_value(d).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        ));
    }
    if let Some(lease) = &e.lease {
        parts.push(format!("role={}", lease.role.as_deref().unwrap_or("")));
        if let Some(until) = &lease.valid_until {
            parts.push(format!("valid_until={until}"));
        }
    }
    if let Some(s) = &e.statement {
        parts.push(format!("statement={s:?}"));
    }
    if let Some(o) = &e.outcome {
        parts.push(format!(
            "outcome={}",
            serde_json::to_value(o.status).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        ));
    }
    if let Some(r) = &e.reason {
        parts.push(format!("reason={r:?}"));
    }
    parts.join(" ")
}

/// Every byte of every file under `dir`, as text.
fn all_text(dir: &Path) -> String {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

/// The shipped streams in the collector's storage (its own incident stream
/// stays open while it runs, and is not checkpointed).
fn shipped(storage: &Path) -> std::path::PathBuf {
    storage.join("streams")
}

/// Whether every shipped stream has a signed checkpoint at its last record.
fn checkpoints_cover_heads(storage: &Path) -> bool {
    let report = crate::audit::verify::verify_dir(&shipped(storage), Default::default());
    let streams: Vec<_> = report.streams.iter().filter(|s| s.records > 0).collect();
    !streams.is_empty()
        && streams.iter().all(|s| {
            crate::audit::checkpoint::read(&s.dir)
                .ok()
                .and_then(|cps| cps.iter().map(|c| c.seq).max())
                .is_some_and(|seq| Some(seq) >= s.last_seq)
        })
}
