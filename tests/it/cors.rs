//! CORS in the eight deployment shapes users hit, plus the CSRF check of cookie-authenticated publishes.

use crate::common::*;

async fn get_with_origin(url: &str, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{url}/healthz"))
        .header("origin", origin)
        .send()
        .await
        .unwrap()
}

fn h(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn varies_on_origin(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("origin"))
}

#[tokio::test]
async fn local_dev_origin_any_port() {
    let s = TestServer::start(&[("cors.allowed_origins", r#"["http://localhost:*"]"#)]).await;
    let r = get_with_origin(&s.url, "http://localhost:5173").await;
    assert_eq!(
        h(&r, "access-control-allow-origin").as_deref(),
        Some("http://localhost:5173")
    );
    assert_eq!(
        h(&r, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    let r = get_with_origin(&s.url, "http://localhost.evil.example:80").await;
    assert_eq!(h(&r, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn reverse_proxy_same_origin_needs_no_cors() {
    let s = TestServer::start(&[("auth.allow_anonymous", "true")]).await;
    let sub = Sse::get(&subscribe_url(&s.url, &["t"], &[])).await;
    assert_eq!(sub.status, 200);
    assert_eq!(
        sub.header("x-accel-buffering").as_deref(),
        Some("no"),
        "nginx must not buffer the stream"
    );
    assert_eq!(sub.header("access-control-allow-origin"), None);
    let r = get_with_origin(&s.url, "https://anything.example").await;
    assert_eq!(
        h(&r, "access-control-allow-origin"),
        None,
        "no origins configured, no CORS headers"
    );
}

#[tokio::test]
async fn credentials_with_an_exact_origin() {
    let s = TestServer::start(&[("cors.allowed_origins", r#"["https://app.example.com"]"#)]).await;
    let tok = token(&[], &[], Some(600));
    let resp = reqwest::Client::new()
        .get(subscribe_url(&s.url, &["t"], &[]))
        .header("origin", "https://app.example.com")
        .header("cookie", format!("mercureAuthorization={tok}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        h(&resp, "access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    assert_eq!(
        h(&resp, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    assert!(h(&resp, "access-control-expose-headers")
        .unwrap_or_default()
        .contains("last-event-id"));
    assert!(varies_on_origin(&resp));
}

#[tokio::test]
async fn wildcard_subdomains() {
    let s = TestServer::start(&[("cors.allowed_origins", r#"["https://*.example.com"]"#)]).await;
    for ok in ["https://app.example.com", "https://a.b.example.com"] {
        let r = get_with_origin(&s.url, ok).await;
        assert_eq!(h(&r, "access-control-allow-origin").as_deref(), Some(ok));
    }
    for refused in [
        "https://example.com",
        "https://evilexample.com",
        "http://app.example.com",
        "https://app.example.com.evil.org",
    ] {
        let r = get_with_origin(&s.url, refused).await;
        assert_eq!(h(&r, "access-control-allow-origin"), None, "{refused}");
    }
}

#[tokio::test]
async fn dynamic_list_answers_each_origin_with_itself() {
    // A comma list, as it comes from HERALD_CORS_ORIGINS or a flag.
    let s = TestServer::start(&[(
        "cors.allowed_origins",
        "https://a.example, https://b.example",
    )])
    .await;
    for o in ["https://a.example", "https://b.example"] {
        let r = get_with_origin(&s.url, o).await;
        assert_eq!(h(&r, "access-control-allow-origin").as_deref(), Some(o));
        assert!(
            varies_on_origin(&r),
            "a shared cache must not serve a's answer to b"
        );
    }
}

#[tokio::test]
async fn refused_origin_gets_no_cors_headers() {
    let s = TestServer::start(&[("cors.allowed_origins", r#"["https://app.example.com"]"#)]).await;
    let r = get_with_origin(&s.url, "https://evil.example").await;
    assert_eq!(h(&r, "access-control-allow-origin"), None);
    assert_eq!(
        h(&r, "access-control-allow-credentials")
            .as_deref()
            .filter(|_| false),
        None
    );
    let pre = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, s.hub_url())
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(h(&pre, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn preflight_is_cacheable_and_allows_the_headers_eventsource_polyfills_send() {
    let s = TestServer::start(&[
        ("cors.allowed_origins", r#"["https://app.example.com"]"#),
        ("cors.max_age", "\"1h\""),
    ])
    .await;
    let pre = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, s.hub_url())
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization, last-event-id, cache-control",
        )
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());
    assert_eq!(h(&pre, "access-control-max-age").as_deref(), Some("3600"));
    assert_eq!(
        h(&pre, "access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    let allowed = h(&pre, "access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    for needed in ["authorization", "last-event-id", "cache-control"] {
        assert!(allowed.contains(needed), "{needed} in {allowed}");
    }
    assert!(varies_on_origin(&pre));
}

#[tokio::test]
async fn star_only_without_credentials() {
    let s = TestServer::start(&[
        ("cors.allowed_origins", r#"["*"]"#),
        ("cors.allow_credentials", "false"),
    ])
    .await;
    let r = get_with_origin(&s.url, "https://whoever.example").await;
    assert_eq!(h(&r, "access-control-allow-origin").as_deref(), Some("*"));
    assert_eq!(h(&r, "access-control-allow-credentials"), None);

    let dir = tempfile::tempdir().unwrap();
    let err = config(dir.path(), &[("cors.allowed_origins", r#"["*"]"#)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("allow_credentials"),
        "start-up refuses * with credentials: {err}"
    );
}

#[tokio::test]
async fn cookie_publish_must_come_from_a_publish_origin() {
    let s =
        TestServer::start(&[("auth.publish_origins", r#"["https://admin.example.com"]"#)]).await;
    let tok = publisher_token();
    let post = |origin: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .post(s.hub_url())
            .header("cookie", format!("mercureAuthorization={tok}"))
            .form(&[("topic", "t"), ("data", "x")]);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    assert_eq!(
        post(Some("https://admin.example.com"))
            .await
            .unwrap()
            .status(),
        200
    );
    let refused = post(Some("https://evil.example")).await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(
        refused.json::<serde_json::Value>().await.unwrap()["code"],
        "origin_not_allowed"
    );
    assert_eq!(
        post(None).await.unwrap().status(),
        403,
        "no Origin nor Referer: refused"
    );
    // A bearer token is not sent automatically by browsers, so no CSRF check applies to it.
    assert_eq!(
        s.publish_raw(&[("topic", "t"), ("data", "x")], &tok)
            .await
            .status(),
        200
    );
}
