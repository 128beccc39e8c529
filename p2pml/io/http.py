"""The HTTP data plane over aiohttp: a server and a client that move deltas and models.

The only module that imports aiohttp. Routes:

- ``POST /v1/delta``: body is a DeltaPush frame; the reply is an Ack frame.
- ``POST /v1/model``: body is a ModelRequest frame; the reply is a ModelReply frame, or a small
  ModelUnchanged frame when the caller already holds the current version.
- ``GET /v1/info``: a small JSON document about the node (health check).
- ``POST /v1/control`` (a parameter server only): a Register, Heartbeat or BarrierRequest frame;
  the reply is a ServerStatus frame. A BarrierRequest is a long poll: the reply comes when the
  server's barrier lets the worker go, or when the poll window ends.
- ``GET /metrics`` (when the owner passes a ``metrics`` callable): the owner's Prometheus metrics in
  the text exposition format 0.0.4; 404 otherwise. This module renders nothing itself: the callable
  returns the finished document.

Bodies are checked against their cap before a byte is read (411 without Content-Length, 413 over the
cap), then read in large chunks straight into one preallocated buffer, which the decoded message's
arrays view. A body must arrive within ``body_deadline_s`` (408 otherwise), and a connection with no
complete request headers for ``idle_timeout_s`` is closed, so slow or silent clients cannot hold
the server. Refusals are 4xx replies with a JSON body ``{"error": code, "message": text}``, counted
by code; the server keeps serving. aiohttp's errors are mapped to p2pml's (`PeerUnreachable`,
`PeerTimeout`, `PeerRejected`).

Both ends count the p2pml frames they move, by route, in `bytes_in` and `bytes_out`: the server the
request bodies it read in full and the reply bodies it sent, the client the request bodies the peer
answered and the reply bodies it read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Final, Protocol, Self

import aiohttp
import numpy as np
import numpy.typing as npt
from aiohttp import web

from p2pml.core.config import DataPlaneConfig
from p2pml.core.limits import RateLimiter, WarnGate
from p2pml.core.types import Address
from p2pml.errors import (
    ConfigError,
    PeerRejected,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    Refused,
    UnexpectedMessage,
    WireFormatError,
)
from p2pml.io.buffers import ReceiveBufferPool
from p2pml.protocol.auth import NONCE_BYTES, TRAILER_BYTES, Authenticator, Digest, new_digest
from p2pml.protocol.messages import (
    Ack,
    BarrierRequest,
    DeltaPush,
    Heartbeat,
    Message,
    ModelReply,
    ModelRequest,
    ModelUnchanged,
    Register,
    ServerStatus,
)
from p2pml.protocol.wire import WireLimits, decode_message, encode_frames, frames_size

__all__ = [
    "CONTENT_TYPE",
    "METRICS_CONTENT_TYPE",
    "ControlHandler",
    "ControlMessage",
    "DataPlaneClient",
    "DataPlaneHandler",
    "DataPlaneServer",
    "loopback_source",
    "sealed_body",
]

log = logging.getLogger(__name__)
MAX_ERROR_BODY: Final = 4096  # bytes of a peer's error reply that are read
_CODE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")

CONTENT_TYPE: Final = "application/x-p2pml"
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format, which the ``metrics`` callable must return."""
SHUTDOWN_GRACE_S: Final = 2.0
"""How long a stopping server lets requests in progress finish before it cancels them."""
LINGER_S: Final = 1.0
"""How long the server drains the unread rest of a refused body before it closes the connection."""
WARN_INTERVAL_S: Final = 10.0
"""Refusals from one remote address are logged at most once per this interval."""
MAX_WARNED_HOSTS: Final = 1024
InfoValue = str | int | float | bool | None
BUSY_CODES: Final = frozenset({"queue_full", "no_model", "busy"})
"""Refusals answered 503: the peer may retry later."""
CONFLICT_CODES: Final = frozenset({"stale", "other_run", "unknown_worker", "duplicate"})
"""Refusals answered 409: the message is valid but conflicts with this node's state."""
AUTH_CODES: Final = frozenset({"bad_seal", "clock_skew", "forged", "not_admitted", "replayed"})
"""Refusals answered 403: the frame's seal failed (see `p2pml.protocol.auth`)."""
PLANE_CODES: Final = AUTH_CODES | {
    "bad_frame",
    "body_timeout",
    "busy",
    "length_required",
    "rate_limited",
    "too_large",
    "truncated",
}
"""Refusals of the data plane itself, before a handler sees the message."""
ControlMessage = Register | Heartbeat | BarrierRequest


class DataPlaneHandler(Protocol):
    """What a node does with the data plane's requests. May raise `ProtocolError` to refuse one."""

    async def on_delta(self, msg: DeltaPush) -> Ack: ...

    async def on_model_request(self, msg: ModelRequest) -> ModelReply | ModelUnchanged: ...

    def info(self) -> dict[str, InfoValue]: ...


class ControlHandler(Protocol):
    """What a parameter server does with its workers' control messages."""

    async def on_control(self, msg: ControlMessage) -> ServerStatus: ...


def _line(request: web.Request) -> tuple[str, str, str | None]:
    return request.method, request.path, request.remote


def _wire_limits(config: DataPlaneConfig) -> WireLimits:
    return WireLimits(max_message_bytes=config.max_message_bytes)


class _ParserNoise(logging.Filter):
    """aiohttp logs a request it cannot parse as an ERROR with a traceback. From a peer that is
    bad input, not a bug of ours: it becomes one WARNING line without the traceback, at most once
    per `WARN_INTERVAL_S`, saying how many more there were."""

    def __init__(self) -> None:
        super().__init__()
        self._gate = WarnGate[None](WARN_INTERVAL_S)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, aiohttp.http_exceptions.HttpProcessingError):
            return True
        held = self._gate.open(None, now=time.monotonic())
        if held is None:
            return False
        more = f"; {held} more since the last warning" if held else ""
        record.msg = f"{record.getMessage()}: not valid HTTP ({exc}){more}"
        record.args = ()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


_server_log = logging.getLogger(f"{__name__}.server")
_server_log.addFilter(_ParserNoise())


class _Refusal(Exception):
    """A request the server refuses with `status` and a JSON reason."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close


async def _read_exactly(
    stream: aiohttp.StreamReader,
    buffer: npt.NDArray[np.uint8],
    digest: Digest | None = None,
) -> npt.NDArray[np.uint8]:
    """Fill `buffer` from `stream`, chunk by chunk; EOFError if the stream is short or long.

    With a `digest`, every byte before the seal's place (the last `TRAILER_BYTES`) is hashed as
    it lands in the buffer, while it is in the cache (on the loop: BLAKE3 takes about 1 ms for
    a 4 MiB chunk; a hashing thread measured slower on a busy machine, see `p2pml bench
    transport`)."""
    n_bytes = buffer.nbytes
    hashed_end = n_bytes - TRAILER_BYTES if digest is not None else 0
    view = buffer.data
    filled = 0
    while filled < n_bytes:
        chunk = await stream.readany()
        if not chunk:
            raise EOFError(f"body ended after {filled} of {n_bytes} bytes")
        end = filled + len(chunk)
        if end > n_bytes:
            raise EOFError(f"body longer than the {n_bytes} bytes announced")
        view[filled:end] = chunk
        if digest is not None and filled < hashed_end:
            digest.update(view[filled : min(end, hashed_end)])
        filled = end
    return buffer


async def _write_frames(
    write: Callable[[memoryview], Awaitable[None]],
    frames: Sequence[memoryview],
    chunk_bytes: int,
    auth: Authenticator | None = None,
) -> None:
    """Write `frames` in slices of at most `chunk_bytes`, so the transport never buffers a whole
    tensor (Python 3.11's transport copies what it cannot send at once). With `auth`, each slice
    is hashed just before it is written (while it is in the cache), and the seal follows the
    last one."""
    digest = new_digest() if auth is not None else None
    for frame in frames:
        for start in range(0, frame.nbytes, chunk_bytes):
            piece = frame[start : start + chunk_bytes]
            if digest is not None:
                digest.update(piece)
            await write(piece)
    if auth is not None and digest is not None:
        await write(memoryview(_seal(auth, digest.digest())))


def _seal(auth: Authenticator, digest: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return auth.seal(digest, now_unix_s=time.time(), nonce=nonce)


def sealed_body(msg: Message, auth: Authenticator | None) -> bytes:
    """`msg`'s whole request or reply body in one buffer, sealed with `auth` (no seal without).

    For small messages, tests and tools; large ones are streamed and sealed on the way out."""
    body = b"".join(encode_frames(msg))
    if auth is None:
        return body
    digest = new_digest()
    digest.update(body)
    return body + _seal(auth, digest.digest())


def _sealed_size(frames: Sequence[memoryview], auth: Authenticator | None) -> int:
    return frames_size(frames) + (TRAILER_BYTES if auth is not None else 0)


def _open(
    body: npt.NDArray[np.uint8],
    digest: bytes | None,
    auth: Authenticator | None,
    limits: WireLimits,
) -> Message:
    """Decode a received body; with `auth`, check its seal against the frame's sender."""
    if auth is None or digest is None:
        return decode_message(body, limits)
    if body.nbytes < TRAILER_BYTES:
        raise WireFormatError(
            f"body: expected a frame and its {TRAILER_BYTES}-byte seal, "
            f"received {body.nbytes} bytes"
        )
    try:
        msg = decode_message(body[:-TRAILER_BYTES], limits)
    except WireFormatError:
        try:  # is it a whole frame without a seal?
            decode_message(body, limits)
        except WireFormatError:
            raise
        raise Refused(
            "bad_seal",
            "the frame carries no seal: every frame must be signed (a peer of an older release?)",
        ) from None
    sender = getattr(msg, "sender", None)
    if sender is None:
        raise UnexpectedMessage(f"a {type(msg).__name__} frame names no sender to check")
    auth.check(body[-TRAILER_BYTES:].data, digest, sender=sender, now_unix_s=time.time())
    return msg


class _FramesPayload(aiohttp.payload.Payload):
    """A request body made of scatter-gather frames, sent without joining them (and sealed)."""

    def __init__(
        self,
        frames: Sequence[memoryview],
        chunk_bytes: int,
        auth: Authenticator | None,
    ) -> None:
        super().__init__(frames, content_type=CONTENT_TYPE)
        self._size = _sealed_size(frames, auth)
        self._frames = frames
        self._chunk_bytes = chunk_bytes
        self._auth = auth

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await _write_frames(writer.write, self._frames, self._chunk_bytes, self._auth)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return f"<p2pml frames, {self.size} bytes>"


class DataPlaneServer:
    """Serves one node's data plane: ``async with DataPlaneServer(cfg, handler) as server``.

    Args:
        auth: seals the replies and checks the seal of every request (see
            `p2pml.protocol.auth`); without it frames travel unsealed (benchmarks and tests only:
            a node always has one, and sealed and unsealed ends do not understand each other).
        control: answers ``POST /v1/control`` (a parameter server); without it the route is 404.
        metrics: returns the owner's metrics in `METRICS_CONTENT_TYPE` for ``GET /metrics``; it
            runs on the loop and must be quick. Without it the route is 404.
        on_refusal: called with the route and the code of every refused request (the handler's
            own refusals and those of the data plane: seal, size, rate), to count them.

    Before any byte of a body is read, the request's remote address must be within its rate
    (`DataPlaneConfig.peer_limit`: 429 ``rate_limited`` beyond) and the requests in progress
    within their caps (`max_requests_per_peer`, `max_requests`: 503 ``busy`` beyond).
    """

    def __init__(
        self,
        config: DataPlaneConfig,
        handler: DataPlaneHandler,
        *,
        limits: WireLimits | None = None,
        auth: Authenticator | None = None,
        control: ControlHandler | None = None,
        metrics: Callable[[], bytes] | None = None,
        on_refusal: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config.validate()
        self.handler = handler
        self.on_refusal = on_refusal
        self.auth = auth
        self.control = control
        self.metrics = metrics
        self.limits = limits or _wire_limits(config)
        self.rate = RateLimiter[str](config.peer_limit, max_keys=config.max_limited_peers)
        self._in_progress: Counter[str] = Counter()
        self._warned = WarnGate[str](WARN_INTERVAL_S, max_keys=MAX_WARNED_HOSTS)
        self.rejections: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self.bytes_out: Counter[str] = Counter()
        self._pool = ReceiveBufferPool(config.receive_pool_bytes)
        self._rejected = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._addr: Address | None = None

    @property
    def addr(self) -> Address:
        """The bound address (the real port when the config asked for port 0)."""
        if self._addr is None:
            raise RuntimeError("the data plane server is not running")
        return self._addr

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=self.config.max_message_bytes)
        app.router.add_post("/v1/delta", self._delta)
        app.router.add_post("/v1/model", self._model)
        app.router.add_get("/v1/info", self._info)
        if self.control is not None:
            app.router.add_post("/v1/control", self._control)
        if self.metrics is not None:
            app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.config.idle_timeout_s,
            read_bufsize=self.config.read_buffer_bytes,
            max_line_size=8190,
            max_field_size=8190,
            lingering_time=LINGER_S,
            logger=_server_log,
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(
            runner, self.config.listen.host, self.config.listen.port, reuse_address=True
        )
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise ConfigError(
                "http_listen",
                str(self.config.listen),
                f"an address this host can bind ({err.strerror or err})",
            ) from err
        host, port = runner.addresses[0][:2]
        self._addr = Address(host, port)
        log.info("data plane listening on %s", self._addr)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("data plane on %s stopped", self._addr)

    async def _body(
        self, request: web.Request, cap: int, expected: type[Message] | None = None
    ) -> Message:
        """Read, decode and (with `auth`) check the seal of a request's body."""
        length = request.content_length
        if length is None:
            raise _Refusal(
                411, "length_required", "a Content-Length header is required", close=True
            )
        if length > cap:
            raise _Refusal(
                413, "too_large", f"body of {length} bytes is over the cap of {cap}", close=True
            )
        try:
            hasher = new_digest() if self.auth is not None else None
            async with asyncio.timeout(self.config.body_deadline_s(length)):
                body = await _read_exactly(request.content, self._pool.acquire(length), hasher)
            digest = hasher.digest() if hasher is not None else None
        except TimeoutError:
            raise _Refusal(
                408,
                "body_timeout",
                f"body of {length} bytes was not received within "
                f"{self.config.body_deadline_s(length):.1f} s",
                close=True,
            ) from None
        except (
            EOFError,
            aiohttp.ClientPayloadError,
            aiohttp.http_exceptions.HttpProcessingError,
            ConnectionResetError,
        ) as exc:
            raise _Refusal(400, "truncated", str(exc), close=True) from None
        self.bytes_in[request.path] += length
        msg = _open(body, digest, self.auth, self.limits)
        if expected is not None and not isinstance(msg, expected):
            raise UnexpectedMessage(f"expected {expected.__name__}, received {type(msg).__name__}")
        return msg

    def _admit(self, request: web.Request) -> _Refusal | None:
        """The refusal of a request over its sender's rate or the caps on requests in progress."""
        host = request.remote or "unknown"
        cfg = self.config
        if self._in_progress.total() >= cfg.max_requests:
            return _Refusal(
                503, "busy", f"{cfg.max_requests} requests are in progress already", close=True
            )
        if self._is_own(host):  # its neighbours on this machine (p2pml local): global caps only
            return None
        if self._in_progress[host] >= cfg.max_requests_per_peer:
            return _Refusal(
                503,
                "busy",
                f"{host} has {self._in_progress[host]} requests in progress; at most "
                f"{cfg.max_requests_per_peer} are served at once",
                close=True,
            )
        length = request.content_length or 0
        if length > cfg.max_message_bytes:
            return None  # refused as too large (413) before a byte is read: never "retry later"
        why = self.rate.admit(host, length, now=time.monotonic())
        if why is not None:
            limit = cfg.peer_limit
            allowed = (
                f"{limit.requests_per_s:g} requests/s (burst {limit.request_burst:g})"
                if why == "requests"
                else f"{limit.bytes_per_s:g} bytes/s (burst {limit.byte_burst:g})"
            )
            return _Refusal(429, "rate_limited", f"{host} is over {allowed}", close=True)
        return None

    def _is_own(self, host: str) -> bool:
        """Whether requests from `host` come from this node's own address (per-peer limits
        would count every node of a one-machine run as one peer)."""
        own = self._addr.host if self._addr is not None else self.config.listen.host
        if host == own:
            return True
        try:
            return (
                ipaddress.ip_address(own).is_unspecified and ipaddress.ip_address(host).is_loopback
            )
        except ValueError:
            return False

    async def _serve(
        self, request: web.Request, answer: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        refusal = self._admit(request)
        if refusal is not None:
            return await self._refuse(request, refusal)
        host = request.remote or "unknown"
        self._in_progress[host] += 1
        try:
            return await self._answer(request, answer)
        finally:
            self._in_progress[host] -= 1
            if self._in_progress[host] <= 0:
                del self._in_progress[host]

    async def _answer(
        self, request: web.Request, answer: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await answer()
        except ConnectionResetError as exc:  # the peer left while we answered (a cancelled pull)
            log.info("%s %s from %s: the peer went away: %s", *_line(request), exc)
            return web.Response(status=499)  # never sent; aiohttp drops it quietly
        except _Refusal as refusal:
            return await self._refuse(request, refusal)
        except Refused as exc:
            status = (
                503
                if exc.code in BUSY_CODES
                else 409
                if exc.code in CONFLICT_CODES
                else 403
                if exc.code in AUTH_CODES
                else 400
            )
            return await self._refuse(request, _Refusal(status, exc.code, str(exc)))
        except ProtocolError as exc:
            kind = "bad_frame" if isinstance(exc, WireFormatError) else "refused"
            return await self._refuse(request, _Refusal(400, kind, str(exc)))
        self.bytes_out[request.path] += response.content_length or 0
        return response

    async def wait_for_rejections(self, code: str, count: int = 1) -> None:
        """Wait until at least `count` requests were refused with `code` (use under a timeout)."""
        async with self._rejected:
            await self._rejected.wait_for(lambda: self.rejections[code] >= count)

    def _warn(self, request: web.Request, refusal: _Refusal) -> None:
        """One WARNING per remote address per `WARN_INTERVAL_S`, saying how many more were
        refused in between (a flood of bad requests must not become a flood of log lines)."""
        host = request.remote or "unknown"
        held = self._warned.open(host, now=time.monotonic())
        if held is None:
            return
        more = f" ({held} more refused since the last warning)" if held else ""
        log.warning(
            "refused %s %s from %s: %s %s%s",
            request.method,
            request.path,
            host,
            refusal.status,
            refusal.message,
            more,
        )

    async def _refuse(self, request: web.Request, refusal: _Refusal) -> web.StreamResponse:
        self.rejections[refusal.code] += 1
        if self.on_refusal is not None:
            self.on_refusal(request.path, refusal.code)
        async with self._rejected:
            self._rejected.notify_all()
        self._warn(request, refusal)
        response = web.json_response(
            {"error": refusal.code, "message": refusal.message}, status=refusal.status
        )
        if refusal.close:
            response.force_close()
        return response

    async def _delta(self, request: web.Request) -> web.StreamResponse:
        async def answer() -> web.StreamResponse:
            msg = await self._body(request, self.config.max_message_bytes, DeltaPush)
            assert isinstance(msg, DeltaPush)
            ack = await self.handler.on_delta(msg)
            return self._frame_response(ack)

        return await self._serve(request, answer)

    async def _model(self, request: web.Request) -> web.StreamResponse:
        async def answer() -> web.StreamResponse:
            msg = await self._body(request, self.config.max_control_bytes, ModelRequest)
            assert isinstance(msg, ModelRequest)
            reply = await self.handler.on_model_request(msg)
            frames = encode_frames(reply)
            response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
            response.content_length = _sealed_size(frames, self.auth)
            await response.prepare(request)
            await _write_frames(response.write, frames, self.config.chunk_bytes, self.auth)
            await response.write_eof()
            return response

        return await self._serve(request, answer)

    async def _control(self, request: web.Request) -> web.StreamResponse:
        control = self.control
        assert control is not None, "the route exists only with a control handler"

        async def answer() -> web.StreamResponse:
            msg = await self._body(request, self.config.max_control_bytes)
            if not isinstance(msg, Register | Heartbeat | BarrierRequest):
                raise UnexpectedMessage(
                    f"expected Register, Heartbeat or BarrierRequest, received {type(msg).__name__}"
                )
            return self._frame_response(await control.on_control(msg))

        return await self._serve(request, answer)

    def _frame_response(self, msg: Message) -> web.Response:
        return web.Response(body=sealed_body(msg, self.auth), content_type=CONTENT_TYPE)

    async def _info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok", **self.handler.info()})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        metrics = self.metrics
        assert metrics is not None, "the route exists only with a metrics callable"
        return web.Response(body=metrics(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def loopback_source(host: str) -> str | None:
    """`host` when it is a loopback IP (a node listening there can only be in a run on this
    machine, so its connections may come from the same address), else None."""
    try:
        return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


class DataPlaneClient:
    """Talks to peers' data planes over a keep-alive pool: ``async with DataPlaneClient(cfg)``.

    `auth` seals every request and checks every reply's seal; `bind_host` is the local address
    its connections come from (the OS chooses by default).

    Every call is bounded by the config's connect and read timeouts; callers add their own
    ``asyncio.timeout`` for a tighter budget. Errors: `PeerUnreachable`, `PeerTimeout`,
    `PeerRejected` (the peer refused), `WireFormatError` (the peer's reply is malformed).
    """

    def __init__(
        self,
        config: DataPlaneConfig,
        *,
        limits: WireLimits | None = None,
        auth: Authenticator | None = None,
        bind_host: str | None = None,
    ) -> None:
        self.config = config.validate()
        self.limits = limits or _wire_limits(config)
        self.auth = auth
        self.bind_host = bind_host
        self.refused_replies: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self.bytes_out: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._pool = ReceiveBufferPool(config.receive_pool_bytes)

    async def __aenter__(self) -> Self:
        cfg = self.config
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=cfg.max_connections_per_peer,
            local_addr=None if self.bind_host is None else (self.bind_host, 0),
            keepalive_timeout=cfg.idle_timeout_s / 2,  # close before the server's idle timeout
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
            ),
            read_bufsize=cfg.read_buffer_bytes,
            auto_decompress=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def push_delta(self, addr: Address, msg: DeltaPush) -> Ack:
        """Send a delta to the peer at `addr`; returns its acknowledgement."""
        reply = await self._post(addr, "/v1/delta", msg, self.config.max_control_bytes)
        if not isinstance(reply, Ack):
            raise UnexpectedMessage(f"{addr}: expected Ack, received {type(reply).__name__}")
        return reply

    async def pull_model(self, addr: Address, msg: ModelRequest) -> ModelReply | ModelUnchanged:
        """Ask the peer at `addr` for its model; unchanged when it is still at `have_version`."""
        reply = await self._post(addr, "/v1/model", msg, self.config.max_message_bytes)
        if not isinstance(reply, ModelReply | ModelUnchanged):
            raise UnexpectedMessage(f"{addr}: expected a model, received {type(reply).__name__}")
        return reply

    async def control(self, addr: Address, msg: ControlMessage) -> ServerStatus:
        """Send a control message to the parameter server at `addr`; returns its status (a
        BarrierRequest waits up to the server's long-poll window)."""
        reply = await self._post(addr, "/v1/control", msg, self.config.max_control_bytes)
        if not isinstance(reply, ServerStatus):
            raise UnexpectedMessage(
                f"{addr}: expected ServerStatus, received {type(reply).__name__}"
            )
        return reply

    async def info(self, addr: Address) -> dict[str, object]:
        """The peer's info document."""
        session = self._require_session()
        try:
            async with session.get(f"http://{addr}/v1/info") as response:
                if response.status != 200:
                    raise await self._rejection(response)
                data = await response.json(content_type=None)
        except (aiohttp.ContentTypeError, ValueError) as exc:
            raise WireFormatError(f"{addr} /v1/info: not a JSON object ({exc})") from exc
        except TimeoutError as exc:
            raise PeerTimeout(f"{addr}: no answer within the read timeout") from exc
        except aiohttp.ClientError as exc:
            raise PeerUnreachable(f"{addr}: {exc}") from exc
        if not isinstance(data, dict):
            raise WireFormatError(f"{addr} /v1/info: expected a JSON object, received {data!r}")
        return data

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client inside 'async with DataPlaneClient(...)'")
        return self._session

    async def _post(self, addr: Address, path: str, msg: Message, cap: int) -> Message:
        session = self._require_session()
        payload = _FramesPayload(encode_frames(msg), self.config.chunk_bytes, self.auth)
        try:
            async with session.post(f"http://{addr}{path}", data=payload) as response:
                self.bytes_out[path] += payload.size or 0
                if response.status != 200:
                    raise await self._rejection(response)
                length = response.content_length
                if length is None or length > cap:
                    raise WireFormatError(
                        f"{addr}{path}: reply of {length} bytes; expected a "
                        f"Content-Length of at most {cap}"
                    )
                hasher = new_digest() if self.auth is not None else None
                body = await _read_exactly(response.content, self._pool.acquire(length), hasher)
                digest = hasher.digest() if hasher is not None else None
                self.bytes_in[path] += length
        except TimeoutError as exc:
            raise PeerTimeout(f"{addr}{path}: no answer within the read timeout") from exc
        except (aiohttp.ClientError, EOFError, ConnectionError) as exc:
            raise PeerUnreachable(f"{addr}{path}: {exc}") from exc
        try:
            return _open(body, digest, self.auth, self.limits)
        except Refused as exc:
            self.refused_replies[exc.code] += 1
            raise WireFormatError(f"{addr}{path}: reply refused ({exc.code}): {exc}") from exc

    async def _rejection(self, response: aiohttp.ClientResponse) -> PeerRejected:
        try:
            body = await response.content.read(MAX_ERROR_BODY)
            data = json.loads(body)
            code, text = str(data["error"]), str(data["message"])[:MAX_ERROR_BODY]
        except (aiohttp.ClientError, ValueError, KeyError, TypeError):
            code, text = "unknown", f"status {response.status} without a p2pml error body"
        if not _CODE.fullmatch(code):  # a peer's word: counters and labels are keyed by it
            code = "other"
        return PeerRejected(response.status, code, text)
