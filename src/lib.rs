//! sluice: a gRPC streaming ingestion server that lands events in PostgreSQL.
//!
//! Data flows one way: RPC ([`ingest`]) → validation → bounded [`buffer`] → [`writer`] pool →
//! PostgreSQL ([`store`]). [`server`] wires the pieces together; [`error`] is the one place
//! where errors become gRPC statuses.

pub mod bench;
pub mod buffer;
pub mod config;
pub mod error;
pub mod event;
pub mod health;
pub mod ingest;
pub mod metrics;
pub mod proto;
pub mod query;
pub mod server;
pub mod store;
pub mod tls;
pub mod writer;
