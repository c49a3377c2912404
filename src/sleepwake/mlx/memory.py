"""`Memory(backend="mlx")`: the memory of a home, on an MLX model.

The home is the PyTorch backend's, file for file: the ledger, one edit file of torch
safetensors per fact (the factors A, B, the keys K and δ), and the keyed tables. The live
weights are rebuilt from them the same way (base + the active edits' A·B in fact order,
summed by the same float32 product), so either backend answers a home the other wrote.

What runs here: inject (MEMIT on MLX: v*, Ĉ, the shared solve), forget, complete, ask,
evaluate (raw and chat recall), and a nap into the keyed memory that keys the δ each
subject's injection solved. Not yet on MLX: the injection guard's second try, editing
held facts again raw-only past the chat-edit limit (later batches are raw-only), solving
v* again in a sleep, the sleep's perplexity and locality budget, deep sleep, LoRA sleep
and homes holding LoRA adapters, export, users sharing one model (the memory made or
rebuilt last on an `MlxModel` owns its weights: use one at a time), and the server.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import torch

from sleepwake.config import MemoryConfig, default_cache_dir, default_home
from sleepwake.errors import InvalidFactError, UnsupportedError
from sleepwake.evaluate import EvalReport, FactResult
from sleepwake.facts import Fact, mentions
from sleepwake.inference import chat_text, encode, encode_target
from sleepwake.keyed import Entry, KeyedMemory, is_keyed_file
from sleepwake.memit.editor import FactEdit, InjectStats
from sleepwake.memory import FactLike, InjectResult, as_facts, check_text
from sleepwake.mlx.memit import MlxEditor, covariances, to_mx
from sleepwake.mlx.model import KeyedTable, MlxModel, load_mlx_model
from sleepwake.policy import batches, chat_edits, edit_group, keyed_off, plan_forget, plan_injection, shares_edit
from sleepwake.policy import fact_id as policy_fact_id
from sleepwake.sleep.report import CycleReport
from sleepwake.store import FactRecord, Store
from sleepwake.users import check_user, user_home


class MlxMemory:
    """A model on MLX with a memory in its weights, persisted under `home` (see the module)."""

    backend = "mlx"

    def __init__(self, model: str | os.PathLike[str] | MlxModel | None = None,
                 home: str | os.PathLike[str] | None = None, *, config: MemoryConfig | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool | None = None,
                 user: str | None = None) -> None:
        self.user = check_user(user)
        root = Path(home).expanduser() if home is not None else default_home()
        self.config = config or MemoryConfig()
        self.progress = self.config.progress if progress is None else progress
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.mm = model if isinstance(model, MlxModel) else load_mlx_model(model, cache_dir=self.cache_dir,
                                                                           progress=self.progress)
        self.store = Store(user_home(root, self.user), self.mm.fingerprint, self.mm.name, lock_home=root)
        try:
            self.layers = tuple(self.config.memit.layers or self.mm.default_layers())
            bad = [l for l in self.layers if not 0 <= l < self.mm.n_layers]
            if bad:
                raise InvalidFactError(f"layers {bad} out of range: the model has {self.mm.n_layers} layers")
            if any(not is_keyed_file(p) for _, p in self.store.active_adapters()):
                raise UnsupportedError("this home's consolidated memory holds LoRA adapters, which the MLX "
                                       "backend does not read yet: use the torch backend")
            self._edits: dict[int, FactEdit] = {r.id: self.store.load_edit(r.id) for r in self.store.facts(where="memit")}
            self._suspended: set[str] = set()
            self._load_keyed()
            self._rebuild()
        except BaseException:
            self.store.close()
            raise
        self._editor: MlxEditor | None = None

    @property
    def home(self) -> Path:
        return self.store.home

    @property
    def tokenizer(self) -> Any:
        return self.mm.tokenizer

    def editor(self) -> MlxEditor:
        """The MEMIT editor, built on first use; its Ĉ⁻¹ is kept on the model for every
        memory made on it (`LoadedModel.shared` on torch)."""
        if self._editor is None:
            cfg = self.config.memit
            key = (self.layers, cfg.cov_texts, cfg.cov_max_tokens)
            if key not in self.mm.shared:
                self.mm.shared[key] = MlxEditor(self.mm, self.layers, covariances(self.mm, self.layers, cfg,
                                                                                   self.cache_dir), cfg).cov_inv
            self._editor = MlxEditor(self.mm, self.layers, None, cfg, cov_inv=self.mm.shared[key])
        return self._editor

    # --- the live weights --------------------------------------------------------

    def _load_keyed(self) -> None:
        tables = [p for _, p in self.store.active_adapters() if is_keyed_file(p)]
        self._keyed: KeyedMemory | None = KeyedMemory.load(tables[-1]) if tables else None

    def keyed_live(self) -> KeyedMemory | None:
        """The keyed entries the model reads now (`Memory.keyed_live`)."""
        if self._keyed is None or not len(self._keyed):
            return None
        held = {r.id for r in self.store.facts(where="consolidated")}
        off = keyed_off(self._keyed.entries, held, self.store.facts(where="memit"), self._suspended,
                        self.config.memit)
        return self._keyed.without(sorted(off))

    def _rebuild(self, edits: Sequence[FactEdit] | None = None, keyed: KeyedMemory | None | str = "live") -> None:
        """Live model = base + `edits` (default: the committed ones, in fact order), reading
        `keyed` (default: the live keyed entries)."""
        if edits is None:
            edits = [self._edits[i] for i in sorted(self._edits)]
        memit: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in sorted({l for e in edits for l in e.a}):
            parts = [(e.a[layer], e.b[layer]) for e in edits if layer in e.a]
            memit[layer] = (torch.cat([a for a, _ in parts], dim=1).float(), torch.cat([b for _, b in parts]).float())
        self._sums = {l: torch.mm(a, b) for l, (a, b) in memit.items()}  # as `weights.LiveWeights.rebuild`
        for layer in range(self.mm.n_layers):
            self.mm.set_delta(layer, to_mx(self._sums[layer]) if layer in self._sums else None)
        table = self.keyed_live() if keyed == "live" else keyed
        self.mm.taps.keyed = _table(table) if table is not None and len(table) else None
        self.mm.taps.memit = {l: (to_mx(a), to_mx(b)) for l, (a, b) in memit.items()} if self.mm.taps.keyed else {}

    def _add(self, layer: int, delta: torch.Tensor) -> None:
        """A layer's update while a batch is solved layer by layer."""
        self._sums[layer] = self._sums[layer] + delta if layer in self._sums else delta
        self.mm.set_delta(layer, to_mx(self._sums[layer]))

    # --- memory ------------------------------------------------------------------

    def facts(self) -> list[FactRecord]:
        """Active facts, oldest first."""
        return self.store.facts()

    def chat_edits(self, held: int) -> bool:
        return chat_edits(self.config.memit, held)

    def _edit(self, facts: list[Fact], leaving: set[int], chat: bool, keyed: KeyedMemory | None | str = "live"
              ) -> tuple[list[FactEdit], InjectStats]:
        """MEMIT edits of `facts` once the edits of `leaving` are out of the weights, the
        other active edits' keys held fixed (eq. 5), the model reading `keyed` (default: the
        live entries). A consolidated fact of a subject edited now is carried along
        (`Memory.edit_among`): its entry is off while the subject is in MEMIT."""
        cfg = self.config.memit
        subjects = {edit_group(f, cfg) for f in facts}
        carried = [r for r in self.store.facts(where="consolidated")
                   if r.id not in leaving and edit_group(r.fact, cfg) in subjects]
        fixed = [self._edits[i] for i in sorted(self._edits) if i not in leaving]
        self._suspended = subjects
        try:
            self._rebuild(fixed, keyed)
            edits, stats = self.editor().edit(facts + [r.fact for r in carried], fixed, self._add, chat=chat)
        finally:
            self._suspended = set()
        own = edits[: len(facts)]
        for r, e in zip(carried, edits[len(facts):]):
            first = next(i for i, f in enumerate(facts) if shares_edit(f, r.fact, cfg))
            own[first] = own[first].joined(e)
        return own, stats

    def inject(self, facts: FactLike | Sequence[FactLike]) -> InjectResult:
        """Write facts into the weights now (`Memory.inject`, without its guard)."""
        active = {r.fact.key: r for r in self.store.facts()}
        plan = plan_injection(as_facts(facts), active)
        records: list[FactRecord] = []
        stats: list[InjectStats] = []
        for batch in batches(plan.todo, self.config.batch_size, self.config.memit):
            keys = {f.key for f in batch}
            replaces = [active[f.key].id if f.key in active else None for f in batch]
            others = [r for r in active.values() if r.where == "memit" and r.fact.key not in keys]
            again = [r for r in others if any(shares_edit(r.fact, f, self.config.memit) for f in batch)]
            leaving = {i for i in replaces if i is not None} | {r.id for r in again}
            try:
                edits, st = self._edit(batch + [r.fact for r in again], leaving,
                                       self.chat_edits(len(others) + len(batch)))
                rewritten = {r.id: e for r, e in zip(again, edits[len(batch):])}
                recs = self.store.commit_injection(batch, edits[: len(batch)], replaces, rewritten)
            except BaseException:
                self._rebuild()
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
        return InjectResult(records, plan.skipped, stats)

    def forget(self, fact_id: int) -> FactRecord:
        """Remove a fact (`Memory.forget`): its delta leaves the weights, its edit file is
        deleted; its subject's other facts are edited again without it."""
        fact_id = policy_fact_id(fact_id)
        keyed = {c for c, p in self.store.consolidating_cycles() if is_keyed_file(p)}
        plan = plan_forget(self.store.get(fact_id), self.store.facts(where="memit"),
                           self.store.facts(where="consolidated"), keyed, self.config.memit)
        try:
            rewritten: dict[int, FactEdit] = {}
            if plan.redo:
                held = len(self.store.facts(where="memit")) - 1 + len(plan.back)
                edits, _ = self._edit([r.fact for r in plan.redo], {fact_id, *(r.id for r in plan.redo)},
                                      self.chat_edits(held))
                rewritten = {r.id: e for r, e in zip(plan.redo, edits)}
            rec = self.store.forget(fact_id, rewritten, to_memit=[r.id for r in plan.back])
        except BaseException:
            self._rebuild()
            raise
        self._edits.pop(fact_id, None)
        self._edits.update(rewritten)
        self._rebuild()
        return rec

    # --- sleep ---------------------------------------------------------------------

    def nap(self) -> CycleReport:
        """Move MEMIT-held subjects into the keyed memory (`sleep.keyed_sleep`, its
        reuse path): each subject whose injection solved one δ for all its facts, raw and
        chat, gets an entry with that δ and the keys read on the model with MEMIT off; a
        subject the entry answers (every fact, raw and chat, teacher-forced) leaves MEMIT,
        the others stay in MEMIT, edited anew on the new state (as `sleep.commit.rewrite_kept`
        on torch): their old edits leaned on the edits that left (40 held facts,
        benchmarks/mlx_bench.py: 25 keyed, and 14 of the 15 kept were lost before they were
        edited anew). Unlike the torch nap, a subject is not solved again for its entry, and
        no perplexity or locality budget is measured here."""
        t0 = time.perf_counter()
        memit = self.store.facts(where="memit")
        if not memit:
            return CycleReport(None, "nap", "nothing to do", reason="no facts in MEMIT")
        cycle = self.store.begin_cycle("nap")
        report = CycleReport(cycle, "nap", "running")
        try:
            return self._nap(cycle, memit, report, t0)
        except BaseException:
            self._rebuild()
            self.store.end_cycle(cycle, "rejected", {**report.to_dict(), "reason": "failed"})
            raise

    def _nap(self, cycle: int, memit: list[FactRecord], report: CycleReport, t0: float) -> CycleReport:
        old = self._keyed or KeyedMemory(self.layers[-1], self.layers[0], self.config.keyed_threshold)
        moving: dict[str, list[FactRecord]] = {}
        for r in memit:
            moving.setdefault(r.fact.subject_key, []).append(r)
        for r in self.store.facts(where="consolidated"):  # a subject's held facts go with its MEMIT ones
            if r.fact.subject_key in moving:
                moving[r.fact.subject_key].insert(0, r)
        keep = old.without(sorted(moving))
        self._rebuild([], keep)  # MEMIT off
        reusable: dict[str, torch.Tensor] = {}
        for s, recs in moving.items():
            vs = [self._edits[r.id].v for r in recs if r.where == "memit" and r.id in self._edits]
            deltas = [next(iter(v.values())) for v in vs if v]
            if deltas and len(deltas) == len(vs) and all(torch.equal(d, deltas[0]) for d in deltas[1:]):
                reusable[s] = deltas[0]
        keys = self.editor().subject_keys([r.fact for s in reusable for r in moving[s]]) if reusable else {}
        table = keep.with_entries([Entry(s, d, keys[s], tuple(sorted(r.id for r in moving[s])))
                                   for s, d in reusable.items()])
        self._rebuild([], table)
        ok = {s: s in reusable and all(self.held([r.fact for r in moving[s]])) for s in moving}
        failed = [s for s in moving if not ok[s]]
        table = table.without(failed).with_entries([old.entries[s] for s in failed if s in old.entries])
        passed = [r.id for s in moving if ok[s] for r in moving[s] if r.where == "memit"]
        report.kept = [r.id for s in failed for r in moving[s] if r.where == "memit"]
        report.consolidated, report.reused = passed, len(reusable)
        report.chat_recall = report.raw_recall = len(passed) / len(memit)
        report.seconds = time.perf_counter() - t0
        if not passed:
            report.reason = "no subject was answered by its keyed entry"
            report.status = "rejected"
            self._rebuild()
            self.store.end_cycle(cycle, "rejected", report.to_dict())
            return report
        kept = [r for s in failed for r in moving[s] if r.where == "memit"]
        rewritten: dict[int, FactEdit] = {}
        if kept:  # edited again on the new state, as `sleep.commit.rewrite_kept` does on torch
            live = table.without(sorted({str(edit_group(r.fact, self.config.memit)) for r in kept}))
            edits, _ = self._edit([r.fact for r in kept], set(passed) | {r.id for r in kept},
                                  self.chat_edits(len(kept)), keyed=live)
            rewritten = {r.id: e for r, e in zip(kept, edits)}
        table.save(self.store.keyed_path(cycle))
        report.status = "accepted"
        self.store.end_cycle(cycle, "accepted", report.to_dict(), adapter=True, consolidated=passed, keyed=True,
                             rewritten=rewritten, erase_superseded=self.store.meta("rebuild_pending") == "1")
        self.store.set_meta("awake_since", repr(time.time()))
        self._load_keyed()
        for i in passed:
            self._edits.pop(i, None)
        self._edits.update(rewritten)
        self._rebuild()
        return report

    # --- using the model -------------------------------------------------------------

    def held(self, facts: Sequence[Fact], chat: bool = True) -> list[bool]:
        """Whether greedy decoding writes each fact's object right after its prompt (and,
        with `chat`, its chat question): `evaluate.held` on MLX."""
        tok = self.tokenizer
        forms = [[(f.prompt, f.target, False) for f in facts]]
        if chat:
            forms.append([(chat_text(tok, f.chat_question()), f.object, True) for f in facts])
        ok = [True] * len(facts)
        for form in forms:
            seqs = []
            for text, target, is_chat in form:
                p = encode(tok, text, chat=is_chat)
                seqs.append((p + encode_target(tok, text, target, chat=is_chat), len(p)))
            ok = [a and b for a, b in zip(ok, self.mm.object_is_top(seqs))]
        return ok

    def complete(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """Greedy raw continuation of `prompt` (the MEMIT pathway)."""
        prompt = check_text(prompt, "prompt")
        return self.mm.generate(encode(self.tokenizer, prompt), max_new_tokens or self.config.generation.max_new_tokens)

    def ask(self, question: str, max_new_tokens: int | None = None) -> str:
        """Greedy answer to `question` through the model's chat template."""
        question = check_text(question, "question")
        ids = encode(self.tokenizer, chat_text(self.tokenizer, question), chat=True)
        return self.mm.generate(ids, max_new_tokens or self.config.generation.max_new_tokens).strip()

    def evaluate(self, facts: FactLike | Sequence[FactLike], max_new_tokens: int = 16) -> EvalReport:
        """Raw and chat recall of `facts` (`evaluate.evaluate_facts`; perplexity not measured)."""
        facts = as_facts(facts)
        tok = self.tokenizer
        results = []
        for f in facts:
            raw = self.mm.generate(encode(tok, f.prompt), max_new_tokens, until=f.object)
            chat = self.mm.generate(encode(tok, chat_text(tok, f.chat_question()), chat=True), max_new_tokens,
                                    until=f.object)
            results.append(FactResult(f.subject, f.relation, f.object, f.chat_question(), raw, mentions(raw, f.object),
                                      chat, mentions(chat, f.object)))
        n = len(results)
        return EvalReport(n, sum(r.raw_ok for r in results) / n, sum(r.chat_ok for r in results) / n, None, results)

    def status(self) -> dict[str, Any]:
        """How many facts live where (the sleep pressure is not computed on MLX yet)."""
        return {"backend": "mlx", "facts": {"memit": len(self.store.facts(where="memit")),
                                            "consolidated": len(self.store.facts(where="consolidated"))},
                "keyed_subjects": len(self._keyed) if self._keyed is not None else 0}

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "MlxMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _table(memory: KeyedMemory) -> KeyedTable:
    """A keyed memory as the MLX taps read it (`KeyedMemory.table`)."""
    read, deltas, owner = memory.table("cpu")
    return KeyedTable(memory.layer, memory.match_layer, memory.threshold, memory.head_threshold,
                      to_mx(read.keys), to_mx(read.heads), read.backs.numpy(), to_mx(deltas),
                      mx.array(owner.numpy()))
