//! One typed [`Config`], loaded once at start-up from environment variables,
//! an optional TOML file (`--config`) and command-line flags, in rising order
//! of precedence, and passed explicitly from then on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Command};

/// Which database a `DATABASE_URL` selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    Mysql(String),
    Sqlite(PathBuf),
}

impl DatabaseUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.starts_with("mysql://") {
            if cfg!(feature = "mysql") {
                Ok(DatabaseUrl::Mysql(s.to_string()))
            } else {
                Err("this chat-hub was built without MySQL support: rebuild with `--features mysql`".into())
            }
        } else if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            Self::sqlite(path)
        } else if s.contains("://") {
            Err("unsupported scheme: expected mysql://user:pass@host:port/db, sqlite://path or a plain file path".into())
        } else {
            Self::sqlite(s)
        }
    }

    fn sqlite(path: &str) -> Result<Self, String> {
        if path.is_empty() {
            return Err("empty SQLite path: expected sqlite://path or a plain file path".into());
        }
        if cfg!(feature = "sqlite") {
            Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
        } else {
            Err(
                "this chat-hub was built without SQLite support: rebuild with `--features sqlite`"
                    .into(),
            )
        }
    }

    /// The URL with any password replaced, for logs.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(p) => format!("sqlite://{}", p.display()),
            DatabaseUrl::Mysql(u) => match (u.find("://"), u.rfind('@')) {
                (Some(s), Some(at)) if at > s => {
                    let creds = &u[s + 3..at];
                    let user = creds.split(':').next().unwrap_or("");
                    format!("mysql://{user}:***@{}", &u[at + 1..])
                }
                _ => u.clone(),
            },
        }
    }
}

/// Everything chat-hub can be configured with.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind: SocketAddr,
    pub database: DatabaseUrl,
    /// HS256 secret for client tokens; `None` until [`Config::resolve_jwt_secret`].
    pub jwt_secret: Option<String>,
    pub api_key: Option<String>,
    /// Empty: any origin.
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_bad_frames: u32,
    pub rate_per_sec: f64,
    pub rate_burst: u32,
    pub heartbeat_timeout: Duration,
    pub db_timeout: Duration,
    pub dev_login: bool,
    pub db_threads: usize,
    pub db_pool_size: u32,
    pub session_queue: usize,
    pub max_sessions_per_user: usize,
    pub max_connections: usize,
    pub trusted_proxies: Vec<IpAddr>,
    /// Cluster mode: the Redis that joins the nodes (`None`: this node runs alone).
    pub redis_url: Option<String>,
    /// This node's name in logs, metrics and the cluster (default `<hostname>-<port>`).
    pub node_id: String,
    /// Prefix of every Redis channel, so that several clusters can share one Redis.
    pub redis_prefix: String,
}

/// One setting: its key in the TOML file, its environment variable, whether it
/// has a command-line flag (`--<key with dashes>`), its default and its help.
struct Setting {
    key: &'static str,
    env: &'static str,
    flag: bool,
    default: &'static str,
    help: &'static str,
}

const SETTINGS: &[Setting] = &[
    Setting { key: "bind", env: "CHAT_HUB_BIND", flag: true, default: "127.0.0.1:8080", help: "listen address (ip:port)" },
    Setting { key: "database_url", env: "DATABASE_URL", flag: true, default: "chat-hub.db", help: "mysql://user:pass@host:port/db, sqlite://path or a plain SQLite file path" },
    Setting { key: "jwt_secret", env: "CHAT_HUB_JWT_SECRET", flag: false, default: "", help: "HS256 secret for client tokens, at least 16 bytes (SQLite default: generated into <database file>.secret; required with MySQL)" },
    Setting { key: "api_key", env: "CHAT_HUB_API_KEY", flag: false, default: "", help: "bearer key of the server API (unset: the API answers 401)" },
    Setting { key: "allowed_origins", env: "CHAT_HUB_ALLOWED_ORIGINS", flag: true, default: "", help: "comma-separated allowed Origin values for /ws (empty: any)" },
    Setting { key: "max_body_bytes", env: "CHAT_HUB_MAX_BODY_BYTES", flag: true, default: "4096", help: "largest message body in UTF-8 bytes" },
    Setting { key: "max_frame_bytes", env: "CHAT_HUB_MAX_FRAME_BYTES", flag: true, default: "65536", help: "largest WebSocket text message in bytes" },
    Setting { key: "max_bad_frames", env: "CHAT_HUB_MAX_BAD_FRAMES", flag: true, default: "20", help: "bad frames in a row before the connection is closed (1008)" },
    Setting { key: "rate_per_sec", env: "CHAT_HUB_RATE_PER_SEC", flag: true, default: "20", help: "per-user send rate (messages per second)" },
    Setting { key: "rate_burst", env: "CHAT_HUB_RATE_BURST", flag: true, default: "50", help: "per-user send burst" },
    Setting { key: "heartbeat_timeout_secs", env: "CHAT_HUB_HEARTBEAT_TIMEOUT_SECS", flag: true, default: "30", help: "silence after which a client is disconnected; pings go out every third of it" },
    Setting { key: "db_timeout_secs", env: "CHAT_HUB_DB_TIMEOUT_SECS", flag: true, default: "5", help: "longest wait for the database before answering `unavailable`" },
    Setting { key: "dev_login", env: "CHAT_HUB_DEV_LOGIN", flag: true, default: "0", help: "1 enables POST /dev/token (loopback bind only)" },
    Setting { key: "db_threads", env: "CHAT_HUB_DB_THREADS", flag: true, default: "4", help: "DbExecutor threads" },
    Setting { key: "db_pool_size", env: "CHAT_HUB_DB_POOL_SIZE", flag: true, default: "8", help: "database connections in the pool (at least db_threads + 1)" },
    Setting { key: "session_queue", env: "CHAT_HUB_SESSION_QUEUE", flag: true, default: "1024", help: "outbound events queued per session before it counts as a slow consumer and is disconnected" },
    Setting { key: "max_sessions_per_user", env: "CHAT_HUB_MAX_SESSIONS_PER_USER", flag: true, default: "16", help: "open WebSocket sessions per user; the oldest is closed past it" },
    Setting { key: "max_connections", env: "CHAT_HUB_MAX_CONNECTIONS", flag: true, default: "25000", help: "open connections per worker thread" },
    Setting { key: "trusted_proxies", env: "CHAT_HUB_TRUSTED_PROXIES", flag: true, default: "", help: "comma-separated proxy IPs whose X-Forwarded-For / X-Real-IP are believed" },
    Setting { key: "redis_url", env: "CHAT_HUB_REDIS_URL", flag: true, default: "", help: "redis://host:port/ of the Redis that joins several nodes into one cluster (unset: this node runs alone)" },
    Setting { key: "node_id", env: "CHAT_HUB_NODE_ID", flag: true, default: "", help: "this node's id in logs, metrics and the cluster: letters, digits, . _ - : (default: <hostname>-<port>)" },
    Setting { key: "redis_prefix", env: "CHAT_HUB_REDIS_PREFIX", flag: true, default: "chat-hub", help: "prefix of the cluster's Redis channels (several clusters can share one Redis)" },
];

/// Where a raw value came from, for error messages.
fn describe(s: &Setting, source: &str) -> String {
    match source {
        "env" => s.env.to_string(),
        "flag" => format!("--{}", s.key.replace('_', "-")),
        file => format!("`{}` in {file}", s.key),
    }
}

/// The command line: serving is the default; `token` prints a client token.
pub fn command() -> Command {
    let mut cmd = Command::new("chat-hub")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Self-hosted real-time chat backend. With no subcommand it serves.")
        .after_help(
            "Every setting comes from its environment variable; a --config TOML file overrides the \
             environment and flags override both. The file uses the setting names below with \
             underscores (e.g. max_body_bytes = 8192); jwt_secret and api_key have no flag.",
        )
        .arg(
            Arg::new("config")
                .long("config")
                .global(true)
                .value_name("FILE")
                .help("TOML file with settings (overrides the environment)"),
        )
        .subcommand(
            Command::new("token")
                .about("Print a client token for USER signed with the configured secret")
                .arg(Arg::new("user").required(true).value_name("USER"))
                .arg(
                    Arg::new("ttl_secs")
                        .long("ttl-secs")
                        .value_name("N")
                        .default_value("86400")
                        .value_parser(clap::value_parser!(u64).range(1..=10 * 365 * 86400))
                        .help("lifetime of the token in seconds"),
                ),
        )
        .subcommand(Command::new("serve").about("Serve (the default)"));
    for s in SETTINGS.iter().filter(|s| s.flag) {
        let help = if s.default.is_empty() {
            format!("{} [env: {}]", s.help, s.env)
        } else {
            format!("{} [env: {}] [default: {}]", s.help, s.env, s.default)
        };
        cmd = cmd.arg(
            Arg::new(s.key)
                .long(s.key.replace('_', "-"))
                .global(true)
                .value_name("VALUE")
                .action(ArgAction::Set)
                .help(help),
        );
    }
    cmd
}

/// Raw, unparsed values per setting key with the source that gave them.
type Raw = HashMap<&'static str, (String, String)>;

impl Config {
    /// Load from the process environment, the `--config` file and the flags.
    pub fn load(matches: &ArgMatches) -> Result<Config, String> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let file = match matches.get_one::<String>("config") {
            Some(path) => Some((
                path.clone(),
                std::fs::read_to_string(path).map_err(|e| format!("--config {path}: {e}"))?,
            )),
            None => None,
        };
        let flags: HashMap<&str, String> = SETTINGS
            .iter()
            .filter(|s| s.flag)
            .filter_map(|s| matches.get_one::<String>(s.key).map(|v| (s.key, v.clone())))
            .collect();
        Self::from_sources(
            &env,
            file.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
            &flags,
        )
    }

    /// Defaults only (the environment ignored): the base of tests.
    pub fn defaults() -> Config {
        // The defaults are valid by construction; a failure here is a bug in SETTINGS.
        Self::from_sources(&HashMap::new(), None, &HashMap::new())
            .expect("default settings are valid")
    }

    pub fn from_sources(
        env: &HashMap<String, String>,
        file: Option<(&str, &str)>,
        flags: &HashMap<&str, String>,
    ) -> Result<Config, String> {
        let mut raw: Raw = HashMap::new();
        for s in SETTINGS {
            if let Some(v) = env.get(s.env) {
                raw.insert(s.key, (v.clone(), "env".into()));
            }
        }
        if let Some((path, text)) = file {
            for (k, v) in parse_file(path, text)? {
                raw.insert(k, (v, path.to_string()));
            }
        }
        for (k, v) in flags {
            if let Some(s) = SETTINGS.iter().find(|s| s.key == *k) {
                raw.insert(s.key, (v.clone(), "flag".into()));
            }
        }
        let mut get = Getter { raw: &raw };
        let mut cfg = Config {
            bind: get.parse(
                "bind",
                "an ip:port such as 127.0.0.1:8080 or 0.0.0.0:8080",
                |v| v.parse().ok(),
            )?,
            database: get.parse_with("database_url", DatabaseUrl::parse)?,
            jwt_secret: get.optional("jwt_secret"),
            api_key: get.optional("api_key"),
            allowed_origins: get.list("allowed_origins"),
            max_body_bytes: get.parse("max_body_bytes", "an integer from 1 to 1048576", |v| {
                v.parse().ok().filter(|n| (1..=1 << 20).contains(n))
            })?,
            max_frame_bytes: get.parse(
                "max_frame_bytes",
                "an integer from 1024 to 16777216",
                |v| v.parse().ok().filter(|n| (1024..=16 << 20).contains(n)),
            )?,
            max_bad_frames: get.parse("max_bad_frames", "an integer from 1 to 1000000", |v| {
                v.parse().ok().filter(|n| (1..=1_000_000).contains(n))
            })?,
            rate_per_sec: get.parse("rate_per_sec", "a number greater than 0", |v| {
                v.parse::<f64>().ok().filter(|n| n.is_finite() && *n > 0.0)
            })?,
            rate_burst: get.parse("rate_burst", "an integer from 1 to 1000000", |v| {
                v.parse().ok().filter(|n| (1..=1_000_000).contains(n))
            })?,
            heartbeat_timeout: get.parse(
                "heartbeat_timeout_secs",
                "an integer from 3 to 86400",
                |v| {
                    v.parse()
                        .ok()
                        .filter(|n| (3..=86_400).contains(n))
                        .map(Duration::from_secs)
                },
            )?,
            db_timeout: get.parse("db_timeout_secs", "an integer from 1 to 600", |v| {
                v.parse()
                    .ok()
                    .filter(|n| (1..=600).contains(n))
                    .map(Duration::from_secs)
            })?,
            dev_login: get.parse("dev_login", "1 (on) or 0 (off)", |v| match v {
                "1" | "true" | "on" => Some(true),
                "0" | "false" | "off" | "" => Some(false),
                _ => None,
            })?,
            db_threads: get.parse("db_threads", "an integer from 1 to 64", |v| {
                v.parse().ok().filter(|n| (1..=64).contains(n))
            })?,
            db_pool_size: get.parse("db_pool_size", "an integer from 2 to 256", |v| {
                v.parse().ok().filter(|n| (2..=256).contains(n))
            })?,
            session_queue: get.parse("session_queue", "an integer from 16 to 1000000", |v| {
                v.parse().ok().filter(|n| (16..=1_000_000).contains(n))
            })?,
            max_sessions_per_user: get.parse(
                "max_sessions_per_user",
                "an integer from 1 to 10000",
                |v| v.parse().ok().filter(|n| (1..=10_000).contains(n)),
            )?,
            max_connections: get.parse(
                "max_connections",
                "an integer from 1 to 10000000",
                |v| v.parse().ok().filter(|n| (1..=10_000_000).contains(n)),
            )?,
            trusted_proxies: get.parse(
                "trusted_proxies",
                "a comma-separated list of IP addresses",
                |v| split_list(v).iter().map(|s| s.parse().ok()).collect(),
            )?,
            redis_url: get.optional("redis_url"),
            node_id: get.optional("node_id").unwrap_or_default(),
            redis_prefix: get.optional("redis_prefix").unwrap_or_default(),
        };
        if cfg.node_id.is_empty() {
            cfg.node_id = default_node_id(cfg.bind.port());
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Rules between settings.
    fn check(&self) -> Result<(), String> {
        if self.max_body_bytes > self.max_frame_bytes {
            return Err(format!(
                "CHAT_HUB_MAX_BODY_BYTES ({}) must not exceed CHAT_HUB_MAX_FRAME_BYTES ({})",
                self.max_body_bytes, self.max_frame_bytes
            ));
        }
        if self.db_pool_size < self.db_threads as u32 + 1 {
            return Err(format!(
                "CHAT_HUB_DB_POOL_SIZE ({}) must be at least CHAT_HUB_DB_THREADS + 1 ({})",
                self.db_pool_size,
                self.db_threads + 1
            ));
        }
        if self.dev_login && !self.bind.ip().is_loopback() {
            return Err(format!(
                "CHAT_HUB_DEV_LOGIN=1 is refused with CHAT_HUB_BIND={}: the dev sign-in hands out tokens to anyone, \
                 so it needs a loopback address such as 127.0.0.1 or [::1]",
                self.bind
            ));
        }
        if let Some(u) = &self.redis_url {
            if !u.starts_with("redis://") && !u.starts_with("unix://") {
                return Err(format!(
                    "CHAT_HUB_REDIS_URL {u:?}: expected redis://host:port/ (or unix:///path/to/redis.sock)"
                ));
            }
        }
        for (name, v) in [
            ("CHAT_HUB_NODE_ID", &self.node_id),
            ("CHAT_HUB_REDIS_PREFIX", &self.redis_prefix),
        ] {
            let ok = (1..=64).contains(&v.len())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
            if !ok {
                return Err(format!(
                    "{name} {v:?}: use 1 to 64 letters, digits, '.', '_', '-' or ':'"
                ));
            }
        }
        if let Some(s) = &self.jwt_secret {
            if s.len() < 16 {
                return Err("CHAT_HUB_JWT_SECRET is too short: use at least 16 bytes (32 random bytes recommended)".into());
            }
        }
        if let Some(k) = &self.api_key {
            if k.len() < 16 {
                return Err("CHAT_HUB_API_KEY is too short: use at least 16 bytes".into());
            }
        }
        Ok(())
    }

    /// The client-token secret: the configured one, or for SQLite the one kept
    /// in `<database file>.secret` (created with mode 0600 on first use).
    pub fn resolve_jwt_secret(&mut self) -> Result<String, String> {
        if let Some(s) = &self.jwt_secret {
            return Ok(s.clone());
        }
        let secret = match &self.database {
            DatabaseUrl::Mysql(_) => {
                return Err("CHAT_HUB_JWT_SECRET is required with a MySQL/MariaDB DATABASE_URL (at least 16 bytes)".into())
            }
            DatabaseUrl::Sqlite(path) => secret_file(&secret_path(path))?,
        };
        self.jwt_secret = Some(secret.clone());
        Ok(secret)
    }
}

/// `<hostname>-<port>`: stable across restarts of one instance, distinct
/// between the instances of one host.
fn default_node_id(port: u16) -> String {
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(48)
        .collect();
    let host = if host.is_empty() {
        "node".to_string()
    } else {
        host
    };
    format!("{host}-{port}")
}

fn secret_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".secret");
    PathBuf::from(s)
}

fn secret_file(path: &Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 16 => return Ok(s.trim().to_string()),
        Ok(_) => {
            return Err(format!(
                "{}: the secret in it is shorter than 16 bytes",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for the secret: {e}"))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(secret.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    log::info!("generated a new client-token secret in {}", path.display());
    Ok(secret)
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn parse_file(path: &str, text: &str) -> Result<Vec<(&'static str, String)>, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("--config {path}: not valid TOML: {e}"))?;
    let mut out = Vec::new();
    for (k, v) in table {
        let Some(s) = SETTINGS.iter().find(|s| s.key == k) else {
            let keys: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
            return Err(format!(
                "--config {path}: unknown setting `{k}`; accepted: {}",
                keys.join(", ")
            ));
        };
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => if b { "1" } else { "0" }.to_string(),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    toml::Value::String(s) => Ok(s),
                    other => Err(format!(
                        "--config {path}: `{k}` must be a list of strings, found {other}"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => {
                return Err(format!(
                    "--config {path}: `{k}` has an unsupported value {other}"
                ))
            }
        };
        out.push((s.key, value));
    }
    Ok(out)
}

struct Getter<'a> {
    raw: &'a Raw,
}

impl Getter<'_> {
    fn setting(key: &str) -> &'static Setting {
        SETTINGS
            .iter()
            .find(|s| s.key == key)
            .unwrap_or(&SETTINGS[0])
    }

    fn value(&self, key: &str) -> (String, Option<String>) {
        let s = Self::setting(key);
        match self.raw.get(key) {
            Some((v, src)) => (v.clone(), Some(describe(s, src))),
            None => (s.default.to_string(), None),
        }
    }

    fn parse<T>(
        &mut self,
        key: &str,
        accepted: &str,
        f: impl Fn(&str) -> Option<T>,
    ) -> Result<T, String> {
        let (v, src) = self.value(key);
        f(v.trim()).ok_or_else(|| {
            let name = src.unwrap_or_else(|| Self::setting(key).env.to_string());
            format!("invalid {name}={v:?}: expected {accepted}")
        })
    }

    fn parse_with<T>(
        &mut self,
        key: &str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        let (v, src) = self.value(key);
        f(&v).map_err(|e| {
            let name = src.unwrap_or_else(|| Self::setting(key).env.to_string());
            format!("invalid {name}={v:?}: {e}")
        })
    }

    fn optional(&mut self, key: &str) -> Option<String> {
        let (v, _) = self.value(key);
        let v = v.trim().to_string();
        (!v.is_empty()).then_some(v)
    }

    fn list(&mut self, key: &str) -> Vec<String> {
        split_list(&self.value(key).0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::defaults();
        assert_eq!(c.bind, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.database, DatabaseUrl::Sqlite("chat-hub.db".into()));
        assert_eq!(
            (c.max_body_bytes, c.max_frame_bytes, c.max_bad_frames),
            (4096, 65536, 20)
        );
        assert_eq!((c.rate_per_sec, c.rate_burst), (20.0, 50));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.db_timeout, Duration::from_secs(5));
        assert!(!c.dev_login && c.api_key.is_none() && c.allowed_origins.is_empty());
    }

    #[test]
    fn file_overrides_env_and_flags_override_file() {
        let e = env(&[
            ("CHAT_HUB_MAX_BODY_BYTES", "100"),
            ("CHAT_HUB_RATE_BURST", "7"),
        ]);
        let file = "max_body_bytes = 200\nallowed_origins = [\"https://a\", \"https://b\"]\n";
        let flags: HashMap<&str, String> = [("max_body_bytes", "300".to_string())].into();
        let c = Config::from_sources(&e, Some(("f.toml", file)), &HashMap::new()).unwrap();
        assert_eq!((c.max_body_bytes, c.rate_burst), (200, 7));
        assert_eq!(c.allowed_origins, vec!["https://a", "https://b"]);
        let c = Config::from_sources(&e, Some(("f.toml", file)), &flags).unwrap();
        assert_eq!(c.max_body_bytes, 300);
    }

    #[test]
    fn bad_settings_name_themselves_and_their_accepted_values() {
        let err = Config::from_sources(
            &env(&[("CHAT_HUB_RATE_PER_SEC", "fast")]),
            None,
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(
            err.contains("CHAT_HUB_RATE_PER_SEC") && err.contains("greater than 0"),
            "{err}"
        );
        let err = Config::from_sources(
            &HashMap::new(),
            Some(("c.toml", "nope = 1")),
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(
            err.contains("unknown setting `nope`") && err.contains("max_body_bytes"),
            "{err}"
        );
        let err = Config::from_sources(
            &env(&[("DATABASE_URL", "postgres://x")]),
            None,
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(
            err.contains("DATABASE_URL") && err.contains("mysql://"),
            "{err}"
        );
        let e = env(&[
            ("CHAT_HUB_DEV_LOGIN", "1"),
            ("CHAT_HUB_BIND", "0.0.0.0:8080"),
        ]);
        let err = Config::from_sources(&e, None, &HashMap::new()).unwrap_err();
        assert!(
            err.contains("CHAT_HUB_DEV_LOGIN") && err.contains("loopback"),
            "{err}"
        );
        let err = Config::from_sources(
            &env(&[("CHAT_HUB_DEV_LOGIN", "yes please")]),
            None,
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(err.contains("1 (on) or 0 (off)"), "{err}");
    }

    #[test]
    fn database_urls_select_the_backend() {
        assert_eq!(
            DatabaseUrl::parse("sqlite:///tmp/x.db").unwrap(),
            DatabaseUrl::Sqlite("/tmp/x.db".into())
        );
        assert_eq!(
            DatabaseUrl::parse("data/chat.db").unwrap(),
            DatabaseUrl::Sqlite("data/chat.db".into())
        );
        if cfg!(feature = "mysql") {
            let u = DatabaseUrl::parse("mysql://root:pw@127.0.0.1:3306/chat").unwrap();
            assert_eq!(u.redacted(), "mysql://root:***@127.0.0.1:3306/chat");
        } else {
            assert!(DatabaseUrl::parse("mysql://root@h/db")
                .unwrap_err()
                .contains("--features mysql"));
        }
    }

    #[test]
    fn sqlite_secret_is_generated_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("chat.db");
        let mut c = Config::defaults();
        c.database = DatabaseUrl::Sqlite(db.clone());
        let s1 = c.clone().resolve_jwt_secret().unwrap();
        let s2 = c.resolve_jwt_secret().unwrap();
        assert_eq!(s1, s2);
        assert_eq!(s1.len(), 64);
        let mode = std::fs::metadata(dir.path().join("chat.db.secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
