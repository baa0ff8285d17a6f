//! The portable diesel schema, one for both backends (see the migrations).

diesel::table! {
    users (id) {
        id -> Text,
        first_seen -> BigInt,
        last_seen -> BigInt,
    }
}

diesel::table! {
    conversations (conv) {
        conv -> Text,
        last_seq -> BigInt,
        created_at -> BigInt,
    }
}

diesel::table! {
    chat_groups (id) {
        id -> Text,
        name -> Text,
        owner -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    members (conv, user_id) {
        conv -> Text,
        user_id -> Text,
        joined_seq -> BigInt,
        left_seq -> Nullable<BigInt>,
        delivered_seq -> BigInt,
        gap_from -> Nullable<BigInt>,
        gap_to -> Nullable<BigInt>,
        joined_at -> BigInt,
    }
}

diesel::table! {
    messages (conv, seq) {
        conv -> Text,
        seq -> BigInt,
        sender -> Text,
        body -> Text,
        ts -> BigInt,
        client_id -> Nullable<Text>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(users, conversations, chat_groups, members, messages);
