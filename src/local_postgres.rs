//! A private PostgreSQL cluster on loopback, for `mcp-warden demo` and the
//! test suite: `initdb` in a temp dir, run as an unprivileged user when the
//! process is root (`initdb` refuses root), on a free loopback port, every
//! statement logged (so what the database saw can be read back). Stopped
//! (fast shutdown) and its directory removed when dropped; the postmaster
//! also gets SIGINT if this process dies without dropping it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_postgres::{Client, NoTls};

/// Password of the cluster's superuser `postgres`.
pub const SUPERUSER_PASSWORD: &str = "test-superuser-password";
/// Unprivileged uid/gid the cluster runs as when this process is root.
pub const NOBODY: u32 = 65534;
/// What to install when no server binaries are found.
pub const PACKAGE_HINT: &str = "install PostgreSQL's server binaries (Debian/Ubuntu: apt-get install postgresql) \
     or point MCPW_PG_BIN at the directory holding initdb and postgres";

/// Where the PostgreSQL server binaries are: `MCPW_PG_BIN`, else Debian's
/// `/usr/lib/postgresql/<major>/bin`, 15 first (the version the product is
/// tested against), else the newest.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("MCPW_PG_BIN") {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").exists() {
            bail!("MCPW_PG_BIN={}: no initdb there; {PACKAGE_HINT}", dir.display());
        }
        return Ok(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<u32> = std::fs::read_dir(root)
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    majors.sort_by_key(|m| (*m != 15, std::cmp::Reverse(*m)));
    for major in majors {
        let dir = root.join(major.to_string()).join("bin");
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    bail!("PostgreSQL server binaries not found under /usr/lib/postgresql/<version>/bin; {PACKAGE_HINT}")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `command` as [`NOBODY`] when this process is root.
pub fn as_unprivileged(command: &mut Command) -> &mut Command {
    if is_root() {
        command.uid(NOBODY).gid(NOBODY);
    }
    command
}

/// Asks the kernel to send `signal` to the child when this process dies
/// (also when it is killed), so no server outlives its owner.
pub fn die_with_parent(command: &mut Command, signal: libc::c_int) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// A free loopback port (bound, then released: retry on a race).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server certificate and key (PEM) for `ssl = on`.
pub struct ServerTls {
    /// The certificate chain.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// A running private cluster.
pub struct LocalPostgres {
    /// The loopback port it listens on.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn give_to_nobody(path: &Path) -> anyhow::Result<()> {
    if is_root() {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY))
            .with_context(|| format!("chown {} to the unprivileged user", path.display()))?;
    }
    Ok(())
}

impl LocalPostgres {
    /// initdb + start; returns once the server accepts the superuser.
    pub async fn start(tls: Option<&ServerTls>) -> anyhow::Result<LocalPostgres> {
        LocalPostgres::start_with_settings(tls, &[]).await
    }

    /// Like [`LocalPostgres::start`], with more server settings
    /// (`name=value`, as `postgres -c` takes them), e.g.
    /// `shared_preload_libraries=pg_stat_statements`.
    pub async fn start_with_settings(tls: Option<&ServerTls>, settings: &[&str]) -> anyhow::Result<LocalPostgres> {
        let bin = bin_dir()?;
        let mut dir = tempfile::Builder::new().prefix("mcpw-pg-").tempdir().context("a temp dir for PostgreSQL")?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        give_to_nobody(dir.path())?;
        give_to_nobody(&pwfile)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let out = as_unprivileged(Command::new(bin.join("initdb")).current_dir(dir.path()))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--pwfile"])
            .arg(&pwfile)
            .args(["--no-sync", "--encoding=UTF8", "--locale=C"])
            .output()
            .with_context(|| format!("cannot run {}", bin.join("initdb").display()))?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let mut setting_args: Vec<String> = settings.iter().flat_map(|s| ["-c".to_string(), s.to_string()]).collect();
        if let Some(tls) = tls {
            for (name, content) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                let path = dir.path().join(name);
                std::fs::write(&path, content)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                give_to_nobody(&path)?;
            }
            for setting in [
                "ssl=on".to_string(),
                format!("ssl_cert_file={}", dir.path().join("server.crt").display()),
                format!("ssl_key_file={}", dir.path().join("server.key").display()),
            ] {
                setting_args.extend(["-c".to_string(), setting]);
            }
        }
        let log = dir.path().join("server.log");
        for attempt in 0..5 {
            let port = free_port()?;
            let log_file = std::fs::File::create(&log)?;
            let mut command = Command::new(bin.join("postgres"));
            as_unprivileged(command.current_dir(dir.path()));
            // SIGINT: fast shutdown.
            die_with_parent(&mut command, libc::SIGINT);
            let child = command
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
                .arg(format!("unix_socket_directories={}", dir.path().display()))
                .args(["-c", "log_statement=all", "-c", "fsync=off", "-c", "max_connections=200"])
                .args(["-c", "log_connections=on", "-c", "log_disconnections=on"])
                .args(&setting_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log_file))
                .spawn()
                .with_context(|| format!("cannot run {}", bin.join("postgres").display()))?;
            let mut pg = LocalPostgres { port, dir, child: Some(child) };
            if pg.wait_ready().await {
                return Ok(pg);
            }
            let child = pg.child.take();
            dir = std::mem::replace(&mut pg.dir, tempfile::tempdir()?);
            if let Some(mut child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
            tracing::warn!(port, attempt, "postgres did not start; retrying on another port");
        }
        bail!("postgres did not start: {}", std::fs::read_to_string(log).unwrap_or_default().trim())
    }

    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && child.try_wait().ok().flatten().is_some()
            {
                return false;
            }
            if self.connect("postgres", "postgres", SUPERUSER_PASSWORD).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// A connection as `user` to `database`.
    pub async fn connect(&self, database: &str, user: &str, password: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .dbname(database)
            .user(user)
            .password(password)
            .connect_timeout(Duration::from_secs(5))
            .connect(NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A superuser connection.
    pub async fn superuser(&self, database: &str) -> Result<Client, tokio_postgres::Error> {
        self.connect(database, "postgres", SUPERUSER_PASSWORD).await
    }

    /// Stops logging every statement: a benchmark measures the database's
    /// work, not its log.
    pub async fn without_statement_log(&self) -> Result<(), tokio_postgres::Error> {
        let root = self.superuser("postgres").await?;
        root.execute("ALTER SYSTEM SET log_statement = 'none'", &[]).await?;
        root.execute("SELECT pg_reload_conf()", &[]).await?;
        Ok(())
    }

    /// The server log so far (every statement, connection and disconnection).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The cluster's directory (data, log, socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: fast shutdown (disconnects clients, no checkpoint wait).
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
