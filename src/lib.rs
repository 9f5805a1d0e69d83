//! wsbroker: a pub/sub broker over wss.
//!
//! The binary (`src/main.rs`) only parses arguments; everything else lives in
//! this library so tests can drive it in-process. See `../shared/ARCHITECTURE.md`
//! for the path of a message through these modules.

pub mod activation;
pub mod admin;
pub mod auth;
pub mod bench;
pub mod broker;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod der;
pub mod handshake;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod origin;
pub mod protocol;
pub mod queue;
pub mod server;
pub mod tls;
pub mod topics;
