"""Reading params files: YAML with duplicate keys refused, and strict typed validation.

PyYAML (and Snakemake, which reads ``--configfile`` with it) keeps the last of two equal keys
without a word, so a second ``seeds:`` silently replaces the first. Every params file tskd or the
workflow reads goes through :func:`read_params_yaml`, which refuses that with both lines.

Validation is strict (:func:`validate_strict`): ``batch_size: "64"`` or ``nesterov: "yes"`` are
refused instead of coerced, while what YAML naturally gives still passes (an int where a float is
expected, a list where a tuple is). That is pydantic's strict mode on the JSON form of the values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from tskd.errors import ParamsError, TskdError

M = TypeVar("M", bound=BaseModel)


class DuplicateKeyError(TskdError, ValueError):
    """A mapping of a YAML or JSON document gives the same key twice."""


class _NoDuplicates(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, naming the key's dotted path."""


def _construct_mapping(loader: _NoDuplicates, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # resolves `<<:` merges, which may legitimately repeat keys
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKeyError(f"line {line}: key {key!r} given twice (first at line {seen[key]}); "
                                    "YAML would silently keep only the last one")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_NoDuplicates.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_params_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in ``path``; a missing file, bad YAML, a duplicated key or a non-mapping top level
    raise ParamsError naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_NoDuplicates)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKeyError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def loads_json(text: str) -> Any:
    """``json.loads`` that refuses a key given twice in one object (json keeps the last silently)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise DuplicateKeyError(f"key {key!r} given twice in one object")
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=pairs)


def validate_strict(model: type[M], raw: Any) -> M:
    """``model`` validated strictly from ``raw``'s JSON form: no string-to-number or string-to-bool
    coercion, ints accepted for floats and lists for tuples. Raises pydantic's ValidationError."""
    # default=str: a YAML date or other non-JSON scalar reaches the model as text, refused by
    # every field that does not take a string.
    return model.model_validate_json(json.dumps(raw, default=str), strict=True)
