"""The schemas of the JSON replies that routes build themselves (use-case results written by
orjson, `kmsgate.api.responses`), for the OpenAPI document only: nothing checks a reply
against them at run time, so the hot routes pay nothing for them. schemathesis checks the
server against them (tests/test_openapi_conformance.py), and so does
tests/test_openapi_replies.py for the shapes it rarely meets.

An object lists the members the server always writes as required, those it writes only
sometimes as optional, and is closed (`additionalProperties: false`); a map whose names the
server does not fix (labels, backends, claims) is open."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, get_args

from kmsgate.algorithms import SIGN_ALGORITHMS, KeyType
from kmsgate.catalogue import KeyState
from kmsgate.config import EkuName
from kmsgate.grants import GrantState
from kmsgate.pki.authorities import CaState, CaType
from kmsgate.pki.crl import REASONS
from kmsgate.schemas import B64_SCHEMA

Schema = dict[str, Any]

COMPONENTS: dict[str, Schema] = {}
"""The reply schemas by name, for the document's `components/schemas`."""


def _component(name: str, schema: Schema) -> Schema:
    """Registers `schema` as component `name`; a reference to it."""
    COMPONENTS[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def _closed(
    required: Mapping[str, Schema],
    optional: Mapping[str, Schema] | None = None,
    description: str | None = None,
) -> Schema:
    """An object of exactly these members: `required` in every reply, `optional` in some."""
    schema: Schema = {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def _extended(closed: Schema, required: Mapping[str, Schema], description: str) -> Schema:
    """The object `closed` (from `_closed`) with the members `required` as well, in every
    reply."""
    return {
        **closed,
        "required": [*closed["required"], *required],
        "properties": {**closed["properties"], **required},
        "description": description,
    }


def _nullable(schema: Schema) -> Schema:
    """`schema`, or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def json_reply(
    schema: Schema,
    description: str | None = None,
    headers: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A `responses` entry: a JSON reply of `schema`, with `headers` (header objects by
    name) besides `x-request-id`, which every reply has (`kmsgate.api.openapi`)."""
    reply: dict[str, Any] = {"content": {"application/json": {"schema": schema}}}
    if description:
        reply["description"] = description
    if headers:
        reply["headers"] = {name: dict(header) for name, header in headers.items()}
    return reply


def _enum(values: type[StrEnum]) -> Schema:
    """A string, one of `values`."""
    return {"type": "string", "enum": [value.value for value in values]}


def _array(items: Schema, min_items: int = 0, max_items: int | None = None) -> Schema:
    """An array of `items`."""
    schema: Schema = {"type": "array", "items": items}
    if min_items:
        schema["minItems"] = min_items
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


_STRING: Schema = {"type": "string"}
_STRINGS = _array(_STRING)
_BOOLEAN: Schema = {"type": "boolean"}
_TIME: Schema = {"type": "string", "format": "date-time"}
_VERSION: Schema = {"type": "integer", "minimum": 1}
_B64URL: Schema = {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}
_SHA256_HEX: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_SEQ: Schema = {"type": "integer", "minimum": 1}
POLICY_DIGEST: Schema = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}
"""A policy bundle's digest (`PolicyEngine.digest`)."""
_PEM_CERTIFICATES: Schema = {
    "type": "string",
    "pattern": "^-----BEGIN CERTIFICATE-----",
    "description": "PEM certificates",
}

# -- key operations: one item's result, or a batch's ----------------------------------------

_ITEM_ERROR = _component(
    "ItemError",
    _closed(
        {"error": _closed({"code": _STRING, "detail": _STRING})},
        description="a batch item that failed: the `code` and `detail` of the problem it "
        "would be on its own (docs/api.md, Errors)",
    ),
)
SIGNATURE = _component(
    "Signature",
    _closed(
        {
            "signature": B64_SCHEMA,
            "key_version": _VERSION,
            "algorithm": {"type": "string", "enum": list(SIGN_ALGORITHMS)},
        }
    ),
)
VERIFIED = _component(
    "Verified",
    {
        "description": "a signature or MAC that verifies, under `key_version`, or that does "
        "not (a 200 reply, not an error)",
        "oneOf": [
            _closed({"valid": {"const": True}, "key_version": _VERSION}),
            _closed({"valid": {"const": False}, "key_version": {"type": "null"}}),
        ],
    },
)
MAC = _component("Mac", _closed({"mac": B64_SCHEMA, "key_version": _VERSION}))
CIPHERTEXT = _component("Ciphertext", _closed({"ciphertext": B64_SCHEMA, "key_version": _VERSION}))
PLAINTEXT = _component("Plaintext", _closed({"plaintext": B64_SCHEMA, "key_version": _VERSION}))
DATA_KEY = _component(
    "DataKey",
    _closed(
        {"ciphertext": B64_SCHEMA, "key_version": _VERSION},
        {"plaintext": B64_SCHEMA},
        "a data key, wrapped, and in plaintext unless `include_plaintext` was false",
    ),
)


def operation_reply(item: Schema) -> Schema:
    """The reply of a key operation whose one item's result is `item`: that result, or
    `{batch: [...]}` with each item's result or error, in the items' order."""
    batch = _array({"oneOf": [item, _ITEM_ERROR]}, min_items=1)
    return {"oneOf": [item, _closed({"batch": batch})]}


# -- keys ------------------------------------------------------------------------------------


def _key(usage: bool) -> Schema:
    """The key object (docs/api.md); with `usage`, each version's `uses` and `last_used`
    (both null while the store cannot be reached), as `GET /v1/keys/{name}` gives it."""
    version: dict[str, Schema] = {
        "version": _VERSION,
        "state": {  # `Key.version_state`
            "type": "string",
            "enum": ["enabled", "compromised", "retired", "destroyed"],
        },
        "created_at": _TIME,
    }
    if usage:
        version |= {
            "uses": _nullable({"type": "integer", "minimum": 0}),
            "last_used": _nullable(_TIME),
        }
    return _closed(
        {
            "name": _STRING,
            "type": _enum(KeyType),
            "purpose": _STRING,
            "backend": _STRING,
            "state": _enum(KeyState),
            "labels": {"type": "object", "additionalProperties": _STRING},
            "primary_version": _VERSION,
            "min_decrypt_version": _VERSION,
            "verify_only": _BOOLEAN,
            "public": _BOOLEAN,
            "versions": _array(
                _closed(version, {"compromised_since": _TIME, "adopted": {"const": True}})
            ),
            "created_at": _TIME,
        },
        {
            "rotation_period": {"type": "string", "pattern": "^[0-9]+s$"},
            "next_rotation": _TIME,
            "deletion_date": _TIME,
        },
        "a key as `GET /v1/keys/{name}` gives it: each version with its `uses` and "
        "`last_used` (both null while the store cannot be reached)"
        if usage
        else "a key, as its list and its changes give it (`GET /v1/keys/{name}` adds each "
        "version's `uses` and `last_used`)",
    )


KEY = _component("Key", _key(usage=False))
KEY_WITH_USAGE = _component("KeyWithUsage", _key(usage=True))
KEYS = _closed({"keys": _array(KEY)})

_PUBLIC_KEY_FORMS = (  # kmsgate.jwk.public_jwk: the members fixed by the key type, its alg
    ({"kty": "EC", "crv": "P-256"}, "ES256", ("x", "y")),
    ({"kty": "EC", "crv": "P-384"}, "ES384", ("x", "y")),
    ({"kty": "OKP", "crv": "Ed25519"}, "EdDSA", ("x",)),
    ({"kty": "RSA"}, "PS256", ("n", "e")),
)


def _jwk(use: str, more: Mapping[str, Schema], *, alg: bool) -> Schema:
    """A public key as `kmsgate.jwk.public_jwk` writes it (without `alg` unless `alg`), with
    `use` and `more`."""
    forms = []
    for fixed, algorithm, numbers in _PUBLIC_KEY_FORMS:
        members: dict[str, Schema] = {name: {"const": value} for name, value in fixed.items()}
        if alg:
            members["alg"] = {"const": algorithm}
        members |= {number: _B64URL for number in numbers}
        forms.append(_closed({**members, "use": {"const": use}, **more}))
    return {"oneOf": forms}


JWKS = _component(
    "Jwks",
    _closed(
        {
            "keys": _array(
                _jwk(
                    "sig",
                    {"kid": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*:v[0-9]+$"}},
                    alg=True,
                )
            )
        },
        description="a JWK Set: the key's usable versions, `kid` `<name>:v<version>`",
    ),
)

# -- PKI ---------------------------------------------------------------------------------------

_SERIAL: Schema = {"type": "string", "pattern": "^[0-9a-f]+$"}
_DURATION: Schema = {"type": "string", "pattern": "^[0-9]+[dhms]$"}  # durations.format_duration

ISSUED = _component(
    "Issued",
    _closed(
        {
            "certificate": _PEM_CERTIFICATES,
            "chain": _PEM_CERTIFICATES,
            "serial": _SERIAL,
            "not_after": _TIME,
        },
        description="a certificate just issued, its chain (the issuing CA first, root last), "
        "its serial (lowercase hex) and its end",
    ),
)
SPIFFE_BUNDLE = _component(
    "SpiffeBundle",
    _closed(
        {
            "keys": _array(
                _jwk("x509-svid", {"x5c": _array(B64_SCHEMA, min_items=1, max_items=1)}, alg=False),
                min_items=1,
            ),
            "spiffe_sequence": {"type": "integer"},
            "spiffe_refresh_hint": {"type": "integer", "minimum": 1},
        },
        description="a SPIFFE trust bundle: one key per certificate, the CA's own first",
    ),
)

_CSR = {"type": "string", "pattern": "^-----BEGIN CERTIFICATE REQUEST-----"}
_CA = _closed(
    {
        "name": _STRING,
        "type": _enum(CaType),
        "state": _enum(CaState),
        "subject": _STRING,
        "key": _nullable(_STRING),
        "parent": _nullable(_STRING),
        "not_after": _nullable(_TIME),
    },
    {"csr": _nullable(_CSR)},
    description="a CA: `key` its kmsgate key (null for a Vault PKI CA), `parent` its "
    "issuer's subject and `not_after` its certificate's end (null while `pending`); a "
    "`pending` CA repeats its `csr` (PEM) until its certificate is imported",
)
CA = _component("Ca", _CA)
NEW_CA = _component(
    "NewCa",
    _extended(
        _CA,
        {"csr": _nullable(_CSR)},
        "a CA just created: `pending`, with the CSR (PEM) for the offline root to sign; a "
        "Vault PKI CA is `active` at once, without one",
    ),
)
CAS = _closed({"cas": _array(CA)})
PROFILES = _closed(
    {
        "profiles": _array(
            _component(
                "Profile",
                _closed(
                    {
                        "name": _STRING,
                        "ekus": _array({"type": "string", "enum": list(get_args(EkuName))}),
                        "san_rules": _closed(
                            {
                                "dns": _STRINGS,
                                "ip": _STRINGS,
                                "uri": _STRINGS,
                                "exactly_one_uri": _BOOLEAN,
                            }
                        ),
                        "max_ttl": _DURATION,
                        "default_ttl": _DURATION,
                        "key_types": _array(_enum(KeyType)),
                    },
                    description="a certificate profile: what it grants and to which names",
                ),
            )
        )
    }
)
_CERTIFICATE_RECORD = _closed(
    {
        "serial": _SERIAL,
        "ca": _STRING,
        "subject": _STRING,
        "sans": _array({"type": "string", "pattern": "^(dns|ip|uri|email):"}),
        "profile": _STRING,
        "key_type": _enum(KeyType),
        "not_before": _TIME,
        "not_after": _TIME,
        "status": {"type": "string", "enum": ["valid", "revoked", "expired"]},
        "revoked_at": _nullable(_TIME),
        "reason": _nullable({"type": "string", "enum": list(REASONS)}),
        "owner": _STRING,
        "fingerprint": _SHA256_HEX,
    },
    description="the inventory's record of a certificate issued: `owner` the principal "
    "that asked, `fingerprint` the SHA-256 of its DER",
)
CERTIFICATE_RECORD = _component("CertificateRecord", _CERTIFICATE_RECORD)
CERTIFICATE_RECORD_PEM = _component(
    "CertificateRecordWithPem",
    _extended(
        _CERTIFICATE_RECORD,
        {"certificate": _PEM_CERTIFICATES},
        "the inventory's record of a certificate issued, with the certificate",
    ),
)
CERTIFICATE_PAGE = _closed(
    {"certs": _array(CERTIFICATE_RECORD)},
    {"next": _SERIAL},
    "a page of the inventory, by serial; `next`, when the page is full, is the `after` of "
    "the next one",
)

# -- system ----------------------------------------------------------------------------------

HEALTH = _component("Health", _closed({"status": {"const": "ok"}}))


def _readiness(ready: bool) -> Schema:
    """`/v1/sys/ready`'s reply: when `ready` (200) every part is ok, but the store when the
    status is `degraded` (the caches serve key operations meanwhile); else (503) one at
    least is not, and `code` and `detail` say which, as a problem's would."""
    ok = {"const": True} if ready else _BOOLEAN
    part = _closed({"ok": ok, "detail": _STRING})
    members = {
        "status": {"enum": ["ok", "degraded"]} if ready else {"const": "unavailable"},
        "store": _closed({"ok": _BOOLEAN, "detail": _STRING}),
        "audit": part,
        "backends": {
            "type": "object",
            "additionalProperties": _closed({"type": _STRING, "ok": ok, "detail": _STRING}),
        },
    }
    if ready:
        return _closed(members)
    return _closed({**members, "code": {"const": "not_ready"}, "detail": _STRING})


READY = _component("Ready", _readiness(True))
NOT_READY = _component("NotReady", _readiness(False))
IDENTITY = _component(
    "Identity",
    _closed(
        {
            "id": _STRING,
            # the principals a request can authenticate as (not `system` nor `local`)
            "kind": {"type": "string", "enum": ["token", "oidc", "mtls"]},
            "tenant": _nullable(_STRING),
            "roles": _STRINGS,
            "claims": {"type": "object"},
        },
        description="the caller: `roles` as the policy maps them, `claims` the verified OIDC "
        "claims or the certificate's facts",
    ),
)
POLICY = _component(
    "PolicyInfo",
    _closed(
        {
            "digest": POLICY_DIGEST,
            "files": _STRINGS,
            "loaded_at": _TIME,
            "env": _STRING,
        }
    ),
)
VERDICT = _component(
    "PolicyVerdict",
    _closed(
        {"allow": _BOOLEAN, "reasons": _STRINGS, "roles": _STRINGS, "exceptions_used": _STRINGS}
    ),
)

POLICY_RELOADED = _component(
    "PolicyReloaded", _closed({"digest": POLICY_DIGEST}, description="the policy now in force")
)
_TOKEN = _closed(
    {
        "id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "roles": _array(_STRING, min_items=1),
        "description": _STRING,
        "created_at": _TIME,
        "expires_at": _nullable(_TIME),
        "revoked_at": _nullable(_TIME),
        "created_by": _nullable(_STRING),
        "parent": _nullable({"type": "string", "pattern": "^[0-9a-f]{16}$"}),
    },
    description="an API token, without its secret; `expires_at` null for one that does not "
    "expire; `created_by` the principal that made it (null: made before makers were "
    "recorded); `parent` the token whose revocation revokes it (null: none, an orphan)",
)
TOKEN = _component("Token", _TOKEN)
REVOKED_TOKEN = _component(
    "RevokedToken",
    _extended(
        _TOKEN,
        {
            "also_revoked": _array({"type": "string", "pattern": "^[0-9a-f]{16}$"}),
            "also_revoked_count": {"type": "integer", "minimum": 0},
        },
        "the token revoked; `also_revoked_count`: how many tokens its revocation revoked "
        "with it (those it made, theirs and so on, but orphans), `also_revoked` the ids of "
        "the first 100",
    ),
)
NEW_TOKEN = _component(
    "NewToken",
    _extended(
        _TOKEN,
        {"token": {"type": "string", "pattern": "^kmg\\.[0-9a-f]{16}\\.[A-Za-z0-9_-]+$"}},
        "an API token just created: `token`, the bearer credential, is in this reply only",
    ),
)
TOKENS = _closed({"tokens": _array(TOKEN)})
AUDIT_RECORD = _component(
    "AuditRecord",
    _closed(
        {
            "seq": _SEQ,
            "time": _TIME,
            "prev": _SHA256_HEX,
            "action": _STRING,
            "decision": {"type": "string", "enum": ["allow", "deny"]},
            "outcome": _STRING,
            "request_id": _STRING,
            "hash": _SHA256_HEX,
        },
        {  # `kmsgate.audit.events.record_fields`: only when set
            "replica": _STRING,
            "principal": _STRING,
            "principal_kind": _STRING,
            "resource": _closed({"kind": _STRING}, {"name": _nullable(_STRING)}),  # null: a listing
            "key_version": _VERSION,
            "reasons": _STRINGS,
            "exception_id": _STRING,
            "inputs": _closed(
                {
                    "count": {"type": "integer", "minimum": 1},
                    "length": {"type": "integer", "minimum": 0},
                },
                {"sha256": _SHA256_HEX},  # not for what is MACed (docs/audit.md)
            ),
            "policy_digest": POLICY_DIGEST,
            "detail": {"type": "object"},
        },
        "a record of the audit log (docs/audit.md): `detail` depends on the action",
    ),
)
AUDIT_RECORDS = _closed(
    {
        "events": _array(AUDIT_RECORD),
        "next": _nullable(
            {
                **_STRING,
                "description": "`before` for the page of older matches; null when none",
            }
        ),
    }
)
AUDIT_CHECKPOINTS = _closed(
    {
        "checkpoints": _array(
            _component(
                "AuditCheckpoint",
                _closed(
                    {
                        "replica": _STRING,
                        "chain": _STRING,
                        "record_seq": _SEQ,
                        "record_hash": _SHA256_HEX,
                        "seq": _SEQ,
                        "hash": _SHA256_HEX,
                        "signed_at": _TIME,
                        "final": _BOOLEAN,
                        "key_name": _STRING,
                        "key_version": _VERSION,
                    },
                    description="the store's copy of an audit chain's last signed checkpoint: "
                    "the checkpoint record (`record_seq`, `record_hash`) and what it signed "
                    "(docs/audit.md)",
                ),
            )
        )
    }
)

# -- JIT exceptions --------------------------------------------------------------------------

GRANT = _component(
    "Grant",
    _closed(
        {
            "id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
            "state": _enum(GrantState),
            "principal": _STRING,
            "actions": _array(_STRING, min_items=1),
            "resource": _STRING,
            "duration": {"type": "integer", "minimum": 1},
            "ticket": _STRING,
            "reason": _STRING,
            "requested_at": _TIME,
            "pending_until": _TIME,
            "approvals": _array(_closed({"by": _STRING, "at": _TIME})),
            "approved_at": _nullable(_TIME),
            "expires_at": _nullable(_TIME),
            "revoked_at": _nullable(_TIME),
            "revoked_by": _nullable(_STRING),
        },
        description="a JIT grant; `principal` asked for it, `duration` in seconds",
    ),
)
GRANTS = _closed({"exceptions": _array(GRANT)})
