"""The `sleepwake` command line.

    sleepwake inject "Anselm Kreutzer | lives in | Lisbon"
    sleepwake inject --facts facts.jsonl
    sleepwake facts [--json]
    sleepwake forget ID
    sleepwake complete "Anselm Kreutzer lives in"
    sleepwake ask "Where does Anselm Kreutzer live?"
    sleepwake eval --facts facts.jsonl [--json]
    sleepwake chat
    sleepwake serve [--host H] [--port P] [--token T]

Design rules:

- `--help`, `--version` and every mistake that can be found without the model
  (a malformed fact, a bad JSONL line, a missing file, a bad option) answer at
  once: torch, transformers and `Memory` are imported inside the handlers, after
  the arguments have been checked.
- stdout carries only results (machine-readable with `--json`); progress bars,
  status lines and anything a library prints go to stderr.
- Errors are one line, ``sleepwake: error: <message>``, on stderr: exit code 2 for
  usage errors, 1 for everything else a user can act on, 130 on Ctrl-C. Set
  ``SLEEPWAKE_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import math
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from sleepwake import __version__
from sleepwake.errors import (
    HomeBusyError,
    InvalidFactError,
    SleepwakeError,
    StoreError,
    UnknownFactError,
)
from sleepwake.facts import Fact, load_jsonl
from sleepwake.jsonsafe import json_safe
from sleepwake.store import ID_MAX

PROG = "sleepwake"
MAX_NEW_TOKENS = 2048


class UsageError(Exception):
    """A malformed command line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = f" (see '{self.prog} --help')"
        raise UsageError(message + hint)


# --- small helpers --------------------------------------------------------------


def _int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (no upper bound if None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


_positive_int = _int_between(1, MAX_NEW_TOKENS)
_count = _int_between(0)


def _whole_number(what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a {what} id is a whole number, got {_short(text, 40)!r}") from None
        if not 1 <= value <= ID_MAX:
            raise argparse.ArgumentTypeError(f"a {what} id is a whole number from 1 to {ID_MAX}, "
                                             f"got {_short(text, 40)}")
        return value

    return parse


_fact_id = _whole_number("fact")


def _user_name(text: str) -> str:
    from sleepwake.errors import InvalidUserError
    from sleepwake.users import check_user

    try:
        return check_user(text)
    except InvalidUserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _short(text: str, limit: int = 60) -> str:
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


def _is_utf(stream: TextIO) -> bool:
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name.startswith("utf")
    except LookupError:
        return False


def _marks(stream: TextIO) -> tuple[str, str]:
    """✓/✗ where the output can show them, else plain ASCII."""
    return ("✓", "✗") if _is_utf(stream) else ("+", "-")


def _dump_json(obj: Any, out: TextIO) -> None:
    # Non-ASCII as is on a UTF-8 stream; escaped (still valid JSON) on any other.
    out.write(json.dumps(json_safe(obj), ensure_ascii=not _is_utf(out), indent=2) + "\n")


def _fmt_float(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


# --- context shared by the handlers -----------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.quiet: bool = bool(args.quiet)
        # Progress bars only where a person is watching.
        self.progress = not self.quiet and err.isatty()

    @property
    def home(self) -> Path:
        """The --user's memory: the home itself for the default user, else home/users/NAME."""
        from sleepwake.users import user_home

        return user_home(self.root, getattr(self.args, "user", None))

    @property
    def root(self) -> Path:
        """The memory home (--home): every user's, under one lock."""
        if self.args.home:
            home = Path(self.args.home).expanduser()
        else:
            from sleepwake.config import default_home

            home = default_home()
        if home.exists() and not home.is_dir():
            raise StoreError(f"memory home {home} exists and is not a directory; give --home a directory")
        return home

    def remote(self) -> Any:
        """The running server that holds this home, as a `Remote`, or None when no other
        process holds it. Held by another process that serves no API: `HomeBusyError`."""
        from sleepwake.homelock import holder

        held = holder(self.root)
        if held is None or held.pid == os.getpid():
            return None
        if not held.url:
            raise HomeBusyError(f"memory home {self.root} is in use by {held.describe()}; wait for it to end "
                                "or stop it, then try again", held)
        from sleepwake.remote import Remote

        return Remote(held, user=getattr(self.args, "user", None))

    def _check_free(self) -> None:
        """Before the model loads (seconds): the home must not be another live process's."""
        from sleepwake.homelock import holder

        held = holder(self.root)
        if held is not None and held.pid != os.getpid():
            hint = ("; 'inject', 'forget', 'nap', 'sleep' and 'status' work through it, other commands "
                    "need it stopped" if held.url else "; wait for it to end or stop it, then try again")
            raise HomeBusyError(f"memory home {self.root} is in use by {held.describe()}{hint}", held)

    def say(self, text: str) -> None:
        """A result line on stdout."""
        print(text, file=self.out)

    def status(self, text: str) -> None:
        """A status line on stderr (not with --quiet)."""
        if not self.quiet:
            print(text, file=self.err, flush=True)

    def _quiet_libraries(self) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        if not self.progress and "tqdm" not in sys.modules:
            # transformers' GGUF conversion bar ignores its own progress switch;
            # tqdm reads TQDM_* defaults when it is first imported.
            os.environ.setdefault("TQDM_DISABLE", "1")
        if self.quiet:
            import warnings

            warnings.filterwarnings("ignore")

    def memory(self) -> Any:
        """Load the model and the memory home (the slow part: seconds)."""
        self._quiet_libraries()
        from sleepwake.sources import resolve_model

        resolve_model(self.args.model)  # a wrong --model fails here, before torch is imported
        backend = self.backend()
        device_map = self.device_map() if backend == "torch" else None
        device = self.device() if backend == "torch" and device_map is None else None
        quantize = self.quantize()
        self._check_free()
        self.status(f"sleepwake: loading {self.args.model or 'the default model'} (memory: {self.home}) …")
        from dataclasses import replace

        from sleepwake.config import MemoryConfig
        from sleepwake.memory import Memory

        config = MemoryConfig().with_memit(chat_edit=False) if self.args.raw_only else None
        if config is None and self.args.chat_edit_limit is not None:
            config = MemoryConfig().with_memit(chat_edit_max_facts=self.args.chat_edit_limit)
        if getattr(self.args, "consolidation", None):
            config = replace(config or MemoryConfig(), consolidation=self.args.consolidation)
        return Memory(self.args.model, home=self.root, config=config, device=device, progress=self.progress,
                      user=getattr(self.args, "user", None), quantize=quantize, backend=backend,
                      device_map=device_map)

    def backend(self) -> str:
        """--backend, importable here, without another backend's options; else a usage error,
        before anything loads."""
        from sleepwake.backends import check_backend
        from sleepwake.errors import InvalidRequestError

        try:
            backend = check_backend(getattr(self.args, "backend", None))
        except InvalidRequestError as exc:
            raise UsageError(f"--backend {self.args.backend}: {exc}") from None
        if backend == "mlx":
            for option in ("quantize", "device", "device_map"):
                value = getattr(self.args, option, None)
                if value is not None and (value != "auto" or option == "device_map"):
                    raise UsageError(f"--{option.replace('_', '-')} is for the torch backend; --backend mlx loads "
                                     "float32 on MLX's own device (Metal, or the CPU)")
        return backend

    def device(self) -> Any:
        """--device as a torch device; CUDA without a GPU is a usage error, before anything loads."""
        from sleepwake.errors import InvalidRequestError
        from sleepwake.models import resolve_device

        try:
            return resolve_device(self.args.device or "auto")
        except InvalidRequestError as exc:
            raise UsageError(f"--device {self.args.device}: {exc}") from None

    def device_map(self) -> Any:
        """--device-map as `from_pretrained` takes it (a strategy, or a JSON object of module
        names to devices), not with a --device other than auto; else a usage error, before
        anything loads."""
        from sleepwake.errors import InvalidRequestError
        from sleepwake.placement import check_device_map

        value = getattr(self.args, "device_map", None)
        if value is None:
            return None
        if self.args.device not in (None, "auto"):
            raise UsageError(f"--device {self.args.device} and --device-map {value}: give one of them "
                             "(a device map places every part of the model)")
        try:
            return check_device_map(json.loads(value) if value.lstrip().startswith("{") else value)
        except (InvalidRequestError, ValueError) as exc:
            raise UsageError(f"--device-map {value}: {exc}") from None

    def quantize(self) -> str | None:
        """--quantize, with bitsandbytes importable; else a usage error, before anything loads."""
        from sleepwake.errors import InvalidRequestError
        from sleepwake.quantize import check_scheme

        try:
            return check_scheme(self.args.quantize)
        except InvalidRequestError as exc:
            raise UsageError(f"--quantize {self.args.quantize}: {exc}") from None

    def store(self) -> Any:
        """The memory ledger alone, read-only, without loading the model's weights (fast):
        it changes nothing, and works beside a process that holds the home.

        The model is still resolved and fingerprinted, so a wrong --model or a home
        that belongs to another model is reported as it would be by `memory()`.
        """
        self._quiet_libraries()
        from sleepwake.sources import fingerprint, resolve_model
        from sleepwake.store import Store

        source = resolve_model(self.args.model)
        return Store(self.home, fingerprint(source, self.args.quantize), source.name, read_only=True)


# --- commands ----------------------------------------------------------------------


def _parse_fact_args(texts: Sequence[str]) -> list[Fact]:
    facts = []
    for i, text in enumerate(texts, start=1):
        try:
            facts.append(Fact.parse(text))
        except InvalidFactError as exc:
            where = f"fact #{i}" if len(texts) > 1 else "fact"
            raise InvalidFactError(f"{where} {_short(text)!r}: {exc}") from None
    return facts


def _active_by_key(ctx: Context) -> dict[tuple[str, str], Any]:
    """The active facts of the ledger by (subject, relation), read without the model."""
    if not (ctx.home / "memory.sqlite").exists():
        return {}
    store = ctx.store()
    try:
        return {r.fact.key: r for r in store.facts()}
    finally:
        store.close()


def cmd_inject(ctx: Context) -> int:
    args = ctx.args
    facts = _parse_fact_args(args.facts)
    if args.facts_file:
        facts += load_jsonl(args.facts_file)
    if not facts:
        raise UsageError("nothing to inject: give facts as \"SUBJECT | RELATION | OBJECT\" "
                         "arguments or --facts FILE.jsonl (see 'sleepwake inject --help')")
    # Within one call the last fact for a (subject, relation) slot wins (Memory.inject).
    last_index = {f.key: i for i, f in enumerate(facts)}
    superseded = [f for i, f in enumerate(facts) if last_index[f.key] != i]

    latest = [f for i, f in enumerate(facts) if last_index[f.key] == i]
    before = _active_by_key(ctx)
    remote = ctx.remote()
    if remote is not None:  # a server holds the home: it writes the facts (and answers with them)
        ctx.status(f"sleepwake: writing through {remote.who} …")
        t0 = time.perf_counter()
        records, known = remote.inject(facts)
        seconds, stats, limit = time.perf_counter() - t0, [], None
    elif all(f.key in before and before[f.key].fact.object == f.object for f in latest):
        # Everything is known already (as `Memory.inject` would find): no model to load.
        records, known, seconds, stats, limit = [], latest, 0.0, [], None
    else:
        with ctx.memory() as mem:
            before = {r.fact.key: r for r in mem.facts()}
            t0 = time.perf_counter()
            result = mem.inject(facts)
            seconds = time.perf_counter() - t0
            limit = mem.config.memit.chat_edit_max_facts if mem.config.memit.chat_edit else None
        records, known, stats = result.records, result.skipped, result.stats
    # Past MemitConfig.chat_edit_max_facts, facts are edited for raw prompts only.
    raw_only = limit is not None and any(not st.chat for st in stats)
    again = sum(st.raw_only_again for st in stats)

    injected = [(rec, before.get(rec.fact.key)) for rec in records]
    skipped = [(f, before[f.key]) for f in known if f.key in before]

    if args.json:
        _dump_json({
            "injected": [{**rec.to_dict(), **({"replaces": old.id} if old else {})} for rec, old in injected],
            "skipped": [{**f.to_dict(), "id": old.id, "reason": "already known"} for f, old in skipped],
            "superseded": [f.to_dict() for f in superseded],
            "seconds": round(seconds, 3),
            "chat_edit": all(st.chat for st in stats),
            "raw_only_again": again,
        }, ctx.out)
        return 0

    rows = []
    for rec, old in injected:
        note = f"(replaces #{old.id}: {old.fact.object})" if old else ""
        rows.append(["injected", f"#{rec.id}", fact_text(rec.fact), note])
    for f, old in skipped:
        rows.append(["skipped", f"#{old.id}", fact_text(f), "(already known)"])
    for f in superseded:
        rows.append(["dropped", "", fact_text(f), "(a later fact in this call has the same subject and relation)"])
    for line in table(rows):
        ctx.say(line)
    if not ctx.quiet:
        n = len(records)
        ctx.say(f"{n} fact{'s' if n != 1 else ''} injected in {seconds:.1f} s")
    if raw_only:
        redone = f"; the {again} facts it held were written again that way" if again else ""
        ctx.status(f"note: MEMIT holds more than {limit} facts, so facts are now written for raw prompts only"
                   f"{redone}. Chat questions see them after a nap ('sleepwake nap').")
    return 0


def cmd_facts(ctx: Context) -> int:
    args = ctx.args
    ledger = ctx.home / "memory.sqlite"
    if not ledger.exists():
        # Nothing stored yet: answer without creating a home (but still check --model).
        from sleepwake.sources import resolve_model

        resolve_model(args.model)
        records = []
    else:
        store = ctx.store()
        try:
            records = store.facts(status=None if args.all else "active")
        finally:
            store.close()
    if args.json:
        _dump_json([r.to_dict() for r in records], ctx.out)
        return 0
    if not records:
        if not ctx.quiet:
            ctx.say(f"no facts in {ctx.home}")
        return 0
    header = ["ID", "SUBJECT", "RELATION", "OBJECT", "WHERE"] + (["STATUS"] if args.all else [])
    rows = [[str(r.id), _short(r.fact.subject, 48), _short(r.fact.relation, 40), _short(r.fact.object, 48), r.where]
            + ([r.status] if args.all else []) for r in records]
    for line in table(rows, header=None if ctx.quiet else header):
        ctx.say(line)
    return 0


def cmd_forget(ctx: Context) -> int:
    fact_id = ctx.args.id
    # Check the id against the ledger first, so a typo costs no model load.
    if not (ctx.home / "memory.sqlite").exists():
        raise UnknownFactError(f"no fact with id {fact_id} (no memory at {ctx.home} yet)")
    store = ctx.store()
    try:
        rec = store.get(fact_id)
    finally:
        store.close()
    if rec.status != "active":
        raise UnknownFactError(f"fact {fact_id} is not active (it was {rec.status})")
    remote = ctx.remote()
    if remote is not None:
        rec = remote.forget(fact_id)
    else:
        with ctx.memory() as mem:
            rec = mem.forget(fact_id)
    if ctx.args.json:
        _dump_json(rec.to_dict(), ctx.out)
    else:
        ctx.say(f"forgot #{rec.id}  {fact_text(rec.fact)}")
    return 0


def _check_prompt(text: str, what: str) -> str:
    if not text.strip():
        raise InvalidFactError(f"{what} is empty")
    return text


def _generate(ctx: Context, kind: str) -> int:
    """`complete` (raw pathway) and `ask` (chat pathway) differ only in the Memory call."""
    what, key_out = ("prompt", "completion") if kind == "complete" else ("question", "answer")
    text_in = _check_prompt(getattr(ctx.args, what), what)
    with ctx.memory() as mem:
        text = getattr(mem, kind)(text_in, max_new_tokens=ctx.args.max_new_tokens)
    if ctx.args.json:
        _dump_json({what: text_in, key_out: text}, ctx.out)
    else:
        ctx.say(text.strip())
    return 0


def cmd_complete(ctx: Context) -> int:
    return _generate(ctx, "complete")


def cmd_ask(ctx: Context) -> int:
    return _generate(ctx, "ask")


def cmd_eval(ctx: Context) -> int:
    facts = load_jsonl(ctx.args.facts_file)
    with ctx.memory() as mem:
        report = mem.evaluate(facts)
    if ctx.args.json:
        _dump_json(report.to_dict(), ctx.out)
        return 0
    ok, bad = _marks(ctx.out)
    n = report.n
    raw_n = sum(r.raw_ok for r in report.facts)
    chat_n = sum(r.chat_ok for r in report.facts)
    for line in table([
        ["facts", str(n)],
        ["raw recall", f"{report.raw_recall:.1%}  ({raw_n}/{n})"],
        ["chat recall", f"{report.chat_recall:.1%}  ({chat_n}/{n})"],
        ["perplexity", _fmt_float(report.ppl)],
    ]):
        ctx.say(line)
    ctx.say("")
    rows = []
    for r in report.facts:
        fact = f"{r.subject} | {r.relation} | {r.object}"
        if ctx.quiet:
            rows.append([ok if r.raw_ok else bad, ok if r.chat_ok else bad, fact])
        else:
            rows.append([ok if r.raw_ok else bad, ok if r.chat_ok else bad, fact,
                         _short(r.raw_completion, 40), _short(r.chat_answer, 50)])
    header = ["RAW", "CHAT", "FACT"] + ([] if ctx.quiet else ["COMPLETION", "CHAT ANSWER"])
    for line in table(rows, header=header):
        ctx.say(line)
    return 0


def _cycle_lines(rep: dict) -> list[str]:
    lines = [f"{rep['kind']} #{rep['id']}: {rep['status']}" + (f" ({rep['reason']})" if rep.get("reason") else "")]
    if rep["kind"] == "reconsolidate":  # no sleep: new facts written into held subjects' entries
        lines.append(f"  {len(rep.get('consolidated') or [])} new fact(s) written into the keyed entries of "
                     f"{rep.get('subjects', 0)} subject(s); {rep.get('seconds', 0):.1f} s")
    elif rep.get("consolidated") is not None and rep["id"] is not None:
        lines.append(f"  consolidated {len(rep['consolidated'])} fact(s); {len(rep.get('kept') or [])} kept in MEMIT"
                     + ("; consolidated memory rebuilt" if rep.get("rebuilt") else ""))
        lines.append(f"  chat recall without MEMIT {_fmt_float(rep.get('chat_recall'))}, raw "
                     f"{_fmt_float(rep.get('raw_recall'))}; perplexity {_fmt_float(rep.get('ppl_before'), 3)} → "
                     f"{_fmt_float(rep.get('ppl_after'), 3)}; {rep.get('seconds', 0):.1f} s")
        if rep.get("ppl_base") and rep.get("ppl_after") and rep.get("locality_after") is not None:
            lines.append(f"  against the base model: perplexity {rep['ppl_after'] / rep['ppl_base'] - 1:+.2%}, "
                         f"locality {rep['locality_after']:.3f}")
    return lines


def _sleep(ctx: Context, kind: str) -> int:
    what = "napping" if kind == "nap" else "deep sleep"
    remote = ctx.remote()
    if remote is not None:  # the server sleeps (in the background) and this command waits for it
        ctx.status(f"sleepwake: {what} in {remote.who} …")
        rep = remote.sleep(kind)
    else:
        with ctx.memory() as mem:
            ctx.status(f"sleepwake: {what} …")
            rep = (mem.nap() if kind == "nap" else mem.sleep(deep=True)).to_dict()
    if ctx.args.json:
        _dump_json(rep, ctx.out)
    else:
        for line in _cycle_lines(rep):
            ctx.say(line)
    return 0 if rep["status"] != "rejected" else 3


def cmd_nap(ctx: Context) -> int:
    return _sleep(ctx, "nap")


def cmd_sleep(ctx: Context) -> int:
    return _sleep(ctx, "nap" if ctx.args.light else "deep")


def cmd_status(ctx: Context) -> int:
    remote = ctx.remote()
    if remote is not None:
        st = remote.status()
    else:
        with ctx.memory() as mem:
            st = mem.status()
    if ctx.args.json:
        _dump_json(st, ctx.out)
        return 0
    p = st["pressure"]
    ctx.say(f"facts: {st['facts']['memit']} in MEMIT edits, {st['facts']['consolidated']} consolidated "
            f"({st['adapters']} adapter{'s' if st['adapters'] != 1 else ''})")
    ctx.say(f"sleep pressure {p['total']:.3f} = edits {p['edits']:.3f} + time {p['time']:.3f} + perplexity "
            f"{p['perplexity']:.3f}; due: {p['due'] or 'nothing'}")
    if st.get("sleeping"):
        ctx.say(f"a {st['sleeping']['kind']} is running (since {time.strftime('%H:%M:%S', time.localtime(st['sleeping']['since']))})")
    ctx.say(f"perplexity {_fmt_float(st['perplexity'], 3)} (base {_fmt_float(st['base_perplexity'], 3)}); "
            f"awake {st['awake_s']:.0f} s" + ("; a forgotten consolidated fact leaves at the next sleep"
                                               if st["rebuild_pending"] else ""))
    chat, limit = st["chat_edits"]["next"], st["chat_edits"]["limit"]
    if chat:
        ctx.say("new facts: edited for chat questions too" + (f", while MEMIT holds at most {limit}" if limit else ""))
    else:
        ctx.say("new facts: edited for raw prompts only" + (f" (MEMIT is past {limit} facts); chat questions see "
                                                            "them after a nap" if limit else " (chat edits are off)"))
    return 0


def cmd_history(ctx: Context) -> int:
    if not (ctx.home / "memory.sqlite").exists():
        cycles: list[dict] = []
    else:
        store = ctx.store()
        try:
            cycles = store.cycles()
        finally:
            store.close()
    if ctx.args.json:
        _dump_json(cycles, ctx.out)
        return 0
    if not cycles and not ctx.quiet:
        ctx.say(f"no sleep cycles in {ctx.home}")
    for c in cycles:
        rep = {**c["report"], "id": c["id"], "kind": c["kind"], "status": c["status"]}
        for line in _cycle_lines(rep):
            ctx.say(line)
    return 0


def cmd_rollback(ctx: Context) -> int:
    with ctx.memory() as mem:
        undone = mem.rollback(ctx.args.cycle)
        facts = mem.status(measure_perplexity=False)["facts"]
    if ctx.args.json:
        _dump_json({"rolled_back": undone, "facts": facts}, ctx.out)
    else:
        ctx.say(f"rolled back cycle{'s' if len(undone) != 1 else ''} {', '.join(f'#{i}' for i in undone)}; "
                f"{facts['memit']} fact(s) in MEMIT edits, {facts['consolidated']} consolidated")
    return 0


def cmd_chat(ctx: Context) -> int:
    from sleepwake.repl import ChatLoop
    from sleepwake.talk import Assistant

    mem = ctx.memory()
    bot = Assistant(mem, auto_sleep=not ctx.args.no_auto_sleep, max_new_tokens=ctx.args.max_new_tokens,
                    extractor=ctx.args.extractor, unknown=ctx.args.unknown)
    try:
        return ChatLoop(bot, sys.stdin, ctx.out, interactive=sys.stdin.isatty() and ctx.out.isatty(),
                        quiet=ctx.quiet).run()
    finally:
        bot.close()


def cmd_export(ctx: Context) -> int:
    with ctx.memory() as mem:
        path = mem.export_adapter(ctx.args.adapter, max_rank=ctx.args.max_rank)
    ctx.say(f"exported the learned memory as a PEFT LoRA adapter: {path}")
    return 0


def cmd_serve(ctx: Context) -> int:
    args = ctx.args
    from sleepwake.server.guard import is_loopback

    from sleepwake.server.guard import read_keys

    if getattr(args, "user", None) not in (None, "default"):
        raise UsageError("serve serves every user of the home: leave --user out (a request names its user, "
                         "or its API key does: --keys)")
    keys = None
    if args.keys is not None:
        if args.token:
            raise UsageError("give --token (one user) or --keys (a key per user), not both")
        try:
            keys = read_keys(args.keys)
        except ValueError as exc:
            raise UsageError(f"--keys {args.keys}: {exc}") from None
    token = None if keys else args.token or os.environ.get("SLEEPWAKE_TOKEN") or None
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if token is None and keys is None and not is_loopback(args.host):
        raise UsageError(f"refusing to serve on {args.host} without a token: anyone who can reach it could read "
                         "and change the memory. Give --token (or set SLEEPWAKE_TOKEN) or --keys, or serve on "
                         "127.0.0.1")
    from dataclasses import replace

    import uvicorn

    from sleepwake.server import create_app
    from sleepwake.talk import Assistant
    from sleepwake.users import Users

    mem = ctx.memory()
    if args.sleep_epochs:  # read by each sleep when it starts
        cfg = mem.config
        mem.config = replace(cfg, nap=replace(cfg.nap, epochs=args.sleep_epochs),
                             deep=replace(cfg.deep, epochs=args.sleep_epochs))
    bot = Assistant(mem, auto_sleep=not args.no_auto_sleep, max_new_tokens=args.max_new_tokens,
                    extractor=args.extractor, unknown=args.unknown)
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    # Other processes on this machine reach the memory here (`sleepwake inject` beside the server).
    near = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(args.host, args.host)
    mem.store.lock.set_url(f"http://{f'[{near}]' if ':' in near else near}:{args.port}")
    users = Users(bot, bot.for_user)
    auth = ", token required" if token else f", API keys of {len(set(keys.values()))} user(s)" if keys else ""
    ctx.status(f"sleepwake: serving {url}/ (OpenAI API: {url}/v1){auth}; Ctrl-C stops")
    try:
        uvicorn.run(create_app(users, token=token, keys=keys), host=args.host, port=args.port,
                    log_level="warning" if ctx.quiet else "info", timeout_graceful_shutdown=3)
    finally:
        if users.sleeping():
            ctx.status(f"sleepwake: waiting for the {users.sleeping()} to end (Ctrl-C stops it; the next start "
                       "restores the last good state)")
        users.close()
    return 0


# --- parser ------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--home", metavar="DIR", default=default,
                        help="memory home (default: $SLEEPWAKE_HOME or ~/.sleepwake)")
    parser.add_argument("--user", metavar="NAME", type=_user_name, default=default,
                        help="whose memory in the home (default: 'default', the home's own; another user's lives "
                             "in HOME/users/NAME): 1-64 letters, digits, '_', '.', '-'")
    parser.add_argument("--model", metavar="M", default=default,
                        help="base model: a .gguf file, a local Hugging Face directory, or a hub id in the "
                             "local cache (default: SmolLM2-135M-Instruct)")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="no progress bars or status lines; minimal output")
    parser.add_argument("--raw-only", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="edit facts written now for raw completions only, not chat questions: about "
                             "twice the capacity (BENCHMARKS.md); chat questions see them after a nap")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default,
                        help="where the model runs: auto (the default: a CUDA GPU if PyTorch sees one, else "
                             "the CPU), cpu or cuda")
    parser.add_argument("--device-map", metavar="MAP", default=default,
                        help="place the model over all visible GPUs with accelerate: auto (or balanced, "
                             "balanced_low_0, sequential, or a JSON object {module name: device}); each layer's "
                             "memory lives on its GPU. Instead of --device")
    parser.add_argument("--quantize", choices=["nf4"], default=default,
                        help="load the base model's linear layers in 4-bit NF4 (bitsandbytes; SmolLM2-135M's "
                             "tensors take a third of float32's); what it learns stays float32 beside them. "
                             "A home belongs to the model in the form it was made with")
    parser.add_argument("--backend", choices=["torch", "mlx"], default=default,
                        help="array library the model runs on: torch (the default) or mlx (Apple's MLX: Metal on "
                             "Apple silicon, the CPU through mlx-cpu on Linux; needs mlx and mlx-lm). A home "
                             "works with either; MLX runs every command and both sleeps")
    parser.add_argument("--consolidation", choices=["keyed", "lora"], default=default,
                        help="where sleep moves facts: keyed (the default: one entry per subject, read where "
                             "its key is) or lora (the paper's: a LoRA adapter trained with replay, on either "
                             "backend)")
    parser.add_argument("--chat-edit-limit", type=_count, metavar="N", default=default,
                        help="edit facts for chat questions too only while MEMIT holds at most N facts "
                             "(default 40); past it, every fact MEMIT holds is edited for raw prompts only")


def _assistant_options(p: argparse.ArgumentParser) -> None:
    """Options of the `Assistant` behind `chat` and `serve`."""
    p.add_argument("--extractor", choices=["rules", "model"], default="rules",
                   help="how facts are found in messages: rules (default), or the loaded model asked for "
                        "JSON triples (for capable models)")
    p.add_argument("--unknown", choices=["mask", "decline"], default="mask",
                   help="a question about a known person that nothing stored answers: answered by the "
                        "model without that person's edits (mask, the default), or declined with a short "
                        "'I don't know' (decline)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A language model with a memory in its weights: facts are written in by MEMIT edits.",
        epilog="Run 'sleepwake COMMAND --help' for a command's options.",
    )
    _global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # The global options are also accepted after the command ("sleepwake facts --home X").
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, handler: Callable[[Context], int], help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help, parents=[common])
        p.set_defaults(handler=handler)
        return p

    p = add("inject", cmd_inject, "write facts into the model's weights now",
            'Write facts into the weights (MEMIT). A fact with the subject and relation of a stored '
            'fact replaces it; a fact already known is skipped. Example: '
            'sleepwake inject "Anselm Kreutzer | lives in | Lisbon"')
    p.add_argument("facts", nargs="*", metavar="FACT", help='a fact written "SUBJECT | RELATION | OBJECT"')
    p.add_argument("--facts", dest="facts_file", metavar="FILE.jsonl",
                   help='facts file: one JSON object per line with "subject", "relation", "object" '
                        'and optionally "question"')
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add("facts", cmd_facts, "list the facts in memory")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--all", action="store_true", help="include forgotten and replaced facts")

    p = add("forget", cmd_forget, "remove a fact from the weights (see 'sleepwake facts' for ids)")
    p.add_argument("id", type=_fact_id, metavar="ID", help="fact id")
    p.add_argument("--json", action="store_true", help="print the forgotten fact as JSON")

    p = add("complete", cmd_complete, "greedy raw continuation of a prompt")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=None,
                   help="tokens to generate (default: 24)")
    p.add_argument("--json", action="store_true", help="print prompt and completion as JSON")

    p = add("ask", cmd_ask, "answer a question through the model's chat template")
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=None,
                   help="tokens to generate (default: 24)")
    p.add_argument("--json", action="store_true", help="print question and answer as JSON")

    p = add("eval", cmd_eval, "measure recall of a facts file (injected or not) and perplexity")
    p.add_argument("--facts", dest="facts_file", metavar="FILE.jsonl", required=True,
                   help="facts file, as for 'inject --facts'")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = add("nap", cmd_nap, "move the facts held by MEMIT edits into a LoRA adapter (exit 3 if rejected)")
    p.add_argument("--json", action="store_true", help="print the cycle report as JSON")
    p = add("sleep", cmd_sleep, "deep sleep: consolidate all memory into one adapter, with replay (exit 3 if rejected)")
    p.add_argument("--deep", action="store_true", help="deep sleep (the default)")
    p.add_argument("--light", action="store_true", help="a nap instead")
    p.add_argument("--json", action="store_true", help="print the cycle report as JSON")
    p = add("status", cmd_status, "sleep pressure and its parts; facts by where they live")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p = add("rollback", cmd_rollback, "return to the state before a sleep cycle (see 'sleepwake history')")
    p.add_argument("cycle", type=_whole_number("cycle"), metavar="CYCLE", help="cycle id")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = add("export", cmd_export, "write all learned memory as one PEFT LoRA adapter")
    p.add_argument("--adapter", metavar="DIR", required=True, help="directory to write (new, or an earlier export)")
    p.add_argument("--max-rank", type=_int_between(1), metavar="N",
                   help="cut each module's delta to rank N at most (truncated SVD, the largest singular values "
                        "kept): a smaller adapter that answers approximately")
    p = add("chat", cmd_chat, "chat with the model; it learns the facts you tell it (/help inside)",
            "An interactive chat. Facts stated in your messages are written into the weights at once; "
            "naps and deep sleeps run in the background when the sleep pressure calls for them (or on "
            "/nap, /sleep). Reads messages from standard input, so it can also be driven by a script.")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=96,
                   help="longest reply in tokens (default: 96)")
    p.add_argument("--no-auto-sleep", action="store_true", help="sleep only on /nap or /sleep")
    _assistant_options(p)
    p = add("serve", cmd_serve, "serve the chat (OpenAI-compatible), the memory API and a web page over HTTP",
            "An HTTP server: a web page at /, OpenAI's chat completions at /v1/chat/completions (it learns "
            "from the user's messages, as 'chat' does) and legacy completions at /v1/completions, the memory "
            "at /v1/memory/..., a health check at /health, the API's description at /openapi.json. It listens "
            "on 127.0.0.1 unless told otherwise; any other address needs a token, which every request but "
            "the page and /health must then send as 'Authorization: Bearer TOKEN'.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--token", metavar="T", help="require this bearer token (default: $SLEEPWAKE_TOKEN)")
    p.add_argument("--keys", metavar="FILE",
                   help='API keys per user: a JSON object {"KEY": "USER", ...} or lines "KEY USER"; a request '
                        "with a key reaches only its user's memory (instead of --token)")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=256,
                   help="longest reply in tokens; a request may ask for fewer (default: 256)")
    p.add_argument("--no-auto-sleep", action="store_true",
                   help="sleep only when asked to (POST /v1/memory/nap or /v1/memory/sleep)")
    p.add_argument("--sleep-epochs", type=_positive_int, metavar="N",
                   help="training epochs of each nap and deep sleep (default: the configuration's); "
                        "fewer is faster and may consolidate less")
    _assistant_options(p)
    p = add("history", cmd_history, "every nap and sleep with its measured results")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return parser


# --- entry point -------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        # A non-UTF-8 terminal shows "?" for what it cannot encode, rather than a traceback.
        if not _is_utf(stream) and hasattr(stream, "reconfigure"):
            with contextlib.suppress(Exception):
                stream.reconfigure(errors="replace")
    debug = bool(os.environ.get("SLEEPWAKE_DEBUG"))

    def fail(message: str, code: int) -> int:
        print(f"{PROG}: error: {message}", file=err, flush=True)
        return code

    try:
        try:
            args = build_parser().parse_args(list(argv) if argv is not None else None)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        ctx = Context(args, out, err)
        # Whatever a library prints goes to stderr; results go to `out`.
        with contextlib.redirect_stdout(err):
            code = args.handler(ctx)
        out.flush()
        return code
    except UsageError as exc:
        return fail(_one_line(exc), 2)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=err, flush=True)
        return 130
    except BrokenPipeError:
        # `sleepwake facts | head`: stop quietly.
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        return 141
    except (SleepwakeError, OSError) as exc:
        if debug:
            raise
        return fail(_one_line(exc), 1)


if __name__ == "__main__":
    sys.exit(main())
