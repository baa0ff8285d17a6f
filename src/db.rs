//! Persistence: the diesel connection over both backends, the r2d2 pool, the
//! queries, and the [`executor::DbExecutor`] actor that runs them on a
//! `SyncArbiter` so that no async actor ever waits on the database.

pub mod conn;
pub mod executor;
pub mod models;
pub mod queries;
pub mod range;
pub mod schema;

pub use conn::{build_pool, open_pool, DbConn, Pool};
pub use executor::DbExecutor;
