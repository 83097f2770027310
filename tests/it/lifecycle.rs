//! The process's life with the real binary: what clients see when the operator presses Ctrl-C.

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::process::Herald;
use crate::wsclient::*;

async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Ctrl-C: every WebSocket gets the documented 3001 (not 1006: the process used to exit before the
/// upgraded sockets wrote their close frames), a y-websocket connection 1012 ("restarting", so the
/// provider reconnects), an SSE stream ends cleanly, and the process exits 0.
#[tokio::test]
async fn ctrl_c_closes_websockets_with_3001_and_ends_streams() {
    let mut h = Herald::start(
        &["--allow-anonymous", "--set", "yjs.anonymous=\"write\""],
        &[],
    )
    .await;
    let ws_url = format!("{}/connection/websocket", h.url.replace("http://", "ws://"));
    let connect = || async {
        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
        ws.send(Message::Text(
            json!({"id": 1, "connect": {}}).to_string().into(),
        ))
        .await
        .unwrap();
        Ws {
            inner: ws,
            pending: Default::default(),
        }
    };
    use futures_util::SinkExt;
    let mut subscribed = connect().await;
    assert!(next(&mut subscribed).await["connect"].is_object());
    let r = call(
        &mut subscribed,
        2,
        json!({"subscribe": {"channel": "news"}}),
    )
    .await;
    assert!(r["subscribe"].is_object(), "{r}");
    let mut bare = connect().await;
    assert!(next(&mut bare).await["connect"].is_object());
    let mut sse = Sse::get(&subscribe_url(&h.url, &["news"], &[])).await;
    assert_eq!(sse.status, 200);
    // A y-websocket connection, which waits on its document's queue rather than on the shutdown itself.
    let yjs_url = format!("{}/yjs/lifecycle", h.url.replace("http://", "ws://"));
    let (yjs, _) = tokio_tungstenite::connect_async(&yjs_url).await.unwrap();
    let mut yjs = Ws {
        inner: yjs,
        pending: Default::default(),
    };
    let first = tokio::time::timeout(WAIT, yjs.next())
        .await
        .expect("the server's sync step 1 in time");
    assert!(
        matches!(first, Some(Ok(Message::Binary(_)))),
        "joined the document: {first:?}"
    );

    h.signal("INT");
    assert_eq!(close_code(&mut subscribed).await, Some(3001));
    assert_eq!(
        close_code(&mut bare).await,
        Some(3001),
        "a connection without subscriptions too"
    );
    assert_eq!(
        close_code(&mut yjs).await,
        Some(1012),
        "a y-websocket connection is told the server restarts"
    );
    assert!(sse.wait_end(WAIT).await, "the SSE stream ends");
    assert!(h.exited().await.success());
}
