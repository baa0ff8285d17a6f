//! Start-up and shutdown: open the database (migrations first), start the
//! DbExecutor, the ChatServer and the HTTP server; on SIGTERM/SIGINT stop
//! accepting, let the ChatServer finish storing and close sessions with 1001.

use std::net::SocketAddr;
use std::sync::Arc;

use actix::Addr;
use actix_web::{web, App, HttpServer};

use crate::auth::TokenKeys;
use crate::config::Config;
use crate::db::{self, DbExecutor};
use crate::http::{self, AppState};
use crate::hub::cluster::ClusterConfig;
use crate::hub::server::{ChatServer, HubConfig, Shutdown};
use crate::hub::session::SessionLimits;

/// A started chat-hub.
pub struct Running {
    pub addr: SocketAddr,
    pub server: Addr<ChatServer>,
    pub db: Addr<DbExecutor>,
    pub keys: TokenKeys,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Open the database and start serving on `cfg.bind` (port 0 picks a free port).
/// Must run inside an actix System.
pub async fn start(mut cfg: Config) -> anyhow::Result<Running> {
    let secret = cfg.resolve_jwt_secret().map_err(anyhow::Error::msg)?;
    let keys = TokenKeys::new(&secret);
    let pool = db::open_pool(&cfg).map_err(anyhow::Error::msg)?;
    // Listen only once migrations have run, and before any actor starts, so
    // that a failure here leaves nothing running.
    let listener = std::net::TcpListener::bind(cfg.bind)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.bind))?;
    let groups = {
        let mut c = pool.get()?;
        db::queries::groups::all(&mut c)?
    };
    let dbx = DbExecutor::start(cfg.db_threads, pool.clone());
    let cluster = cfg.redis_url.as_ref().map(|url| ClusterConfig {
        redis_url: url.clone(),
        node: cfg.node_id.clone(),
        prefix: cfg.redis_prefix.clone(),
    });
    let server = ChatServer::start_with(dbx.clone(), HubConfig::from_config(&cfg), groups, cluster)
        .map_err(anyhow::Error::msg)?;
    crate::metrics::METRICS
        .node_info
        .with_label_values(&[cfg.node_id.as_str()])
        .set(1);
    if cfg.dev_login {
        log::warn!("CHAT_HUB_DEV_LOGIN is on: POST /dev/token hands out a token for any user name; never use it in production");
    }
    let state = AppState {
        cfg: Arc::new(cfg.clone()),
        keys: keys.clone(),
        server: server.clone(),
        db: dbx.clone(),
        pool,
        limits: Arc::new(SessionLimits::from_config(&cfg)),
    };
    let json_limit = cfg.max_frame_bytes;
    let trusted = Arc::new(cfg.trusted_proxies.clone());
    let srv = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .app_data(http::json_config(json_limit))
            .wrap(http::access_log::logger(trusted.clone()))
            .configure(http::routes)
    })
    .disable_signals()
    .shutdown_timeout(5)
    .max_connections(cfg.max_connections)
    .listen(listener)?;
    let addr = srv
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no listen address"))?;
    let srv = srv.run();
    let handle = srv.handle();
    let task = actix_web::rt::spawn(srv);
    match &cfg.redis_url {
        Some(url) => log::info!(
            "chat-hub node {} listening on http://{addr} (database {}, cluster through {} with prefix {})",
            cfg.node_id,
            cfg.database.redacted(),
            redacted_redis(url),
            cfg.redis_prefix
        ),
        None => log::info!(
            "chat-hub node {} listening on http://{addr} (database {}, standalone)",
            cfg.node_id,
            cfg.database.redacted()
        ),
    }
    Ok(Running {
        addr,
        server,
        db: dbx,
        keys,
        handle,
        task,
    })
}

impl Running {
    /// Graceful stop: no new connections, every received message stored and
    /// answered, sessions closed with 1001, then the HTTP server stops.
    pub async fn shutdown(self) {
        self.handle.pause().await;
        let _ = self.server.send(Shutdown).await;
        self.handle.stop(true).await;
        let _ = self.task.await;
    }
}

/// Serve until SIGTERM or SIGINT, then shut down gracefully.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = start(cfg).await?;
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM: shutting down"),
        _ = int.recv() => log::info!("SIGINT: shutting down"),
    }
    running.shutdown().await;
    log::info!("stopped");
    Ok(())
}

/// A Redis URL without its password, for logs.
fn redacted_redis(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***@{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}
