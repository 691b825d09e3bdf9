"""The HTTP protocol `kmsgate serve` runs (kmsgate.http_protocol: one write per reply),
spoken to over a raw socket: pipelined requests get complete replies in order, and a
reply that closes the connection arrives whole before the close."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from kmsgate.audit import AuditFile
from kmsgate.http_protocol import MAX_HEAD_BYTES
from tests.test_cli import running_gateway

TIMEOUT = 20.0


def _replies(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of each reply in `raw` (every reply has a Content-Length).
    Raises AssertionError if `raw` holds anything but whole replies."""
    replies = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"incomplete reply head: {raw[:200]!r}"
        status, headers = _head(head)
        length = int(headers["content-length"])
        assert len(rest) >= length, "truncated reply body"
        replies.append((status, headers, rest[:length]))
        raw = rest[length:]
    return replies


def _head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names in lower case) of a reply head."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers


def _exchange(addr: str, request: bytes) -> bytes:
    """Send `request` on a new connection to the gateway at `addr`; all it sends back until
    it closes the connection."""
    address = urlsplit(addr)
    assert address.hostname and address.port
    with socket.create_connection((address.hostname, address.port), TIMEOUT) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def test_pipelined_requests_get_whole_replies_in_order_and_close_flushes(
    tmp_path: Path,
) -> None:
    with running_gateway(tmp_path) as gw:
        auth = {"Authorization": f"Bearer {gw.root_token}", "Content-Type": "application/json"}
        created = httpx.post(
            f"{gw.addr}/v1/keys",
            json={"name": "piped", "type": "ecdsa-p256", "purpose": "p"},
            headers=auth,
        )
        assert created.status_code == 201, created.text
        body = json.dumps({"input": "aGVsbG8="}).encode()
        requests = [
            b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/keys/piped/sign HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + gw.root_token.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body,
            b"POST /v1/keys/piped/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /v1/no-such-route HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ]
        address = urlsplit(gw.addr)
        assert address.hostname and address.port
        with socket.create_connection((address.hostname, address.port), TIMEOUT) as conn:
            conn.sendall(b"".join(requests))  # all four in one segment
            received = b""
            while chunk := conn.recv(65536):  # until the server closes after the 4th
                received += chunk
    replies = _replies(received)
    assert [status for status, _, _ in replies] == [200, 200, 401, 404]
    assert json.loads(replies[1][2])["key_version"] == 1
    assert json.loads(replies[2][2])["code"] == "unauthenticated"
    ids = [headers.get("x-request-id") for _, headers, _ in replies]
    assert all(ids) and len(set(ids)) == 4
    assert replies[3][1].get("connection") == "close"


def test_a_fast_route_answers_head_without_a_body_and_http_1_0_with_a_close(
    tmp_path: Path,
) -> None:
    """The fast routes' replies are written whole by the protocol (`WHOLE_REPLY`): a HEAD
    reply has the GET reply's headers but no body (a body would be read as the next reply),
    and an HTTP/1.0 request's reply closes the connection."""
    with running_gateway(tmp_path) as gw:
        address = urlsplit(gw.addr)
        assert address.hostname and address.port
        requests = [
            b"HEAD /v1/pki/cas/dev/chain HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/pki/cas/dev/chain HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/pki/cas/dev/chain HTTP/1.0\r\n\r\n",
        ]
        with socket.create_connection((address.hostname, address.port), TIMEOUT) as conn:
            conn.sendall(b"".join(requests))
            received = b""
            while chunk := conn.recv(65536):  # until the server closes after the 3rd
                received += chunk
    head, rest = received.split(b"\r\n\r\n", 1)
    status, headers = _head(head)
    assert status == 200
    length = int(headers["content-length"])
    got, closed = _replies(rest)
    assert got[0] == 200 and closed[0] == 200
    assert len(got[2]) == length > 0 and got[2].startswith(b"-----BEGIN CERTIFICATE-----")
    assert closed[2] == got[2] and closed[1].get("connection") == "close"


def test_a_request_head_over_the_limit_gets_431_and_the_connection_closes(
    tmp_path: Path,
) -> None:
    """httptools keeps request headers in memory without a limit: the protocol reads at
    most MAX_HEAD_BYTES of them (a 16 MB header made a worker grow by 120 MB). A head just
    under the limit, and a large body after a small head, are served as usual."""
    with running_gateway(tmp_path) as gw:

        def exchange(request: bytes) -> bytes:
            return _exchange(gw.addr, request)

        pad = b"x" * (MAX_HEAD_BYTES - 200)
        fits = (
            b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Pad: "
            + pad
            + b"\r\nConnection: close\r\n\r\n"
        )
        assert _replies(exchange(fits))[0][0] == 200
        over = b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad * 3 + b"\r\n\r\n"
        [(status, headers, body)] = _replies(exchange(over))
        assert status == 431 and headers["connection"] == "close"
        assert body.endswith(b"}\n")  # as every JSON reply (docs/api.md)
        assert headers["content-type"] == "application/problem+json"
        assert headers["x-content-type-options"] == "nosniff"  # as docs/api.md promises
        assert headers["cache-control"] == "no-store"  # on every reply
        assert json.loads(body)["code"] == "header_too_large"
        assert json.loads(body)["request_id"] == headers["x-request-id"]  # as every reply has
        # a head that begins in the read that ends the request before it is counted too
        small = b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n"
        big_head = b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad * 2 + b"\r\n\r\n"
        replies = _replies(exchange(small + big_head))
        assert [status for status, _, _ in replies] == [200, 431], replies
        # a request httptools cannot parse: problem+json too (uvicorn answers text/plain)
        for malformed in (
            b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n{}",
            b"GET /v1/sys/health HTTP/1.1\r\nBad\x00Header: x\r\n\r\n",
        ):
            [(status, headers, body)] = _replies(exchange(malformed))
            assert status == 400 and headers["connection"] == "close", malformed
            assert headers["content-type"] == "application/problem+json"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["cache-control"] == "no-store"
            assert json.loads(body)["code"] == "invalid_request"
        # any client can send such requests by the thousand: not a warning line each
        assert "Invalid HTTP request" not in gw.output.read_text(errors="replace")
        auth = {"Authorization": f"Bearer {gw.root_token}", "Content-Type": "application/json"}
        big = httpx.post(
            f"{gw.addr}/v1/keys", content=b"{" + b" " * (MAX_HEAD_BYTES * 4) + b"}", headers=auth
        )
        assert big.status_code == 422, big.text  # the body was read and validated


def test_framing_a_proxy_could_read_otherwise_is_refused_before_the_body(tmp_path: Path) -> None:
    """No Host in HTTP/1.1, two (RFC 9112 3.2: a proxy may route by one, the gateway read
    the other) or one that is no host and port (RFC 9112 3.2 again), a transfer coding but
    chunked (RFC 9112 6.1), a content coding (RFC 9110 8.4) or a charset but UTF-8: each is
    a problem reply, never a request read some other way than a proxy in front may have read
    it."""
    body = b'{"input": "aGVsbG8="}'
    with running_gateway(tmp_path) as gw:
        auth = f"Authorization: Bearer {gw.root_token}\r\n".encode()
        sign = b"POST /v1/keys/none/sign HTTP/1.1\r\n" + auth
        length = f"Content-Length: {len(body)}\r\n".encode()
        json_type = b"Content-Type: application/json\r\n"
        cases = {
            b"GET /v1/sys/health HTTP/1.1\r\nConnection: close\r\n\r\n": (400, "invalid_request"),
            b"GET /v1/sys/health HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n":
                (400, "invalid_request"),
            b"GET /v1/sys/health HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n": (400, "invalid_request"),
            **{
                b"GET /v1/sys/health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n":
                    (400, "invalid_request")
                for host in (b"a b", b"a/b", b"a@b", b"<a>", b"a:80x", b"[::1", b'"a"', b"a\\b")
            },
            sign
            + b"Host: x\r\n"
            + json_type
            + b"Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n": (501, "not_supported"),
            sign + b"Host: x\r\n" + json_type + b"Content-Encoding: br\r\n" + length
            + b"Connection: close\r\n\r\n" + body: (415, "unsupported_media_type"),
            sign + b"Host: x\r\nContent-Type: application/json; charset=latin-1\r\n" + length
            + b"Connection: close\r\n\r\n" + body: (415, "unsupported_media_type"),
        }  # fmt: skip
        for request, (status, code) in cases.items():
            ((got, _, reply),) = _replies(_exchange(gw.addr, request))
            assert (got, json.loads(reply)["code"]) == (status, code), (request, reply)
        health = httpx.get(f"{gw.addr}/v1/sys/health")  # HTTP/1.1 with a Host: served
        assert health.status_code == 200
        for host in (
            b"",
            b"[::1]:8200",
            b"127.0.0.1:8200",
            b"kms.example:",
            b"xn--bcher-kva.example",
        ):
            request = (
                b"GET /v1/sys/health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
            )
            assert _replies(_exchange(gw.addr, request))[0][0] == 200, host


def test_a_trailer_field_is_never_read_as_a_header(tmp_path: Path) -> None:
    """Fields sent after a chunked body (trailers) are dropped: a credential or a content
    type given only there is not seen (401, 415), where the same fields in the head are
    (RFC 9110 6.5.1; a proxy in front checks and strips headers, not trailers)."""
    with running_gateway(tmp_path) as gw:
        token = f"Bearer {gw.root_token}".encode()

        def chunked(head: bytes, trailer: bytes) -> tuple[int, dict[str, object]]:
            request = (
                head + b"Host: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"2\r\n{}\r\n0\r\n" + trailer + b"\r\n"
            )
            ((status, _, reply),) = _replies(_exchange(gw.addr, request))
            return status, json.loads(reply)

        listing = b"POST /v1/sys/policy/evaluate HTTP/1.1\r\nContent-Type: application/json\r\n"
        status, reply = chunked(listing, b"Authorization: " + token + b"\r\n")
        assert (status, reply["code"]) == (401, "unauthenticated"), reply
        status, reply = chunked(listing + b"Authorization: " + token + b"\r\n", b"")
        assert (status, reply["code"]) == (422, "validation_failed"), reply  # authenticated
        untyped = b"POST /v1/sys/policy/evaluate HTTP/1.1\r\nAuthorization: " + token + b"\r\n"
        status, reply = chunked(untyped, b"Content-Type: application/json\r\n")
        assert (status, reply["code"]) == (415, "unsupported_media_type"), reply


def test_a_request_refused_once_its_head_is_read_gets_the_refusal_alone_in_its_turn(
    tmp_path: Path,
) -> None:
    """A Transfer-Encoding whose last coding is not chunked leaves the body without a length
    (RFC 9112 6.3): 400 and close. httptools finds it once the head is read, when the request
    has gone to the application already: the refusal is its one reply (the application's,
    written after the end of the replies, was a RuntimeError in the gateway's log, which any
    client could fill), after the replies to the requests before it. A client that leaves
    before its body arrives is no error of the gateway's either."""
    with running_gateway(tmp_path) as gw:
        address = urlsplit(gw.addr)
        assert address.hostname and address.port
        sign = b"POST /v1/keys/none/sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        health = b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n"
        keys = b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        gzip = b"Transfer-Encoding: gzip\r\n\r\n"
        chunked = b"Transfer-Encoding: chunked\r\n\r\n"
        no_length = "the last transfer coding must be chunked, else the body has no length"
        cases = [
            (health + gzip, [400], no_length),  # kept alive until the refusal
            (health + b"Connection: close\r\n" + gzip, [400], no_length),
            (sign + gzip + b'{"input": "aGVsbG8="}', [400], no_length),
            (health + b"\r\n" + health + gzip, [200, 400], no_length),  # pipelined: in order
            # refused while its header is read, before the application has it
            (health + b"Transfer-Encoding: chunked, gzip\r\n\r\n", [400], "not well-formed"),
            # a chunk that is not one, while the application reads the body
            (keys + chunked + b"2\r\n{}\r\nzz\r\n", [400], "not well-formed"),
            (sign + chunked + b"2\r\n{}\r\nzz\r\n", [400], "not well-formed"),
        ]
        for request, statuses, detail in cases:
            received = _exchange(gw.addr, request)
            replies = _replies(received)
            assert [status for status, _, _ in replies] == statuses, (request, received)
            _, headers, body = replies[-1]
            assert headers["connection"] == "close"
            assert headers["x-content-type-options"] == "nosniff"
            assert detail in json.loads(body)["detail"]
        for route in (keys, sign):  # a client that leaves halfway through its body
            with socket.create_connection((address.hostname, address.port), TIMEOUT) as conn:
                conn.sendall(route + b"Content-Length: 100\r\n\r\n{")
        assert httpx.get(f"{gw.addr}/v1/sys/health").status_code == 200
        log = gw.output.read_text(errors="replace").splitlines()
    errors = [line for line in log if '"level":"error"' in line or "Traceback" in line]
    assert not errors, errors


def test_an_upgrade_or_connect_request_is_refused_and_its_body_never_read_as_a_request(
    tmp_path: Path,
) -> None:
    """httptools ends an upgrade request (`Connection: upgrade` + `Upgrade`, or CONNECT) at
    its head, whatever its Content-Length, and uvicorn, which declines the upgrade, went
    on parsing: a body sent a moment later was served as a request of its own (behind a
    proxy that strips a forged `x-forwarded-client-cert` from heads, one put in such a body
    authenticated as any workload), and a body in the same read was dropped (a rotation
    ran whatever its body). Such a request is now refused alone, 400, and the connection
    closed."""
    with running_gateway(tmp_path) as gw:
        address = urlsplit(gw.addr)
        assert address.hostname and address.port
        inner = (
            b"GET /v1/sys/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + gw.root_token.encode()
            + b"\r\n\r\n"
        )
        heads = [
            b"POST /v1/sys/health HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n",
            b"POST /v1/sys/health HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n",
            b"CONNECT /v1/sys/whoami HTTP/1.1\r\n",
        ]
        for head in heads:
            for pause in (0.0, 0.3):  # the body in the same read, or in a later one
                request = head + b"Host: x\r\nContent-Length: %d\r\n\r\n" % len(inner)
                with socket.create_connection((address.hostname, address.port), TIMEOUT) as conn:
                    conn.sendall(request if pause else request + inner)
                    if pause:
                        time.sleep(pause)
                        with contextlib.suppress(OSError):  # it may have closed already
                            conn.sendall(inner)
                    received = b""
                    while chunk := conn.recv(65536):
                        received += chunk
                ((status, headers, body),) = _replies(received)
                assert (status, json.loads(body)["code"]) == (400, "invalid_request"), body
                assert headers["content-type"] == "application/problem+json"
        auth = {"Authorization": f"Bearer {gw.root_token}"}
        assert httpx.get(f"{gw.addr}/v1/sys/whoami", headers=auth).status_code == 200
        served = AuditFile(gw.data_dir / "audit.log").search(action="principal.read")
        assert len(served.records) == 1  # that one: none of the bodies was served


def test_a_path_with_an_encoded_slash_names_no_route(tmp_path: Path) -> None:
    """The server decodes the path before routing: `/v1/keys/k%2Frotate` rotated `k`, where
    a proxy or a path rule in front (and RFC 3986) sees one segment `k/rotate` under
    `/v1/keys/`. An encoded `/` or `\\` is now 404 before anything runs, on the fast path
    and FastAPI's; other encoded characters are read as before."""
    with running_gateway(tmp_path) as gw:
        auth = {"Authorization": f"Bearer {gw.root_token}", "Content-Type": "application/json"}
        for name in ("k", "ocsp"):
            created = httpx.post(
                f"{gw.addr}/v1/keys",
                headers=auth,
                json={"name": name, "type": "ed25519", "purpose": "p"},
            )
            assert created.status_code == 201, created.text
        token = gw.root_token.encode()
        for path in (
            b"/v1/keys/k%2Frotate",
            b"/v1/keys/k%2fsign",
            b"/v1/keys%2Fk",
            b"/v1/keys/k%5Csign",
            b"/v1/keys/ocsp/versions%2F1%2Fcompromised",  # an "ocsp" segment is no OCSP GET
        ):
            method = b"GET" if path.endswith(b"%2Fk") else b"POST"
            request = (
                method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                b"Connection: close\r\n\r\n{}"
            )  # fmt: skip
            ((status, _, body),) = _replies(_exchange(gw.addr, request))
            assert (status, json.loads(body)["code"]) == (404, "not_found"), (path, body)
        key = httpx.get(f"{gw.addr}/v1/keys/%6B", headers=auth)  # an encoded "k" is "k"
        assert key.status_code == 200 and key.json()["primary_version"] == 1, key.text
        rotated = httpx.get(f"{gw.addr}/v1/keys/ocsp", headers=auth).json()
        assert rotated["primary_version"] == 1
        # an OCSP GET's base64 request encodes its "/" (RFC 6960 A.1): read as the CA's
        ocsp = httpx.get(f"{gw.addr}/v1/pki/cas/dev/ocsp/MAo%2FBg%3D%3D")
        assert ocsp.headers["content-type"] == "application/ocsp-response", ocsp.text


def test_the_protocol_never_hands_a_connection_to_a_websocket_protocol() -> None:
    """With a WebSocket library installed (`uvicorn[standard]` brings one), uvicorn took
    over the connection of an upgrade request the protocol had refused, whose request it
    never made: a KeyError, the connection aborted, the replies owed before it lost."""
    from kmsgate.http_protocol import HttpToolsOneWrite

    assert HttpToolsOneWrite._should_upgrade(object()) is False  # type: ignore[arg-type]
