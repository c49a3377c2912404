"""`sleepwake serve`: the Assistant over HTTP — OpenAI-compatible chat completions,
a memory API and a web page (see `app`)."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    """`create_app` is imported when asked for: `sleepwake serve` checks its options with
    `server.guard` first, and a usage error then comes without loading torch (~2.5 s)."""
    if name == "create_app":
        from sleepwake.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
