"""The memory of a home that a running server holds, reached through its HTTP API.

While `sleepwake serve` holds a home (see `homelock`), it is the one process that may
change it. The CLI's `inject`, `forget`, `nap`, `sleep` and `status` then go through
the server, so the server keeps answering from weights that hold every fact, and a
nap it runs is never raced by another process. Standard library only (urllib), so a
CLI command stays quick to start.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from sleepwake.errors import (
    InvalidFactError,
    SleepRunningError,
    SleepwakeError,
    StoreError,
    UnknownCycleError,
    UnknownFactError,
)
from sleepwake.facts import Fact
from sleepwake.homelock import Holder
from sleepwake.store import FactRecord

_BY_STATUS: dict[int, type[SleepwakeError]] = {400: InvalidFactError, 422: InvalidFactError,
                                               409: SleepRunningError, 404: UnknownFactError}


def record(d: dict) -> FactRecord:
    """A fact as the server's JSON has it (`FactOut`)."""
    fact = Fact(d["subject"], d["relation"], d["object"], d.get("question") or "")
    return FactRecord(int(d["id"]), fact, d["status"], d["created_at"], d.get("ended_at"), d.get("replaced_by"),
                      d.get("where", "memit"))


class Remote:
    """Calls on the server that holds a home. Errors come back as the `SleepwakeError`
    the server raised (its message, plus which server said it)."""

    def __init__(self, holder: Holder, token: str | None = None, timeout: float = 600.0,
                 user: str | None = None) -> None:
        if not holder.url:
            raise StoreError(f"{holder.describe()} serves no HTTP API")
        self.holder = holder
        self.url = holder.url.rstrip("/")
        self.token = token if token is not None else os.environ.get("SLEEPWAKE_TOKEN") or None
        self.timeout = timeout
        self.user = user  # whose memory (None: the default user's, or the token's key's)

    @property
    def who(self) -> str:
        return f"the server at {self.url} (process {self.holder.pid})"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        if self.user is not None:
            path += f"?user={urllib.parse.quote(self.user)}"
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            if exc.code == 401:
                raise StoreError(f"{self.who} needs its token: set SLEEPWAKE_TOKEN") from None
            if exc.code == 404 and "cycle" in str(message):
                raise UnknownCycleError(message) from None
            kind = _BY_STATUS.get(exc.code, SleepwakeError)
            raise kind(f"{message} ({self.who}; nothing changed)" if exc.code == 409 else message) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StoreError(f"the memory home is held by {self.holder.describe()}, but {self.url} does not "
                             f"answer ({reason}); try again once it is up or has stopped") from None

    def inject(self, facts: list[Fact]) -> tuple[list[FactRecord], list[Fact]]:
        """(injected records, facts skipped as already known), in batches the API takes."""
        records, skipped = [], []
        for start in range(0, len(facts), 100):
            out = self.call("POST", "/v1/memory/facts", [f.to_dict() for f in facts[start:start + 100]])
            records += [record(d) for d in out["injected"]]
            skipped += [Fact.from_dict(d) for d in out["skipped"]]
        return records, skipped

    def forget(self, fact_id: int) -> FactRecord:
        return record(self.call("DELETE", f"/v1/memory/facts/{fact_id}"))

    def status(self) -> dict:
        return self.call("GET", "/v1/memory/status")

    def sleep(self, kind: str, poll: float = 1.0) -> dict:
        """Start a nap or deep sleep in the server and wait for its report."""
        if kind == "nap":
            self.call("POST", "/v1/memory/nap")
        else:
            self.call("POST", "/v1/memory/sleep", {"deep": True})
        while (st := self.status())["sleeping"] is not None:
            time.sleep(poll)
        if st.get("last_error"):
            raise SleepwakeError(f"the sleep failed in {self.who}: {st['last_error']}")
        if st.get("last_cycle") is None:
            raise SleepwakeError(f"{self.who} reports no sleep cycle")
        return st["last_cycle"]
