//! The client side of the `sluice` command: subcommands that talk to a running server.

pub mod bench;
pub mod connect;
pub mod read;
pub mod send;
