"""Per-module settings: quantization_config["dynamic"], as GPTQModel writes and reads it (vLLM reads
it too).

Keys are `"+:<regex>"` (an override for the modules it matches; a bare regex means the same) or
`"-:<regex>"` (those modules are left unquantized); values are the overridden settings, e.g.
{"bits": 3, "group_size": 64}. A module takes the first key, in the dict's order, whose regex
matches its full name with `re.match` (GPTQModel's `_resolve_dynamic_override`: start-anchored only,
so we write `^<escaped name>$`, which it also recognises as an exact name). Modules no key matches
use the top-level bits/group_size.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

Setting = tuple[int, int]  # (bits, group_size)


def module_key(name: str) -> str:
    """The dynamic key that matches exactly the module `name` (dots escaped, anchored at both
    ends)."""
    return f"+:^{re.escape(name)}$"


def resolve(dynamic: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The override dict of the first key matching `name`; {} if no key does; None if a "-:" key
    excludes it."""
    for key, override in (dynamic or {}).items():
        negative = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        if re.match(pattern, name):
            return None if negative else dict(override or {})
    return {}


def module_setting(dynamic: dict[str, Any] | None, name: str, default: Setting) -> Setting:
    """(bits, group_size) of module `name`: its override's values where given, else `default`."""
    override = resolve(dynamic, name) or {}
    return int(override.get("bits", default[0])), int(override.get("group_size", default[1]))


def check_dynamic(dynamic: Any) -> None:
    """ValueError unless `dynamic` is a dict of compilable regex keys to dicts with valid
    bits/group_size."""
    if not isinstance(dynamic, dict):
        raise ValueError(
            f"dynamic must map module regexes to settings, got {type(dynamic).__name__}"
        )
    for key, override in dynamic.items():
        try:
            re.compile(key[2:] if key.startswith(("-:", "+:")) else key)
        except re.error as e:
            raise ValueError(f"dynamic key {key!r} is not a valid regex ({e})") from None
        if not isinstance(override, dict):
            raise ValueError(f"dynamic[{key!r}] must be a dict of settings, got {override!r}")


def encode(settings: dict[str, Setting]) -> tuple[Setting, dict[str, dict[str, int]]]:
    """Per-module settings -> (top-level setting, dynamic dict). The top level is the most common
    setting (ties: the one met first in module order); every module with another setting gets an
    exact-name key, in module order."""
    if not settings:
        raise ValueError("no modules to encode")
    counts = Counter(settings.values())
    # first appearance of each setting
    order = {s: i for i, s in reversed(list(enumerate(settings.values())))}
    top = max(counts, key=lambda s: (counts[s], -order[s]))
    dynamic = {
        module_key(name): {"bits": s[0], "group_size": s[1]}
        for name, s in settings.items()
        if s != top
    }
    return top, dynamic
