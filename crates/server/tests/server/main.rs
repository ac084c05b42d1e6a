//! The server's suites, one test binary: the HTTP API, hardening against hostile clients and
//! inputs, the node on PostgreSQL state, and nodes that lose their backends while they run.

mod api;
mod hardening;
mod outage;
mod state_postgres;
mod support;
