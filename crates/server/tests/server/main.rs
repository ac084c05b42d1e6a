//! The server's suites, one test binary: the HTTP API, hardening against hostile clients and
//! inputs, and the node on PostgreSQL state.

mod api;
mod hardening;
mod state_postgres;
