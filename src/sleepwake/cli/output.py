"""How the command line writes: aligned tables, ✓/✗ marks where the terminal has them,
JSON that stays valid on any encoding, one-line errors. The demo writes the same way."""

from __future__ import annotations

import codecs
import json
import math
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

from sleepwake.facts import Fact
from sleepwake.jsonsafe import json_safe


def short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _width(text: str) -> int:
    """Terminal columns `text` takes (wide East Asian characters count twice)."""
    w = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        w += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return w


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None, gap: str = "  ") -> list[str]:
    """Left-aligned columns; the last column is not padded."""
    all_rows = ([list(header)] if header else []) + [list(r) for r in rows]
    if not all_rows:
        return []
    n = max(len(r) for r in all_rows)
    widths = [max(_width(r[i]) for r in all_rows if i < len(r)) for i in range(n)]
    return [gap.join(_pad(c, widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)).rstrip() for r in all_rows]


def fact_text(fact: Fact) -> str:
    return f"{fact.subject} | {fact.relation} | {fact.object}"


def is_utf(stream: TextIO) -> bool:
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name.startswith("utf")
    except LookupError:
        return False


def marks(stream: TextIO) -> tuple[str, str]:
    """✓/✗ where the output can show them, else plain ASCII."""
    return ("✓", "✗") if is_utf(stream) else ("+", "-")


def dump_json(obj: Any, out: TextIO) -> None:
    # Non-ASCII as is on a UTF-8 stream; escaped (still valid JSON) on any other.
    out.write(json.dumps(json_safe(obj), ensure_ascii=not is_utf(out), indent=2) + "\n")


def fmt_float(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__
