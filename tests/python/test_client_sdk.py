"""Herald driven by centrifuge-python, Centrifugo's official Python client SDK (0.7), with each of its codecs:
JSON (text frames) and Protobuf (`use_protobuf=True`: binary frames, the `centrifuge-protobuf` subprotocol).
Every test runs once per codec."""

import time

import pytest
from cent import PublishRequest
from centrifuge import ClientState, ReplyError, StreamPosition, SubscriptionState

from conftest import KEY, token
from harness import BINARY, TEXT, Proxy, sign, unique, until, until_time


async def test_wire_encoding(herald, peers, api, codec):
    """The codec is really in use on the wire: Protobuf is negotiated as a subprotocol and every frame is
    binary; JSON frames are text."""
    proxy = await Proxy(herald.port).start()
    try:
        peer = peers(token(unique("u-")), address=proxy.ws_url())
        await peer.connect()
        channel = unique("news:wire-")
        _, rec = await peer.subscribe(channel)
        await api.publish(PublishRequest(channel=channel, data={"over": "the wire"}))
        assert codec.dec((await rec.first("publication")).pub.data) == {"over": "the wire"}
        await peer.close()
    finally:
        await proxy.close()

    [(up, down)] = proxy.sniffers
    negotiated = "sec-websocket-protocol: centrifuge-protobuf" in down.head.lower()
    assert negotiated == codec.protobuf, down.head
    want = BINARY if codec.protobuf else TEXT
    for direction, sniffer in (("server->client", down), ("client->server", up)):
        data = [op for op in sniffer.opcodes if op in (TEXT, BINARY)]
        assert len(data) >= 2, f"{direction}: {sniffer.opcodes}"
        assert set(data) == {want}, f"{direction} frames are {codec} ({want}): {sniffer.opcodes}"


async def test_connect_subscribe_receive(peers, api, codec):
    user = unique("u-")
    peer = peers(token(user))
    connected = await peer.connect()
    assert connected.client and connected.version, connected
    assert peer.client.state == ClientState.CONNECTED

    channel = unique("news:recv-")
    sub, rec = await peer.subscribe(channel)
    subscribed = rec["subscribed"][0]
    assert subscribed.channel == channel and subscribed.recoverable, subscribed
    assert sub.state == SubscriptionState.SUBSCRIBED

    result = await api.publish(PublishRequest(channel=channel, data={"text": "from the backend"}))
    pub = (await rec.first("publication")).pub
    assert codec.dec(pub.data) == {"text": "from the backend"}
    assert pub.offset == result.offset
    assert pub.info is None, "a server API publication has no publisher"


async def test_client_publish(peers, codec):
    channel = unique("chat:pub-")
    alice, bob = unique("alice-"), unique("bob-")
    a = peers(token(alice))
    b = peers(token(bob, info={"name": "Bob"}))
    await a.connect()
    await b.connect()
    _, a_rec = await a.subscribe(channel)
    b_sub, _ = await b.subscribe(channel)

    await b_sub.publish(codec.enc({"text": "hi from bob"}))
    pub = (await a_rec.first("publication")).pub
    assert codec.dec(pub.data) == {"text": "hi from bob"}
    assert pub.offset > 0
    assert pub.info.user == bob and pub.info.client == b.client.client_id
    assert codec.dec(pub.info.conn_info) == {"name": "Bob"}

    # `news` does not let clients publish; `chat` only its subscribers.
    news, _ = await b.subscribe(unique("news:nopub-"))
    with pytest.raises(ReplyError) as err:
        await news.publish(codec.enc({"x": 1}))
    assert (err.value.code, err.value.message) == (103, "permission denied")
    with pytest.raises(ReplyError) as err:
        await b.client.publish(unique("chat:not-subscribed-"), codec.enc({"x": 1}))
    assert err.value.code == 103


async def test_history(peers, api, codec):
    channel = unique("news:history-")
    peer = peers(token(unique("u-")))
    await peer.connect()
    sub, _ = await peer.subscribe(channel)
    offsets = [(await api.publish(PublishRequest(channel=channel, data={"n": n}))).offset for n in range(1, 6)]

    history = await sub.history(limit=10)
    assert [codec.dec(p.data)["n"] for p in history.publications] == [1, 2, 3, 4, 5]
    assert [p.offset for p in history.publications] == offsets
    assert history.offset == offsets[-1] and history.epoch

    back = await sub.history(limit=2, reverse=True)
    assert [codec.dec(p.data)["n"] for p in back.publications] == [5, 4]
    since = await sub.history(limit=10, since=StreamPosition(offset=offsets[1], epoch=history.epoch))
    assert [codec.dec(p.data)["n"] for p in since.publications] == [3, 4, 5]

    with pytest.raises(ReplyError) as err:
        await peer.client.history(unique("news:not-subscribed-"), limit=10)
    assert err.value.code == 103, "history is for subscribers"


async def test_presence_and_presence_stats(peers, codec):
    channel = unique("chat:presence-")
    alice, bob = unique("alice-"), unique("bob-")
    a = peers(token(alice, info={"name": "Alice"}))
    b = peers(token(bob))
    await a.connect()
    await b.connect()
    sub, _ = await a.subscribe(channel)
    await b.subscribe(channel)

    presence = await sub.presence()
    assert sorted(c.user for c in presence.clients.values()) == sorted([alice, bob])
    assert set(presence.clients) == {a.client.client_id, b.client.client_id}
    assert codec.dec(presence.clients[a.client.client_id].conn_info) == {"name": "Alice"}
    stats = await sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (2, 2)

    quiet, _ = await a.subscribe(unique("quiet:x-"))
    with pytest.raises(ReplyError) as err:
        await quiet.presence()
    assert (err.value.code, err.value.message) == (108, "not available")


async def test_recovery_after_a_disconnect(herald, peers, api, codec):
    proxy = await Proxy(herald.port).start()
    try:
        peer = peers(token(unique("u-")), address=proxy.ws_url())
        await peer.connect()
        channel = unique("news:recover-")
        sub, rec = await peer.subscribe(channel, recoverable=True)
        first = rec["subscribed"][0]
        assert first.recoverable and first.stream_position is not None and not first.was_recovering

        await api.publish(PublishRequest(channel=channel, data={"n": 1}))
        await rec.first("publication")

        proxy.cut()
        await peer.events.first("connecting", lambda c: c.code != 0)
        await rec.first("subscribing", lambda c: c.code != 0)
        for n in (2, 3, 4):
            await api.publish(PublishRequest(channel=channel, data={"n": n}))
        proxy.restore()

        again = (await rec.wait("subscribed", 2))[1]
        assert again.was_recovering is True
        assert again.recovered is True, "the gap is recovered from the log"
        await rec.wait("publication", 4)
        await api.publish(PublishRequest(channel=channel, data={"n": 5}))
        pubs = [p.pub for p in await rec.wait("publication", 5)]
        assert [codec.dec(p.data)["n"] for p in pubs] == [1, 2, 3, 4, 5], "every publication once, in order"
        offsets = [p.offset for p in pubs]
        assert offsets == sorted(offsets) and len(set(offsets)) == 5
        assert sub.state == SubscriptionState.SUBSCRIBED
        assert len(proxy.sniffers) >= 2, "the client did reconnect through the proxy"
    finally:
        await proxy.close()


async def test_token_refresh_without_reconnecting(peers, api, codec):
    """The SDK calls get_token before the connection token expires and refreshes it in place (`refresh`);
    likewise a subscription token (`sub_refresh`). A client without get_token is closed at exp +
    refresh_grace (1 s), which shows the deadline was real."""
    user = unique("u-")
    exp = int(time.time()) + 2
    calls = []
    sub_calls = []

    async def get_token() -> str:
        calls.append(time.time())
        return token(user, 600)

    async def get_sub_token(ch: str) -> str:
        sub_calls.append(time.time())
        ttl_exp = exp if len(sub_calls) == 1 else int(time.time()) + 600
        return sign({"sub": user, "channel": ch, "exp": ttl_exp}, KEY)

    peer = peers(sign({"sub": user, "exp": exp}, KEY), get_token=get_token)
    control = peers(sign({"sub": user, "exp": exp}, KEY))
    first = await peer.connect()
    await control.connect()
    channel = unique("news:refresh-")
    _, rec = await peer.subscribe(channel)
    secret = unique("secret:refresh-")
    _, secret_rec = await peer.subscribe(secret, get_token=get_sub_token)
    # The same with a static subscription token: ended at exp + grace (2501), and then refused as expired.
    static = unique("secret:static-")
    _, static_rec = await peer.subscribe(static, token=sign({"sub": user, "channel": static, "exp": exp}, KEY))

    await until(lambda: calls and len(sub_calls) == 2, "get_token to be called for both tokens", timeout=8)
    closed = await control.events.first("connecting", lambda c: c.code != 0, timeout=8)
    assert (closed.code, closed.reason) == (3005, "connection expired")
    await until_time(exp + 2.5)  # past exp + grace, on the server's whole-second clock

    await api.publish(PublishRequest(channel=channel, data={"still": "connected"}))
    assert codec.dec((await rec.first("publication")).pub.data) == {"still": "connected"}
    assert len(calls) == 1 and calls[0] < exp + 1, f"refreshed once, in time: {calls} (exp {exp})"
    assert [c.code for c in peer.events["connecting"]] == [0], "never reconnected"
    assert peer.events["disconnected"] == []
    assert peer.client.client_id == first.client

    await api.publish(PublishRequest(channel=secret, data={"sub": "refreshed"}))
    assert codec.dec((await secret_rec.first("publication")).pub.data) == {"sub": "refreshed"}
    assert len(sub_calls) == 2 and sub_calls[1] < exp + 1, f"subscription token refreshed once, in time: {sub_calls}"
    assert [c.code for c in secret_rec["subscribing"]] == [0], "the subscription was never ended and redone"
    assert len(secret_rec["subscribed"]) == 1

    ended = await static_rec.first("subscribing", lambda c: c.code != 0)
    assert (ended.code, ended.reason) == (2501, "subscription expired")
    # The SDK resubscribes with the same token, Herald answers 109 (expired), and with no get_token the SDK
    # gives up: "unauthorized" (its client-side code 1).
    gone = await static_rec.first("unsubscribed")
    assert (gone.code, gone.reason) == (1, "unauthorized"), gone


async def test_connect_with_an_expired_token_gets_a_new_one(peers, codec):
    user = unique("u-")
    calls = []

    async def get_token() -> str:
        calls.append(1)
        return token(user, 600)

    peer = peers(sign({"sub": user, "exp": int(time.time()) - 10}, KEY), get_token=get_token)
    await peer.connect()
    assert peer.client.state == ClientState.CONNECTED
    assert calls == [1], "the SDK asked for a new token after error 109"
    assert any(getattr(e.error, "code", None) == 109 for e in peer.events["error"]), peer.events["error"]


async def test_subscription_token(peers, api, codec):
    user = unique("u-")
    channel = unique("secret:plans-")
    asked = []

    async def sub_token(ch: str) -> str:
        asked.append(ch)
        return sign({"sub": user, "channel": ch, "exp": int(time.time()) + 600}, KEY)

    peer = peers(token(user))
    await peer.connect()
    _, rec = await peer.subscribe(channel, get_token=sub_token)
    assert asked == [channel]
    await api.publish(PublishRequest(channel=channel, data={"for": "token holders"}))
    assert codec.dec((await rec.first("publication")).pub.data) == {"for": "token holders"}

    # Without a token the `token` namespace refuses.
    other, denied = peer.new_sub(unique("secret:other-"))
    await other.subscribe()
    ctx = await denied.first("unsubscribed")
    assert (ctx.code, ctx.reason) == (103, "permission denied")
    assert peer.client.state == ClientState.CONNECTED


async def test_join_leave_only_for_subscriptions_that_ask(peers, api, codec):
    channel = unique("chat:joins-")
    alice, bob, carol = unique("alice-"), unique("bob-"), unique("carol-")
    a = peers(token(alice))
    b = peers(token(bob, info={"name": "Bob"}))
    c = peers(token(carol))
    for peer in (a, b, c):
        await peer.connect()
    _, a_rec = await a.subscribe(channel, join_leave=True)
    _, c_rec = await c.subscribe(channel)  # did not ask

    b_sub, _ = await b.subscribe(channel)
    join = await a_rec.first("join", lambda j: j.info.user == bob)
    assert join.info.client == b.client.client_id
    assert codec.dec(join.info.conn_info) == {"name": "Bob"}
    await b_sub.unsubscribe()
    leave = await a_rec.first("leave", lambda j: j.info.user == bob)
    assert leave.info.client == b.client.client_id

    # A publication after both: whatever join/leave Carol were sent would have come before it.
    await api.publish(PublishRequest(channel=channel, data={"marker": True}))
    await c_rec.first("publication")
    await a_rec.first("publication")
    assert c_rec["join"] == [] and c_rec["leave"] == [], (c_rec["join"], c_rec["leave"])
    assert carol in {j.info.user for j in a_rec["join"]}


async def test_subscription_token_for_another_channel_is_3500(peers, codec):
    user = unique("u-")

    async def wrong_token(ch: str) -> str:
        return sign({"sub": user, "channel": ch + "-other", "exp": int(time.time()) + 600}, KEY)

    peer = peers(token(user))
    await peer.connect()
    sub, _ = peer.new_sub(unique("secret:x-"), get_token=wrong_token)
    await sub.subscribe()
    ctx = await peer.events.first("disconnected")
    assert ctx.code == 3500 and ctx.reason.startswith("invalid token"), ctx
    assert len(ctx.reason.encode()) <= 123
    assert peer.client.state == ClientState.DISCONNECTED, "3500 is terminal: no reconnect"
    assert [c.code for c in peer.events["connecting"]] == [0]


async def test_connection_token_with_a_wrong_key_is_3500(peers, codec):
    peer = peers(sign({"sub": unique("u-"), "exp": int(time.time()) + 600}, "not-the-server-key"))
    await peer.client.connect()
    ctx = await peer.events.first("disconnected")
    assert ctx.code == 3500 and ctx.reason.startswith("invalid token"), ctx
    assert len(ctx.reason.encode()) <= 123, "a close reason fits a close frame"
    assert peer.client.state == ClientState.DISCONNECTED, "3500 is terminal: no reconnect"
    assert peer.events["connected"] == []
