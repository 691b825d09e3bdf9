"""uvicorn's HTTP/1.1 protocol (httptools), writing each reply with one system call.

uvicorn writes a reply's status line and headers when the application sends
`http.response.start`, and its body with a second write: two system calls and, with
TCP_NODELAY, two TCP segments the client must read. `HttpToolsOneWrite` hands uvicorn a
transport that gathers the writes made during one event-loop step and passes them on
together at the end of that step. Measured with 2 workers on 2 cores, wrk -t2 -c32, the
same machine and build: sign 6,841 -> 9,012-9,468 req/s, the health check 13.3k -> 18.1k
(wrk's own CPU time halves too: the client has half the segments to read).

The request line and headers are read up to `MAX_HEAD_BYTES` (httptools sets no limit and
keeps what it has read in memory): beyond it, 431 problem+json and the connection closes.
They must also arrive within `HttpToolsOneWrite.head_read_seconds` of the connection's
opening or of the request's first byte (uvicorn sets no such limit: a client sending a
header line now and then held its connection for ever): after it, 408 problem+json and the
connection closes. One sweep a second per server looks at every connection, so a request
pays for no timer of its own. Over HTTPS, the TLS handshake must end within the same time
(`HandshakeBoundLoop`), or the connection is dropped: asyncio gives a handshake 60 s.

A complete reply (status, headers and body at once, as the fast routes make them) can skip
uvicorn's two `send` messages, where each header is checked against two regular expressions:
the protocol puts a `WHOLE_REPLY` callable in every request's ASGI extensions, which writes the
reply in one piece and ends the request exactly as uvicorn's `send` does.

`add_edge_headers` adds what every reply carries, the application's and the protocol's own
refusals alike.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import ssl
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import orjson
import uvloop
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from kmsgate.errors import (
    HeaderTooLarge,
    InvalidRequest,
    KmsgateError,
    RequestTimeout,
    problem_document,
)

__all__ = ["WHOLE_REPLY", "HandshakeBoundLoop", "HttpToolsOneWrite", "add_edge_headers"]

MAX_HEAD_BYTES = 64 * 1024
"""The most bytes of request line and headers one request may send (Envoy's default is 60 KiB;
a JWT or a forwarded client certificate takes a few)."""
REFUSED_LINGER_SECONDS = 1.0
HEAD_SWEEP_SECONDS = 1.0
"""How often a server looks for request heads past their deadline."""
WHOLE_REPLY = "kmsgate.whole_reply"
"""The ASGI extension (`scope["extensions"][WHOLE_REPLY]`) that writes a complete reply:
`(status, headers, body) -> bool`, see `_write_whole`."""


_JSON_TYPES = (b"application/json", b"application/problem+json")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_NO_STORE = (b"cache-control", b"no-store")


def add_edge_headers(headers: list[tuple[bytes, bytes]], request_id: str) -> None:
    """Add what every reply carries to its raw `headers`: its request id and `nosniff`;
    and to a JSON reply (it may hold a token, a data key or a plaintext) `cache-control:
    no-store`, unless the route set a cache-control of its own."""
    headers.append((b"x-request-id", request_id.encode()))
    headers.append(_NOSNIFF)
    names = {name.lower(): value for name, value in headers}
    if b"cache-control" not in names and names.get(b"content-type", b"").startswith(_JSON_TYPES):
        headers.append(_NO_STORE)


class _GatheringTransport:
    """A transport that defers writes to the end of the current event-loop step and then
    makes them as one; every other method is the wrapped transport's, `close` sends what
    is pending first and `abort` drops it."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpToolsOneWrite(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `_GatheringTransport` (pass as `http=`). On a TLS
    connection, each request's scope carries the ASGI TLS extension
    (`scope["extensions"]["tls"]`), which uvicorn does not provide: the client certificate
    OpenSSL verified during the handshake (`client_cert_chain`: the leaf, PEM; Python's ssl
    module gives no more of the chain) and the TLS version."""

    head_read_seconds: ClassVar[float] = 30.0
    """The time a client has to send a request's line and headers, from the connection's
    opening or the request's first byte (`kmsgate serve` sets it from
    `limits.body_read_seconds`)."""
    _tls: dict[str, Any] | None = None
    _head_open = True
    """Whether the request being read has not finished its headers yet."""
    _head_bytes = 0
    """What arrived of the request being read since its head began, counted by the read."""
    _parsed_head = 0
    """What the parser read of the request's line and fields (`_count_head`)."""
    _head_since: float | None = None
    """When the head being waited for began (the loop's clock); None once it is complete."""
    _refused = False
    _refusal: bytes | None = None
    """A refusal (`_refuse_head`) waiting for the replies owed before it."""
    _owed = 0
    """The requests handed to the application whose replies are not written yet."""

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the connection closes (see _refuse_head)
        if self._head_open:
            if self._head_bytes + len(data) > MAX_HEAD_BYTES:
                end = data.find(b"\r\n\r\n")  # a body may follow the head in the same read
                if end < 0 or self._head_bytes + end + 4 > MAX_HEAD_BYTES:
                    self._refuse_head(HeaderTooLarge(_HEAD_TOO_LARGE))
                    return
            self._head_bytes += len(data)
        super().data_received(data)

    def _refuse_head(self, error: KmsgateError) -> None:
        """Reply `error` as problem+json to the request being read and end the replies:
        after the replies owed to the requests before it (pipelined), which keep their
        order; then, after `REFUSED_LINGER_SECONDS` spent reading and dropping what the
        client still sends (closing at once, with its bytes unread, would reset the
        connection before the client reads the reply), close. A refused request the
        application already has (its head was whole, its framing failed after it, as
        `Transfer-Encoding: gzip` does) gets this reply, never the application's."""
        if not self._stop_reading():
            return
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and not cycle.response_complete:
            cycle.disconnected = True  # what the application sends is dropped
            cycle.message_event.set()  # and it reads no more of the body
            self._owed -= 1
        request_id = secrets.token_hex(8)  # the application's ids' shape; it never saw this one
        document = problem_document(error.status, error.code, error.title, error.detail, request_id)
        body = orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE)
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/problem+json"),
            (b"connection", b"close"),
        ]
        add_edge_headers(headers, request_id)
        head = b"".join(b"%s: %s\r\n" % header for header in headers)
        length = b"content-length: %d\r\n\r\n" % len(body)
        self._refusal = STATUS_LINE[error.status] + head + length + body
        self._send_refusal()

    def _send_refusal(self) -> None:
        """Write the refusal waiting, if no reply is owed before it, and end the replies."""
        if self._refusal is None or self._owed:
            return
        reply, self._refusal = self._refusal, None
        if self.transport.is_closing():  # an earlier reply closed the connection
            return
        self.transport.write(reply)
        self._close_after_reply()

    def _close_after_reply(self) -> None:
        """End the connection once the client can have read the last reply: half-close,
        then close after `REFUSED_LINGER_SECONDS` (closing with the client's bytes unread
        would reset the connection before the client reads the reply); TLS has no
        half-close, so it closes at once."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        self._owed -= 1
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and cycle.more_body:
            self._end_unread()
        self._send_refusal()

    def _end_unread(self) -> None:
        """The reply went before the request's body was read (a 413 on its declared length,
        a 415, a refusal before the body): what the client still sends is dropped and the
        connection ends as after a refusal (`_refuse_head`), rather than the body being
        read to its end at whatever pace the client sets, with no deadline."""
        if not self._stop_reading():
            return
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self._close_after_reply()

    def _stop_reading(self) -> bool:
        """From now on, drop what the client sends (`data_received`) and wait for no head.
        False when that was so already, or the connection is closing: nothing more to do."""
        self._head_since = None
        if self._refused or self.transport.is_closing():
            return False
        self._refused = True
        return True

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse (a malformed line or header, a bad Content-Length,
        both Content-Length and Transfer-Encoding, a Transfer-Encoding whose last coding is
        not chunked: RFC 9112 6.3): 400 problem+json, as every other refusal, where uvicorn
        sends text/plain; then close (`_refuse_head`)."""
        detail = "the request is not well-formed HTTP/1.1"
        if not self._head_open:  # the head was whole: its framing failed
            codings = b",".join(v for n, v in self.headers if n == b"transfer-encoding")
            if codings and codings.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                detail = "the last transfer coding must be chunked, else the body has no length"
        self._refuse_head(InvalidRequest(detail))

    def head_overdue(self, now: float) -> bool:
        """Whether the head being waited for began over `head_read_seconds` before `now`."""
        return self._head_since is not None and now - self._head_since > self.head_read_seconds

    def refuse_slow_head(self) -> None:
        """408 problem+json, then close (`_refuse_head`)."""
        seconds = f"{self.head_read_seconds:g}"
        self._refuse_head(RequestTimeout(f"the request line and headers took over {seconds} s"))

    def _should_upgrade(self) -> bool:
        """Never: an upgrade is refused at its head (`on_headers_complete`). With a WebSocket
        library installed, uvicorn would otherwise take over the refused request's
        connection, whose request it never made (a KeyError, the connection aborted, and
        the replies owed before it lost)."""
        return False

    def _unsupported_upgrade_warning(self) -> None:
        """Nothing: uvicorn logged two warnings for each upgrade request, which
        `on_headers_complete` has refused already."""

    def on_message_complete(self) -> None:
        if self._refused:  # refused at its head (an upgrade): no request was made of it
            return
        super().on_message_complete()
        self._head_open, self._head_bytes = True, 0

    def on_header(self, name: bytes, value: bytes) -> None:
        """A header field, kept; a trailer field (after a chunked body) is dropped: uvicorn
        would append it to the request's headers, which the application read as sent in
        the head, where a proxy in front checked and stripped them (RFC 9110 6.5.1: never
        merge a trailer into the header section): an `Authorization` or a forwarded client
        certificate sent as a trailer authenticated."""
        if self._head_open:
            self._count_head(len(name) + len(value) + 4)  # as `name: value` and a line break
            super().on_header(name, value)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def _count_head(self, parsed: int) -> None:
        """Count `parsed` bytes of the request line and headers as the parser reads them:
        `data_received` counts what arrives from a head's first read, and a head that began
        in the read that ended the request before it (pipelined) escaped it. Raises
        _HeadRefused, which stops the parser, after the 431 (`_refuse_head`), beyond
        `MAX_HEAD_BYTES`."""
        self._parsed_head += parsed
        if self._parsed_head > MAX_HEAD_BYTES:
            self._refuse_head(HeaderTooLarge(_HEAD_TOO_LARGE))
            raise _HeadRefused

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        gathering = _GatheringTransport(transport, self.loop)
        super().connection_made(gathering)  # type: ignore[arg-type]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # the handshake is done when the protocol is connected
            self._tls = _tls_extension(ssl_object)
        self._head_since = self.loop.time()
        _sweep_heads(self.server_state, self.loop)

    def on_message_begin(self) -> None:
        self._head_since = self.loop.time()
        self._parsed_head = _HEAD_FRAME
        super().on_message_begin()
        self._extensions: dict[str, Any] = {} if self._tls is None else {"tls": self._tls}
        self.scope["extensions"] = self._extensions

    def on_headers_complete(self) -> None:
        """The head is whole: the request goes to the application, unless it asks for
        another protocol (`Connection: upgrade` with `Upgrade`, or CONNECT): 400, then close.
        httptools ends such a request at its head, whatever its Content-Length, and uvicorn,
        declining the upgrade, parsed on: its body was read as a request of its own (one
        a proxy in front never checked: a forged forwarded client certificate in it
        authenticated)."""
        self._head_open = False
        self._head_since = None
        if self.parser.should_upgrade():
            self._refuse_head(InvalidRequest("protocol upgrades and CONNECT are not supported"))
            return
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not an upgrade
            self._owed += 1
            self._extensions[WHOLE_REPLY] = functools.partial(_write_whole, cycle)


_HEAD_TOO_LARGE = f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
_HEAD_FRAME = len(b"GET  HTTP/1.1\r\n\r\n")
"""The least a head holds besides its target and fields: a method, the version, the line
breaks (`_count_head` counts a head as parsed, each field as `name: value`)."""


class _HeadRefused(Exception):
    """Raised from a parser callback once its request is refused: the parser stops (and
    uvicorn, which sees a parser error, sends nothing more: the refusal is queued)."""


_SWEEPING: weakref.WeakSet[ServerState] = weakref.WeakSet()
"""The servers whose request heads are being swept."""


def _sweep_heads(server: ServerState, loop: asyncio.AbstractEventLoop) -> None:
    """Start sweeping `server`'s connections, unless that is under way: every
    `HEAD_SWEEP_SECONDS`, a 408 for each head past its deadline; the sweeps stop when the
    server has no connection left (the next one starts them again)."""
    if server in _SWEEPING:
        return
    _SWEEPING.add(server)

    def sweep() -> None:
        now = loop.time()
        for connection in list(server.connections):
            if isinstance(connection, HttpToolsOneWrite) and connection.head_overdue(now):
                connection.refuse_slow_head()
        if server.connections and not loop.is_closed():
            loop.call_later(HEAD_SWEEP_SECONDS, sweep)
        else:
            _SWEEPING.discard(server)

    loop.call_later(HEAD_SWEEP_SECONDS, sweep)


def _write_whole(
    cycle: RequestResponseCycle, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> bool:
    """Write the whole reply of `cycle`'s request with one `transport.write`: the status line,
    uvicorn's default headers (date), `headers` (the application's own; a `content-length`
    among them is replaced by the body's; `connection: close` closes the connection after
    the reply) and `body`; then end the request as uvicorn's `send` does (keep-alive or
    close, the next pipelined request). False, with nothing
    written, when uvicorn's own `send` must do it: the reply was started, writing is paused
    (the caller's `send` waits for the client), or uvicorn logs each access. True also when
    the client has gone (nothing to write). Raises ValueError for a header value holding a
    line break."""
    if cycle.disconnected:
        return True
    if cycle.response_started or cycle.flow.write_paused or _access_logged(cycle):
        return False
    content = [STATUS_LINE[status]]
    for name, value in (*cycle.default_headers, *headers):
        if name == b"content-length":
            continue
        if b"\r" in value or b"\n" in value:
            raise ValueError("a line break in an HTTP header value")
        if name == b"connection" and b"close" in value.lower():
            cycle.keep_alive = False  # e.g. a 408: the rest of the body must not be read
            continue
        content += (name, b": ", value, b"\r\n")
    content.append(b"content-length: %d\r\n" % len(body))
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content.append(b"\r\n")
    if cycle.scope["method"] != "HEAD":
        content.append(body)
    cycle.response_started = cycle.response_complete = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(b"".join(content))
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True


def _access_logged(cycle: RequestResponseCycle) -> bool:
    return cycle.access_log and cycle.access_logger.isEnabledFor(logging.INFO)


_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension's dictionary for a connection."""
    der = ssl_object.getpeercert(binary_form=True)
    version = ssl_object.version()
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(version) if version else None,
        "cipher_suite": None,
    }


class HandshakeBoundLoop(uvloop.Loop):
    """uvloop's event loop, whose TLS servers drop a connection whose handshake has not
    ended `HttpToolsOneWrite.head_read_seconds` after it opened (asyncio's default: 60 s,
    which let a client that sends nothing, or half a ClientHello, hold it that long). Pass
    to uvicorn as `loop="kmsgate.http_protocol:HandshakeBoundLoop"`."""

    # uvloop's servers are no asyncio.Server, which asyncio's signature promises
    async def create_server(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> asyncio.AbstractServer:
        if kwargs.get("ssl") is not None:
            kwargs["ssl_handshake_timeout"] = HttpToolsOneWrite.head_read_seconds
        return await super().create_server(*args, **kwargs)
