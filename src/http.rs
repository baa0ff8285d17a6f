//! The HTTP side: the WebSocket upgrade, health and readiness, the server
//! API, the dev sign-in and the embedded web client. Routes are all in
//! [`routes`]; each resource lives in its own file.

pub mod access_log;
pub mod api;
pub mod dev;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod web;
pub mod ws;

use std::sync::Arc;

use actix::Addr;
use actix_web::web as aw;

use crate::auth::TokenKeys;
use crate::config::Config;
use crate::db::{DbExecutor, Pool};
use crate::error::ChatError;
use crate::hub::server::ChatServer;
use crate::hub::session::SessionLimits;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<Config>,
    pub keys: TokenKeys,
    pub server: Addr<ChatServer>,
    pub db: Addr<DbExecutor>,
    pub pool: Pool,
    pub limits: Arc<SessionLimits>,
}

/// Every route of chat-hub.
pub fn routes(cfg: &mut aw::ServiceConfig) {
    cfg.service(aw::resource("/ws").route(aw::get().to(ws::upgrade)))
        .service(aw::resource("/healthz").route(aw::get().to(health::healthz)))
        .service(aw::resource("/readyz").route(aw::get().to(health::readyz)))
        .service(aw::resource("/metrics").route(aw::get().to(metrics::metrics)))
        .service(aw::resource("/dev/token").route(aw::post().to(dev::token)))
        .service(
            aw::scope("/api")
                .service(aw::resource("/groups").route(aw::post().to(api::create_group)))
                .service(aw::resource("/groups/{group}").route(aw::get().to(api::get_group)))
                .service(
                    aw::resource("/groups/{group}/members/{user}")
                        .route(aw::put().to(api::add_member))
                        .route(aw::delete().to(api::remove_member)),
                )
                .service(aw::resource("/messages").route(aw::post().to(api::publish)))
                .service(aw::resource("/openapi.json").route(aw::get().to(openapi::openapi_json)))
                .service(
                    aw::resource("/users/{user}/disconnect")
                        .route(aw::post().to(api::disconnect_user)),
                ),
        )
        .service(aw::resource("/").route(aw::get().to(web::index)))
        .service(aw::resource("/app.js").route(aw::get().to(web::app_js)))
        .service(aw::resource("/style.css").route(aw::get().to(web::style_css)))
        .default_service(aw::to(not_found));
}

async fn not_found() -> Result<actix_web::HttpResponse, ChatError> {
    Err(ChatError::not_found("no such endpoint"))
}

/// JSON bodies that fail to parse answer `bad_request` in the contract's shape;
/// bodies over the limit answer `too_large`.
pub fn json_config(limit: usize) -> aw::JsonConfig {
    aw::JsonConfig::default()
        .limit(limit)
        .error_handler(|err, _| {
            let e = match &err {
                actix_web::error::JsonPayloadError::OverflowKnownLength { .. }
                | actix_web::error::JsonPayloadError::Overflow { .. } => {
                    ChatError::new(crate::error::ErrorCode::TooLarge, err.to_string())
                }
                _ => ChatError::bad_request(err.to_string()),
            };
            e.into()
        })
}
