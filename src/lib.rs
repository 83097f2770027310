//! Herald: a real-time messaging hub.
//!
//! Use it as a server (`herald serve`) or as a library: build a [`Hub`] and mount [`router`] in your own
//! axum application.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let config = herald::Config::default();
//! let hub = herald::Hub::new(herald::server::open_engine(&config).await?, herald::server::hub_options(&config)).await?;
//! let app = axum::Router::new().merge(herald::router(hub, config)?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! See ARCHITECTURE.md for the map of the code.

#![forbid(unsafe_code)]

pub mod access;
pub mod auth;
pub mod centrifugo;
pub mod channel;
pub mod cli;
pub mod config;
pub mod console;
pub mod cors;
pub mod engine;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod inbox;
pub mod log;
pub mod mercure;
pub mod metrics;
pub mod presence;
pub mod queue;
pub mod server;
pub mod state;
pub mod topic;
pub mod yjs;

pub use config::Config;
pub use hub::Hub;
pub use server::{router, Server};
