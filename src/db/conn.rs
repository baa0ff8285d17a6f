//! The connection type over both backends, how connections are opened (with
//! the real cause on failure), migrations, the pool, and write transactions.

use std::time::Duration;

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::config::{Config, DatabaseUrl};

/// One database connection, MySQL/MariaDB or SQLite, chosen at run time.
#[derive(diesel::MultiConnection)]
pub enum DbConn {
    #[cfg(feature = "mysql")]
    Mysql(diesel::MysqlConnection),
    #[cfg(feature = "sqlite")]
    Sqlite(diesel::SqliteConnection),
}

pub type Pool = r2d2::Pool<DbManager>;
pub type PooledConn = r2d2::PooledConnection<DbManager>;

/// Run the same diesel expression on the concrete connection inside a
/// [`DbConn`], for what the multi-backend cannot express (multi-row inserts,
/// `INSERT ... IGNORE`). Each arm is type-checked against its own backend.
macro_rules! on_backend {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            #[cfg(feature = "mysql")]
            $crate::db::DbConn::Mysql($c) => $body,
            #[cfg(feature = "sqlite")]
            $crate::db::DbConn::Sqlite($c) => $body,
        }
    };
}
pub(crate) use on_backend;

#[cfg(feature = "mysql")]
const MYSQL_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/mysql");
#[cfg(feature = "sqlite")]
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Open one connection with the concrete connection type, so that a failure
/// names its real cause (the derived multi-connection `establish` hides it).
pub fn establish(url: &DatabaseUrl, timeout: Duration) -> Result<DbConn, diesel::ConnectionError> {
    let setup = |e: diesel::result::Error| diesel::ConnectionError::CouldntSetupConfiguration(e);
    match url {
        #[cfg(feature = "mysql")]
        DatabaseUrl::Mysql(u) => {
            let mut c = diesel::MysqlConnection::establish(u)?;
            let secs = timeout.as_secs().max(1);
            diesel::sql_query(format!("SET SESSION innodb_lock_wait_timeout = {secs}"))
                .execute(&mut c)
                .map_err(setup)?;
            // READ COMMITTED: no gap locks on plain index scans, so ack and
            // store transactions lock only the rows they change. Seq
            // allocation needs no more: its UPDATE locks the counter row and
            // the read after it sees the transaction's own change.
            diesel::sql_query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .execute(&mut c)
                .map_err(setup)?;
            // MariaDB bounds every statement; MySQL has no such variable, so a failure here is fine.
            let _ = diesel::sql_query(format!("SET SESSION max_statement_time = {secs}"))
                .execute(&mut c);
            Ok(DbConn::Mysql(c))
        }
        #[cfg(feature = "sqlite")]
        DatabaseUrl::Sqlite(path) => {
            let path = path.to_str().ok_or_else(|| {
                diesel::ConnectionError::InvalidConnectionUrl("path is not UTF-8".into())
            })?;
            let mut c = diesel::SqliteConnection::establish(path)?;
            // busy_timeout first: switching to WAL itself needs the lock.
            let ms = timeout.as_millis();
            for pragma in [
                format!("PRAGMA busy_timeout = {ms}"),
                "PRAGMA journal_mode = WAL".into(),
                // FULL: a committed message survives power loss, not only a crash.
                "PRAGMA synchronous = FULL".into(),
            ] {
                diesel::sql_query(pragma).execute(&mut c).map_err(setup)?;
            }
            Ok(DbConn::Sqlite(c))
        }
        #[allow(unreachable_patterns)]
        _ => Err(diesel::ConnectionError::InvalidConnectionUrl(
            "backend not built in".into(),
        )),
    }
}

/// Apply pending migrations; returns the names applied.
pub fn run_migrations(conn: &mut DbConn) -> Result<Vec<String>, String> {
    let names = |v: Vec<diesel::migration::MigrationVersion<'_>>| {
        v.iter().map(|m| m.to_string()).collect::<Vec<_>>()
    };
    let applied = match conn {
        #[cfg(feature = "mysql")]
        DbConn::Mysql(c) => c.run_pending_migrations(MYSQL_MIGRATIONS).map(names),
        #[cfg(feature = "sqlite")]
        DbConn::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS).map(names),
    };
    applied.map_err(|e| format!("migrations failed: {e}"))
}

/// Revert every applied migration (their `down.sql`), newest first; returns
/// the names reverted. For operators' downgrades and the migration tests.
pub fn revert_all_migrations(conn: &mut DbConn) -> Result<Vec<String>, String> {
    let names = |v: Vec<diesel::migration::MigrationVersion<'_>>| {
        v.iter().map(|m| m.to_string()).collect::<Vec<_>>()
    };
    let reverted = match conn {
        #[cfg(feature = "mysql")]
        DbConn::Mysql(c) => c.revert_all_migrations(MYSQL_MIGRATIONS).map(names),
        #[cfg(feature = "sqlite")]
        DbConn::Sqlite(c) => c.revert_all_migrations(SQLITE_MIGRATIONS).map(names),
    };
    reverted.map_err(|e| format!("reverting migrations failed: {e}"))
}

/// Opens pool connections with [`establish`]; a connection is checked with a
/// trivial query before each use, so a restarted database is picked up.
pub struct DbManager {
    url: DatabaseUrl,
    timeout: Duration,
}

impl r2d2::ManageConnection for DbManager {
    type Connection = DbConn;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<DbConn, Self::Error> {
        establish(&self.url, self.timeout).map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), Self::Error> {
        diesel::sql_query("SELECT 1")
            .execute(conn)
            .map(|_| ())
            .map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut DbConn) -> bool {
        on_backend!(conn, c => matches!(
            AnsiTransactionManager::transaction_manager_status_mut(c),
            diesel::connection::TransactionManagerStatus::InError
        ))
    }
}

/// Connect once (reporting the real cause of a failure), run pending
/// migrations, then build the pool that the DbExecutor and HTTP handlers share.
pub fn open_pool(cfg: &Config) -> Result<Pool, String> {
    let what = cfg.database.redacted();
    let mut first = establish(&cfg.database, cfg.db_timeout)
        .map_err(|e| format!("cannot open database {what}: {e}"))?;
    let applied = with_migration_lock(&mut first, run_migrations)?;
    for name in &applied {
        log::info!("applied migration {name}");
    }
    drop(first);
    Ok(build_pool(cfg))
}

/// The pool alone: no connection is made until one is needed, so it can be
/// built while the database is down (it connects once the database is back).
pub fn build_pool(cfg: &Config) -> Pool {
    r2d2::Pool::builder()
        .max_size(cfg.db_pool_size)
        .min_idle(Some(1))
        .connection_timeout(cfg.db_timeout)
        .build_unchecked(DbManager {
            url: cfg.database.clone(),
            timeout: cfg.db_timeout,
        })
}

/// Several chat-hub processes may start at once on one MariaDB database:
/// migrations run under a named lock there (SQLite's own write lock suffices).
fn with_migration_lock<T>(
    conn: &mut DbConn,
    f: impl FnOnce(&mut DbConn) -> Result<T, String>,
) -> Result<T, String> {
    #[cfg(feature = "mysql")]
    if let DbConn::Mysql(c) = conn {
        diesel::sql_query("SELECT GET_LOCK('chat_hub_migrations', 60)")
            .execute(c)
            .map_err(|e| format!("migration lock: {e}"))?;
        let out = f(conn);
        if let DbConn::Mysql(c) = conn {
            let _ = diesel::sql_query("SELECT RELEASE_LOCK('chat_hub_migrations')").execute(c);
        }
        return out;
    }
    f(conn)
}

/// Run `f` in a write transaction: `BEGIN IMMEDIATE` on SQLite (take the write
/// lock up front, so a transaction that reads before it writes cannot fail
/// with a busy snapshot), a plain transaction on MySQL. Rolled back on error.
pub fn write_txn<T, E>(
    conn: &mut DbConn,
    f: impl FnOnce(&mut DbConn) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<diesel::result::Error>,
{
    on_backend!(&mut *conn, c => begin(c)?);
    match f(conn) {
        Ok(v) => {
            on_backend!(&mut *conn, c => AnsiTransactionManager::commit_transaction(c)?);
            Ok(v)
        }
        Err(e) => {
            on_backend!(&mut *conn, c => {
                if let Err(r) = AnsiTransactionManager::rollback_transaction(c) {
                    log::warn!("rollback failed: {r}");
                }
            });
            Err(e)
        }
    }
}

trait BeginWrite {
    fn begin_write(&mut self) -> QueryResult<()>;
}
#[cfg(feature = "mysql")]
impl BeginWrite for diesel::MysqlConnection {
    fn begin_write(&mut self) -> QueryResult<()> {
        AnsiTransactionManager::begin_transaction(self)
    }
}
#[cfg(feature = "sqlite")]
impl BeginWrite for diesel::SqliteConnection {
    fn begin_write(&mut self) -> QueryResult<()> {
        AnsiTransactionManager::begin_transaction_sql(self, "BEGIN IMMEDIATE")
    }
}
fn begin<C: BeginWrite>(c: &mut C) -> QueryResult<()> {
    c.begin_write()
}
