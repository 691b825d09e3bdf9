"""Request bodies (pydantic): the REST edge's validation of JSON and base64.

Binary values are standard base64 with padding; anything else fails validation (422).
Every operation body is either one item or `{"batch": [item, ...]}`, never both
(`kmsgate.request_parsing` reads a body). Each body turns into the service's typed input
(`to_input()`); the service never sees these models.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Self

from cryptography import x509
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)

from kmsgate.durations import parse_duration_setting
from kmsgate.encoding import B64_PATTERN, b64decode_strict, b64encode
from kmsgate.envelope import MAX_CONTEXT_ENTRIES, MAX_CONTEXT_STRING, check_context
from kmsgate.errors import InvalidRequest
from kmsgate.pki.crl import LEAF_REVOCATION_REASONS
from kmsgate.service.requests import (
    DataKeyInput,
    DecryptInput,
    EncryptInput,
    IssueInput,
    KeyChanges,
    MacInput,
    MacVerifyInput,
    NewCa,
    NewException,
    NewKey,
    NewToken,
    PolicyQuery,
    RewrapInput,
    SignInput,
    VerifyInput,
)
from kmsgate.text import CA_NAME, HIDDEN, KEY_NAME, has_hidden, several_pem_blocks

KEY_NAME_PATTERN = f"^{KEY_NAME.pattern}$"
ROLE_PATTERN = r"^[a-z0-9._:-]{1,64}$"
"""What a token's role may be (checked by `TokenRegistry.create`: 400); for the document."""
LABEL_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
MAX_LABEL_VALUE = 256


def _visible(value: str) -> str:
    if has_hidden(value):
        raise ValueError("control characters and bidirectional overrides are not allowed")
    return value


Text = Annotated[
    str, AfterValidator(_visible), Field(json_schema_extra={"pattern": f"^[^{HIDDEN}]*$"})
]
"""Free text a person reads (a ticket, a reason, a label value, a description): any
character but `kmsgate.text.HIDDEN` ones (422)."""
Labels = Annotated[
    dict[
        Annotated[str, Field(pattern=LABEL_PATTERN)],
        Annotated[Text, Field(max_length=MAX_LABEL_VALUE)],
    ],
    Field(max_length=32, json_schema_extra={"additionalProperties": False}),
]
"""Label names and values (names as purposes are; values up to 256 characters of `Text`)."""
LabelFilter = Annotated[
    str,
    Field(pattern=f"^{LABEL_PATTERN[1:-1]}:[^{HIDDEN}]{{0,{MAX_LABEL_VALUE}}}$"),
]
"""A key list's `label=name:value` filter: a label name, then a value a label may have."""
MAX_VERSION = 2**31 - 1
"""The largest key version a request may name (bounded before any policy or store call)."""


def _decode(value: object) -> bytes:
    if isinstance(value, bytes):  # built in Python, not parsed from JSON
        return value
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    return b64decode_strict(value)


B64_SCHEMA: dict[str, Any] = {
    "type": "string",
    "format": "byte",
    "pattern": B64_PATTERN,
    "description": "standard base64 with padding",
}
"""The JSON Schema of binary data in a body, a request's or a reply's."""
B64 = Annotated[
    bytes,
    BeforeValidator(_decode),
    PlainSerializer(b64encode, return_type=str),
    WithJsonSchema(B64_SCHEMA),
]
"""A base64 string in JSON, `bytes` once validated."""


def _date_time(value: object) -> datetime:
    """`value`, an RFC 3339 date-time with a zone, as UTC. Raises ValueError, also for an
    instant whose UTC form falls outside years 1-9999 (`0001-01-01T00:00:00+01:00`)."""
    if isinstance(value, datetime):  # built in Python, not parsed from a request
        return value
    if isinstance(value, str) and "T" in value.upper():
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is not None:
                try:
                    return moment.astimezone(UTC)
                except OverflowError:
                    raise ValueError("date-time out of range (years 1-9999 in UTC)") from None
    raise ValueError("expected an RFC 3339 date-time with a zone (2026-12-05T08:00:00Z)")


Timestamp = Annotated[
    datetime, PlainValidator(_date_time), WithJsonSchema({"type": "string", "format": "date-time"})
]
"""An RFC 3339 date-time with a zone, in a JSON body or a query (never a number)."""


def parse_duration(value: str | int) -> timedelta:
    """`90d`, `12h`, `30m`, `45s` or plain seconds. Raises InvalidRequest."""
    try:
        return parse_duration_setting(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _optional_duration(value: str | int | None) -> timedelta | None:
    return parse_duration(value) if value is not None else None


class _Body(BaseModel):
    """A request body: unknown members refused, no coercion (`true` or `"1"` is not an
    integer, `1` is not a string)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _present(name: str) -> dict[str, Any]:
    """JSON Schema: member `name` is given, and not null."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


def _absent(name: str) -> dict[str, Any]:
    """JSON Schema: member `name` is left out, or null."""
    return {"properties": {name: {"type": "null"}}}


class _MessageItem(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [  # exactly one of input and digest
                {"allOf": [_present("input"), _absent("digest")]},
                {"allOf": [_present("digest"), _absent("input")]},
            ]
        }
    )

    input: B64 | None = None
    digest: B64 | None = None
    algorithm: str | None = Field(default=None, max_length=64)
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)

    @model_validator(mode="after")
    def _input_or_digest(self) -> Self:
        if (self.input is None) == (self.digest is None):
            raise ValueError("send exactly one of 'input' or 'digest'")
        return self


class SignItem(_MessageItem):
    """Sign `input` (or a prehashed `digest`) with `version` (default: primary)."""

    def to_input(self) -> SignInput:
        return SignInput(self.input, self.digest, self.algorithm, self.version)


class VerifyItem(_MessageItem):
    """Verify `signature`; `strict` rejects compromised versions, `signed_at` those
    compromised before that time."""

    signature: B64
    strict: bool = False
    signed_at: Timestamp | None = None

    def to_input(self) -> VerifyInput:
        return VerifyInput(
            self.signature,
            self.input,
            self.digest,
            self.algorithm,
            self.version,
            self.strict,
            self.signed_at,
        )


class MacItem(_Body):
    input: B64
    algorithm: str | None = Field(default=None, max_length=64)
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)

    def to_input(self) -> MacInput:
        return MacInput(self.input, self.algorithm, self.version)


class MacVerifyItem(_Body):
    input: B64
    mac: B64
    algorithm: str | None = Field(default=None, max_length=64)
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)

    def to_input(self) -> MacVerifyInput:
        return MacVerifyInput(self.input, self.mac, self.algorithm, self.version)


def _context(value: object) -> object:
    if value is None or not isinstance(value, dict):
        return value  # None, or a type error for pydantic to report
    return check_context(value)


Context = Annotated[
    dict[str, str] | None,
    AfterValidator(_context),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "object",
                    "maxProperties": MAX_CONTEXT_ENTRIES,
                    "propertyNames": {"minLength": 1, "maxLength": MAX_CONTEXT_STRING},
                    "additionalProperties": {"type": "string", "maxLength": MAX_CONTEXT_STRING},
                },
                {"type": "null"},
            ],
        }
    ),
    Field(
        default=None,
        description=f"encryption context: a string map (<= {MAX_CONTEXT_ENTRIES} entries, keys "
        f"1-{MAX_CONTEXT_STRING} and values <= {MAX_CONTEXT_STRING} characters) bound as AAD; "
        "the same map must be sent to decrypt",
    ),
]


class EncryptItem(_Body):
    """Encrypt `plaintext` under the key's primary version, bound to `context`."""

    plaintext: B64
    context: Context

    def to_input(self) -> EncryptInput:
        return EncryptInput(self.plaintext, self.context)


class DecryptItem(_Body):
    """Decrypt a kmsgate `ciphertext` (from `encrypt` or `datakey`) with its `context`."""

    ciphertext: B64
    context: Context

    def to_input(self) -> DecryptInput:
        return DecryptInput(self.ciphertext, self.context)


class DataKeyItem(_Body):
    """A fresh data key: its wrapped form, and its plaintext unless `include_plaintext` is false."""

    bits: Literal[128, 256] = 256
    context: Context
    include_plaintext: bool = True

    def to_input(self) -> DataKeyInput:
        return DataKeyInput(self.bits, self.context, self.include_plaintext)


class RewrapItem(_Body):
    """Re-wrap a ciphertext's data key under this key's primary version (the body and the
    plaintext stay as they are; the ciphertext may come from another key)."""

    ciphertext: B64
    context: Context

    def to_input(self) -> RewrapInput:
        return RewrapInput(self.ciphertext, self.context)


class CreateKeyRequest(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {"anyOf": [_present("type"), _present("public_key")]},
                {"anyOf": [_absent("public_key"), _absent("uri")]},
            ]
        }
    )

    name: str = Field(pattern=KEY_NAME_PATTERN)
    type: str | None = Field(default=None, max_length=32)
    purpose: str = Field(pattern=LABEL_PATTERN)
    backend: str | None = Field(default=None, max_length=64)
    labels: Labels = Field(default_factory=dict)
    rotation_period: str | int | None = None
    public_key: str | None = Field(default=None, max_length=16 * 1024)
    uri: str | None = Field(
        default=None, max_length=1024, description="adopt this existing backend key"
    )
    public: bool | None = Field(
        default=None,
        description="serve its public keys without a token (default: only for `model-sign`)",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.public_key is None and self.type is None:
            raise ValueError("'type' is required unless importing a 'public_key'")
        if self.public_key is not None and self.uri is not None:
            raise ValueError("send 'public_key' (verify-only) or 'uri' (adopt), not both")
        return self

    def to_input(self) -> NewKey:
        """Raises InvalidRequest for a malformed `rotation_period`."""
        return NewKey(
            name=self.name,
            purpose=self.purpose,
            type=self.type,
            backend=self.backend,
            labels=self.labels,
            rotation_period=_optional_duration(self.rotation_period),
            public_key=self.public_key,
            uri=self.uri,
            public=self.public,
        )


class PatchKeyRequest(_Body):
    min_decrypt_version: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    rotation_period: str | int | None = None
    labels: Labels | None = None
    public: bool | None = None

    def to_input(self) -> KeyChanges:
        """`rotation_period: null` stops the key's scheduled rotation. Raises InvalidRequest
        for a malformed `rotation_period`."""
        return KeyChanges(
            self.min_decrypt_version,
            _optional_duration(self.rotation_period),
            self.labels,
            self.public,
            stop_rotation="rotation_period" in self.model_fields_set
            and self.rotation_period is None,
        )


class CompromisedRequest(_Body):
    since: Timestamp

    @model_validator(mode="after")
    def _aware(self) -> Self:
        if self.since.tzinfo is None:
            raise ValueError("'since' needs a time zone (RFC 3339)")
        return self


class ScheduleDeletionRequest(_Body):
    pending_days: int = Field(default=30, ge=7, le=30)


class TokenCreateRequest(_Body):
    roles: list[
        Annotated[str, Field(max_length=64, json_schema_extra={"pattern": ROLE_PATTERN})]
    ] = Field(min_length=1, max_length=32)
    ttl: str | int | None = None
    description: Text = Field(default="", max_length=256)
    orphan: bool = Field(
        default=False,
        description="whether the token outlives the revocation of the token that makes it",
    )

    def to_input(self) -> NewToken:
        """Raises InvalidRequest for a malformed `ttl`."""
        ttl = _optional_duration(self.ttl)
        return NewToken(tuple(self.roles), ttl, self.description, self.orphan)


class ExceptionCreateRequest(_Body):
    actions: list[Annotated[str, Field(max_length=64)]] = Field(min_length=1, max_length=16)
    resource: str = Field(max_length=160, description="a key name or glob, or `purpose:<purpose>`")
    duration: str | int = Field(description="from 1s to `exceptions.max_duration`: 90s, 15m, 8h")
    ticket: Text = Field(min_length=1, max_length=128)
    reason: Text = Field(min_length=1, max_length=1024)

    def to_input(self) -> NewException:
        """Raises InvalidRequest for a malformed `duration`."""
        return NewException(
            tuple(self.actions),
            self.resource,
            parse_duration(self.duration),
            self.ticket,
            self.reason,
        )


class PolicyEvaluateRequest(_Body):
    principal: dict[str, Any]
    action: str = Field(max_length=64, json_schema_extra={"minLength": 1})
    resource: dict[str, Any] = Field(default_factory=dict)
    request: dict[str, Any] = Field(default_factory=dict)
    exceptions: list[dict[str, Any]] = Field(
        default_factory=list, max_length=64, description="hypothetical active grants"
    )
    env: str | None = Field(default=None, max_length=64, description="default: the gateway's")

    def to_input(self) -> PolicyQuery:
        return PolicyQuery(
            self.principal, self.action, self.resource, self.request, self.exceptions, self.env
        )


# -- PKI --------------------------------------------------------------------------------------

CA_NAME_PATTERN = f"^{CA_NAME.pattern}$"


def _pem_certificates(text: str, what: str) -> list[x509.Certificate]:
    """The certificates in a PEM bundle. Raises InvalidRequest."""
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise InvalidRequest(f"{what} is not PEM certificates") from None
    return certs


class CaKeySpec(_Body):
    backend: str | None = Field(default=None, max_length=64)
    type: str = Field(default="ecdsa-p256", max_length=32)


class CreateCaRequest(_Body):
    name: str = Field(pattern=CA_NAME_PATTERN)
    subject: Text = Field(default="", max_length=1024)
    key: CaKeySpec = Field(default_factory=CaKeySpec)
    type: Literal["kmsgate", "hashivault-pki"] = "kmsgate"
    mount: str | None = Field(default=None, max_length=64, description="hashivault-pki only")
    role: str | None = Field(default=None, max_length=64, description="hashivault-pki only")

    def to_input(self) -> NewCa:
        return NewCa(
            self.name,
            self.subject,
            self.key.type,
            self.key.backend,
            self.type,
            self.mount,
            self.role,
        )


class CaCertificateRequest(_Body):
    certificate: str = Field(max_length=64 * 1024)
    chain: str = Field(max_length=256 * 1024)

    def certificates(self) -> tuple[x509.Certificate, list[x509.Certificate]]:
        """(the CA's certificate, its chain). Raises InvalidRequest for bad PEM or more than
        one certificate in `certificate`."""
        certs = _pem_certificates(self.certificate, "certificate")
        if len(certs) != 1:
            raise InvalidRequest("send exactly one certificate in 'certificate'")
        return certs[0], _pem_certificates(self.chain, "chain")


class IssueRequest(_Body):
    csr: str = Field(max_length=64 * 1024)
    profile: str = Field(max_length=64)
    ttl: str | int | None = None

    def to_input(self) -> IssueInput:
        """Raises InvalidRequest for a CSR that is not PEM or a malformed ttl."""
        return IssueInput(_csr(self.csr), self.profile, _optional_duration(self.ttl))


class RenewRequest(_Body):
    csr: str = Field(max_length=64 * 1024, description="PEM; the same names, a new key or not")
    ttl: str | int | None = None

    def to_input(self) -> tuple[x509.CertificateSigningRequest, timedelta | None]:
        """Raises InvalidRequest for a CSR that is not PEM or a malformed ttl."""
        return _csr(self.csr), _optional_duration(self.ttl)


def _csr(pem: str) -> x509.CertificateSigningRequest:
    """Raises InvalidRequest if `pem` is not one PKCS#10 v1 request (a second PEM block
    would otherwise be ignored)."""
    if several_pem_blocks(pem):
        raise InvalidRequest("csr holds more than one PEM block: send one request")
    try:
        return x509.load_pem_x509_csr(pem.encode())
    except (ValueError, x509.InvalidVersion):  # InvalidVersion: not v1 (found by fuzzing)
        raise InvalidRequest("csr is not a PEM certificate signing request") from None


class RevokeRequest(_Body):
    reason: str = Field(
        default="unspecified",
        max_length=32,
        json_schema_extra={"enum": list(LEAF_REVOCATION_REASONS)},
    )
