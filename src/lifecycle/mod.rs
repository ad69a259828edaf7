//! Data lifecycle: retention per service ([`policy`]) and the job that applies it ([`job`]):
//! whole partitions past every retention are dropped, rows past their service's retention are
//! deleted in batches, and the rollup and dead letters follow. One node at a time.

pub mod job;
pub mod policy;

pub use job::{LifecycleError, Report, run_once};
pub use policy::RetentionPolicy;
