"""One writer process per memory home.

A home is changed by one process at a time: two processes that each hold the
weights in memory and write the ledger would undo each other's work (two naps over
the same facts, or one process marking the other's running sleep as dead and
deleting its adapter). The writer holds an OS file lock on ``home/lock`` (through
`filelock`; the kernel drops it when the process dies, so a crash never leaves a
stale lock) and says who it is in ``home/owner.json``: its pid, its command and,
for a server, the URL through which other processes reach the memory.

Inside one process several `Memory` objects may share a home (the lock is counted);
only the first to take it may clean up after a dead process (`HomeLock.first`). The
users of a home (``home/users/NAME``) are all written under the home's one lock, and
each user's ledger has its own first claim (`HomeLock(home, part=...)`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from sleepwake.errors import HomeBusyError, StoreError

LOCK_FILE = "lock"
OWNER_FILE = "owner.json"


@dataclass(frozen=True)
class Holder:
    """The process that holds a home, as it described itself."""

    pid: int | None
    command: str
    host: str = ""
    started: float | None = None
    url: str | None = None  # set by `sleepwake serve`: other processes work through it

    def describe(self) -> str:
        who = f"process {self.pid}" if self.pid else "another process"
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"{who}{where} ({self.command})" + (f", serving {self.url}" if self.url else "")


class _Held:
    """A lock this process holds, and how many `HomeLock`s share it."""

    def __init__(self, lock: FileLock, holder: Holder) -> None:
        self.lock, self.holder, self.count = lock, holder, 0
        self.parts: set[str] = set()  # the parts (users' ledgers) claimed since the lock was taken


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _key(home: Path) -> str:
    return os.path.realpath(home)


def _command() -> str:
    args = [os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]]
    text = " ".join(args)
    return text if len(text) <= 120 else text[:119] + "…"


def _read_owner(home: Path) -> Holder:
    try:
        d = json.loads((home / OWNER_FILE).read_text(encoding="utf-8"))
        return Holder(int(d["pid"]) if d.get("pid") else None, str(d.get("command", "?")), str(d.get("host", "")),
                      d.get("started"), d.get("url"))
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(None, "unknown command")


def _write_owner(home: Path, holder: Holder) -> None:
    from sleepwake.store import write_atomic

    body = json.dumps({"pid": holder.pid, "command": holder.command, "host": holder.host,
                       "started": holder.started, "url": holder.url})
    write_atomic(home / OWNER_FILE, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))


def holder(home: str | os.PathLike[str]) -> Holder | None:
    """Who holds `home` now (this process included), or None. Changes nothing."""
    home = Path(home).expanduser()
    with _HELD_GUARD:
        held = _HELD.get(_key(home))
        if held is not None:
            return held.holder
    if not (home / LOCK_FILE).is_file():
        return None
    probe = FileLock(str(home / LOCK_FILE), timeout=0, thread_local=False)
    try:
        probe.acquire()
    except Timeout:
        return _read_owner(home)
    except OSError:
        return None  # a home we cannot even open for locking is not held by a live writer we could reach
    probe.release()
    return None


class HomeLock:
    """This process's claim to write `home`; `acquire` raises `HomeBusyError` naming the holder."""

    def __init__(self, home: str | os.PathLike[str], part: str = "") -> None:
        self.home = Path(home).expanduser()
        self.part = part  # which ledger under the home this claim is for ("" the home's own)
        self.first = False  # the first claim on `part` since this process took the lock
        self._held: _Held | None = None

    def acquire(self) -> "HomeLock":
        if self._held is not None:
            return self
        with _HELD_GUARD:
            key = _key(self.home)
            held = _HELD.get(key)
            if held is None:
                lock = FileLock(str(self.home / LOCK_FILE), timeout=0, thread_local=False)
                try:
                    lock.acquire()
                except Timeout:
                    other = _read_owner(self.home)
                    hint = ("; run the command again once it has stopped, or use its HTTP API"
                            if other.url else "; wait for it to end or stop it, then try again")
                    raise HomeBusyError(f"memory home {self.home} is in use by {other.describe()}{hint}",
                                        other) from None
                except OSError as exc:
                    raise StoreError(f"cannot lock memory home {self.home}: {exc.strerror or exc}") from exc
                held = _Held(lock, Holder(os.getpid(), _command(), socket.gethostname(), time.time()))
                try:
                    _write_owner(self.home, held.holder)
                except OSError as exc:
                    lock.release()
                    raise StoreError(f"cannot write {self.home / OWNER_FILE}: {exc.strerror or exc}") from exc
                _HELD[key] = held
            self.first = self.part not in held.parts
            held.parts.add(self.part)
            held.count += 1
            self._held = held
        return self

    def set_url(self, url: str) -> None:
        """Say where other processes reach this home's memory (a server's address)."""
        with _HELD_GUARD:
            if self._held is None:
                raise StoreError("set_url needs the home's lock")
            self._held.holder = Holder(**{**self._held.holder.__dict__, "url": url})
            _write_owner(self.home, self._held.holder)

    def release(self) -> None:
        with _HELD_GUARD:
            held, self._held = self._held, None
            if held is None:
                return
            held.count -= 1
            if held.count == 0:
                _HELD.pop(_key(self.home), None)
                (self.home / OWNER_FILE).unlink(missing_ok=True)
                held.lock.release()
