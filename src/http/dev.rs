//! `POST /dev/token` (only with `CHAT_HUB_DEV_LOGIN=1`, loopback only): a
//! client token for any user name, to try chat-hub locally.

use actix_web::{web, HttpResponse};
use serde::Deserialize;

use super::AppState;
use crate::error::ChatError;
use crate::ids::UserId;

/// Who to sign in as.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct DevLogin {
    user: UserId,
}

/// A client token.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct DevToken {
    token: String,
}

#[utoipa::path(post, path = "/dev/token", tag = "dev", request_body = DevLogin, responses((status = 200, description = "a client token valid for 24 h", body = DevToken), (status = 400, description = "invalid user id", body = super::openapi::ErrorBody), (status = 404, description = "dev sign-in is off", body = super::openapi::ErrorBody)))]
pub async fn token(
    state: web::Data<AppState>,
    body: web::Json<DevLogin>,
) -> Result<HttpResponse, ChatError> {
    if !state.cfg.dev_login {
        return Err(ChatError::not_found(
            "dev sign-in is off (CHAT_HUB_DEV_LOGIN=1 turns it on)",
        ));
    }
    let token = state
        .keys
        .mint(&body.user, 86_400)
        .map_err(ChatError::unavailable)?;
    Ok(HttpResponse::Ok().json(DevToken { token }))
}
