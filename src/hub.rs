//! The real-time core: one [`session::WsSession`] actor per WebSocket and the
//! one [`server::ChatServer`] actor that routes between them.

pub mod acks;
pub mod cluster;
mod lanes;
pub mod rate;
pub mod server;
pub mod session;
