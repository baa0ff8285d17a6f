//! Every frame of the wire protocol (PROTOCOL.md, version 1): what clients send
//! ([`ClientFrame`], parsed by [`parse_client_frame`]) and what the server sends
//! ([`ServerFrame`], serialised once by [`ServerFrame::to_text`]).

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ChatError, ErrorCode};
use crate::ids::{ConvKey, GroupId, Target, UserId};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest `ref` and `client_id`, in characters.
pub const MAX_REF_CHARS: usize = 64;
/// Largest `seq` the protocol allows (below 2^53, safe in JavaScript).
pub const MAX_SEQ: u64 = (1 << 53) - 1;
pub const MAX_HISTORY_LIMIT: u32 = 200;
pub const DEFAULT_HISTORY_LIMIT: u32 = 50;
/// Longest group name, in characters.
pub const MAX_GROUP_NAME_CHARS: usize = 128;
/// Most members a group can have (a bound on what one client can make the server fan out to).
pub const MAX_GROUP_MEMBERS: usize = 10_000;

const CLIENT_TYPES: &[&str] = &[
    "send",
    "ack",
    "history",
    "typing",
    "ping",
    "group_create",
    "group_add",
    "group_remove",
    "group_leave",
    "groups",
];

/// A frame from a client, after validation of every field.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Send {
        to: Target,
        body: String,
        #[serde(default)]
        client_id: Option<String>,
    },
    Ack {
        conv: ConvKey,
        seq: u64,
    },
    History {
        conv: ConvKey,
        #[serde(default)]
        before_seq: Option<u64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Typing {
        to: Target,
    },
    Ping,
    GroupCreate {
        group: GroupId,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        members: Vec<UserId>,
    },
    GroupAdd {
        group: GroupId,
        user: UserId,
    },
    GroupRemove {
        group: GroupId,
        user: UserId,
    },
    GroupLeave {
        group: GroupId,
    },
    Groups,
}

/// A parsed client frame with the `ref` to echo.
#[derive(Clone, Debug, PartialEq)]
pub struct Inbound {
    pub r#ref: Option<String>,
    pub frame: ClientFrame,
}

/// A frame that could not be accepted: the error to answer and the `ref` to echo.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    pub r#ref: Option<String>,
    pub error: ChatError,
}

/// Parse and validate one text frame. `max_body_bytes` bounds `send` bodies
/// (`too_large`); everything else malformed is `bad_request` or `unknown_type`.
pub fn parse_client_frame(text: &str, max_body_bytes: usize) -> Result<Inbound, Rejected> {
    let reject = |r#ref: Option<String>, error: ChatError| Rejected { r#ref, error };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| reject(None, ChatError::bad_request(format!("not JSON: {e}"))))?;
    let Value::Object(map) = &value else {
        return Err(reject(
            None,
            ChatError::bad_request("a frame must be a JSON object"),
        ));
    };
    let r#ref = match map.get("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_REF_CHARS => Some(s.clone()),
        Some(_) => {
            return Err(reject(
                None,
                ChatError::bad_request("`ref` must be a string of at most 64 characters"),
            ))
        }
    };
    let ty = match map.get("type") {
        Some(Value::String(t)) => t.clone(),
        _ => return Err(reject(r#ref, ChatError::bad_request("missing `type`"))),
    };
    if !CLIENT_TYPES.contains(&ty.as_str()) {
        let msg = format!("unknown type {:?}", ty.chars().take(64).collect::<String>());
        return Err(reject(r#ref, ChatError::new(ErrorCode::UnknownType, msg)));
    }
    let frame = match ClientFrame::deserialize(value) {
        Ok(f) => f,
        Err(e) => {
            return Err(reject(
                r#ref,
                ChatError::bad_request(format!("malformed {ty}: {e}")),
            ))
        }
    };
    match validate(&frame, max_body_bytes) {
        Ok(()) => Ok(Inbound { r#ref, frame }),
        Err(error) => Err(reject(r#ref, error)),
    }
}

fn validate(frame: &ClientFrame, max_body_bytes: usize) -> Result<(), ChatError> {
    match frame {
        ClientFrame::Send {
            body, client_id, ..
        } => {
            if body.is_empty() {
                return Err(ChatError::bad_request("`body` must not be empty"));
            }
            if body.len() > max_body_bytes {
                return Err(ChatError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "body is {} bytes, the limit is {max_body_bytes}",
                        body.len()
                    ),
                ));
            }
            if let Some(c) = client_id {
                if c.is_empty() || c.chars().count() > MAX_REF_CHARS {
                    return Err(ChatError::bad_request(
                        "`client_id` must be 1 to 64 characters",
                    ));
                }
            }
        }
        ClientFrame::Ack { seq, .. } if *seq > MAX_SEQ => {
            return Err(ChatError::bad_request("`seq` out of range"))
        }
        ClientFrame::History {
            before_seq, limit, ..
        } => {
            if matches!(limit, Some(l) if !(1..=MAX_HISTORY_LIMIT).contains(l)) {
                return Err(ChatError::bad_request("`limit` must be 1..=200"));
            }
            if matches!(before_seq, Some(s) if *s > MAX_SEQ + 1) {
                return Err(ChatError::bad_request("`before_seq` out of range"));
            }
        }
        ClientFrame::GroupCreate { name, members, .. } => {
            validate_group_name(name.as_deref())?;
            if members.len() >= MAX_GROUP_MEMBERS {
                return Err(ChatError::bad_request(format!(
                    "a group has at most {MAX_GROUP_MEMBERS} members"
                )));
            }
        }
        _ => {}
    }
    Ok(())
}

/// A group name is optional (it defaults to the group id) and at most 128 characters.
pub fn validate_group_name(name: Option<&str>) -> Result<(), ChatError> {
    match name {
        Some(n) if n.trim().is_empty() || n.chars().count() > MAX_GROUP_NAME_CHARS => {
            Err(ChatError::bad_request("`name` must be 1 to 128 characters"))
        }
        _ => Ok(()),
    }
}

/// A stored message as clients see it (`message` frames and `history` pages).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub conv: String,
    pub seq: i64,
    pub from: String,
    pub to: Target,
    pub body: String,
    pub ts: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_id: Option<String>,
}

/// A group as listed by `groups` and the server API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupView {
    pub group: String,
    pub name: String,
    pub owner: String,
    pub members: Vec<String>,
}

/// What happened to a group; `by` is `None` (JSON null) for the server API.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GroupEvent {
    Created {
        group: String,
        name: String,
        owner: String,
        members: Vec<String>,
        by: Option<String>,
    },
    Added {
        group: String,
        user: String,
        by: Option<String>,
    },
    Removed {
        group: String,
        user: String,
        by: Option<String>,
    },
    Left {
        group: String,
        user: String,
        by: Option<String>,
    },
}

/// Every frame the server sends.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        user: &'a str,
        session: &'a str,
        server_time: i64,
        protocol: u32,
    },
    Synced,
    Sent {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        conv: &'a str,
        seq: i64,
        ts: i64,
    },
    Message(&'a MessageView),
    History {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<&'a str>,
        conv: &'a str,
        messages: &'a [MessageView],
        more: bool,
    },
    Typing {
        conv: &'a str,
        from: &'a str,
    },
    Presence {
        user: &'a str,
        online: bool,
    },
    Group {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<&'a str>,
        #[serde(flatten)]
        event: &'a GroupEvent,
    },
    Groups {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<&'a str>,
        groups: &'a [GroupView],
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<&'a str>,
    },
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    /// Serialise once; the same bytes go to every session that gets the frame.
    pub fn to_text(&self) -> ByteString {
        // Serialising these plain structs cannot fail (string keys, no maps with non-string keys).
        ByteString::from(serde_json::to_string(self).unwrap_or_default())
    }

    pub fn error(r#ref: Option<&str>, e: &ChatError) -> ByteString {
        ServerFrame::Error {
            r#ref,
            code: e.code,
            message: &e.message,
        }
        .to_text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> (Option<String>, ErrorCode) {
        let r = parse_client_frame(text, 10).unwrap_err();
        (r.r#ref, r.error.code)
    }

    #[test]
    fn parses_every_client_frame() {
        let f = parse_client_frame(r#"{"type":"send","to":{"user":"bob"},"body":"hi","client_id":"c-1","ref":"r1","from":"x"}"#, 10).unwrap();
        assert_eq!(f.r#ref.as_deref(), Some("r1"));
        assert!(matches!(
            f.frame,
            ClientFrame::Send {
                to: Target::User(_),
                ..
            }
        ));
        for t in [
            r#"{"type":"ack","conv":"dm:a:b","seq":4}"#,
            r#"{"type":"history","conv":"group:t"}"#,
            r#"{"type":"typing","to":{"group":"t"}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"group_create","group":"t","name":"T","members":["b"]}"#,
            r#"{"type":"group_add","group":"t","user":"d"}"#,
            r#"{"type":"group_remove","group":"t","user":"d"}"#,
            r#"{"type":"group_leave","group":"t"}"#,
            r#"{"type":"groups"}"#,
        ] {
            assert!(parse_client_frame(t, 10).is_ok(), "{t}");
        }
    }

    #[test]
    fn rejects_bad_frames_with_the_right_code_and_ref() {
        assert_eq!(code("nope"), (None, ErrorCode::BadRequest));
        assert_eq!(
            code(r#"{"type":"fly","ref":"r"}"#),
            (Some("r".into()), ErrorCode::UnknownType)
        );
        assert_eq!(
            code(r#"{"type":"send","ref":"r","to":{"user":"b"},"body":""}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"send","to":{"user":"b"},"body":"01234567890"}"#).1,
            ErrorCode::TooLarge
        );
        assert_eq!(
            code(r#"{"type":"send","to":{"user":"b c"},"body":"x"}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"ack","conv":"dm:b:a","seq":1}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"history","conv":"group:t","limit":201}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"history","conv":"group:t","limit":0}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"ref":"x"}"#),
            (Some("x".into()), ErrorCode::BadRequest)
        );
        assert_eq!(
            code(r#"{"type":"send","to":{"user":"a","group":"b"},"body":"x"}"#).1,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn server_frames_serialise_as_the_contract_shows() {
        let ev = GroupEvent::Added {
            group: "t".into(),
            user: "d".into(),
            by: None,
        };
        let text = ServerFrame::Group {
            r#ref: None,
            event: &ev,
        }
        .to_text();
        assert_eq!(
            &*text,
            r#"{"type":"group","event":"added","group":"t","user":"d","by":null}"#
        );
        let text = ServerFrame::Sent {
            r#ref: Some("r"),
            client_id: None,
            conv: "dm:a:b",
            seq: 3,
            ts: 9,
        }
        .to_text();
        assert_eq!(
            &*text,
            r#"{"type":"sent","ref":"r","conv":"dm:a:b","seq":3,"ts":9}"#
        );
    }
}
