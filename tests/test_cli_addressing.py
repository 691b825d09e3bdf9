"""What the CLI (and the SDK under it) sends and accepts: a name is one URL path segment,
an address that is no URL or a reply that is no gateway's is one error line, an argument
that is not text is refused before anything is sent, and so is a credential that would go
over plain HTTP to a host that is not loopback."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsgate.client import ApiError, Client
from tests.components import LOOPBACK
from tests.test_cli import Gateway, assert_one_line_error, clean_env, run_cli, running_gateway

NOT_TEXT = "a\udcff"
"""An argument with an undecodable byte, as Python hands it over (surrogate escape)."""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gateway")) as gateway:
        yield gateway


def test_a_name_cannot_reach_another_key_or_route(gw: Gateway) -> None:
    gw.ok("keys", "create", "victim", "--type", "ed25519")
    # "victim/disable#" used to POST /v1/keys/victim/disable (the "#" cut off "/rotate")
    assert_one_line_error(gw.run("keys", "rotate", "victim/disable#"), "not_found")
    key = json.loads(gw.ok("keys", "show", "victim").out)
    assert (key["state"], key["primary_version"]) == ("enabled", 1)
    # "../sys/whoami" used to print the caller's identity as if it were a key
    assert_one_line_error(gw.run("keys", "show", "../sys/whoami"), "not_found")
    assert_one_line_error(gw.run("keys", "show", ".."), "not_found")
    assert_one_line_error(gw.run("keys", "public-key", "victim/jwks.json#"), "not_found")
    assert_one_line_error(gw.run("cert", "show", "../../sys/whoami"), "not_found")


def test_an_argument_that_is_not_text_is_refused_before_it_is_sent(
    gw: Gateway, tmp_path: Path
) -> None:
    assert_one_line_error(gw.run("keys", "show", NOT_TEXT), "is not text")
    gw.ok("keys", "create", "files", "--type", "aes-256-gcm")
    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    out = tmp_path / "out.kmsgate"
    result = gw.run(
        "encrypt-file", str(plain), "-k", "files", "-o", str(out), "-c", "a=" + NOT_TEXT
    )
    assert_one_line_error(result, "Unicode")
    assert not out.exists()
    result = gw.run("token", "create", "--role", "dev", "--description", NOT_TEXT)
    assert_one_line_error(result, "not text")


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's canned status, type and body, and keeps its
    request line in the server's `requests`."""

    def _answer(self) -> None:
        self.server.requests.append(self.requestline)  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers.get("content-length") or 0))
        status, ctype, body = self.server.reply  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def not_a_gateway() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), _Canned)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "ctype", "body", "needle"),
    [
        (200, "text/html", b"<html>sign in</html>", "bad_reply"),  # a proxy's login page
        (200, "application/json", b"[1, 2]", "bad_reply"),
        (200, "application/json", b"{}", "bad_reply"),
        (200, "application/json", b'{"signature": "!!", "key_version": 1}', "bad_reply"),
        (502, "text/html", b"<html>Bad Gateway</html>", "HTTP 502 Bad Gateway"),
    ],
)
def test_a_reply_no_gateway_gives_is_one_error_line(
    not_a_gateway: http.server.ThreadingHTTPServer,
    tmp_path: Path,
    status: int,
    ctype: str,
    body: bytes,
    needle: str,
) -> None:
    not_a_gateway.reply = (status, ctype, body)  # type: ignore[attr-defined]
    host, port = not_a_gateway.server_address[:2]
    env = clean_env(KMSGATE_ADDR=f"http://{host}:{port}", KMSGATE_TOKEN="kmg.0123.x")
    data = tmp_path / "data"
    data.write_bytes(b"x")
    for args in (("keys", "list"), ("sign", str(data), "-k", "k"), ("cert", "list")):
        result = run_cli(args, env)
        assert_one_line_error(result, needle)
        assert "error: error:" not in result.err


def test_an_address_that_is_no_url_is_one_error_line() -> None:
    for addr in ("http://127.0.0.1:82OO", "http://[::1"):
        result = run_cli(("keys", "list", "--addr", addr), clean_env())
        assert_one_line_error(result, "is not a valid URL")
    # a password the parser cut at a "/" is still hidden
    result = run_cli(("keys", "list", "--addr", "http://ci:se/cret@127.0.0.1:1"), clean_env())
    assert_one_line_error(result, "http://***@127.0.0.1:1")
    assert "se/cret" not in result.err and "cret" not in result.err


OFF_LOOPBACK = "http://192.0.2.10:1"
"""A plain HTTP address that is not loopback (TEST-NET-1): never connected to here."""


def test_a_credential_is_not_sent_over_plain_http_off_loopback(gw: Gateway) -> None:
    started = time.monotonic()
    with (
        pytest.raises(ApiError) as refused,
        Client(OFF_LOOPBACK, "kmg.0123.SECRET", timeout=30) as client,
    ):
        client.list_keys()
    assert time.monotonic() - started < 1  # refused before a connection is tried
    assert refused.value.code == "invalid_request"
    assert "https://" in refused.value.detail and "SECRET" not in refused.value.detail
    result = run_cli(("keys", "list", "--addr", OFF_LOOPBACK), gw.env())
    assert_one_line_error(result, "invalid_request", "192.0.2.10", "use https://")
    # a password in the address is a credential too (sent as Basic auth), and not shown
    result = run_cli(("health", "--addr", "http://ci:pw-x@192.0.2.10:1"), clean_env())
    assert_one_line_error(result, "invalid_request", "use https://")
    assert "pw-x" not in result.err
    # the same gateway's port through 0.0.0.0 (Linux connects it to this host), which is
    # not a loopback address: refused with a token, served without one
    port = gw.addr.rpartition(":")[2]
    env = {**gw.env(), "KMSGATE_ADDR": f"http://0.0.0.0:{port}"}
    assert_one_line_error(run_cli(("keys", "list"), env), "invalid_request", "use https://")
    assert run_cli(("health",), env).out.strip() == "ok"
    # loopback takes the token over plain HTTP
    assert gw.addr.startswith(f"http://{LOOPBACK}:")
    gw.ok("keys", "list")


def test_a_proxy_from_the_environment_never_sees_a_token_over_plain_http(
    gw: Gateway, not_a_gateway: http.server.ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY names a listener: plain HTTP to the (loopback) gateway goes straight to it,
    so the proxy gets nothing; it used to get every request, the bearer token with it."""
    host, port = not_a_gateway.server_address[:2]
    not_a_gateway.reply = (502, "text/plain", b"proxied")  # type: ignore[attr-defined]
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://{host}:{port}")
    monkeypatch.setenv("NO_PROXY", "")
    with Client(gw.addr, gw.root_token) as client:
        assert isinstance(client.list_keys(), list)
    result = run_cli(("keys", "list"), {**gw.env(), "HTTP_PROXY": f"http://{host}:{port}"})
    assert result.rc == 0, str(result)
    assert not_a_gateway.requests == []  # type: ignore[attr-defined]
