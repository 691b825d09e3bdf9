"""The gateway's JSON log lines (kmsgate.logs): at `--log-level info` one line per request
with its request id (the one in the reply header and the audit record), route, key,
principal, status and duration, and never a token or a body."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kmsgate.api.problems import RequestIds
from kmsgate.audit import AuditFile
from kmsgate.logs import JsonFormatter
from tests.test_cli import assert_one_line_error, clean_env, run_cli, running_gateway

SECRET_INPUT = "c2VjcmV0LWlucHV0LWJ5dGVz"  # "secret-input-bytes"


def test_each_request_is_one_json_line_without_secrets(tmp_path: Path) -> None:
    with running_gateway(tmp_path, "--log-level", "info") as gw:
        root = {"authorization": f"Bearer {gw.root_token}"}
        body = {"name": "logged", "type": "ecdsa-p256", "purpose": "p"}
        assert httpx.post(f"{gw.addr}/v1/keys", json=body, headers=root).status_code == 201
        signed = httpx.post(
            f"{gw.addr}/v1/keys/logged/sign", json={"input": SECRET_INPUT}, headers=root
        )
        assert signed.status_code == 200
        request_id = signed.headers["x-request-id"]
        refused = httpx.post(f"{gw.addr}/v1/keys/logged/sign", json={"input": SECRET_INPUT})
        assert refused.status_code == 401
        time.sleep(0.3)
        text = gw.output.read_text()
    # every line but the dev banner is JSON, uvicorn's start and stop lines too; one line
    # per request (uvicorn's own access line would repeat it without the request id)
    after_banner = text[text.index("\n{") + 1 :].splitlines()  # the dev banner comes first
    assert all(line.startswith("{") for line in after_banner), text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(
        line["message"] == "Application startup complete."
        for line in lines
        if line["logger"] == "uvicorn.error"
    )
    assert not any(line["logger"] == "uvicorn.access" for line in lines)
    requests = [line for line in lines if line.get("logger") == "kmsgate.requests"]
    (line,) = [r for r in requests if r["request_id"] == request_id]
    assert line["route"] == "/v1/keys/{name}/sign" and line["operation"] == "sign"
    assert line["action"] == "sign"
    (created,) = [r for r in requests if r["operation"] == "create_key"]
    assert (created["action"], created["key"]) == ("key.create", "logged")  # from the body
    assert line["key"] == "logged" and line["status"] == 200 and line["method"] == "POST"
    assert line["principal"] == f"token:{gw.root_token.split('.')[1]}"
    assert line["duration_ms"] > 0 and line["level"] == "info" and line["time"].endswith("Z")
    assert any(r["status"] == 401 and r["principal"] is None for r in requests)
    logged = "\n".join(line for line in text.splitlines() if line.startswith("{"))
    assert gw.root_token.split(".")[2] not in logged  # (dev mode prints it once, at start)
    assert SECRET_INPUT not in text
    assert f"store sqlite:///{gw.data_dir / 'kmsgate.db'})" in text  # the banner names it
    records = AuditFile(gw.data_dir / "audit.log").search(action="sign", key="logged").records
    assert any(r["request_id"] == request_id for r in records)


def test_a_line_logged_while_a_request_is_served_names_it() -> None:
    """A message logged while a request is served (an OIDC refusal, a backend warning)
    carries the request's id, as its reply header and audit record do; a line logged
    outside any request has none, and each request (its own context) keeps its own id."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kmsgate.test_logs")
    logger.addHandler(handler)
    ids = RequestIds()

    def serve(scope: dict[str, object]) -> str:
        request_id = ids.assign(scope)
        logger.warning("something went wrong")
        return request_id

    try:
        first = contextvars.copy_context().run(serve, {})
        second = contextvars.copy_context().run(serve, {})
        logger.warning("at start-up")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("request_id") for line in lines] == [first, second, None]
    assert first != second and lines[0]["message"] == "something went wrong"


def test_an_unknown_log_level_is_one_error_line(tmp_path: Path) -> None:
    refused = run_cli(
        ("serve", "--dev", "--data-dir", str(tmp_path), "--log-level", "chatty"), clean_env()
    )
    assert_one_line_error(refused, "log level 'chatty'", rc=2)


def test_a_scrape_sums_the_requests_of_every_worker(tmp_path: Path) -> None:
    with running_gateway(tmp_path, "--workers", "2") as gw:
        root = {"authorization": f"Bearer {gw.root_token}", "connection": "close"}
        body = {"name": "counted", "type": "ed25519", "purpose": "p"}
        assert httpx.post(f"{gw.addr}/v1/keys", json=body, headers=root).status_code == 201
        for _ in range(40):  # new connections: both workers answer some
            signed = httpx.post(
                f"{gw.addr}/v1/keys/counted/sign", json={"input": SECRET_INPUT}, headers=root
            )
            assert signed.status_code == 200
        sample = (
            'kmsgate_http_requests_total{method="POST",route="/v1/keys/{name}/sign",status="200"}'
        )

        def scrape() -> tuple[str, list[str]]:
            text = httpx.get(f"{gw.addr}/metrics", headers=root).text
            lines = text.splitlines()
            return text, [line.rsplit(" ", 1)[1] for line in lines if line.startswith(sample)]

        # each worker leaves a snapshot of its counts every second (later on a busy machine);
        # then whichever worker answers the scrape counts them all
        deadline = time.monotonic() + 10
        scrapes = [scrape() for _ in range(6)]
        while any(values != ["40.0"] for _, values in scrapes) and time.monotonic() < deadline:
            time.sleep(0.2)
            scrapes = [scrape() for _ in range(6)]
        for text, values in scrapes:
            assert values == ["40.0"], values
            families = {f.name: f for f in text_string_to_metric_families(text)}  # it parses
            (count,) = [
                s.value
                for s in families["kmsgate_operation_duration_seconds"].samples
                if s.name.endswith("_count") and s.labels == {"operation": "sign"}
            ]
            assert count == 40


def test_a_librarys_error_is_a_json_line_without_its_text_or_traceback() -> None:
    """SQLAlchemy's pool logs a lost connection with its traceback; Python printed it as
    plain text (28 lines per outage). It is one JSON line naming the error type only."""
    program = (
        "import logging\n"
        "from kmsgate.logs import configure\n"
        "configure('warning')\n"
        "try:\n"
        "    raise ConnectionError('server at 10.0.0.5 said: password authentication failed')\n"
        "except ConnectionError:\n"
        "    logging.getLogger('sqlalchemy.pool.impl.QueuePool').error(\n"
        "        'Exception during reset or similar', exc_info=True)\n"
        "logging.getLogger('some.library').info('not shown at warning')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30, check=True
    )
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["logger"] == "sqlalchemy.pool.impl.QueuePool"
    assert record["message"] == "Exception during reset or similar"
    assert record["error"] == "ConnectionError" and record["level"] == "error"
    assert "password" not in line and "10.0.0.5" not in line
