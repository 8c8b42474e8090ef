"""Checking saved device state: a snapshot is untrusted input (corrupt, hostile, or made by
another version), so every field is checked before any of it is used.

:func:`unpack_state` takes what ``json.loads`` gave back and either returns it as a dict
with exactly the expected keys and values, or raises :class:`StateError` saying which
field is wrong and why.
"""

from __future__ import annotations

import json
from typing import Any

#: What a field may hold: an inclusive (low, high) range of ints (bools refused), a
#: collection of allowed values, or a type (``type(None)`` for null).
FieldSpec = tuple[int, int] | frozenset[Any] | type | tuple[type, ...]


class StateError(ValueError):
    """Saved state that is malformed or corrupt, or was made for another device."""


def load_state(data: bytes, what: str, spec: dict[str, FieldSpec]) -> dict[str, Any]:
    """A device's ``save_state`` JSON, parsed and checked against ``spec``."""
    try:
        state = json.loads(data)
    except (ValueError, RecursionError):
        raise StateError(f"{what}: state is not JSON") from None
    return unpack_state(state, what, spec)


def unpack_state(state: object, what: str, spec: dict[str, FieldSpec]) -> dict[str, Any]:
    """``state`` checked against ``spec``: exactly its keys, each value as it says."""
    if not isinstance(state, dict):
        raise StateError(f"{what}: expected an object, got {type(state).__name__}")
    missing = [k for k in spec if k not in state]
    unknown = [k for k in state if k not in spec]
    if missing or unknown:
        parts = ([f"missing {', '.join(map(str, missing))}"] if missing else []) + \
            ([f"unknown {', '.join(map(str, unknown))}"] if unknown else [])
        raise StateError(f"{what}: {'; '.join(parts)}")
    for key, want in spec.items():
        _check(f"{what}: {key}", state[key], want)
    return state


def _check(name: str, value: object, want: FieldSpec) -> None:
    if isinstance(want, tuple) and len(want) == 2 and all(type(w) is int for w in want):
        lo, hi = want
        if type(value) is not int or not lo <= value <= hi:
            raise StateError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    elif isinstance(want, type | tuple):
        types = want if isinstance(want, tuple) else (want,)
        if type(value) not in types:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise StateError(f"{name} must be {names}, got {type(value).__name__}")
    elif not any(type(value) is type(w) and value == w for w in want):
        raise StateError(f"{name} must be one of {sorted(want, key=repr)}, got {value!r}")
