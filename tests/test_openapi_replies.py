"""Replies the server gives in shapes that schemathesis rarely or never meets match the
OpenAPI document's schemas of their operations. tests/test_openapi_conformance.py checks
the rest against a live gateway."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest

JSON = "application/json"


class Replies:
    """Checks replies against the served document's schema of their operation."""

    def __init__(self, api: Any, token: str) -> None:
        self.api = api
        self.token = token
        self.spec = api.client.get("/openapi.json").json()

    def call(self, method: str, template: str, status: int = 200, **kwargs: Any) -> Any:
        """`method` on `template` (`{name}` and the like filled in from `kwargs`), asserting
        the status and that the JSON body matches the document's schema; the body."""
        names = {key: kwargs.pop(key) for key in list(kwargs) if "{" + key + "}" in template}
        token = kwargs.pop("token", self.token)
        r = self.api.call(method, template.format(**names), token, **kwargs)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == JSON
        reply = self.spec["paths"][template][method.lower()]["responses"][str(status)]
        schema = {**reply["content"][JSON]["schema"], "components": self.spec["components"]}
        body = r.json()
        validator = jsonschema_rs.Draft202012Validator(schema, validate_formats=True)
        errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(body)]
        assert not errors, f"{method} {template} {status}: {body}\n" + "\n".join(errors)
        return body


@pytest.fixture
def replies(api, admin):
    return Replies(api, admin)


def test_system_replies(api, admin, replies, monkeypatch):
    replies.call("GET", "/v1/sys/health", token=None)
    replies.call("GET", "/v1/sys/ready", token=None)
    replies.call("GET", "/v1/sys/whoami")
    replies.call("GET", "/v1/sys/policy")
    query = {"principal": {"id": "x", "roles": ["admin"]}, "action": "sign"}
    assert replies.call("POST", "/v1/sys/policy/evaluate", json=query)["allow"] is True
    monkeypatch.setattr(api.service.store, "ping", lambda: "the database is unreachable")
    down = replies.call("GET", "/v1/sys/ready", 503, token=None)
    assert (down["code"], down["store"]["ok"]) == ("not_ready", False)
