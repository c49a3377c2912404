"""Sleep pressure (paper §3.5, eq. 6): when to nap and when to sleep deeply.

    pressure = w_e·edits/n_max + w_t·elapsed/t_max + w_p·max(0, PPL/PPL₀ − 1)

`edits` counts the facts held by MEMIT edits, `elapsed` the seconds awake since the
last sleep (or since the first such fact), PPL₀ the base model's perplexity.

A nap that is due turns into a deep sleep after `naps_per_deep` accepted naps since the
last deep sleep, once those naps consolidated at least `deep_growth` times the facts held
before them, or after a rejected sleep: so deep sleep comes in normal use, where naps keep
the MEMIT buffer small and the pressure alone would rarely reach `deep_at`, and, since a
deep sleep reads every held fact again, its total cost grows linearly with the facts told.

A fact MEMIT holds but does not answer (checked right after its injection) makes a nap
due at once (`PressureConfig.nap_when_unheld`): one weight edit of a subject's δ under
MEMIT's norm bound cannot carry many facts of that subject (six facts of one user: 1/7
answered by MEMIT, 4/7 with a bound two or four times larger, 6/6 once naps keyed them),
while the keyed memory that a nap writes can.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

from sleepwake.config import PressureConfig


@dataclass(frozen=True)
class Pressure:
    edits: float  # the weighted parts, which add up to `total`
    time: float
    perplexity: float
    total: float
    due: str | None  # "deep", "nap" or None
    unheld: int = 0  # MEMIT facts known not to be answered now (not weighted: a nap is due)

    def to_dict(self) -> dict:
        return asdict(self)


def pressure(n_edits: int, elapsed_s: float, ppl: float | None, ppl0: float | None,
             cfg: PressureConfig, naps_since_deep: int = 0, last_rejected: bool = False,
             unheld: int = 0, moved_since_deep: int = 0, consolidated: int = 0) -> Pressure:
    """The pressure and which sleep (if any) it calls for. Unknown perplexity counts 0.

    `moved_since_deep` facts were consolidated by naps since the last deep sleep, out of
    `consolidated` held there now."""
    e = cfg.w_edits * n_edits / cfg.max_edits
    t = cfg.w_time * max(0.0, elapsed_s) / cfg.max_awake_s
    p = cfg.w_ppl * max(0.0, ppl / ppl0 - 1.0) if ppl and ppl0 else 0.0
    total = e + t + p
    due = "deep" if total >= cfg.deep_at else "nap" if total >= cfg.nap_at else None
    if due is None and unheld and cfg.nap_when_unheld:
        due = "nap"
    grown = moved_since_deep >= cfg.deep_growth * (consolidated - moved_since_deep)
    if due == "nap" and cfg.naps_per_deep and (naps_since_deep >= cfg.naps_per_deep and grown or last_rejected):
        due = "deep"
    return Pressure(e, t, p, total, due, unheld)


class SinceDeep(NamedTuple):
    naps: int  # accepted since the last accepted deep sleep
    last_rejected: bool  # the last sleep that ended was rejected (failed ones do not count)
    moved: int = 0  # facts those naps consolidated


def since_deep(cycles: list[dict]) -> SinceDeep:
    """What the ledger's cycles (oldest first) say since the last accepted deep sleep."""
    ended = [c for c in cycles if c["status"] in ("accepted", "rejected")]
    naps = moved = 0
    for c in reversed(ended):
        if c["status"] == "accepted":
            if c["kind"] == "deep":
                break
            naps += c["kind"] == "nap"  # not a reconsolidation: it is no sleep, but it adds to the load
            moved += len((c.get("report") or {}).get("consolidated") or ())
    return SinceDeep(naps, bool(ended) and ended[-1]["status"] == "rejected", moved)
