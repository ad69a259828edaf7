//! The one RPC envelope that every handler goes through: the typed list of RPCs ([`Rpc`]:
//! name, scope, read or write, how audited), the admission step ([`Admission`]: authenticate,
//! scope, services, audit, span), and the layer that records every call's duration and code
//! ([`record::RecordLayer`]).

mod admission;
pub mod record;
mod table;

pub use admission::{Admission, Call};
pub use table::{Audited, INGEST_SERVICE, OTLP_LOGS_SERVICE, QUERY_SERVICE, Rpc};
