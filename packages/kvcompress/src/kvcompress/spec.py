"""Parse policy spec strings such as ``"h2o(budget=256,recent=32)+quant(bits=4)"``."""

from __future__ import annotations

import ast
import re
from typing import Any

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _value(raw: str, where: str) -> Any:
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if _NAME.match(raw):
            return raw
        raise ValueError(
            f"spec {where}: cannot read value {raw!r}; use a number, true/false, none or a word"
        ) from None


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Split a spec into ``[(name, params), ...]``; one part per ``+``-joined policy."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec: expected a non-empty string such as 'sink(budget=128)', got {spec!r}")
    if spec.count("(") != spec.count(")"):
        raise ValueError(f"spec {spec!r}: unbalanced parentheses")
    out = []
    for part in _split_top(spec.replace(" ", ""), "+"):
        if not part:
            raise ValueError(f"spec {spec!r}: empty policy between '+'")
        m = re.match(r"^([^()]+)(?:\((.*)\))?$", part)
        if not m or not _NAME.match(m.group(1)):
            raise ValueError(f"spec {spec!r}: cannot read {part!r}; expected name or name(key=value,...)")
        name, body = m.group(1), m.group(2)
        params: dict[str, Any] = {}
        if body:
            for item in _split_top(body, ","):
                if "=" not in item:
                    raise ValueError(f"spec {spec!r}: {item!r} is not key=value")
                key, raw = item.split("=", 1)
                if key in params:
                    raise ValueError(f"spec {spec!r}: parameter {key!r} given twice")
                params[key] = _value(raw, repr(spec))
        out.append((name, params))
    return out
