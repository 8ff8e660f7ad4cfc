//! A private PostgreSQL cluster for tests: `mcp_warden::local_postgres`
//! (initdb in a temp dir, as an unprivileged user when root, on a free
//! loopback port, every statement logged), stopped when dropped.
#![allow(dead_code)]

pub mod clinic;

use mcp_warden::local_postgres::LocalPostgres;
#[allow(unused_imports)]
pub use mcp_warden::local_postgres::{NOBODY, SUPERUSER_PASSWORD, ServerTls, as_unprivileged};
use tokio_postgres::Client;

/// The library's private cluster (`mcp_warden::local_postgres`), with the
/// panicking constructors a test wants.
pub struct Postgres(LocalPostgres);

impl std::ops::Deref for Postgres {
    type Target = LocalPostgres;
    fn deref(&self) -> &LocalPostgres {
        &self.0
    }
}

/// Where the PostgreSQL server binaries are.
pub fn bin_dir() -> std::path::PathBuf {
    mcp_warden::local_postgres::bin_dir().expect("PostgreSQL server binaries (.ci/run installs them)")
}

impl Postgres {
    /// initdb + start; waits until the server accepts the superuser.
    pub async fn start() -> Postgres {
        Postgres::start_with(None).await
    }

    /// Like [`Postgres::start`], serving TLS with the given certificate.
    pub async fn start_with(tls: Option<&ServerTls>) -> Postgres {
        Postgres(LocalPostgres::start(tls).await.expect("a private PostgreSQL cluster"))
    }

    /// Like [`Postgres::start`], with more server settings (`name=value`).
    pub async fn start_with_settings(settings: &[&str]) -> Postgres {
        Postgres(LocalPostgres::start_with_settings(None, settings).await.expect("a private PostgreSQL cluster"))
    }

    /// A superuser connection.
    pub async fn superuser(&self, database: &str) -> Client {
        self.0.superuser(database).await.expect("superuser connection")
    }

    /// Stops logging every statement: a benchmark measures the database's
    /// work, not its log.
    pub async fn without_statement_log(&self) {
        self.0.without_statement_log().await.expect("log_statement off");
    }
}
