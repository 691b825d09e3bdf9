"""The policy input document: what every decision sees (documented in docs/policy.md)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence, Set
from datetime import UTC, datetime

from kmsgate.errors import InvalidRequest

_MAX_DEPTH = 32

#: Every action the gateway asks the policy about (documented in docs/policy.md).
ACTIONS: frozenset[str] = frozenset(
    {
        "sign",
        "verify",
        "mac",
        "mac.verify",
        "encrypt",
        "decrypt",
        "datakey",
        "rewrap",
        "key.create",
        "key.read",
        "key.list",
        "key.rotate",
        "key.disable",
        "key.enable",
        "key.update",
        "key.compromise",
        "key.delete",
        "key.cancel_deletion",
        "key.import",
        "token.create",
        "token.list",
        "token.revoke",
        "audit.read",
        "metrics.read",
        "policy.read",
        "policy.evaluate",
        "policy.reload",
        "ca.create",
        "ca.import",
        "ca.read",
        "cert.issue",
        "cert.read",
        "cert.renew",
        "cert.revoke",
        "exception.request",
        "exception.approve",
        "exception.revoke",
        "exception.read",
        "principal.read",
    }
)


# ---------------------------------------------------------------------------------------------
# Input document


def _rfc3339(value: datetime, where: str) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequest(f"{where}: datetime must be timezone-aware")
    return _second_text(int(value.timestamp()))


@functools.lru_cache(maxsize=8)
def _second_text(epoch_second: int) -> str:
    """RFC 3339 UTC for a whole second (cached: the hot path asks for `now` each request)."""
    return datetime.fromtimestamp(epoch_second, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _json_value(value: object, where: str, depth: int = 0) -> object:
    """Return `value` as plain JSON data; raise InvalidRequest if it has no JSON form."""
    if depth > _MAX_DEPTH:
        raise InvalidRequest(f"{where}: nested too deeply")
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:  # what the engine's JSON holds (and orjson writes)
            raise InvalidRequest(f"{where}: integer beyond 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(f"{where}: number is not finite")
        return value
    if isinstance(value, datetime):
        return _rfc3339(value, where)
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequest(f"{where}: object keys must be strings")
            out[key] = _json_value(item, f"{where}.{key}", depth + 1)
        return out
    if isinstance(value, Set):
        items = [_json_value(item, where, depth + 1) for item in value]
        if all(isinstance(item, str) for item in items):
            items.sort(key=str)
        return items
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray | memoryview):
        return [_json_value(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise InvalidRequest(f"{where}: unsupported value of type {type(value).__name__}")


def _with_defaults(
    value: Mapping[str, object], defaults: Mapping[str, object], where: str
) -> dict[str, object]:
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{where} must be an object")
    doc = _json_value(value, where)
    assert isinstance(doc, dict)  # a Mapping always converts to a dict
    out: dict[str, object] = {}
    for key, default in defaults.items():
        item = doc.pop(key, None)
        out[key] = _json_value(default, where) if item is None else item
    out.update(doc)  # extra fields pass through after the documented ones
    return out


_PRINCIPAL_DEFAULTS: dict[str, object] = {
    "id": None,
    "kind": None,
    "roles": [],
    "claims": {},
    "tenant": None,
}
_RESOURCE_DEFAULTS: dict[str, object] = {
    "kind": None,
    "name": None,
    "purpose": None,
    "type": None,
    "backend": None,
    "labels": {},
}


def _check_strings(value: object, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{where} must be a list of strings")


def _check_object(value: object, where: str) -> None:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be an object")


def _grant_document(grant: object, where: str) -> object:
    """An entry of `input.exceptions` as a grant's `policy_document` has it: `actions` a
    list of strings, `resource` a string, `id` (if given) a string. Raises InvalidRequest."""
    if not isinstance(grant, Mapping):
        raise InvalidRequest(f"{where} must be an object")
    doc = _json_value(grant, where)
    assert isinstance(doc, dict)  # a Mapping always converts to a dict
    _check_strings(doc.get("actions"), f"{where}.actions")
    if not isinstance(doc.get("resource"), str):
        raise InvalidRequest(
            f"{where}.resource must be a string (a key name or glob, or purpose:P)"
        )
    if not isinstance(doc.get("id", ""), str):
        raise InvalidRequest(f"{where}.id must be a string")
    return doc


def policy_input(
    *,
    principal: Mapping[str, object],
    action: str,
    resource: Mapping[str, object],
    request: Mapping[str, object] | None,
    env: str,
    now: datetime,
    exceptions: Sequence[Mapping[str, object]] = (),
    trusted: bool = False,
) -> dict[str, object]:
    """Build the stable policy input document (see docs/policy.md).

    Missing principal/resource fields get defaults (`roles` [], `claims` {}, `labels` {},
    None elsewhere); extra fields pass through. Datetimes anywhere become RFC 3339 UTC
    strings ending in "Z"; tuples and sets become lists. `now` is truncated to the second,
    so identical requests within a second share one cached decision.

    `trusted=True` is the gateway's hot path: the parts are complete plain-JSON documents
    built from typed objects, so they are used as they are, without conversion or checks.

    Raises InvalidRequest if a value has no JSON form (bytes, non-string keys, NaN, naive
    datetimes), if `action` is empty, or if `roles`, `claims`, `labels` or an exception
    entry has the wrong shape.
    """
    if trusted:
        return {
            "principal": principal,
            "action": action,
            "resource": resource,
            "request": request or {},
            "env": env,
            "now": _rfc3339(now, "now"),
            "exceptions": list(exceptions),
        }
    if not isinstance(action, str) or not action:
        raise InvalidRequest("action must be a non-empty string")
    if not isinstance(env, str):
        raise InvalidRequest("env must be a string")
    if not isinstance(now, datetime):
        raise InvalidRequest("now must be a datetime")
    principal_doc = _with_defaults(principal, _PRINCIPAL_DEFAULTS, "principal")
    _check_strings(principal_doc["roles"], "principal.roles")
    _check_object(principal_doc["claims"], "principal.claims")
    resource_doc = _with_defaults(resource, _RESOURCE_DEFAULTS, "resource")
    _check_object(resource_doc["labels"], "resource.labels")
    if request is None:
        request_doc: object = {}
    else:
        if not isinstance(request, Mapping):
            raise InvalidRequest("request must be an object")
        request_doc = _json_value(request, "request")
    if isinstance(exceptions, str | bytes) or not isinstance(exceptions, Sequence):
        raise InvalidRequest("exceptions must be a list of objects")
    exception_docs = [
        _grant_document(grant, f"exceptions[{i}]") for i, grant in enumerate(exceptions)
    ]
    return {
        "principal": principal_doc,
        "action": action,
        "resource": resource_doc,
        "request": request_doc,
        "env": env,
        "now": _rfc3339(now, "now"),
        "exceptions": exception_docs,
    }
