//! One conversation's messages in a seq range, as `message` frames: how a
//! cluster node fills a gap in a conversation's live order (a message that
//! another node stored but whose bus publication was lost or is late).

use actix::prelude::{Handler, Message, SyncContext};
use bytestring::ByteString;
use diesel::prelude::*;

use super::executor::DbExecutor;
use super::models::MessageRow;
use super::schema::{members, messages};
use crate::error::ChatError;
use crate::protocol::ServerFrame;

/// The most messages one gap fill reads.
pub const MAX_RANGE: i64 = 10_000;

/// Messages of `conv` with `after < seq <= upto` (and `ts >= since_ts`),
/// oldest first (at most [`MAX_RANGE`]).
#[derive(Message)]
#[rtype(result = "Result<Vec<(i64, ByteString)>, ChatError>")]
pub struct LoadRange {
    pub conv: String,
    pub after: i64,
    pub upto: i64,
    /// Only messages accepted at or after this time (Unix ms).
    pub since_ts: Option<i64>,
    /// Only messages after the furthest delivery position (ack) of these
    /// members: what they acknowledged they have.
    pub acked_by: Vec<String>,
}

impl Handler<LoadRange> for DbExecutor {
    type Result = Result<Vec<(i64, ByteString)>, ChatError>;
    fn handle(&mut self, msg: LoadRange, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("range", |c| {
            let mut after = msg.after;
            if !msg.acked_by.is_empty() {
                let acked: Option<i64> = members::table
                    .filter(members::conv.eq(&msg.conv))
                    .filter(members::user_id.eq_any(&msg.acked_by))
                    .select(diesel::dsl::max(members::delivered_seq))
                    .first(&mut **c)?;
                after = after.max(acked.unwrap_or(0));
            }
            let rows: Vec<MessageRow> = messages::table
                .filter(messages::conv.eq(&msg.conv))
                .filter(messages::seq.gt(after))
                .filter(messages::seq.le(msg.upto))
                .filter(messages::ts.ge(msg.since_ts.unwrap_or(i64::MIN)))
                .order(messages::seq.asc())
                .limit(MAX_RANGE)
                .select(MessageRow::as_select())
                .load(&mut **c)?;
            Ok(rows
                .into_iter()
                .filter_map(|r| {
                    let seq = r.seq;
                    r.into_view()
                        .map(|v| (seq, ServerFrame::Message(&v).to_text()))
                })
                .collect())
        })
    }
}
