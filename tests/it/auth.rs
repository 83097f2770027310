//! Tokens: the three locations and their precedence, algorithms, separate keys, clear refusals, and a
//! stream that ends when its token expires.

use std::time::{Duration, Instant};

use herald::auth::{Claims, MercureClaim};
use jsonwebtoken::Algorithm;

use crate::common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test]
async fn each_token_location_works() {
    let s = TestServer::start(&[]).await;
    let tok = token(&[], &["*"], Some(600));
    let url = subscribe_url(&s.url, &["t"], &[]);

    let by_header = Sse::open(client().get(&url).bearer_auth(&tok)).await;
    assert_eq!(by_header.status, 200);
    let by_query = Sse::get(&subscribe_url(&s.url, &["t"], &[("authorization", &tok)])).await;
    assert_eq!(by_query.status, 200);
    let by_cookie = Sse::open(
        client()
            .get(&url)
            .header("cookie", format!("other=1; mercureAuthorization={tok}")),
    )
    .await;
    assert_eq!(by_cookie.status, 200);

    // A publication reaches all three.
    let mut subs = [by_header, by_query, by_cookie];
    s.publish(&[("topic", "t"), ("data", "hi")]).await;
    for sub in &mut subs {
        assert_eq!(sub.next_event().await.unwrap().data, "hi");
    }
}

#[tokio::test]
async fn custom_cookie_name() {
    let s = TestServer::start(&[("auth.cookie_name", "\"hubToken\"")]).await;
    let tok = token(&[], &[], Some(600));
    let url = subscribe_url(&s.url, &["t"], &[]);
    let ok = Sse::open(
        client()
            .get(&url)
            .header("cookie", format!("hubToken={tok}")),
    )
    .await;
    assert_eq!(ok.status, 200);
    let (status, body) = get_json(
        client()
            .get(&url)
            .header("cookie", format!("mercureAuthorization={tok}")),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "token_missing");
    assert!(
        body["message"].as_str().unwrap().contains("hubToken"),
        "the message names the cookie: {body}"
    );
}

#[tokio::test]
async fn precedence_header_then_query_then_cookie() {
    let s = TestServer::start(&[]).await;
    let good = token(&[], &[], Some(600));
    let bad = "not.a.jwt";
    let url = subscribe_url(&s.url, &["t"], &[]);

    // Header present: it is used, the others ignored, whichever is valid.
    let sub = Sse::open(
        client()
            .get(&url)
            .bearer_auth(&good)
            .header("cookie", format!("mercureAuthorization={bad}")),
    )
    .await;
    assert_eq!(sub.status, 200);
    let (status, body) = get_json(
        client()
            .get(&url)
            .bearer_auth(bad)
            .header("cookie", format!("mercureAuthorization={good}")),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_malformed"))
    );

    // No header: the query parameter beats the cookie.
    let with_query = subscribe_url(&s.url, &["t"], &[("authorization", &good)]);
    let sub = Sse::open(
        client()
            .get(&with_query)
            .header("cookie", format!("mercureAuthorization={bad}")),
    )
    .await;
    assert_eq!(sub.status, 200);
    let with_bad_query = subscribe_url(&s.url, &["t"], &[("authorization", bad)]);
    let (status, _) = get_json(
        client()
            .get(&with_bad_query)
            .header("cookie", format!("mercureAuthorization={good}")),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn refusals_say_why() {
    let s = TestServer::start(&[]).await;
    let url = subscribe_url(&s.url, &["t"], &[]);

    let (status, body) = get_json(client().get(&url)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_missing"))
    );
    assert!(body["message"].as_str().unwrap().contains("cookie"));

    let wrong_key = sign_with(&Claims::default(), "another-secret", Algorithm::HS256);
    let (status, body) = get_json(client().get(&url).bearer_auth(wrong_key)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_bad_signature"))
    );

    let expired = token(&[], &[], Some(-30));
    let (status, body) = get_json(client().get(&url).bearer_auth(expired)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_expired"))
    );

    // Publishing: no publish claim, then a topic outside the claim.
    let subscriber_only = token(&[], &["*"], Some(600));
    let resp = s
        .publish_raw(&[("topic", "t"), ("data", "x")], &subscriber_only)
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["code"],
        "publish_not_allowed"
    );

    let narrow = token(&["https://example.com/books/{id}"], &[], Some(600));
    let resp = s
        .publish_raw(
            &[
                ("topic", "https://example.com/books/1"),
                ("topic", "https://example.com/authors/1"),
                ("data", "x"),
            ],
            &narrow,
        )
        .await;
    assert_eq!(resp.status(), 403);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "topic_not_granted");
    assert!(
        body["message"].as_str().unwrap().contains("authors/1"),
        "{body}"
    );
    let resp = s
        .publish_raw(
            &[("topic", "https://example.com/books/1"), ("data", "x")],
            &narrow,
        )
        .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn anonymous_subscribers_only_when_configured() {
    let closed = TestServer::start(&[]).await;
    let (status, _) = get_json(client().get(subscribe_url(&closed.url, &["t"], &[]))).await;
    assert_eq!(status, 401);
    let open = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    assert_eq!(
        Sse::get(&subscribe_url(&open.url, &["t"], &[]))
            .await
            .status,
        200
    );
    // A bad token is refused even where anonymous access is allowed.
    let (status, _) = get_json(
        client()
            .get(subscribe_url(&open.url, &["t"], &[]))
            .bearer_auth("x.y.z"),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn separate_publisher_and_subscriber_keys() {
    let s = TestServer::start(&[
        ("auth.publisher_jwt_key", "\"pub-secret\""),
        ("auth.subscriber_jwt_key", "\"sub-secret\""),
    ])
    .await;
    let claims = Claims {
        mercure: Some(MercureClaim {
            publish: Some(vec!["*".into()]),
            subscribe: Some(vec!["*".into()]),
            payload: None,
        }),
        ..Default::default()
    };
    let pub_tok = sign_with(&claims, "pub-secret", Algorithm::HS256);
    let sub_tok = sign_with(&claims, "sub-secret", Algorithm::HS256);
    let url = subscribe_url(&s.url, &["t"], &[]);
    let (status, body) = get_json(client().get(&url).bearer_auth(&pub_tok)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_bad_signature"))
    );
    let mut sub = Sse::open(client().get(&url).bearer_auth(&sub_tok)).await;
    assert_eq!(sub.status, 200);
    assert_eq!(
        s.publish_raw(&[("topic", "t"), ("data", "x")], &sub_tok)
            .await
            .status(),
        401
    );
    assert_eq!(
        s.publish_raw(&[("topic", "t"), ("data", "x")], &pub_tok)
            .await
            .status(),
        200
    );
    assert_eq!(sub.next_event().await.unwrap().data, "x");
}

#[tokio::test]
async fn asymmetric_algorithms() {
    let claims = Claims {
        exp: Some(herald::auth::unix_now() + 600),
        mercure: Some(MercureClaim {
            publish: Some(vec!["*".into()]),
            ..Default::default()
        }),
        ..Default::default()
    };
    for (alg, name, stem) in [
        (Algorithm::RS256, "RS256", "rsa"),
        (Algorithm::ES256, "ES256", "ec"),
        (Algorithm::EdDSA, "EdDSA", "ed25519"),
    ] {
        let public = format!("\"file:{FIXTURES}/{stem}_public.pem\"");
        let alg_value = format!("\"{name}\"");
        let s = TestServer::start(&[("auth.jwt_key", &public), ("auth.jwt_alg", &alg_value)]).await;
        let tok = sign_with(&claims, &format!("file:{FIXTURES}/{stem}_private.pem"), alg);
        let resp = s.publish_raw(&[("topic", "t"), ("data", "x")], &tok).await;
        assert_eq!(resp.status(), 200, "{name}: {:?}", resp.text().await);
        let hs = token(&["*"], &[], Some(600));
        let resp = s.publish_raw(&[("topic", "t"), ("data", "x")], &hs).await;
        assert_eq!(resp.status(), 401, "{name} key refuses an HS256 token");
    }
}

#[tokio::test]
async fn stream_closes_when_the_token_expires() {
    let s = TestServer::start(&[]).await;
    let tok = token(&[], &[], Some(2));
    let started = Instant::now();
    let mut sub = Sse::open(
        client()
            .get(subscribe_url(&s.url, &["t"], &[]))
            .bearer_auth(tok),
    )
    .await;
    s.publish(&[("topic", "t"), ("data", "before")]).await;
    assert_eq!(sub.next_event().await.unwrap().data, "before");
    assert!(
        sub.wait_end(Duration::from_secs(6)).await,
        "the stream ends at exp"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before exp"
    );
}
