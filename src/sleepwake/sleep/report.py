"""What a sleep cycle did and measured, and the budget it is judged by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sleepwake.config import BudgetConfig


@dataclass
class CycleReport:
    """What a sleep did and what it measured."""

    id: int | None
    kind: str  # "nap" | "deep"
    status: str  # "accepted" | "rejected" | "nothing to do"
    consolidated: list[int] = field(default_factory=list)  # facts that left MEMIT
    kept: list[int] = field(default_factory=list)  # facts that failed validation: edited in again, on top
    kept_recall: float | None = None  # chat recall of those, after that
    reused: int = 0  # keyed sleep: subjects keyed with the δ their injection solved, without v* again
    rebuilt: bool = False  # the consolidated memory was rebuilt into one adapter
    chat_recall: float | None = None  # of the cycle's facts, MEMIT edits off
    raw_recall: float | None = None
    held_recall_before: float | None = None  # already consolidated facts (τ gate)
    held_recall_after: float | None = None
    ppl_before: float | None = None
    ppl_after: float | None = None
    ppl_base: float | None = None  # the base model's (`BudgetConfig`)
    # Share of the budget's gate facts answered as the base model does. "before" is
    # measured only when "after" is under the budget (`over_budget`): None otherwise.
    locality_before: float | None = None
    locality_after: float | None = None
    exchanges: int = 0  # conversation exchanges scored by curation (deep sleep)
    exchanges_kept: int = 0  # ... and learned from
    train_steps: int = 0
    train_loss: tuple[float, float] | None = None
    trained_part_dropped: bool = False  # the trained part did not earn its place (see step 3)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, where the time went
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def over_budget(report: CycleReport, budget: BudgetConfig, max_step: float | None = None,
                locality_before: Callable[[], float] | None = None) -> str:
    """Why a sleep's result is over the budget against the base model, or over the
    perplexity rise one sleep may cause (`max_step`, relative to before it), or "" if
    neither. A result over the budget still passes if it is better than the state before
    the sleep: refusing it would keep the worse one. The locality before the sleep is
    asked of `locality_before` (into the report) only when the result's is under the
    budget, which saves a pass over the gate's facts in every other sleep."""
    ppl_limit = report.ppl_base * (1 + budget.max_ppl_increase)
    if report.ppl_after > ppl_limit and report.ppl_after > report.ppl_before:
        return (f"perplexity {report.ppl_after:.3f} would be {report.ppl_after / report.ppl_base - 1:+.1%} over the "
                f"base model's {report.ppl_base:.3f}; the budget is {budget.max_ppl_increase:+.0%}")
    if report.locality_after < budget.min_locality:
        if report.locality_before is None and locality_before is not None:
            report.locality_before = locality_before()
        if report.locality_before is None or report.locality_after < report.locality_before:
            was = "" if report.locality_before is None else f" (it was {report.locality_before:.3f})"
            return f"locality {report.locality_after:.3f} would be under the budget's {budget.min_locality:.2f}{was}"
    if max_step is not None and report.ppl_after > report.ppl_before * (1 + max_step):
        return f"perplexity {report.ppl_before:.3f} → {report.ppl_after:.3f} rose more than {max_step:.0%}"
    return ""
