//! The server API for the application's own backend, guarded by the API key
//! (`Authorization: Bearer <key>`, compared in constant time). It acts with
//! the backend's authority (`by: null` in group events) and its effects reach
//! online users exactly as if made over the WebSocket.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use super::AppState;
use crate::db::executor::{GetGroup, GroupOp};
use crate::error::{ChatError, ErrorCode};
use crate::hub::server::{submit, ChangeGroup, ClientSend, DisconnectUser, Reply};
use crate::ids::{GroupId, Target, UserId};
use crate::protocol::{validate_group_name, MAX_GROUP_MEMBERS, MAX_REF_CHARS};

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ChatError> {
    let Some(key) = state.cfg.api_key.as_deref() else {
        return Err(ChatError::unauthorized(
            "the server API is off: CHAT_HUB_API_KEY is not set",
        ));
    };
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, k)| k.trim())
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        Ok(())
    } else {
        Err(ChatError::unauthorized("missing or wrong API key"))
    }
}

fn parse_group(s: &str) -> Result<GroupId, ChatError> {
    GroupId::parse(s).map_err(ChatError::bad_request)
}

fn parse_user(s: &str) -> Result<UserId, ChatError> {
    UserId::parse(s).map_err(ChatError::bad_request)
}

async fn change(state: &AppState, op: GroupOp) -> Result<crate::protocol::GroupView, ChatError> {
    let (tx, rx) = oneshot::channel();
    submit(
        &state.server,
        ChangeGroup {
            by: None,
            op,
            reply: Reply::Api(tx),
        },
    );
    rx.await
        .unwrap_or_else(|_| Err(ChatError::unavailable("the server is shutting down")))
}

/// A group to create; the owner is always a member.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct CreateGroup {
    group: GroupId,
    #[serde(default)]
    name: Option<String>,
    owner: UserId,
    #[serde(default)]
    members: Vec<UserId>,
}

/// `POST /api/groups` → 201 with the group.
#[utoipa::path(post, path = "/api/groups", tag = "groups", request_body = CreateGroup, security(("api_key" = [])), responses((status = 201, description = "created; online members get the `created` event", body = crate::protocol::GroupView), (status = 409, description = "the group exists", body = super::openapi::ErrorBody), (status = 413, description = "body too large", body = super::openapi::ErrorBody), (status = 400, description = "malformed request or id", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong API key", body = super::openapi::ErrorBody), (status = 503, description = "the database cannot take it now", body = super::openapi::ErrorBody)))]
pub async fn create_group(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<CreateGroup>,
) -> Result<HttpResponse, ChatError> {
    authorize(&req, &state)?;
    let CreateGroup {
        group,
        name,
        owner,
        members,
    } = body.into_inner();
    validate_group_name(name.as_deref())?;
    if members.len() >= MAX_GROUP_MEMBERS {
        return Err(ChatError::bad_request(format!(
            "a group has at most {MAX_GROUP_MEMBERS} members"
        )));
    }
    let name = name.unwrap_or_else(|| group.to_string());
    let view = change(
        &state,
        GroupOp::Create {
            group,
            name,
            owner,
            members,
        },
    )
    .await?;
    Ok(HttpResponse::Created().json(view))
}

/// `GET /api/groups/{group}` → the group.
#[utoipa::path(get, path = "/api/groups/{group}", tag = "groups", params(("group" = String, Path, description = "group id")), security(("api_key" = [])), responses((status = 200, body = crate::protocol::GroupView), (status = 404, description = "no such group", body = super::openapi::ErrorBody), (status = 400, description = "malformed request or id", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong API key", body = super::openapi::ErrorBody), (status = 503, description = "the database cannot take it now", body = super::openapi::ErrorBody)))]
pub async fn get_group(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ChatError> {
    authorize(&req, &state)?;
    let group = parse_group(&path)?;
    let view = state
        .db
        .send(GetGroup(group))
        .await
        .map_err(|e| ChatError::unavailable(e.to_string()))??;
    Ok(HttpResponse::Ok().json(view))
}

/// `PUT /api/groups/{group}/members/{user}` → 204.
#[utoipa::path(put, path = "/api/groups/{group}/members/{user}", tag = "groups", params(("group" = String, Path, description = "group id"), ("user" = String, Path, description = "user id")), security(("api_key" = [])), responses((status = 204, description = "added; members get the `added` event"), (status = 404, description = "no such group", body = super::openapi::ErrorBody), (status = 409, description = "already a member", body = super::openapi::ErrorBody), (status = 400, description = "malformed request or id", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong API key", body = super::openapi::ErrorBody), (status = 503, description = "the database cannot take it now", body = super::openapi::ErrorBody)))]
pub async fn add_member(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ChatError> {
    authorize(&req, &state)?;
    let (group, user) = (parse_group(&path.0)?, parse_user(&path.1)?);
    change(&state, GroupOp::Add { group, user }).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `DELETE /api/groups/{group}/members/{user}` → 204.
#[utoipa::path(delete, path = "/api/groups/{group}/members/{user}", tag = "groups", params(("group" = String, Path, description = "group id"), ("user" = String, Path, description = "user id")), security(("api_key" = [])), responses((status = 204, description = "removed; members and the user get the `removed` event"), (status = 403, description = "the owner cannot be removed", body = super::openapi::ErrorBody), (status = 404, description = "no such group, or not a member", body = super::openapi::ErrorBody), (status = 400, description = "malformed request or id", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong API key", body = super::openapi::ErrorBody), (status = 503, description = "the database cannot take it now", body = super::openapi::ErrorBody)))]
pub async fn remove_member(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ChatError> {
    authorize(&req, &state)?;
    let (group, user) = (parse_group(&path.0)?, parse_user(&path.1)?);
    change(&state, GroupOp::Remove { group, user }).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A message to store and deliver as if `from` had sent it.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct Publish {
    from: UserId,
    to: Target,
    body: String,
    #[serde(default)]
    client_id: Option<String>,
}

/// `POST /api/messages` → 201 `{"conv":..,"seq":..}`, stored and delivered as if `from` had sent it.
#[utoipa::path(post, path = "/api/messages", tag = "messages", request_body = Publish, security(("api_key" = [])), responses((status = 201, description = "stored and delivered", body = Published), (status = 403, description = "`from` is not a member of the group", body = super::openapi::ErrorBody), (status = 404, description = "no such group", body = super::openapi::ErrorBody), (status = 413, description = "body over max_body_bytes", body = super::openapi::ErrorBody), (status = 400, description = "malformed request or id", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong API key", body = super::openapi::ErrorBody), (status = 503, description = "the database cannot take it now", body = super::openapi::ErrorBody)))]
pub async fn publish(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Publish>,
) -> Result<HttpResponse, ChatError> {
    authorize(&req, &state)?;
    let Publish {
        from,
        to,
        body,
        client_id,
    } = body.into_inner();
    if body.is_empty() {
        return Err(ChatError::bad_request("`body` must not be empty"));
    }
    if body.len() > state.cfg.max_body_bytes {
        return Err(ChatError::new(
            ErrorCode::TooLarge,
            format!(
                "body is {} bytes, the limit is {}",
                body.len(),
                state.cfg.max_body_bytes
            ),
        ));
    }
    if client_id
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.chars().count() > MAX_REF_CHARS)
    {
        return Err(ChatError::bad_request(
            "`client_id` must be 1 to 64 characters",
        ));
    }
    let (tx, rx) = oneshot::channel();
    submit(
        &state.server,
        ClientSend {
            sender: from,
            to,
            body,
            client_id,
            reply: Reply::Api(tx),
        },
    );
    let stored = rx
        .await
        .unwrap_or_else(|_| Err(ChatError::unavailable("the server is shutting down")))?;
    Ok(HttpResponse::Created().json(Published {
        conv: stored.conv.to_string(),
        seq: stored.seq,
        ts: stored.ts,
    }))
}

/// `POST /api/users/{user}/disconnect` → 200 `{"closed": n}`: every open
/// session of the user is closed with code 4001.
#[utoipa::path(post, path = "/api/users/{user}/disconnect", tag = "users", params(("user" = String, Path, description = "user id")), security(("api_key" = [])), responses((status = 200, description = "every open session of the user was closed with code 4001", body = Disconnected), (status = 400, description = "malformed request or id", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong API key", body = super::openapi::ErrorBody), (status = 503, description = "the database cannot take it now", body = super::openapi::ErrorBody)))]
pub async fn disconnect_user(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ChatError> {
    authorize(&req, &state)?;
    let user = parse_user(&path)?;
    let n = state
        .server
        .send(DisconnectUser {
            user,
            reason: "disconnected by the server".into(),
        })
        .await
        .map_err(|e| ChatError::unavailable(e.to_string()))?;
    Ok(HttpResponse::Ok().json(Disconnected { closed: n }))
}

/// Where a published message was stored.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Published {
    pub conv: String,
    pub seq: i64,
    pub ts: i64,
}

/// How many sessions were closed.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Disconnected {
    pub closed: usize,
}
