//! `GET /ws`: authenticate (JWT in `?token=` or `Authorization: Bearer`),
//! check the Origin, then upgrade to a [`WsSession`].

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde::Deserialize;

use super::AppState;
use crate::error::ChatError;
use crate::hub::session::WsSession;

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The bearer token of a request, from the header or the query string.
pub fn bearer(req: &HttpRequest) -> Option<String> {
    if let Some(h) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
        let h = h.to_str().ok()?;
        let (scheme, token) = h.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    web::Query::<TokenQuery>::from_query(req.query_string())
        .ok()?
        .into_inner()
        .token
}

pub async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let token = bearer(&req).ok_or_else(|| ChatError::unauthorized("missing token"))?;
    let user = state
        .keys
        .verify(&token)
        .map_err(|e| ChatError::unauthorized(format!("invalid token: {e}")))?;
    if let Some(origin) = req.headers().get(actix_web::http::header::ORIGIN) {
        let allowed = &state.cfg.allowed_origins;
        let origin = origin.to_str().unwrap_or("");
        if !allowed.is_empty() && !allowed.iter().any(|a| a == origin) {
            return Err(ChatError::forbidden("origin not allowed").into());
        }
    }
    let session = WsSession::new(
        user,
        state.server.clone(),
        state.db.clone(),
        state.limits.clone(),
    );
    ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(state.limits.max_frame_bytes)
        .start()
}
