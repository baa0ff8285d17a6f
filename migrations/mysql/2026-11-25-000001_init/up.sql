-- chat-hub schema, MySQL / MariaDB. Ids are ASCII by protocol, compared
-- byte-wise (ascii_bin) so that `dm:a:b` ordering matches the wire rule;
-- free text is utf8mb4 so that emoji round-trip. Times are Unix milliseconds.

CREATE TABLE users (
    id          VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    first_seen  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per conversation (direct or group); last_seq is the seq allocator.
CREATE TABLE conversations (
    conv        VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    last_seq    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (conv)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE chat_groups (
    id          VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    name        VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    owner       VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Who is in a conversation: a member sees seqs in (joined_seq, left_seq]
-- except (gap_from, gap_to], and has acknowledged everything up to
-- delivered_seq. The gap is the time away of a member who left and came back
-- before acknowledging what they had been sent.
CREATE TABLE members (
    conv           VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    user_id        VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    joined_seq     BIGINT NOT NULL,
    left_seq       BIGINT NULL,
    delivered_seq  BIGINT NOT NULL,
    gap_from       BIGINT NULL,
    gap_to         BIGINT NULL,
    joined_at      BIGINT NOT NULL,
    PRIMARY KEY (conv, user_id),
    KEY members_by_user (user_id, conv)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE messages (
    conv       VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    seq        BIGINT NOT NULL,
    sender     VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    body       MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    ts         BIGINT NOT NULL,
    client_id  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    PRIMARY KEY (conv, seq),
    UNIQUE KEY messages_client_id (client_id, sender)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
