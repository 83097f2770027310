//! Herald inside your own axum app: the app has its own pages, its own login and its own routes, and mounts
//! Herald's router for everything else (`/.well-known/mercure`, `/connection/websocket`, `/api/…`).
//!
//! - `POST /login` checks a name and password, then sets two cookies: the app's session, and
//!   `mercureAuthorization`, a Herald token for that user (`sub`), sent only to the hub's path.
//! - `GET /` is the app's page: the user's private notes (`notes:#<user>`, a channel only that user can read)
//!   and a public activity feed, over one `EventSource` that carries the cookie (`withCredentials`).
//! - `POST /notes` is an app route that publishes in process, through `hub.publish`: no HTTP round trip, no
//!   publisher token, acknowledged once it is in Herald's log.
//!
//! ```sh
//! cargo run --example embed        # http://127.0.0.1:3003, log in as alice / wonderland or bob / builder
//! ```
//!
//! Settings from the environment: EMBED_LISTEN (127.0.0.1:3003), EMBED_DATA_DIR (herald-data-embed),
//! EMBED_JWT_KEY (Herald's key, which the app also signs the hub cookie with).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald::auth::{unix_now, Claims};
use herald::hub::NewPublication;
use herald::{Config, Hub};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Herald's settings, as they would be in a `herald.toml`.
const HERALD_CONFIG: &str = r#"
[auth]
jwt_key = "embed-example-secret"   # Herald verifies the hub cookie with it; the app signs that cookie
cookie_name = "mercureAuthorization"

[console]
enabled = false                    # this app's `/` is its own page (Herald's console would be there)

[[centrifugo.namespaces]]
name = "notes"                     # notes:#<user>: the `#` user list lets only that user read it
history_size = 100

[[retention]]
pattern = "*"                      # the public activity feed keeps its last 200
max_count = 200
"#;

/// The app's users. A real app has a user table with password hashes.
const USERS: &[(&str, &str)] = &[("alice", "wonderland"), ("bob", "builder")];
/// How long a login lasts: the app's session and the hub cookie alike.
const SESSION_SECS: u64 = 8 * 3600;

#[derive(Clone)]
struct App {
    hub: Hub,
    /// Herald's key: a token signed with it is what Herald accepts from the browser.
    hub_key: Arc<EncodingKey>,
    hub_cookie: String,
    /// The app's own session key, which Herald never sees.
    session: Arc<(EncodingKey, DecodingKey)>,
}

#[derive(Serialize, Deserialize)]
struct Session {
    sub: String,
    exp: u64,
}

/// Builds Herald (hub + router) from `config` and mounts it beside the app's routes.
async fn app(config: Config, session_secret: &[u8]) -> anyhow::Result<(Router, Hub)> {
    let engine = herald::server::open_engine(&config).await?;
    let hub = Hub::new(engine, herald::server::hub_options(&config)).await?;
    let key = config.auth.jwt_key.as_deref().context("auth.jwt_key")?;
    let state = App {
        hub: hub.clone(),
        hub_key: Arc::new(
            herald::auth::encoding_key(key, Algorithm::HS256).map_err(anyhow::Error::msg)?,
        ),
        hub_cookie: config.auth.cookie_name.clone(),
        session: Arc::new((
            EncodingKey::from_secret(session_secret),
            DecodingKey::from_secret(session_secret),
        )),
    };
    let herald = herald::router(hub.clone(), config)?;
    let app = Router::new()
        .route("/", get(home))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/notes", post(add_note))
        .with_state(state)
        // Herald's routes (the hub, the WebSocket endpoint, the server API, the console under /console)
        // next to the app's own; `/` stays the app's.
        .merge(herald);
    Ok((app, hub))
}

// --- Sessions ----------------------------------------------------------------------------------------------

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The logged-in user, from the app's session cookie.
fn user(app: &App, headers: &HeaderMap) -> Option<String> {
    let token = cookie(headers, "session")?;
    let data =
        jsonwebtoken::decode::<Session>(token, &app.session.1, &Validation::new(Algorithm::HS256))
            .ok()?;
    Some(data.claims.sub)
}

fn set_cookie(response: &mut Response, value: String) {
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&value).expect("cookie value"),
    );
}

// --- Routes ------------------------------------------------------------------------------------------------

async fn home(State(app): State<App>, headers: HeaderMap) -> Html<String> {
    match user(&app, &headers) {
        Some(user) => Html(notes_page(&user)),
        None => Html(login_page(None)),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login(State(app): State<App>, Form(form): Form<LoginForm>) -> Response {
    let known = USERS
        .iter()
        .any(|(u, p)| *u == form.user && *p == form.password);
    if !known {
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_page(Some("Wrong name or password."))),
        )
            .into_response();
    }
    let exp = unix_now() + SESSION_SECS;
    let session = Session {
        sub: form.user.clone(),
        exp,
    };
    let session = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &session, &app.session.0)
        .expect("sign");
    // What Herald needs to know about the user: who it is (the `#` user list of notes:#<user> admits only
    // that `sub`), and until when. No other grant: the activity feed is public.
    let claims = Claims {
        sub: Some(form.user),
        exp: Some(exp),
        ..Default::default()
    };
    let hub_token = herald::auth::sign(&claims, Algorithm::HS256, &app.hub_key).expect("sign");
    let mut response = Redirect::to("/").into_response();
    set_cookie(
        &mut response,
        format!("session={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={SESSION_SECS}"),
    );
    // Sent to the hub's path only, unreadable by scripts. With Herald on another origin (a subdomain), set
    // Domain= and SameSite=None; Secure, and list this app's origin in Herald's cors.allowed_origins.
    set_cookie(&mut response, format!(
        "{}={hub_token}; Path=/.well-known/mercure; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}",
        app.hub_cookie
    ));
    response
}

async fn logout(State(app): State<App>) -> Response {
    let mut response = Redirect::to("/").into_response();
    set_cookie(
        &mut response,
        "session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0".into(),
    );
    set_cookie(
        &mut response,
        format!(
            "{}=; Path=/.well-known/mercure; HttpOnly; SameSite=Strict; Max-Age=0",
            app.hub_cookie
        ),
    );
    response
}

#[derive(Deserialize)]
struct NoteIn {
    text: String,
}

/// An app route that publishes: the note to its author's private channel, a line to the public feed.
async fn add_note(
    State(app): State<App>,
    headers: HeaderMap,
    Json(note): Json<NoteIn>,
) -> Response {
    let Some(user) = user(&app, &headers) else {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "log in first"})),
        )
            .into_response();
    };
    let text = note.text.trim();
    if text.is_empty() || text.len() > 2000 {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "a note is 1 to 2000 bytes"})),
        )
            .into_response();
    }
    let at = unix_now();
    let publish = |topic: String, data: serde_json::Value| {
        app.hub.publish(NewPublication {
            topics: vec![topic],
            data: data.to_string().into(),
            ..Default::default()
        })
    };
    let result = async {
        let note = publish(
            format!("notes:#{user}"),
            json!({"kind": "note", "text": text, "at": at}),
        )
        .await?;
        publish(
            "activity".into(),
            json!({"kind": "activity", "user": user, "at": at}),
        )
        .await?;
        Ok::<_, herald::hub::HubError>(note)
    }
    .await;
    match result {
        // Acknowledged: in Herald's log, and on its way to the user's open pages.
        Ok(p) => Json(json!({"id": p.record.id})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

// --- Pages -------------------------------------------------------------------------------------------------

const STYLE: &str = "<style>
  * { box-sizing: border-box; }
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 46rem; margin: 0 auto; padding: 1rem; color: #111827; }
  header { display: flex; align-items: center; gap: 1rem; } h1 { font-size: 1.2rem; margin: 0 auto 0 0; }
  h2 { font-size: .8rem; text-transform: uppercase; letter-spacing: .04em; color: #6b7280; margin: 1.4rem 0 .4rem; }
  form { display: flex; gap: .4rem; flex-wrap: wrap; } input { flex: 1; min-width: 8rem; font: inherit; padding: .45rem .6rem; border: 1px solid #cbd0d8; border-radius: 6px; }
  button { font: inherit; padding: .45rem .9rem; border: 0; border-radius: 6px; background: #2563eb; color: #fff; cursor: pointer; }
  button.quiet { background: #e5e7eb; color: #111827; }
  ul { list-style: none; margin: 0; padding: 0; } li { padding: .35rem 0; border-bottom: 1px solid #f1f2f4; overflow-wrap: anywhere; }
  time { color: #6b7280; font-size: .8rem; margin-left: .5rem; } .error { color: #b91c1c; } #status { color: #6b7280; font-size: .85rem; }
  .login { max-width: 22rem; margin: 4rem auto; display: grid; gap: .5rem; } .login input { width: 100%; }
</style>";

fn login_page(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" id=\"error\">{e}</p>"))
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Log in · Notes</title><link rel=\"icon\" href=\"data:,\">{STYLE}</head><body>\
         <form class=\"login\" method=\"post\" action=\"/login\"><h1>Notes</h1>{error}\
         <input name=\"user\" id=\"user\" placeholder=\"name (alice or bob)\" autocomplete=\"username\" required>\
         <input name=\"password\" id=\"password\" type=\"password\" placeholder=\"password (wonderland, builder)\" autocomplete=\"current-password\" required>\
         <button>Log in</button></form></body></html>"
    )
}

fn notes_page(user: &str) -> String {
    // The user name goes into the page as a JSON string (names are the app's own, but escape anyway).
    let user_json = serde_json::to_string(user)
        .expect("json")
        .replace('<', "\\u003c");
    let user_html = user.replace('&', "&amp;").replace('<', "&lt;");
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Notes of {user_html}</title><link rel="icon" href="data:,">{STYLE}</head><body>
<header><h1>Notes of {user_html}</h1><form method="post" action="/logout"><button class="quiet">Log out</button></form></header>
<p id="status">connecting…</p>
<form id="note"><input id="text" placeholder="a note (only you will see it)" autocomplete="off"><button>Save</button></form>
<p class="error" id="note-error"></p>
<h2>Your notes</h2><ul id="notes"></ul>
<h2>Everyone's activity</h2><ul id="activity"></ul>
<script>
const user = {user_json};
const $ = (id) => document.getElementById(id);
const time = (at) => Object.assign(document.createElement('time'), {{ textContent: new Date(at * 1000).toLocaleTimeString() }});
function item(text, at) {{
  const li = document.createElement('li');
  li.append(document.createTextNode(text), time(at));
  return li;
}}

// One stream for both topics, from the start of their retained history. The hub cookie travels with it:
// same origin here; with Herald on another origin, withCredentials is what sends it.
const url = new URL('/.well-known/mercure', location.href);
url.searchParams.append('topic', 'notes:#' + user);
url.searchParams.append('topic', 'activity');
url.searchParams.set('lastEventID', 'earliest');
const es = new EventSource(url, {{ withCredentials: true }});
es.onopen = () => {{ $('status').textContent = 'live'; }};
es.onerror = () => {{
  // CLOSED: Herald refused the stream (the hub cookie expired with the session): log in again.
  $('status').textContent = es.readyState === EventSource.CLOSED ? 'session ended: log in again' : 'reconnecting…';
  if (es.readyState === EventSource.CLOSED) location.reload();
}};
es.onmessage = (e) => {{
  const d = JSON.parse(e.data);
  if (d.kind === 'note') $('notes').prepend(item(d.text, d.at));
  if (d.kind === 'activity') $('activity').prepend(item(d.user === user ? 'you saved a note' : d.user + ' saved a note', d.at));
}};

// Saving goes through the app's own route, which publishes with hub.publish; the note comes back above.
$('note').addEventListener('submit', async (e) => {{
  e.preventDefault();
  const text = $('text').value.trim();
  if (!text) return;
  const res = await fetch('/notes', {{ method: 'POST', headers: {{ 'content-type': 'application/json' }}, body: JSON.stringify({{ text }}) }});
  if (res.ok) {{ $('text').value = ''; $('note-error').textContent = ''; }}
  else $('note-error').textContent = (await res.json()).error;
}});
</script></body></html>"#
    )
}

// --- Main --------------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut config: Config = toml::from_str(HERALD_CONFIG)?;
    config.data_dir = std::env::var("EMBED_DATA_DIR")
        .unwrap_or_else(|_| "herald-data-embed".into())
        .into();
    if let Ok(key) = std::env::var("EMBED_JWT_KEY") {
        config.auth.jwt_key = Some(key);
    }
    // The session key would come from the app's own secrets; a random one logs everyone out on restart.
    let session_secret = uuid::Uuid::new_v4().to_string();
    let (app, hub) = app(config, session_secret.as_bytes()).await?;

    let listen = std::env::var("EMBED_LISTEN").unwrap_or_else(|_| "127.0.0.1:3003".into());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    println!("embed example on http://{}", listener.local_addr()?);
    // Herald's streams end when its hub shuts down, which lets axum's graceful shutdown finish.
    let shutdown = {
        let hub = hub.clone();
        async move {
            herald::server::shutdown_signal().await;
            let _ = hub.shutdown().await;
        }
    };
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The app in process: log in, subscribe with the cookies the login set, publish through the app's route,
    //! receive it; nobody else can read it.
    use std::time::Duration;

    use futures_util::StreamExt;
    use herald::config::LogBackend;

    use super::*;

    async fn start() -> String {
        let mut config: Config = toml::from_str(HERALD_CONFIG).unwrap();
        config.log.backend = LogBackend::Memory;
        let (app, _hub) = app(config, b"test session key").await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        url
    }

    /// A browser-like client: it keeps cookies, and follows no redirect (so a test sees the login's answer).
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    async fn login(url: &str, user: &str, password: &str) -> reqwest::Client {
        let c = client();
        let res = c
            .post(format!("{url}/login"))
            .form(&[("user", user), ("password", password)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "{user} logs in");
        c
    }

    fn stream_url(url: &str, topic: &str) -> String {
        format!(
            "{url}/.well-known/mercure?topic={}",
            topic.replace('#', "%23")
        )
    }

    /// Reads the SSE stream until `needle` appears (or fails after 10 s).
    async fn read_until(res: reqwest::Response, needle: &str) -> String {
        let mut body = res.bytes_stream();
        let mut seen = String::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(chunk) = body.next().await {
                seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                if seen.contains(needle) {
                    return;
                }
            }
            panic!("the stream ended without {needle:?}: {seen}");
        })
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} within 10 s: {seen}"));
        seen
    }

    #[tokio::test]
    async fn login_then_a_note_published_by_the_app_reaches_its_author_only() {
        let url = start().await;
        assert!(client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("action=\"/login\""));
        let wrong = client()
            .post(format!("{url}/login"))
            .form(&[("user", "alice"), ("password", "nope")])
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

        let alice = login(&url, "alice", "wonderland").await;
        assert!(alice
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("Notes of alice"));
        // The hub cookie set by the login is the only credential of this stream.
        let stream = alice
            .get(stream_url(&url, "notes:#alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        let mut stream = stream;
        // The opening comment: the subscription is registered, so a publish from now on is delivered.
        let first = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(first.starts_with(b":"), "{first:?}");

        let res = alice
            .post(format!("{url}/notes"))
            .json(&json!({"text": "buy milk"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let id = res.json::<serde_json::Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let seen = read_until(stream, "buy milk").await;
        assert!(
            seen.contains(&format!("id: {id}")),
            "the event carries the id the route returned: {seen}"
        );

        // Bob is logged in too, but alice's notes are not his to read; nor anyone's without logging in.
        let bob = login(&url, "bob", "builder").await;
        let refused = bob
            .get(stream_url(&url, "notes:#alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let anonymous = client()
            .get(stream_url(&url, "notes:#alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
        let res = client()
            .post(format!("{url}/notes"))
            .json(&json!({"text": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            StatusCode::UNAUTHORIZED,
            "the app's route wants a session"
        );

        // Bob's own stream has his note and the public activity, never alice's text.
        let mut mine = bob
            .get(format!(
                "{}&topic=activity&lastEventID=earliest",
                stream_url(&url, "notes:#bob")
            ))
            .send()
            .await
            .unwrap();
        let _ = mine.chunk().await;
        bob.post(format!("{url}/notes"))
            .json(&json!({"text": "fix the roof"}))
            .send()
            .await
            .unwrap();
        let seen = read_until(mine, "fix the roof").await;
        assert!(
            seen.contains(r#""user":"alice""#),
            "alice's activity, replayed from history: {seen}"
        );
        assert!(!seen.contains("buy milk"), "{seen}");

        // Herald's other routes are there too, behind the app's.
        let health = client().get(format!("{url}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
    }
}
