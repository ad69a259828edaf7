//! sluice: a gRPC streaming ingestion server that lands events in PostgreSQL.
//!
//! Data flows one way: RPC ([`ingest`], or OpenTelemetry's logs through [`otlp`]) → the one envelope of [`rpc`] → validation →
//! [`privacy`] → bounded [`buffer`] → [`writer`] pool → PostgreSQL ([`store`]) or the Redis
//! [`broker`], with the [`spool`] beside the buffer for database outages. The read side
//! ([`query`]) reads the store and the [`archive`], where the [`lifecycle`] job moves old
//! events, and the business figures each node keeps ([`figures`]); `erasure` takes personal data away everywhere it is; [`backup`] keeps the private
//! cluster restorable to a point in time. [`server`] wires the pieces together.
//!
//! Imports flow the same way: `server → otlp → {ingest, query} → {erasure, lifecycle, archive} →
//! {writer, filter, rpc} → {spool, store, auth, audit} → {buffer, metrics} → {figures, broker,
//! privacy, proto}`, and the leaves (`config`, `event`, `glob`, `objects`, `backoff`) import nothing of
//! sluice. Each module maps its own error type to a `tonic::Status` beside that type, through
//! the domain-free helpers of `proto::status`.

pub mod archive;
pub(crate) mod audit;
pub mod auth;
pub(crate) mod backoff;
pub mod backup;
pub mod broker;
pub(crate) mod buffer;
pub mod config;
pub(crate) mod erasure;
pub mod event;
pub(crate) mod feed;
pub(crate) mod figures;
pub(crate) mod filter;
pub(crate) mod glob;
pub(crate) mod health;
pub mod ingest;
pub(crate) mod json_text;
pub mod lifecycle;
pub(crate) mod metrics;
pub mod objects;
pub mod otlp;
pub mod privacy;
pub mod proto;
pub(crate) mod query;
pub(crate) mod rpc;
pub mod server;
pub mod spool;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod writer;
