//! `POST /dev/token` (only with `CHAT_HUB_DEV_LOGIN=1`, loopback only): a
//! client token for any user name, to try chat-hub locally.

use actix_web::{web, HttpResponse};
use serde::Deserialize;

use super::AppState;
use crate::error::ChatError;
use crate::ids::UserId;

#[derive(Deserialize)]
pub struct DevLogin {
    user: UserId,
}

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
    Ok(HttpResponse::Ok().json(serde_json::json!({ "token": token })))
}
