"""Shared helpers for the Python tests: start a real Herald, sign tokens, record SDK events and wait for them
with a deadline (never a bare sleep), and a TCP proxy that can cut connections and sees WebSocket frames."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

from centrifuge import (
    Client,
    ClientEventHandler,
    Subscription,
    SubscriptionEventHandler,
)

ROOT = Path(__file__).resolve().parents[2]
HERALD_BIN = os.environ.get("HERALD_BIN") or str(ROOT / "target" / "debug" / "herald")

# Every wait is bounded by this unless a test says otherwise.
WAIT = 10.0


class Herald:
    """`herald serve --config FILE` on 127.0.0.1:0 in a temporary data directory."""

    def __init__(self, config: str = "", env: Optional[dict[str, str]] = None):
        self.config = config
        self.env = env or {}
        self.dir = tempfile.mkdtemp(prefix="herald-py-")
        self.url = ""
        self.proc: Optional[subprocess.Popen] = None
        self._stderr: list[str] = []

    def start(self) -> "Herald":
        file = Path(self.dir) / "herald.toml"
        file.write_text(
            f'listen = "127.0.0.1:0"\ndata_dir = {json.dumps(self.dir)}\nshutdown_timeout = "2s"\n'
            f"{self.config}\n"
        )
        self.proc = subprocess.Popen(
            [HERALD_BIN, "serve", "--config", str(file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **self.env},
            text=True,
        )
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def read_stdout() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        def read_stderr() -> None:
            assert self.proc and self.proc.stderr
            for line in self.proc.stderr:
                self._stderr.append(line)

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=read_stderr, daemon=True).start()
        try:
            line = lines.get(timeout=15)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"herald did not start within 15 s:\n{self.stderr}") from None
        if line is None:
            self.proc.wait(timeout=5)
            raise RuntimeError(f"herald exited ({self.proc.returncode}):\n{self.stderr}")
        m = re.search(r"listening on (http://\S+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"unexpected first line from herald: {line!r}")
        self.url = m.group(1)
        return self

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/connection/websocket"

    def stop(self) -> None:
        """SIGTERM, then wait for a clean exit (at most 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                raise RuntimeError("herald did not exit within 10 s of SIGTERM") from None
        shutil.rmtree(self.dir, ignore_errors=True)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sign(claims: dict[str, Any], key: str) -> str:
    """An HS256 JWT."""
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


def unique(prefix: str) -> str:
    """A name no other test uses (channels, users), so tests sharing one Herald do not see each other."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def until_time(deadline: float) -> None:
    """Waits until the wall clock passes `deadline` (Unix seconds). Only for tests about token expiry, where
    the passing of time is what is tested."""
    while time.time() < deadline:
        await asyncio.sleep(min(0.1, max(0.0, deadline - time.time())))


# Futures of the `until` calls waiting now; any recorded event wakes them all to check their condition.
_waiters: set[asyncio.Future] = set()


async def until(cond: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Waits until `cond()` is truthy, re-checking it whenever an SDK event is recorded; returns its value.
    Fails after `timeout` seconds, saying `what` it waited for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        woken = loop.create_future()
        _waiters.add(woken)
        try:
            await asyncio.wait_for(woken, left)
        except asyncio.TimeoutError:
            pass
        finally:
            _waiters.discard(woken)


class Recorder:
    """Collects events by name (`publication`, `subscribed`, …) and lets a test wait for them."""

    def __init__(self) -> None:
        self.events: dict[str, list[Any]] = defaultdict(list)

    def add(self, name: str, ctx: Any) -> None:
        self.events[name].append(ctx)
        for woken in list(_waiters):
            if not woken.done():
                woken.set_result(None)

    def __getitem__(self, name: str) -> list[Any]:
        return self.events[name]

    async def wait(
        self,
        name: str,
        n: int = 1,
        pred: Optional[Callable[[Any], bool]] = None,
        timeout: float = WAIT,
    ) -> list[Any]:
        """Waits until `n` events `name` (satisfying `pred`, if given) have arrived; returns them."""

        def got() -> list[Any]:
            return [e for e in self.events[name] if pred is None or pred(e)]

        try:
            await until(lambda: len(got()) >= n, f"{n} {name} events", timeout)
        except AssertionError as e:
            counts = {k: len(v) for k, v in self.events.items()}
            raise AssertionError(f"{e} (have {len(got())}: {got()!r}; all events: {counts})") from None
        return got()

    async def first(self, name: str, pred: Optional[Callable[[Any], bool]] = None, timeout: float = WAIT):
        return (await self.wait(name, 1, pred, timeout))[0]


def _recording(base: type, rec: Recorder) -> Any:
    """An instance of the SDK's handler class `base` whose every `on_*` callback records into `rec`."""

    def make(name: str):
        async def handler(self, ctx):  # noqa: ARG001 - the SDK's signature
            rec.add(name, ctx)

        return handler

    methods = {m: make(m[3:]) for m in dir(base) if m.startswith("on_")}
    return type(f"Recording{base.__name__}", (base,), methods)()


class Codec:
    """What differs for the app between the SDK's two encodings: JSON carries JSON values, Protobuf bytes."""

    def __init__(self, protobuf: bool):
        self.protobuf = protobuf
        self.name = "protobuf" if protobuf else "json"

    def enc(self, value: Any) -> Any:
        return json.dumps(value).encode() if self.protobuf else value

    def dec(self, data: Any) -> Any:
        if self.protobuf:
            assert isinstance(data, bytes), f"Protobuf data is bytes, got {data!r}"
            return json.loads(data) if data else None
        return data

    def __repr__(self) -> str:
        return self.name


class Peer:
    """A centrifuge-python Client with its events recorded, plus its subscriptions' events."""

    def __init__(
        self,
        address: str,
        codec: Codec,
        token: str = "",
        get_token: Optional[Callable[[], Any]] = None,
    ):
        self.codec = codec
        self.events = Recorder()
        self.subs: dict[str, Recorder] = {}
        self.client = Client(
            address,
            events=_recording(ClientEventHandler, self.events),
            token=token,
            get_token=get_token,
            use_protobuf=codec.protobuf,
            timeout=5.0,
            min_reconnect_delay=0.1,
            max_reconnect_delay=0.3,
            proxy=None,
        )

    async def connect(self) -> Any:
        """Connects; returns the `connected` context."""
        await self.client.connect()
        return await self.events.first("connected")

    def new_sub(self, channel: str, **opts: Any) -> tuple[Subscription, Recorder]:
        rec = Recorder()
        sub = self.client.new_subscription(
            channel, events=_recording(SubscriptionEventHandler, rec), **opts
        )
        self.subs[channel] = rec
        return sub, rec

    async def subscribe(self, channel: str, **opts: Any) -> tuple[Subscription, Recorder]:
        """Subscribes and waits until subscribed."""
        sub, rec = self.new_sub(channel, **opts)
        await sub.subscribe()
        await rec.first("subscribed")
        return sub, rec

    async def close(self) -> None:
        await self.client.disconnect()


class WsSniffer:
    """Follows one direction of a WebSocket connection: the HTTP head, then each frame's opcode."""

    def __init__(self) -> None:
        self.head: Optional[str] = None
        self.opcodes: list[int] = []
        self._buf = b""

    def feed(self, data: bytes) -> None:
        self._buf += data
        if self.head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = self._buf[:end].decode("latin-1")
            self._buf = self._buf[end + 4 :]
        while len(self._buf) >= 2:
            b0, b1 = self._buf[0], self._buf[1]
            size, pos = b1 & 0x7F, 2
            if size == 126:
                if len(self._buf) < 4:
                    return
                size, pos = int.from_bytes(self._buf[2:4], "big"), 4
            elif size == 127:
                if len(self._buf) < 10:
                    return
                size, pos = int.from_bytes(self._buf[2:10], "big"), 10
            if b1 & 0x80:
                pos += 4  # masking key (client frames)
            if len(self._buf) < pos + size:
                return
            self.opcodes.append(b0 & 0x0F)
            self._buf = self._buf[pos + size :]


TEXT, BINARY = 0x1, 0x2


class Proxy:
    """A TCP proxy in front of Herald that a test can cut (`cut()` aborts live connections and refuses new
    ones until `restore()`), and that records the WebSocket frames going through it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.open = True
        self.port = 0
        self.sniffers: list[tuple[WsSniffer, WsSniffer]] = []  # (client->server, server->client)
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> "Proxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if not self.open:
            cwriter.transport.abort()
            return
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cwriter.transport.abort()
            return
        up, down = WsSniffer(), WsSniffer()
        self.sniffers.append((up, down))
        conn = (cwriter, swriter)
        self._conns.add(conn)
        try:
            await asyncio.gather(self._pipe(creader, swriter, up), self._pipe(sreader, cwriter, down))
        finally:
            self._conns.discard(conn)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sniffer: WsSniffer) -> None:
        try:
            while data := await reader.read(65536):
                sniffer.feed(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        self.open = False
        for cwriter, swriter in list(self._conns):
            cwriter.transport.abort()
            swriter.transport.abort()

    def restore(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
