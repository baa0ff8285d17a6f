//! All SQL of chat-hub: plain functions over `&mut DbConn`, usable without the
//! actor (the DbExecutor's handlers only call these).

pub mod groups;
pub mod messages;
pub mod users;

use diesel::result::{DatabaseErrorKind, Error};

/// Whether a failed transaction is worth running again as it is: a unique
/// clash with a concurrent writer (the retry sees its row) or a deadlock.
/// A lock wait that timed out is not: the wait already took `db_timeout`.
pub(crate) fn is_retryable(e: &Error) -> bool {
    match e {
        Error::DatabaseError(
            DatabaseErrorKind::UniqueViolation | DatabaseErrorKind::SerializationFailure,
            _,
        ) => true,
        Error::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("Deadlock") || m.contains("deadlock")
        }
        _ => false,
    }
}
