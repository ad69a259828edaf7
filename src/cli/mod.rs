//! The subcommands of the `sluice` command beside the server: clients of a running server
//! (`send`, `query`, …, `bench`), and the backup jobs.

pub mod backup;
pub mod bench;
pub mod connect;
pub mod privacy;
pub mod read;
pub mod send;
