//! herald-bench: a load tool for Herald and its peers (nchan). Opens many SSE or WebSocket subscribers,
//! publishes sequenced, timestamped messages, and reports fan-out time, deliveries per second, latency
//! percentiles, loss and duplicates per subscriber, and the server's memory per connection.
#![forbid(unsafe_code)]

pub mod http;
pub mod inbox;
pub mod rss;
pub mod run;
pub mod sse;
pub mod stats;
pub mod sub;
pub mod table;
pub mod target;
pub mod yjs;

pub use run::{run, Report, Workload};
pub use target::{ServerKind, Target, Transport};
