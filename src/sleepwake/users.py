"""Many users on one base model.

Each user of a memory home has a memory of their own — facts, MEMIT edits, keyed
tables and adapters, conversations, sleep history — and they all share one loaded
base model. The home itself is the memory of the user ``default`` (a home made before
there were users keeps working as it is); user NAME's memory lives in
``home/users/NAME/``. One process writes the whole home (`homelock`: one lock, the
home's).

A user's learned weights are low-rank deltas and keyed hooks on the shared model, put
on for that user's work and taken off after it, as multi-LoRA servers do: every
`Memory` makes its own weights live before it uses the model (`Memory.activate`:
free when they already are, a write of the edited down-projections when another
user's were), under the model's lock (`LoadedModel.lock`), which the users take in
turn. A user's sleep runs on a private copy of the model (`Memory.apart`), so the
others go on answering from the shared one; that user's own replies meanwhile read
their weights as they were before it.

`Users` is the registry of a server: one `Assistant` per user, made on first use.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sleepwake.errors import InvalidUserError

if TYPE_CHECKING:
    from sleepwake.talk import Assistant

DEFAULT_USER = "default"
USERS_DIR = "users"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_user(name: Any) -> str:
    """A user's name as given (None: the default user), if it is path-safe: 1–64 of
    letters, digits, '_', '.', '-', and neither "." nor ".."; else `InvalidUserError`."""
    if name is None:
        return DEFAULT_USER
    if not isinstance(name, str):
        raise InvalidUserError(f"a user name must be a string, got {type(name).__name__}")
    if not _NAME.fullmatch(name) or name in (".", ".."):
        shown = name if len(name) <= 70 else name[:67] + "..."
        raise InvalidUserError(f"invalid user name {shown!r}: use 1 to 64 letters, digits, '_', '.' or '-' "
                               "(not '.' or '..')")
    return name


def user_home(home: str | os.PathLike[str], user: str | None) -> Path:
    """Where `user`'s memory lives in `home`: the home itself for the default user."""
    user = check_user(user)
    home = Path(home).expanduser()
    return home if user == DEFAULT_USER else home / USERS_DIR / user


def known_users(home: str | os.PathLike[str]) -> list[str]:
    """The users with a memory in `home`, the default user first."""
    home = Path(home).expanduser()
    others = sorted(p.name for p in (home / USERS_DIR).glob("*/memory.sqlite")
                    if _NAME.fullmatch(p.parent.name)) if (home / USERS_DIR).is_dir() else []
    return [DEFAULT_USER, *[u for u in others if u != DEFAULT_USER]]


class Users:
    """One `Assistant` per user of a home, all on one loaded model, each made on first
    use by `make(name)`; `first` is the default user's, made already."""

    def __init__(self, first: "Assistant", make: Callable[[str], "Assistant"]) -> None:
        self._assistants: dict[str, Assistant] = {check_user(first.memory.user): first}
        self._make = make
        self._guard = threading.Lock()
        self._making: dict[str, threading.Lock] = {}

    @property
    def default(self) -> "Assistant":
        return self._assistants[DEFAULT_USER]

    def get(self, name: str | None) -> "Assistant":
        """The user's assistant (its memory is opened, or made, on first use)."""
        name = check_user(name)
        with self._guard:
            bot = self._assistants.get(name)
            if bot is not None:
                return bot
            making = self._making.setdefault(name, threading.Lock())
        with making:  # one user's memory is opened once; other users' requests go on meanwhile
            with self._guard:
                bot = self._assistants.get(name)
            if bot is None:
                bot = self._make(name)
                with self._guard:
                    self._assistants[name] = bot
        return bot

    def loaded(self) -> dict[str, "Assistant"]:
        with self._guard:
            return dict(self._assistants)

    def sleeping(self) -> str | None:
        """The kind of a sleep that runs now for some user, or None."""
        return next((k for b in self.loaded().values() if (k := b.sleeping()) is not None), None)

    def close(self) -> None:
        """Wait for the running sleeps, then close every user's memory."""
        for bot in self.loaded().values():
            bot.close()
