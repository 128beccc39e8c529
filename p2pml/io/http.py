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
import json
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Final, Protocol, Self

import aiohttp
import numpy as np
import numpy.typing as npt
from aiohttp import web

from p2pml.core.config import DataPlaneConfig
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
InfoValue = str | int | float | bool | None
BUSY_CODES: Final = frozenset({"queue_full", "no_model"})
"""Refusals answered 503: the peer may retry later."""
CONFLICT_CODES: Final = frozenset({"stale", "other_run", "unknown_worker"})
"""Refusals answered 409: the message is valid but conflicts with this node's state."""
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


class _Refusal(Exception):
    """A request the server refuses with `status` and a JSON reason."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close


async def _read_exactly(
    stream: aiohttp.StreamReader, buffer: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """Fill `buffer` from `stream`, chunk by chunk; EOFError if the stream is short or long."""
    n_bytes = buffer.nbytes
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
        filled = end
    return buffer


async def _write_frames(
    write: Callable[[memoryview], Awaitable[None]], frames: Sequence[memoryview], chunk_bytes: int
) -> None:
    """Write `frames` in slices of at most `chunk_bytes`, so the transport never buffers a whole
    tensor (Python 3.11's transport copies what it cannot send at once)."""
    for frame in frames:
        for start in range(0, frame.nbytes, chunk_bytes):
            await write(frame[start : start + chunk_bytes])


class _FramesPayload(aiohttp.payload.Payload):
    """A request body made of scatter-gather frames, sent without joining them."""

    def __init__(self, frames: Sequence[memoryview], chunk_bytes: int) -> None:
        super().__init__(frames, content_type=CONTENT_TYPE)
        self._size = frames_size(frames)
        self._frames = frames
        self._chunk_bytes = chunk_bytes

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await _write_frames(writer.write, self._frames, self._chunk_bytes)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return f"<p2pml frames, {self.size} bytes>"


class DataPlaneServer:
    """Serves one node's data plane: ``async with DataPlaneServer(cfg, handler) as server``.

    Args:
        control: answers ``POST /v1/control`` (a parameter server); without it the route is 404.
        metrics: returns the owner's metrics in `METRICS_CONTENT_TYPE` for ``GET /metrics``; it
            runs on the loop and must be quick. Without it the route is 404.
    """

    def __init__(
        self,
        config: DataPlaneConfig,
        handler: DataPlaneHandler,
        *,
        limits: WireLimits | None = None,
        control: ControlHandler | None = None,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.config = config.validate()
        self.handler = handler
        self.control = control
        self.metrics = metrics
        self.limits = limits or _wire_limits(config)
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

    async def _body(self, request: web.Request, cap: int) -> npt.NDArray[np.uint8]:
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
            async with asyncio.timeout(self.config.body_deadline_s(length)):
                body = await _read_exactly(request.content, self._pool.acquire(length))
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
        return body

    def _decode(self, body: npt.NDArray[np.uint8], expected: type[Message]) -> Message:
        msg = decode_message(body, self.limits)
        if not isinstance(msg, expected):
            raise UnexpectedMessage(f"expected {expected.__name__}, received {type(msg).__name__}")
        return msg

    async def _serve(
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
            status = 503 if exc.code in BUSY_CODES else 409 if exc.code in CONFLICT_CODES else 400
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

    async def _refuse(self, request: web.Request, refusal: _Refusal) -> web.StreamResponse:
        self.rejections[refusal.code] += 1
        async with self._rejected:
            self._rejected.notify_all()
        log.warning(
            "refused %s %s from %s: %s %s",
            request.method,
            request.path,
            request.remote,
            refusal.status,
            refusal.message,
        )
        response = web.json_response(
            {"error": refusal.code, "message": refusal.message}, status=refusal.status
        )
        if refusal.close:
            response.force_close()
        return response

    async def _delta(self, request: web.Request) -> web.StreamResponse:
        async def answer() -> web.StreamResponse:
            body = await self._body(request, self.config.max_message_bytes)
            msg = self._decode(body, DeltaPush)
            assert isinstance(msg, DeltaPush)
            ack = await self.handler.on_delta(msg)
            return self._frame_response(ack)

        return await self._serve(request, answer)

    async def _model(self, request: web.Request) -> web.StreamResponse:
        async def answer() -> web.StreamResponse:
            body = await self._body(request, self.config.max_control_bytes)
            msg = self._decode(body, ModelRequest)
            assert isinstance(msg, ModelRequest)
            reply = await self.handler.on_model_request(msg)
            frames = encode_frames(reply)
            response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
            response.content_length = frames_size(frames)
            await response.prepare(request)
            await _write_frames(response.write, frames, self.config.chunk_bytes)
            await response.write_eof()
            return response

        return await self._serve(request, answer)

    async def _control(self, request: web.Request) -> web.StreamResponse:
        control = self.control
        assert control is not None, "the route exists only with a control handler"

        async def answer() -> web.StreamResponse:
            body = await self._body(request, self.config.max_control_bytes)
            msg = decode_message(body, self.limits)
            if not isinstance(msg, Register | Heartbeat | BarrierRequest):
                raise UnexpectedMessage(
                    f"expected Register, Heartbeat or BarrierRequest, received {type(msg).__name__}"
                )
            return self._frame_response(await control.on_control(msg))

        return await self._serve(request, answer)

    def _frame_response(self, msg: Message) -> web.Response:
        body = b"".join(encode_frames(msg))
        return web.Response(body=body, content_type=CONTENT_TYPE)

    async def _info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok", **self.handler.info()})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        metrics = self.metrics
        assert metrics is not None, "the route exists only with a metrics callable"
        return web.Response(body=metrics(), headers={"Content-Type": METRICS_CONTENT_TYPE})


class DataPlaneClient:
    """Talks to peers' data planes over a keep-alive pool: ``async with DataPlaneClient(cfg)``.

    Every call is bounded by the config's connect and read timeouts; callers add their own
    ``asyncio.timeout`` for a tighter budget. Errors: `PeerUnreachable`, `PeerTimeout`,
    `PeerRejected` (the peer refused), `WireFormatError` (the peer's reply is malformed).
    """

    def __init__(self, config: DataPlaneConfig, *, limits: WireLimits | None = None) -> None:
        self.config = config.validate()
        self.limits = limits or _wire_limits(config)
        self.bytes_in: Counter[str] = Counter()
        self.bytes_out: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._pool = ReceiveBufferPool(config.receive_pool_bytes)

    async def __aenter__(self) -> Self:
        cfg = self.config
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=cfg.max_connections_per_peer,
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
        payload = _FramesPayload(encode_frames(msg), self.config.chunk_bytes)
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
                body = await _read_exactly(response.content, self._pool.acquire(length))
                self.bytes_in[path] += length
        except TimeoutError as exc:
            raise PeerTimeout(f"{addr}{path}: no answer within the read timeout") from exc
        except (aiohttp.ClientError, EOFError, ConnectionError) as exc:
            raise PeerUnreachable(f"{addr}{path}: {exc}") from exc
        return decode_message(body, self.limits)

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
