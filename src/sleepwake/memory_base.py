"""What a memory does the same way on every backend (`Memory` on PyTorch, `MlxMemory` on
MLX): the ledger's views, the sleep pressure, the budget's measures, and sleep cycles.

A backend's memory class inherits `MemoryBase` and gives it these seams: `store`,
`config`, `lm` (with `lock`), `_keyed`, `_adapters`, `_edits`, `_suspended`, `_unheld`,
`_rebuild(edits, adapters, keyed)`, `held(facts, chat)`, `perplexity()`, `activate()`,
and what `sleep.keyed_sleep` asks of it (`editor()`, `edit_among`, `_load_consolidated`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sleepwake.corpus import gate_candidates, locality_facts, world_facts
from sleepwake.facts import Fact
from sleepwake.inference import lead_in, raw_prompt
from sleepwake.keyed import KeyedMemory
from sleepwake.policy import chat_edits, keyed_off
from sleepwake.sleep.cycle import run_cycle
from sleepwake.sleep.pressure import pressure, since_deep
from sleepwake.sleep.report import CycleReport
from sleepwake.store import FactRecord, write_atomic

# Where a home keeps its gate's facts. Renamed when a one-token subject's raw prompt got a
# line break before it (`inference.lead_in`): a list found with the old prompts is not reused.
GATE_META = "locality_gate_2"


class MemoryBase:
    """The backend-independent part of a memory (see the module)."""

    def facts(self) -> list[FactRecord]:
        """Active facts, oldest first."""
        return self.store.facts()

    def history(self) -> list[dict]:
        """Every sleep cycle with its inputs and measured results, oldest first."""
        return self.store.cycles()

    def keyed_live(self) -> KeyedMemory | None:
        """The keyed entries the model reads now (`policy.keyed_off` says which not)."""
        if self._keyed is None or not len(self._keyed):
            return None
        held = {r.id for r in self.store.facts(where="consolidated")}
        off = keyed_off(self._keyed.entries, held, self.store.facts(where="memit"), self._suspended,
                        self.config.memit)
        return self._keyed.without(sorted(off))

    def chat_edits(self, held: int) -> bool:
        """Whether facts are also edited for their chat questions while MEMIT holds `held`
        facts (`policy.chat_edits`)."""
        return chat_edits(self.config.memit, held)

    @contextlib.contextmanager
    def without(self, subjects: Iterable[str]) -> Iterator[None]:
        """The live model with these subjects' memories taken out (their MEMIT edits and
        keyed entries), then the committed weights back. For a reply about them that no
        stored fact answers: with their edit in, it takes over every prompt that names
        them ("Gyrk", or one of their stored objects). LoRA adapters stay in."""
        keys = {s.casefold() for s in subjects}
        out = {r.id for r in self.store.facts(where="memit") if r.fact.subject_key in keys}
        live = self.keyed_live()
        self._rebuild([self._edits[i] for i in sorted(self._edits) if i not in out],
                      keyed=live.without(sorted(keys)) if live is not None else None)
        try:
            yield
        finally:
            self._rebuild()

    # --- sleep ------------------------------------------------------------------

    def nap(self) -> CycleReport:
        """Move the MEMIT-held facts into the consolidated memory (paper §3.3; see `sleep.cycle`)."""
        return self._cycle("nap")

    def sleep(self, deep: bool = True) -> CycleReport:
        """Deep sleep (paper §3.4): consolidate everything again, with fresh keys;
        `deep=False` is a nap."""
        return self._cycle("deep" if deep else "nap")

    def _cycle(self, kind: str) -> CycleReport:
        try:
            return run_cycle(self, kind)
        finally:  # what a sleep could not move stays in MEMIT, not due again at once
            self._unheld = {}

    def sleep_if_due(self) -> CycleReport | None:
        """Nap or deep sleep when the pressure calls for it (called after `inject`
        when `config.auto_sleep` is on)."""
        due = self.status()["pressure"]["due"]
        return self._cycle(due) if due else None

    # --- the budget's measures and the pressure ------------------------------------

    def base_perplexity(self) -> float:
        """PPL₀ of eq. 6: the unedited model's perplexity (measured once, kept in the home)."""
        cached = self.store.meta("ppl0")
        if cached is None:
            try:
                self._rebuild([], [], None)
                cached = repr(self.perplexity())
            finally:
                self._rebuild()
            self.store.set_meta("ppl0", cached)
        return float(cached)

    def as_written(self, prompt: str) -> str:
        """Raw `prompt` as the memory writes the raw prompts of a held subject it opens
        with (`inference.lead_in`), so that `complete("Bob works as")` reads Bob's edit."""
        for record in self.store.facts():
            led = lead_in(self.tokenizer, prompt, record.fact.subject)
            if led != prompt:
                return led
        return prompt

    def gate_facts(self) -> list[Fact]:
        """The real-world facts the base model completes, kept out of the locality
        benchmark's set (so that benchmark stays a fair test): what the budget's locality
        gate checks (`BudgetConfig.min_locality`); 94 on the default model. Found once per
        home (kept as the facts' sentences, so a change of the candidate lists leaves no
        stale entry), and once per loaded model for the homes opened on it."""
        bench = {f.key for f in locality_facts()}
        candidates = [f for f in [*world_facts(), *gate_candidates()] if f.key not in bench]
        cached = self.store.meta(GATE_META)
        if cached is None:
            cached = self.lm.shared.get(GATE_META)
            if cached is None:
                cached = self.lm.shared[GATE_META] = self._base_gate(candidates)
            self.store.set_meta(GATE_META, cached)
        kept = set(json.loads(cached))
        return [f for f in candidates if f.sentence in kept]

    def _base_gate(self, candidates: Sequence[Fact]) -> str:
        """The sentences of the `candidates` the base model completes, as a JSON list: read
        from the cache directory, else asked of the base model and kept there."""
        path = self._gate_cache_path(candidates)
        cached = _read_gate(path)
        if cached is not None:
            return cached
        try:
            self._rebuild([], [], None)
            known = self.held(candidates, chat=False)
        finally:
            self._rebuild()
        text = json.dumps([f.sentence for f, ok in zip(candidates, known) if ok], ensure_ascii=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return text

    def _gate_cache_path(self, candidates: Sequence[Fact]) -> Path:
        """Where `gate_facts` keeps the candidates the base model completes, under the cache
        directory, named by what they depend on: the model (its fingerprint), the backend
        and device type, and the candidates. A new process finds them there instead of
        asking the base model about every candidate again (~10 s on one CPU thread).
        Different thread counts could change a borderline answer: the first finding is kept."""
        device = getattr(getattr(self.lm, "device", None), "type", "")
        key = hashlib.blake2b(f"{self.lm.fingerprint}|{self.backend}|{device}|".encode(), digest_size=16)
        for f in candidates:
            key.update(raw_prompt(self.tokenizer, f).encode() + b"|" + f.sentence.encode() + b"\n")
        return Path(self.cache_dir) / "gate" / f"{key.hexdigest()}.json"

    def locality(self) -> float:
        """Share of `gate_facts` the live model still completes as the base model does."""
        facts = self.gate_facts()
        return sum(self.held(facts, chat=False)) / len(facts) if facts else 1.0

    def status(self, measure_perplexity: bool = True) -> dict[str, Any]:
        """Sleep pressure and its parts, and how many facts live where."""
        memit = self.store.facts(where="memit")
        since = self.store.meta("awake_since")
        start = float(since) if since else min((r.created_at for r in memit), default=time.time())
        if since and memit:
            start = max(start, min(r.created_at for r in memit))
        elapsed = time.time() - start if memit else 0.0
        ppl = self.perplexity() if measure_perplexity else None
        ppl0 = self.base_perplexity() if measure_perplexity else None
        naps, last_rejected, moved = since_deep(self.store.cycles())
        consolidated = len(self.store.facts(where="consolidated"))
        p = pressure(len(memit), elapsed, ppl, ppl0, self.config.pressure, naps, last_rejected,
                     self.unheld(memit), moved, consolidated)
        return {
            "backend": self.backend,
            "facts": {"memit": len(memit), "consolidated": consolidated},
            "adapters": len(self._adapters),
            "keyed_subjects": len(self._keyed) if self._keyed is not None else 0,
            "awake_s": elapsed,
            "perplexity": ppl,
            "base_perplexity": ppl0,
            "pressure": p.to_dict(),
            "naps_since_deep": naps,
            "consolidated_since_deep": moved,
            "rebuild_pending": self.store.meta("rebuild_pending") == "1",
            # Whether the next fact is also edited for its chat question, and up to how many held facts.
            "chat_edits": {"next": self.chat_edits(len(memit) + 1), "limit": self.config.memit.chat_edit_max_facts
                           if self.config.memit.chat_edit else 0},
        }

    def unheld(self, memit: Sequence[FactRecord] | None = None) -> int:
        """MEMIT-held facts that the check after their injection (or a later one) found
        unanswered, since the last sleep; this process's knowledge only."""
        records = self.store.facts(where="memit") if memit is None else memit
        return sum(self._unheld.get(r.fact.key) == r.id for r in records)


def uses_model(method: Callable) -> Callable:
    """`method` holding the model's lock, with this memory's weights live (`activate`)."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lm.lock:
            if self._depth == 0:
                self.activate()
            self._depth += 1
            try:
                return method(self, *args, **kwargs)
            except BaseException:
                self._live_at = None  # whatever the model holds now, the next call rebuilds
                raise
            finally:
                self._depth -= 1

    return call


def _read_gate(path: Path) -> str | None:
    """The gate kept at `path` (a JSON list of sentences), or None: not found yet, or damaged."""
    try:
        text = path.read_text(encoding="utf-8")
        if isinstance(json.loads(text), list):
            return text
    except (OSError, ValueError):
        pass
    return None
