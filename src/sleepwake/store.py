"""The memory home: a SQLite ledger of facts plus one safetensors file per edit.

Layout under ``home``::

    memory.sqlite        facts (one row per fact, with its status), meta, sleep cycles,
                         training pairs, conversations and their messages
    edits/00000042.v3.safetensors   A.<layer>, B.<layer>, K.<layer>: version 3 of fact 42's edit

A fact's edit is rewritten (a new version) when its subject is edited again, since
one subject's facts share one edit (see ``memit.requests``). Writes are atomic: a new
version is written under its own name before the transaction that points the ledger
at it commits, and the old version is deleted only after; a crash at any point
leaves the last committed state (at worst an unreferenced file, which is ignored).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sleepwake.errors import StoreError, UnknownCycleError, UnknownFactError
from sleepwake.facts import Fact
from sleepwake.homelock import HomeLock

if TYPE_CHECKING:  # torch is imported where edits are read or written, so ledger-only use starts fast
    from sleepwake.memit.editor import FactEdit
    from sleepwake.placement import Where
    from sleepwake.sleep.data import Pair

SCHEMA_VERSION = "4"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS facts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    relation TEXT NOT NULL,
    object TEXT NOT NULL,
    question TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL CHECK (status IN ('active', 'replaced', 'forgotten')),
    created_at REAL NOT NULL,
    ended_at REAL,
    replaced_by INTEGER REFERENCES facts(id),
    layers TEXT NOT NULL DEFAULT '',
    edit_version INTEGER NOT NULL DEFAULT 0,
    location TEXT NOT NULL DEFAULT 'memit',
    cycle INTEGER
);
CREATE INDEX IF NOT EXISTS facts_status ON facts(status);
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    adapter TEXT,
    superseded_by INTEGER,
    report TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fact_id INTEGER REFERENCES facts(id),
    cycle INTEGER NOT NULL REFERENCES cycles(id),
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    chat INTEGER NOT NULL,
    source TEXT NOT NULL,
    priority REAL NOT NULL DEFAULT 1.0,
    replays INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    source TEXT NOT NULL DEFAULT 'chat'
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation INTEGER NOT NULL REFERENCES conversations(id),
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    facts TEXT NOT NULL DEFAULT '[]',
    learned INTEGER NOT NULL DEFAULT 1,
    curated INTEGER
);
"""
# Columns added since schema 1, for homes made by an older version.
_ADDED_COLUMNS = {
    "edit_version": "INTEGER NOT NULL DEFAULT 0",
    "location": "TEXT NOT NULL DEFAULT 'memit'",
    "cycle": "INTEGER",
}


@dataclass(frozen=True)
class Exchange:
    """A user message and the assistant's reply to it."""

    id: int  # the user message's id
    user: str
    reply: str
    n_facts: int  # facts extracted from the user message


@dataclass(frozen=True)
class FactRecord:
    """A fact as the ledger knows it."""

    id: int
    fact: Fact
    status: str
    created_at: float
    ended_at: float | None = None
    replaced_by: int | None = None
    where: str = "memit"  # "memit" (its edit is in the weights) or "consolidated" (a sleep's adapter holds it)
    cycle: int | None = None  # the sleep cycle that consolidated it

    def to_dict(self) -> dict:
        d = {"id": self.id, **self.fact.to_dict(), "status": self.status, "where": self.where,
             "created_at": self.created_at}
        if self.ended_at is not None:
            d["ended_at"] = self.ended_at
        if self.replaced_by is not None:
            d["replaced_by"] = self.replaced_by
        return d


ID_MAX = 2**63 - 1  # SQLite's largest integer


def _check_id(fact_id: int) -> None:
    """A number SQLite cannot even hold names no fact (rather than an OverflowError)."""
    if not 1 <= fact_id <= ID_MAX:
        raise UnknownFactError(f"no fact with id {fact_id}")


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Replace `path` so that a crash leaves the old file or the new one, never part of one:
    `write(tmp)` fills a temporary file beside it, which is synced to disk and renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


class Store:
    """Ledger and edit files for one model's memory."""

    def __init__(self, home: str | os.PathLike[str], model_fingerprint: str, model_name: str, *,
                 read_only: bool = False, lock_home: str | os.PathLike[str] | None = None) -> None:
        """Open the home for writing (taking its lock: `HomeBusyError` while another live
        process holds it), or with `read_only` to look without changing anything,
        beside a writer if there is one. `lock_home`: the home whose lock covers this
        ledger (a user's ledger under ``home/users/``), if not `home` itself."""
        self.home = Path(home).expanduser()
        self.read_only = read_only
        if self.home.exists() and not self.home.is_dir():
            raise StoreError(f"memory home {self.home} exists and is not a directory")
        self.edits_dir = self.home / "edits"
        self.path = self.home / "memory.sqlite"
        self._tx_lock = threading.RLock()
        self.lock: HomeLock | None = None
        if read_only:
            self.db = self._open_read_only()
            self._check_model(model_fingerprint, model_name)
            return
        try:
            self.edits_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create memory home {self.home}: {exc.strerror or exc}") from exc
        root = self.home if lock_home is None else Path(lock_home).expanduser()
        self.lock = HomeLock(root, "" if lock_home is None else os.path.realpath(self.home)).acquire()
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            cols = {row[1] for row in self.db.execute("PRAGMA table_info(facts)")}
            for col, decl in _ADDED_COLUMNS.items():
                if col not in cols:
                    self.db.execute(f"ALTER TABLE facts ADD COLUMN {col} {decl}")
            self._bind_model(model_fingerprint, model_name)
        except sqlite3.DatabaseError as exc:
            self.lock.release()
            raise StoreError(f"{self.path} is not a usable sleepwake ledger: {exc}") from exc
        except BaseException:
            self.lock.release()
            raise

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise StoreError(f"no memory at {self.home} yet")
        try:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30,
                                 isolation_level=None, check_same_thread=False)
            db.execute("SELECT count(*) FROM facts").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable sleepwake ledger: {exc}") from exc
        return db

    def _check_model(self, fingerprint: str, name: str) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='model_fingerprint'").fetchone()
        if row is not None and row[0] != fingerprint:
            other = self.db.execute("SELECT value FROM meta WHERE key='model_name'").fetchone()
            raise StoreError(
                f"memory home {self.home} belongs to model {other[0] if other else '?'} "
                f"({row[0]}), not {name} ({fingerprint}); use another --home"
            )

    def _bind_model(self, fingerprint: str, name: str) -> None:
        """A home belongs to one base model: edits are meaningless on another."""
        self._check_model(fingerprint, name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM meta WHERE key='model_fingerprint'").fetchone() is None:
                db.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [("model_fingerprint", fingerprint), ("model_name", name), ("schema", SCHEMA_VERSION)],
                )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; threads sharing this connection take turns."""
        if self.read_only:
            raise StoreError(f"memory home {self.home} was opened read-only")
        with self._tx_lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()
        if self.lock is not None:
            self.lock.release()

    # --- reading --------------------------------------------------------------

    @staticmethod
    @functools.lru_cache(maxsize=1 << 16)
    def _record(row: tuple) -> FactRecord:
        """A ledger row as a record; kept per row (records are frozen): a lifelong run
        reads every fact several times per batch, and checking each `Fact` again took
        ~5% of a 2,000-fact run."""
        fid, s, r, o, q, status, created, ended, replaced_by, where, cycle = row
        return FactRecord(fid, Fact(s, r, o, q), status, created, ended, replaced_by, where, cycle)

    _COLS = "id, subject, relation, object, question, status, created_at, ended_at, replaced_by, location, cycle"

    def facts(self, status: str | None = "active", where: str | None = None) -> list[FactRecord]:
        """Facts in ledger (id) order; status None lists all, `where` filters by location."""
        sql, args = f"SELECT {self._COLS} FROM facts WHERE 1=1", []
        if status is not None:
            sql, args = sql + " AND status=?", [*args, status]
        if where is not None:
            sql, args = sql + " AND location=?", [*args, where]
        return [self._record(r) for r in self.db.execute(sql + " ORDER BY id", args).fetchall()]

    def get(self, fact_id: int) -> FactRecord:
        _check_id(fact_id)
        row = self.db.execute(f"SELECT {self._COLS} FROM facts WHERE id=?", (fact_id,)).fetchone()
        if row is None:
            raise UnknownFactError(f"no fact with id {fact_id}")
        return self._record(row)

    def _version(self, fact_id: int) -> int:
        _check_id(fact_id)
        row = self.db.execute("SELECT edit_version FROM facts WHERE id=?", (fact_id,)).fetchone()
        if row is None:
            raise UnknownFactError(f"no fact with id {fact_id}")
        return int(row[0])

    def edit_path(self, fact_id: int, version: int | None = None) -> Path:
        """The file of a fact's edit (the current version unless one is given)."""
        v = self._version(fact_id) if version is None else version
        return self.edits_dir / (f"{fact_id:08d}.safetensors" if v == 0 else f"{fact_id:08d}.v{v}.safetensors")

    def load_edit(self, fact_id: int, device: Where[int] = "cpu") -> FactEdit:
        """A fact's stored edit, on `device` (or each layer's part on `device(layer)`)."""
        from safetensors.torch import load_file

        from sleepwake.memit.editor import FactEdit

        path = self.edit_path(fact_id)
        try:
            return FactEdit.from_tensors(load_file(str(path)), device)
        except (OSError, ValueError, Exception) as exc:  # safetensors raises its own error type
            raise StoreError(f"edit file {path} for fact {fact_id} is missing or corrupt: {exc}") from exc

    # --- writing --------------------------------------------------------------

    def _rewrite(self, db: sqlite3.Connection, rewritten: dict[int, FactEdit]) -> list[Path]:
        """Inside a transaction: give facts new edit versions; returns the files they leave."""
        old = []
        for fid, edit in rewritten.items():
            v = self._version(fid)
            _atomic_save(edit.tensors(), self.edit_path(fid, v + 1), {"fact_id": str(fid)})
            db.execute("UPDATE facts SET edit_version=? WHERE id=?", (v + 1, fid))
            old.append(self.edit_path(fid, v))
        return old

    def rewrite_edits(self, rewritten: dict[int, FactEdit]) -> None:
        """Give active facts new edits (new versions), in one transaction."""
        with self._tx() as db:
            stale = self._rewrite(db, rewritten)
        for path in stale:
            path.unlink(missing_ok=True)

    def commit_injection(
        self,
        facts: Sequence[Fact],
        edits: Sequence[FactEdit],
        replaces: Sequence[int | None],
        rewritten: dict[int, FactEdit] | None = None,
    ) -> list[FactRecord]:
        """Record facts with their edits; `replaces[i]` is the id fact i supersedes;
        `rewritten` holds new edits of active facts edited again with them."""
        now = time.time()
        with self._tx() as db:
            stale = self._rewrite(db, rewritten or {})
            ids = []
            for fact, edit in zip(facts, edits):
                cur = db.execute(
                    "INSERT INTO facts(subject, relation, object, question, status, created_at, layers) "
                    "VALUES (?, ?, ?, ?, 'active', ?, ?)",
                    (fact.subject, fact.relation, fact.object, fact.question, now,
                     ",".join(str(l) for l in sorted(edit.a))),
                )
                fid = int(cur.lastrowid)
                ids.append(fid)
                _atomic_save(edit.tensors(), self.edit_path(fid), {"fact_id": str(fid)})
            for fid, old in zip(ids, replaces):
                if old is not None and self.get(old).where == "consolidated":
                    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('rebuild_pending', '1')")
                if old is not None:
                    db.execute(
                        "UPDATE facts SET status='replaced', ended_at=?, replaced_by=? WHERE id=? AND status='active'",
                        (now, fid, old),
                    )
        stale += [self.edit_path(old) for old in replaces if old is not None]
        for path in stale:
            path.unlink(missing_ok=True)
        return [self.get(i) for i in ids]

    def forget(self, fact_id: int, rewritten: dict[int, FactEdit] | None = None,
               to_memit: Sequence[int] = ()) -> FactRecord:
        """Mark a fact forgotten and delete its edit; `rewritten` as in `commit_injection`;
        `to_memit`: consolidated facts that go back to MEMIT (with their `rewritten` edits)."""
        rec = self.get(fact_id)
        if rec.status != "active":
            raise UnknownFactError(f"fact {fact_id} is not active (it was {rec.status})")
        gone = self.edit_path(fact_id)
        with self._tx() as db:
            stale = self._rewrite(db, rewritten or {})
            db.execute("UPDATE facts SET status='forgotten', ended_at=? WHERE id=?", (time.time(), fact_id))
            db.executemany("UPDATE facts SET location='memit', cycle=NULL WHERE id=?", [(i,) for i in to_memit])
            db.execute("DELETE FROM pairs WHERE fact_id=?", (fact_id,))
            if rec.where == "consolidated":  # an adapter still holds it: the next sleep rebuilds them
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('rebuild_pending', '1')")
        for path in [gone, *stale]:  # "delete" deletes: no weights of it remain
            path.unlink(missing_ok=True)
        return self.get(fact_id)

    # --- sleep cycles -----------------------------------------------------------

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def begin_cycle(self, kind: str) -> int:
        """A row for a sleep that starts now; it stays 'running' if the process dies."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO cycles(kind, status, started_at) VALUES (?, 'running', ?)", (kind, time.time()))
        return int(cur.lastrowid)

    def mark_interrupted(self) -> list[int]:
        """Cycles left 'running' by a process that died; their unfinished adapters are removed.

        Only the claim that took the home's lock for this process may do it: then no other
        live process writes here, and nothing in this one has started a sleep yet. Any
        other caller (read-only, or a second `Memory` in the process) changes nothing."""
        if self.lock is None or not self.lock.first:
            return []
        ids = [r[0] for r in self.db.execute("SELECT id FROM cycles WHERE status='running'")]
        if ids:
            with self._tx() as db:
                db.executemany("UPDATE cycles SET status='interrupted', ended_at=? WHERE id=?",
                               [(time.time(), i) for i in ids])
            for i in ids:
                shutil.rmtree(self.adapter_path(i), ignore_errors=True)
                self.keyed_path(i).unlink(missing_ok=True)
        return ids

    def adapter_path(self, cycle: int) -> Path:
        return self.adapters_dir / f"cycle-{cycle:06d}"

    def keyed_path(self, cycle: int) -> Path:
        """The keyed table a cycle writes (`sleepwake.keyed`): one file, the whole table."""
        return self.home / "keyed" / f"cycle-{cycle:06d}.safetensors"

    def consolidating_cycles(self) -> list[tuple[int, Path]]:
        """(cycle, adapter or keyed table) of every cycle that wrote one, accepted or not."""
        rows = self.db.execute("SELECT id, adapter FROM cycles WHERE adapter IS NOT NULL ORDER BY id").fetchall()
        return [(i, self.home / a) for i, a in rows]

    def active_adapters(self) -> list[tuple[int, Path]]:
        """(cycle, PEFT directory) of the adapters that make up the consolidated memory, in order."""
        rows = self.db.execute(
            "SELECT id, adapter FROM cycles WHERE status='accepted' AND adapter IS NOT NULL "
            "AND superseded_by IS NULL ORDER BY id"
        ).fetchall()
        return [(i, self.home / a) for i, a in rows]

    def end_cycle(
        self,
        cycle: int,
        status: str,
        report: dict,
        *,
        adapter: bool = False,
        consolidated: Sequence[int] = (),
        pairs: Sequence[Pair] = (),
        replayed: Sequence[int] = (),
        curated: Sequence[int] = (),
        rewritten: dict[int, FactEdit] | None = None,
        decay: float = 1.0,
        supersede: bool = False,
        erase_superseded: bool = False,
        keyed: bool = False,
    ) -> None:
        """Close a cycle in one transaction: its adapter joins the consolidated memory
        (replacing all earlier ones when `supersede`), `consolidated` facts move there,
        its training `pairs` are kept for replay, `replayed` pairs lose priority,
        `curated` exchanges (user message ids) are marked as seen by curation, and
        `rewritten` facts (kept in MEMIT, edited again on top of the adapter) get new
        edit versions; their old ones stay on disk for `rollback`.
        `erase_superseded` deletes the replaced adapters' files after the commit: they
        hold facts that were forgotten, and "forget" must not leave them on disk.
        A `keyed` cycle wrote a whole keyed table (`keyed_path`), which replaces the
        earlier tables, and only them: LoRA adapters of earlier versions stay."""
        def replaced(path: Path) -> bool:
            return path.suffix == ".safetensors" if keyed else True

        gone = [p for _, p in self.active_adapters() if replaced(p)] if (supersede or keyed) and erase_superseded else []
        with self._tx() as db:
            if status == "accepted" and rewritten:
                versions = {fid: self._version(fid) for fid in rewritten}
                self._rewrite(db, rewritten)
                report = {**report, "rewritten": {str(f): [v, v + 1] for f, v in versions.items()}}
            db.execute(
                "UPDATE cycles SET status=?, ended_at=?, adapter=?, report=? WHERE id=?",
                (status, time.time(),
                 str((self.keyed_path(cycle) if keyed else self.adapter_path(cycle)).relative_to(self.home))
                 if adapter else None,
                 json.dumps(report), cycle),
            )
            if status != "accepted":
                return
            if keyed:
                self._supersede_keyed(db, cycle)
                lora = db.execute("SELECT 1 FROM cycles WHERE status='accepted' AND adapter NOT LIKE 'keyed/%' "
                                  "AND superseded_by IS NULL").fetchone()
                if lora is None:  # the new table holds no forgotten fact, and no adapter is left that does
                    db.execute("DELETE FROM meta WHERE key='rebuild_pending'")
            if supersede:
                db.execute("UPDATE cycles SET superseded_by=? WHERE status='accepted' AND adapter IS NOT NULL "
                           "AND superseded_by IS NULL AND id<>?", (cycle, cycle))
                db.execute("DELETE FROM meta WHERE key='rebuild_pending'")
            db.executemany("UPDATE facts SET location='consolidated', cycle=? WHERE id=? AND status='active'",
                           [(cycle, i) for i in consolidated])
            db.executemany(
                "INSERT INTO pairs(fact_id, cycle, prompt, answer, chat, source) VALUES (?, ?, ?, ?, ?, ?)",
                [(p.fact_id, cycle, p.prompt, p.answer, int(p.chat), p.source) for p in pairs],
            )
            db.executemany("UPDATE pairs SET priority=priority*?, replays=replays+1 WHERE id=?",
                           [(decay, i) for i in replayed])
            db.executemany("UPDATE messages SET curated=? WHERE id=?", [(cycle, i) for i in curated])
        for path in gone:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def prune_tables(self, keep: int) -> list[Path]:
        """Delete the keyed tables no `rollback` within the last `keep` keyed sleeps needs:
        superseded tables but the newest `keep`, and those of rolled-back cycles. Each
        keyed sleep writes a whole table, so without this the home grew with the square of
        its naps (a 1,300-fact run: 75 tables, 3.0 GB). Returns the files deleted."""
        rows = self.db.execute(
            "SELECT adapter, status FROM cycles WHERE adapter LIKE 'keyed/%' AND (status='rolled back' OR "
            "(status='accepted' AND superseded_by IS NOT NULL)) ORDER BY coalesce(superseded_by, id) DESC, id DESC"
        ).fetchall()
        superseded = [a for a, status in rows if status == "accepted"]
        gone = [self.home / a for a in superseded[keep:]] + [self.home / a for a, status in rows if status != "accepted"]
        gone = [p for p in gone if p.exists()]
        for path in gone:
            path.unlink(missing_ok=True)
        return gone

    @staticmethod
    def _supersede_keyed(db: sqlite3.Connection, cycle: int) -> None:
        """Inside a transaction: `cycle`'s keyed table replaces the earlier ones."""
        db.execute("UPDATE cycles SET superseded_by=? WHERE status='accepted' AND adapter LIKE 'keyed/%' "
                   "AND superseded_by IS NULL AND id<>?", (cycle, cycle))

    def commit_reconsolidation(self, cycle: int, facts: Sequence[Fact], replaces: Sequence[int | None],
                               report: dict, save_table: Callable[[list[int]], None]) -> list[FactRecord]:
        """Close a reconsolidation (`sleepwake.reconsolidate`) in one transaction: `facts`
        are recorded as held by `cycle`'s keyed table, which `save_table(their ids)`
        writes inside it, and replaces the earlier tables; `replaces[i]` is the id fact i
        supersedes. The table replaced is deleted after the commit if a reconsolidation
        wrote it (one is written per telling; a sleep's tables are kept for `rollback`)
        or a forgotten fact is pending (the new table keeps the entry that holds it, off,
        until the next sleep rebuilds it; that sleep erases the tables it replaces)."""
        now = time.time()
        prev = self.active_adapters()
        forgetting = self.meta("rebuild_pending") == "1"
        with self._tx() as db:
            ids = [int(db.execute(
                "INSERT INTO facts(subject, relation, object, question, status, created_at, location, cycle) "
                "VALUES (?, ?, ?, ?, 'active', ?, 'consolidated', ?)",
                (f.subject, f.relation, f.object, f.question, now, cycle)).lastrowid) for f in facts]
            stale = []
            for fid, old in zip(ids, replaces):
                if old is not None:
                    stale.append(self.edit_path(old))
                    db.execute("UPDATE facts SET status='replaced', ended_at=?, replaced_by=? "
                               "WHERE id=? AND status='active'", (now, fid, old))
            save_table(ids)
            db.execute("UPDATE cycles SET status='accepted', ended_at=?, adapter=?, report=? WHERE id=?",
                       (now, str(self.keyed_path(cycle).relative_to(self.home)),
                        json.dumps({**report, "consolidated": ids}), cycle))
            self._supersede_keyed(db, cycle)
        for i, path in prev:
            row = self.db.execute("SELECT kind FROM cycles WHERE id=?", (i,)).fetchone()
            if path.suffix == ".safetensors" and (forgetting or row is not None and row[0] == "reconsolidate"):
                stale.append(path)
        for path in stale:
            path.unlink(missing_ok=True)
        return [self.get(i) for i in ids]

    def rollback(self, cycle: int) -> list[int]:
        """Undo `cycle` and every accepted cycle after it, in one transaction: their
        adapters leave the consolidated memory (the ones they superseded come back) and
        the facts they consolidated return to their MEMIT edits, which were kept.
        Returns the cycles undone."""
        row = self.db.execute("SELECT status FROM cycles WHERE id=?", (cycle,)).fetchone()
        if row is None:
            raise UnknownCycleError(f"no sleep cycle with id {cycle}")
        if row[0] != "accepted":
            raise UnknownCycleError(f"cycle {cycle} was {row[0]}: only accepted cycles changed anything to undo")
        back = self.db.execute("SELECT adapter FROM cycles WHERE superseded_by>=? AND status='accepted'", (cycle,))
        missing = [a for (a,) in back if a and not (self.home / a).exists()]
        if missing:
            raise UnknownCycleError(
                f"cannot roll back to before cycle {cycle}: the consolidated memory it would bring back was deleted "
                f"({', '.join(missing)}), because a later sleep forgot facts it held, or because it is older than "
                f"the keyed tables a home keeps (MemoryConfig.keep_tables)")
        with self._tx() as db:
            undone = [r[0] for r in db.execute("SELECT id FROM cycles WHERE id>=? AND status='accepted'", (cycle,))]
            dropped = []  # kept facts' edits written on top of an adapter that leaves: back to the old ones
            for (report,) in db.execute("SELECT report FROM cycles WHERE id>=? AND status='accepted' ORDER BY id DESC",
                                        (cycle,)).fetchall():
                for fid, (old, new) in json.loads(report).get("rewritten", {}).items():
                    if self._version(int(fid)) == new and self.edit_path(int(fid), old).exists():
                        db.execute("UPDATE facts SET edit_version=? WHERE id=?", (old, int(fid)))
                        dropped.append(self.edit_path(int(fid), new))
            db.execute("UPDATE cycles SET status='rolled back', ended_at=coalesce(ended_at, ?) "
                       "WHERE id>=? AND status='accepted'", (time.time(), cycle))
            db.execute("UPDATE cycles SET superseded_by=NULL WHERE superseded_by>=?", (cycle,))
            db.execute("UPDATE facts SET location='memit', cycle=NULL WHERE cycle>=?", (cycle,))
            # A fact that left while consolidated in an adapter that is back: the next sleep rebuilds.
            stale = db.execute(
                "SELECT 1 FROM facts f JOIN cycles c ON c.id=f.cycle WHERE f.status<>'active' "
                "AND f.location='consolidated' AND c.status='accepted' AND c.superseded_by IS NULL").fetchone()
            if stale:
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('rebuild_pending', '1')")
            else:
                db.execute("DELETE FROM meta WHERE key='rebuild_pending'")
        for path in dropped:
            path.unlink(missing_ok=True)
        return undone

    def cycles(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT id, kind, status, started_at, ended_at, adapter, superseded_by, report FROM cycles ORDER BY id"
        ).fetchall()
        keys = ("id", "kind", "status", "started_at", "ended_at", "adapter", "superseded_by")
        return [{**dict(zip(keys, r[:-1])), "report": json.loads(r[-1])} for r in rows]

    def replay_pairs(self, n: int) -> list[tuple[int, Pair]]:
        """The `n` highest-priority stored pairs of facts still held (or of no fact)."""
        if n <= 0:
            return []
        rows = self.db.execute(
            "SELECT p.id, p.fact_id, p.prompt, p.answer, p.chat, p.source FROM pairs p "
            "LEFT JOIN facts f ON f.id = p.fact_id "
            "WHERE p.fact_id IS NULL OR f.status='active' ORDER BY p.priority DESC, p.id LIMIT ?", (n,)
        ).fetchall()
        from sleepwake.sleep.data import Pair

        return [(i, Pair(pr, a, bool(c), fid, src)) for i, fid, pr, a, c, src in rows]

    # --- conversations ------------------------------------------------------------

    def new_conversation(self, source: str = "chat") -> int:
        with self._tx() as db:
            cur = db.execute("INSERT INTO conversations(started_at, source) VALUES (?, ?)", (time.time(), source))
        return int(cur.lastrowid)

    def has_conversation(self, conversation: int) -> bool:
        return self.db.execute("SELECT 1 FROM conversations WHERE id=?", (conversation,)).fetchone() is not None

    def add_message(self, conversation: int, role: str, content: str, facts: Sequence[Fact] = (),
                    learned: bool = True) -> int:
        """One message of a conversation; `facts` were extracted from it, and are
        `learned` once injected (a message told during a sleep waits for its end)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO messages(conversation, role, content, created_at, facts, learned) VALUES (?, ?, ?, ?, ?, ?)",
                (conversation, role, content, time.time(), json.dumps([f.to_dict() for f in facts]), int(learned)),
            )
        return int(cur.lastrowid)

    def mark_learned(self, message_ids: Sequence[int]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE messages SET learned=1 WHERE id=?", [(i,) for i in message_ids])

    def unlearned(self) -> list[tuple[int, list[Fact]]]:
        """Messages whose facts were not injected yet (told during a sleep that then ended or died)."""
        rows = self.db.execute("SELECT id, facts FROM messages WHERE learned=0 ORDER BY id").fetchall()
        return [(i, [Fact.from_dict(d) for d in json.loads(f)]) for i, f in rows]

    def messages(self, conversation: int) -> list[dict]:
        rows = self.db.execute(
            "SELECT id, role, content, created_at, facts, learned FROM messages WHERE conversation=? ORDER BY id",
            (conversation,)).fetchall()
        return [{"id": i, "role": r, "content": c, "created_at": t, "facts": json.loads(f), "learned": bool(ln)}
                for i, r, c, t, f, ln in rows]

    def exchanges(self) -> list[Exchange]:
        """User messages with the assistant's reply that follows each, not yet curated by a deep sleep."""
        rows = self.db.execute(
            "SELECT u.id, u.content, a.content, u.facts FROM messages u JOIN messages a "
            "ON a.conversation = u.conversation AND a.role = 'assistant' AND a.id = ("
            "  SELECT min(id) FROM messages WHERE conversation = u.conversation AND id > u.id) "
            "WHERE u.role = 'user' AND u.curated IS NULL ORDER BY u.id").fetchall()
        return [Exchange(i, user, reply, len(json.loads(f))) for i, user, reply, f in rows]

    def curated_before(self, limit: int = 500) -> list[str]:
        """The user's words in exchanges that earlier deep sleeps curated, newest first."""
        rows = self.db.execute("SELECT content FROM messages WHERE role='user' AND curated IS NOT NULL "
                               "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in rows]
