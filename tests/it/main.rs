//! chat-hub's integration tests: one test binary, a module per area. Every
//! test gets its own database (a temp SQLite file; with `--features mysql` the
//! `mysql` variants get a fresh MariaDB database named per test, dropped
//! afterwards), so they run in parallel.

mod cluster;
mod common;
mod db;
mod http;
mod hub;
mod process;
mod ws;
