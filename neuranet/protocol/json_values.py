"""Bounds on free-form JSON-like values from untrusted senders (device profiles, model options, sealing).

A value is accepted only if it is made of dicts with string keys, lists, strings without lone
surrogates (they cannot be stored or encoded as UTF-8), ints that fit in 64 bits (msgpack and
the databases hold no more), finite floats, bools and None, nested at most ``max_depth`` deep and
with at most ``max_items`` members in all. Deeply nested values broke JSON encoding (a recursion
error) long after they were stored, so they are refused where they arrive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class JsonValueError(ValueError):
    """A value outside the bounds; the message says where (a dotted path) and why."""


@dataclass(frozen=True)
class JsonBounds:
    max_depth: int = 8
    max_items: int = 10_000  # dict entries, list elements and leaves, all levels together
    max_string: int = 100_000  # characters of one string (or key)


def has_lone_surrogate(text: str) -> bool:
    """True if ``text`` holds a surrogate code point (JSON's ``"\\ud800"``), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(text: str, where: str = "value", max_length: int | None = None) -> str:
    """``text`` if it is storable text (no lone surrogates, at most ``max_length`` characters)."""
    if has_lone_surrogate(text):
        raise JsonValueError(f"{where}: text holds a lone surrogate (\\ud800-\\udfff), which is not valid Unicode")
    if max_length is not None and len(text) > max_length:
        raise JsonValueError(f"{where}: text is longer than {max_length} characters")
    return text


def check_json_value(value: Any, bounds: JsonBounds = JsonBounds(), where: str = "value") -> Any:
    """``value`` unchanged if it is within ``bounds``, else `JsonValueError`. Iterative, so a value
    nested deeper than the interpreter's recursion limit is refused, not crashed on."""
    items = 0
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        items += 1
        if items > bounds.max_items:
            raise JsonValueError(f"{where}: more than {bounds.max_items} members in all")
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise JsonValueError(f"{path}: integer {_short(item)} does not fit in 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise JsonValueError(f"{path}: {item} is not a finite number")
        elif isinstance(item, str):
            check_text(item, path, bounds.max_string)
        elif isinstance(item, (dict, list, tuple)):
            if depth >= bounds.max_depth:
                raise JsonValueError(f"{where}: nested deeper than {bounds.max_depth} levels")
            if items + len(item) > bounds.max_items:
                raise JsonValueError(f"{where}: more than {bounds.max_items} members in all")
            if isinstance(item, dict):
                for key, member in item.items():
                    if not isinstance(key, str):
                        raise JsonValueError(f"{path}: keys must be strings, got {type(key).__name__}")
                    check_text(key, f"{path} key", bounds.max_string)
                    stack.append((member, f"{path}.{key[:40]}", depth + 1))
            else:
                stack.extend((member, f"{path}[{i}]", depth + 1) for i, member in enumerate(item))
        else:
            raise JsonValueError(f"{path}: {type(item).__name__} is not a JSON value")
    return value


def _short(n: int) -> str:
    return str(n) if n.bit_length() <= 96 else f"of {n.bit_length()} bits"
