"""A sleep that moves subjects from MEMIT into the keyed memory (`sleepwake.keyed`).

1. Solve: each subject with facts in MEMIT gets an entry: the δ its injection solved
   (v*, kept with its edit), where that δ was solved for raw prompts and chat questions
   of all the subject's facts at once; else (raw-only edits past the chat-edit limit,
   or a δ that fails validation in step 2) a δ found again on the consolidated model
   alone (base + the other subjects' entries, MEMIT off), for the raw prompt and the
   chat question of every fact of the subject: raw-only MEMIT edits become visible to
   chat questions here. The keys its prompts read on the consolidated model complete
   the entry. Entries made for facts that changed (a forget, and in a deep sleep any
   that no longer answers) are solved again too. A deep sleep also reads every other
   entry's keys again on the model as it is now ("keys that are still true").
2. Validate with MEMIT off: a subject whose facts are all answered (raw prompt and chat
   question, `evaluate.held`) leaves MEMIT; the others keep their MEMIT edits, edited
   again on the new state. In a deep sleep an entry that no longer answers is solved
   again; if that does not help either, the old one stays.
3. Judge: the cycle is rejected if it takes perplexity or locality past the budget
   against the base model (`BudgetConfig`) unless it improves on the state before, or
   raises perplexity more than the sleep allows.
4. Commit: the table file, then one ledger transaction; then the live model.

Nothing is trained, and mostly nothing is solved, so a nap takes seconds, and the
memory's size grows by one entry per subject.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from sleepwake.keyed import Entry, KeyedMemory
from sleepwake.policy import edit_group
from sleepwake.sleep.commit import commit, committed_locality, rewrite_kept
from sleepwake.sleep.report import CycleReport, over_budget

if TYPE_CHECKING:
    from sleepwake.memory import Memory
    from sleepwake.store import FactRecord


def _groups(mem: Memory, records: Sequence[FactRecord]) -> dict[str, list[FactRecord]]:
    out: dict[str, list[FactRecord]] = {}
    for r in records:
        out.setdefault(str(edit_group(r.fact, mem.config.memit)), []).append(r)
    return out


def _solve(mem: Memory, groups: dict[str, list[FactRecord]], desc: str, table: KeyedMemory,
           init: dict[str, torch.Tensor]) -> list[Entry]:
    """New entries for `groups`, a few subjects per batch: v* and keys on the consolidated
    model (`table` without these subjects' entries: a δ solved with the subject's old
    entry still read would be solved on top of it, and then replace it); v* starts at
    `init`'s δ where it has one (`_starts`)."""
    mem._rebuild([], mem._adapters, table.without(list(groups)))
    editor = mem.editor()
    entries, batch, n = [], [], 0
    names = list(groups)
    bar = tqdm(total=len(names), desc=desc, unit="subject", disable=not mem.progress or len(names) < 2, leave=False)
    for i, subject in enumerate(names):
        batch.append(subject)
        n += len(groups[subject])
        if n >= mem.config.batch_size or i == len(names) - 1:
            facts = [r.fact for s in batch for r in groups[s]]
            deltas, keys = editor.subject_deltas(facts, mem.config.keyed_clamp_norm_factor,
                                                 {x: init[x] for x in batch if x in init})
            for s in batch:
                entries.append(Entry(s, deltas[s], keys[s], tuple(sorted(r.id for r in groups[s]))))
            bar.update(len(batch))
            batch, n = [], 0
    bar.close()
    return entries


def _reuse(mem: Memory, groups: dict[str, list[FactRecord]]) -> tuple[list[Entry], dict[str, list[FactRecord]]]:
    """Entries made from the δ that injection already solved, keyed on the live model; and
    the groups that need v* solved again.

    A subject's facts are edited together (its newest edit carries all of them), so when
    every MEMIT fact of the subject holds the same δ, solved for raw prompts and chat
    questions both (`FactEdit.v`), that δ is the subject's. Facts edited raw-only (past
    the chat-edit limit) or apart from each other are solved again. Validation judges the
    reused δs like fresh ones; a subject they fail is solved again (`consolidate_keyed`)."""
    reusable: dict[str, torch.Tensor] = {}
    rest: dict[str, list[FactRecord]] = {}
    for s, recs in groups.items():
        vs = [mem._edits[r.id].v if r.id in mem._edits else {} for r in recs if r.where == "memit"]
        deltas = [next(iter(v.values())) for v in vs if v]
        if deltas and len(deltas) == len(vs) and all(torch.equal(d, deltas[0]) for d in deltas[1:]):
            reusable[s] = deltas[0]
        else:
            rest[s] = recs
    if not reusable:
        return [], rest
    keys = mem.editor().subject_keys([r.fact for s in reusable for r in groups[s]])
    return [Entry(s, d, keys[s], tuple(sorted(r.id for r in groups[s]))) for s, d in reusable.items()], rest


def _starts(old: KeyedMemory, groups: dict[str, list[FactRecord]]) -> dict[str, torch.Tensor]:
    """Where v* starts for a subject solved again: its old entry's δ, if every fact that
    entry was made for is still among the subject's (so nothing forgotten or replaced is
    in it). From zero, one person of 7 facts (14 targets) was not answered within v*'s
    steps; from the δ of 5 of them, the other 2 are the work left."""
    out = {}
    for s, recs in groups.items():
        e = old.entries.get(s)
        if e is not None and set(e.facts) <= {r.id for r in recs}:
            out[s] = e.delta
    return out


def _rekeyed(mem: Memory, table: KeyedMemory, held: dict[str, list[FactRecord]]) -> KeyedMemory:
    """`table`'s entries of subjects still held, their keys read again on the live model
    (δs kept): one batched pass over all their facts, not a pass per subject."""
    subjects = [s for s in table.entries if s in held]
    keys = mem.editor().subject_keys([r.fact for s in subjects for r in held[s]]) if subjects else {}
    return table.with_entries([Entry(e.subject, e.delta, keys[e.subject], e.facts) for e in table.entries.values()
                               if e.subject in held], drop=list(table.entries))


def _answered(mem: Memory, groups: dict[str, list[FactRecord]]) -> dict[str, bool]:
    """Per subject: are all its facts answered, raw prompt and chat question?"""
    facts = [(s, r.fact) for s, rs in groups.items() for r in rs]
    if not facts:
        return {}
    ok = mem.held([f for _, f in facts], chat=True)
    out: dict[str, bool] = {s: True for s in groups}
    for (s, _), good in zip(facts, ok):
        out[s] = out[s] and good
    return out


def consolidate_keyed(mem: Memory, kind: str, cycle: int, memit: list[FactRecord], report: CycleReport,
                      t0: float) -> CycleReport:
    """Steps 1–3 of the module docstring; returns the report, committed or rejected."""
    store, cfg = mem.store, (mem.config.nap if kind == "nap" else mem.config.deep)
    mark = [t0]

    def phase(name: str) -> None:
        now = time.perf_counter()
        report.phases[name] = round(report.phases.get(name, 0.0) + now - mark[0], 3)
        mark[0] = now

    old = mem._keyed or KeyedMemory(mem.layers[-1], mem.layers[0], mem.config.keyed_threshold)
    held_now = _groups(mem, store.facts(where="consolidated"))
    moving = _groups(mem, memit)
    for s in moving:  # a subject's consolidated facts go with its MEMIT ones (one δ per subject)
        moving[s] = held_now.pop(s, []) + moving[s]
    stale = [s for s, e in old.entries.items()
             if s not in moving and tuple(sorted(r.id for r in held_now.get(s, []))) != e.facts]
    redo = {s: held_now[s] for s in stale if held_now.get(s)}
    keep = old.without([*moving, *stale])
    mem._rebuild([], mem._adapters, keep)
    if kind == "deep" and len(keep):  # keys that are still true, on the model as it is now
        keep = _rekeyed(mem, keep, held_now)
        mem._rebuild([], mem._adapters, keep)
        if len(keep):
            lost = [s for s, ok in _answered(mem, {s: held_now[s] for s in keep.entries}).items() if not ok]
            redo.update({s: held_now[s] for s in lost})
    phase("prepare")

    reused, fresh = _reuse(mem, moving)
    starts = _starts(old, {**moving, **redo})
    new = reused + _solve(mem, {**fresh, **redo}, kind, keep, starts)
    table = keep.with_entries(new)
    phase("solve")
    mem._rebuild([], mem._adapters, table)
    ok = _answered(mem, {**moving, **redo})
    retry = {e.subject: moving[e.subject] for e in reused if not ok[e.subject]}
    report.reused = len(reused) - len(retry)
    if retry:  # an injection's δ that does not answer on the consolidated model: v* again
        table = table.with_entries(_solve(mem, retry, kind, table, starts))
        mem._rebuild([], mem._adapters, table)
        ok.update(_answered(mem, retry))
        phase("solve again")
    for s in redo:  # a re-solved entry that still fails: the old one, if better, stays
        if not ok[s] and s in old.entries and not set(old.entries[s].facts) - {r.id for r in redo[s]}:
            table = table.with_entries([old.entries[s]])
    failed = [s for s in moving if not ok[s]]
    # A subject that failed stays in MEMIT; its old entry (if any) stays too, off while it is there.
    table = table.without(failed).with_entries([old.entries[s] for s in failed if s in old.entries])
    passed = [r.id for s in moving if ok[s] for r in moving[s] if r.where == "memit"]
    report.kept = [r.id for s in failed for r in moving[s] if r.where == "memit"]
    report.consolidated = passed
    n = len(memit) or 1
    report.chat_recall = report.raw_recall = len(passed) / n if memit else None
    phase("validate")

    mem._rebuild([], mem._adapters, table)
    again = rewrite_kept(mem, [r for r in memit if r.id in set(report.kept)], [])
    adapters = list(mem._adapters)

    def candidate() -> None:
        mem._rebuild([again[i] for i in sorted(again)], adapters, table)

    candidate()
    phase("edit kept facts again")
    report.ppl_after, report.locality_after = mem.perplexity(), mem.locality()
    before = committed_locality(mem, candidate)
    phase("measure")

    if memit and not passed and not redo:
        report.reason = "no subject was answered by its keyed entry"
    elif reason := over_budget(report, mem.config.budget, cfg.max_ppl_increase, before):
        report.reason = reason
    else:
        table.save(store.keyed_path(cycle))
        return commit(mem, report, cycle, None, passed, [], [], cfg, t0, rewritten=again, keyed=True)
    mem._rebuild()
    report.seconds = time.perf_counter() - t0
    store.end_cycle(cycle, "rejected", report.to_dict())
    return report
