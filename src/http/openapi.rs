//! The OpenAPI 3 description of the HTTP API, generated from the handlers'
//! annotations (utoipa) and served at `GET /api/openapi.json`.

use actix_web::HttpResponse;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::{api, dev, health, metrics};
use crate::ids::{GroupId, Target, UserId, MAX_ID_LEN};

const ID_PATTERN: &str = "^[A-Za-z0-9_.@-]{1,64}$";

fn id_schema(what: &str) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(ID_PATTERN))
        .max_length(Some(MAX_ID_LEN))
        .description(Some(format!("a {what} id")))
        .into()
}

impl PartialSchema for UserId {
    fn schema() -> RefOr<Schema> {
        id_schema("user").into()
    }
}
impl ToSchema for UserId {}

impl PartialSchema for GroupId {
    fn schema() -> RefOr<Schema> {
        id_schema("group").into()
    }
}
impl ToSchema for GroupId {}

impl PartialSchema for Target {
    fn schema() -> RefOr<Schema> {
        let one = |key: &str, what: &str| {
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property(key, id_schema(what))
                .required(key)
        };
        OneOfBuilder::new()
            .item(one("user", "user"))
            .item(one("group", "group"))
            .into()
    }
}
impl ToSchema for Target {}

/// The body of every HTTP error.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// `bad_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `too_large`, `rate_limited` or `unavailable`.
    code: String,
    message: String,
}

struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "chat-hub HTTP API", description = "Server API for the application's backend, health, metrics and the dev sign-in. The WebSocket protocol at /ws is described in docs/PROTOCOL.md."),
    paths(
        api::create_group,
        api::get_group,
        api::add_member,
        api::remove_member,
        api::publish,
        api::disconnect_user,
        health::healthz,
        health::readyz,
        metrics::metrics,
        dev::token,
        openapi_json,
    ),
    components(schemas(ErrorBody, crate::protocol::GroupView, api::CreateGroup, api::Publish, api::Published, api::Disconnected, dev::DevLogin, dev::DevToken)),
    modifiers(&BearerKey)
)]
pub struct ApiDoc;

/// `GET /api/openapi.json`.
#[utoipa::path(get, path = "/api/openapi.json", tag = "meta", responses((status = 200, description = "This document")))]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}
