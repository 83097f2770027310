//! Web Push against a push service of our own on 127.0.0.1:0 that answers what each test scripts: the
//! retries after 429 and 5xx (with and without Retry-After), the bound on them, the removal of a gone
//! subscription, the request itself (encryption, VAPID, TTL, Urgency), the browser API's checks, and no
//! push for a user who is connected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};

use crate::common::*;
use crate::wsclient::{self, API_KEY};

/// What the mock push service saw.
pub(crate) struct Seen {
    pub device: String,
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Answers in order: (status, Retry-After); the last one repeats.
struct Mock {
    script: Mutex<Vec<(u16, Option<&'static str>)>>,
    seen: mpsc::UnboundedSender<Seen>,
}

async fn handle(
    State(m): State<Arc<Mock>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let _ = m.seen.send(Seen {
        device,
        at: Instant::now(),
        headers,
        body: body.to_vec(),
    });
    let mut s = m.script.lock().await;
    let (status, retry) = if s.len() > 1 { s.remove(0) } else { s[0] };
    let mut h = HeaderMap::new();
    if let Some(r) = retry {
        h.insert("retry-after", r.parse().unwrap());
    }
    (StatusCode::from_u16(status).unwrap(), h, "")
}

pub(crate) struct PushService {
    pub url: String,
    mock: Arc<Mock>,
    pub(crate) rx: mpsc::UnboundedReceiver<Seen>,
}

impl PushService {
    pub(crate) async fn start(script: Vec<(u16, Option<&'static str>)>) -> PushService {
        let (tx, rx) = mpsc::unbounded_channel();
        let mock = Arc::new(Mock {
            script: Mutex::new(script),
            seen: tx,
        });
        let app = axum::Router::new()
            .route("/push/{device}", axum::routing::post(handle))
            .with_state(mock.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        PushService { url, mock, rx }
    }

    pub(crate) async fn script(&self, script: Vec<(u16, Option<&'static str>)>) {
        *self.mock.script.lock().await = script;
    }

    pub(crate) async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a push arrives in time")
            .expect("mock running")
    }
}

/// A browser's keys for one device.
pub(crate) struct Device {
    secret: p256::SecretKey,
    auth: [u8; 16],
}

impl Device {
    pub(crate) fn new(seed: u8) -> Device {
        Device {
            secret: p256::SecretKey::from_slice(&[seed; 32]).unwrap(),
            auth: [seed.wrapping_add(1); 16],
        }
    }

    pub(crate) fn subscription(&self, endpoint: &str) -> Value {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        json!({
            "endpoint": endpoint,
            "expirationTime": null,
            "keys": {
                "p256dh": b.encode(self.secret.public_key().to_encoded_point(false).as_bytes()),
                "auth": b.encode(self.auth),
            }
        })
    }

    pub(crate) fn open(&self, body: &[u8]) -> Value {
        let auth = web_push_native::Auth::from(self.auth);
        let plain = web_push_native::decrypt(body.to_vec(), &self.secret, &auth)
            .expect("the push decrypts with the device's keys");
        serde_json::from_slice(&plain).unwrap()
    }
}

/// The claims of the VAPID token a push carries, checked: its `k=` is `public_key` and the token is
/// signed by that key, for the push service at `audience`.
pub(crate) fn vapid_claims(h: &HeaderMap, public_key: &str, audience: &str) -> Value {
    let auth = h["authorization"].to_str().unwrap();
    let (token, k) = auth
        .strip_prefix("vapid t=")
        .and_then(|r| r.split_once(", k="))
        .expect("vapid t=..., k=...");
    assert_eq!(k, public_key);
    let point = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(k)
        .unwrap();
    let pem = {
        use p256::pkcs8::EncodePublicKey;
        p256::PublicKey::from_sec1_bytes(&point)
            .unwrap()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
    };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[audience]);
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        &v,
    )
    .expect("a VAPID token signed by the key Herald publishes, for the push service's origin")
    .claims
}

/// The settings of a node with push on, sending to a mock on loopback.
pub(crate) const PUSH_ON: [(&str, &str); 6] = [
    ("inbox.enabled", "true"),
    ("inbox.push.enabled", "true"),
    ("inbox.push.subject", "\"mailto:ops@example.com\""),
    ("inbox.push.allow_insecure_endpoints", "true"),
    ("inbox.push.workers", "1"),
    ("inbox.push.retry_delay", "\"100ms\""),
];

async fn start(extra: &[(&str, &str)]) -> TestServer {
    let key = format!("{API_KEY:?}");
    let mut o: Vec<(&str, &str)> = vec![("centrifugo.api_key", &key)];
    o.extend_from_slice(&PUSH_ON);
    o.extend_from_slice(extra);
    TestServer::start(&o).await
}

pub(crate) fn user_token(sub: &str) -> String {
    wsclient::sign_json(&json!({"sub": sub, "exp": herald::auth::unix_now() + 600}))
}

pub(crate) async fn browser(
    s: &TestServer,
    user: &str,
    method: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let c = reqwest::Client::new();
    let url = format!("{}/inbox/push/subscriptions", s.url);
    let req = match method {
        "GET" => c.get(url),
        "POST" => c.post(url),
        "DELETE" => c.delete(url),
        m => panic!("method {m}"),
    }
    .bearer_auth(user_token(user));
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    get_json(req).await
}

pub(crate) async fn notify(s: &TestServer, users: &[&str], title: &str) {
    notify_at(&s.url, users, title).await;
}

pub(crate) async fn notify_at(url: &str, users: &[&str], title: &str) {
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{url}/api/inbox_notify"))
            .header("x-api-key", API_KEY)
            .json(&json!({"users": users, "item": {"title": title, "body": "b"}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

pub(crate) async fn subscribe(s: &TestServer, user: &str, device: &Device, endpoint: &str) {
    subscribe_at(&s.url, user, device, endpoint).await;
}

pub(crate) async fn subscribe_at(url: &str, user: &str, device: &Device, endpoint: &str) {
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{url}/inbox/push/subscriptions"))
            .bearer_auth(user_token(user))
            .json(&device.subscription(endpoint)),
    )
    .await;
    assert_eq!(status, 201, "{v}");
}

/// `herald serve` arguments for a process with push on (as [`PUSH_ON`]) and the test keys, plus
/// `extra` settings.
pub(crate) fn push_args(extra: &[(&str, &str)]) -> Vec<String> {
    let mut sets: Vec<String> = vec![
        format!("auth.jwt_key={:?}", crate::common::KEY),
        format!("centrifugo.api_key={API_KEY:?}"),
    ];
    sets.extend(PUSH_ON.iter().chain(extra).map(|(k, v)| format!("{k}={v}")));
    sets.into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

/// Waits (bounded) until `read` returns what `done` accepts; returns it.
pub(crate) async fn wait_until<T, F>(
    what: &str,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T
where
    F: std::future::Future<Output = T>,
    T: std::fmt::Debug,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let v = read().await;
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: still {v:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A push held back by a push service's 429 is recorded, so a process killed with -9 during the
/// backoff leaves it to the next start, which sends it once. Before the kill the notify was
/// acknowledged and the push service had refused the push once.
#[tokio::test]
async fn a_push_waiting_out_a_429_survives_kill_9_and_is_sent_once() {
    use crate::process::Herald;
    let mut ps = PushService::start(vec![(429, Some("2")), (201, None)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let args = push_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut h = Herald::start_in(dir.path(), &args, &[]).await;
    let phone = Device::new(41);
    subscribe_at(&h.url, "alice", &phone, &format!("{}/push/phone", ps.url)).await;
    notify_at(&h.url, &["alice"], "survives").await;

    let refused = ps.next().await;
    assert_eq!(phone.open(&refused.body)["title"], "survives");
    h.signal("KILL");
    assert!(!h.exited().await.success());

    let h = Herald::start_in(dir.path(), &args, &[]).await;
    let sent = ps.next().await;
    assert_eq!(sent.device, "phone");
    let v = phone.open(&sent.body);
    assert_eq!(v["title"], "survives");
    assert_eq!(
        v["id"],
        phone.open(&refused.body)["id"],
        "the same notification"
    );
    assert!(
        sent.at - refused.at >= Duration::from_millis(1900),
        "Retry-After: 2 held across the restart, waited {:?}",
        sent.at - refused.at
    );
    // Once: the pending push is gone after the 201, and nothing else was sent.
    wait_until(
        "the pending push is finished",
        || h.metric("herald_inbox_push_pending"),
        |n| *n == 0.0,
    )
    .await;
    assert_eq!(h.metric("herald_inbox_push_sent_total").await, 1.0);
    assert!(ps.rx.try_recv().is_err(), "no second copy");
}

/// Killed with -9 right after the notify is acknowledged, before the push was even tried: the next
/// start finds the notification in the outbox or its push recorded, and sends it once.
#[tokio::test]
async fn a_push_not_yet_tried_survives_kill_9_right_after_the_ack() {
    use crate::process::Herald;
    let mut ps = PushService::start(vec![(429, Some("1")), (201, None)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let args = push_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut h = Herald::start_in(dir.path(), &args, &[]).await;
    let laptop = Device::new(43);
    subscribe_at(&h.url, "bob", &laptop, &format!("{}/push/laptop", ps.url)).await;
    notify_at(&h.url, &["bob"], "right after").await;
    h.signal("KILL");
    assert!(!h.exited().await.success());

    let h = Herald::start_in(dir.path(), &args, &[]).await;
    // The mock answers its first request 429, the others 201: whether the 429 came before the kill or
    // after the start, the second request is the one sent, and there is no third.
    let titles = [ps.next().await, ps.next().await].map(|seen| {
        laptop.open(&seen.body)["title"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    });
    assert!(titles.iter().all(|t| t == "right after"), "{titles:?}");
    wait_until(
        "the pending push is finished",
        || h.metric("herald_inbox_push_pending"),
        |n| *n == 0.0,
    )
    .await;
    assert_eq!(h.metric("herald_inbox_push_sent_total").await, 1.0);
    assert!(ps.rx.try_recv().is_err(), "no second copy");
}

#[tokio::test]
async fn retries_429_and_5xx_after_retry_after_and_sends_a_valid_push() {
    let mut ps = PushService::start(vec![(429, Some("1")), (503, None), (201, None)]).await;
    let s = start(&[
        ("inbox.push.ttl", "\"1h\""),
        ("inbox.push.urgency", "\"high\""),
    ])
    .await;
    let (status, vapid) =
        get_json(reqwest::Client::new().get(format!("{}/inbox/push/vapid", s.url))).await;
    assert_eq!(status, 200, "{vapid}");
    let public_key = vapid["public_key"].as_str().unwrap().to_string();

    let phone = Device::new(3);
    subscribe(&s, "alice", &phone, &format!("{}/push/phone", ps.url)).await;
    notify(&s, &["alice"], "Hello").await;

    let a = ps.next().await;
    let b = ps.next().await;
    let c = ps.next().await;
    assert!(
        b.at - a.at >= Duration::from_millis(950),
        "Retry-After: 1 honoured, waited {:?}",
        b.at - a.at
    );
    assert!(
        c.at - b.at >= Duration::from_millis(90),
        "the retry delay after a 503 without Retry-After, waited {:?}",
        c.at - b.at
    );
    for seen in [&a, &b, &c] {
        assert_eq!(seen.device, "phone");
        let v = phone.open(&seen.body);
        assert_eq!(v["title"], "Hello");
        assert_eq!(v["type"], "inbox");
        assert_eq!(v["category"], "general");
        assert!(v["id"].as_i64().unwrap() > 0);
    }
    let h = &c.headers;
    assert_eq!(h["content-encoding"], "aes128gcm");
    assert_eq!(h["ttl"], "3600");
    assert_eq!(h["urgency"], "high");
    let claims = vapid_claims(h, &public_key, &ps.url);
    assert_eq!(claims["sub"], "mailto:ops@example.com");

    // Delivered, so the subscription stays.
    let (_, list) = browser(&s, "alice", "GET", None).await;
    assert_eq!(list["subscriptions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn retries_are_bounded_and_a_gone_subscription_is_removed() {
    let mut ps = PushService::start(vec![(500, None)]).await;
    let s = start(&[("inbox.push.retries", "2")]).await;
    let laptop = Device::new(5);
    subscribe(&s, "alice", &laptop, &format!("{}/push/laptop", ps.url)).await;

    notify(&s, &["alice"], "first").await;
    for _ in 0..3 {
        let seen = ps.next().await;
        assert_eq!(laptop.open(&seen.body)["title"], "first");
    }
    // One worker sends in order: the next request is the next notification's, so "first" was tried
    // exactly 1 + retries times.
    ps.script(vec![(410, None)]).await;
    notify(&s, &["alice"], "second").await;
    let seen = ps.next().await;
    assert_eq!(laptop.open(&seen.body)["title"], "second");

    let deadline = Instant::now() + WAIT;
    loop {
        let (_, list) = browser(&s, "alice", "GET", None).await;
        if list["subscriptions"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a 410 removes the subscription: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_connected_user_gets_no_push_and_preferences_turn_it_off() {
    let mut ps = PushService::start(vec![(201, None)]).await;
    let s = start(&[]).await;
    let (alice, bob, carol) = (Device::new(7), Device::new(9), Device::new(11));
    subscribe(&s, "alice", &alice, &format!("{}/push/alice", ps.url)).await;
    subscribe(&s, "bob", &bob, &format!("{}/push/bob", ps.url)).await;
    subscribe(&s, "carol", &carol, &format!("{}/push/carol", ps.url)).await;

    let url = subscribe_url(
        &s.url,
        &["inbox:#alice"],
        &[("authorization", user_token("alice").as_str())],
    );
    let mut sse = Sse::get(&url).await;
    assert_eq!(sse.status, 200);
    wait_subscriptions(&s, 1).await;
    let (status, _) = get_json(
        reqwest::Client::new()
            .put(format!("{}/inbox/preferences", s.url))
            .bearer_auth(user_token("carol"))
            .json(&json!({"categories": {"general": {"push": false}}})),
    )
    .await;
    assert_eq!(status, 200);

    notify(&s, &["alice", "carol"], "while connected").await;
    let ev = sse.next_event().await.expect("alice reads it live");
    assert!(ev.data.contains("while connected"));
    notify(&s, &["bob"], "marker").await;
    // One worker, in order: had alice's or carol's been queued, it would come before bob's.
    let seen = ps.next().await;
    assert_eq!(seen.device, "bob");
    assert_eq!(bob.open(&seen.body)["title"], "marker");

    // Once the connection is gone, pushes go out again.
    drop(sse);
    wait_subscriptions(&s, 0).await;
    notify(&s, &["alice"], "after").await;
    let seen = ps.next().await;
    assert_eq!(seen.device, "alice");
    assert_eq!(alice.open(&seen.body)["title"], "after");

    // A notification to every inbox pushes too, by the same rules: alice and bob, not carol (general is
    // off for her); her push in another category comes next, so none of hers was queued before it.
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{}/api/inbox_notify", s.url))
            .header("x-api-key", API_KEY)
            .json(&json!({"audience": {"all": true}, "item": {"title": "everyone"}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let mut got = [ps.next().await, ps.next().await];
    got.sort_by(|a, b| a.device.cmp(&b.device));
    assert_eq!(got[0].device, "alice");
    assert_eq!(alice.open(&got[0].body)["title"], "everyone");
    assert_eq!(got[1].device, "bob");
    assert_eq!(bob.open(&got[1].body)["title"], "everyone");
    let (status, v) = get_json(
        reqwest::Client::new()
            .post(format!("{}/api/inbox_notify", s.url))
            .header("x-api-key", API_KEY)
            .json(&json!({"users": ["carol"], "item": {"title": "mentioned", "category": "mentions"}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let seen = ps.next().await;
    assert_eq!(seen.device, "carol");
    assert_eq!(carol.open(&seen.body)["title"], "mentioned");
}

#[tokio::test]
async fn the_browser_api_checks_what_it_keeps() {
    let s = start(&[("inbox.push.max_subscriptions", "2")]).await;
    let d = Device::new(13);
    let mut bad = d.subscription("http://push.example.com/x");
    let (status, v) = browser(&s, "alice", "POST", Some(bad.clone())).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_endpoint")),
        "{v}"
    );
    bad["endpoint"] = json!("https://push.example.com/x");
    bad["keys"]["auth"] = json!("c2hvcnQ");
    let (status, v) = browser(&s, "alice", "POST", Some(bad)).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_key")),
        "{v}"
    );
    let (status, _) = get_json(
        reqwest::Client::new()
            .post(format!("{}/inbox/push/subscriptions", s.url))
            .json(&d.subscription("https://push.example.com/x")),
    )
    .await;
    assert_eq!(status, 401, "a token is required");

    for i in 0..3 {
        subscribe(&s, "alice", &d, &format!("https://push.example.com/{i}")).await;
    }
    let (_, list) = browser(&s, "alice", "GET", None).await;
    let eps: Vec<&str> = list["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        eps,
        ["https://push.example.com/1", "https://push.example.com/2"]
    );
    assert!(
        list["subscriptions"][0].get("auth").is_none(),
        "keys are not echoed"
    );

    let (_, bobs) = browser(&s, "bob", "GET", None).await;
    assert_eq!(bobs["subscriptions"], json!([]));
    let gone = json!({"endpoint": "https://push.example.com/1"});
    let (status, v) = browser(&s, "bob", "DELETE", Some(gone.clone())).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (404, Some("subscription_not_found"))
    );
    let (status, _) = browser(&s, "alice", "DELETE", Some(gone)).await;
    assert_eq!(status, 200);
    let (_, list) = browser(&s, "alice", "GET", None).await;
    assert_eq!(list["subscriptions"].as_array().unwrap().len(), 1);

    // The API description served by Herald lists these endpoints.
    let (_, spec) =
        get_json(reqwest::Client::new().get(format!("{}/api/openapi.json", s.url))).await;
    let ops = &spec["paths"]["/inbox/push/subscriptions"];
    assert!(ops["get"].is_object() && ops["post"].is_object() && ops["delete"].is_object());
    assert!(spec["paths"]["/inbox/push/vapid"]["get"].is_object());
    assert!(spec["paths"]["/api/inbox_notify"]["post"].is_object());

    let off = TestServer::start(&[("inbox.enabled", "true")]).await;
    let (status, v) =
        get_json(reqwest::Client::new().get(format!("{}/inbox/push/vapid", off.url))).await;
    assert_eq!((status, v["code"].as_str()), (404, Some("push_disabled")));
}

#[tokio::test]
async fn push_config_is_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let e = config(
        dir.path(),
        &[("inbox.enabled", "true"), ("inbox.push.enabled", "true")],
    )
    .unwrap_err();
    assert!(e.to_string().contains("inbox.push.subject"), "{e}");
    let e = config(
        dir.path(),
        &[
            ("inbox.push.enabled", "true"),
            ("inbox.push.subject", "\"mailto:a@example.com\""),
        ],
    )
    .unwrap_err();
    assert!(e.to_string().contains("needs inbox.enabled"), "{e}");
    // A VAPID key file that is not a key stops the start with its path.
    std::fs::write(dir.path().join("vapid.pem"), "nonsense").unwrap();
    let c = config(
        dir.path(),
        &[
            ("inbox.enabled", "true"),
            ("inbox.push.enabled", "true"),
            ("inbox.push.subject", "\"mailto:a@example.com\""),
        ],
    )
    .unwrap();
    let engine = herald::server::open_engine(&c).await.unwrap();
    let e = herald::Server::bind_with(c, engine)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("vapid.pem"), "{e}");
}
