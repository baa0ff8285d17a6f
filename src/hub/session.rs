//! WsSession: one actor per WebSocket connection. Frames in (parsed, bounded,
//! dispatched to the ChatServer or the DbExecutor), events out, heartbeat,
//! and the connect-time sync: backlog first, live messages held back per
//! conversation until the backlog is out, then `synced`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws;
use bytestring::ByteString;
use uuid::Uuid;

use super::acks::AckRequest;
use super::server::{self, close, ChatServer, Reply, SessionEvent, SessionId};
use crate::config::Config;
use crate::db::executor::{self as dbx, BacklogPage, DbExecutor, GroupOp};
use crate::error::ChatError;
use crate::ids::UserId;
use crate::metrics::METRICS;
use crate::protocol::{self, ClientFrame, Inbound, ServerFrame, DEFAULT_HISTORY_LIMIT};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A fresh session id (a process-wide counter).
pub fn next_session_id() -> SessionId {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// The limits a session enforces, from [`Config`].
#[derive(Clone, Debug)]
pub struct SessionLimits {
    pub max_body_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_bad_frames: u32,
    pub heartbeat_timeout: Duration,
    pub queue: usize,
    pub backlog_page: i64,
    /// Typing frames a session may send per second; more are dropped silently.
    pub typing_per_sec: u32,
}

impl SessionLimits {
    pub fn from_config(c: &Config) -> Self {
        SessionLimits {
            max_body_bytes: c.max_body_bytes,
            max_frame_bytes: c.max_frame_bytes,
            max_bad_frames: c.max_bad_frames,
            heartbeat_timeout: c.heartbeat_timeout,
            queue: c.session_queue,
            backlog_page: 2000,
            typing_per_sec: 5,
        }
    }
}

/// While syncing: live messages held back, and the highest seq the backlog
/// sent per conversation (live copies at or below it are duplicates).
#[derive(Default)]
struct Sync {
    held: VecDeque<(Arc<str>, i64, ByteString)>,
    sent: HashMap<String, i64>,
}

pub struct WsSession {
    id: SessionId,
    uuid: Uuid,
    user: UserId,
    server: Addr<ChatServer>,
    db: Addr<DbExecutor>,
    limits: Arc<SessionLimits>,
    last_heard: Instant,
    bad_in_row: u32,
    /// A text message being reassembled from continuation frames.
    fragments: Option<Vec<u8>>,
    sync: Option<Sync>,
    typing_window: (Instant, u32),
}

impl WsSession {
    pub fn new(
        user: UserId,
        server: Addr<ChatServer>,
        db: Addr<DbExecutor>,
        limits: Arc<SessionLimits>,
    ) -> Self {
        WsSession {
            id: next_session_id(),
            uuid: Uuid::now_v7(),
            user,
            server,
            db,
            limits,
            last_heard: Instant::now(),
            bad_in_row: 0,
            fragments: None,
            sync: Some(Sync::default()),
            typing_window: (Instant::now(), 0),
        }
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: u16, reason: &str) {
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(code),
            description: Some(reason.to_string()),
        }));
        ctx.stop();
    }

    fn send_error(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        r#ref: Option<&str>,
        e: &ChatError,
    ) {
        METRICS.rejected.with_label_values(&[e.code.as_str()]).inc();
        ctx.text(ServerFrame::error(r#ref, e));
        if e.code.is_bad_frame() {
            self.count_bad_frame(ctx);
        }
    }

    fn change_group(&self, op: GroupOp, r#ref: Option<String>) {
        let by = Some(self.user.clone());
        server::submit(
            &self.server,
            server::ChangeGroup {
                by,
                op,
                reply: reply(self.id, &r#ref),
            },
        );
    }

    fn count_bad_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        self.bad_in_row += 1;
        if self.bad_in_row > self.limits.max_bad_frames {
            self.close(ctx, close::POLICY, "too many bad frames in a row");
        }
    }

    /// Load the next backlog page; at the end, release what was held and send `synced`.
    fn load_backlog(&mut self, after: Option<(String, i64)>, ctx: &mut ws::WebsocketContext<Self>) {
        let req = dbx::LoadBacklog {
            user: self.user.clone(),
            after: after.clone(),
            limit: self.limits.backlog_page,
        };
        self.db
            .send(req)
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                Ok(Ok(page)) => act.backlog_page(page, ctx),
                Ok(Err(e)) => act.backlog_failed(after, e.to_string(), ctx),
                Err(e) => act.backlog_failed(after, e.to_string(), ctx),
            })
            .spawn(ctx);
    }

    fn backlog_page(&mut self, page: BacklogPage, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(sync) = self.sync.as_mut() else {
            return;
        };
        for item in page.items {
            ctx.text(item.frame);
            METRICS.backlog_sent.inc();
            sync.sent.insert(item.conv, item.seq);
        }
        if page.next.is_some() {
            return self.load_backlog(page.next, ctx);
        }
        if let Some(sync) = self.sync.take() {
            METRICS.sessions.with_label_values(&["syncing"]).dec();
            METRICS.sessions.with_label_values(&["live"]).inc();
            for (conv, seq, frame) in sync.held {
                if sync.sent.get(&*conv).is_none_or(|s| seq > *s) {
                    ctx.text(frame);
                }
            }
        }
        ctx.text(ServerFrame::Synced.to_text());
    }

    /// The database could not give the backlog: try again shortly (the
    /// client waits for `synced`; live messages stay held meanwhile).
    fn backlog_failed(
        &mut self,
        after: Option<(String, i64)>,
        why: String,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        log::warn!("backlog of {} not loaded ({why}); retrying", self.user);
        ctx.run_later(Duration::from_secs(1), move |act, ctx| {
            act.load_backlog(after, ctx)
        });
    }

    fn handle_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let Inbound { r#ref, frame } =
            match protocol::parse_client_frame(text, self.limits.max_body_bytes) {
                Ok(i) => i,
                Err(rej) => return self.send_error(ctx, rej.r#ref.as_deref(), &rej.error),
            };
        // An ack counts as good or bad once the database has judged it.
        if !matches!(frame, ClientFrame::Ack { .. }) {
            self.bad_in_row = 0;
        }
        let id = self.id;
        match frame {
            ClientFrame::Send {
                to,
                body,
                client_id,
            } => {
                server::submit(
                    &self.server,
                    server::ClientSend {
                        sender: self.user.clone(),
                        to,
                        body,
                        client_id,
                        reply: reply(id, &r#ref),
                    },
                );
            }
            ClientFrame::Ack { conv, seq } => {
                server::submit(
                    &self.server,
                    AckRequest {
                        session: self.id,
                        user: self.user.clone(),
                        conv,
                        seq: seq as i64,
                        r#ref,
                    },
                );
            }
            ClientFrame::History {
                conv,
                before_seq,
                limit,
            } => {
                let req = dbx::History {
                    user: self.user.clone(),
                    conv: conv.clone(),
                    before_seq: before_seq.map(|s| s as i64),
                    limit: limit.unwrap_or(DEFAULT_HISTORY_LIMIT) as i64,
                };
                self.db
                    .send(req)
                    .into_actor(self)
                    .map(move |res, act, ctx| {
                        match res.unwrap_or_else(|e| Err(ChatError::unavailable(e.to_string()))) {
                            Ok(page) => {
                                let conv = conv.to_string();
                                let f = ServerFrame::History {
                                    r#ref: r#ref.as_deref(),
                                    conv: &conv,
                                    messages: &page.messages,
                                    more: page.more,
                                };
                                ctx.text(f.to_text());
                            }
                            Err(e) => act.send_error(ctx, r#ref.as_deref(), &e),
                        }
                    })
                    .spawn(ctx);
            }
            ClientFrame::Typing { to } => {
                let now = Instant::now();
                if now.duration_since(self.typing_window.0) >= Duration::from_secs(1) {
                    self.typing_window = (now, 0);
                }
                self.typing_window.1 += 1;
                if self.typing_window.1 <= self.limits.typing_per_sec {
                    server::submit(
                        &self.server,
                        server::Typing {
                            session: self.id,
                            user: self.user.clone(),
                            to,
                            r#ref,
                        },
                    );
                }
            }
            ClientFrame::Ping => ctx.text(
                ServerFrame::Pong {
                    r#ref: r#ref.as_deref(),
                }
                .to_text(),
            ),
            ClientFrame::GroupCreate {
                group,
                name,
                members,
            } => {
                let name = name.unwrap_or_else(|| group.to_string());
                let owner = self.user.clone();
                self.change_group(
                    GroupOp::Create {
                        group,
                        name,
                        owner,
                        members,
                    },
                    r#ref,
                );
            }
            ClientFrame::GroupAdd { group, user } => {
                self.change_group(GroupOp::Add { group, user }, r#ref)
            }
            ClientFrame::GroupRemove { group, user } => {
                self.change_group(GroupOp::Remove { group, user }, r#ref)
            }
            ClientFrame::GroupLeave { group } => self.change_group(GroupOp::Leave { group }, r#ref),
            ClientFrame::Groups => {
                server::submit(
                    &self.server,
                    server::ListGroups {
                        session: self.id,
                        user: self.user.clone(),
                        r#ref,
                    },
                );
            }
        }
    }
}

fn reply<T>(id: SessionId, r#ref: &Option<String>) -> Reply<T> {
    Reply::Session {
        id,
        r#ref: r#ref.clone(),
    }
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        METRICS.connections.inc();
        METRICS.sessions.with_label_values(&["syncing"]).inc();
        ctx.set_mailbox_capacity(self.limits.queue);
        let welcome = ServerFrame::Welcome {
            user: self.user.as_str(),
            session: &self.uuid.to_string(),
            server_time: crate::now_ms(),
            protocol: protocol::PROTOCOL_VERSION,
        }
        .to_text();
        ctx.text(welcome);
        let every = self.limits.heartbeat_timeout / 3;
        ctx.run_interval(every, |act, ctx| {
            if act.last_heard.elapsed() > act.limits.heartbeat_timeout {
                log::debug!("session {} of {}: heartbeat timeout", act.id, act.user);
                act.close(ctx, close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
            } else {
                ctx.ping(b"");
            }
        });
        // Register first, then load the backlog: a message stored in between
        // is then either in the backlog or delivered live (or both), never lost.
        let connect = server::Connect {
            id: self.id,
            user: self.user.clone(),
            session: ctx.address().recipient(),
        };
        self.server
            .send(connect)
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(true) => act.load_backlog(None, ctx),
                _ => ctx.stop(),
            })
            .spawn(ctx);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        METRICS.connections.dec();
        let state = if self.sync.is_some() {
            "syncing"
        } else {
            "live"
        };
        METRICS.sessions.with_label_values(&[state]).dec();
        self.server.do_send(server::Disconnect { id: self.id });
        Running::Stop
    }
}

impl Handler<SessionEvent> for WsSession {
    type Result = ();

    fn handle(&mut self, ev: SessionEvent, ctx: &mut Self::Context) {
        match ev {
            SessionEvent::Message { conv, seq, frame } => match self.sync.as_mut() {
                Some(sync) if sync.held.len() >= self.limits.queue => {
                    self.close(
                        ctx,
                        close::TRY_AGAIN_LATER,
                        "too many live messages while syncing",
                    );
                }
                Some(sync) => sync.held.push_back((conv, seq, frame)),
                None => ctx.text(frame),
            },
            SessionEvent::Frame(frame) => ctx.text(frame),
            SessionEvent::AckAccepted => self.bad_in_row = 0,
            SessionEvent::BadFrame(frame) => {
                ctx.text(frame);
                self.count_bad_frame(ctx);
            }
            SessionEvent::Close { code, reason } => self.close(ctx, code, &reason),
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let msg = match msg {
            Ok(m) => m,
            Err(ws::ProtocolError::Overflow) => {
                return self.close(ctx, close::TOO_BIG, "message too large")
            }
            Err(e) => {
                log::debug!("session {}: protocol error {e}", self.id);
                return self.close(ctx, close::PROTOCOL_ERROR, "protocol error");
            }
        };
        self.last_heard = Instant::now();
        match msg {
            ws::Message::Text(text) => {
                if self.fragments.is_some() {
                    return self.close(
                        ctx,
                        close::PROTOCOL_ERROR,
                        "text frame inside a fragmented message",
                    );
                }
                self.handle_text(&text, ctx);
            }
            ws::Message::Binary(_) => {
                self.close(ctx, close::UNSUPPORTED, "binary frames are not supported")
            }
            ws::Message::Continuation(item) => self.continuation(item, ctx),
            ws::Message::Ping(p) => ctx.pong(&p),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}

impl WsSession {
    fn continuation(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        match item {
            actix_http::ws::Item::FirstText(b) => {
                if self.fragments.is_some() {
                    return self.close(
                        ctx,
                        close::PROTOCOL_ERROR,
                        "new message inside a fragmented message",
                    );
                }
                if b.len() > self.limits.max_frame_bytes {
                    return self.close(ctx, close::TOO_BIG, "message too large");
                }
                self.fragments = Some(b.to_vec());
            }
            actix_http::ws::Item::FirstBinary(_) => {
                self.close(ctx, close::UNSUPPORTED, "binary frames are not supported")
            }
            actix_http::ws::Item::Continue(_) | actix_http::ws::Item::Last(_)
                if self.fragments.is_none() =>
            {
                self.close(
                    ctx,
                    close::PROTOCOL_ERROR,
                    "continuation without a first frame",
                )
            }
            actix_http::ws::Item::Continue(b) => {
                self.append_fragment(&b, ctx);
            }
            actix_http::ws::Item::Last(b) => {
                if self.append_fragment(&b, ctx) {
                    let bytes = self.fragments.take().unwrap_or_default();
                    match String::from_utf8(bytes) {
                        Ok(text) => self.handle_text(&text, ctx),
                        Err(_) => self.close(ctx, close::INVALID_UTF8, "text message is not UTF-8"),
                    }
                }
            }
        }
    }

    /// Add a fragment; `false` (and the connection closed) past `max_frame_bytes`.
    fn append_fragment(&mut self, b: &[u8], ctx: &mut ws::WebsocketContext<Self>) -> bool {
        let max = self.limits.max_frame_bytes;
        let Some(buf) = self.fragments.as_mut() else {
            return false;
        };
        if buf.len() + b.len() > max {
            self.fragments = None;
            self.close(ctx, close::TOO_BIG, "message too large");
            return false;
        }
        buf.extend_from_slice(b);
        true
    }
}
