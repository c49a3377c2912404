"""The end of an accepted sleep: kept facts edited again on the new state, then the
commit (files first, then one ledger transaction, then the live model)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sleepwake.memit.editor import FactEdit
from sleepwake.sleep.lora import Adapter
from sleepwake.sleep.report import CycleReport

if TYPE_CHECKING:
    from sleepwake.memory import Memory
    from sleepwake.store import FactRecord


def rewrite_kept(mem: Memory, kept: list[FactRecord], passed: list[FactEdit]) -> dict[int, FactEdit]:
    """New MEMIT edits of `kept` on the live weights as they are, keeping the keys of the
    facts consolidated (`passed` now, and before) fixed; the edits go into the live weights."""
    if not kept:
        return {}
    edits, _ = mem.edit_among([r.fact for r in kept], passed, chat=mem.chat_edits(len(kept)))
    return {r.id: e for r, e in zip(kept, edits)}


def committed_locality(mem: Memory, candidate: Callable[[], None]) -> Callable[[], float]:
    """The locality of the model as it was before the sleep (the committed state), for
    `over_budget`; `candidate` puts the sleep's result back in the live model after."""
    def measure() -> float:
        mem._rebuild()
        try:
            return mem.locality()
        finally:
            candidate()
    return measure


def commit(mem: Memory, report: CycleReport, cycle: int, adapter: Adapter | None, passed: list[int],
           pairs: list, replayed: list[int], cfg: Any, t0: float, curated: Sequence[int] = (),
           rewritten: dict[int, FactEdit] | None = None, keyed: bool = False) -> CycleReport:
    """Adapter directory (or, `keyed`, the table the caller saved) first, then the ledger
    in one transaction, then the live model."""
    store = mem.store
    if adapter is not None:
        adapter.save(store.adapter_path(cycle), mem.lm.name)
    report.status = "accepted"
    report.seconds = time.perf_counter() - t0
    forgetting = store.meta("rebuild_pending") == "1"
    store.end_cycle(cycle, "accepted", report.to_dict(), adapter=adapter is not None or keyed, consolidated=passed,
                    pairs=pairs, replayed=replayed, curated=curated, rewritten=rewritten, decay=cfg.replay_decay,
                    supersede=report.rebuilt and not keyed, erase_superseded=forgetting, keyed=keyed)
    if keyed:
        store.prune_tables(mem.config.keep_tables)
    store.set_meta("awake_since", repr(time.time()))
    mem._load_consolidated()
    for i in passed:
        mem._edits.pop(i, None)
    mem._edits.update(rewritten or {})
    mem._rebuild()
    return report
