"""Fixtures: one Herald per test module (tests use unique channel and user names), the codec parameter."""

import pytest

from harness import Codec, Herald

KEY = "python-test-secret"
API_KEY = "python-api-key"

# The namespaces the tests use: `chat` lets subscribers publish and has join/leave, `news` is the defaults
# (public, presence, history, recovery; clients do not publish), `quiet` has no presence, `secret` needs a
# subscription token.
CONFIG = f"""
[auth]
jwt_key = "{KEY}"
[centrifugo]
api_key = "{API_KEY}"
refresh_grace = "1s"
[[centrifugo.namespaces]]
name = "chat"
publish = "subscribers"
presence = true
join_leave = true
[[centrifugo.namespaces]]
name = "news"
[[centrifugo.namespaces]]
name = "quiet"
presence = false
[[centrifugo.namespaces]]
name = "secret"
subscribe = "token"
"""


@pytest.fixture(scope="module")
def herald():
    h = Herald(CONFIG).start()
    yield h
    h.stop()


@pytest.fixture(params=[False, True], ids=["json", "protobuf"])
def codec(request) -> Codec:
    return Codec(request.param)


def token(user: str, ttl: int = 600, **claims) -> str:
    """A connection token for `user`, valid for `ttl` seconds."""
    import time

    from harness import sign

    return sign({"sub": user, "exp": int(time.time()) + ttl, **claims}, KEY)


@pytest.fixture
async def api(herald):
    """cent's AsyncClient with the right key."""
    from cent import AsyncClient

    async with AsyncClient(herald.api_url, API_KEY) as client:
        yield client


@pytest.fixture
async def peers(herald, codec):
    """Makes centrifuge-python clients of the test's codec; disconnects them all afterwards."""
    from harness import Peer

    made = []

    def make(token: str = "", get_token=None, address: str = "") -> Peer:
        peer = Peer(address or herald.ws_url, codec, token=token, get_token=get_token)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        await peer.close()
