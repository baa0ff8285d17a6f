//! The error codes shared by WebSocket `error` frames and HTTP error bodies,
//! and [`ChatError`], the one error type of the request path.

use actix_web::http::StatusCode;
use serde::Serialize;

/// The `code` of an error frame or of an HTTP error body (PROTOCOL.md "Errors").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownType,
    TooLarge,
    Forbidden,
    NotFound,
    Conflict,
    RateLimited,
    Unavailable,
    Unauthorized,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest | ErrorCode::UnknownType => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether a frame answered with this code counts towards `max_bad_frames`:
    /// only errors about the client's malformed input do.
    pub fn is_bad_frame(self) -> bool {
        matches!(
            self,
            ErrorCode::BadRequest | ErrorCode::UnknownType | ErrorCode::TooLarge
        )
    }
}

/// An error answered to a client, over the WebSocket or HTTP.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ChatError {
    pub code: ErrorCode,
    pub message: String,
}

impl ChatError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ChatError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl actix_web::ResponseError for ChatError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }
    fn error_response(&self) -> actix_web::HttpResponse {
        actix_web::HttpResponse::build(self.status_code()).json(ErrorBody {
            code: self.code,
            message: &self.message,
        })
    }
}

/// Database failures map to the client-facing answers: a missing row is
/// `not_found`, everything the client cannot fix (connection lost, pool
/// timeout, lock timeout) is `unavailable` and is safe to retry.
impl From<diesel::result::Error> for ChatError {
    fn from(e: diesel::result::Error) -> Self {
        match e {
            diesel::result::Error::NotFound => ChatError::not_found("not found"),
            other => {
                log::warn!("database error: {other}");
                ChatError::unavailable(
                    "the database cannot take this now; nothing was stored, retry later",
                )
            }
        }
    }
}

impl From<r2d2::Error> for ChatError {
    fn from(e: r2d2::Error) -> Self {
        log::warn!("database pool: {e}");
        ChatError::unavailable("the database is not answering; nothing was stored, retry later")
    }
}
