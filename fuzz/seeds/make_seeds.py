#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

Run once before the first fuzzing session (`python3 fuzz/seeds/make_seeds.py`); the committed corpora
already contain what survived minimization. JWTs are signed with herald::fuzzing::TOKEN_KEY.
"""
import base64, hashlib, hmac, json, os, time

KEY = b"herald-fuzz-key"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(claims, alg="HS256", key=KEY):
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    sig = b64(hmac.new(key, f"{header}.{payload}".encode(), digest).digest())
    return f"{header}.{payload}.{sig}"


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb(*fields):
    """A Protobuf message from (tag, value) pairs: int -> varint, bytes/str -> length-delimited."""
    out = b""
    for tag, v in fields:
        if isinstance(v, bool) or isinstance(v, int):
            out += varint(tag << 3) + varint(int(v))
        else:
            v = v.encode() if isinstance(v, str) else v
            out += varint(tag << 3 | 2) + varint(len(v)) + v
    return out


def frame(*commands):
    """A binary WebSocket frame of the Protobuf codec: varint-length-delimited Commands."""
    return b"".join(varint(len(c)) + c for c in commands)


FAR = 4102444800  # 2100-01-01
SUB = jwt({"mercure": {"subscribe": ["https://example.com/books/{id}"], "payload": {"user": "x"}}, "exp": FAR})
PUB = jwt({"mercure": {"publish": ["*"]}, "sub": "42"})
CENT = jwt({"sub": "42", "exp": FAR, "channels": ["news"], "info": {"name": "Ann"},
            "subs": {"chat:1": {"recover": True}}}, "HS384")
PB_CONNECT = frame(pb(
    (1, 1),
    (4, pb(  # ConnectRequest{token=1, data=2, subs=3 (map entries {1: key, 2: SubscribeRequest}), name=4,
        (1, CENT),  # version=5, headers=6}
        (3, pb((1, "news"), (2, pb((3, True), (6, "e"), (7, 3))))),
        (4, "js"),
        (5, "0.1"),
        (6, pb((1, "x-h"), (2, "v"))),
    )),
))
EXPIRED = jwt({"exp": 1000})
NBF = jwt({"nbf": FAR}, "HS512")
OTHER_KEY = jwt({"sub": "1"}, key=b"not-the-key")

seeds = {
    "lean_request": [
        b"GET /.well-known/mercure?topic=https%3A%2F%2Fexample.com%2Fbooks%2F%7Bid%7D HTTP/1.1\r\n"
        b"Host: localhost:3000\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36\r\n"
        b"Origin: http://localhost:8000\r\nReferer: http://localhost:8000/\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
        b"Cookie: _ga=GA1.1.1; mercureAuthorization=" + SUB.encode() + b"\r\n"
        b"Connection: keep-alive\r\n\r\n",
        b"GET /.well-known/mercure?topic=chat%3Alobby&topic=*&lastEventID=urn%3Auuid%3A1 HTTP/1.1\r\n"
        b"host: h\r\nlast-event-id: #3-17\r\naccept: text/event-stream\r\n\r\n",
        b"GET /.well-known/mercure?topic=a&authorization=" + SUB.encode() + b" HTTP/1.1\r\n"
        b"host: h\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        b"GET /.well-known/mercure?topic=a HTTP/1.1\nhost: h\nauthorization: Bearer " + SUB.encode() + b"\n\n",
        b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\n\r\n",
        b"GET /connection/websocket HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"POST /.well-known/mercure HTTP/1.1\r\nhost: h\r\ncontent-type: application/x-www-form-urlencoded\r\n"
        b"content-length: 20\r\n\r\ntopic=a&data=hello!!",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        b"PRI * HTTP/2",
        b"GET /.well-known/mercure?topic=a HTTP/1.0\r\n\r\n",
    ],
    "hub_query": [
        b"topic=https%3A%2F%2Fexample.com%2Fbooks%2F%7Bid%7D",
        b"topic=https://example.com/books/{id}&topic=https://example.com/users/{user}/{?topic}&lastEventID=earliest",
        b"topic=*&lastEventID=urn:uuid:5b1a7e51-2f7c-4e3b-8a64-0c2a1d1b4c39",
        b"topic=chat:lobby&topic=personal:%23alice&topic=dialog%2342,43",
        b"topic=https%3A%2F%2Fe.com%7B%2Fa%2Cb%7D&topic=%2Fbooks%2F%7Bid%7D.json&topic=x%7B%2Bpath%7D",
        b"topic={%23frag}{.ext}{;p}{?q,r}{&s}{var:3}{list*}&authorization=" + SUB.encode(),
        b"topic=a{b&topic=a}b&topic=%ZZ&topic=&lastEventID=",
        b"topic=" + b"{a}" * 17,
    ],
    "uri_template": [
        b"https://example.com/books/{id}\nhttps://example.com/books/1",
        b"https://example.com/users/{user}/books/{?q,lang}\nhttps://example.com/users/a/books/?q=x&lang=en",
        b"{+path}/here\n/foo/bar/here",
        b"X{#var}\nX#hello",
        b"{.dom*}\n.example.com",
        b"/map{?x,y}{&z}\n/map?x=1&y=2&z=3",
        b"{/list*,path:4}\n/a/b/c",
        b"{;x,y,empty}\n;x=1;y=2;empty",
        b"https://e.com/{id}\nhttps://e.com/%E2%82%AC",
        b"a{b\na{b",
        b"will-not-match}",
        b"*\nanything",
        b"{%41}\nA",
    ],
    "publish_body": [
        b"topic=https%3A%2F%2Fexample.com%2Fbooks%2F1&data=%7B%22title%22%3A%22Hello%22%7D",
        b"topic=a&topic=b&data=x&private=on&id=urn%3Auuid%3A1&type=message&retry=3000",
        b"topic=a&retry=+12+&id=&type=",
        b"topic=a&retry=soon",
        b'{"topic":"https://example.com/books/1","data":"{\\"title\\":\\"Hello\\"}"}',
        b'{"topic":["chat:1","chat:2"],"data":{"text":"hi","n":[1,2.5,null,true]},"private":true,'
        b'"id":"m1","type":"msg","retry":1000}',
        b'{"topic":"a","unknown":1}',
        b'{"topic":1}',
        b'{"topic":"\\ud83d\\ude00","data":"\\u0000"}',
    ],
    "centrifugo_command": [
        b'{"id":1,"connect":{"token":"' + CENT.encode() + b'","name":"js"}}',
        b'{"id":2,"subscribe":{"channel":"chat:1","recover":true,"epoch":"x","offset":5}}',
        b'{"id":1,"connect":{"token":"","subs":{"news":{"recover":true,"offset":3,"epoch":"e"}}}}\n'
        b'{"id":2,"subscribe":{"channel":"personal:#42","token":"t"}}',
        b'{"id":3,"publish":{"channel":"chat:1","data":{"text":"hello"}}}',
        b'{"id":4,"history":{"channel":"chat:1","limit":10,"since":{"offset":2,"epoch":"e"},"reverse":true}}',
        b'{"id":5,"presence":{"channel":"chat:1"}}\n{"id":6,"presence_stats":{"channel":"chat:1"}}',
        b'{"id":7,"unsubscribe":{"channel":"chat:1"}}',
        b'{"id":8,"refresh":{"token":"' + CENT.encode() + b'"}}',
        b'{"id":9,"sub_refresh":{"channel":"chat:1","token":"t"}}',
        b'{"id":10,"rpc":{"method":"m","data":{}}}\n{"send":{"data":{}}}\n{}',
        b'{"id":11,"ping":{}}\n\n   \n{"id":4294967296}',
        b'{"id":12,"subscribe":{"channel":"chat:1","offset":-1}}',
        # Protobuf frames (centrifuge-protobuf): Command{id=1, connect=4, subscribe=5, unsubscribe=6,
        # publish=7, presence=8, presence_stats=9, history=10, ping=11, send=12, rpc=13, refresh=14,
        # sub_refresh=15}.
        PB_CONNECT,
        frame(pb((1, 2), (5, pb((1, "chat:1"), (3, True), (6, "x"), (7, 5), (11, True)))),
              pb((1, 3), (7, pb((1, "chat:1"), (2, b'{"text":"hi"}')))),
              pb((1, 4), (10, pb((1, "chat:1"), (2, 10), (3, pb((1, 2), (2, "e"))), (4, True))))),
        frame(pb((1, 5), (8, pb((1, "chat:1")))), pb((1, 6), (9, pb((1, "chat:1")))),
              pb((1, 7), (6, pb((1, "chat:1")))), pb((1, 8), (11, b"")), pb((12, pb((1, b"\x00\xff"))))),
        frame(pb((1, 9), (14, pb((1, CENT)))), pb((1, 10), (15, pb((1, "chat:1"), (2, "t")))),
              pb((1, 11), (13, pb((1, b"{}"), (2, "method"))))),
        frame(b""),
        varint(1000) + b"\x08\x01",
    ],
    "token": [
        f"authorization: Bearer {SUB}".encode(),
        f"authorization: bearer   {PUB}  \ncookie: mercureAuthorization={SUB}".encode(),
        f"?topic=a&authorization={CENT}".encode(),
        f"cookie: _ga=1; mercureAuthorization=\"{SUB}\"; theme=dark\ncookie: other=2".encode(),
        f"cookie: mercureAuthorization={EXPIRED}".encode(),
        f"authorization: Bearer {NBF}".encode(),
        f"authorization: Bearer {OTHER_KEY}".encode(),
        b"authorization: Basic dXNlcjpwYXNz",
        b"authorization: Bearer \xff\xfe",
        f"?authorization={SUB[:-3]}%41%42%43".encode(),
        b"?topic=x\ncookie: mercureAuthorization=not.a.jwt",
    ],
}

for target, inputs in seeds.items():
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    for i, data in enumerate(inputs):
        with open(os.path.join(d, f"seed-{i:02}"), "wb") as f:
            f.write(data)
print("seeds written:", {t: len(v) for t, v in seeds.items()})
