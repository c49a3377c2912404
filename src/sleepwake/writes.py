"""How facts are written into MEMIT and taken out again, on any backend (`Memory` on
PyTorch, `MlxMemory` on MLX): batches, a subject's facts edited together, the guard's
second try, raw-only re-edits past the chat-edit limit, v*'s warm start, reconsolidation
into the keyed memory, forget and rollback.

A backend's memory class inherits `Writes` (beside `memory_base.MemoryBase`) and gives it
`edit_among` (MEMIT edits on its live weights), `_rebuild`, `held`, `_load_edits`,
`_load_consolidated` and `lm.weights_version`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from sleepwake.errors import InvalidFactError, UnknownCycleError
from sleepwake.facts import Fact
from sleepwake.keyed import is_keyed_file
from sleepwake.memit.editor import FactEdit, InjectStats
from sleepwake.policy import batches as policy_batches
from sleepwake.policy import edit_group, plan_forget, plan_injection, shares_edit
from sleepwake.policy import fact_id as policy_fact_id
from sleepwake.reconsolidate import reconsolidable, reconsolidate
from sleepwake.sleep.report import CycleReport
from sleepwake.store import FactRecord

MAX_PROMPT_CHARS = 4000
WARM_FROM = 3  # facts a subject holds from which its v* starts at its δ (`Memory._held_deltas`)

FactLike = Fact | str | dict


def as_facts(items: FactLike | Iterable[FactLike]) -> list[Fact]:
    """Accept a Fact, "S | R | O", a dict, or a list of those; validate all first."""
    if isinstance(items, (Fact, str, dict)):
        items = [items]
    if not isinstance(items, Iterable):
        raise InvalidFactError(f"expected facts, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Fact):
            out.append(item)
        elif isinstance(item, str):
            out.append(Fact.parse(item))
        elif isinstance(item, dict):
            out.append(Fact.from_dict(item))
        else:
            raise InvalidFactError(f"fact #{i + 1}: expected Fact, str or dict, got {type(item).__name__}")
    if not out:
        raise InvalidFactError("no facts given")
    return out


def check_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise InvalidFactError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidFactError(f"{what} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidFactError(f"{what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    return text


@dataclass
class InjectResult:
    records: list[FactRecord]
    skipped: list[Fact]  # already known, unchanged
    stats: list[InjectStats]
    slept: "CycleReport | None" = None  # the sleep the pressure triggered, with `auto_sleep`


class Writes:
    """Writing facts into MEMIT and taking them out (see the module)."""

    def _edit(self, facts: list[Fact], leaving: set[int], progress: bool, chat: bool, warm: bool = False
              ) -> tuple[list[FactEdit], InjectStats]:
        """Edit `facts` into the weights once the edits of `leaving` are out of them."""
        keep = [self._edits[i] for i in sorted(self._edits) if i not in leaving]
        init = self._held_deltas(facts) if warm else None  # read before `leaving`'s edits are replaced
        if leaving:
            self._rebuild(keep)
        return self.edit_among(facts, keep, leaving, progress, chat=chat, init=init)

    def _held_deltas(self, facts: list[Fact]) -> dict[str, torch.Tensor]:
        """Per subject of `facts` that holds `WARM_FROM` or more facts (subject keys), the δ
        that holds them now: its MEMIT edit's, else its keyed entry's. v* starts there when
        such a subject gains a fact (`compute_targets`): from zero, one person of 6 facts
        took 152 steps, from its δ 89. Fewer facts are solved from zero, which takes few
        steps. Not for a forget: a δ that starts with the forgotten fact in it could keep it."""
        if self.config.memit.key_positions != "subject":
            return {}
        count = Counter(r.fact.subject_key for r in self.store.facts())
        subjects = {f.subject_key for f in facts if count[f.subject_key] >= WARM_FROM}
        last = self.layers[-1]
        out = {s: e.delta for s, e in (self._keyed.entries.items() if self._keyed is not None else ())
               if s in subjects}
        for r in self.store.facts(where="memit"):
            v = self._edits[r.id].v.get(last) if r.id in self._edits else None
            if r.fact.subject_key in subjects and v is not None:
                out[r.fact.subject_key] = v
        return out

    def _keyed_cycles(self) -> set[int]:
        """Sleep cycles whose facts live in keyed tables (now or earlier)."""
        return {c for c, p in self.store.consolidating_cycles() if is_keyed_file(p)}

    def inject(self, facts: FactLike | Iterable[FactLike]) -> InjectResult:
        """Write facts into the weights now (MEMIT), in batches of about `config.batch_size`.

        A fact about a subject the keyed memory holds goes into its entry instead
        (`reconsolidate`), unless the entry then fails to answer the subject's facts.
        A fact with the subject and relation of an active fact replaces it. A subject's
        active facts are edited again together with its new ones (they share one
        edit). The batch that takes MEMIT past `MemitConfig.chat_edit_max_facts` edits
        every fact MEMIT holds again, raw-only (`chat_edits`). Facts are validated
        before anything changes; each batch commits atomically.
        """
        active = {r.fact.key: r for r in self.store.facts()}
        plan = plan_injection(as_facts(facts), active)
        direct, _ = reconsolidable(self, plan.todo)
        try:
            records, left, st = reconsolidate(self, direct, active)
        except BaseException:
            self._rebuild()
            raise
        stats: list[InjectStats] = [st] if st is not None else []
        active.update({r.fact.key: r for r in records})
        done = {r.fact.key for r in records}
        todo = [f for f in plan.todo if f.key not in done]
        batches = policy_batches(todo, self.config.batch_size, self.config.memit)
        for batch in tqdm(batches, desc="inject", unit="batch", disable=not self.progress or len(batches) < 2):
            keys = {f.key for f in batch}
            replaces = [active[f.key].id if f.key in active else None for f in batch]
            others = [r for r in active.values() if r.where == "memit" and r.fact.key not in keys]
            held_now = len(others) + sum(active[f.key].where == "memit" for f in batch if f.key in active)
            chat = self.chat_edits(len(others) + len(batch))
            crossing = self.chat_edits(held_now) and not chat
            again = [r for r in others if any(shares_edit(r.fact, f, self.config.memit) for f in batch)]
            replaced = {i for i in replaces if i is not None}
            committed = self._edits
            try:
                # Past the limit, every held fact is first edited again raw-only.
                redone = self._edit_raw_only(others, replaced) if crossing else {}
                self._edits = committed | redone
                again, edits, st, answered, misses = self._edit_guarded(
                    batch, again, replaced | {r.id for r in again}, self.progress and len(batches) < 2, chat)
                st.raw_only_again = len(redone)
                rewritten = redone | {r.id: e for r, e in zip(again, edits[len(batch):])}
                recs = self.store.commit_injection(batch, edits[: len(batch)], replaces, rewritten)
            except BaseException:
                self._edits = committed
                self._rebuild()  # back to the last committed state
                raise
            for i in replaces:
                if i is not None:
                    self._edits.pop(i, None)
            self._edits.update(rewritten)
            for rec, e in zip(recs, edits):
                self._edits[rec.id] = e
                active[rec.fact.key] = rec
            self._rebuild()
            # The committed weights hold the kept try's deltas (summed in canonical order),
            # so its check stands for them: the next batch need not check again first.
            self._answered = (self.lm.weights_version, chat, answered) if answered else None
            ids = {k: r.id for k, r in active.items() if r.where == "memit"}
            self._unheld = {k: i for k, i in self._unheld.items() if not answered.get(k, False)}
            self._unheld.update({k: ids[k] for k in misses if k in ids})
            records += recs
            stats.append(st)
        slept = self.sleep_if_due() if self.config.auto_sleep and records else None
        return InjectResult(records, plan.skipped, stats, slept)

    def _edit_raw_only(self, records: list[FactRecord], leaving: set[int]) -> dict[int, FactEdit]:
        """New raw-only edits of `records` (MEMIT-held facts), made in batches as if they
        were injected now, on the live weights without their edits and those of `leaving`;
        the edits go into the live weights. Batches keep each solve and v* as small as an
        injection's (at a limit of 50, H200, six fact sets, perplexity at 100 facts was
        +1.07% this way and +1.16% with one solve of all 55 facts: within the spread)."""
        leaving = leaving | {r.id for r in records}
        fixed = [self._edits[i] for i in sorted(self._edits) if i not in leaving]
        self._rebuild(fixed)
        by_key = {r.fact.key: r for r in records}
        out: dict[int, FactEdit] = {}
        for part in policy_batches([r.fact for r in records], self.config.batch_size, self.config.memit):
            edits, _ = self.edit_among(part, fixed, leaving, chat=False)
            out.update({by_key[f.key].id: e for f, e in zip(part, edits)})
            fixed += edits
        return out

    def _edit_guarded(self, batch: list[Fact], again: list[FactRecord], leaving: set[int], progress: bool,
                      chat: bool) -> tuple[list[FactRecord], list[FactEdit], InjectStats, dict[tuple[str, str], bool],
                                         set[tuple[str, str]]]:
        """`_edit` of `batch` (with `again`, edited anew), and, where that knocks out earlier
        MEMIT facts, a second try that edits their subjects again in the same solve; the
        try that leaves fewer facts unanswered (`evaluate.held`; with `chat`, both prompt
        forms are edited and checked) is kept. Returns the
        facts edited again, the edits (batch first), the stats of the kept try and, per
        fact key, whether the kept try's weights answer it (empty without the guard), and
        the keys of the facts this batch left unanswered: its own, and earlier ones it
        knocked out. An earlier fact that was unanswered before it is not among them: a
        sleep already tried it (a nap after every batch for one such fact, 1,055-1,300
        facts on the GPU, was the cost of counting it again).

        Eq. 5 holds an earlier edit's keys in place at each layer, but an edit below a
        layer moves the keys and hidden states above it, and now and then one batch
        knocks out several earlier facts (H100, 200 facts in batches of 5: of 17–33
        raw misses, 13–29 were facts recalled right after their own batch)."""
        if not self.config.guard:
            edits, st = self._edit(batch + [r.fact for r in again], leaving, progress, chat, warm=True)
            return again, edits, st, {}, set()

        def check(facts: list[Fact]) -> dict[tuple[str, str], bool]:
            """Per fact key, whether the live weights answer the fact."""
            if not facts:
                return {}
            return dict(zip((f.key for f in facts), self.held(facts, chat=chat)))

        others = [r for r in self.store.facts(where="memit") if r.id not in leaving]
        known = self._answered[2] if self._answered and self._answered[:2] == (self.lm.weights_version, chat) else {}
        before = known | check([r.fact for r in others if r.fact.key not in known])

        def missed(answered: dict[tuple[str, str], bool]) -> set[tuple[str, str]]:
            """Unanswered now, and not already before this batch."""
            return {k for k, ok in answered.items() if not ok and before.get(k, True)}

        edits, st = self._edit(batch + [r.fact for r in again], leaving, progress, chat, warm=True)
        after = check([r.fact for r in others] + batch + [r.fact for r in again])
        knocked = [r for r in others if before[r.fact.key] and not after[r.fact.key]]
        st.knocked_out = len(knocked)
        if not knocked:
            return again, edits, st, after, missed(after)
        out = {edit_group(r.fact, self.config.memit) for r in knocked}
        extra = [r for r in others if edit_group(r.fact, self.config.memit) in out]
        try_again = again + extra
        edits2, st2 = self._edit(batch + [r.fact for r in try_again], leaving | {r.id for r in extra}, progress, chat,
                                   warm=True)
        after2 = check([r.fact for r in others] + batch + [r.fact for r in again])
        if sum(after2.values()) <= sum(after.values()):
            return again, edits, st, after, missed(after)  # the caller rebuilds the weights from what it commits
        st2.knocked_out, st2.second_try = st.knocked_out, True
        return try_again, edits2, st2, after2, missed(after2)

    def forget(self, fact_id: int) -> FactRecord:
        """Remove a fact: its delta leaves the weights and its edit file is deleted. The
        other facts of its subject are edited again without it (they shared its edit).
        A consolidated fact leaves the weights at the next sleep, which rebuilds the
        consolidated memory from the facts that remain."""
        fact_id = policy_fact_id(fact_id)
        plan = plan_forget(self.store.get(fact_id), self.store.facts(where="memit"),
                           self.store.facts(where="consolidated"), self._keyed_cycles(), self.config.memit)
        try:
            rewritten: dict[int, FactEdit] = {}
            if plan.redo:
                n_held = len(self.store.facts(where="memit")) - 1 + len(plan.back)
                edits, _ = self._edit([r.fact for r in plan.redo], {fact_id, *(r.id for r in plan.redo)},
                                      self.progress, self.chat_edits(n_held))
                rewritten = {r.id: e for r, e in zip(plan.redo, edits)}
            rec = self.store.forget(fact_id, rewritten, to_memit=[r.id for r in plan.back])
        except BaseException:
            self._rebuild()
            raise
        self._edits.pop(fact_id, None)
        self._edits.update(rewritten)
        self._rebuild()
        return rec

    # --- sleep ------------------------------------------------------------------

    def rollback(self, cycle: int) -> list[int]:
        """Return to the state before sleep cycle `cycle` (see `Store.rollback`)."""
        if isinstance(cycle, bool) or not isinstance(cycle, int):
            raise UnknownCycleError(f"cycle id must be an integer, got {cycle!r}")
        undone = self.store.rollback(cycle)
        self._load_consolidated()
        self._edits = self._load_edits()
        self._rebuild()
        self._edit_missing()
        return undone

    def _with_edit(self) -> set[int]:
        return {r.id for r in self.store.facts(where="memit") if self.store.edit_path(r.id).exists()}

    def _edit_missing(self) -> None:
        """MEMIT edits for the MEMIT-held facts that have none: those a reconsolidation
        wrote straight into the keyed memory, back in MEMIT after a `rollback` of it (or a
        crash between that rollback and this). With the guard, those the edit leaves
        unanswered make a nap due, as after an injection: such a fact's subject shares
        one δ with its consolidated facts, which MEMIT's tighter bound may not hold."""
        missing = [r for r in self.store.facts(where="memit") if r.id not in self._with_edit()]
        if not missing:
            return
        chat = self.chat_edits(len(self._edits) + len(missing))
        with self.lm.lock:
            self.activate()
            try:
                edits, _ = self._edit([r.fact for r in missing], set(), self.progress, chat)
                self.store.rewrite_edits({r.id: e for r, e in zip(missing, edits)})
            finally:
                self._edits = self._load_edits()
                self._rebuild()
            if self.config.guard:
                answered = self.held([r.fact for r in missing], chat=chat)
                self._unheld.update({r.fact.key: r.id for r, ok in zip(missing, answered) if not ok})
