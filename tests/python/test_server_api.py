"""Herald's server API driven by `cent`, Centrifugo's official Python server SDK (5.x). Where a client should see
the effect, a centrifuge-python client of each codec (JSON and Protobuf) is connected and checked."""

import base64
import time

import pytest
from cent import (
    AsyncClient,
    BatchRequest,
    BroadcastRequest,
    CentApiResponseError,
    CentUnauthorizedError,
    ChannelsRequest,
    Disconnect,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    RefreshRequest,
    StreamPosition,
    SubscribeRequest,
    UnsubscribeRequest,
)
from centrifuge import ClientState, SubscriptionState

from conftest import API_KEY, token
from harness import Herald, unique, until


async def test_publish_result_has_offset_and_epoch(api, peers, codec):
    channel = unique("news:pub-")
    peer = peers(token(unique("u-")))
    await peer.connect()
    _, rec = await peer.subscribe(channel)

    first = await api.publish(PublishRequest(channel=channel, data={"n": 1}))
    second = await api.publish(PublishRequest(channel=channel, data={"n": 2}))
    assert first.offset > 0 and first.epoch, first
    assert second.offset > first.offset and second.epoch == first.epoch, (first, second)

    pubs = await rec.wait("publication", 2)
    assert [codec.dec(p.pub.data) for p in pubs] == [{"n": 1}, {"n": 2}]
    assert [p.pub.offset for p in pubs] == [first.offset, second.offset], "the client sees the API's offsets"


async def test_broadcast(api, peers, codec):
    a, b = unique("news:bc-a-"), unique("news:bc-b-")
    peer = peers(token(unique("u-")))
    await peer.connect()
    _, rec_a = await peer.subscribe(a)
    _, rec_b = await peer.subscribe(b)

    result = await api.broadcast(BroadcastRequest(channels=[a, b], data={"all": True}))
    assert len(result.responses) == 2
    for response in result.responses:
        assert response.error is None and response.result.offset > 0 and response.result.epoch, response

    pub_a = (await rec_a.first("publication")).pub
    pub_b = (await rec_b.first("publication")).pub
    assert codec.dec(pub_a.data) == codec.dec(pub_b.data) == {"all": True}
    assert [pub_a.offset, pub_b.offset] == [r.result.offset for r in result.responses]


async def test_publish_with_tags(api, peers, codec):
    channel = unique("news:tags-")
    peer = peers(token(unique("u-")))
    await peer.connect()
    _, rec = await peer.subscribe(channel)

    tags = {"kind": "alert", "source": "backend"}
    await api.publish(PublishRequest(channel=channel, data={"t": 1}, tags=tags))
    pub = (await rec.first("publication")).pub
    assert pub.tags == tags
    assert codec.dec(pub.data) == {"t": 1}

    history = await api.history(HistoryRequest(channel=channel, limit=10))
    assert [p.tags for p in history.publications] == [tags], "tags are kept in history"


async def test_publish_b64data(api, peers, codec):
    """`b64data` publishes bytes: a Protobuf client gets exactly those bytes (binary, not UTF-8 here); a JSON
    client gets them as JSON when they are JSON text."""
    channel = unique("news:b64-")
    peer = peers(token(unique("u-")))
    await peer.connect()
    _, rec = await peer.subscribe(channel)

    raw = b"\x00\x01\xfe\xffbinary\x80" if codec.protobuf else b'{"from":"b64data","n":[1,2]}'
    result = await api.publish(
        PublishRequest(channel=channel, data=None, b64data=base64.b64encode(raw).decode())
    )
    assert result.offset > 0
    pub = (await rec.first("publication")).pub
    if codec.protobuf:
        assert pub.data == raw
    else:
        assert pub.data == {"from": "b64data", "n": [1, 2]}


async def test_publish_skip_history(api, peers, codec):
    channel = unique("news:skip-")
    peer = peers(token(unique("u-")))
    await peer.connect()
    _, rec = await peer.subscribe(channel)

    kept = await api.publish(PublishRequest(channel=channel, data={"n": "kept"}))
    skipped = await api.publish(PublishRequest(channel=channel, data={"n": "skipped"}, skip_history=True))
    assert kept.offset > 0
    assert (skipped.offset, skipped.epoch) == (0, ""), f"no stream position for a skipped publication: {skipped}"

    pubs = await rec.wait("publication", 2)
    assert [codec.dec(p.pub.data) for p in pubs] == [{"n": "kept"}, {"n": "skipped"}], "delivered live, in order"
    assert pubs[1].pub.offset == 0, "a publication out of history has no offset"

    history = await api.history(HistoryRequest(channel=channel, limit=10))
    assert [p.data for p in history.publications] == [{"n": "kept"}]
    assert history.offset == kept.offset, "the stream position did not move"


async def test_publish_idempotency_key(api, peers, codec):
    channel = unique("news:idem-")
    peer = peers(token(unique("u-")))
    await peer.connect()
    _, rec = await peer.subscribe(channel)

    first = await api.publish(PublishRequest(channel=channel, data={"n": 1}, idempotency_key="order-42"))
    again = await api.publish(PublishRequest(channel=channel, data={"n": 1}, idempotency_key="order-42"))
    assert (again.offset, again.epoch) == (first.offset, first.epoch), "the repeat returns the first result"
    other = await api.publish(PublishRequest(channel=channel, data={"n": 2}, idempotency_key="order-43"))
    assert other.offset > first.offset, "another key publishes"

    pubs = await rec.wait("publication", 2)
    assert [codec.dec(p.pub.data) for p in pubs] == [{"n": 1}, {"n": 2}], "the repeat was not delivered"
    assert [p.pub.offset for p in pubs] == [first.offset, other.offset]
    history = await api.history(HistoryRequest(channel=channel, limit=10))
    assert [p.data for p in history.publications] == [{"n": 1}, {"n": 2}]


async def test_history_limit_since_reverse(api):
    channel = unique("news:hist-")
    offsets = []
    for n in range(1, 11):
        offsets.append((await api.publish(PublishRequest(channel=channel, data={"n": n}))).offset)
    epoch = (await api.history(HistoryRequest(channel=channel))).epoch

    def ns(history):
        return [p.data["n"] for p in history.publications]

    position = await api.history(HistoryRequest(channel=channel))
    assert (position.publications, position.offset) == ([], offsets[-1]), "no limit: the position only"
    assert ns(await api.history(HistoryRequest(channel=channel, limit=3))) == [1, 2, 3]
    assert ns(await api.history(HistoryRequest(channel=channel, limit=3, reverse=True))) == [10, 9, 8]
    assert ns(await api.history(HistoryRequest(channel=channel, limit=-1))) == list(range(1, 11))

    since4 = StreamPosition(offset=offsets[3], epoch=epoch)
    back = await api.history(HistoryRequest(channel=channel, since=since4, limit=3, reverse=True))
    assert ns(back) == [3, 2, 1]
    assert [p.offset for p in back.publications] == [offsets[2], offsets[1], offsets[0]]
    forward = await api.history(HistoryRequest(channel=channel, since=since4, limit=3))
    assert ns(forward) == [5, 6, 7]
    assert [p.offset for p in forward.publications] == offsets[4:7]
    assert (forward.offset, forward.epoch) == (offsets[-1], epoch)

    with pytest.raises(CentApiResponseError) as err:
        await api.history(HistoryRequest(channel=channel, since=StreamPosition(offset=1, epoch="other"), limit=3))
    assert (err.value.code, err.value.message) == (112, "unrecoverable position")


async def test_history_remove_keeps_the_stream_position(api):
    channel = unique("news:rm-")
    for n in range(3):
        await api.publish(PublishRequest(channel=channel, data={"n": n}))
    before = await api.history(HistoryRequest(channel=channel, limit=10))
    assert len(before.publications) == 3

    await api.history_remove(HistoryRemoveRequest(channel=channel))
    after = await api.history(HistoryRequest(channel=channel, limit=10))
    assert after.publications == []
    assert (after.offset, after.epoch) == (before.offset, before.epoch), "offset and epoch stay"

    nxt = await api.publish(PublishRequest(channel=channel, data={"n": "next"}))
    assert nxt.offset > before.offset and nxt.epoch == before.epoch
    assert [p.data for p in (await api.history(HistoryRequest(channel=channel, limit=10))).publications] == [
        {"n": "next"}
    ]


async def test_presence_and_presence_stats(api, peers, codec):
    channel = unique("chat:presence-")
    alice, bob = unique("alice-"), unique("bob-")
    a1 = peers(token(alice, info={"name": "Alice"}))
    a2 = peers(token(alice, info={"name": "Alice"}))
    b = peers(token(bob))
    for peer in (a1, a2, b):
        await peer.connect()
    _, watch = await a1.subscribe(channel, join_leave=True)
    await a2.subscribe(channel)
    await b.subscribe(channel)

    presence = await api.presence(PresenceRequest(channel=channel))
    assert sorted(c.user for c in presence.presence.values()) == sorted([alice, alice, bob])
    assert set(presence.presence) == {a1.client.client_id, a2.client.client_id, b.client.client_id}
    assert presence.presence[a1.client.client_id].conn_info == {"name": "Alice"}
    stats = await api.presence_stats(PresenceStatsRequest(channel=channel))
    assert (stats.num_clients, stats.num_users) == (3, 2)

    await b.close()
    await watch.first("leave", lambda e: e.info.user == bob)  # the server has seen it go
    stats = await api.presence_stats(PresenceStatsRequest(channel=channel))
    assert (stats.num_clients, stats.num_users) == (2, 1), "a closed connection leaves presence"


async def test_presence_off_is_108(api):
    calls = [
        lambda: api.presence(PresenceRequest(channel="quiet:x")),
        lambda: api.presence_stats(PresenceStatsRequest(channel="quiet:x")),
    ]
    for call in calls:
        with pytest.raises(CentApiResponseError) as err:
            await call()
        assert (err.value.code, err.value.message) == (108, "not available")


async def test_unknown_namespace_is_102(api):
    calls = [
        lambda: api.publish(PublishRequest(channel="nope:x", data={})),
        lambda: api.history(HistoryRequest(channel="nope:x", limit=1)),
        lambda: api.presence(PresenceRequest(channel="nope:x")),
        lambda: api.presence_stats(PresenceStatsRequest(channel="nope:x")),
        lambda: api.subscribe(SubscribeRequest(user="someone", channel="nope:x")),
    ]
    for call in calls:
        with pytest.raises(CentApiResponseError) as err:
            await call()
        assert (err.value.code, err.value.message) == (102, "unknown channel")


@pytest.mark.herald_gap("history_remove and unsubscribe answer {} for a channel of no namespace")
async def test_unknown_namespace_is_102_for_history_remove_and_unsubscribe(api):
    """Centrifugo checks the namespace in `history_remove` and `unsubscribe` too."""
    calls = {
        "history_remove": lambda: api.history_remove(HistoryRemoveRequest(channel="nope:x")),
        "unsubscribe": lambda: api.unsubscribe(UnsubscribeRequest(user="someone", channel="nope:x")),
    }
    answers = {}
    for name, call in calls.items():
        try:
            await call()
            answers[name] = "no error"
        except CentApiResponseError as e:
            answers[name] = (e.code, e.message)
    assert answers == {name: (102, "unknown channel") for name in calls}


async def test_channels_and_info(api, peers):
    channel = unique("news:chans-")
    users = [unique("u-"), unique("u-")]
    for user in users:
        peer = peers(token(user))
        await peer.connect()
        await peer.subscribe(channel)
    await peers(token(users[0])).connect()  # connected, not subscribed

    result = await api.channels(ChannelsRequest(pattern=channel[:-3] + "*"))
    assert {c: i.num_clients for c, i in result.channels.items()} == {channel: 2}
    everything = await api.channels(ChannelsRequest())
    assert everything.channels[channel].num_clients == 2

    info = await api.info(InfoRequest())
    assert len(info.nodes) == 1
    node = info.nodes[0]
    assert node.uid and node.name and node.version
    assert node.num_clients >= 3 and node.num_users >= 2 and node.num_channels >= 1, node


async def test_disconnect(api, peers, codec):
    user = unique("u-")
    victim, survivor = peers(token(user)), peers(token(user))
    for peer in (victim, survivor):
        await peer.connect()
    survivor_channel = unique("news:after-disconnect-")
    _, survivor_rec = await survivor.subscribe(survivor_channel)

    # One connection of the user, by client id, with a custom terminal code.
    await api.disconnect(
        DisconnectRequest(user=user, client=victim.client.client_id, disconnect=Disconnect(code=4501, reason="bye now"))
    )
    ctx = await victim.events.first("disconnected")
    assert (ctx.code, ctx.reason) == (4501, "bye now")
    assert victim.client.state == ClientState.DISCONNECTED, "4500-4999 do not reconnect"

    await api.publish(PublishRequest(channel=survivor_channel, data={"still": "here"}))
    await survivor_rec.first("publication")
    assert survivor.events["connecting"][1:] == [] and survivor.events["disconnected"] == [], "the other one stays"

    # The whole user, default code: Centrifugo's "force disconnect" (3503, no reconnect).
    await api.disconnect(DisconnectRequest(user=user))
    ctx = await survivor.events.first("disconnected")
    assert (ctx.code, ctx.reason) == (3503, "force disconnect")
    assert survivor.client.state == ClientState.DISCONNECTED


@pytest.mark.herald_gap("disconnect ignores whitelist: the whitelisted client is disconnected too")
async def test_disconnect_whitelist(api, peers, codec):
    """`whitelist`: client ids of the user to keep connected."""
    user = unique("u-")
    gone, kept = peers(token(user)), peers(token(user))
    for peer in (gone, kept):
        await peer.connect()
    channel = unique("news:whitelist-")
    _, kept_rec = await kept.subscribe(channel)

    await api.disconnect(DisconnectRequest(user=user, whitelist=[kept.client.client_id]))
    ctx = await gone.events.first("disconnected")
    assert ctx.code == 3503
    await api.publish(PublishRequest(channel=channel, data={"kept": True}))
    await until(lambda: kept_rec["publication"] or kept.events["disconnected"], "a publication or a disconnect")
    assert kept.events["disconnected"] == [], f"the whitelisted client was disconnected: {kept.events['disconnected']}"
    assert kept.client.state == ClientState.CONNECTED


async def test_disconnect_with_a_reconnect_code(api, peers, codec):
    user = unique("u-")
    peer = peers(token(user))
    first = await peer.connect()
    await api.disconnect(DisconnectRequest(user=user, disconnect=Disconnect(code=4001, reason="come back")))
    ctx = await peer.events.first("connecting", lambda c: c.code != 0)
    assert (ctx.code, ctx.reason) == (4001, "come back")
    second = (await peer.events.wait("connected", 2))[1]
    assert second.client != first.client, "reconnected as a new connection"


async def test_unsubscribe(api, peers, codec):
    user = unique("u-")
    channel = unique("news:unsub-")
    peer = peers(token(user))
    await peer.connect()
    sub, rec = await peer.subscribe(channel)
    assert (await api.presence_stats(PresenceStatsRequest(channel=channel))).num_clients == 1

    await api.unsubscribe(UnsubscribeRequest(user=user, channel=channel))
    ctx = await rec.first("unsubscribed")
    assert (ctx.code, ctx.reason) == (2000, "server unsubscribe")
    assert sub.state == SubscriptionState.UNSUBSCRIBED
    assert peer.client.state == ClientState.CONNECTED, "only the subscription ends"
    assert (await api.presence_stats(PresenceStatsRequest(channel=channel))).num_clients == 0
    assert channel not in (await api.channels(ChannelsRequest(pattern=channel))).channels


async def test_server_side_subscribe(api, peers, codec):
    user = unique("u-")
    channel = unique("news:srv-")
    peer = peers(token(user))
    await peer.connect()

    await api.subscribe(SubscribeRequest(user=user, channel=channel))
    ctx = await peer.events.first("subscribed")
    assert ctx.channel == channel
    assert ctx.recoverable and ctx.stream_position is not None, ctx

    result = await api.publish(PublishRequest(channel=channel, data={"to": "server-side"}))
    pub = await peer.events.first("publication")
    assert pub.channel == channel
    assert codec.dec(pub.pub.data) == {"to": "server-side"}
    assert pub.pub.offset == result.offset
    presence = await api.presence(PresenceRequest(channel=channel))
    assert [c.user for c in presence.presence.values()] == [user]

    await api.unsubscribe(UnsubscribeRequest(user=user, channel=channel))
    assert (await peer.events.first("unsubscribed")).channel == channel


@pytest.mark.herald_gap("subscribe drops data: the subscribe push carries none")
async def test_server_side_subscribe_data(api, peers, codec):
    """`data` of a server API subscribe reaches the client in the subscribe push."""
    user = unique("u-")
    channel = unique("news:srv-data-")
    peer = peers(token(user))
    await peer.connect()
    await api.subscribe(SubscribeRequest(user=user, channel=channel, data={"welcome": "to the channel"}))
    ctx = await peer.events.first("subscribed")
    assert ctx.channel == channel
    assert codec.dec(ctx.data) == {"welcome": "to the channel"}


async def test_refresh(api, peers, codec):
    user = unique("u-")
    peer = peers(token(user))  # a token that expires in 10 minutes
    await peer.connect()

    # expired: the connection is closed as expired (3005), and the SDK reconnects.
    await api.refresh(RefreshRequest(user=user, expired=True))
    ctx = await peer.events.first("connecting", lambda c: c.code != 0)
    assert (ctx.code, ctx.reason) == (3005, "connection expired")
    await peer.events.wait("connected", 2)

    # expire_at: the connection now expires then (plus the 1 s refresh_grace) and is closed with 3005.
    await api.refresh(RefreshRequest(user=user, expire_at=int(time.time()) + 1))
    ctx = (await peer.events.wait("connecting", 2, lambda c: c.code == 3005, timeout=8))[1]
    assert ctx.reason == "connection expired"


async def test_batch(api, peers, codec):
    a, b = unique("news:batch-a-"), unique("news:batch-b-")
    peer = peers(token(unique("u-")))
    await peer.connect()
    _, rec_a = await peer.subscribe(a)
    _, rec_b = await peer.subscribe(b)

    result = await api.batch(
        BatchRequest(
            requests=[
                PublishRequest(channel=a, data={"n": 1}),
                PublishRequest(channel=a, data={"n": 2}),
                PublishRequest(channel=b, data={"n": 3}),
            ]
        )
    )
    offsets = [r.offset for r in result.replies]
    assert len(offsets) == 3 and offsets == sorted(offsets) and offsets[0] > 0, result
    pubs_a = await rec_a.wait("publication", 2)
    pub_b = await rec_b.first("publication")
    assert [codec.dec(p.pub.data) for p in pubs_a] == [{"n": 1}, {"n": 2}]
    assert codec.dec(pub_b.pub.data) == {"n": 3}
    assert [p.pub.offset for p in pubs_a] + [pub_b.pub.offset] == offsets


async def test_wrong_api_key_is_unauthorized(herald):
    for key in ("not-the-key", ""):
        async with AsyncClient(herald.api_url, key) as bad:
            with pytest.raises(CentUnauthorizedError):
                await bad.publish(PublishRequest(channel="news:x", data={}))


async def test_api_key_from_the_environment():
    """`centrifugo.api_key = "env:VAR"` reads the key from the environment at start-up."""
    var = "HERALD_PYTEST_API_KEY"
    secret = "key-from-the-environment-" + unique("")
    h = Herald(f'[centrifugo]\napi_key = "env:{var}"\n', env={var: secret}).start()
    try:
        async with AsyncClient(h.api_url, secret) as good:
            result = await good.publish(PublishRequest(channel="env-check", data={"ok": True}))
            assert result.offset > 0
        async with AsyncClient(h.api_url, f"env:{var}") as literal:
            with pytest.raises(CentUnauthorizedError):
                await literal.publish(PublishRequest(channel="env-check", data={"ok": False}))
    finally:
        h.stop()
    assert secret not in h.stderr, "the key is not logged"
