//! Operations: health, metrics, active subscriptions, graceful shutdown, and the CLI.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn health_ready_and_metrics() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let (status, body) = get_json(reqwest::Client::new().get(format!("{}/healthz", s.url))).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, _) = get_json(reqwest::Client::new().get(format!("{}/readyz", s.url))).await;
    assert_eq!(status, 200);
    let mut sub = Sse::get(&subscribe_url(&s.url, &["t"], &[])).await;
    s.publish(&[("topic", "t"), ("data", "x")]).await;
    sub.next_event().await.unwrap();
    let text = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for m in [
        "herald_publications_total",
        "herald_deliveries_total",
        "herald_connections",
        "herald_subscriptions",
        "herald_log_append_seconds_bucket",
    ] {
        assert!(text.contains(m), "{m} missing from /metrics:\n{text}");
    }
    let (status, body) = get_json(reqwest::Client::new().get(format!("{}/nope", s.url))).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn active_subscription_events_and_api() {
    let s = TestServer::start(&[
        ("auth.allow_anonymous", "true"),
        ("mercure.subscriptions", "true"),
    ])
    .await;
    let watcher_tok = token(
        &[],
        &["/.well-known/mercure/subscriptions{/topic}{/subscriber}"],
        Some(600),
    );
    let mut watcher = Sse::open(
        reqwest::Client::new()
            .get(subscribe_url(
                &s.url,
                &["/.well-known/mercure/subscriptions{/topic}{/subscriber}"],
                &[],
            ))
            .bearer_auth(&watcher_tok),
    )
    .await;
    let mut anon_watcher = Sse::get(&subscribe_url(
        &s.url,
        &["/.well-known/mercure/subscriptions{/topic}{/subscriber}"],
        &[],
    ))
    .await;

    let mut sub = Sse::get(&subscribe_url(&s.url, &["https://example.com/{id}"], &[])).await;
    sub.next_any().await;
    // The watchers' own subscriptions are announced too (two events); skip to the one opened last.
    let mut doc = serde_json::Value::Null;
    for _ in 0..3 {
        doc = serde_json::from_str(&watcher.next_event().await.unwrap().data).unwrap();
        if doc["topic"] == "https://example.com/{id}" {
            break;
        }
        assert_eq!(
            doc["topic"],
            "/.well-known/mercure/subscriptions{/topic}{/subscriber}"
        );
    }
    assert_eq!(doc["type"], "Subscription");
    assert_eq!(doc["topic"], "https://example.com/{id}");
    assert_eq!(doc["active"], true);
    let subscriber = doc["subscriber"].as_str().unwrap().to_string();
    assert!(doc["id"]
        .as_str()
        .unwrap()
        .starts_with("/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2F%7Bid%7D/"));

    let (status, list) = get_json(
        reqwest::Client::new()
            .get(format!("{}/.well-known/mercure/subscriptions", s.url))
            .bearer_auth(&watcher_tok),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(list["type"], "Subscriptions");
    assert!(list["lastEventID"].is_string());
    assert!(list["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["subscriber"] == subscriber.as_str()));
    let (status, _) = get_json(
        reqwest::Client::new().get(format!("{}/.well-known/mercure/subscriptions", s.url)),
    )
    .await;
    assert_eq!(status, 401, "the API needs a token");

    drop(sub);
    let ev = watcher.next_event().await.unwrap();
    let doc: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(
        (doc["active"].as_bool(), doc["subscriber"].as_str()),
        (Some(false), Some(subscriber.as_str()))
    );
    anon_watcher.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn graceful_shutdown_ends_streams_and_keeps_acknowledged_publications() {
    let mut s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["t"], &[])).await;
    let id = s.publish(&[("topic", "t"), ("data", "kept")]).await;
    assert_eq!(
        sub.next_event().await.unwrap().id.as_deref(),
        Some(id.as_str())
    );
    let dir = s.dir.clone();
    s.stop().await;
    assert!(
        sub.wait_end(Duration::from_secs(3)).await,
        "streams end so clients reconnect elsewhere"
    );
    let log = herald::log::SqliteLog::open(dir.join("herald.sqlite3"), true).unwrap();
    use herald::log::Log;
    assert_eq!(
        log.last().unwrap().unwrap().id,
        id,
        "the acknowledged publication is on disk"
    );
}

fn herald_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herald"))
}

#[tokio::test]
async fn cli_token_publish_and_config() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["cli"], &[])).await;

    let out = herald_cmd()
        .args(["token", "--jwt-key", KEY, "--publish", "cli", "--ttl", "5m"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        s.publish_raw(&[("topic", "cli"), ("data", "via token")], &tok)
            .await
            .status(),
        200
    );
    assert_eq!(sub.next_event().await.unwrap().data, "via token");

    let url = s.hub_url();
    let out = tokio::task::spawn_blocking(move || {
        herald_cmd()
            .args([
                "publish",
                "--jwt-key",
                KEY,
                "--url",
                &url,
                "--topic",
                "cli",
                "--data",
                "via publish",
                "--id",
                "cli-1",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cli-1");
    assert_eq!(sub.next_event().await.unwrap().data, "via publish");

    let url = s.hub_url();
    let out = tokio::task::spawn_blocking(move || {
        herald_cmd()
            .args([
                "publish",
                "--jwt-key",
                KEY,
                "--url",
                &url,
                "--json",
                r#"{"topic":"cli","data":{"k":1}}"#,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sub.next_event().await.unwrap().data, r#"{"k":1}"#);

    let out = herald_cmd()
        .args([
            "config",
            "--jwt-key",
            "hunter2",
            "--listen",
            "127.0.0.1:9999",
        ])
        .env("HERALD_MERCURE__HEARTBEAT", "7s")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:9999\""), "{text}");
    assert!(text.contains("heartbeat = \"7s\""), "{text}");
    assert!(!text.contains("hunter2"), "secrets are masked");

    let out = herald_cmd()
        .args(["config", "--cors-origin", "*"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("allow_credentials"));
}

/// The CLI explains itself: each subcommand lists its own flags, a base URL works for publish, and the
/// common mistakes get errors that say what to do.
#[tokio::test]
async fn cli_help_and_errors_explain_themselves() {
    let help = |sub: &str| {
        let out = herald_cmd().args([sub, "--help"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let serve = help("serve");
    assert!(
        serve.contains("--listen") && serve.contains("Examples:"),
        "{serve}"
    );
    assert!(
        !serve.contains("--url") && !serve.contains("--topic"),
        "{serve}"
    );
    let token = help("token");
    assert!(
        token.contains("--sub") && !token.contains("--listen"),
        "{token}"
    );
    let publish = help("publish");
    assert!(
        publish.contains("--url") && !publish.contains("--allow-anonymous"),
        "{publish}"
    );
    let top = herald_cmd().arg("--help").output().unwrap();
    let top = String::from_utf8(top.stdout).unwrap();
    assert!(
        top.contains("WebSocket") && top.contains("Centrifugo"),
        "{top}"
    );

    // A base URL is enough for publish.
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let mut sub = Sse::get(&subscribe_url(&s.url, &["base"], &[])).await;
    let base = s.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        herald_cmd()
            .args([
                "publish",
                "--jwt-key",
                KEY,
                "--url",
                &base,
                "--topic",
                "base",
                "--data",
                "b",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sub.next_event().await.unwrap().data, "b");

    // The address in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = herald_cmd()
        .args(["serve", "--memory", "--listen", &addr])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("--listen"),
        "{err}"
    );

    // An RS256 token without the private key.
    let out = herald_cmd()
        .args(["token", "--alg", "RS256", "--publish", "*"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--key"), "{err}");

    // A log level that is not one.
    let out = herald_cmd()
        .args(["serve", "--memory", "--listen", "127.0.0.1:0"])
        .env("HERALD_LOG_LEVEL", "verbose")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("HERALD_LOG_LEVEL"),
        "{err}"
    );
}
