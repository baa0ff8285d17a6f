//! chat-hub: a self-hosted real-time chat backend (WebSocket relay with durable,
//! ordered, multi-device delivery). The binary in `main.rs` is a thin shell over
//! [`app::run`]; integration tests drive the actors in [`hub`] and [`db`] directly.

#[cfg(not(any(feature = "sqlite", feature = "mysql")))]
compile_error!(
    "chat-hub needs at least one database backend: enable feature `sqlite` and/or `mysql`"
);

pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod db;
pub mod error;
pub mod http;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod protocol;

/// Current wall-clock time in Unix milliseconds (the unit of every time on the wire).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
