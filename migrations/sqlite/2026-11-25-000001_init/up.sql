-- chat-hub schema, SQLite. Same tables and keys as migrations/mysql; TEXT
-- compares byte-wise (BINARY collation), matching the wire rule for dm keys.
-- Times are Unix milliseconds.

CREATE TABLE users (
    id          TEXT NOT NULL PRIMARY KEY,
    first_seen  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL
) WITHOUT ROWID;

-- One row per conversation (direct or group); last_seq is the seq allocator.
CREATE TABLE conversations (
    conv        TEXT NOT NULL PRIMARY KEY,
    last_seq    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
) WITHOUT ROWID;

CREATE TABLE chat_groups (
    id          TEXT NOT NULL PRIMARY KEY,
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    created_at  BIGINT NOT NULL
) WITHOUT ROWID;

-- Who is in a conversation: a member sees seqs in (joined_seq, left_seq]
-- except (gap_from, gap_to], and has acknowledged everything up to
-- delivered_seq. The gap is the time away of a member who left and came back
-- before acknowledging what they had been sent.
CREATE TABLE members (
    conv           TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    joined_seq     BIGINT NOT NULL,
    left_seq       BIGINT NULL,
    delivered_seq  BIGINT NOT NULL,
    gap_from       BIGINT NULL,
    gap_to         BIGINT NULL,
    joined_at      BIGINT NOT NULL,
    PRIMARY KEY (conv, user_id)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members (user_id, conv);

CREATE TABLE messages (
    conv       TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    sender     TEXT NOT NULL,
    body       TEXT NOT NULL,
    ts         BIGINT NOT NULL,
    client_id  TEXT NULL,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_client_id ON messages (client_id, sender);
