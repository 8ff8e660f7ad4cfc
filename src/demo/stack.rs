//! The demo's running parts, on loopback with free ports: a private
//! PostgreSQL with the clinic, the OIDC issuer and the MCP server in this
//! process, and the broker, the audit collector and the sidecar as this
//! binary's own subcommands (the code users run, with the flags they pass).
//! Everything stops, and the temp dir goes, when the [`Stack`] is dropped —
//! on success, failure, Ctrl-C, SIGTERM or a panic; children also get
//! SIGTERM from the kernel if this process dies without dropping it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::clinic;
use super::issuer::Issuer;
use super::server::Controls;
use crate::local_postgres::{LocalPostgres, die_with_parent, free_port};

/// How long a part may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a part gets to stop after SIGTERM (the sidecar drains, seals
/// and ships its stream).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process of the demo: the mcp-warden binary running one
/// subcommand.
pub struct Part {
    /// Its name in messages.
    pub name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    exe: PathBuf,
    args: Vec<String>,
}

impl Part {
    fn spawn(name: &'static str, exe: &Path, dir: &Path, args: &[String]) -> anyhow::Result<Part> {
        let log = dir.join(format!("{name}.log"));
        let mut part = Part { name, child: None, log, exe: exe.to_path_buf(), args: args.to_vec() };
        part.launch()?;
        Ok(part)
    }

    /// Starts the process, its output appended to its log.
    fn launch(&mut self) -> anyhow::Result<()> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = Command::new(&self.exe);
        die_with_parent(&mut command, libc::SIGTERM);
        let child = command
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start the {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the process (SIGTERM, as a rollout would) and starts it again
    /// with the same arguments; ready once `ready` holds.
    pub async fn restart(&mut self, ready: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
        self.stop();
        self.launch()?;
        self.wait_ready(ready).await
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of its log (what to show when it failed).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Where its log is.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then waits (killing it after [`STOP_TIMEOUT`]); its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Polls `ready` until it holds, failing with the part's log when it
    /// exits or does not come up in time.
    async fn wait_ready(&mut self, mut ready: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                bail!("the {} exited ({status}) while starting:\n{}", self.name, self.log_tail());
            }
            if ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the {} did not become ready in {:?}:\n{}", self.name, START_TIMEOUT, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Random hex of `bytes` bytes.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(buf))
}

/// Writes a secret file readable by this user only.
fn secret_file(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(content.as_bytes())?;
    Ok(())
}

/// Where things are, for the scenes and for `--keep`.
pub struct Addresses {
    /// The sidecar's MCP endpoint.
    pub mcp: String,
    /// The sidecar's /metrics, /readyz.
    pub sidecar_metrics: String,
    /// The broker's API.
    pub broker: String,
    /// The collector's API.
    pub collector: String,
    /// The issuer's JWKS.
    pub jwks: String,
    /// The database's port.
    pub pg_port: u16,
}

/// The running demo. Field order is drop order: the sidecar stops (and
/// ships its sealed stream) before the broker, the collector and the
/// database.
pub struct Stack {
    /// The sidecar.
    pub sidecar: Part,
    /// The broker.
    pub broker: Part,
    /// The audit collector.
    pub collector: Part,
    server: tokio::task::JoinHandle<()>,
    issuer_task: tokio::task::JoinHandle<()>,
    /// The issuer (tokens for the demo's callers).
    pub issuer: Arc<Issuer>,
    /// The MCP server's switches.
    pub controls: Arc<Controls>,
    /// The database.
    pub pg: LocalPostgres,
    /// Where things listen.
    pub at: Addresses,
    /// The collector's checkpoint public key (hex): what an auditor is given.
    pub checkpoint_key: String,
    /// The temp dir holding manifests, trails, credentials and logs.
    pub dir: tempfile::TempDir,
    /// What the broker's manifests are written from again when the
    /// issuer's keys change.
    admin_password: String,
    ca_pem: String,
    /// The broker's and the collector's readiness URLs.
    pub broker_ready: String,
    /// The collector's port.
    pub collector_port: u16,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.server.abort();
        self.issuer_task.abort();
    }
}

impl Stack {
    /// The manifests directory (the broker's `--manifests`).
    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// The file holding the PHIStore and MCPServer only.
    pub fn server_manifest(&self) -> PathBuf {
        self.dir.path().join("server.yaml")
    }

    /// The collector's storage: the trail outside the pod.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("collector")
    }

    /// Where the demo writes the auditor's report.
    pub fn report_file(&self) -> PathBuf {
        self.dir.path().join("report.html")
    }

    /// The broker's own trail (before shipping).
    pub fn broker_audit(&self) -> PathBuf {
        self.dir.path().join("broker-audit")
    }

    /// Starts every part from this binary; `progress` is told what is
    /// being waited for.
    pub async fn start(progress: impl FnMut(&str)) -> anyhow::Result<Stack> {
        let exe = std::env::current_exe().context("cannot find this binary to run the demo's parts")?;
        Stack::start_with(&exe, progress).await
    }

    /// Starts every part, running `exe` (the mcp-warden binary) for the
    /// broker, the collector and the sidecar.
    pub async fn start_with(exe: &Path, mut progress: impl FnMut(&str)) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new().prefix("mcpw-demo-").tempdir().context("a temp dir for the demo")?;
        let path = dir.path().to_path_buf();

        progress("PostgreSQL: initdb, TLS under the demo's CA, the clinic's tables");
        let (ca_pem, server_tls) = clinic::tls_material()?;
        let pg = LocalPostgres::start(Some(&server_tls)).await?;
        let admin_password = random_hex(16)?;
        let root = pg.superuser("postgres").await?;
        root.batch_execute(&clinic::roles_sql(&admin_password)).await?;
        root.batch_execute(&clinic::database_sql()).await?;
        pg.superuser(clinic::DATABASE).await?.batch_execute(&clinic::schema_sql()).await?;

        progress("the OIDC issuer");
        let issuer = Arc::new(Issuer::new(clinic::AUDIENCE)?);
        let issuer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let jwks = format!("http://{}/jwks", issuer_listener.local_addr()?);
        let issuer_task = issuer.serve(issuer_listener)?;

        std::fs::create_dir_all(path.join("manifests"))?;
        let manifests = clinic::manifests(pg.port);
        let secrets = clinic::broker_secrets(&admin_password, &issuer.jwks(), &ca_pem);
        secret_file(&path.join("manifests/clinic.yaml"), &format!("{secrets}---\n{manifests}"))?;
        std::fs::write(path.join("server.yaml"), &manifests)?;
        let sidecar_credential = path.join("broker.credential");
        secret_file(&sidecar_credential, &random_hex(32)?)?;
        let sender_credential = path.join("collector.credential");
        secret_file(&sender_credential, &random_hex(32)?)?;
        let signing_seed = random_hex(32)?;
        secret_file(&path.join("checkpoint.key"), &signing_seed)?;
        let checkpoint_key = crate::audit::checkpoint::Signer::from_file(&path.join("checkpoint.key"))
            .map_err(anyhow::Error::msg)?
            .public_hex();
        secret_file(&path.join("args.key"), &random_hex(32)?)?;
        let http = reqwest::Client::new();
        let up = |url: String| {
            let http = http.clone();
            async move || http.get(&url).send().await.is_ok_and(|r| r.status().is_success())
        };
        let s = |p: &Path| p.display().to_string();

        progress("the audit collector");
        let collector_port = free_port()?;
        let collector_url = format!("http://127.0.0.1:{collector_port}");
        let mut collector = Part::spawn(
            "collector",
            exe,
            &path,
            &[
                "audit-collector".into(),
                "--data-dir".into(),
                s(&path.join("collector")),
                "--listen".into(),
                format!("127.0.0.1:{collector_port}"),
                "--sender-credential-file".into(),
                s(&sender_credential),
                "--signing-key-file".into(),
                s(&path.join("checkpoint.key")),
                "--checkpoint-interval".into(),
                "1s".into(),
            ],
        )?;
        let port_open = async || tokio::net::TcpStream::connect(("127.0.0.1", collector_port)).await.is_ok();
        collector.wait_ready(port_open).await?;

        progress("the credential broker");
        let (broker_port, broker_metrics) = (free_port()?, free_port()?);
        let broker_url = format!("http://127.0.0.1:{broker_port}");
        let mut broker = Part::spawn(
            "broker",
            exe,
            &path,
            &[
                "broker".into(),
                "--manifests".into(),
                s(&path.join("manifests")),
                "--listen".into(),
                format!("127.0.0.1:{broker_port}"),
                "--metrics-listen".into(),
                format!("127.0.0.1:{broker_metrics}"),
                "--sidecar-credential-file".into(),
                s(&sidecar_credential),
                "--audit-dir".into(),
                s(&path.join("broker-audit")),
                "--pod".into(),
                "broker-0".into(),
                "--collector".into(),
                collector_url.clone(),
                "--collector-credential-file".into(),
                s(&sender_credential),
                "--resync-interval".into(),
                "2s".into(),
            ],
        )?;
        let broker_ready = format!("http://127.0.0.1:{broker_metrics}/readyz");
        broker.wait_ready(up(broker_ready.clone())).await?;

        progress("the MCP server");
        let controls = Arc::new(Controls::default());
        let server_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let upstream = format!("http://{}/mcp", server_listener.local_addr()?);
        let server = super::server::serve(server_listener, Arc::clone(&controls));

        progress("the sidecar");
        let (sidecar_port, sidecar_metrics) = (free_port()?, free_port()?);
        let mut sidecar = Part::spawn(
            "sidecar",
            exe,
            &path,
            &[
                "sidecar".into(),
                "--mcpserver".into(),
                s(&path.join("server.yaml")),
                "--upstream".into(),
                upstream,
                "--listen".into(),
                format!("127.0.0.1:{sidecar_port}"),
                "--metrics-listen".into(),
                format!("127.0.0.1:{sidecar_metrics}"),
                "--jwks-url".into(),
                jwks.clone(),
                "--audit-dir".into(),
                s(&path.join("sidecar-audit")),
                "--args-key-file".into(),
                s(&path.join("args.key")),
                "--allowed-host".into(),
                "127.0.0.1".into(),
                "--pod".into(),
                "patient-lookup-0".into(),
                "--broker".into(),
                broker_url.clone(),
                "--broker-credential-file".into(),
                s(&sidecar_credential),
                "--db-proxy-listen".into(),
                "127.0.0.1:0".into(),
                "--collector".into(),
                collector_url.clone(),
                "--collector-credential-file".into(),
                s(&sender_credential),
            ],
        )?;
        let sidecar_metrics = format!("http://127.0.0.1:{sidecar_metrics}");
        sidecar.wait_ready(up(format!("{sidecar_metrics}/readyz"))).await?;

        let at = Addresses {
            mcp: format!("http://127.0.0.1:{sidecar_port}/mcp"),
            sidecar_metrics,
            broker: broker_url,
            collector: collector_url,
            jwks,
            pg_port: pg.port,
        };
        Ok(Stack {
            sidecar,
            broker,
            collector,
            server,
            issuer_task,
            issuer,
            controls,
            pg,
            at,
            checkpoint_key,
            dir,
            admin_password,
            ca_pem,
            broker_ready,
            collector_port,
        })
    }

    /// Writes the broker's manifests again with the issuer's current JWKS
    /// (after a key rotation; the broker re-reads them at its next sync).
    pub fn publish_jwks(&self) -> anyhow::Result<()> {
        let manifests = clinic::manifests(self.pg.port);
        let secrets = clinic::broker_secrets(&self.admin_password, &self.issuer.jwks(), &self.ca_pem);
        let path = self.manifests().join("clinic.yaml");
        let staged = self.dir.path().join("clinic.yaml.new");
        let _ = std::fs::remove_file(&staged);
        secret_file(&staged, &format!("{secrets}---\n{manifests}"))?;
        std::fs::rename(&staged, &path)?;
        Ok(())
    }

    /// Runs this binary with `args` (an auditor's command), returning its
    /// exit code and standard output.
    pub fn run_cli(&self, args: &[&str]) -> anyhow::Result<(i32, String)> {
        let exe = std::env::current_exe()?;
        let out = Command::new(exe).args(args).stdin(Stdio::null()).output()?;
        Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}
