"""Requests at the edge, the same for every route: bodies are JSON only (`application/json`,
else 415), parsed strictly (not JSON, a duplicate member: 400) before anything else reads
them; a query parameter that takes one value, given twice, is refused (422) rather than
read as its last value; an integer or a boolean in a query or a path is written one way
(`strict_scalar`), never coerced."""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Collection, Coroutine
from typing import Any, Union, get_args, get_origin

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from kmsgate.errors import InvalidRequest, UnsupportedMediaType, ValidationFailed
from kmsgate.request_parsing import location, parse_json_object

JSON = "application/json"
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}
_UTF8_CHARSETS = ("utf-8", "utf8", "us-ascii", "ascii")
"""Charsets a JSON body may name: UTF-8, and ASCII (a subset of it)."""


def header(scope: Scope, name: bytes) -> str:
    """The first value of header `name` (lower case), "" if absent (a direct scan of the
    raw headers: cheaper than building Starlette's Headers on the hot path)."""
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return ""


def single_header(scope: Scope, name: bytes) -> str:
    """The value of header `name` (lower case), "" if absent. Raises InvalidRequest if it is
    given more than once: two credentials, or two content types, are two readings of one
    request (a proxy may act on one, the gateway on the other)."""
    found: list[bytes] = [value for key, value in scope["headers"] if key == name]
    if len(found) > 1:
        raise repeated_header(name, len(found))
    return found[0].decode("latin-1") if found else ""


def repeated_header(name: bytes, count: int) -> InvalidRequest:
    """The refusal of a header that must come once, given `count` times."""
    return InvalidRequest(f"header {name.decode()} given {count} times; send it once")


def require_media_type(request: Request, expected: str) -> None:
    """Raises UnsupportedMediaType unless the request's Content-Type is `expected`, with no
    charset but UTF-8 (the body is read as UTF-8, whatever it says), InvalidRequest if it
    is given twice."""
    media_type, _, parameters = single_header(request.scope, b"content-type").partition(";")
    if media_type.strip().lower() != expected:
        raise UnsupportedMediaType(f"send the request body as {expected}")
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in _UTF8_CHARSETS:
            raise UnsupportedMediaType(f"send the request body as {expected} in UTF-8")


async def json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body. Raises UnsupportedMediaType (not `application/json`),
    InvalidRequest (not a JSON object, a member given twice)."""
    require_media_type(request, JSON)
    return parse_json_object(await request.body())


class _ParsedRequest(Request):
    """A request whose JSON body has been read and parsed already."""

    def __init__(self, request: Request, raw: bytes, parsed: dict[str, Any]) -> None:
        super().__init__(request.scope, request.receive)
        self._raw, self._parsed = raw, parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> dict[str, Any]:
        return self._parsed


def refuse_repeated(request: Request, names: Collection[str]) -> None:
    """Raises ValidationFailed if a query parameter of `names` (each takes one value) is
    given more than once: `?status=valid&status=revoked` asks for something the route
    cannot do, and reading only the last value would answer another question silently."""
    params = request.query_params
    for name in names:
        count = len(params.getlist(name))
        if count > 1:
            raise ValidationFailed(f"query.{name}: given {count} times; give it once")


def refuse_unknown(scope: Scope, known: Collection[str]) -> None:
    """Raises ValidationFailed if the query string names a parameter outside `known`: a
    misspelt filter (`?stat=revoked`) would otherwise answer another question silently."""
    if not scope.get("query_string"):
        return
    unknown = sorted(set(QueryParams(scope["query_string"])) - set(known))
    if unknown:
        takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
        where = location(("query", unknown[0]))
        raise ValidationFailed(f"{where}: not a parameter of this route ({takes})")


def strict_scalar(where: str, text: str, kind: type[int] | type[bool]) -> int | bool:
    """`text` from a query or a path as an integer (decimal digits, no sign, space, `_`,
    leading zero or fraction: `+1`, `1_0` and `1.0` are not 1 or 10) or a boolean (`true`,
    `false` in any case, `1`, `0`: not `yes` or `on`). Raises ValidationFailed naming
    `where`."""
    if kind is bool:
        if text.lower() not in _BOOLEANS:  # Python's clients write True
            raise ValidationFailed(f"{where}: a boolean: true, false, 1 or 0")
        return _BOOLEANS[text.lower()]
    if not _DECIMAL.fullmatch(text):
        too_long = text.isascii() and text.isdigit() and not text.startswith("0")
        raise ValidationFailed(
            f"{where}: an integer of at most 19 digits"
            if too_long
            else f"{where}: an integer in decimal digits alone"
        )
    return int(text)


def _scalar_kind(annotation: Any) -> type[int] | type[bool] | None:
    """int or bool when a parameter annotated `annotation` takes one (or None) of them."""
    if get_origin(annotation) is Union or get_origin(annotation) is types.UnionType:
        kinds = {_scalar_kind(arg) for arg in get_args(annotation) if arg is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return annotation if annotation in (int, bool) else None


def _scalars(dependant: Dependant) -> dict[tuple[str, str], type[int] | type[bool]]:
    """The integer and boolean parameters of `dependant` (and its dependencies), by
    (`query` or `path`, name)."""
    found: dict[tuple[str, str], type[int] | type[bool]] = {}
    for where, fields in (("query", dependant.query_params), ("path", dependant.path_params)):
        for field in fields:
            kind = _scalar_kind(field.field_info.annotation)
            if kind is not None:
                found[where, field.alias] = kind
    for sub in dependant.dependencies:
        found |= _scalars(sub)
    return found


def _refuse_loose_scalars(
    request: Request, scalars: dict[tuple[str, str], type[int] | type[bool]]
) -> None:
    """Raises ValidationFailed for an integer or boolean parameter that `strict_scalar`
    refuses (FastAPI would coerce it: `?version=+1`, `?delta=yes`)."""
    for (where, name), kind in scalars.items():
        params = request.query_params if where == "query" else request.path_params
        text = params.get(name)
        if isinstance(text, str):
            strict_scalar(f"{where}.{name}", text, kind)


def _takes_many(annotation: Any) -> bool:
    """Whether a query parameter annotated `annotation` takes several values (a list)."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return any(_takes_many(arg) for arg in get_args(annotation))
    return origin in (list, tuple, set, frozenset) or annotation in (list, tuple, set)


def _query_names(dependant: Dependant) -> frozenset[str]:
    """The names of every query parameter of `dependant` and its dependencies."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


def _single_valued(dependant: Dependant) -> frozenset[str]:
    """The names of the query parameters of `dependant` (and its dependencies) that take
    one value."""
    names = {
        field.alias
        for field in dependant.query_params
        if not _takes_many(field.field_info.annotation)
    }
    for sub in dependant.dependencies:
        names |= _single_valued(sub)
    return frozenset(names)


class JsonBodyRoute(APIRoute):
    """A FastAPI route whose body (if it takes one) goes through `json_object` first, so that
    FastAPI's own, lenient parsing only ever sees a checked object, and whose query
    parameters are refused when unknown (`refuse_unknown`) or, single-valued, repeated
    (`refuse_repeated`), and whose integer and boolean parameters are read strictly
    (`strict_scalar`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        single, known = _single_valued(self.dependant), _query_names(self.dependant)
        scalars = _scalars(self.dependant)
        takes_body = self.body_field is not None

        async def strict(request: Request) -> Response:
            refuse_unknown(request.scope, known)
            refuse_repeated(request, single)
            _refuse_loose_scalars(request, scalars)
            if not takes_body:
                await _refuse_a_body(request)
                return await handler(request)
            parsed = await json_object(request)
            return await handler(_ParsedRequest(request, await request.body(), parsed))

        return strict


async def _refuse_a_body(request: Request) -> None:
    """For a route that takes no body: a body sent anyway must be JSON (else 415) and an
    empty object, `{}` (else 400, or 422 for members), rather than be ignored: a client that
    sends one expects it to count. Raises UnsupportedMediaType, InvalidRequest,
    ValidationFailed."""
    length = header(request.scope, b"content-length")
    if length in ("", "0") and not header(request.scope, b"transfer-encoding"):
        return  # no body: the usual case, nothing to read
    if not await request.body():
        return
    if await json_object(request):
        raise ValidationFailed("body: this route takes no request body (send none, or {})")
