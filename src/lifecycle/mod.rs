//! Data lifecycle: retention per service ([`policy`]) and the job that applies it ([`job`]):
//! whole partitions past every retention are dropped, rows past their service's retention are
//! deleted in batches, and the rollup and dead letters follow. Before that, events past
//! `archive.after` move into the archive ([`archiving`]), and archived objects past their
//! service's retention are removed. One node at a time; the server runs it on a [`schedule`].

mod archiving;
pub mod job;
pub mod policy;
mod report;
pub mod schedule;

pub use job::run_once;
pub use policy::RetentionPolicy;
pub use report::{LifecycleError, Report};
