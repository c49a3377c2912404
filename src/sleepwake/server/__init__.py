"""`sleepwake serve`: the Assistant over HTTP — OpenAI-compatible chat completions,
a memory API and a web page (see `app`)."""

from sleepwake.server.app import create_app

__all__ = ["create_app"]
