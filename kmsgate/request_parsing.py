"""Reading a request body: strict JSON (RFC 8259 and I-JSON: no NaN, no member given twice,
no lone surrogate), then a pydantic model; an operation body as one item or a batch."""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kmsgate.errors import InvalidRequest, TooLarge, ValidationFailed
from kmsgate.text import quoted

ModelT = TypeVar("ModelT", bound=BaseModel)

ItemT = TypeVar("ItemT", bound=BaseModel)


class Batch(BaseModel, Generic[ItemT]):
    model_config = ConfigDict(extra="forbid", strict=True)

    batch: list[ItemT] = Field(min_length=1)


@functools.cache
def batch_model(item_type: type[ItemT]) -> type[Batch[ItemT]]:
    """`Batch[item_type]`, built once: pydantic keeps parametrised models only weakly, so
    without a strong reference each garbage collection drops the class and the next request
    builds it again (a new class per request, several % of a batch's cost)."""
    return Batch[item_type]  # type: ignore[valid-type]


_PLAIN_PART = re.compile(r"[A-Za-z0-9_\[\](), -]{1,64}")
"""A part of an error's location shown as it is: a schema's own name, or pydantic's
(`[key]`, `function-after[_decode(), str]`)."""


def location(loc: Sequence[str | int]) -> str:
    """Where an error is, as a detail names it (`body.batch.0.input`): a part that is not a
    short plain name (a member, label or query parameter name the caller made up) is
    `quoted`, so the detail neither grows with the request nor carries a line break."""
    return ".".join(
        str(part) if isinstance(part, int) or _PLAIN_PART.fullmatch(part) else quoted(part)
        for part in loc
    )


def validation_detail(errors: Sequence[Mapping[str, Any]]) -> str:
    """A client-safe summary of pydantic errors (`ValidationError.errors()`, FastAPI's
    `RequestValidationError.errors()`): the first five locations and messages, never input
    values."""
    return "; ".join(f"{location(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])


class _DuplicateKey(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refusing a name given twice: a proxy that reads the first
    value would otherwise see another request than the gateway, which would read the last."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        names = [n for n, _ in pairs]
        name = next(n for i, n in enumerate(names) if n in names[:i])
        raise _DuplicateKey(f"duplicate member {quoted(name)} in the request body")
    return obj


class _NotANumber(ValueError):
    pass


def _no_constant(name: str) -> None:
    raise _NotANumber(f"{name} is not JSON")


def _number(text: str) -> float | int:
    """A JSON number with a fraction or an exponent: an integer if its value is one (JSON
    Schema counts 20.0 as an integer), else a float. Raises _NotANumber beyond a double's
    range (`1e400` would be Infinity)."""
    value = float(text)
    if not math.isfinite(value):
        raise _NotANumber(f"the number {text[:32]} is beyond a double's range")
    return int(value) if value.is_integer() else value


_STRICT_JSON = json.JSONDecoder(
    object_pairs_hook=_unique_object, parse_constant=_no_constant, parse_float=_number
)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw` (RFC 8259, UTF-8; NaN, Infinity and a member name given
    twice refused). Raises InvalidRequest if it is not such JSON or not an object."""
    try:
        body = _STRICT_JSON.decode(raw.decode("utf-8"))
    except _DuplicateKey as exc:
        raise InvalidRequest(str(exc)) from None
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid JSON: not UTF-8") from None
    except json.JSONDecodeError as exc:  # its message names no input, only where
        where = f"line {exc.lineno}, column {exc.colno}"
        raise InvalidRequest(f"request body is not valid JSON: {exc.msg} ({where})") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except _NotANumber as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except ValueError:  # an integer of over 4300 digits (Python's limit)
        raise InvalidRequest("request body is not valid JSON: an integer too long") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw):  # a pair is one character: fine
        try:
            orjson.dumps(body)  # refuses a string holding a lone surrogate
        except TypeError:
            raise InvalidRequest(
                "request body is not valid JSON: a string holds a lone surrogate (I-JSON, "
                "RFC 7493): it has no UTF-8 form"
            ) from None
    return body


def parse_model(model: type[ModelT], body: Any) -> ModelT:
    """`body` validated as `model`. Raises ValidationFailed with a client-safe detail."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        raise ValidationFailed(validation_detail(errors)) from None


def parse_operation(
    body: dict[str, Any], item_type: type[ItemT], max_batch: int
) -> tuple[list[ItemT], bool]:
    """The items of an operation body (a parsed JSON object) and whether it was a batch.

    Raises TooLarge (more than `max_batch` items) or ValidationFailed (schema).
    """
    if "batch" not in body:
        return [parse_model(item_type, body)], False
    batch = body["batch"]
    if isinstance(batch, list) and len(batch) > max_batch:
        raise TooLarge(f"batch of {len(batch)} items exceeds the limit of {max_batch}")
    return parse_model(batch_model(item_type), body).batch, True


def operation_schema(item_type: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body for an operation: one item, or a batch of items."""
    item = item_type.model_json_schema(ref_template="#/components/schemas/{model}")
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            item,
                            {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["batch"],
                                "properties": {
                                    "batch": {"type": "array", "items": item, "minItems": 1}
                                },
                            },
                        ]
                    }
                }
            },
        }
    }
