//! Validated identifiers of the protocol: user ids, group ids and conversation keys.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest user or group id, in bytes (all allowed characters are ASCII).
pub const MAX_ID_LEN: usize = 64;

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A validated ", $what, " id: 1 to 64 characters from `A-Z a-z 0-9 _ . @ -`.")]
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, String> {
                if valid_id(s) {
                    Ok(Self(Arc::from(s)))
                } else {
                    Err(format!(
                        concat!(
                            "invalid ",
                            $what,
                            " id {:?}: expected 1 to 64 characters from A-Z a-z 0-9 _ . @ -"
                        ),
                        truncate(s)
                    ))
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(UserId, "user");
id_type!(GroupId, "group");

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Where a message goes: `{"user":"bob"}` or `{"group":"team"}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    User(UserId),
    Group(GroupId),
}

/// A conversation key: `dm:<a>:<b>` (a <= b in byte order) or `group:<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConvKey {
    Direct(UserId, UserId),
    Group(GroupId),
}

impl ConvKey {
    /// The direct conversation of two users, whatever order they are given in.
    pub fn direct(a: &UserId, b: &UserId) -> Self {
        if a.as_str() <= b.as_str() {
            ConvKey::Direct(a.clone(), b.clone())
        } else {
            ConvKey::Direct(b.clone(), a.clone())
        }
    }

    /// The conversation a message from `sender` to `target` belongs to.
    pub fn for_target(sender: &UserId, target: &Target) -> Self {
        match target {
            Target::User(u) => Self::direct(sender, u),
            Target::Group(g) => ConvKey::Group(g.clone()),
        }
    }

    /// Parse a wire key; a `dm:` key out of byte order is malformed.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "malformed conv {:?}: expected dm:<a>:<b> with a <= b, or group:<id>",
                truncate(s)
            )
        };
        if let Some(rest) = s.strip_prefix("dm:") {
            let (a, b) = rest.split_once(':').ok_or_else(bad)?;
            let (a, b) = (
                UserId::parse(a).map_err(|_| bad())?,
                UserId::parse(b).map_err(|_| bad())?,
            );
            if a.as_str() > b.as_str() {
                return Err(bad());
            }
            Ok(ConvKey::Direct(a, b))
        } else if let Some(g) = s.strip_prefix("group:") {
            Ok(ConvKey::Group(GroupId::parse(g).map_err(|_| bad())?))
        } else {
            Err(bad())
        }
    }

    /// Whether `user` is one of the two parties of a direct conversation.
    pub fn names(&self, user: &UserId) -> bool {
        matches!(self, ConvKey::Direct(a, b) if a == user || b == user)
    }

    /// The `to` of a message in this conversation sent by `sender`.
    pub fn target_for(&self, sender: &str) -> Target {
        match self {
            ConvKey::Direct(a, b) => Target::User(if a.as_str() == sender {
                b.clone()
            } else {
                a.clone()
            }),
            ConvKey::Group(g) => Target::Group(g.clone()),
        }
    }
}

impl fmt::Display for ConvKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvKey::Direct(a, b) => write!(f, "dm:{a}:{b}"),
            ConvKey::Group(g) => write!(f, "group:{g}"),
        }
    }
}

impl Serialize for ConvKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConvKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ConvKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(UserId::parse("alice.b@x-y_z").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse(&"a".repeat(64)).is_ok());
        assert!(UserId::parse(&"a".repeat(65)).is_err());
        assert!(UserId::parse("al ice").is_err());
        assert!(UserId::parse("é").is_err());
    }

    #[test]
    fn conv_keys_round_trip_and_reject_disorder() {
        let k = ConvKey::parse("dm:alice:bob").unwrap();
        assert_eq!(k.to_string(), "dm:alice:bob");
        assert!(ConvKey::parse("dm:bob:alice").is_err());
        assert!(ConvKey::parse("dm:a:a").is_ok());
        assert!(ConvKey::parse("group:team").is_ok());
        assert!(ConvKey::parse("group:").is_err());
        assert!(ConvKey::parse("chan:x").is_err());
        let (a, b) = (
            UserId::parse("bob").unwrap(),
            UserId::parse("alice").unwrap(),
        );
        assert_eq!(ConvKey::direct(&a, &b).to_string(), "dm:alice:bob");
        assert_eq!(ConvKey::direct(&a, &b).target_for("alice"), Target::User(a));
    }
}
