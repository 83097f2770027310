//! Tokens and keys: `nbf`, secrets from the environment or a file, and the public development key.

use serde_json::json;

use crate::common::*;
use crate::process::{refused, Herald};
use crate::wsclient::*;

/// Finding 5: a token valid only from an hour later was accepted for subscribe and publish.
#[tokio::test]
async fn a_token_that_is_not_yet_valid_is_refused_everywhere() {
    let s = TestServer::start(&[]).await;
    let now = herald::auth::unix_now() as i64;
    let later = sign_json(&json!({
        "sub": "u", "nbf": now + 3600, "exp": now + 7200,
        "mercure": {"publish": ["*"], "subscribe": ["*"]}
    }));
    let (status, body) = get_json(
        reqwest::Client::new()
            .get(subscribe_url(&s.url, &["t"], &[]))
            .bearer_auth(&later),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_not_yet_valid"))
    );
    let resp = s
        .publish_raw(&[("topic", "t"), ("data", "x")], &later)
        .await;
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "token_not_yet_valid");

    let mut ws = open(&s).await;
    send(&mut ws, json!({"id": 1, "connect": {"token": later}})).await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, 3500, "{reason}");
    assert!(reason.len() <= 123);

    // Valid from a moment ago: accepted.
    let now_valid =
        sign_json(&json!({"nbf": now - 5, "exp": now + 600, "mercure": {"publish": ["*"]}}));
    let resp = s
        .publish_raw(&[("topic", "t"), ("data", "x")], &now_valid)
        .await;
    assert_eq!(resp.status(), 200);
}

/// Finding 6: `centrifugo.api_key = "env:VAR"`, the documented form, was used literally.
#[tokio::test]
async fn the_api_key_comes_from_the_environment_or_a_file() {
    let var = "HERALD_IT_API_KEY_FROM_ENV";
    let h = Herald::start(
        &["--set", &format!("centrifugo.api_key=env:{var}")],
        &[(var, "the-real-key")],
    )
    .await;
    let status = |key: &'static str| {
        let url = format!("{}/api/info", h.url);
        async move {
            reqwest::Client::new()
                .post(url)
                .header("x-api-key", key)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("the-real-key").await, 200);
    assert_eq!(status("env:HERALD_IT_API_KEY_FROM_ENV").await, 401);
    drop(h);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.key");
    std::fs::write(&file, "key-from-file\n").unwrap();
    let h = Herald::start(
        &[
            "--set",
            &format!("centrifugo.api_key=file:{}", file.display()),
        ],
        &[],
    )
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{}/api/info", h.url))
        .header("x-api-key", "key-from-file")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "a trailing newline in the file is not part of the key"
    );

    // A variable that is not set is a start-up error naming it, not an empty or literal key.
    let (status, err) = refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--set",
            "centrifugo.api_key=env:HERALD_IT_UNSET_VAR",
        ],
        &[],
    )
    .await;
    assert!(!status.success());
    assert!(err.contains("HERALD_IT_UNSET_VAR"), "{err}");
}

/// The public development key must not guard a server reachable from the network.
#[tokio::test]
async fn the_development_key_is_refused_on_a_public_address() {
    let (status, err) = refused(&["--listen", "0.0.0.0:0"], &[]).await;
    assert!(!status.success());
    assert!(err.contains("development key"), "{err}");
    assert!(
        err.contains("--allow-dev-key"),
        "says how to override: {err}"
    );
    // Overridden explicitly: it starts.
    let h = Herald::start(&["--listen", "0.0.0.0:0", "--allow-dev-key"], &[]).await;
    assert!(h.url.starts_with("http://0.0.0.0:"), "{}", h.url);
    // On loopback it starts without the flag.
    let h = Herald::start(&[], &[]).await;
    assert!(h.url.starts_with("http://127.0.0.1:"));
}
