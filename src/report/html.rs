//! The report as one self-contained, printable HTML file: inline CSS and
//! SVG, no script, no external asset. Every text that came from evidence is
//! escaped.

use super::{AuditReport, callers_with_access, chart};
use crate::api::Verdict;

/// HTML-escapes text (element content and quoted attribute values).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#111;padding:0 1em}\
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #222;padding-bottom:.2em;margin-top:2em}\
table{border-collapse:collapse;width:100%;margin:.6em 0}th,td{border:1px solid #bbb;padding:.3em .5em;text-align:left;vertical-align:top}td.id{overflow-wrap:anywhere}td.nw{white-space:nowrap}\
th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.Pass{color:#276749;font-weight:bold}.Fail{color:#c53030;font-weight:bold}.Unknown{color:#975a16;font-weight:bold}\
.summary{font-size:1.1em;background:#f4f4f4;padding:.6em 1em;border-left:4px solid #222}\
code{font-size:.95em}@media print{body{margin:0;max-width:none}h2{break-after:avoid}table{break-inside:auto}tr{break-inside:avoid}}";

fn cell(text: &str) -> String {
    format!("<td>{}</td>", escape(text))
}

/// A cell that may break anywhere (long identifiers).
fn id_cell(text: &str) -> String {
    format!(r#"<td class="id">{}</td>"#, escape(text))
}

/// A cell that does not wrap (names, citations).
fn nowrap(text: &str) -> String {
    format!(r#"<td class="nw">{}</td>"#, escape(text))
}

fn num(n: impl std::fmt::Display) -> String {
    format!(r#"<td class="n">{n}</td>"#)
}

fn table(head: &[&str], rows: &[String]) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in head {
        out.push_str(&format!("<th>{}</th>", escape(h)));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str(&format!("<tr>{row}</tr>"));
    }
    out.push_str("</tbody></table>");
    out
}

fn verdict(v: Verdict) -> String {
    format!(r#"<td class="{v} nw">{v}</td>"#)
}

/// A control's history as one line: "Fail before; Pass from 2026-11-20T10:00:00Z".
fn history_text(history: &super::ControlHistory) -> String {
    let mut parts = Vec::new();
    if let Some(start) = &history.at_start {
        parts.push(format!("{start} at the start"));
    }
    for (time, verdict) in &history.changes {
        parts.push(format!("{verdict} from {time}"));
    }
    if parts.is_empty() { "no change recorded".into() } else { parts.join("; ") }
}

/// The whole document.
pub fn render(report: &AuditReport) -> String {
    let mut body = String::new();
    let period = match (&report.period.since, &report.period.until) {
        (None, None) => "the whole trail".to_string(),
        (since, until) => format!(
            "from {} until {}",
            since.as_deref().unwrap_or("the first record"),
            until.as_deref().unwrap_or("the last record")
        ),
    };
    body.push_str("<h1>MCP access to PHI: audit report</h1>");
    body.push_str(&format!(
        "<p>Evidence: the audit collector's storage <code>{}</code>; period: {}; last record in it: {}.</p>",
        escape(&report.storage),
        escape(&period),
        escape(report.period.last_record.as_deref().unwrap_or("none"))
    ));
    let failing: usize =
        report.servers.iter().map(|s| s.controls.iter().filter(|c| c.verdict == Verdict::Fail).count()).sum();
    body.push_str(&format!(
        r#"<p class="summary">Trail integrity: <b>{}</b>{}. {} caller(s) reached PHI; {} refusal(s); {} emergency grant(s) used. {} control(s) failing across {} MCP server(s).</p>"#,
        if report.trail.passed { "PASS" } else { "FAIL" },
        if report.trail.key_supplied { ", checkpoint signatures checked against the key supplied" } else { ", checkpoint signatures NOT checked (no key supplied)" },
        callers_with_access(report).len(),
        report.refusals.iter().map(|r| r.count).sum::<usize>(),
        report.emergency.len(),
        failing,
        report.servers.len()
    ));

    body.push_str("<h2>1. Controls</h2>");
    if report.servers.is_empty() {
        body.push_str("<p>No manifests were given: no control is assessed in this report.</p>");
    }
    for server in &report.servers {
        body.push_str(&format!("<h3>{}</h3><p>Assessed: {}.</p>", escape(&server.server), escape(&server.assessed)));
        let rows: Vec<String> = server
            .controls
            .iter()
            .map(|c| {
                let history = server.history.iter().find(|h| h.id == c.id).map(history_text);
                format!(
                    "{}{}{}{}{}",
                    nowrap(&c.id),
                    cell(&c.citation),
                    verdict(c.verdict),
                    cell(&c.message),
                    cell(history.as_deref().unwrap_or("no verdict record"))
                )
            })
            .collect();
        body.push_str(&table(
            &["control", "citation", "verdict", "evidence", "in the period (operator's records)"],
            &rows,
        ));
    }

    body.push_str("<h2>2. The trail</h2>");
    body.push_str(&format!(
        "<p>{} stream(s), {} record(s). Checkpoint signatures {}.</p>",
        report.trail.streams.len(),
        report.trail.streams.iter().map(|s| s.records).sum::<u64>(),
        if report.trail.key_supplied {
            "were checked against the key the auditor supplied (never one read from the storage)"
        } else {
            "were not checked: no key was supplied"
        }
    ));
    let rows: Vec<String> = report
        .trail
        .streams
        .iter()
        .map(|s| {
            format!(
                "{}{}{}{}{}{}{}",
                id_cell(&s.stream.clone().unwrap_or_else(|| s.dir.display().to_string())),
                num(s.records),
                cell(s.first_time.as_deref().unwrap_or("-")),
                cell(s.last_time.as_deref().unwrap_or("-")),
                cell(if s.sealed { "sealed" } else { "open" }),
                num(s.checkpoints),
                cell(&s.broken.as_ref().map_or_else(|| "PASS".to_string(), |b| format!("FAIL: {}", b.reason)))
            )
        })
        .collect();
    body.push_str(&table(&["stream", "records", "first", "last", "state", "signed checkpoints", "result"], &rows));
    for problem in &report.trail.problems {
        body.push_str(&format!(r#"<p class="Fail">{}</p>"#, escape(problem)));
    }
    body.push_str("<h3>Incidents</h3>");
    if report.trail.incidents.is_empty() {
        body.push_str("<p>None on record.</p>");
    } else {
        let rows: Vec<String> = report.trail.incidents.iter().map(|i| cell(i)).collect();
        body.push_str(&table(&["incident"], &rows));
    }

    body.push_str("<h2>3. Who reached PHI</h2>");
    body.push_str(&chart::per_day(&report.days));
    let rows: Vec<String> =
        report.days.iter().map(|d| format!("{}{}{}", cell(&d.day), num(d.allowed), num(d.refused))).collect();
    body.push_str(&table(&["day (UTC)", "PHI calls allowed", "refused"], &rows));
    let rows: Vec<String> = report
        .phi_access
        .iter()
        .map(|a| format!("{}{}{}{}{}", cell(&a.caller), cell(&a.server), cell(&a.tool), num(a.allowed), num(a.refused)))
        .collect();
    body.push_str(&table(&["caller", "MCP server", "tool", "allowed", "refused"], &rows));
    body.push_str("<h3>Refusals by class</h3>");
    let rows: Vec<String> =
        report.refusals.iter().map(|r| format!("{}{}{}", cell(&r.decision), cell(&r.reason), num(r.count))).collect();
    body.push_str(&table(&["decision", "reason", "count"], &rows));

    body.push_str("<h2>4. Emergency access</h2>");
    if report.emergency.is_empty() {
        body.push_str("<p>No record in the period was made under an emergency grant.</p>");
    } else {
        let rows: Vec<String> = report
            .emergency
            .iter()
            .map(|g| {
                format!(
                    "{}{}{}{}{}{}",
                    cell(&g.grant),
                    cell(&g.callers.join(", ")),
                    cell(&g.tools.join(", ")),
                    num(g.records),
                    cell(g.first.as_deref().unwrap_or("-")),
                    cell(g.last.as_deref().unwrap_or("-"))
                )
            })
            .collect();
        body.push_str(&table(&["grant", "callers", "tools", "records", "first", "last"], &rows));
    }

    body.push_str("<h2>5. What this report cannot show</h2><ul>");
    for limit in &report.limits {
        body.push_str(&format!("<li>{}</li>", escape(limit)));
    }
    body.push_str("</ul>");
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>mcp-warden audit report</title><style>{STYLE}</style></head><body>{body}</body></html>\n"
    )
}
