"""What is held where: the rules that decide which facts share one MEMIT edit, how an
injection is cut into batches, which facts a new fact replaces, when chat edits stop,
which keyed entries the model reads, and what a forget edits again.

One home for both backends (`Memory` on torch, `MlxMemory` on MLX): plain functions of
facts, ledger records and the config, no tensors. The budget a sleep must keep is
`BudgetConfig` (checked in `sleep.report.over_budget`); when to sleep is `sleep.pressure`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sleepwake.config import MemitConfig
from sleepwake.errors import UnknownFactError
from sleepwake.facts import Fact
from sleepwake.store import FactRecord


def edit_group(fact: Fact, cfg: MemitConfig) -> object:
    """Facts of one group live in one edit: with subject keys, a subject's facts (they
    are read at the same key, so one δ must carry them all)."""
    return fact.subject_key if cfg.key_positions == "subject" else fact.key


def shares_edit(a: Fact, b: Fact, cfg: MemitConfig) -> bool:
    return edit_group(a, cfg) == edit_group(b, cfg)


def batches(todo: Sequence[Fact], size: int, cfg: MemitConfig) -> list[list[Fact]]:
    """Batches of about `size` facts that keep each edit group together."""
    groups: dict[object, list[Fact]] = {}
    for f in todo:
        groups.setdefault(edit_group(f, cfg), []).append(f)
    out: list[list[Fact]] = []
    for group in groups.values():
        if out and len(out[-1]) + len(group) <= size:
            out[-1] += group
        else:
            out.append(list(group))
    return out


def chat_edits(cfg: MemitConfig, held: int) -> bool:
    """Whether facts are also edited for their chat questions while MEMIT holds `held`
    facts. Past `chat_edit_max_facts` each chat slot costs more recall of raw prompts
    than it gives (BENCHMARKS.md); sleep makes those facts chat-visible instead."""
    return cfg.chat_edit and (cfg.chat_edit_max_facts is None or held <= cfg.chat_edit_max_facts)


@dataclass
class Plan:
    """What an injection does: `todo` to edit (an update keeps its slot's spelling, so its
    prompt still works), `skipped` already known as given."""

    todo: list[Fact]
    skipped: list[Fact]


def plan_injection(wanted: Iterable[Fact], active: dict[tuple[str, str], FactRecord]) -> Plan:
    """Within one call the last fact for a slot (subject, relation) wins; a fact whose slot
    holds another object replaces it; one that holds the same object is skipped."""
    latest: dict[tuple[str, str], Fact] = {}
    for f in wanted:
        latest.pop(f.key, None)
        latest[f.key] = f
    plan = Plan([], [])
    for f in latest.values():
        old = active.get(f.key)
        if old is not None and old.fact.object == f.object:
            plan.skipped.append(f)
        elif old is not None:
            plan.todo.append(Fact(old.fact.subject, old.fact.relation, f.object, f.question or old.fact.question))
        else:
            plan.todo.append(f)
    return plan


def keyed_off(entries: dict[str, Any], consolidated: set[int], memit: Iterable[FactRecord],
              suspended: Iterable[object], cfg: MemitConfig) -> set[str]:
    """Subjects whose keyed entry the model must not read now: those with facts in MEMIT
    (their edit carries all their facts until a sleep writes a new entry), those being
    edited (`suspended`), and those made for a fact since forgotten or replaced.
    `entries` maps a subject to its entry (anything with `.facts`, the ids it holds)."""
    off = {str(edit_group(r.fact, cfg)) for r in memit} | {str(s) for s in suspended}
    return off | {s for s, e in entries.items() if not set(e.facts) <= consolidated}


def fact_id(value: Any) -> int:
    """A fact id given as an int or its text; anything else is a clear error."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return int(str(value))
        except ValueError:
            raise UnknownFactError(f"fact id must be an integer, got {value!r}") from None
    return value


@dataclass
class ForgetPlan:
    """What forgetting `record` edits again: `again`, the MEMIT facts that shared its edit,
    and `back`, the other facts of its keyed entry, which go back to MEMIT until a sleep
    writes a new entry (the entry leaves the model now)."""

    record: FactRecord
    again: list[FactRecord]
    back: list[FactRecord]

    @property
    def redo(self) -> list[FactRecord]:
        return self.again + self.back


def plan_forget(record: FactRecord, memit: Sequence[FactRecord], consolidated: Sequence[FactRecord],
                keyed_cycles: set[int], cfg: MemitConfig) -> ForgetPlan:
    """A consolidated fact in LoRA adapters needs nothing now: it leaves the weights at
    the next sleep, which rebuilds the consolidated memory from the facts that remain."""
    if record.status != "active":
        raise UnknownFactError(f"fact {record.id} is not active (it was {record.status})")
    again = [r for r in memit if record.where == "memit" and r.id != record.id
             and shares_edit(r.fact, record.fact, cfg)]
    back = [r for r in consolidated if r.id != record.id and shares_edit(r.fact, record.fact, cfg)
            ] if record.cycle in keyed_cycles else []
    return ForgetPlan(record, again, back)
