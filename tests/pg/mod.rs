//! A private PostgreSQL cluster for tests: initdb in a temp dir, run as an
//! unprivileged user when the tests run as root (initdb refuses root), on
//! a free loopback port, with every statement logged so tests can read
//! the server log. Stopped (fast shutdown) when dropped.
#![allow(dead_code)]

pub mod clinic;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// Password of the test cluster's superuser `postgres`.
pub const SUPERUSER_PASSWORD: &str = "test-superuser-password";
/// Unprivileged uid/gid the cluster runs as when the tests run as root.
pub const NOBODY: u32 = 65534;

pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Where the PostgreSQL 15 server binaries are.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("MCPW_PG_BIN") {
        return PathBuf::from(dir);
    }
    // Debian's layout: /usr/lib/postgresql/<major>/bin; 15 first (the
    // version the product is tested against), else the newest.
    let root = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<u32> = std::fs::read_dir(root)
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    majors.sort_by_key(|m| (*m != 15, std::cmp::Reverse(*m)));
    for major in majors {
        let dir = root.join(major.to_string()).join("bin");
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    panic!(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/<version>/bin; \
         install postgresql (.ci/run does) or set MCPW_PG_BIN"
    );
}

pub fn as_unprivileged(command: &mut Command) -> &mut Command {
    if unsafe { libc::geteuid() } == 0 {
        command.uid(NOBODY).gid(NOBODY);
    }
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A server certificate and key (PEM) for `ssl = on`.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Postgres {
    /// initdb + start; waits until the server accepts the superuser.
    pub async fn start() -> Postgres {
        Postgres::start_with(None).await
    }

    /// Like [`Postgres::start`], serving TLS with the given certificate.
    pub async fn start_with(tls: Option<&ServerTls>) -> Postgres {
        let bin = bin_dir();
        let mut dir = tempfile::Builder::new().prefix("mcpw-pg-").tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("pwfile");
        if unsafe { libc::geteuid() } == 0 {
            for path in [dir.path(), pwfile.as_path()] {
                std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
            }
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let out = as_unprivileged(Command::new(bin.join("initdb")).current_dir(dir.path()))
            .args(["-D", data.to_str().expect("utf8"), "-U", "postgres", "--auth=scram-sha-256"])
            .args(["--pwfile", pwfile.to_str().expect("utf8"), "--no-sync", "--encoding=UTF8", "--locale=C"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(tls) = tls {
            for (name, content) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                let path = dir.path().join(name);
                std::fs::write(&path, content).expect("write tls file");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
                if unsafe { libc::geteuid() } == 0 {
                    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown");
                }
            }
            tls_args = vec![
                "-c".into(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", dir.path().join("server.crt").display()),
                "-c".into(),
                format!("ssl_key_file={}", dir.path().join("server.key").display()),
            ];
        }
        let log = dir.path().join("server.log");
        for attempt in 0..5 {
            let port = free_port();
            let log_file = std::fs::File::create(&log).expect("log");
            let child = as_unprivileged(Command::new(bin.join("postgres")).current_dir(dir.path()))
                .args(["-D", data.to_str().expect("utf8"), "-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1", "-c"])
                .arg(format!("unix_socket_directories={}", dir.path().display()))
                .args(["-c", "log_statement=all", "-c", "fsync=off", "-c", "max_connections=200"])
                .args(["-c", "log_connections=on", "-c", "log_disconnections=on"])
                .args(&tls_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log_file))
                .spawn()
                .expect("spawn postgres");
            let mut pg = Postgres { port, dir, child: Some(child) };
            if pg.wait_ready().await {
                return pg;
            }
            let child = pg.child.take();
            dir = pg.take_dir();
            if let Some(mut child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
            eprintln!("postgres did not start on port {port} (attempt {attempt}); retrying on another port");
        }
        panic!("postgres did not start: {}", std::fs::read_to_string(log).unwrap_or_default());
    }

    fn take_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
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
    pub async fn superuser(&self, database: &str) -> Client {
        self.connect(database, "postgres", SUPERUSER_PASSWORD).await.expect("superuser connection")
    }

    /// Stops logging every statement: a benchmark measures the database's
    /// work, not its log.
    pub async fn without_statement_log(&self) {
        let root = self.superuser("postgres").await;
        root.execute("ALTER SYSTEM SET log_statement = 'none'", &[]).await.expect("log_statement");
        root.execute("SELECT pg_reload_conf()", &[]).await.expect("reload");
    }

    /// The server log so far (every statement, connection and disconnection).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: fast shutdown (disconnects clients, no checkpoint wait).
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
