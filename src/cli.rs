//! Command-line interface: parses arguments and runs one subcommand. Each
//! subcommand lives in its own module; this file only wires them.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::check::{self, EXIT_INVALID};
use crate::render::Settings;
use crate::{api, audit, manifest, render};

/// mcp-warden: run MCP servers next to PHI and answer a HIPAA auditor.
#[derive(Debug, Parser)]
#[command(name = "mcp-warden", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (MCPServer, PHIStore) as YAML.
    Crd,
    /// Print the objects the operator would create for each MCPServer.
    Render(RenderArgs),
    /// Run the operator (in a cluster; uses the in-cluster or KUBECONFIG credentials).
    Operator(crate::operator::OperatorArgs),
    /// Run the auditing gateway in front of one MCP server.
    Sidecar(crate::sidecar::SidecarArgs),
    /// Run the credential broker: per-caller, per-tool, short-lived
    /// PostgreSQL roles.
    Broker(crate::broker::BrokerArgs),
    /// Run the audit collector: the trail outside every MCP pod.
    AuditCollector(crate::audit::collector::CollectorArgs),
    /// Audit trail tools for auditors.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Who a pseudonym is, asked of the broker: out of band, with a reason,
    /// on the record. Exit 0 with the answer; 1 when refused or not found;
    /// 2 on invalid arguments.
    Reidentify(ReidentifyArgs),
    /// Offline compliance check of manifests: a table (or JSON) of every
    /// control per MCPServer. Exit 0: no control fails; 1: a control fails
    /// (or is Unknown, with --strict); 2: invalid input.
    Check(CheckArgs),
    /// The whole data path on this machine, played as scenes: a private
    /// PostgreSQL with a synthetic clinic, an OIDC issuer, the broker, the
    /// audit collector, the sidecar and an MCP server. Exit 0: every
    /// assertion held; 1: one did not; 2: it could not start.
    #[cfg(feature = "demo")]
    Demo(crate::demo::DemoArgs),
    /// An auditor's report from the collector's storage: every control
    /// (from manifests), the trail's integrity, who reached PHI, refusals,
    /// emergency grants, and what it cannot show. One HTML file (or JSON);
    /// its SHA-256 is printed. Exit 0: written, trail verified; 1: written,
    /// trail did not verify; 2: invalid arguments.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// The collector's storage (or any directory of streams).
    storage: PathBuf,
    /// Manifest file(s) or directories holding the MCPServers, for the
    /// controls.
    #[arg(long = "manifests")]
    manifests: Vec<PathBuf>,
    /// Start of the period: RFC 3339 or a duration back from now (`30d`).
    #[arg(long)]
    since: Option<String>,
    /// End of the period (exclusive), same forms.
    #[arg(long)]
    until: Option<String>,
    /// The collector's checkpoint public key (64 hex digits, or a file
    /// holding them), as the auditor was given it: never read from the
    /// storage.
    #[arg(long)]
    checkpoint_key: Option<String>,
    /// Where to write: a file (`report.html`), or `json` for JSON on stdout.
    #[arg(long, short = 'o', default_value = "report.html")]
    output: String,
}

#[derive(Debug, Args)]
struct ReidentifyArgs {
    /// The pseudonym, e.g. pt_7f3a9c1e0b2d4f6a8c5e.
    pseudonym: String,
    /// The PHIStore, namespace/name.
    #[arg(long)]
    store: String,
    /// Why (recorded verbatim; e.g. a ticket number). Required.
    #[arg(long)]
    reason: String,
    /// The broker's base URL.
    #[arg(long, env = "MCPW_BROKER_URL")]
    broker: String,
    /// A file holding the bearer to present: the reidentifier credential
    /// (laptop), or in a cluster a Kubernetes token of yours (e.g. your
    /// OIDC id token) — the broker checks it with TokenReview and your
    /// `reidentify` permission on the PHIStore with SubjectAccessReview.
    #[arg(long)]
    credential_file: PathBuf,
    /// PEM CA bundle the broker's TLS certificate chains to.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify every hash chain in a WAL or storage directory: PASS (exit 0)
    /// or FAIL naming the stream and position of the first break (exit 1).
    Verify(VerifyArgs),
    /// Answer an auditor's questions over stored streams: by caller,
    /// server, tool, time window, decision. Reads; `verify` proves.
    /// Exit 0 with the answer; 1 when some records could not be read; 2 on
    /// invalid arguments.
    Query(QueryArgs),
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// A WAL directory, or a directory of stream directories.
    dir: PathBuf,
    /// The caller's subject (`sub`).
    #[arg(long)]
    caller: Option<String>,
    /// The MCPServer, `namespace/name`.
    #[arg(long)]
    server: Option<String>,
    /// The tool.
    #[arg(long)]
    tool: Option<String>,
    /// From this time on: RFC 3339, or back from now (`7d`, `36h`, `90m`).
    #[arg(long)]
    since: Option<String>,
    /// Before this time (same forms).
    #[arg(long)]
    until: Option<String>,
    /// Only this decision.
    #[arg(long, value_enum)]
    decision: Option<crate::audit::record::Decision>,
    /// Only calls of PHI tools.
    #[arg(long)]
    phi: bool,
    /// Only what was done under break-glass: under any grant, or under the
    /// EmergencyAccess named.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    emergency: Option<String>,
    /// Record kinds (repeatable); default: decision and lease.
    #[arg(long = "kind", value_enum)]
    kinds: Vec<crate::audit::record::Kind>,
    /// Output format: a table, or the matching records as JSON lines.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// A WAL directory, or a directory of stream directories.
    dir: PathBuf,
    /// Also fail streams that do not end with a stream-end record (their
    /// tail may have been cut).
    #[arg(long)]
    sealed: bool,
    /// The collector's checkpoint public key (64 hex digits, or a file
    /// holding them): every signed checkpoint must verify under it.
    #[arg(long)]
    checkpoint_key: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Debug, Args)]
struct SettingsArgs {
    /// Image of the mcp-warden sidecar.
    #[arg(long, env = "MCPW_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,
    /// Namespace of the warden's control plane (broker, audit collector).
    #[arg(long, env = "MCPW_WARDEN_NAMESPACE", default_value = "mcp-warden")]
    warden_namespace: String,
    /// The credential broker the sidecars use (as the operator's flag).
    #[arg(long, env = "MCPW_BROKER_URL")]
    broker_url: Option<String>,
    /// The audit collector the sidecars ship to (as the operator's flag).
    #[arg(long, env = "MCPW_COLLECTOR_URL")]
    collector_url: Option<String>,
}

impl SettingsArgs {
    fn settings(&self) -> Settings {
        let mut settings = Settings::for_namespace(&self.warden_namespace);
        if let Some(image) = &self.sidecar_image {
            settings.sidecar_image = image.clone();
        }
        settings.broker_url = self.broker_url.clone();
        settings.collector_url = self.collector_url.clone();
        settings
    }
}

#[derive(Debug, Args)]
struct RenderArgs {
    /// Manifest files or directories holding the MCPServers and their PHIStores.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// JWKS document to place in the JWKS ConfigMap (for jwksUri; the
    /// operator fetches it in a cluster).
    #[arg(long)]
    jwks_file: Option<PathBuf>,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Manifest files or directories.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Fail on Unknown verdicts too.
    #[arg(long)]
    strict: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

/// Parses the process arguments and runs the chosen subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS provider for every client (kube, reqwest, PostgreSQL): ring,
    // chosen here rather than left to whichever crate features are unified.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Crd => print_crds(),
        Command::Render(args) => render_cmd(&args),
        Command::Check(args) => check_cmd(&args),
        Command::Reidentify(args) => reidentify_cmd(&args),
        Command::Audit(AuditCommand::Verify(args)) => audit_verify_cmd(&args),
        Command::Audit(AuditCommand::Query(args)) => audit_query_cmd(&args),
        Command::Operator(args) => serve(crate::operator::run(args)),
        Command::Sidecar(args) => crate::sidecar::serve(args),
        Command::Broker(args) => serve(crate::broker::run(args)),
        Command::AuditCollector(args) => serve(crate::audit::collector::run(args)),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo_cmd(args),
        Command::Report(args) => report_cmd(&args),
    }
}

fn print_crds() -> ExitCode {
    match api::crds_yaml() {
        Ok(yaml) => emit(&yaml, ExitCode::SUCCESS),
        Err(e) => fail(&format!("cannot serialize the CRDs: {e}")),
    }
}

fn render_cmd(args: &RenderArgs) -> ExitCode {
    let settings = args.settings.settings();
    let jwks = match &args.jwks_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) => return fail(&format!("{}: cannot read: {e}", path.display())),
        },
        None => None,
    };
    let (set, errors) = manifest::load_paths(&args.files);
    if !errors.is_empty() {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return fail(&text.join("\n"));
    }
    if set.servers.is_empty() {
        return fail("no MCPServer found in the given manifests");
    }
    let mut out = String::new();
    for loaded in &set.servers {
        let server = &loaded.object;
        let namespace = crate::policy::namespace_of(server);
        let stores = set
            .stores
            .iter()
            .filter(|s| crate::policy::namespace_of(&s.object) == namespace)
            .map(|s| (kube::ResourceExt::name_any(&s.object), s.object.clone()))
            .collect();
        let objects = match render::render(server, &stores, &settings, jwks.as_deref()) {
            Ok(objects) => objects,
            Err(e) => return fail(&format!("{}: {e}", loaded.origin)),
        };
        match objects.to_yaml() {
            Ok(yaml) => out.push_str(&yaml),
            Err(e) => return fail(&format!("cannot serialize rendered objects: {e}")),
        }
    }
    emit(&out, ExitCode::SUCCESS)
}

fn check_cmd(args: &CheckArgs) -> ExitCode {
    let result = check::check_paths(&args.paths, &args.settings.settings());
    let text = match args.output {
        OutputFormat::Table => result.to_table(args.strict),
        OutputFormat::Json => format!("{:#}\n", result.to_json(args.strict)),
    };
    emit(&text, ExitCode::from(result.exit_code(args.strict)))
}

fn reidentify_cmd(args: &ReidentifyArgs) -> ExitCode {
    use crate::broker::client::{BrokerClient, ClientError};
    use crate::broker::reidentify::ReidentifyRequest;
    let http = match crate::bearer::api_client(args.ca_file.as_deref()) {
        Ok(http) => http,
        Err(e) => return fail(&e),
    };
    if let Err(e) = std::fs::metadata(&args.credential_file) {
        return fail(&format!("--credential-file {}: {e}", args.credential_file.display()));
    }
    let client = BrokerClient::from_parts(
        &args.broker,
        crate::bearer::ClientCredential::File(args.credential_file.clone()),
        http,
    );
    let request =
        ReidentifyRequest { store: args.store.clone(), pseudonym: args.pseudonym.clone(), reason: args.reason.clone() };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(client.reidentify(&request)) {
        Ok(found) => emit(
            &format!(
                "{} is {} {} (scope {}, epoch {})\n",
                args.pseudonym, found.entity, found.key, found.scope, found.epoch
            ),
            ExitCode::SUCCESS,
        ),
        Err(ClientError::Refused { status, class, message }) => {
            eprintln!("mcp-warden: the broker refused ({status} {class}): {message}");
            ExitCode::FAILURE
        }
        Err(ClientError::Transport(e)) => {
            eprintln!("mcp-warden: the broker could not be asked: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a long-lived service with logging, on a multi-threaded runtime
/// (ring as the one TLS provider, as for every subcommand).
pub fn serve(service: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    serve_on(None, service)
}

/// [`serve`] on `workers` threads (tokio's default, one per core, for None).
pub fn serve_on(workers: Option<usize>, service: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_logging();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(service) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopped");
            ExitCode::FAILURE
        }
    }
}

/// JSON logs when `MCPW_LOG_FORMAT=json`, else human-readable; level from
/// `RUST_LOG` (default info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("MCPW_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn audit_verify_cmd(args: &VerifyArgs) -> ExitCode {
    let checkpoint_key = match checkpoint_key(args.checkpoint_key.as_deref()) {
        Ok(key) => key,
        Err(e) => return fail(&e),
    };
    let options = audit::verify::VerifyOptions { require_sealed: args.sealed, checkpoint_key };
    let report = audit::verify::verify_dir(&args.dir, options);
    let text = match args.output {
        OutputFormat::Table => report.to_table(),
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&report).unwrap_or_default();
            if let Some(map) = value.as_object_mut() {
                map.insert("result".into(), if report.passed() { "PASS" } else { "FAIL" }.into());
            }
            format!("{value:#}\n")
        }
    };
    emit(&text, if report.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `--since` / `--until`: RFC 3339, or a duration back from now.
type Period = (Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>);

fn period(since: &Option<String>, until: &Option<String>) -> Result<Period, String> {
    let now = chrono::Utc::now();
    let time = |flag: &str, text: &Option<String>| {
        text.as_deref().map(|t| audit::query::parse_time(t, now).map_err(|e| format!("--{flag}: {e}"))).transpose()
    };
    Ok((time("since", since)?, time("until", until)?))
}

/// `--checkpoint-key`: the collector's Ed25519 public key (hex, or a file).
fn checkpoint_key(text: Option<&str>) -> Result<Option<[u8; 32]>, String> {
    text.map(audit::checkpoint::parse_public_key)
        .transpose()
        .map(|key| key.map(|k| k.to_bytes()))
        .map_err(|e| format!("--checkpoint-key: {e}"))
}

fn report_cmd(args: &ReportArgs) -> ExitCode {
    use sha2::Digest;
    let (since, until) = match period(&args.since, &args.until) {
        Ok(period) => period,
        Err(e) => return fail(&e),
    };
    let checkpoint_key = match checkpoint_key(args.checkpoint_key.as_deref()) {
        Ok(key) => key,
        Err(e) => return fail(&e),
    };
    if !args.storage.is_dir() {
        return fail(&format!("{}: not a directory", args.storage.display()));
    }
    let inputs = crate::report::Inputs {
        storage: args.storage.clone(),
        manifests: args.manifests.clone(),
        since,
        until,
        checkpoint_key,
    };
    let report = crate::report::build(&inputs);
    let code = if report.trail.passed { ExitCode::SUCCESS } else { ExitCode::from(1) };
    if args.output == "json" {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default() + "\n";
        eprintln!("sha256 {}", hex::encode(sha2::Sha256::digest(text.as_bytes())));
        return emit(&text, code);
    }
    let html = crate::report::html::render(&report);
    if let Err(e) = std::fs::write(&args.output, &html) {
        return fail(&format!("cannot write {}: {e}", args.output));
    }
    let digest = hex::encode(sha2::Sha256::digest(html.as_bytes()));
    emit(&format!("wrote {} ({} bytes), sha256 {digest}\n", args.output, html.len()), code)
}

fn audit_query_cmd(args: &QueryArgs) -> ExitCode {
    let (since, until) = match period(&args.since, &args.until) {
        Ok(period) => period,
        Err(e) => return fail(&e),
    };
    let query = audit::query::Query {
        caller: args.caller.clone(),
        server: args.server.clone(),
        tool: args.tool.clone(),
        since,
        until,
        decision: args.decision,
        phi_only: args.phi,
        emergency: args.emergency.clone().map(|name| Some(name).filter(|n| !n.is_empty())),
        kinds: args.kinds.clone(),
    };
    let loaded = audit::query::read_records(&args.dir);
    for problem in &loaded.problems {
        eprintln!("mcp-warden: {problem}");
    }
    if !loaded.problems.is_empty() {
        eprintln!("mcp-warden: the answer leaves out what could not be read; run `mcp-warden audit verify`");
    }
    let rows = query.select(&loaded.records);
    let text = match args.output {
        OutputFormat::Table => audit::query::to_table(&rows),
        OutputFormat::Json => audit::query::to_json_lines(&rows),
    };
    emit(&text, if loaded.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Writes to stdout; a closed pipe is not an error worth a panic.
fn emit(text: &str, code: ExitCode) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()) {
        Ok(()) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => code,
        Err(e) => fail(&format!("cannot write output: {e}")),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("mcp-warden: {message}");
    ExitCode::from(EXIT_INVALID)
}

/// `demo`: quiet logs (warnings only, unless RUST_LOG says otherwise) so
/// the scenes read as a transcript.
#[cfg(feature = "demo")]
fn demo_cmd(args: crate::demo::DemoArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    // The MCP client's HTTP stack asks for the process-wide TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(crate::demo::run(args)),
        Err(e) => fail(&format!("cannot start the async runtime: {e}")),
    }
}
