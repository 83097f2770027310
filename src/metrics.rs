//! Prometheus metrics. The recorder is process-global (the `metrics` facade allows one), installed on first
//! use so that several routers in one process (tests, an app mounting Herald twice) share it.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder if nobody has; `None` when another recorder was installed by the host app.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    metrics::describe_gauge!(
        "herald_connections",
        "Open client connections (SSE streams)"
    );
    metrics::describe_gauge!("herald_subscriptions", "Live subscriptions");
    metrics::describe_gauge!(
        "herald_sockets",
        "Open accepted sockets, whatever they are doing (limited by limits.max_sockets)"
    );
    metrics::describe_counter!(
        "herald_sockets_refused_total",
        "Sockets closed without being served: reason=limit (limits.max_sockets), per_ip \
         (limits.max_sockets_per_ip), timeout (no request head within limits.header_read_timeout)"
    );
    metrics::describe_counter!(
        "herald_publications_total",
        "Publications committed to the log"
    );
    metrics::describe_counter!(
        "herald_deliveries_total",
        "Publications queued to a subscriber"
    );
    metrics::describe_counter!(
        "herald_disconnects_total",
        "Subscribers disconnected by the hub, by reason"
    );
    metrics::describe_histogram!(
        "herald_log_append_seconds",
        "Time to append (and commit) one batch to the log"
    );
    metrics::describe_gauge!(
        "herald_yjs_documents_loaded",
        "Yjs documents in memory on this node"
    );
    metrics::describe_gauge!(
        "herald_yjs_connections",
        "Open y-websocket connections on this node"
    );
    metrics::describe_counter!(
        "herald_yjs_updates_applied_total",
        "Stored Yjs updates applied to the documents of this node (from any node)"
    );
    metrics::describe_counter!(
        "herald_yjs_update_bytes_total",
        "Bytes of the Yjs updates applied to the documents of this node"
    );
    metrics::describe_counter!(
        "herald_yjs_updates_refused_total",
        "Yjs updates refused, by reason: corrupt, too_large, document_full, read_only, storage"
    );
    metrics::describe_counter!(
        "herald_yjs_snapshots_total",
        "Point-in-time snapshots of Yjs documents taken by this node"
    );
    metrics::describe_counter!(
        "herald_yjs_restores_total",
        "Yjs documents restored to a snapshot through this node"
    );
}
