"""The handlers of the `sleepwake` commands: each takes a `Context` and returns the exit code."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from sleepwake.cli.context import Context, UsageError
from sleepwake.cli.output import dump_json, fact_text, fmt_float, marks, short, table
from sleepwake.errors import InvalidFactError, UnknownFactError
from sleepwake.facts import Fact, load_jsonl


def _parse_fact_args(texts: Sequence[str]) -> list[Fact]:
    facts = []
    for i, text in enumerate(texts, start=1):
        try:
            facts.append(Fact.parse(text))
        except InvalidFactError as exc:
            where = f"fact #{i}" if len(texts) > 1 else "fact"
            raise InvalidFactError(f"{where} {short(text)!r}: {exc}") from None
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
        dump_json({
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
        dump_json([r.to_dict() for r in records], ctx.out)
        return 0
    if not records:
        if not ctx.quiet:
            ctx.say(f"no facts in {ctx.home}")
        return 0
    header = ["ID", "SUBJECT", "RELATION", "OBJECT", "WHERE"] + (["STATUS"] if args.all else [])
    rows = [[str(r.id), short(r.fact.subject, 48), short(r.fact.relation, 40), short(r.fact.object, 48), r.where]
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
        dump_json(rec.to_dict(), ctx.out)
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
        dump_json({what: text_in, key_out: text}, ctx.out)
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
        dump_json(report.to_dict(), ctx.out)
        return 0
    ok, bad = marks(ctx.out)
    n = report.n
    raw_n = sum(r.raw_ok for r in report.facts)
    chat_n = sum(r.chat_ok for r in report.facts)
    for line in table([
        ["facts", str(n)],
        ["raw recall", f"{report.raw_recall:.1%}  ({raw_n}/{n})"],
        ["chat recall", f"{report.chat_recall:.1%}  ({chat_n}/{n})"],
        ["perplexity", fmt_float(report.ppl)],
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
                         short(r.raw_completion, 40), short(r.chat_answer, 50)])
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
        lines.append(f"  chat recall without MEMIT {fmt_float(rep.get('chat_recall'))}, raw "
                     f"{fmt_float(rep.get('raw_recall'))}; perplexity {fmt_float(rep.get('ppl_before'), 3)} → "
                     f"{fmt_float(rep.get('ppl_after'), 3)}; {rep.get('seconds', 0):.1f} s")
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
        dump_json(rep, ctx.out)
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
        dump_json(st, ctx.out)
        return 0
    p = st["pressure"]
    ctx.say(f"facts: {st['facts']['memit']} in MEMIT edits, {st['facts']['consolidated']} consolidated "
            f"({st['adapters']} adapter{'s' if st['adapters'] != 1 else ''})")
    ctx.say(f"sleep pressure {p['total']:.3f} = edits {p['edits']:.3f} + time {p['time']:.3f} + perplexity "
            f"{p['perplexity']:.3f}; due: {p['due'] or 'nothing'}")
    if st.get("sleeping"):
        ctx.say(f"a {st['sleeping']['kind']} is running (since {time.strftime('%H:%M:%S', time.localtime(st['sleeping']['since']))})")
    ctx.say(f"perplexity {fmt_float(st['perplexity'], 3)} (base {fmt_float(st['base_perplexity'], 3)}); "
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
        dump_json(cycles, ctx.out)
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
        dump_json({"rolled_back": undone, "facts": facts}, ctx.out)
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
    from sleepwake.server.guard import is_loopback, read_keys

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
