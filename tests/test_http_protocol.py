"""The HTTP protocol `kmsgate serve` runs (kmsgate.http_protocol: one write per reply),
spoken to over a raw socket: pipelined requests get complete replies in order, and a
reply that closes the connection arrives whole before the close."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.test_cli import running_gateway

TIMEOUT = 20.0


def _replies(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of each reply in `raw` (every reply has a Content-Length).
    Raises AssertionError if `raw` holds anything but whole replies."""
    replies = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"incomplete reply head: {raw[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        assert len(rest) >= length, "truncated reply body"
        replies.append((int(status_line.split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return replies


def test_pipelined_requests_get_whole_replies_in_order_and_close_flushes(
    tmp_path: Path,
) -> None:
    with running_gateway(tmp_path) as gw:
        auth = {"Authorization": f"Bearer {gw.root_token}"}
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
