"""One home for making results JSON-safe: the CLI's --json output and the server's answers."""

from __future__ import annotations

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """NaN and infinity are not JSON: null instead, at any depth of dicts, lists and tuples."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
