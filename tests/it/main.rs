//! Integration tests: each starts Herald on 127.0.0.1:0 and talks to it over real HTTP.

mod common;

mod admission;
mod auth;
mod cors;
mod limits;
mod mercure;
mod ops;
mod resume;
mod wire;
mod ws;
