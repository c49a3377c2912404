"""Reconsolidation: a new fact about a subject the keyed memory holds goes into that
subject's entry at once, instead of back through MEMIT.

Without it, a subject that gains a fact is edited again in MEMIT with all its facts
(one δ carries a subject's facts), and its keyed entry is off until a sleep writes a
new one. That puts every fact of a person told over time back into the fragile buffer,
under MEMIT's tight bound (`MemitConfig.clamp_norm_factor`), and makes each new fact
cost a MEMIT edit of all the old ones and another sleep. (In the brain, a memory that
is recalled becomes labile and is stored again with what is new: reconsolidation.)

Here the subject's δ is solved again for all its facts, old and new, raw prompts and
chat questions, at the keyed bound (`MemoryConfig.keyed_clamp_norm_factor`), starting at
the entry's δ so that the old facts hold from the first step; on the consolidated model
(base and the other entries, MEMIT out), as a sleep solves it. Its keys are read again.
A subject whose facts are then all answered with everything live (`evaluate.held`) gets
the new entry; the others' new facts go through MEMIT as before. The new table is
committed as a cycle of kind "reconsolidate" (the table file inside the ledger
transaction that records the facts), so a crash leaves the last good state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sleepwake.facts import Fact
from sleepwake.keyed import Entry, KeyedMemory
from sleepwake.memit.editor import InjectStats
from sleepwake.store import FactRecord

if TYPE_CHECKING:
    from sleepwake.memory import Memory


def reconsolidable(mem: Memory, facts: Sequence[Fact]) -> tuple[list[Fact], list[Fact]]:
    """(facts whose subject has a live keyed entry, the others). Only with the keyed
    memory and subject keys (there a subject is one δ, read wherever it is named), and
    `MemoryConfig.reconsolidate`."""
    cfg = mem.config
    if not cfg.reconsolidate or cfg.consolidation != "keyed" or cfg.memit.key_positions != "subject":
        return [], list(facts)
    live = mem.keyed_live()
    entries = live.entries if live is not None else {}
    direct = [f for f in facts if f.subject_key in entries]
    return direct, [f for f in facts if f.subject_key not in entries]


def reconsolidate(mem: Memory, facts: list[Fact], active: dict[tuple[str, str], FactRecord]
                  ) -> tuple[list[FactRecord], list[Fact], InjectStats | None]:
    """Write `facts` (`reconsolidable`) into their subjects' keyed entries; `active` maps
    each slot to its active fact (a new fact replaces the one in its slot). Returns the
    records committed, the facts left for MEMIT, and the stats (None if nothing was
    solved). The caller holds the model and rebuilds it on an exception."""
    if not facts:
        return [], [], None
    t0 = time.perf_counter()
    new: dict[str, list[Fact]] = {}
    for f in facts:
        new.setdefault(f.subject_key, []).append(f)
    replaced = {active[f.key].id for f in facts if f.key in active}
    old: dict[str, list[Fact]] = {s: [] for s in new}
    for r in mem.store.facts(where="consolidated"):
        if r.fact.subject_key in new and r.id not in replaced:
            old[r.fact.subject_key].append(r.fact)
    table = mem._keyed
    live = mem.keyed_live()
    init = {s: table.entries[s].delta for s in new}
    # v* on the consolidated model, the subjects' own entries out (as a sleep solves it)
    mem._rebuild([], mem._adapters, live.without(sorted(new)))
    everything = [f for s in new for f in old[s] + new[s]]
    deltas, keys = mem.editor().subject_deltas(everything, mem.config.keyed_clamp_norm_factor, init)
    t_solve = time.perf_counter() - t0
    entries = {s: Entry(s, deltas[s], keys[s]) for s in new}
    mem._rebuild(None, None, live.with_entries(list(entries.values())))
    answered = dict.fromkeys(new, True)
    for f, ok in zip(everything, mem.held(everything, chat=True)):
        answered[f.subject_key] = answered[f.subject_key] and ok
    passed = [s for s in new if answered[s]]
    left = [f for s in new if not answered[s] for f in new[s]]
    stats = InjectStats(seconds=0.0, v_seconds=t_solve, v_loss_before=float("nan"), v_loss_after=float("nan"),
                        v_steps=0, n_slots=len(everything), reconsolidated=sum(len(new[s]) for s in passed))
    if not passed:
        mem._rebuild()
        stats.seconds = time.perf_counter() - t0
        return [], left, stats
    store = mem.store
    ours = [f for s in passed for f in new[s]]
    kept_ids = {s: [r.id for r in store.facts(where="consolidated")
                    if r.fact.subject_key == s and r.id not in replaced] for s in passed}
    cycle = store.begin_cycle("reconsolidate")

    saved: list[KeyedMemory] = []

    def save(ids: list[int]) -> None:
        by_subject: dict[str, list[int]] = {s: list(kept_ids[s]) for s in passed}
        for f, i in zip(ours, ids):
            by_subject[f.subject_key].append(i)
        done = [Entry(s, entries[s].delta, entries[s].read, tuple(sorted(by_subject[s]))) for s in passed]
        saved.append(table.with_entries(done))
        saved[-1].save(store.keyed_path(cycle))

    report = {"subjects": len(passed), "facts": len(ours), "left_for_memit": len(left),
              "seconds": round(time.perf_counter() - t0, 3)}
    records = store.commit_reconsolidation(cycle, ours, [active[f.key].id if f.key in active else None for f in ours],
                                           report, save)
    store.prune_tables(mem.config.keep_tables)
    # The table just saved is the newest of the ledger: read from memory, not from disk
    # again (a table of thousands of subjects, once per batch; the adapters are unchanged).
    mem._keyed = saved[-1]
    mem._rebuild()
    stats.seconds = time.perf_counter() - t0
    return records, left, stats
