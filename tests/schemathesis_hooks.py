"""schemathesis hooks for tests/test_openapi_conformance.py (loaded by SCHEMATHESIS_HOOKS):
bodies for the one media type it cannot generate, and path parameters that sometimes name
objects that exist, so that requests get past 404."""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

EXISTING = "KMSGATE_SCHEMATHESIS_NAMES"
"""Environment variable: names that exist on the gateway, as `param=value,value;param=value`."""

schemathesis.openapi.media_type("application/ocsp-request", st.binary(max_size=512))


def _existing() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for part in filter(None, os.environ.get(EXISTING, "").split(";")):
        param, _, values = part.partition("=")
        names[param] = values.split(",")
    return names


@schemathesis.hook
def flatmap_path_parameters(ctx: Any, parameters: dict[str, Any] | None) -> Any:
    """Half the time, each path parameter with known names gets one of them."""
    if not parameters:
        return st.just(parameters)
    known = _existing()
    choices = {
        name: st.one_of(st.just(value), st.sampled_from(known[name]))
        for name, value in parameters.items()
        if known.get(name)
    }
    return st.fixed_dictionaries(choices).map(lambda chosen: {**parameters, **chosen})
