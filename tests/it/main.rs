//! Integration tests: each starts Herald on 127.0.0.1:0 and talks to it over real HTTP.

mod common;

mod access;
mod admission;
mod auth;
pub(crate) mod cluster_nats;
pub(crate) mod cluster_redis;
mod console;
mod cors;
mod engine;
mod inbox;
mod inbox_nats;
mod inbox_redis;
mod keys;
mod lifecycle;
mod limits;
mod matrix;
mod mercure;
mod ops;
mod process;
mod push;
mod push_redis;
mod resume;
mod wire;
mod ws;
mod wsclient;
mod yjs;
