"""Reading the YAML config file: one mapping, every key of a mapping given once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kmsgate.errors import ConfigError

__all__ = ["read_config_file"]


class _UniqueKeysLoader(yaml.SafeLoader):
    """`yaml.safe_load`, but a key given twice in one mapping is an error (YAML requires
    unique keys; PyYAML keeps the last one silently: a second `port:` would win unseen)."""


def _unique_keys_mapping(
    loader: _UniqueKeysLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`: keys written beside it override the merged ones
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool):
            continue  # a key of another kind is refused by the settings anyway
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"key {key!r} given twice",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeysLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys_mapping
)


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file. Raises ConfigError if unreadable, not a mapping,
    or a mapping in it gives a key twice."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeysLoader)  # noqa: S506 (a SafeLoader)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = " ".join(str(exc.problem or exc.context or "malformed").split())
        raise ConfigError(f"config file {path} is not valid YAML: {why}{where}") from None
    except yaml.YAMLError as exc:
        why = " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid YAML: {why}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return data
