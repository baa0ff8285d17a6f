//! Rows as diesel reads and writes them, and the typed results the DbExecutor returns.

use diesel::prelude::*;

use super::schema::{conversations, members, messages};
use crate::ids::{ConvKey, Target, UserId};
use crate::protocol::MessageView;

/// A message to store, as the ChatServer hands it over (sender authenticated).
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub sender: UserId,
    pub to: Target,
    pub body: String,
    pub client_id: Option<String>,
    pub ts: i64,
}

/// Where a stored message went. `duplicate`: an earlier send with the same
/// `client_id` already stored it, and this is that message's place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub conv: ConvKey,
    pub seq: i64,
    pub ts: i64,
    pub duplicate: bool,
}

#[derive(Insertable)]
#[diesel(table_name = messages)]
#[diesel(treat_none_as_default_value = false)]
pub struct NewMessageRow<'a> {
    pub conv: &'a str,
    pub seq: i64,
    pub sender: &'a str,
    pub body: &'a str,
    pub ts: i64,
    pub client_id: Option<&'a str>,
}

#[derive(Insertable)]
#[diesel(table_name = conversations)]
#[diesel(treat_none_as_default_value = false)]
pub struct NewConversation<'a> {
    pub conv: &'a str,
    pub last_seq: i64,
    pub created_at: i64,
}

#[derive(Insertable)]
#[diesel(table_name = members)]
#[diesel(treat_none_as_default_value = false)]
pub struct NewMember<'a> {
    pub conv: &'a str,
    pub user_id: &'a str,
    pub joined_seq: i64,
    pub left_seq: Option<i64>,
    pub delivered_seq: i64,
    pub gap_from: Option<i64>,
    pub gap_to: Option<i64>,
    pub joined_at: i64,
}

#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = messages)]
pub struct MessageRow {
    pub conv: String,
    pub seq: i64,
    pub sender: String,
    pub body: String,
    pub ts: i64,
    pub client_id: Option<String>,
}

impl MessageRow {
    /// The client's view; `None` for a row whose key is not a valid conversation
    /// (impossible for rows chat-hub wrote, skipped rather than trusted).
    pub fn into_view(self) -> Option<MessageView> {
        let to = ConvKey::parse(&self.conv).ok()?.target_for(&self.sender);
        Some(MessageView {
            conv: self.conv,
            seq: self.seq,
            from: self.sender,
            to,
            body: self.body,
            ts: self.ts,
            client_id: self.client_id,
        })
    }
}

/// A member's window on a conversation: seqs in (joined_seq, left_seq]
/// except (gap_from, gap_to].
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = members)]
pub struct Membership {
    pub joined_seq: i64,
    pub left_seq: Option<i64>,
    pub delivered_seq: i64,
    pub gap_from: Option<i64>,
    pub gap_to: Option<i64>,
}

impl Membership {
    /// Where the current membership began (history starts after it).
    pub fn current_join(&self) -> i64 {
        self.gap_to.unwrap_or(self.joined_seq)
    }
}
