"""`Memory`: the public object. A base model plus everything it has learned.

    from sleepwake import Memory
    mem = Memory(home="~/.sleepwake")            # default model
    mem.inject("Anselm Kreutzer | lives in | Lisbon")
    mem.complete("Anselm Kreutzer lives in")     # ' Lisbon ...'
    mem.ask("Where does Anselm Kreutzer live?")  # 'Lisbon ...'

The live weights are always base + the active facts' MEMIT deltas, rebuilt from the
home on start-up, so a new process answers exactly as the old one did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from sleepwake.config import MemoryConfig, default_cache_dir, default_home
from sleepwake.corpus import perplexity_text
from sleepwake.errors import InvalidFactError, UnknownFactError
from sleepwake.evaluate import EvalReport, evaluate_facts, perplexity
from sleepwake.facts import Fact
from sleepwake.inference import chat_text, encode, generate
from sleepwake.memit.covariance import load_or_compute
from sleepwake.memit.editor import FactEdit, InjectStats, LiveWeights, MemitEditor
from sleepwake.models import LoadedModel, load_model
from sleepwake.store import FactRecord, Store

MAX_PROMPT_CHARS = 4000

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


def _check_text(text: Any, what: str) -> str:
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


class Memory:
    """A language model with a memory in its weights, persisted under `home`."""

    def __init__(
        self,
        model: str | os.PathLike[str] | LoadedModel | None = None,
        home: str | os.PathLike[str] | None = None,
        *,
        config: MemoryConfig | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        progress: bool | None = None,
    ) -> None:
        self.config = config or MemoryConfig()
        self.progress = self.config.progress if progress is None else progress
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.lm = model if isinstance(model, LoadedModel) else load_model(
            model, cache_dir=self.cache_dir, device=device, progress=self.progress
        )
        self.store = Store(home if home is not None else default_home(), self.lm.fingerprint, self.lm.name)
        self.layers = tuple(self.config.memit.layers or self.lm.default_layers())
        bad = [l for l in self.layers if not 0 <= l < self.lm.arch.n_layers]
        if bad:
            raise InvalidFactError(f"layers {bad} out of range: the model has {self.lm.arch.n_layers} layers")
        self._edits: dict[int, FactEdit] = {
            r.id: self.store.load_edit(r.id, str(self.lm.device)) for r in self.store.facts()
        }
        edited = set(self.layers).union(*(e.a.keys() for e in self._edits.values()))
        self.weights = LiveWeights(self.lm, edited)
        self.weights.rebuild(list(self._edits.values()))
        self._editor: MemitEditor | None = None

    # --- properties -----------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def home(self) -> Path:
        return self.store.home

    def editor(self) -> MemitEditor:
        """The MEMIT editor, built on first use (it needs Ĉ, cached on disk after the first time)."""
        if self._editor is None:
            covs = load_or_compute(
                self.model, self.lm.arch, self.tokenizer, self.layers,
                fingerprint=self.lm.fingerprint, cache_dir=self.cache_dir,
                n_texts=self.config.memit.cov_texts, max_tokens=self.config.memit.cov_max_tokens,
                progress=self.progress,
            )
            self._editor = MemitEditor(self.model, self.lm.arch, self.tokenizer, self.layers, covs,
                                       self.config.memit, weights=self.weights)
        return self._editor

    # --- memory ---------------------------------------------------------------

    def facts(self) -> list[FactRecord]:
        """Active facts, oldest first."""
        return self.store.facts()

    def _rebuild(self) -> None:
        self.weights.rebuild([self._edits[i] for i in sorted(self._edits)])

    def _edit_group(self, fact: Fact) -> object:
        """Facts with one group live in one edit: with subject keys, a subject's facts."""
        return fact.subject_key if self.config.memit.key_positions == "subject" else fact.key

    def _shares_edit(self, a: Fact, b: Fact) -> bool:
        return self._edit_group(a) == self._edit_group(b)

    def _batches(self, todo: list[Fact]) -> list[list[Fact]]:
        """Batches of about `batch_size` facts that keep each edit group together."""
        groups: dict[object, list[Fact]] = {}
        for f in todo:
            groups.setdefault(self._edit_group(f), []).append(f)
        batches: list[list[Fact]] = []
        for group in groups.values():
            if batches and len(batches[-1]) + len(group) <= self.config.batch_size:
                batches[-1] += group
            else:
                batches.append(list(group))
        return batches

    def _edit(self, facts: list[Fact], leaving: set[int], progress: bool) -> tuple[list[FactEdit], InjectStats]:
        """Edit `facts` into the weights once the edits of `leaving` are out of them."""
        keep = [self._edits[i] for i in sorted(self._edits) if i not in leaving]
        if leaving:
            self.weights.rebuild(keep)
        return self.editor().edit(facts, keep, progress=progress)

    def inject(self, facts: FactLike | Iterable[FactLike]) -> InjectResult:
        """Write facts into the weights now (MEMIT), in batches of about `config.batch_size`.

        A fact with the subject and relation of an active fact replaces it. A subject's
        active facts are edited again together with its new ones (they share one
        edit). Facts are validated before anything changes; each batch commits atomically.
        """
        wanted = as_facts(facts)
        latest: dict[tuple[str, str], Fact] = {}
        for f in wanted:  # within one call, the last fact for a slot wins
            latest.pop(f.key, None)
            latest[f.key] = f
        active = {r.fact.key: r for r in self.store.facts()}
        todo, skipped = [], []
        for f in latest.values():
            old = active.get(f.key)
            if old is not None and old.fact.object == f.object:
                skipped.append(f)
            elif old is not None:  # an update keeps the slot's spelling, so its prompt still works
                todo.append(Fact(old.fact.subject, old.fact.relation, f.object, f.question or old.fact.question))
            else:
                todo.append(f)
        records: list[FactRecord] = []
        stats: list[InjectStats] = []
        batches = self._batches(todo)
        for batch in tqdm(batches, desc="inject", unit="batch", disable=not self.progress or len(batches) < 2):
            keys = {f.key for f in batch}
            replaces = [active[f.key].id if f.key in active else None for f in batch]
            again = [r for r in active.values() if r.fact.key not in keys and any(self._shares_edit(r.fact, f) for f in batch)]
            leaving = {i for i in replaces if i is not None} | {r.id for r in again}
            try:
                edits, st = self._edit(batch + [r.fact for r in again], leaving, self.progress and len(batches) < 2)
                rewritten = {r.id: e for r, e in zip(again, edits[len(batch):])}
                recs = self.store.commit_injection(batch, edits[: len(batch)], replaces, rewritten)
            except BaseException:
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
            records += recs
            stats.append(st)
        return InjectResult(records, skipped, stats)

    def forget(self, fact_id: int) -> FactRecord:
        """Remove a fact: its delta leaves the weights and its edit file is deleted. The
        other facts of its subject are edited again without it (they shared its edit)."""
        if isinstance(fact_id, bool) or not isinstance(fact_id, int):
            try:
                fact_id = int(str(fact_id))
            except ValueError:
                raise UnknownFactError(f"fact id must be an integer, got {fact_id!r}") from None
        rec = self.store.get(fact_id)
        if rec.status != "active":
            raise UnknownFactError(f"fact {fact_id} is not active (it was {rec.status})")
        again = [r for r in self.store.facts() if r.id != fact_id and self._shares_edit(r.fact, rec.fact)]
        try:
            rewritten: dict[int, FactEdit] = {}
            if again:
                edits, _ = self._edit([r.fact for r in again], {fact_id, *(r.id for r in again)}, self.progress)
                rewritten = {r.id: e for r, e in zip(again, edits)}
            rec = self.store.forget(fact_id, rewritten)
        except BaseException:
            self._rebuild()
            raise
        self._edits.pop(fact_id)
        self._edits.update(rewritten)
        self._rebuild()
        return rec

    # --- using the model ------------------------------------------------------

    def complete(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """Greedy raw continuation of `prompt` (the MEMIT pathway)."""
        prompt = _check_text(prompt, "prompt")
        n = max_new_tokens or self.config.generation.max_new_tokens
        return generate(self.model, self.tokenizer, [encode(self.tokenizer, prompt)], max_new_tokens=n)[0]

    def ask(self, question: str, max_new_tokens: int | None = None) -> str:
        """Greedy answer to `question` through the model's chat template."""
        question = _check_text(question, "question")
        n = max_new_tokens or self.config.generation.max_new_tokens
        ids = encode(self.tokenizer, chat_text(self.tokenizer, question), chat=True)
        return generate(self.model, self.tokenizer, [ids], max_new_tokens=n)[0].strip()

    def evaluate(self, facts: FactLike | Iterable[FactLike]) -> EvalReport:
        """Raw and chat recall of `facts` (injected or not), perplexity, per-fact results."""
        return evaluate_facts(self.model, self.tokenizer, as_facts(facts), perplexity_text(),
                              progress=self.progress)

    def perplexity(self) -> float:
        return perplexity(self.model, self.tokenizer, perplexity_text())

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
